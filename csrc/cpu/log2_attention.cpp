// CPU kernel of vitq::log2_attention (reference.log2_attention): exact int32 logits,
// fp32 softmax with the 40-bit fixed-point row sum, log2 codes of P read from its fp32
// bits, and P^ V as power-of-two planes accumulated in double (exact for the code ranges
// the reference calls exact; see the reference section for why).  One row i of one
// (batch, head) is one work item.  Codes above p_max_code (TP-ViT's truncated uniform-log2,
// reference.tul2_quantize; default 2^p_bits - 2) contribute nothing.
//
// The float steps are separate IEEE operations in the reference's order; contraction
// into FMAs would change t = alpha * acc + bias and o = X0 + mu_1 X1 (+ ...) in the last bit.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu/common.h"

// after the includes, so that only this file's functions are affected
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace vitq::cpu {
namespace {

constexpr const char* kOp = "log2_attention";
constexpr int64_t kMaxHeadDim = 256;
constexpr float kFixedScale = 1099511627776.0f;       // 2^40: fixed point of the row sum
constexpr float kFixedInv = 9.094947017729282e-13f;  // 2^-40
// reference.LOG_MANTISSAS[m][r] = fp32(2^(-r / 2^m)), r = 1..2^m - 1 (r = 0 is 1)
constexpr float kMu1[1] = {0.70710677f};
constexpr float kMu2[3] = {0.840896428f, 0.707106769f, 0.594603539f};

// reference.LOG_MANTISSA_THRESHOLDS, derived the same way: the 23-bit mantissa of the
// smallest fp32 >= 2^((2r+1) / 2^(m+1)) (an irrational number, so never a tie).
int32_t mantissa_threshold(int r, int m) {
  const double t = std::pow(2.0, (2.0 * r + 1.0) / static_cast<double>(1 << (m + 1)));
  float f = static_cast<float>(t);
  if (static_cast<double>(f) < t) f = std::nextafter(f, 2.0f);
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return static_cast<int32_t>(bits & 0x7FFFFF);
}
const int32_t kThrM0 = mantissa_threshold(0, 0);                                   // sqrt(2)
const int32_t kThrM1[2] = {mantissa_threshold(0, 1), mantissa_threshold(1, 1)};   // 2^(1/4), 2^(3/4)
const int32_t kThrM2[4] = {mantissa_threshold(0, 2), mantissa_threshold(1, 2), mantissa_threshold(2, 2),
                           mantissa_threshold(3, 2)};                              // 2^((2r+1)/8)

struct Quant {  // per-tensor or per-head scale and zero point
  const float* scale;
  const int32_t* zero;
  bool per_head;
  float s(int64_t h) const { return scale[per_head ? h : 0]; }
  int32_t z(int64_t h) const { return zero[per_head ? h : 0]; }
};

Quant check_quant(const at::Tensor& s, const at::Tensor& z, int64_t H, const char* what) {
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, kOp, ": ", what, "_scale must be float32, got ", s.scalar_type());
  TORCH_CHECK_TYPE(z.scalar_type() == at::kInt, kOp, ": ", what, "_zero must be int32, got ", z.scalar_type());
  TORCH_CHECK_VALUE(s.dim() == 1 && (s.size(0) == 1 || s.size(0) == H) && z.sizes() == s.sizes(), kOp, ": ",
                    what, "_scale/", what, "_zero must both have shape [1] (per tensor) or [", H,
                    "] (per head), got ", s.sizes(), " and ", z.sizes());
  TORCH_CHECK_VALUE(s.device().is_cpu() && z.device().is_cpu() && s.is_contiguous() && z.is_contiguous(), kOp,
                    ": ", what, "_scale/", what, "_zero must be contiguous CPU tensors");
  Quant p{s.data_ptr<float>(), z.data_ptr<int32_t>(), s.size(0) != 1 || H == 1};
  for (int64_t h = 0; h < s.size(0); ++h) {
    TORCH_CHECK_VALUE(std::isfinite(p.scale[h]) && p.scale[h] > 0.f, kOp, ": ", what,
                      "_scale must be finite and > 0, got ", p.scale[h]);
    TORCH_CHECK_VALUE(p.zero[h] >= -128 && p.zero[h] <= 127, kOp, ": ", what, "_zero must lie in [-128, 127], got ",
                      p.zero[h]);
  }
  return p;
}

// round(-2^m log2 p) from the fp32 bits of p (0 <= p <= 1), clamped below at 0; codes
// above max_code (the truncation code, 2^b - 2 without truncation) become zero_code, as do
// p == 0 and subnormal p (reference.tul2_quantize).
inline int32_t log2_code(float p, int64_t substeps, int32_t max_code, int32_t zero_code) {
  uint32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  const int32_t ex = static_cast<int32_t>((bits >> 23) & 0xFF);
  const int32_t mant = static_cast<int32_t>(bits & 0x7FFFFF);
  if (ex == 0) return zero_code;
  int32_t c;
  if (substeps == 0) {
    c = (127 - ex) - (mant >= kThrM0);
  } else if (substeps == 1) {
    c = ((127 - ex) << 1) - (mant >= kThrM1[0]) - (mant >= kThrM1[1]);
  } else {
    c = ((127 - ex) << 2) - (mant >= kThrM2[0]) - (mant >= kThrM2[1]) - (mant >= kThrM2[2]) - (mant >= kThrM2[3]);
  }
  c = c < 0 ? 0 : c;
  return c > max_code ? zero_code : c;
}

inline double pow2_neg(int32_t e) { return std::ldexp(1.0, -e); }

// sum_d qz_d (k_d - zk), exact in int32 (|.| <= 255^2 * 256 < 2^31)
VITQ_CPU_CLONES int32_t dot_codes(const int32_t* qz, const int8_t* k, int32_t zk, int64_t D) {
  int32_t acc = 0;
  for (int64_t d = 0; d < D; ++d) acc += qz[d] * (static_cast<int32_t>(k[d]) - zk);
  return acc;
}

// x_d += w (v_d - zv); w is a power of two, so every product is exact
VITQ_CPU_CLONES void add_scaled_codes(double* x, double w, const int8_t* v, int32_t zv, int64_t D) {
  for (int64_t d = 0; d < D; ++d) x[d] += w * static_cast<double>(static_cast<int32_t>(v[d]) - zv);
}

template <typename Out>
void store_float(Out* dst, const float* y, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<Out>(y[d]);
}

at::Tensor log2_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& q_scale, const at::Tensor& q_zero, const at::Tensor& k_scale,
                              const at::Tensor& k_zero, const at::Tensor& v_scale, const at::Tensor& v_zero,
                              double sm_scale, const std::optional<at::Tensor>& bias, int64_t p_bits,
                              int64_t substeps, const std::optional<at::Tensor>& out_scale,
                              const std::optional<at::Tensor>& out_zero, int64_t out_bits,
                              at::ScalarType out_dtype, std::optional<int64_t> p_max_code) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kChar, kOp, ": q, k, v must be int8 codes, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 4, kOp, ": q, k, v must be [B, H, N, D], got shape ", t->sizes());
    TORCH_CHECK_VALUE(t->device().is_cpu(), kOp, ": q, k, v must be CPU tensors, got ", t->device());
  }
  TORCH_CHECK_VALUE(k.sizes() == q.sizes() && v.sizes() == q.sizes(), kOp, ": q, k, v shapes differ: ", q.sizes(),
                    ", ", k.sizes(), ", ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(D >= 1 && D <= kMaxHeadDim, kOp, ": head dim D=", D, " must be in [1, ", kMaxHeadDim, "]");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK_VALUE(t->numel() == 0 || t->stride(3) == 1, kOp,
                      ": q, k, v must have a contiguous last dimension (stride 1), got strides ", t->strides());
  const Quant qq = check_quant(q_scale, q_zero, H, "q");
  const Quant kq = check_quant(k_scale, k_zero, H, "k");
  const Quant vq = check_quant(v_scale, v_zero, H, "v");
  const float sm = static_cast<float>(sm_scale);
  TORCH_CHECK_VALUE(std::isfinite(sm_scale) && std::isfinite(sm), kOp, ": sm_scale must be finite in fp32, got ",
                    sm_scale);
  TORCH_CHECK_VALUE(p_bits >= 1 && p_bits <= 8, kOp, ": p_bits must be in 1..8, got ", p_bits);
  TORCH_CHECK_VALUE(substeps >= 0 && substeps <= 2, kOp, ": substeps must be one of (0, 1, 2), got ", substeps);
  const int64_t zero_code = (int64_t{1} << p_bits) - 1;
  TORCH_CHECK_VALUE(!p_max_code.has_value() || (*p_max_code >= 0 && *p_max_code <= zero_code - 1), kOp,
                    ": p_max_code must be None or an int in [0, ", zero_code - 1, "] for p_bits=", p_bits,
                    " (code ", zero_code, " is the zero code), got ", p_max_code.value_or(0));

  const float* bias_p = nullptr;
  int64_t bias_b = 1, bias_h = 1;
  if (bias.has_value()) {
    const at::Tensor& bt = *bias;
    TORCH_CHECK_TYPE(bt.scalar_type() == at::kFloat, kOp, ": bias must be float32, got ", bt.scalar_type());
    TORCH_CHECK_VALUE(bt.dim() == 4 && bt.size(2) == N && bt.size(3) == N && (bt.size(1) == 1 || bt.size(1) == H) &&
                          bt.size(0) > 0 && B % bt.size(0) == 0,
                      kOp, ": bias must be [Bb, 1 or ", H, ", ", N, ", ", N, "] with B=", B,
                      " a multiple of Bb, got ", bt.sizes());
    TORCH_CHECK_VALUE(bt.device().is_cpu(), kOp, ": bias must be a CPU tensor, got ", bt.device());
    TORCH_CHECK_VALUE(bt.is_contiguous(), kOp,
                      ": bias must be contiguous (call .contiguous(); broadcast over batch or heads with a "
                      "size-1 dimension instead of expand)");
    TORCH_CHECK_VALUE(at::isfinite(bt).all().item<bool>(), kOp,
                      ": bias contains NaN or Inf (use a large finite negative value, e.g. -100 as Swin does, to mask)");
    bias_p = bt.data_ptr<float>();
    bias_b = bt.size(0);
    bias_h = bt.size(1);
  }

  TORCH_CHECK_VALUE(out_scale.has_value() == out_zero.has_value(), kOp,
                    ": out_scale and out_zero must be given together");
  const bool quantize_out = out_scale.has_value();
  float so = 1.f;
  int32_t zo = 0;
  at::Tensor out;
  if (quantize_out) {
    check_bits(out_bits, kOp, "out_bits");
    check_tensor(*out_scale, at::kFloat, {1}, kOp, "out_scale");
    check_tensor(*out_zero, at::kInt, {1}, kOp, "out_zero");
    so = out_scale->data_ptr<float>()[0];
    zo = out_zero->data_ptr<int32_t>()[0];
    const int32_t half = 1 << (out_bits - 1);
    TORCH_CHECK_VALUE(std::isfinite(so) && so > 0.f, kOp, ": out_scale must be finite and > 0, got ", so);
    TORCH_CHECK_VALUE(zo >= -half && zo <= half - 1, kOp, ": out_zero must lie in [", -half, ", ", half - 1,
                      "], got ", zo);
    TORCH_CHECK_VALUE(out_bits == 8 || D % 2 == 0, kOp,
                      ": 4-bit output codes are packed in pairs along D; D=", D, " is odd");
    out = out_bits == 8 ? at::empty({B, N, H, D}, q.options().dtype(at::kChar))
                        : at::empty({B, N, H, D / 2}, q.options().dtype(at::kByte));
  } else {
    TORCH_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, kOp,
                     ": out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
    out = at::empty({B, N, H, D}, q.options().dtype(out_dtype));
  }
  if (out.numel() == 0) return out;

  const int8_t* qp = q.data_ptr<int8_t>();
  const int8_t* kp = k.data_ptr<int8_t>();
  const int8_t* vp = v.data_ptr<int8_t>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qsn = q.stride(2);
  const int64_t ksb = k.stride(0), ksh = k.stride(1), ksn = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vsn = v.stride(2);
  const int32_t top = static_cast<int32_t>(zero_code);
  const int32_t max_code = static_cast<int32_t>(p_max_code.value_or(zero_code - 1));
  const int64_t planes = int64_t{1} << substeps;
  const float* mu = substeps == 1 ? kMu1 : kMu2;
  void* out_raw = out.data_ptr();

  at::parallel_for(0, B * H * N, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> e(N);
    std::vector<int32_t> qz(D), codes(N);
    std::vector<double> x(planes * D);
    std::vector<float> y(D);
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / (H * N), h = (row / N) % H, i = row % N;
      const int32_t zq = qq.z(h), zk = kq.z(h), zv = vq.z(h);
      const float alpha = (sm * qq.s(h)) * kq.s(h);
      const int8_t* qrow = qp + b * qsb + h * qsh + i * qsn;
      const int8_t* kbase = kp + b * ksb + h * ksh;
      const int8_t* vbase = vp + b * vsb + h * vsh;
      const float* brow = bias_p ? bias_p + (((b % bias_b) * bias_h + (bias_h == 1 ? 0 : h)) * N + i) * N : nullptr;
      for (int64_t d = 0; d < D; ++d) qz[d] = static_cast<int32_t>(qrow[d]) - zq;

      // logits: exact int32 dot, then two fp32 roundings
      float m = -INFINITY;
      for (int64_t j = 0; j < N; ++j) {
        float t = static_cast<float>(dot_codes(qz.data(), kbase + j * ksn, zk, D)) * alpha;
        if (brow) t = t + brow[j];
        e[j] = t;
        m = std::max(m, t);
      }
      // softmax with the order-independent fixed-point row sum
      int64_t L = 0;
      for (int64_t j = 0; j < N; ++j) {
        e[j] = std::exp(e[j] - m);
        L += static_cast<int64_t>(e[j] * kFixedScale);
      }
      const float l = static_cast<float>(L) * kFixedInv;
      const float rl = 1.0f / l;
      for (int64_t j = 0; j < N; ++j) codes[j] = log2_code(e[j] * rl, substeps, max_code, top);

      // P^ V by planes of equal mantissa class: sums of 2^-e (v - zv), exact in double
      std::fill(x.begin(), x.end(), 0.0);
      for (int64_t j = 0; j < N; ++j) {
        const int32_t c = codes[j];
        if (c >= top) continue;
        add_scaled_codes(x.data() + (c & (planes - 1)) * D, pow2_neg(c >> substeps), vbase + j * vsn, zv, D);
      }
      const float sv = vq.s(h);
      for (int64_t d = 0; d < D; ++d) {
        float o = static_cast<float>(x[d]);
        for (int64_t r = 1; r < planes; ++r) {  // ((X0 + mu_1 X1) + mu_2 X2) + mu_3 X3, fp32 ops
          const float o_r = mu[r - 1] * static_cast<float>(x[r * D + d]);
          o = o + o_r;
        }
        y[d] = sv * o;
      }

      const int64_t out_row = (b * N + i) * H + h;  // [B, N, H, D] layout
      if (!quantize_out) {
        if (out_dtype == at::kFloat)
          store_float(static_cast<float*>(out_raw) + out_row * D, y.data(), D);
        else if (out_dtype == at::kHalf)
          store_float(static_cast<at::Half*>(out_raw) + out_row * D, y.data(), D);
        else
          store_float(static_cast<at::BFloat16*>(out_raw) + out_row * D, y.data(), D);
        continue;
      }
      // static per-tensor quantization, as reference.per_token_quantize: IEEE divide, half-to-even
      const int32_t half = 1 << (out_bits - 1), levels = (1 << out_bits) - 1;
      const float zu = static_cast<float>(zo + half);
      auto code_of = [&](float val) {
        float qv = std::nearbyint(val / so) + zu;
        qv = qv < 0.f ? 0.f : (qv > static_cast<float>(levels) ? static_cast<float>(levels) : qv);
        return static_cast<int8_t>(static_cast<int32_t>(qv) - half);
      };
      if (out_bits == 8) {
        int8_t* dst = static_cast<int8_t*>(out_raw) + out_row * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = code_of(y[d]);
      } else {
        uint8_t* dst = static_cast<uint8_t*>(out_raw) + out_row * (D / 2);
        for (int64_t d = 0; d < D / 2; ++d) dst[d] = pack_nibbles(code_of(y[2 * d]), code_of(y[2 * d + 1]));
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace vitq::cpu

TORCH_LIBRARY_IMPL(vitq, CPU, m) { m.impl("log2_attention", &vitq::cpu::log2_attention_cpu); }
