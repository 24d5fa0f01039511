// CPU kernel of vitq::per_token_quantize (reference.per_token_quantize): per-row asymmetric
// codes with a 0-containing range, optional static per-position scales, and the POQ
// outlier split into a fixed-capacity list.  Bit-exact with the reference: IEEE fp32
// division, round-half-to-even (nearbyint in the default rounding mode), fp32 adds.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/common.h"

namespace vitq::cpu {
namespace {

constexpr const char* kOp = "per_token_quantize";

using QuantizeResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// clamp(q, 0, levels) of an integer-valued (or infinite) float, as an int.  NaN maps to 0
// (defined behaviour instead of a UB cast); only a zero scale can produce it, i.e. a
// nonzero range below ~1e-44 whose range / levels underflows to 0.
inline int32_t clamp_code(float q, float levels) {
  if (!(q > 0.f)) return 0;
  if (q >= levels) return static_cast<int32_t>(levels);
  return static_cast<int32_t>(q);
}

struct StaticScales {
  const float* scale = nullptr;  // [T]
  const int32_t* zero = nullptr;  // [T], signed domain
  int64_t T = 0;
};

StaticScales check_static(const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& zero, int64_t M,
                          int64_t bits) {
  StaticScales st;
  if (!scale.has_value()) {
    TORCH_CHECK_VALUE(!zero.has_value(), kOp, ": zero given without scale");
    return st;
  }
  TORCH_CHECK_VALUE(zero.has_value(), kOp, ": static scale needs a zero point");
  const at::Tensor& s = *scale;
  const at::Tensor& z = *zero;
  check_dtype(s, at::kFloat, kOp, "scale");
  check_dtype(z, at::kInt, kOp, "zero");
  check_cpu_contiguous(s, kOp, "scale");
  check_cpu_contiguous(z, kOp, "zero");
  TORCH_CHECK_VALUE(s.dim() == 1 && z.dim() == 1, kOp, ": static scale and zero must be 1-D, got shapes ",
                    s.sizes(), " and ", z.sizes());
  st.T = s.numel();
  TORCH_CHECK_VALUE(st.T > 0 && M % st.T == 0 && z.numel() == st.T, kOp, ": static scale/zero of length ", st.T,
                    "/", z.numel(), " do not tile M=", M, " rows");
  st.scale = s.data_ptr<float>();
  st.zero = z.data_ptr<int32_t>();
  const int32_t half = 1 << (bits - 1);
  for (int64_t t = 0; t < st.T; ++t) {
    TORCH_CHECK_VALUE(std::isfinite(st.scale[t]) && st.scale[t] > 0.f, kOp,
                      ": static scales must be finite and > 0; scale[", t, "] = ", st.scale[t]);
    TORCH_CHECK_VALUE(st.zero[t] >= -half && st.zero[t] <= half - 1, kOp, ": static zero points must lie in [",
                      -half, ", ", half - 1, "]; zero[", t, "] = ", st.zero[t]);
  }
  return st;
}

QuantizeResult per_token_quantize_cpu(const at::Tensor& x, int64_t bits, const std::optional<at::Tensor>& scale,
                                      const std::optional<at::Tensor>& zero,
                                      std::optional<double> outlier_threshold, int64_t max_outliers) {
  check_bits(bits, kOp, "bits");
  TORCH_CHECK_VALUE(x.dim() == 2, kOp, ": x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.is_floating_point(), kOp, ": x must be a float tensor, got ", dtype_name(x.scalar_type()));
  check_cpu_contiguous(x, kOp, "x");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK_VALUE(!is_packed(bits) || K % 2 == 0, kOp, ": ", bits, "-bit codes are packed in pairs along K; K=", K,
                    " is odd");
  TORCH_CHECK_VALUE(outlier_threshold.has_value() || max_outliers == 0, kOp,
                    ": max_outliers > 0 needs an outlier_threshold");
  TORCH_CHECK_VALUE(max_outliers >= 0, kOp, ": max_outliers must be >= 0, got ", max_outliers);
  const StaticScales st = check_static(scale, zero, M, bits);

  const int64_t C = max_outliers;
  const int32_t half = 1 << (bits - 1);
  const float levels = static_cast<float>((1 << bits) - 1);
  const bool split = outlier_threshold.has_value();
  // the reference compares the fp32 |x| with the threshold rounded to fp32
  const float threshold = split ? static_cast<float>(*outlier_threshold) : 0.f;

  const auto i32 = x.options().dtype(at::kInt);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor codes = is_packed(bits) ? at::empty({M, K / 2}, x.options().dtype(at::kByte))
                                     : at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor s_out = at::empty({M}, f32);
  at::Tensor z_out = at::empty({M}, i32);
  at::Tensor rowsum = at::empty({M}, i32);
  at::Tensor idx = at::zeros({M, C}, i32);
  at::Tensor val = at::zeros({M, C}, f32);
  at::Tensor count = at::empty({M}, i32);
  if (M == 0) return {codes, s_out, z_out, rowsum, idx, val, count};

  float* s_p = s_out.data_ptr<float>();
  int32_t* z_p = z_out.data_ptr<int32_t>();
  int32_t* rs_p = rowsum.data_ptr<int32_t>();
  int32_t* idx_p = idx.data_ptr<int32_t>();
  float* val_p = val.data_ptr<float>();
  int32_t* cnt_p = count.data_ptr<int32_t>();
  uint8_t* codes_p = static_cast<uint8_t*>(codes.data_ptr());
  const int64_t code_row = codes.size(1);
  // errors are recorded per row and raised after the parallel region
  std::vector<uint8_t> nonfinite(static_cast<size_t>(M), 0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "per_token_quantize_cpu", [&] {
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
    at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
      std::vector<float> row(static_cast<size_t>(K));
      std::vector<int8_t> signed_codes(static_cast<size_t>(K));
      for (int64_t i = r0; i < r1; ++i) {
        const scalar_t* xi = x_p + i * K;
        bool finite = true;
        for (int64_t k = 0; k < K; ++k) {
          row[k] = static_cast<float>(xi[k]);
          finite &= std::isfinite(row[k]);
        }
        s_p[i] = 1.f;
        z_p[i] = rs_p[i] = cnt_p[i] = 0;
        if (!finite) {
          nonfinite[i] = 1;
          continue;
        }
        float s;
        int32_t zu;  // unsigned-domain zero point
        if (st.T) {
          s = st.scale[i % st.T];
          zu = st.zero[i % st.T] + half;
        } else {
          float lo = 0.f, hi = 0.f;  // the range always contains 0
          for (int64_t k = 0; k < K; ++k) {
            const float v = row[k];
            if (split && std::fabs(v) > threshold) continue;
            lo = std::min(lo, v);
            hi = std::max(hi, v);
          }
          const float rng = hi - lo;
          s = rng > 0.f ? rng / levels : 1.f;
          zu = clamp_code(std::nearbyint(-lo / s), levels);
        }
        const float zf = static_cast<float>(zu);
        int32_t sum = 0, n_out = 0;
        for (int64_t k = 0; k < K; ++k) {
          const float v = row[k];
          int32_t q;
          if (split && std::fabs(v) > threshold) {
            // an outlier takes the zero point's code, so it adds exactly 0 to the dense product
            q = zu;
            if (n_out < C) {
              idx_p[i * C + n_out] = static_cast<int32_t>(k);
              val_p[i * C + n_out] = v;
            }
            ++n_out;
          } else {
            q = clamp_code(std::nearbyint(v / s) + zf, levels);
          }
          signed_codes[k] = static_cast<int8_t>(q - half);
          sum += q - half;
        }
        s_p[i] = s;
        z_p[i] = zu - half;
        rs_p[i] = sum;
        cnt_p[i] = n_out;
        uint8_t* dst = codes_p + i * code_row;
        if (is_packed(bits)) {
          for (int64_t j = 0; j < K / 2; ++j) dst[j] = pack_nibbles(signed_codes[2 * j], signed_codes[2 * j + 1]);
        } else {
          std::memcpy(dst, signed_codes.data(), static_cast<size_t>(K));
        }
      }
    });
  });

  for (int64_t i = 0; i < M; ++i)
    TORCH_CHECK_VALUE(!nonfinite[i], kOp, ": x contains NaN or Inf (first in row ", i,
                      "); quantization is undefined for non-finite values");
  // same row as the reference names: the first row with the largest count
  int64_t worst = 0;
  for (int64_t i = 1; i < M; ++i)
    if (cnt_p[i] > cnt_p[worst]) worst = i;
  TORCH_CHECK_VALUE(cnt_p[worst] <= C, kOp, ": row ", worst, " has ", cnt_p[worst], " outliers but max_outliers=", C,
                    "; raise max_outliers (or the outlier threshold)");
  return {codes, s_out, z_out, rowsum, idx, val, count};
}

}  // namespace
}  // namespace vitq::cpu

TORCH_LIBRARY_IMPL(vitq, CPU, m) { m.impl("per_token_quantize", &vitq::cpu::per_token_quantize_cpu); }
