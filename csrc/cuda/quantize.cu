// CUDA C++ kernels of the activation-side ops: vitq::per_token_quantize_cuda,
// vitq::pack_int4_cuda and vitq::unpack_int4_cuda.  Semantics: vitq_kernels/reference.py.
//
// per_token_quantize: one block per row.  Pass 1 reduces min/max over the non-outliers
// and counts outliers; pass 2 writes the codes and lists the outliers in column order
// with a block-wide prefix scan.  Errors that depend on the data (NaN/Inf, bad static
// scales, too many outliers) are flagged on the device and raised by the host wrapper
// after a single synchronising copy, with the reference's messages.
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "common.cuh"

namespace vitq_cuda {
namespace {

constexpr int kQuantThreads = 256;
constexpr int kQuantWarps = kQuantThreads / 32;

// status[0]: bit flags; status[1]: (count << 32) | (0xffffffff - row) of the worst row
// that overflows its outlier list (atomicMax picks the largest count, then the first row)
constexpr unsigned long long kNonFinite = 1, kBadScale = 2, kBadZero = 4;

template <typename scalar_t, int kBits>
__global__ void __launch_bounds__(kQuantThreads) per_token_quantize_kernel(
    const scalar_t* __restrict__ x, int64_t K, const float* __restrict__ static_scale,
    const int32_t* __restrict__ static_zero, int64_t T, bool has_threshold, float threshold, int64_t capacity,
    uint8_t* __restrict__ codes, float* __restrict__ scale_out, int32_t* __restrict__ zero_out,
    int32_t* __restrict__ rowsum_out, int32_t* __restrict__ outlier_idx, float* __restrict__ outlier_val,
    int32_t* __restrict__ outlier_count, unsigned long long* __restrict__ status) {
  constexpr int kHalf = 1 << (kBits - 1);
  constexpr float kLevels = static_cast<float>((1 << kBits) - 1);
  constexpr int kPerItem = kBits <= 4 ? 2 : 1;  // elements per stored byte (3/4-bit: packed pairs)
  __shared__ int iscratch[kQuantWarps];
  __shared__ float fscratch[2 * kQuantWarps];

  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * K;

  // pass 1: range of the dense part (outliers count as 0, which the range contains anyway)
  float lo = 0.f, hi = 0.f;
  int n_out = 0, nonfinite = 0;
  for (int64_t k = threadIdx.x; k < K; k += kQuantThreads) {
    const float v = static_cast<float>(xr[k]);
    nonfinite |= !isfinite(v);
    if (has_threshold && fabsf(v) > threshold) {
      ++n_out;
    } else {
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
  }
  block_min_max<kQuantWarps>(lo, hi, fscratch);
  const int count = block_sum<kQuantWarps>(n_out, iscratch);
  const bool any_nonfinite = __syncthreads_or(nonfinite);

  float s, zu;  // scale and unsigned zero point (an integer value, kept as float like the reference)
  unsigned long long bad = any_nonfinite ? kNonFinite : 0;
  if (static_scale != nullptr) {
    s = static_scale[row % T];
    const int64_t z = static_zero[row % T];
    if (!(s > 0.f) || !isfinite(s)) bad |= kBadScale;
    if (z < -kHalf || z > kHalf - 1) bad |= kBadZero;
    zu = static_cast<float>(z + kHalf);
  } else {
    const float range = __fsub_rn(hi, lo);
    s = range > 0.f ? __fdiv_rn(range, kLevels) : 1.f;
    zu = fminf(fmaxf(rintf(__fdiv_rn(-lo, s)), 0.f), kLevels);
  }

  // pass 2: codes, row sum, and the outlier list (ascending columns: scan in thread order)
  const int64_t n_items = K / kPerItem;
  const bool list_outliers = capacity > 0 && count > 0;  // block-uniform
  int rowsum = 0;
  int64_t base = 0;
  for (int64_t item0 = 0; item0 < n_items; item0 += kQuantThreads) {
    const int64_t item = item0 + threadIdx.x;
    float v[kPerItem];
    int flags = 0;
    if (item < n_items) {
      int c[kPerItem];
#pragma unroll
      for (int e = 0; e < kPerItem; ++e) {
        v[e] = static_cast<float>(xr[item * kPerItem + e]);
        const bool outlier = has_threshold && fabsf(v[e]) > threshold;
        // an outlier takes the zero point, so it adds exactly 0 to the integer product
        const float q = outlier ? zu : fminf(fmaxf(rintf(__fdiv_rn(v[e], s)) + zu, 0.f), kLevels);
        c[e] = static_cast<int>(q) - kHalf;
        rowsum += c[e];
        flags |= static_cast<int>(outlier) << e;
      }
      if constexpr (kBits <= 4) {
        codes[row * n_items + item] = pack_pair(c[0], c[1]);
      } else {
        codes[row * n_items + item] = static_cast<uint8_t>(static_cast<int8_t>(c[0]));
      }
    }
    if (list_outliers) {
      int chunk_total;
      int64_t pos = base + block_exclusive_scan<kQuantWarps>(__popc(flags), chunk_total, iscratch);
#pragma unroll
      for (int e = 0; e < kPerItem; ++e) {
        if ((flags >> e) & 1) {
          if (pos < capacity) {
            outlier_idx[row * capacity + pos] = static_cast<int32_t>(item * kPerItem + e);
            outlier_val[row * capacity + pos] = v[e];
          }
          ++pos;
        }
      }
      base += chunk_total;
    }
  }
  rowsum = block_sum<kQuantWarps>(rowsum, iscratch);

  if (threadIdx.x == 0) {
    scale_out[row] = s;
    zero_out[row] = static_cast<int32_t>(zu) - kHalf;
    rowsum_out[row] = rowsum;
    outlier_count[row] = count;
    if (bad) atomicOr(status, bad);
    if (count > capacity) {
      const unsigned long long key = (static_cast<unsigned long long>(count) << 32) |
                                     (0xffffffffull - static_cast<unsigned long long>(row));
      atomicMax(status + 1, key);
    }
  }
}

__global__ void pack_int4_kernel(const int8_t* __restrict__ codes, uint8_t* __restrict__ packed, int64_t n_pairs,
                                 unsigned long long* __restrict__ out_of_range) {
  bool bad = false;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < n_pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int lo = codes[2 * p], hi = codes[2 * p + 1];
    bad |= lo < -8 || lo > 7 || hi < -8 || hi > 7;
    packed[p] = pack_pair(lo, hi);
  }
  if (bad) atomicOr(out_of_range, 1ull);
}

__global__ void unpack_int4_kernel(const uint8_t* __restrict__ packed, int8_t* __restrict__ codes, int64_t n_bytes) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < n_bytes;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t b = packed[p];
    codes[2 * p] = static_cast<int8_t>(sext4(b & 0xFu));
    codes[2 * p + 1] = static_cast<int8_t>(sext4(b >> 4));
  }
}

