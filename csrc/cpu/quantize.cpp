// CPU kernel of vitq::per_token_quantize (reference.per_token_quantize): per-row asymmetric
// codes with a 0-containing range, optional static per-position scales, and the POQ
// outlier split into a fixed-capacity list.  The row arithmetic is quantize_row.h's,
// shared with layernorm_quantize and bit-exact with the reference.
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

constexpr const char* kOp = "per_token_quantize";

using QuantizeResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

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
  const StaticScales st = check_static_scales(kOp, scale, zero, M, bits);

  const int64_t C = max_outliers;
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
        const RowOut r = quantize_row(row.data(), K, bits, st, i, split, threshold, C, signed_codes.data(),
                                      idx_p + i * C, val_p + i * C);
        s_p[i] = r.scale;
        z_p[i] = r.zero;
        rs_p[i] = r.rowsum;
        cnt_p[i] = r.count;
        store_codes(signed_codes.data(), K, bits, codes_p + i * code_row);
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
