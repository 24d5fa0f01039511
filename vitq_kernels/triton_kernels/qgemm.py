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
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_device, check_dtype, check_vector, code_container, is_interpreted, nibbles_to_int8

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# |sum_k (a - za)(w - zw)| <= K * 255 * 255 < 2^31 holds for K <= 32768
MAX_K = 32768


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
    # grouped tile order: GROUP_M row-tiles share each weight tile while it is in L2
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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

    za = tl.load(a_zero_ptr + rm, mask=m_ok, other=0)
    rw = tl.load(w_colsum_ptr + rn, mask=n_ok, other=0)
    acc = acc - za[:, None] * rw[None, :]
    if HAS_W_ZERO:
        zw = tl.load(w_zero_ptr + rn, mask=n_ok, other=0)
        ra = tl.load(a_rowsum_ptr + rm, mask=m_ok, other=0)
        acc = acc - zw[None, :] * ra[:, None] + K * za[:, None] * zw[None, :]
    s = tl.load(a_scale_ptr + rm, mask=m_ok, other=0.0)
    y = s[:, None] * acc.to(tl.float32)

    if HAS_OUTLIERS:
        o = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        slot_row = rm.to(tl.int64) * C
        # int32 offsets (the launcher checks w has < 2^31 elements) keep the [BM, BN]
        # gather addresses from doubling the epilogue's register footprint
        w_col_off = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) * stride_wn
        for c in range(0, C):
            v = tl.load(oval_ptr + slot_row + c, mask=m_ok, other=0.0)
            if tl.max(tl.abs(v), axis=0) > 0.0:
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

    sw = tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0)
    y = sw[None, :] * y
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _config(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# H100 candidates, all wgmma-eligible (a ViT linear has M = batch * tokens, N, K in 384..4096).
# Register use was read from `ptxas -v` on the sm_90 AOT build (tests/test_triton_aot.py
# checks every config is spill-free): the dense epilogue fits 128x128 tiles; the outlier
# gather adds about 4 registers per output element, so those tiles keep <= 32 per thread.
DENSE_CONFIGS = [
    _config(128, 128, 128, 8, 3),
    _config(128, 128, 64, 8, 4),
    _config(64, 128, 128, 4, 4),
    _config(128, 64, 128, 4, 4),
    _config(64, 64, 128, 4, 3),
]
OUTLIER_CONFIGS = [
    _config(128, 64, 128, 8, 3),
    _config(64, 128, 128, 8, 3),
    _config(64, 64, 128, 4, 4),
    _config(64, 64, 128, 8, 3),
]
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}
_TUNE_KEY = ["m_bucket", "N", "K", "A_BITS", "W_BITS", "HAS_W_ZERO", "HAS_BIAS"]
_qgemm_dense = triton.autotune(configs=DENSE_CONFIGS, key=_TUNE_KEY)(_qgemm_kernel)
_qgemm_outliers = triton.autotune(configs=OUTLIER_CONFIGS, key=_TUNE_KEY)(_qgemm_kernel)


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    # a zero-size tensor may have no valid address; the kernel never reads it then
    return t if t.numel() else torch.empty(1, dtype=t.dtype, device=t.device)


def _codes(op, name, t, bits):
    """(K, container) of a code matrix: int8 [R, K], or packed uint8 [R, K/2] for 3/4-bit codes."""
    container = code_container(op, f"{name.split()[0]}_bits", bits)
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{op}: {name} must be a 2-D tensor")
    check_dtype(op, f"{name} ({bits}-bit codes)", t, (torch.uint8,) if container == 4 else (torch.int8,))
    return t.shape[1] * (2 if container == 4 else 1), container


def qgemm(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias=None, outlier_idx=None,
          outlier_val=None, a_bits=8, w_bits=8, out_dtype=torch.float16):
    """Triton version of reference.qgemm.  a, w: any strides; no host sync."""
    op = "qgemm"
    K, a_container = _codes(op, "a codes", a, a_bits)
    Kw, w_container = _codes(op, "w codes", w, w_bits)
    if K != Kw:
        raise ValueError(f"{op}: K mismatch: activations have {K}, weights {Kw}")
    if K > MAX_K:
        raise ValueError(f"{op}: K={K} > {MAX_K} could overflow the int32 accumulator")
    if (w.shape[0] - 1) * w.stride(0) + (w.shape[1] - 1) * w.stride(1) >= 2**31:
        raise ValueError(f"{op}: w spans >= 2^31 elements; the outlier gather uses int32 offsets")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    M, N = a.shape[0], w.shape[0]
    a_scale = check_vector(op, "a_scale", a_scale, M, torch.float32)
    a_zero = check_vector(op, "a_zero", a_zero, M, torch.int32)
    a_rowsum = check_vector(op, "a_rowsum", a_rowsum, M, torch.int32)
    w_scale = check_vector(op, "w_scale", w_scale, N, torch.float32)
    w_colsum = check_vector(op, "w_colsum", w_colsum, N, torch.int32)
    if w_zero is not None:
        w_zero = check_vector(op, "w_zero", w_zero, N, torch.int32)
    if bias is not None:
        if bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{op}: bias must be fp16, bf16 or fp32, got {bias.dtype}")
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
    y = torch.empty((M, N), dtype=out_dtype, device=device)
    if M == 0 or N == 0:
        return y

    dummy = a_zero      # stands in for absent optional tensors; never read
    args = (_nonempty(a), a_scale, a_zero, a_rowsum, _nonempty(w), w_scale,
            w_zero if w_zero is not None else dummy, w_colsum, bias if bias is not None else dummy,
            _nonempty(outlier_idx) if C else dummy, _nonempty(outlier_val) if C else dummy, y,
            M, N, K, C, triton.next_power_of_2(M),
            a.stride(0), a.stride(1), w.stride(0), w.stride(1), y.stride(0))
    # specialised on the container, not the width: 3-bit codes run the int4 kernel (no new GEMM)
    flags = dict(A_BITS=a_container, W_BITS=w_container, HAS_W_ZERO=w_zero is not None, HAS_BIAS=bias is not None,
                 HAS_OUTLIERS=C > 0)
    if is_interpreted(_qgemm_kernel):
        cfg = INTERPRETER_CONFIG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _qgemm_kernel[grid](*args, **flags, **cfg, num_warps=4)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        (_qgemm_outliers if C > 0 else _qgemm_dense)[grid](*args, **flags)
    return y


__all__ = ["qgemm", "DENSE_CONFIGS", "OUTLIER_CONFIGS", "INTERPRETER_CONFIG"]
