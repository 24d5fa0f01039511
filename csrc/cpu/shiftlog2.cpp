// CPU kernels of the Shift-Log2 pair around the MLP's GELU (reference.py, issue 3A):
//   vitq::qgemm_gelu_shiftlog2  fc1: qgemm -> exact GELU -> Shift-Log2 codes (uint8, one per byte)
//   vitq::shiftlog2_qgemm       fc2: Y = sw_j s_a sum_k 2^(-c_ik / 2^m) (w_jk - zw_j) + bias_j
//
// fc1 on CPU runs vitq::qgemm into an fp32 buffer (bit-exact with reference.qgemm) and then
// encodes it; the fused kernel that never writes the fp32 tensor is the GPU one.  GELU is
// evaluated in double as 0.5 h erfc(-h / sqrt 2) (no cancellation for h < 0) and rounded
// to fp32 once.  The code comes from the bits of y = fp32(fp32(g - shift) / scale) exactly
// as reference.log_code_unclamped: no log2 call, and the same mantissa thresholds.
//
// fc2 decodes 2^(-c / 2^m) by exponent-field construction (an exact fp32) and sums the
// products with (w - zw) in double.  Each product is exact in double, and the sum is
// exact whenever reference.shiftlog2_sum_is_exact (e.g. all 4-bit codes, K <= 16448), so
// the result then does not depend on the summation order and equals the reference's bit
// for bit; the fp32 epilogue performs the reference's operations in its order.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu/common.h"

namespace vitq::cpu {
namespace {

// reference.LOG_MANTISSA_THRESHOLDS: for m substeps, the 23-bit mantissas of the smallest
// fp32 >= 2^((2r+1) / 2^(m+1)), r = 0 .. 2^m - 1 (the rounding boundaries of -2^m log2 y)
constexpr int32_t kThresholds[3][4] = {
    {3474676, 0, 0, 0}, {1587185, 5719293, 0, 0}, {759234, 2490071, 4548395, 6996167}};
// reference.LOG_MANTISSAS: fp32 2^(-r / 2^m)
constexpr float kMantissas[3][4] = {{1.0f, 0.f, 0.f, 0.f},
                                    {1.0f, 0x1.6a09e6p-1f, 0.f, 0.f},
                                    {1.0f, 0x1.ae89fap-1f, 0x1.6a09e6p-1f, 0x1.306fe0p-1f}};

void check_log_args(const char* op, int64_t bits, int64_t substeps) {
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 8, op, ": Shift-Log2 bits must be in 1..8, got ", bits);
  TORCH_CHECK_VALUE(substeps >= 0 && substeps <= 2, op, ": substeps must be 0 (base 2), 1 (base sqrt 2) or 2, got ",
                    substeps);
}

// clamp(round(-2^m log2 y), 0, top) from the bits of y; y <= 0, NaN, subnormal -> top
inline uint8_t log_code(float y, int m, int32_t top) {
  uint32_t bits;
  std::memcpy(&bits, &y, sizeof bits);
  const int32_t exp_field = static_cast<int32_t>((bits >> 23) & 0xFF);
  if (!(y > 0.f) || exp_field == 0) return static_cast<uint8_t>(top);
  const int32_t mant = static_cast<int32_t>(bits & 0x7FFFFF);
  int32_t k = 0;
  for (int r = 0; r < (1 << m); ++r) k += mant >= kThresholds[m][r];
  const int32_t c = -(exp_field - 127) * (1 << m) - k;
  return static_cast<uint8_t>(std::clamp(c, 0, top));
}

// ---------------------------------------------------------------------------------------
// fc1: qgemm -> GELU -> codes
// ---------------------------------------------------------------------------------------
at::Tensor qgemm_gelu_shiftlog2_cpu(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& a_zero,
                                    const at::Tensor& a_rowsum, const at::Tensor& w, const at::Tensor& w_scale,
                                    const std::optional<at::Tensor>& w_zero, const at::Tensor& w_colsum,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& outlier_idx,
                                    const std::optional<at::Tensor>& outlier_val, int64_t a_bits, int64_t w_bits,
                                    double shift, double out_scale, int64_t out_bits, int64_t substeps) {
  constexpr const char* kOp = "qgemm_gelu_shiftlog2";
  check_log_args(kOp, out_bits, substeps);
  TORCH_CHECK_VALUE(std::isfinite(shift), kOp, ": shift must be finite, got ", shift);
  const float shift32 = static_cast<float>(shift), scale32 = static_cast<float>(out_scale);
  TORCH_CHECK_VALUE(std::isfinite(scale32) && scale32 > 0.f, kOp,
                    ": out_scale must be finite and > 0 in fp32, got ", out_scale);
  static const auto qgemm = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("vitq::qgemm", "")
                                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const std::optional<at::Tensor>&, const at::Tensor&,
                                                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                                  const std::optional<at::Tensor>&, int64_t, int64_t,
                                                  at::ScalarType)>();
  // validates every GEMM argument (errors name the qgemm argument)
  const at::Tensor h = qgemm.call(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias, outlier_idx,
                                  outlier_val, a_bits, w_bits, at::kFloat);
  at::Tensor codes = at::empty(h.sizes(), h.options().dtype(at::kByte));
  const float* h_p = h.data_ptr<float>();
  uint8_t* c_p = codes.data_ptr<uint8_t>();
  const int m = static_cast<int>(substeps);
  const int32_t top = (1 << out_bits) - 1;
  at::parallel_for(0, h.numel(), 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const double hd = h_p[e];
      const float g = static_cast<float>(0.5 * hd * std::erfc(-hd * M_SQRT1_2));
      c_p[e] = log_code((g - shift32) / scale32, m, top);
    }
  });
  return codes;
}

