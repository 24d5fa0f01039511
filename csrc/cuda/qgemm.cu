// CUDA C++ kernel of vitq::qgemm_cuda: int8 tensor-core GEMM (WMMA s8 16x16x16, int32
// accumulation) with the zero-point corrections, per-token x per-channel scales, bias and
// the outlier term fused in the epilogue.  Semantics: vitq_kernels/reference.py (qgemm).
//
// Tiling: a 256-thread block computes a 128x128 tile of Y; 8 warps in a 2x4 grid each own
// 64x32 (4x2 WMMA fragments).  K advances 64 at a time through two shared-memory buffers:
// the next tile's global loads are issued into registers before the MMAs on the current
// one and stored to the other buffer afterwards (one barrier per K-step).  int4 codes are
// unpacked to int8 on that register -> shared path, since sm_90 has no s4 MMA.
//
// Shared layout: [k16][row][16] bytes, so every 16x16 WMMA fragment is one contiguous,
// 256-byte-aligned block (WMMA's alignment rule), for A (row-major) and for W read as a
// column-major K x N operand (w[n][k] is element (k, n)).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include "common.cuh"

namespace vitq_cuda {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 64;
constexpr int kGemmThreads = 256;
constexpr int kK16 = kBK / 16;                                 // 16-wide K slices per tile
constexpr int kChunksPerThread = kBM * kK16 / kGemmThreads;    // 16-code chunks each thread moves
constexpr int kWarpM = 64, kWarpN = 32;                        // warp tile
constexpr int kFragM = kWarpM / 16, kFragN = kWarpN / 16;
static_assert(kBM == kBN, "A and W tiles share the chunk mapping");
static_assert(kChunksPerThread * kGemmThreads == kBM * kK16, "chunks must divide evenly");
static_assert((kBM / kWarpM) * (kBN / kWarpN) * 32 == kGemmThreads, "warp grid must cover the tile");

struct alignas(128) GemmSmem {
  int8_t a[2][kK16][kBM][16];
  int8_t w[2][kK16][kBN][16];
};
// the epilogue reuses the operand buffers: one 16x16 int32 fragment per warp
static_assert(sizeof(GemmSmem) >= (kGemmThreads / 32) * 256 * sizeof(int32_t), "epilogue scratch too big");

// Chunk c (16 codes of one row) of a tile: 8 consecutive threads take 8 rows of the same
// K slice, so shared stores are conflict-free and a warp reads 64 contiguous bytes per row.
__device__ __forceinline__ void chunk_coords(int c, int& row, int& k16) {
  row = (c & 7) | ((c >> 5) << 3);
  k16 = (c >> 3) & (kK16 - 1);
}

// 8 packed bytes (16 int4 codes, low nibble first) -> 16 int8 codes
__device__ __forceinline__ uint4 unpack16(uint2 packed) {
  const uint32_t in[2] = {packed.x, packed.y};
  uint32_t out[4];
#pragma unroll
  for (int word = 0; word < 2; ++word) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      uint32_t r = 0;
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const uint32_t byte = (in[word] >> (8 * (2 * half + b))) & 0xFFu;
        const uint32_t lo = static_cast<uint32_t>(sext4(byte & 0xFu)) & 0xFFu;
        const uint32_t hi = static_cast<uint32_t>(sext4(byte >> 4)) & 0xFFu;
        r |= (lo << (16 * b)) | (hi << (16 * b + 8));
      }
      out[2 * word + half] = r;
    }
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// Loads 16 codes (k0 .. k0+15) of one row as int8, zero-filled past the row end or past K
// (zeros add nothing to the integer dot product; the corrections use the true K).
// `vec`: rows are 16-code aligned and K % 16 == 0, so whole-chunk vector loads are legal.
template <bool kPacked>
__device__ __forceinline__ uint4 load_chunk(const uint8_t* __restrict__ base, int64_t row, int64_t rows,
                                            int64_t k0, int64_t K, bool vec) {
  if (row >= rows || k0 >= K) return make_uint4(0, 0, 0, 0);
  if constexpr (kPacked) {
    const int64_t row_bytes = K / 2;
    const uint8_t* p = base + row * row_bytes + k0 / 2;
    uint2 v = make_uint2(0, 0);
    if (vec) {
      v = __ldg(reinterpret_cast<const uint2*>(p));
    } else {
      uint8_t bytes[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) bytes[i] = (k0 / 2 + i < row_bytes) ? p[i] : 0;
      v.x = bytes[0] | (bytes[1] << 8) | (bytes[2] << 16) | (static_cast<uint32_t>(bytes[3]) << 24);
      v.y = bytes[4] | (bytes[5] << 8) | (bytes[6] << 16) | (static_cast<uint32_t>(bytes[7]) << 24);
    }
    return unpack16(v);
  } else {
    const uint8_t* p = base + row * K + k0;
    if (vec) return __ldg(reinterpret_cast<const uint4*>(p));
    uint32_t words[4] = {0, 0, 0, 0};
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint32_t b = (k0 + i < K) ? p[i] : 0;
      words[i / 4] |= b << (8 * (i % 4));
    }
    return make_uint4(words[0], words[1], words[2], words[3]);
  }
}

