// CPU kernel of vitq::layernorm_quantize (reference.layernorm_quantize): LayerNorm of one
// row, then per-token asymmetric codes with the POQ outlier split, without writing the
// normalized row anywhere but a per-thread buffer.
//
// The LayerNorm statistics are accumulated in double and each y is rounded to fp32 once,
// so y is within an ulp or so of the float64 LayerNorm (far inside the contract bound of
// reference.layernorm_error_bound).  y is then quantized by quantize_row.h, the code
// per_token_quantize runs, bit-exact with reference.per_token_quantize.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/common.h"
#include "cpu/quantize_row.h"

namespace vitq::cpu {
namespace {

constexpr const char* kOp = "layernorm_quantize";

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// fp32 LayerNorm of one row into y; false if x or y is not finite.
template <typename T>
bool layer_norm_row(const T* x, const float* w, const float* b, int64_t K, double eps, float* y) {
  double sum = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const double v = static_cast<double>(x[k]);
    if (!std::isfinite(v)) return false;
    sum += v;
  }
  const double mean = sum / static_cast<double>(K);
  double sq = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const double d = static_cast<double>(x[k]) - mean;
    sq += d * d;
  }
  const double rstd = 1.0 / std::sqrt(sq / static_cast<double>(K) + eps);
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    const double v = (static_cast<double>(x[k]) - mean) * rstd * static_cast<double>(w[k]) +
                     static_cast<double>(b[k]);
    y[k] = static_cast<float>(v);
    finite &= std::isfinite(y[k]);
  }
  return finite;
}

Outputs layernorm_quantize_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                               int64_t bits, const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& zero, std::optional<double> outlier_threshold,
                               int64_t max_outliers) {
  check_bits(bits, kOp, "bits");
  TORCH_CHECK_VALUE(x.dim() == 2, kOp, ": x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   kOp, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  check_cpu_contiguous(x, kOp, "x");
  const int64_t M = x.size(0), K = x.size(1);
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    TORCH_CHECK_TYPE(t->is_floating_point(), kOp, ": ", name, " must be a float tensor, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got device ", t->device());
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == K, kOp, ": ", name, " must have shape [", K, "], got ",
                      t->sizes());
  }
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, kOp, ": eps must be finite and > 0, got ", eps);
  TORCH_CHECK_VALUE(!is_packed(bits) || K % 2 == 0, kOp, ": ", bits, "-bit codes are packed in pairs along K; K=", K,
                    " is odd");
  TORCH_CHECK_VALUE(max_outliers >= 0, kOp, ": max_outliers must be >= 0, got ", max_outliers);
  TORCH_CHECK_VALUE(outlier_threshold.has_value() || max_outliers == 0, kOp,
                    ": max_outliers > 0 needs an outlier_threshold");
  const StaticScales st = check_static_scales(kOp, scale, zero, M, bits);

  const int64_t C = max_outliers;
  const bool split = outlier_threshold.has_value();
  const float threshold = split ? static_cast<float>(*outlier_threshold) : 0.f;
  const auto i32 = x.options().dtype(at::kInt);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor codes = is_packed(bits) ? at::empty({M, K / 2}, x.options().dtype(at::kByte))
                                     : at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor s_out = at::empty({M}, f32), z_out = at::empty({M}, i32), rowsum = at::empty({M}, i32);
  at::Tensor idx = at::zeros({M, C}, i32), val = at::zeros({M, C}, f32), count = at::zeros({M}, i32);
  if (M == 0) return {codes, s_out, z_out, rowsum, idx, val, count};

  // LayerNorm parameters in fp32 (K values; any float dtype and strides accepted)
  const at::Tensor w32 = weight.to(at::kFloat).contiguous(), b32 = bias.to(at::kFloat).contiguous();
  const float* w_p = w32.data_ptr<float>();
  const float* b_p = b32.data_ptr<float>();
  float* s_p = s_out.data_ptr<float>();
  int32_t* z_p = z_out.data_ptr<int32_t>();
  int32_t* rs_p = rowsum.data_ptr<int32_t>();
  int32_t* cnt_p = count.data_ptr<int32_t>();
  int32_t* idx_p = idx.data_ptr<int32_t>();
  float* val_p = val.data_ptr<float>();
  uint8_t* codes_p = static_cast<uint8_t*>(codes.data_ptr());
  const int64_t code_row = codes.size(1);
  // per-row status, raised after the parallel region: 1 = x not finite, 2 = y not finite
  std::vector<uint8_t> status(static_cast<size_t>(M), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layernorm_quantize_cpu", [&] {
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
    at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
      std::vector<float> y(static_cast<size_t>(K));
      std::vector<int8_t> q(static_cast<size_t>(K));
      for (int64_t i = r0; i < r1; ++i) {
        s_p[i] = 1.f;
        z_p[i] = rs_p[i] = 0;
        if (!layer_norm_row(x_p + i * K, w_p, b_p, K, eps, y.data())) {
          bool x_finite = true;
          for (int64_t k = 0; k < K; ++k) x_finite &= std::isfinite(static_cast<float>(x_p[i * K + k]));
          status[i] = x_finite ? 2 : 1;
          continue;
        }
        const RowOut r = quantize_row(y.data(), K, bits, st, i, split, threshold, C, q.data(), idx_p + i * C,
                                      val_p + i * C);
        s_p[i] = r.scale;
        z_p[i] = r.zero;
        rs_p[i] = r.rowsum;
        cnt_p[i] = r.count;
        store_codes(q.data(), K, bits, codes_p + i * code_row);
      }
    });
  });

  for (int64_t i = 0; i < M; ++i) {
    TORCH_CHECK_VALUE(status[i] != 1, kOp, ": x contains NaN or Inf (first in row ", i,
                      "); quantization is undefined for non-finite values");
    TORCH_CHECK_VALUE(status[i] != 2, kOp, ": LayerNorm(x) overflows fp32 in row ", i,
                      " (weight or bias too large)");
  }
  const int64_t worst = std::max_element(cnt_p, cnt_p + M) - cnt_p;  // first row with the largest count
  TORCH_CHECK_VALUE(cnt_p[worst] <= C, kOp, ": row ", worst, " has ", cnt_p[worst], " outliers but max_outliers=", C,
                    "; raise max_outliers (or the outlier threshold)");
  return {codes, s_out, z_out, rowsum, idx, val, count};
}

}  // namespace
}  // namespace vitq::cpu

TORCH_LIBRARY_IMPL(vitq, CPU, m) { m.impl("layernorm_quantize", &vitq::cpu::layernorm_quantize_cpu); }
