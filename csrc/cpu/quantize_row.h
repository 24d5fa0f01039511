// Per-token asymmetric quantization of one fp32 row (reference.per_token_quantize), shared
// by the per_token_quantize and layernorm_quantize CPU kernels so that the two cannot drift.
// Bit-exact with the reference: IEEE fp32 division, round half to even (nearbyint in the
// default rounding mode), the 0-containing range, s = 1 for a zero range.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

#include "cpu/common.h"

namespace vitq::cpu {

// clamp(q, 0, levels) of an integer-valued (or infinite) float, as an int.  NaN maps to 0
// (defined behaviour instead of a UB cast); only a zero scale can produce it, i.e. a
// nonzero range below ~1e-44 whose range / levels underflows to 0.
inline int32_t clamp_code(float q, float levels) {
  if (!(q > 0.f)) return 0;
  if (q >= levels) return static_cast<int32_t>(levels);
  return static_cast<int32_t>(q);
}

// Static (calibrated) per-position scales: row i uses entry i % T.
struct StaticScales {
  const float* scale = nullptr;   // [T]; the op's argument, alive for the call
  const int32_t* zero = nullptr;  // [T], signed domain
  int64_t T = 0;                  // 0: dynamic scales
};

inline StaticScales check_static_scales(const char* op, const std::optional<at::Tensor>& scale,
                                        const std::optional<at::Tensor>& zero, int64_t M, int64_t bits) {
  StaticScales st;
  if (!scale.has_value()) {
    TORCH_CHECK_VALUE(!zero.has_value(), op, ": zero given without scale");
    return st;
  }
  TORCH_CHECK_VALUE(zero.has_value(), op, ": static scale needs a zero point");
  const at::Tensor& s = *scale;
  const at::Tensor& z = *zero;
  check_dtype(s, at::kFloat, op, "scale");
  check_dtype(z, at::kInt, op, "zero");
  check_cpu_contiguous(s, op, "scale");
  check_cpu_contiguous(z, op, "zero");
  TORCH_CHECK_VALUE(s.dim() == 1 && z.dim() == 1, op, ": static scale and zero must be 1-D, got shapes ",
                    s.sizes(), " and ", z.sizes());
  st.T = s.numel();
  TORCH_CHECK_VALUE(st.T > 0 && M % st.T == 0 && z.numel() == st.T, op, ": static scale/zero of length ", st.T,
                    "/", z.numel(), " do not tile M=", M, " rows");
  st.scale = s.data_ptr<float>();
  st.zero = z.data_ptr<int32_t>();
  const int32_t half = 1 << (bits - 1);
  for (int64_t t = 0; t < st.T; ++t) {
    TORCH_CHECK_VALUE(std::isfinite(st.scale[t]) && st.scale[t] > 0.f, op,
                      ": static scales must be finite and > 0; scale[", t, "] = ", st.scale[t]);
    TORCH_CHECK_VALUE(st.zero[t] >= -half && st.zero[t] <= half - 1, op, ": static zero points must lie in [",
                      -half, ", ", half - 1, "]; zero[", t, "] = ", st.zero[t]);
  }
  return st;
}

struct RowOut {
  float scale;
  int32_t zero, rowsum, count;  // signed-domain zero point; count = outliers seen (may exceed C)
};

// Row `row` of per_token_quantize: signed codes into `codes` [K], the first C outliers
// (|y| > threshold when split) into idx/val.  An outlier takes the zero point's code, so it
// adds exactly 0 to the dense product.
inline RowOut quantize_row(const float* y, int64_t K, int64_t bits, const StaticScales& st, int64_t row, bool split,
                           float threshold, int64_t C, int8_t* codes, int32_t* idx, float* val) {
  const int32_t half = 1 << (bits - 1);
  const float levels = static_cast<float>((1 << bits) - 1);
  auto is_outlier = [&](float v) { return split && std::fabs(v) > threshold; };
  float s;
  int32_t zu;  // unsigned-domain zero point
  if (st.T) {
    s = st.scale[row % st.T];
    zu = st.zero[row % st.T] + half;
  } else {
    float lo = 0.f, hi = 0.f;  // the range always contains 0; outliers are left out
    for (int64_t k = 0; k < K; ++k) {
      if (is_outlier(y[k])) continue;
      lo = std::min(lo, y[k]);
      hi = std::max(hi, y[k]);
    }
    const float rng = hi - lo;
    s = rng > 0.f ? rng / levels : 1.f;
    zu = clamp_code(std::nearbyint(-lo / s), levels);
  }
  const float zf = static_cast<float>(zu);
  int32_t sum = 0, n_out = 0;
  for (int64_t k = 0; k < K; ++k) {
    int32_t q;
    if (is_outlier(y[k])) {
      q = zu;
      if (n_out < C) {
        idx[n_out] = static_cast<int32_t>(k);
        val[n_out] = y[k];
      }
      ++n_out;
    } else {
      q = clamp_code(std::nearbyint(y[k] / s) + zf, levels);
    }
    codes[k] = static_cast<int8_t>(q - half);
    sum += q - half;
  }
  return {s, zu - half, sum, n_out};
}

// Stores K signed codes: one per byte (8 bit), or packed two per byte (3 and 4 bit).
inline void store_codes(const int8_t* q, int64_t K, int64_t bits, uint8_t* dst) {
  if (is_packed(bits)) {
    for (int64_t j = 0; j < K / 2; ++j) dst[j] = pack_nibbles(q[2 * j], q[2 * j + 1]);
  } else {
    std::memcpy(dst, q, static_cast<size_t>(K));
  }
}

}  // namespace vitq::cpu