// ---------------------------------------------------------------------------------------
// fc2: the decode GEMM
// ---------------------------------------------------------------------------------------
constexpr int kRM = 4, kRN = 4;

// acc[r][c] = sum_k d[r][k] wz[c][k] in double (exact products; exact sums, see the top)
template <int RM, int RN>
inline void dot_block(const float* d, const float* wz, int64_t K, double* acc, int64_t ld_acc) {
  double sum[RM][RN] = {};
  for (int64_t k = 0; k < K; ++k) {
#pragma GCC unroll 4
    for (int r = 0; r < RM; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < RN; ++c) sum[r][c] += double(d[r * K + k]) * double(wz[c * K + k]);
  }
  for (int r = 0; r < RM; ++r)
    for (int c = 0; c < RN; ++c) acc[r * ld_acc + c] = sum[r][c];
}

template <typename T>
void store(const float* y, int64_t n, void* out, int64_t offset) {
  T* dst = static_cast<T*>(out) + offset;
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(y[j]);
}

VITQ_CPU_CLONES void decode_rows(const float* d, const float* wz, int64_t r0, int64_t r1, int64_t N, int64_t K,
                                 float s_a, const float* w_scale, const float* bias, void* out,
                                 at::ScalarType out_dtype) {
  constexpr int64_t kTileN = 64;
  double acc[kRM * kTileN];
  float y[kTileN];
  for (int64_t i0 = r0; i0 < r1; i0 += kRM) {
    const int64_t mb = std::min<int64_t>(kRM, r1 - i0);
    for (int64_t j0 = 0; j0 < N; j0 += kTileN) {
      const int64_t nb = std::min(kTileN, N - j0);
      for (int64_t c = 0; c < nb; c += kRN) {
        const bool full_n = c + kRN <= nb;
        const float* wc = wz + (j0 + c) * K;
        if (mb == kRM && full_n) {
          dot_block<kRM, kRN>(d + i0 * K, wc, K, acc + c, kTileN);
        } else {
          for (int64_t r = 0; r < mb; ++r)
            for (int64_t cc = c; cc < std::min(nb, c + kRN); ++cc)
              dot_block<1, 1>(d + (i0 + r) * K, wz + (j0 + cc) * K, K, acc + r * kTileN + cc, kTileN);
        }
      }
      for (int64_t r = 0; r < mb; ++r) {
        for (int64_t jj = 0; jj < nb; ++jj) {
          float v = s_a * static_cast<float>(acc[r * kTileN + jj]);
          v = w_scale[j0 + jj] * v;
          if (bias) v = v + bias[j0 + jj];
          y[jj] = v;
        }
        const int64_t offset = (i0 + r) * N + j0;
        switch (out_dtype) {
          case at::kFloat: store<float>(y, nb, out, offset); break;
          case at::kHalf: store<c10::Half>(y, nb, out, offset); break;
          default: store<c10::BFloat16>(y, nb, out, offset); break;
        }
      }
    }
  }
}

