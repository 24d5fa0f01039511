// CPU kernel of vitq::qgemm (reference.qgemm): exact integer GEMM of activation and
// weight codes (int8 or packed int4, widened once per call to int16, which the compiler
// turns into pmaddwd dot products), zero-point corrections from the
// row/column sums, the outlier term in fp32 in slot order, and the per-token x
// per-channel fp32 epilogue.
//
// Exactness: K <= 32768 (as in the reference), so the dot products (|a w| <= 2^14) and the
// corrected accumulator (|acc| <= K 255^2) fit in int32; the corrections are formed in
// int64.  The epilogue performs the reference's fp32 operations in its order; the
// baseline and AVX2 builds have no FMA, so no contraction happens either.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cpu/common.h"

namespace vitq::cpu {
namespace {

constexpr const char* kOp = "qgemm";
constexpr int64_t kTileM = 64, kTileN = 64;
constexpr int64_t kMaxK = 32768;
constexpr int kBlockM = 4, kBlockN = 4;

struct GemmArgs {
  const int16_t* a;   // [M, K] activation codes
  const int16_t* w;   // [N, K] weight codes
  const int16_t* wt;  // [K, N] transposed weight codes, only when C > 0
  int64_t M, N, K, C;
  const float* a_scale;
  const int32_t* a_zero;
  const int32_t* a_rowsum;
  const float* w_scale;
  const int32_t* w_zero;  // nullptr: symmetric weights
  const int32_t* w_colsum;
  const float* bias;  // nullptr: none
  const int32_t* o_idx;  // [M, C]
  const float* o_val;    // [M, C]
  void* out;
  at::ScalarType out_dtype;
};

inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}

// acc[r][c] = sum_k a[r][k] w[c][k] for an RM x RN block.
template <int RM, int RN>
inline void dot_block(const int16_t* __restrict a, const int16_t* __restrict w, int64_t K,
                      int32_t* __restrict acc, int64_t ld_acc) {
  int32_t sum[RM][RN] = {};
  for (int64_t k = 0; k < K; ++k) {
#pragma GCC unroll 4
    for (int r = 0; r < RM; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < RN; ++c) sum[r][c] += int32_t(a[r * K + k]) * int32_t(w[c * K + k]);
  }
  for (int r = 0; r < RM; ++r)
    for (int c = 0; c < RN; ++c) acc[r * ld_acc + c] = sum[r][c];
}

template <typename T>
inline void store_row(const float* y, int64_t n, void* out, int64_t offset) {
  T* dst = static_cast<T*>(out) + offset;
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(y[j]);
}

// y_ij = sw_j (s_i float(acc_ij) + o_ij) + bias_j for row i, columns j0 .. j0+nb-1.
inline void epilogue_row(const GemmArgs& g, int64_t i, int64_t j0, int64_t nb, const int32_t* acc, float* y,
                         float* o) {
  const float s = g.a_scale[i];
  const int64_t za = g.a_zero[i], ra = g.a_rowsum[i];
  for (int64_t jj = 0; jj < nb; ++jj) {
    const int64_t j = j0 + jj;
    int64_t corr = -za * g.w_colsum[j];
    if (g.w_zero) corr += -int64_t(g.w_zero[j]) * ra + g.K * za * g.w_zero[j];
    const int32_t exact = static_cast<int32_t>(acc[jj] + corr);
    y[jj] = s * static_cast<float>(exact);
  }
  if (g.C > 0) {
    // the slots' columns are scattered rows of wt: request them all before summing in order
    for (int64_t c = 0; c < g.C; ++c) {
      if (g.o_val[i * g.C + c] == 0.f) continue;
      const int16_t* col = g.wt + int64_t(g.o_idx[i * g.C + c]) * g.N + j0;
      for (int64_t jj = 0; jj < nb; jj += 32) prefetch(col + jj);
    }
    std::fill(o, o + nb, 0.f);
    for (int64_t c = 0; c < g.C; ++c) {  // slot order, as the reference sums
      const float v = g.o_val[i * g.C + c];
      // o starts at +0 and a sum of fp32 values is -0 only if both are, so o never becomes
      // -0: adding v * w' = +-0 leaves it bit-identical, and padded slots can be skipped
      if (v == 0.f) continue;
      const int16_t* col = g.wt + int64_t(g.o_idx[i * g.C + c]) * g.N + j0;
      if (g.w_zero) {
        for (int64_t jj = 0; jj < nb; ++jj) o[jj] = o[jj] + v * float(int32_t(col[jj]) - g.w_zero[j0 + jj]);
      } else {
        for (int64_t jj = 0; jj < nb; ++jj) o[jj] = o[jj] + v * float(col[jj]);
      }
    }
    for (int64_t jj = 0; jj < nb; ++jj) y[jj] = y[jj] + o[jj];
  }
  for (int64_t jj = 0; jj < nb; ++jj) y[jj] = g.w_scale[j0 + jj] * y[jj];
  if (g.bias)
    for (int64_t jj = 0; jj < nb; ++jj) y[jj] = y[jj] + g.bias[j0 + jj];
  const int64_t offset = i * g.N + j0;
  switch (g.out_dtype) {
    case at::kFloat: store_row<float>(y, nb, g.out, offset); break;
    case at::kHalf: store_row<c10::Half>(y, nb, g.out, offset); break;
    default: store_row<c10::BFloat16>(y, nb, g.out, offset); break;
  }
}

// Tiles t0 .. t1-1 of the kTileM x kTileN grid (row-major over tiles).
VITQ_CPU_CLONES void qgemm_tiles(const GemmArgs& g, int64_t t0, int64_t t1) {
  const int64_t tiles_n = at::divup(g.N, kTileN);
  int32_t acc[kTileM * kTileN];
  float y[kTileN], o[kTileN];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t i0 = (t / tiles_n) * kTileM, j0 = (t % tiles_n) * kTileN;
    const int64_t mb = std::min(kTileM, g.M - i0), nb = std::min(kTileN, g.N - j0);
    const int16_t* a = g.a + i0 * g.K;
    const int16_t* w = g.w + j0 * g.K;
    int64_t r = 0;
    for (; r + kBlockM <= mb; r += kBlockM) {
      int64_t c = 0;
      for (; c + kBlockN <= nb; c += kBlockN)
        dot_block<kBlockM, kBlockN>(a + r * g.K, w + c * g.K, g.K, acc + r * kTileN + c, kTileN);
      for (; c < nb; ++c) dot_block<kBlockM, 1>(a + r * g.K, w + c * g.K, g.K, acc + r * kTileN + c, kTileN);
    }
    for (; r < mb; ++r) {
      int64_t c = 0;
      for (; c + kBlockN <= nb; c += kBlockN)
        dot_block<1, kBlockN>(a + r * g.K, w + c * g.K, g.K, acc + r * kTileN + c, kTileN);
      for (; c < nb; ++c) dot_block<1, 1>(a + r * g.K, w + c * g.K, g.K, acc + r * kTileN + c, kTileN);
    }
    for (int64_t r = 0; r < mb; ++r) epilogue_row(g, i0 + r, j0, nb, acc + r * kTileN, y, o);
  }
}

