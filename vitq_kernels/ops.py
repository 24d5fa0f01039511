"""Every torch.ops.vitq op: its Python entry point, its fake (meta) implementation, and
its CUDA dispatch.  Schemas live in csrc/ops.cpp; semantics in reference.py.

CUDA backend choice: ``VITQ_BACKEND=triton`` (default) or ``VITQ_BACKEND=cuda`` in the
environment, or ``set_backend(...)`` at run time.  CPU tensors always run the C++ kernels.

To add an op: its schema in csrc/ops.cpp, its reference in reference.py, a fake in _FAKES
below, a C++ CPU kernel (csrc/cpu/), a Triton launcher exported from triton_kernels/ under
the op's name with the op's positional signature, and optionally ``<op>_cuda`` in csrc/cuda/.
"""
from __future__ import annotations

import os

import torch

from . import _C  # noqa: F401  (loads the schemas and the C++ CPU kernels)
from .reference import is_packed

__all__ = ["pack_int4", "unpack_int4", "per_token_quantize", "qgemm", "set_backend", "get_backend"]
__all__ += ["log2_attention"]
__all__ += ["layernorm_quantize", "qgemm_gelu_shiftlog2", "shiftlog2_qgemm"]

_BACKENDS = ("triton", "cuda")
_backend = os.environ.get("VITQ_BACKEND", "triton")
if _backend not in _BACKENDS:
    raise ValueError(f"VITQ_BACKEND must be one of {_BACKENDS}, got {_backend!r}")