int elementwise_blocks(int64_t n) {
  // enough blocks to fill the GPU; the kernels stride over the rest
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = (n + 255) / 256;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t{sms} * 8)));
}

}  // namespace

at::Tensor pack_int4_cuda(const at::Tensor& codes) {
  check_cuda(codes, "codes");
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kChar, "pack_int4 expects int8 codes, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() >= 1, "pack_int4 needs a tensor with at least one dimension");
  TORCH_CHECK_VALUE(codes.size(-1) % 2 == 0, "pack_int4 needs an even last dimension, got ", codes.size(-1));
  check_contiguous(codes, "codes");
  const c10::cuda::CUDAGuard guard(codes.device());
  auto shape = codes.sizes().vec();
  shape.back() /= 2;
  at::Tensor packed = at::empty(shape, codes.options().dtype(at::kByte));
  const int64_t n_pairs = packed.numel();
  if (n_pairs == 0) return packed;
  at::Tensor flag = at::zeros({1}, codes.options().dtype(at::kLong));
  pack_int4_kernel<<<elementwise_blocks(n_pairs), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      codes.data_ptr<int8_t>(), packed.data_ptr<uint8_t>(), n_pairs,
      reinterpret_cast<unsigned long long*>(flag.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK_VALUE(flag.item<int64_t>() == 0, "pack_int4: codes outside the signed 4-bit range [-8, 7]");
  return packed;
}

at::Tensor unpack_int4_cuda(const at::Tensor& packed) {
  check_cuda(packed, "packed");
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "unpack_int4 expects uint8, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() >= 1, "unpack_int4 needs a tensor with at least one dimension");
  check_contiguous(packed, "packed");
  const c10::cuda::CUDAGuard guard(packed.device());
  auto shape = packed.sizes().vec();
  shape.back() *= 2;
  at::Tensor codes = at::empty(shape, packed.options().dtype(at::kChar));
  const int64_t n_bytes = packed.numel();
  if (n_bytes == 0) return codes;
  unpack_int4_kernel<<<elementwise_blocks(n_bytes), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      packed.data_ptr<uint8_t>(), codes.data_ptr<int8_t>(), n_bytes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return codes;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
per_token_quantize_cuda(const at::Tensor& x, int64_t bits, const std::optional<at::Tensor>& scale,
                        const std::optional<at::Tensor>& zero, std::optional<double> outlier_threshold,
                        int64_t max_outliers) {
  check_bits(bits, "bits");
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.is_floating_point(), "x must be a float tensor, got ", x.scalar_type());
  check_cuda(x, "x");
  check_contiguous(x, "x");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK_VALUE(!(is_packed(bits) && K % 2), bits, "-bit codes are packed in pairs along K; K=", K, " is odd");
  TORCH_CHECK_VALUE(K < (int64_t{1} << 31), "K=", K, " does not fit the int32 outlier indices");
  TORCH_CHECK_VALUE(outlier_threshold.has_value() || max_outliers == 0,
                    "max_outliers > 0 needs an outlier_threshold");
  TORCH_CHECK_VALUE(max_outliers >= 0, "max_outliers must be >= 0");
  TORCH_CHECK_VALUE(scale.has_value() || !zero.has_value(), "zero given without scale");
  TORCH_CHECK_VALUE(!scale.has_value() || zero.has_value(), "static scale needs a zero point");
  const c10::cuda::CUDAGuard guard(x.device());

  at::Tensor static_scale, static_zero;
  int64_t T = 1;
  if (scale.has_value()) {
    check_cuda(*scale, "scale");
    check_same_device(*scale, "scale", x);
    check_cuda(*zero, "zero");
    check_same_device(*zero, "zero", x);
    check_dtype(*scale, "scale", at::kFloat);
    check_dtype(*zero, "zero", at::kInt);
    check_contiguous(*scale, "scale");
    check_contiguous(*zero, "zero");
    TORCH_CHECK_VALUE(scale->dim() == 1 && zero->dim() == 1, "static scale and zero must be 1-D, got shapes ",
                      scale->sizes(), " and ", zero->sizes());
    T = scale->numel();
    TORCH_CHECK_VALUE(T > 0 && M % T == 0 && zero->numel() == T, "static scale/zero of length ", T, "/",
                      zero->numel(), " do not tile M=", M, " rows");
    static_scale = *scale;
    static_zero = *zero;
  }

  const auto opts = x.options();
  at::Tensor codes = at::empty(is_packed(bits) ? at::IntArrayRef{M, K / 2} : at::IntArrayRef{M, K},
                               opts.dtype(is_packed(bits) ? at::kByte : at::kChar));
  at::Tensor scale_out = at::empty({M}, opts.dtype(at::kFloat));
  at::Tensor zero_out = at::empty({M}, opts.dtype(at::kInt));
  at::Tensor rowsum = at::empty({M}, opts.dtype(at::kInt));
  at::Tensor idx = at::zeros({M, max_outliers}, opts.dtype(at::kInt));
  at::Tensor val = at::zeros({M, max_outliers}, opts.dtype(at::kFloat));
  at::Tensor count = at::empty({M}, opts.dtype(at::kInt));

  if (M == 0) {
    // no rows to flag anything: check the static parameters directly, as the reference does
    if (scale.has_value()) {
      TORCH_CHECK_VALUE(static_scale.gt(0).logical_and(static_scale.isfinite()).all().item<bool>(),
                        "static scales must be finite and > 0");
      const int64_t half = int64_t{1} << (bits - 1);
      TORCH_CHECK_VALUE(static_zero.ge(-half).logical_and(static_zero.le(half - 1)).all().item<bool>(),
                        "static zero points must lie in [", -half, ", ", half - 1, "]");
    }
    return {codes, scale_out, zero_out, rowsum, idx, val, count};
  }

  at::Tensor status = at::zeros({2}, opts.dtype(at::kLong));
  const bool has_threshold = outlier_threshold.has_value();
  const float threshold = has_threshold ? static_cast<float>(*outlier_threshold) : 0.f;
  auto launch = [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    auto kernel = bits == 3   ? per_token_quantize_kernel<scalar_t, 3>
                  : bits == 4 ? per_token_quantize_kernel<scalar_t, 4>
                              : per_token_quantize_kernel<scalar_t, 8>;
    kernel<<<static_cast<unsigned>(M), kQuantThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), K, scale.has_value() ? static_scale.data_ptr<float>() : nullptr,
        scale.has_value() ? static_zero.data_ptr<int32_t>() : nullptr, T, has_threshold, threshold, max_outliers,
        reinterpret_cast<uint8_t*>(codes.data_ptr()), scale_out.data_ptr<float>(), zero_out.data_ptr<int32_t>(),
        rowsum.data_ptr<int32_t>(), idx.data_ptr<int32_t>(), val.data_ptr<float>(), count.data_ptr<int32_t>(),
        reinterpret_cast<unsigned long long*>(status.data_ptr<int64_t>()));
  };
  if (x.scalar_type() == at::kFloat) {
    launch(float{});
  } else if (x.scalar_type() == at::kHalf) {
    launch(at::Half{});
  } else if (x.scalar_type() == at::kBFloat16) {
    launch(at::BFloat16{});
  } else {
    TORCH_CHECK_TYPE(x.scalar_type() == at::kDouble, "x must be float64, float32, float16 or bfloat16, got ",
                     x.scalar_type());
    launch(double{});  // rounded to fp32 on load, as the reference's x.float()
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // the one synchronisation: data-dependent errors, in the reference's order
  const at::Tensor host = status.cpu();
  const auto flags = static_cast<unsigned long long>(host.data_ptr<int64_t>()[0]);
  const auto worst = static_cast<unsigned long long>(host.data_ptr<int64_t>()[1]);
  TORCH_CHECK_VALUE(!(flags & kNonFinite), "x contains NaN or Inf; quantization is undefined for non-finite values");
  TORCH_CHECK_VALUE(!(flags & kBadScale), "static scales must be finite and > 0");
  TORCH_CHECK_VALUE(!(flags & kBadZero), "static zero points must lie in [", -(int64_t{1} << (bits - 1)), ", ",
                    (int64_t{1} << (bits - 1)) - 1, "]");
  if (worst != 0) {
    const int64_t worst_count = static_cast<int64_t>(worst >> 32);
    const int64_t worst_row = static_cast<int64_t>(0xffffffffull - (worst & 0xffffffffull));
    TORCH_CHECK_VALUE(false, "row ", worst_row, " has ", worst_count, " outliers but max_outliers=", max_outliers,
                      "; raise max_outliers (or the outlier threshold)");
  }
  return {codes, scale_out, zero_out, rowsum, idx, val, count};
}

}  // namespace vitq_cuda

TORCH_LIBRARY_FRAGMENT(vitq, m) {
  m.def("pack_int4_cuda(Tensor codes) -> Tensor");
  m.def("unpack_int4_cuda(Tensor packed) -> Tensor");
  m.def(
      "per_token_quantize_cuda(Tensor x, int bits, Tensor? scale, Tensor? zero, float? outlier_threshold, "
      "int max_outliers) -> (Tensor codes, Tensor scale, Tensor zero, Tensor rowsum, Tensor outlier_idx, "
      "Tensor outlier_val, Tensor outlier_count)");
}

TORCH_LIBRARY_IMPL(vitq, CUDA, m) {
  m.impl("pack_int4_cuda", &vitq_cuda::pack_int4_cuda);
  m.impl("unpack_int4_cuda", &vitq_cuda::unpack_int4_cuda);
  m.impl("per_token_quantize_cuda", &vitq_cuda::per_token_quantize_cuda);
}