// code of w[n, k] as an int (int8 or packed int4 storage)
template <bool kPacked>
__device__ __forceinline__ int weight_code(const uint8_t* __restrict__ w, int64_t n, int64_t k, int64_t K) {
  if constexpr (kPacked) {
    const uint32_t byte = __ldg(w + n * (K / 2) + k / 2);
    return sext4((k & 1) ? (byte >> 4) : (byte & 0xFu));
  } else {
    return static_cast<int8_t>(__ldg(w + n * K + k));
  }
}

__device__ __forceinline__ void store_out(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_out(at::Half* p, float v) {
  *reinterpret_cast<__half*>(p) = __float2half_rn(v);
}
__device__ __forceinline__ void store_out(at::BFloat16* p, float v) {
  *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(v);
}

struct EpilogueArgs {
  const float* a_scale;
  const int32_t* a_zero;
  const int32_t* a_rowsum;
  const float* w_scale;
  const int32_t* w_zero;     // nullptr: symmetric weights
  const int32_t* w_colsum;
  const float* bias;         // nullptr: none
  const int32_t* outlier_idx;  // nullptr: no outlier term
  const float* outlier_val;
  int64_t capacity;
};

template <bool kA4, bool kW4, typename out_t>
__global__ void __launch_bounds__(kGemmThreads) qgemm_kernel(const uint8_t* __restrict__ a,
                                                             const uint8_t* __restrict__ w, out_t* __restrict__ y,
                                                             int64_t M, int64_t N, int64_t K, bool vec_a,
                                                             bool vec_w, EpilogueArgs ep) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 720
  __trap();  // int8 WMMA needs sm_72+; setup.py builds for sm_80 and newer
#else
  using namespace nvcuda;
  __shared__ GemmSmem smem;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / (kBN / kWarpN), warp_n = warp % (kBN / kWarpN);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;

  wmma::fragment<wmma::accumulator, 16, 16, 16, int> acc[kFragM][kFragN];
#pragma unroll
  for (int i = 0; i < kFragM; ++i)
#pragma unroll
    for (int j = 0; j < kFragN; ++j) wmma::fill_fragment(acc[i][j], 0);

  uint4 a_regs[kChunksPerThread], w_regs[kChunksPerThread];
  auto load_tile = [&](int64_t kt) {
#pragma unroll
    for (int c = 0; c < kChunksPerThread; ++c) {
      int row, k16;
      chunk_coords(tid + c * kGemmThreads, row, k16);
      const int64_t k0 = kt * kBK + k16 * 16;
      a_regs[c] = load_chunk<kA4>(a, m0 + row, M, k0, K, vec_a);
      w_regs[c] = load_chunk<kW4>(w, n0 + row, N, k0, K, vec_w);
    }
  };
  auto store_tile = [&](int buf) {
#pragma unroll
    for (int c = 0; c < kChunksPerThread; ++c) {
      int row, k16;
      chunk_coords(tid + c * kGemmThreads, row, k16);
      *reinterpret_cast<uint4*>(&smem.a[buf][k16][row][0]) = a_regs[c];
      *reinterpret_cast<uint4*>(&smem.w[buf][k16][row][0]) = w_regs[c];
    }
  };

  const int64_t k_tiles = (K + kBK - 1) / kBK;
  if (k_tiles > 0) {
    load_tile(0);
    store_tile(0);
    __syncthreads();
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    const int buf = static_cast<int>(kt & 1);
    const bool has_next = kt + 1 < k_tiles;
    if (has_next) load_tile(kt + 1);  // in flight during the MMAs below
#pragma unroll
    for (int k16 = 0; k16 < kK16; ++k16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa[kFragM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> fb[kFragN];
#pragma unroll
      for (int i = 0; i < kFragM; ++i) {
        const int8_t* tile = &smem.a[buf][k16][warp_m * kWarpM + i * 16][0];
        wmma::load_matrix_sync(fa[i], reinterpret_cast<const signed char*>(tile), 16);
      }
#pragma unroll
      for (int j = 0; j < kFragN; ++j) {
        const int8_t* tile = &smem.w[buf][k16][warp_n * kWarpN + j * 16][0];
        wmma::load_matrix_sync(fb[j], reinterpret_cast<const signed char*>(tile), 16);
      }
#pragma unroll
      for (int i = 0; i < kFragM; ++i)
#pragma unroll
        for (int j = 0; j < kFragN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    // the other buffer was last read before the previous barrier, so it is free
    if (has_next) store_tile(buf ^ 1);
    __syncthreads();
  }

  // Epilogue, one fragment at a time through a per-warp 16x16 int32 scratch: lane L takes
  // row L/2 and 8 consecutive columns.  Every step is an fp32 op in the reference's order.
  int32_t* scratch = reinterpret_cast<int32_t*>(&smem) + warp * 256;
  const int r = lane >> 1, c_begin = (lane & 1) * 8;
  const uint32_t k32 = static_cast<uint32_t>(K);
#pragma unroll
  for (int i = 0; i < kFragM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragN; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t gi = m0 + warp_m * kWarpM + i * 16 + r;
      const int64_t gj0 = n0 + warp_n * kWarpN + j * 16 + c_begin;
      if (gi < M) {
        const float s_a = ep.a_scale[gi];
        const uint32_t za = static_cast<uint32_t>(ep.a_zero[gi]);
        const uint32_t ra = static_cast<uint32_t>(ep.a_rowsum[gi]);
        // outlier term o_ij = sum_c val_c * (w[j, idx_c] - zw_j), slots in order
        float o[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) o[e] = 0.f;
        if (ep.outlier_idx != nullptr) {
          for (int64_t c = 0; c < ep.capacity; ++c) {
            const int64_t k = ep.outlier_idx[gi * ep.capacity + c];
            const float v = ep.outlier_val[gi * ep.capacity + c];
            // val 0.0 (an unused slot) adds exactly +-0, which leaves o unchanged: skip the
            // gathers.  An index outside [0, K) is a caller bug (per_token_quantize never
            // makes one); such a slot adds nothing rather than reading out of bounds.
            if (v == 0.f || k < 0 || k >= K) continue;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              if (gj0 + e < N) {
                // zero points are re-read (L1 hits) rather than held: registers are tight here
                const int zw = ep.w_zero != nullptr ? ep.w_zero[gj0 + e] : 0;
                const float wz = static_cast<float>(weight_code<kW4>(w, gj0 + e, k, K) - zw);
                o[e] = __fadd_rn(o[e], __fmul_rn(v, wz));
              }
            }
          }
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int64_t gj = gj0 + e;
          if (gj >= N) break;
          const uint32_t zwu = ep.w_zero != nullptr ? static_cast<uint32_t>(ep.w_zero[gj]) : 0u;
          const uint32_t rw = static_cast<uint32_t>(ep.w_colsum[gj]);
          // wrap-around int32 arithmetic equals the reference's int64 result cast to int32
          const uint32_t acc_u = static_cast<uint32_t>(scratch[r * 16 + c_begin + e]) - za * rw - zwu * ra +
                                 k32 * za * zwu;
          float v = __fmul_rn(s_a, __int2float_rn(static_cast<int32_t>(acc_u)));
          if (ep.outlier_idx != nullptr) v = __fadd_rn(v, o[e]);
          v = __fmul_rn(ep.w_scale[gj], v);
          if (ep.bias != nullptr) v = __fadd_rn(v, ep.bias[gj]);
          store_out(y + gi * N + gj, v);
        }
      }
      __syncwarp();  // the next store_matrix_sync reuses the scratch
    }
  }
#endif
}

template <bool kA4, bool kW4>
void launch_qgemm(const at::Tensor& a, const at::Tensor& w, at::Tensor& y, int64_t K, const EpilogueArgs& ep) {
  const int64_t M = y.size(0), N = y.size(1);
  const auto* a_ptr = reinterpret_cast<const uint8_t*>(a.data_ptr());
  const auto* w_ptr = reinterpret_cast<const uint8_t*>(w.data_ptr());
  // whole-chunk vector loads need every row start aligned to the chunk size
  const int64_t align_a = kA4 ? 8 : 16, align_w = kW4 ? 8 : 16;
  const bool vec_a = K % 16 == 0 && reinterpret_cast<uintptr_t>(a_ptr) % align_a == 0;
  const bool vec_w = K % 16 == 0 && reinterpret_cast<uintptr_t>(w_ptr) % align_w == 0;
  const dim3 grid(ceil_div(N, kBN), ceil_div(M, kBM));
  TORCH_CHECK(grid.y <= 65535, "qgemm_cuda: M=", M, " is too large for one launch (at most ",
              int64_t{65535} * kBM, " rows)");
  auto stream = c10::cuda::getCurrentCUDAStream();
  switch (y.scalar_type()) {
    case at::kFloat:
      qgemm_kernel<kA4, kW4, float><<<grid, kGemmThreads, 0, stream>>>(a_ptr, w_ptr, y.data_ptr<float>(), M, N, K,
                                                                        vec_a, vec_w, ep);
      break;
    case at::kHalf:
      qgemm_kernel<kA4, kW4, at::Half><<<grid, kGemmThreads, 0, stream>>>(a_ptr, w_ptr, y.data_ptr<at::Half>(), M,
                                                                           N, K, vec_a, vec_w, ep);
      break;
    default:
      qgemm_kernel<kA4, kW4, at::BFloat16><<<grid, kGemmThreads, 0, stream>>>(
          a_ptr, w_ptr, y.data_ptr<at::BFloat16>(), M, N, K, vec_a, vec_w, ep);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor qgemm_cuda(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& a_zero,
                      const at::Tensor& a_rowsum, const at::Tensor& w, const at::Tensor& w_scale,
                      const std::optional<at::Tensor>& w_zero, const at::Tensor& w_colsum,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& outlier_idx,
                      const std::optional<at::Tensor>& outlier_val, int64_t a_bits, int64_t w_bits,
                      at::ScalarType out_dtype) {
  check_bits(a_bits, "a_bits");
  check_bits(w_bits, "w_bits");
  TORCH_CHECK_VALUE(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
                    "out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  check_cuda(a, "a");
  check_cuda(w, "w");
  check_same_device(w, "w", a);
  // 3-bit codes live in the int4 container and run the int4 kernels (no 3-bit GEMM)
  const bool a_packed = is_packed(a_bits), w_packed = is_packed(w_bits);
  TORCH_CHECK_TYPE(a.scalar_type() == (a_packed ? at::kByte : at::kChar), "a must hold ",
                   a_packed ? "packed uint8" : "int8", " codes for a_bits=", a_bits, ", got ", a.scalar_type());
  TORCH_CHECK_TYPE(w.scalar_type() == (w_packed ? at::kByte : at::kChar), "w must hold ",
                   w_packed ? "packed uint8" : "int8", " codes for w_bits=", w_bits, ", got ", w.scalar_type());
  TORCH_CHECK_VALUE(a.dim() == 2, "a must be 2-D [M, K], got shape ", a.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2, "w must be 2-D [N, K], got shape ", w.sizes());
  check_contiguous(a, "a");
  check_contiguous(w, "w");
  const int64_t M = a.size(0), N = w.size(0);
  const int64_t K = a_packed ? 2 * a.size(1) : a.size(1);
  const int64_t Kw = w_packed ? 2 * w.size(1) : w.size(1);
  TORCH_CHECK_VALUE(K == Kw, "K mismatch: activations have ", K, ", weights ", Kw);
  TORCH_CHECK_VALUE(K < (int64_t{1} << 31), "K=", K, " does not fit int32 accumulation");
  check_vector(a_scale, "a_scale", at::kFloat, M, a);
  check_vector(a_zero, "a_zero", at::kInt, M, a);
  check_vector(a_rowsum, "a_rowsum", at::kInt, M, a);
  check_vector(w_scale, "w_scale", at::kFloat, N, a);
  check_vector(w_colsum, "w_colsum", at::kInt, N, a);
  if (w_zero.has_value()) check_vector(*w_zero, "w_zero", at::kInt, N, a);
  at::Tensor bias_f;
  if (bias.has_value()) {
    check_cuda(*bias, "bias");
    check_same_device(*bias, "bias", a);
    TORCH_CHECK_TYPE(bias->is_floating_point(), "bias must be a float tensor, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape [", N, "], got ",
                      bias->sizes());
    check_contiguous(*bias, "bias");
    bias_f = bias->to(at::kFloat);  // the reference adds bias.float()
  }
  TORCH_CHECK_VALUE(outlier_idx.has_value() == outlier_val.has_value(),
                    "outlier_idx and outlier_val must be given together");
  int64_t capacity = 0;
  if (outlier_idx.has_value()) {
    auto check_list = [&](const at::Tensor& t, const char* name, at::ScalarType dtype) {
      check_cuda(t, name);
      check_same_device(t, name, a);
      check_dtype(t, name, dtype);
      TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == M, name, " must have shape [M=", M, ", C], got ", t.sizes());
      check_contiguous(t, name);
    };
    check_list(*outlier_idx, "outlier_idx", at::kInt);
    check_list(*outlier_val, "outlier_val", at::kFloat);
    TORCH_CHECK_VALUE(outlier_idx->size(1) == outlier_val->size(1), "outlier_idx has ", outlier_idx->size(1),
                      " slots per row but outlier_val has ", outlier_val->size(1));
    capacity = outlier_idx->size(1);
  }

  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor y = at::empty({M, N}, a.options().dtype(out_dtype));
  if (M == 0 || N == 0) return y;

  EpilogueArgs ep{};
  ep.a_scale = a_scale.data_ptr<float>();
  ep.a_zero = a_zero.data_ptr<int32_t>();
  ep.a_rowsum = a_rowsum.data_ptr<int32_t>();
  ep.w_scale = w_scale.data_ptr<float>();
  ep.w_zero = w_zero.has_value() ? w_zero->data_ptr<int32_t>() : nullptr;
  ep.w_colsum = w_colsum.data_ptr<int32_t>();
  ep.bias = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  // as in the reference, an empty outlier list (C == 0) adds no term at all
  ep.outlier_idx = capacity > 0 ? outlier_idx->data_ptr<int32_t>() : nullptr;
  ep.outlier_val = capacity > 0 ? outlier_val->data_ptr<float>() : nullptr;
  ep.capacity = capacity;

  if (!a_packed && !w_packed) {
    launch_qgemm<false, false>(a, w, y, K, ep);
  } else if (!a_packed) {
    launch_qgemm<false, true>(a, w, y, K, ep);
  } else if (!w_packed) {
    launch_qgemm<true, false>(a, w, y, K, ep);
  } else {
    launch_qgemm<true, true>(a, w, y, K, ep);
  }
  return y;
}

}  // namespace vitq_cuda

TORCH_LIBRARY_FRAGMENT(vitq, m) {
  m.def(
      "qgemm_cuda(Tensor a, Tensor a_scale, Tensor a_zero, Tensor a_rowsum, Tensor w, Tensor w_scale, "
      "Tensor? w_zero, Tensor w_colsum, Tensor? bias, Tensor? outlier_idx, Tensor? outlier_val, "
      "int a_bits, int w_bits, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(vitq, CUDA, m) { m.impl("qgemm_cuda", &vitq_cuda::qgemm_cuda); }
