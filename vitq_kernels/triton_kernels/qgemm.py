"""Quantized GEMM: int8 tensor-core dot, zero-point and per-token x per-channel dequant
epilogue, and the POQ outlier term fused into the same epilogue (reference.qgemm).

Main loop: int8 x int8 -> int32 with `acc += tl.dot(a, b)` (the `acc=` form miscompiled
int8 once, Triton #5669).  int4 operands are stored packed and unpacked to int8 in
registers before the dot: Hopper has no int4 MMA, so int4 is a storage format there.

Epilogue, per [BLOCK_M, BLOCK_N] tile:
    acc -= za_i rw_j  (and, with a weight zero point, zw_j ra_i - K za_i zw_j)
    y    = s_i * acc
    o    = sum over slots c = 0..C-1, in order, of val_ic * (w[j, idx_ic] - zw_j)
    y    = sw_j * (y + o) + bias_j            -> out dtype
The outlier weights are gathered straight from w for the tile's N columns; no second
pass over Y.  Slots are filled front to back, so once every row of the tile has an empty
slot (val 0.0) the remaining slots are skipped: the cost follows the tile's largest
outlier count, not the capacity C.  A slot whose index lies outside [0, K) contributes 0
and is never read (the kernel does not read out of bounds; no check costs a sync here).

Tiles satisfy Hopper wgmma's int8 rules (num_warps % 4 == 0, BLOCK_M % 64 == 0,
BLOCK_N % 16 == 0, BLOCK_K >= 32).  On a GPU the tile is autotuned per (M bucket, N, K,
variant), from separate lists with and without outliers; under TRITON_INTERPRET one fixed
config runs (the interpreter cannot time).

The main loop and epilogue live in `qgemm_tile`, which fc1's GELU + Shift-Log2 kernel
(shiftlog2.py) calls too, with the launcher's checks (`check_operands`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._utils import (autotune_config, check_device, check_dtype, check_vector, code_matrix_width, grouped_tile,
                     is_interpreted, nibbles_to_int8, nonempty)

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# |sum_k (a - za)(w - zw)| <= K * 255 * 255 < 2^31 holds for K <= 32768
MAX_K = 32768


@triton.jit
def qgemm_tile(a_ptr, a_scale_ptr, a_zero_ptr, a_rowsum_ptr,
               w_ptr, w_scale_ptr, w_zero_ptr, w_colsum_ptr,
               bias_ptr, oidx_ptr, oval_ptr, rm, rn, M, N, K, C,
               stride_am, stride_ak, stride_wn, stride_wk,
               A_BITS: tl.constexpr, W_BITS: tl.constexpr,
               HAS_W_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 value y = sw_j (s_i acc_ij + o_ij) + bias_j of rows rm x columns rn, before any
    cast: the one copy of the main loop and the dequant/outlier epilogue, shared by qgemm and
    fc1's GELU + Shift-Log2 kernel (shiftlog2.py), so the two cannot drift apart."""
    m_ok = rm < M
    n_ok = rn < N
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am          # [BM, 1]
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn          # [BN, 1]
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn          # [1, BN]
    kk = tl.arange(0, BLOCK_K)
    kh = tl.arange(0, BLOCK_K // 2)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if A_BITS == 8:
            a = tl.load(a_rows + (k0 + kk)[None, :] * stride_ak,
                        mask=m_ok[:, None] & (k0 + kk < K)[None, :], other=0)
        else:
            pa = tl.load(a_rows + (k0 // 2 + kh)[None, :] * stride_ak,
                         mask=m_ok[:, None] & (k0 // 2 + kh < K // 2)[None, :], other=0)
            a = nibbles_to_int8(pa)
        if W_BITS == 8:
            b = tl.load(w_cols + (k0 + kk)[:, None] * stride_wk,
                        mask=(k0 + kk < K)[:, None] & n_ok[None, :], other=0)
        else:
            pw = tl.load(w_rows + (k0 // 2 + kh)[None, :] * stride_wk,
                         mask=n_ok[:, None] & (k0 // 2 + kh < K // 2)[None, :], other=0)
            b = tl.trans(nibbles_to_int8(pw))
        acc += tl.dot(a, b)

    # zero points: sum_k (a - za)(w - zw) from the plain product and the row / column sums
    za = tl.load(a_zero_ptr + rm, mask=m_ok, other=0)
    acc = acc - za[:, None] * tl.load(w_colsum_ptr + rn, mask=n_ok, other=0)[None, :]
    if HAS_W_ZERO:
        zw = tl.load(w_zero_ptr + rn, mask=n_ok, other=0)
        ra = tl.load(a_rowsum_ptr + rm, mask=m_ok, other=0)
        acc = acc - zw[None, :] * ra[:, None] + K * za[:, None] * zw[None, :]
    y = tl.load(a_scale_ptr + rm, mask=m_ok, other=0.0)[:, None] * acc.to(tl.float32)

    if HAS_OUTLIERS:
        # full-precision outliers, slot order c = 0..C-1 as the reference sums them
        o = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        slot_row = rm.to(tl.int64) * C
        # int32 offsets (the launcher checks w has < 2^31 elements) keep the [BM, BN]
        # gather addresses from doubling the epilogue's register footprint
        w_col_off = rn * stride_wn
        for c in range(0, C):
            v = tl.load(oval_ptr + slot_row + c, mask=m_ok, other=0.0)
            if tl.max(tl.abs(v), axis=0) > 0.0:          # slots fill front to back
                ix = tl.load(oidx_ptr + slot_row + c, mask=m_ok, other=0)
                v = tl.where((ix >= 0) & (ix < K), v, 0.0)
                take = (v != 0.0)[:, None] & n_ok[None, :]
                if W_BITS == 8:
                    wq = tl.load(w_ptr + (w_col_off[None, :] + ix[:, None] * stride_wk), mask=take, other=0)
                    wq = wq.to(tl.int32)
                else:
                    byte = tl.load(w_ptr + (w_col_off[None, :] + (ix // 2)[:, None] * stride_wk), mask=take,
                                   other=0)
                    byte = byte.to(tl.int32)
                    nib = tl.where((ix % 2 == 0)[:, None], byte & 0xF, (byte >> 4) & 0xF)
                    wq = (nib ^ 8) - 8
                if HAS_W_ZERO:
                    wq = wq - zw[None, :]
                o += v[:, None] * wq.to(tl.float32)
        y = y + o

    y = tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0)[None, :] * y
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _qgemm_kernel(
        a_ptr, a_scale_ptr, a_zero_ptr, a_rowsum_ptr,
        w_ptr, w_scale_ptr, w_zero_ptr, w_colsum_ptr,
        bias_ptr, oidx_ptr, oval_ptr, y_ptr,
        M, N, K, C, m_bucket,
        stride_am, stride_ak, stride_wn, stride_wk, stride_ym,
        A_BITS: tl.constexpr, W_BITS: tl.constexpr,
        HAS_W_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y = qgemm_tile(a_ptr, a_scale_ptr, a_zero_ptr, a_rowsum_ptr, w_ptr, w_scale_ptr, w_zero_ptr, w_colsum_ptr,
                   bias_ptr, oidx_ptr, oval_ptr, rm, rn, M, N, K, C, stride_am, stride_ak, stride_wn, stride_wk,
                   A_BITS, W_BITS, HAS_W_ZERO, HAS_BIAS, HAS_OUTLIERS, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


# H100 candidates, all wgmma-eligible (a ViT linear has M = batch * tokens, N, K in 384..4096).
# Register use was read from `ptxas -v` on the sm_90 AOT build (tests/test_triton_aot.py
# checks every config is spill-free): the dense epilogue fits 128x128 tiles; the outlier
# gather adds about 4 registers per output element, so those tiles keep <= 32 per thread.
DENSE_CONFIGS = [
    autotune_config(128, 128, 128, 8, 3),
    autotune_config(128, 128, 64, 8, 4),
    autotune_config(64, 128, 128, 4, 4),
    autotune_config(128, 64, 128, 4, 4),
    autotune_config(64, 64, 128, 4, 3),
]
OUTLIER_CONFIGS = [
    autotune_config(128, 64, 128, 8, 3),
    autotune_config(64, 128, 128, 8, 3),
    autotune_config(64, 64, 128, 4, 4),
    autotune_config(64, 64, 128, 8, 3),
]
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}
_TUNE_KEY = ["m_bucket", "N", "K", "A_BITS", "W_BITS", "HAS_W_ZERO", "HAS_BIAS"]
_qgemm_dense = triton.autotune(configs=DENSE_CONFIGS, key=_TUNE_KEY)(_qgemm_kernel)
_qgemm_outliers = triton.autotune(configs=OUTLIER_CONFIGS, key=_TUNE_KEY)(_qgemm_kernel)


def check_operands(op, a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias, outlier_idx,
                   outlier_val, a_bits, w_bits) -> dict:
    """Checks qgemm's operands (shared with qgemm_gelu_shiftlog2, which takes the same ones).
    Returns them made contiguous where needed, with M, N, K, C (outlier slots, 0 = none), the
    code containers and the device."""
    K = code_matrix_width(op, "a", a, a_bits)
    Kw = code_matrix_width(op, "w", w, w_bits)
    if K != Kw:
        raise ValueError(f"{op}: K mismatch: activations have {K}, weights {Kw}")
    if K > MAX_K:
        raise ValueError(f"{op}: K={K} > {MAX_K} could overflow the int32 accumulator")
    if (w.shape[0] - 1) * w.stride(0) + (w.shape[1] - 1) * w.stride(1) >= 2**31:
        raise ValueError(f"{op}: w spans >= 2^31 elements; the outlier gather uses int32 offsets")
    M, N = a.shape[0], w.shape[0]
    a_scale = check_vector(op, "a_scale", a_scale, M, torch.float32)
    a_zero = check_vector(op, "a_zero", a_zero, M, torch.int32)
    a_rowsum = check_vector(op, "a_rowsum", a_rowsum, M, torch.int32)
    w_scale = check_vector(op, "w_scale", w_scale, N, torch.float32)
    w_colsum = check_vector(op, "w_colsum", w_colsum, N, torch.int32)
    if w_zero is not None:
        w_zero = check_vector(op, "w_zero", w_zero, N, torch.int32)
    if bias is not None:
        check_dtype(op, "bias", bias, _FLOAT_DTYPES)
        bias = check_vector(op, "bias", bias, N, bias.dtype)
    if (outlier_idx is None) != (outlier_val is None):
        raise ValueError(f"{op}: outlier_idx and outlier_val must be given together")
    C = 0
    if outlier_idx is not None:
        check_dtype(op, "outlier_idx", outlier_idx, (torch.int32,))
        check_dtype(op, "outlier_val", outlier_val, (torch.float32,))
        if outlier_idx.dim() != 2 or outlier_idx.shape[0] != M or outlier_val.shape != outlier_idx.shape:
            raise ValueError(f"{op}: outlier_idx and outlier_val must both have shape [M={M}, C], got "
                             f"{tuple(outlier_idx.shape)} and {tuple(outlier_val.shape)}")
        C = outlier_idx.shape[1]
        outlier_idx, outlier_val = outlier_idx.contiguous(), outlier_val.contiguous()
    device = check_device(_qgemm_kernel, op, a=a, a_scale=a_scale, a_zero=a_zero, a_rowsum=a_rowsum, w=w,
                          w_scale=w_scale, w_zero=w_zero, w_colsum=w_colsum, bias=bias,
                          outlier_idx=outlier_idx, outlier_val=outlier_val)
    return dict(a=a, a_scale=a_scale, a_zero=a_zero, a_rowsum=a_rowsum, w=w, w_scale=w_scale, w_zero=w_zero,
                w_colsum=w_colsum, bias=bias, outlier_idx=outlier_idx, outlier_val=outlier_val,
                M=M, N=N, K=K, C=C, device=device,
                # specialised on the container, not the width: 3-bit codes run the int4 kernel (no new GEMM)
                A_BITS=reference.container_bits(a_bits), W_BITS=reference.container_bits(w_bits))


def operand_args(p: dict, out: torch.Tensor) -> tuple:
    """The kernels' leading arguments, a_ptr .. m_bucket (absent optional tensors get a stand-in
    that is never read)."""
    absent = p["a_zero"]
    C = p["C"]
    return (nonempty(p["a"]), p["a_scale"], p["a_zero"], p["a_rowsum"], nonempty(p["w"]), p["w_scale"],
            absent if p["w_zero"] is None else p["w_zero"], p["w_colsum"],
            absent if p["bias"] is None else p["bias"],
            nonempty(p["outlier_idx"]) if C else absent, nonempty(p["outlier_val"]) if C else absent, out,
            p["M"], p["N"], p["K"], C, triton.next_power_of_2(p["M"]))


def operand_flags(p: dict) -> dict:
    return dict(A_BITS=p["A_BITS"], W_BITS=p["W_BITS"], HAS_W_ZERO=p["w_zero"] is not None,
                HAS_BIAS=p["bias"] is not None, HAS_OUTLIERS=p["C"] > 0)


def qgemm(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias=None, outlier_idx=None,
          outlier_val=None, a_bits=8, w_bits=8, out_dtype=torch.float16):
    """Triton version of reference.qgemm.  a, w: any strides; no host sync."""
    op = "qgemm"
    p = check_operands(op, a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias, outlier_idx,
                       outlier_val, a_bits, w_bits)
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    M, N = p["M"], p["N"]
    y = torch.empty((M, N), dtype=out_dtype, device=p["device"])
    if M == 0 or N == 0:
        return y
    args = operand_args(p, y) + (a.stride(0), a.stride(1), w.stride(0), w.stride(1), y.stride(0))
    flags = operand_flags(p)
    if is_interpreted(_qgemm_kernel):
        cfg = INTERPRETER_CONFIG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _qgemm_kernel[grid](*args, **flags, **cfg, num_warps=4)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        (_qgemm_outliers if p["C"] > 0 else _qgemm_dense)[grid](*args, **flags)
    return y


__all__ = ["qgemm", "qgemm_tile", "check_operands", "operand_args", "operand_flags", "DENSE_CONFIGS",
           "OUTLIER_CONFIGS", "INTERPRETER_CONFIG"]
