// Schemas of every torch.ops.vitq op.  Semantics: vitq_kernels/reference.py.
// CPU kernels register themselves in csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(vitq, CPU)).
// CUDA C++ kernels are separate ops named <op>_cuda (csrc/cuda/*.cu); the public op's
// CUDA dispatch is registered from Python (vitq_kernels/ops.py), which picks Triton or
// CUDA C++ per VITQ_BACKEND.  C++ embedders call vitq::<op> on CPU, vitq::<op>_cuda on GPU.
#include <torch/library.h>

TORCH_LIBRARY(vitq, m) {
  m.def("pack_int4(Tensor codes) -> Tensor");
  m.def("unpack_int4(Tensor packed) -> Tensor");
  m.def(
      "per_token_quantize(Tensor x, int bits, Tensor? scale, Tensor? zero, float? outlier_threshold, "
      "int max_outliers) -> (Tensor codes, Tensor scale, Tensor zero, Tensor rowsum, Tensor outlier_idx, "
      "Tensor outlier_val, Tensor outlier_count)");
  m.def(
      "qgemm(Tensor a, Tensor a_scale, Tensor a_zero, Tensor a_rowsum, Tensor w, Tensor w_scale, "
      "Tensor? w_zero, Tensor w_colsum, Tensor? bias, Tensor? outlier_idx, Tensor? outlier_val, "
      "int a_bits, int w_bits, ScalarType out_dtype) -> Tensor");
  // issue 3A: LayerNorm -> codes (qkv/fc1 input); fc1 -> GELU -> Shift-Log2 codes; fc2 decode GEMM
  m.def(
      "layernorm_quantize(Tensor x, Tensor weight, Tensor bias, float eps, int bits, Tensor? scale, "
      "Tensor? zero, float? outlier_threshold, int max_outliers) -> (Tensor codes, Tensor scale, Tensor zero, "
      "Tensor rowsum, Tensor outlier_idx, Tensor outlier_val, Tensor outlier_count)");
  m.def(
      "qgemm_gelu_shiftlog2(Tensor a, Tensor a_scale, Tensor a_zero, Tensor a_rowsum, Tensor w, "
      "Tensor w_scale, Tensor? w_zero, Tensor w_colsum, Tensor? bias, Tensor? outlier_idx, Tensor? outlier_val, "
      "int a_bits, int w_bits, float shift, float out_scale, int out_bits, int substeps) -> Tensor");
  m.def(
      "shiftlog2_qgemm(Tensor codes, int bits, int substeps, Tensor act_scale, Tensor w, Tensor w_scale, "
      "Tensor? w_zero, Tensor? bias, int w_bits, ScalarType out_dtype) -> Tensor");
  m.def(
      "log2_attention(Tensor q, Tensor k, Tensor v, Tensor q_scale, Tensor q_zero, Tensor k_scale, "
      "Tensor k_zero, Tensor v_scale, Tensor v_zero, float sm_scale, Tensor? bias, int p_bits, int substeps, "
      "Tensor? out_scale, Tensor? out_zero, int out_bits, ScalarType out_dtype, int? p_max_code=None) -> Tensor");
}