at::Tensor shiftlog2_qgemm_cpu(const at::Tensor& codes, int64_t bits, int64_t substeps, const at::Tensor& act_scale,
                               const at::Tensor& w, const at::Tensor& w_scale, const std::optional<at::Tensor>& w_zero,
                               const std::optional<at::Tensor>& bias, int64_t w_bits, at::ScalarType out_dtype) {
  constexpr const char* kOp = "shiftlog2_qgemm";
  check_log_args(kOp, bits, substeps);
  check_bits(w_bits, kOp, "w_bits");
  check_dtype(codes, at::kByte, kOp, "codes (one Shift-Log2 code per byte)");
  check_cpu_contiguous(codes, kOp, "codes");
  TORCH_CHECK_VALUE(codes.dim() == 2, kOp, ": codes must be 2-D [M, K], got shape ", codes.sizes());
  TORCH_CHECK_TYPE(w.scalar_type() == (is_packed(w_bits) ? at::kByte : at::kChar), kOp, ": w must be ",
                   is_packed(w_bits) ? "uint8 (two int4 codes per byte" : "int8 (one code per byte", ", w_bits=", w_bits,
                   "), got ", w.scalar_type());
  check_cpu_contiguous(w, kOp, "w");
  TORCH_CHECK_VALUE(w.dim() == 2, kOp, ": w must be 2-D [N, K], got shape ", w.sizes());
  const int64_t M = codes.size(0), K = codes.size(1), N = w.size(0);
  const int64_t Kw = w.size(1) * (is_packed(w_bits) ? 2 : 1);
  TORCH_CHECK_VALUE(K == Kw, kOp, ": K mismatch: codes have ", K, ", weights ", Kw,
                    " (a 3/4-bit weight holds K/2 bytes per row)");
  check_dtype(act_scale, at::kFloat, kOp, "act_scale");
  TORCH_CHECK_VALUE(act_scale.numel() == 1 && act_scale.device().is_cpu(), kOp,
                    ": act_scale must be one fp32 value on the CPU, got shape ", act_scale.sizes());
  check_tensor(w_scale, at::kFloat, {N}, kOp, "w_scale");
  if (w_zero.has_value()) check_tensor(*w_zero, at::kInt, {N}, kOp, "w_zero");
  at::Tensor bias32;
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->is_floating_point(), kOp, ": bias must be a float tensor, got ", bias->scalar_type());
    check_tensor(*bias, bias->scalar_type(), {N}, kOp, "bias");
    bias32 = bias->to(at::kFloat);
  }
  TORCH_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, kOp,
                    ": out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  at::Tensor out = at::empty({M, N}, codes.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;

  // w - zw as exact floats (|w - zw| <= 255), unpacking int4 on the way
  std::vector<float> wz(static_cast<size_t>(N * K));
  const int32_t* zw = w_zero.has_value() ? w_zero->data_ptr<int32_t>() : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t j0, int64_t j1) {
    std::vector<int8_t> row(static_cast<size_t>(K));
    for (int64_t j = j0; j < j1; ++j) {
      const int8_t* src = row.data();
      if (is_packed(w_bits)) {
        unpack_row(static_cast<const uint8_t*>(w.data_ptr()) + j * (K / 2), K / 2, row.data());
      } else {
        src = static_cast<const int8_t*>(w.data_ptr()) + j * K;
      }
      const int32_t z = zw ? zw[j] : 0;
      for (int64_t k = 0; k < K; ++k) wz[j * K + k] = static_cast<float>(int32_t(src[k]) - z);
    }
  });
  // 2^(-c / 2^m) by exponent-field construction: 2^-e for e = c >> m <= 126, else 0
  std::vector<float> d(static_cast<size_t>(M * K));
  const uint8_t* c_p = codes.data_ptr<uint8_t>();
  const int m = static_cast<int>(substeps);
  const uint32_t low_bits = (1u << bits) - 1;
  at::parallel_for(0, M * K, 16384, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const uint32_t c = c_p[e] & low_bits;
      const int32_t ex = static_cast<int32_t>(c >> m);
      const uint32_t pow_bits = static_cast<uint32_t>(std::max(127 - ex, 0)) << 23;
      float pow2;
      std::memcpy(&pow2, &pow_bits, sizeof pow2);
      d[e] = pow2 * kMantissas[m][c & ((1u << m) - 1)];
    }
  });
  const float s_a = act_scale.to(at::kFloat).item<float>();
  const float* bias_p = bias.has_value() ? bias32.data_ptr<float>() : nullptr;
  const float* ws_p = w_scale.data_ptr<float>();
  void* out_p = out.data_ptr();
  at::parallel_for(0, at::divup(M, kRM), 1, [&](int64_t b0, int64_t b1) {
    decode_rows(d.data(), wz.data(), b0 * kRM, std::min(M, b1 * kRM), N, K, s_a, ws_p, bias_p, out_p, out_dtype);
  });
  return out;
}

}  // namespace
}  // namespace vitq::cpu

TORCH_LIBRARY_IMPL(vitq, CPU, m) {
  m.impl("qgemm_gelu_shiftlog2", &vitq::cpu::qgemm_gelu_shiftlog2_cpu);
  m.impl("shiftlog2_qgemm", &vitq::cpu::shiftlog2_qgemm_cpu);
}