// int16 copy of a code matrix [rows, K] (int8, or packed 3/4-bit codes with K/2 bytes per row).
const int16_t* widen_codes(const at::Tensor& t, int64_t bits, int64_t K, std::vector<int16_t>& buffer) {
  const int64_t rows = t.size(0);
  buffer.resize(static_cast<size_t>(rows * K));
  int16_t* dst = buffer.data();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  if (bits == 8) {
    const int8_t* src = t.data_ptr<int8_t>();
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t e = r0 * K; e < r1 * K; ++e) dst[e] = src[e];
    });
  } else {
    const uint8_t* src = t.data_ptr<uint8_t>();
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t b = r0 * K / 2; b < r1 * K / 2; ++b) {
        dst[2 * b] = low_nibble(src[b]);
        dst[2 * b + 1] = high_nibble(src[b]);
      }
    });
  }
  return dst;
}

// wt[k][j] = w[j][k], in 64 x 64 blocks for cache locality.
void transpose_codes(const int16_t* w, int64_t N, int64_t K, std::vector<int16_t>& wt) {
  wt.resize(static_cast<size_t>(N * K));
  constexpr int64_t B = 64;
  at::parallel_for(0, at::divup(K, B), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t k0 = b0 * B; k0 < std::min(K, b1 * B); k0 += B)
      for (int64_t j0 = 0; j0 < N; j0 += B)
        for (int64_t k = k0; k < std::min(K, k0 + B); ++k)
          for (int64_t j = j0; j < std::min(N, j0 + B); ++j) wt[k * N + j] = w[j * K + k];
  });
}

void check_codes(const at::Tensor& t, int64_t bits, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == (is_packed(bits) ? at::kByte : at::kChar), kOp, ": ", name, " must be ",
                   is_packed(bits) ? "uint8 (two int4 codes per byte" : "int8 (one code per byte", ", ", name,
                   "_bits=", bits, "), got ", dtype_name(t.scalar_type()));
  check_cpu_contiguous(t, kOp, name);
  TORCH_CHECK_VALUE(t.dim() == 2, kOp, ": ", name, " must be 2-D, got shape ", t.sizes());
}