def set_backend(name: str) -> None:
    """Choose the kernels behind CUDA tensors: 'triton' or 'cuda' (C++/CUDA)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    if name == "cuda" and not has_cuda_kernels():
        raise RuntimeError("vitq_kernels._C was built without CUDA kernels (VITQ_SKIP_CUDA or no nvcc)")
    _backend = name


def get_backend() -> str:
    return _backend


def has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("vitq::qgemm_cuda", "CUDA") \
        if hasattr(torch.ops.vitq, "qgemm_cuda") else False


# ---------------------------------------------------------------------------
# Python entry points (thin: defaults and docs; the ops validate their inputs)
# ---------------------------------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], [..., K] with K even -> uint8 [..., K/2] (low nibble first)."""
    return torch.ops.vitq.pack_int4(codes)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int8 [..., K]."""
    return torch.ops.vitq.unpack_int4(packed)


def per_token_quantize(x, bits, scale=None, zero=None, outlier_threshold=None, max_outliers=0):
    """Per-token asymmetric quantization with optional outlier split; see reference.per_token_quantize."""
    return torch.ops.vitq.per_token_quantize(x, bits, scale, zero, outlier_threshold, max_outliers)


def qgemm(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias=None, outlier_idx=None,
          outlier_val=None, a_bits=8, w_bits=8, out_dtype=torch.float16):
    """Quantized GEMM with fused dequant and outlier epilogue; see reference.qgemm."""
    return torch.ops.vitq.qgemm(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias,
                                outlier_idx, outlier_val, a_bits, w_bits, out_dtype)


def log2_attention(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale=None, bias=None,
                   p_bits=4, substeps=0, out_scale=None, out_zero=None, out_bits=8, out_dtype=torch.float16,
                   p_max_code=None):
    """Attention on int8 q/k/v codes [B, H, N, D] with log2-quantized probabilities, one fused
    kernel; returns [B, N, H, D] (token-major, proj-ready) in out_dtype, or static per-tensor
    output codes when out_scale/out_zero are given.  sm_scale defaults to D^-0.5.  p_max_code
    truncates the codes (TP-ViT's truncated uniform-log2: codes above it mean P^ = 0; None =
    2^p_bits - 2, plain log2).  See reference.log2_attention.  On CUDA, scale/zero/bias *values*
    are not checked (that would need a host sync); the CPU kernel checks them.
    """
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    return torch.ops.vitq.log2_attention(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero,
                                         float(sm_scale), bias, p_bits, substeps, out_scale, out_zero,
                                         out_bits, out_dtype, p_max_code)


def layernorm_quantize(x, weight, bias, eps=1e-6, bits=8, scale=None, zero=None, outlier_threshold=None,
                       max_outliers=0):
    """LayerNorm -> per-token codes (+ POQ outliers) in one pass; the 7 outputs of
    per_token_quantize.  See reference.layernorm_quantize (and its LayerNorm contract)."""
    return torch.ops.vitq.layernorm_quantize(x, weight, bias, float(eps), bits, scale, zero, outlier_threshold,
                                             max_outliers)


def qgemm_gelu_shiftlog2(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias=None, outlier_idx=None,
                         outlier_val=None, a_bits=8, w_bits=8, shift=-0.17, out_scale=1.0, out_bits=4, substeps=0):
    """fc1: qgemm -> exact GELU -> Shift-Log2 codes, uint8 [M, N] one code per byte; the fp32
    activation is never written (on GPU).  The default shift -0.17 is GELU's minimum
    (reference.GELU_MIN = -0.169971...) minus eps = 2.9e-5.  See reference.qgemm_gelu_shiftlog2."""
    return torch.ops.vitq.qgemm_gelu_shiftlog2(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias,
                                               outlier_idx, outlier_val, a_bits, w_bits, float(shift),
                                               float(out_scale), out_bits, substeps)


def shiftlog2_qgemm(codes, bits, substeps, act_scale, w, w_scale, w_zero=None, bias=None, w_bits=8,
                    out_dtype=torch.float16):
    """fc2 on Shift-Log2 codes: sw_j s_a sum_k 2^(-c/2^m) (w - zw) + bias_j, the shift already
    folded into bias (reference.fold_shift_into_bias).  See reference.shiftlog2_qgemm."""
    return torch.ops.vitq.shiftlog2_qgemm(codes, bits, substeps, act_scale, w, w_scale, w_zero, bias, w_bits,
                                          out_dtype)


# ---------------------------------------------------------------------------
# fakes: shapes and dtypes only
# ---------------------------------------------------------------------------
def _fake_pack_int4(codes):
    torch._check(codes.shape[-1] % 2 == 0, lambda: "pack_int4 needs an even last dimension")
    return codes.new_empty((*codes.shape[:-1], codes.shape[-1] // 2), dtype=torch.uint8)


def _fake_unpack_int4(packed):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=torch.int8)


def _fake_per_token_quantize(x, bits, scale, zero, outlier_threshold, max_outliers):
    M, K = x.shape
    packed = is_packed(bits)     # 3-bit codes live in the int4 container, like 4-bit ones
    codes = x.new_empty((M, K // 2) if packed else (M, K), dtype=torch.uint8 if packed else torch.int8)
    return (codes, x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.int32),
            x.new_empty(M, dtype=torch.int32), x.new_empty((M, max_outliers), dtype=torch.int32),
            x.new_empty((M, max_outliers), dtype=torch.float32), x.new_empty(M, dtype=torch.int32))


def _fake_qgemm(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias, outlier_idx, outlier_val,
                a_bits, w_bits, out_dtype):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


def _fake_log2_attention(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale, bias, p_bits,
                         substeps, out_scale, out_zero, out_bits, out_dtype, p_max_code=None):
    B, H, N, D = q.shape
    if out_scale is None:
        return q.new_empty((B, N, H, D), dtype=out_dtype)
    if is_packed(out_bits):
        return q.new_empty((B, N, H, D // 2), dtype=torch.uint8)
    return q.new_empty((B, N, H, D), dtype=torch.int8)


def _fake_layernorm_quantize(x, weight, bias, eps, bits, scale, zero, outlier_threshold, max_outliers):
    return _fake_per_token_quantize(x, bits, scale, zero, outlier_threshold, max_outliers)


def _fake_qgemm_gelu_shiftlog2(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias, outlier_idx,
                               outlier_val, a_bits, w_bits, shift, out_scale, out_bits, substeps):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=torch.uint8)


def _fake_shiftlog2_qgemm(codes, bits, substeps, act_scale, w, w_scale, w_zero, bias, w_bits, out_dtype):
    return codes.new_empty((codes.shape[0], w.shape[0]), dtype=out_dtype)


_FAKES = {
    "pack_int4": _fake_pack_int4,
    "unpack_int4": _fake_unpack_int4,
    "per_token_quantize": _fake_per_token_quantize,
    "qgemm": _fake_qgemm,
    "log2_attention": _fake_log2_attention,
    "layernorm_quantize": _fake_layernorm_quantize,
    "qgemm_gelu_shiftlog2": _fake_qgemm_gelu_shiftlog2,
    "shiftlog2_qgemm": _fake_shiftlog2_qgemm,
}

for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"vitq::{_name}")(_fake)
    if hasattr(torch.ops.vitq, f"{_name}_cuda"):
        torch.library.register_fake(f"vitq::{_name}_cuda")(_fake)


# ---------------------------------------------------------------------------
# CUDA dispatch: Triton or the CUDA C++ kernels
# ---------------------------------------------------------------------------
def _triton_impl(name):
    from . import triton_kernels
    return getattr(triton_kernels, name)


def _make_cuda_dispatch(name):
    def dispatch(*args):
        # ops without a CUDA C++ version run Triton under either backend
        if _backend == "cuda" and hasattr(torch.ops.vitq, f"{name}_cuda"):
            return getattr(torch.ops.vitq, f"{name}_cuda")(*args)
        return _triton_impl(name)(*args)
    dispatch.__name__ = f"{name}_cuda_dispatch"
    return dispatch


_cuda_lib = torch.library.Library("vitq", "IMPL")
for _name in _FAKES:
    _cuda_lib.impl(_name, _make_cuda_dispatch(_name), "CUDA")
