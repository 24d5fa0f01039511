// Helpers shared by the CUDA C++ kernels (csrc/cuda/*.cu): input checks that raise the
// same Python exception types as reference.py, warp/block reductions and int4 nibbles.
#pragma once

// Lean includes on purpose: nvcc parses this translation unit once per target arch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace vitq_cuda {

// ---------------------------------------------------------------------------
// host-side checks (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError)
// ---------------------------------------------------------------------------
inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor (the *_cuda ops run on the GPU), got one on ",
              t.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous() first), got strides ",
              t.strides());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the inputs are on ", ref.device());
}

// a per-row (or per-column) vector: CUDA, same device as ref, contiguous, dtype, length n
inline void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t n,
                         const at::Tensor& ref) {
  check_cuda(t, name);
  check_same_device(t, name, ref);
  check_dtype(t, name, dtype);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
  check_contiguous(t, name);
}

// uniform code widths (reference.ACT_BITS): 3-bit codes live in the int4 container
inline void check_bits(int64_t bits, const char* what) {
  TORCH_CHECK_VALUE(bits == 3 || bits == 4 || bits == 8, what, " must be one of (3, 4, 8), got ", bits);
}
inline bool is_packed(int64_t bits) { return bits == 3 || bits == 4; }

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// ---------------------------------------------------------------------------
// device helpers
// ---------------------------------------------------------------------------
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Block-wide reductions over kWarps warps; every thread gets the result.  `scratch` holds
// kWarps entries; the trailing barrier lets the caller reuse it straight away.
template <int kWarps>
__device__ __forceinline__ int block_sum(int v, int* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  int total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

template <int kWarps>
__device__ __forceinline__ void block_min_max(float& lo, float& hi, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  lo = warp_min(lo);
  hi = warp_max(hi);
  if (lane == 0) {
    scratch[warp] = lo;
    scratch[kWarps + warp] = hi;
  }
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    lo = fminf(lo, scratch[w]);
    hi = fmaxf(hi, scratch[kWarps + w]);
  }
  __syncthreads();
}

// Exclusive prefix sum over the block in thread order; `total` gets the block's sum.
// `scratch` holds kWarps ints.
template <int kWarps>
__device__ __forceinline__ int block_exclusive_scan(int v, int& total, int* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int inclusive = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int up = __shfl_up_sync(kFullMask, inclusive, o);
    if (lane >= o) inclusive += up;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += scratch[w];
    total += scratch[w];
  }
  __syncthreads();
  return before + inclusive - v;
}

// signed value of a 4-bit two's-complement nibble (0..15 -> -8..7)
__device__ __forceinline__ int sext4(uint32_t nibble) { return static_cast<int>(nibble ^ 8u) - 8; }

// two signed codes in [-8, 7] -> one byte, element 2j in the low nibble
__device__ __forceinline__ uint8_t pack_pair(int lo, int hi) {
  return static_cast<uint8_t>((static_cast<uint32_t>(lo) & 0xFu) | ((static_cast<uint32_t>(hi) & 0xFu) << 4));
}

}  // namespace vitq_cuda