at::Tensor qgemm_cpu(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& a_zero,
                     const at::Tensor& a_rowsum, const at::Tensor& w, const at::Tensor& w_scale,
                     const std::optional<at::Tensor>& w_zero, const at::Tensor& w_colsum,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& outlier_idx,
                     const std::optional<at::Tensor>& outlier_val, int64_t a_bits, int64_t w_bits,
                     at::ScalarType out_dtype) {
  check_bits(a_bits, kOp, "a_bits");
  check_bits(w_bits, kOp, "w_bits");
  check_codes(a, a_bits, "a");
  check_codes(w, w_bits, "w");
  const int64_t M = a.size(0), N = w.size(0);
  const int64_t K = a.size(1) * (is_packed(a_bits) ? 2 : 1);
  const int64_t Kw = w.size(1) * (is_packed(w_bits) ? 2 : 1);
  TORCH_CHECK_VALUE(K == Kw, kOp, ": K mismatch: activations have ", K, ", weights ", Kw,
                    " (a 3/4-bit tensor holds K/2 bytes per row)");
  TORCH_CHECK_VALUE(K <= kMaxK, kOp, ": K=", K, " > ", kMaxK, ": the int32 accumulator could overflow");
  check_tensor(a_scale, at::kFloat, {M}, kOp, "a_scale");
  check_tensor(a_zero, at::kInt, {M}, kOp, "a_zero");
  check_tensor(a_rowsum, at::kInt, {M}, kOp, "a_rowsum");
  check_tensor(w_scale, at::kFloat, {N}, kOp, "w_scale");
  if (w_zero.has_value()) check_tensor(*w_zero, at::kInt, {N}, kOp, "w_zero");
  check_tensor(w_colsum, at::kInt, {N}, kOp, "w_colsum");
  at::Tensor bias_f32;
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->is_floating_point(), kOp, ": bias must be a float tensor, got ",
                     dtype_name(bias->scalar_type()));
    check_tensor(*bias, bias->scalar_type(), {N}, kOp, "bias");
    bias_f32 = bias->to(at::kFloat);
  }
  TORCH_CHECK_VALUE(outlier_idx.has_value() == outlier_val.has_value(), kOp,
                    ": outlier_idx and outlier_val must be given together");
  int64_t C = 0;
  if (outlier_idx.has_value()) {
    check_dtype(*outlier_idx, at::kInt, kOp, "outlier_idx");
    check_cpu_contiguous(*outlier_idx, kOp, "outlier_idx");
    TORCH_CHECK_VALUE(outlier_idx->dim() == 2 && outlier_idx->size(0) == M, kOp, ": outlier_idx must have shape [M=",
                      M, ", C], got ", outlier_idx->sizes());
    C = outlier_idx->size(1);
    check_tensor(*outlier_val, at::kFloat, outlier_idx->sizes(), kOp, "outlier_val");
    const int32_t* p = outlier_idx->data_ptr<int32_t>();
    for (int64_t e = 0; e < M * C; ++e)
      TORCH_CHECK_VALUE(p[e] >= 0 && p[e] < K, kOp, ": outlier_idx must lie in [0, K=", K, "); outlier_idx[",
                        e / C, ", ", e % C, "] = ", p[e]);
  }
  TORCH_CHECK_VALUE(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, kOp,
                    ": out_dtype must be float32, float16 or bfloat16, got ", dtype_name(out_dtype));

  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;

  std::vector<int16_t> a_buf, w_buf, wt_buf;
  GemmArgs g{};
  g.a = widen_codes(a, a_bits, K, a_buf);
  g.w = widen_codes(w, w_bits, K, w_buf);
  g.M = M;
  g.N = N;
  g.K = K;
  g.C = C;
  if (C > 0) {
    transpose_codes(g.w, N, K, wt_buf);
    g.wt = wt_buf.data();
    g.o_idx = outlier_idx->data_ptr<int32_t>();
    g.o_val = outlier_val->data_ptr<float>();
  }
  g.a_scale = a_scale.data_ptr<float>();
  g.a_zero = a_zero.data_ptr<int32_t>();
  g.a_rowsum = a_rowsum.data_ptr<int32_t>();
  g.w_scale = w_scale.data_ptr<float>();
  g.w_zero = w_zero.has_value() ? w_zero->data_ptr<int32_t>() : nullptr;
  g.w_colsum = w_colsum.data_ptr<int32_t>();
  g.bias = bias.has_value() ? bias_f32.data_ptr<float>() : nullptr;
  g.out = out.data_ptr();
  g.out_dtype = out_dtype;

  const int64_t tiles = at::divup(M, kTileM) * at::divup(N, kTileN);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) { qgemm_tiles(g, t0, t1); });
  return out;
}

}  // namespace
}  // namespace vitq::cpu

TORCH_LIBRARY_IMPL(vitq, CPU, m) { m.impl("qgemm", &vitq::cpu::qgemm_cpu); }
