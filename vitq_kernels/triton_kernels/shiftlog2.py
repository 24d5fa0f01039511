"""fc1 with GELU and Shift-Log2 encoding in the epilogue (reference.qgemm_gelu_shiftlog2).

Main loop as in qgemm.py: int8 x int8 -> int32 with `acc += tl.dot(a, b)`, int4 operands
unpacked to int8 in registers.  Epilogue, per [BLOCK_M, BLOCK_N] tile, all in registers:

    h = sw_j (s_i acc_ij + o_ij) + bias_j           qgemm's fp32 value, before any cast
    g = h / 2 (1 + erf(h / sqrt 2))                 exact-erf GELU in fp32
    y = fp32(g - shift) / scale                     correctly rounded division
    c = clamp(round(-2^m log2 y), 0, 2^b - 1)       from y's exponent and mantissa bits

and only the uint8 codes (one per byte) are stored: the fp32 activation never reaches
memory.  The log is read off the fp32 bits against the integer mantissa thresholds of
reference.LOG_MANTISSA_THRESHOLDS, so a code depends only on y.  The kernel runs with
fp-contraction off, so h is the reference's h bit for bit; g differs from torch's GELU in
the last places (erf implementations differ), which can move a code by one step only
where g lies within that difference of a code boundary (the tests' criterion).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import reference
from ._utils import check_device, check_dtype, check_vector, code_container, is_interpreted, nibbles_to_int8

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# |sum_k (a - za)(w - zw)| <= K * 255 * 255 < 2^31 holds for K <= 32768
MAX_K = 32768


@triton.jit
def log2_code(y, SUBSTEPS: tl.constexpr, TOP: tl.constexpr,
              THR0: tl.constexpr, THR1: tl.constexpr, THR2: tl.constexpr, THR3: tl.constexpr):
    """clamp(round(-2^m log2 y), 0, TOP) of fp32 y, exactly, from its bits (int32).

    y = 2^e 1.f: the code is -2^m e minus the number of thresholds <= the 23-bit mantissa
    (unused thresholds are 2^23, never reached).  y <= 0, NaN and subnormals give TOP.
    """
    bits = y.to(tl.int32, bitcast=True)
    exp_field = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    k = (mant >= THR0).to(tl.int32) + (mant >= THR1).to(tl.int32) \
        + (mant >= THR2).to(tl.int32) + (mant >= THR3).to(tl.int32)
    c = -(exp_field - 127) * (1 << SUBSTEPS) - k
    c = tl.where((y > 0.0) & (exp_field > 0), c, TOP)
    return tl.minimum(tl.maximum(c, 0), TOP)


def log2_code_constants(substeps: int) -> dict:
    """THR0..THR3 for log2_code: the reference thresholds, padded with 2^23."""
    thr = list(reference.LOG_MANTISSA_THRESHOLDS[substeps]) + [1 << 23] * 4
    return {f"THR{r}": thr[r] for r in range(4)}


@triton.jit
def _qgemm_gelu_shiftlog2_kernel(
        a_ptr, a_scale_ptr, a_zero_ptr, a_rowsum_ptr,
        w_ptr, w_scale_ptr, w_zero_ptr, w_colsum_ptr,
        bias_ptr, oidx_ptr, oval_ptr, codes_ptr,
        M, N, K, C, m_bucket, shift, out_scale,
        stride_am, stride_ak, stride_wn, stride_wk, stride_cm,
        A_BITS: tl.constexpr, W_BITS: tl.constexpr,
        HAS_W_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
        SUBSTEPS: tl.constexpr, TOP: tl.constexpr,
        THR0: tl.constexpr, THR1: tl.constexpr, THR2: tl.constexpr, THR3: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped tile order: GROUP_M row-tiles reuse each weight tile while it sits in L2
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
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
    h = tl.load(a_scale_ptr + rm, mask=m_ok, other=0.0)[:, None] * acc.to(tl.float32)

    if HAS_OUTLIERS:
        # full-precision outliers, slot order c = 0..C-1 as the reference sums them
        o = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        slots = rm.to(tl.int64) * C
        for c in range(0, C):
            v = tl.load(oval_ptr + slots + c, mask=m_ok, other=0.0)
            if tl.max(tl.abs(v), axis=0) > 0.0:          # slots fill front to back
                ix = tl.load(oidx_ptr + slots + c, mask=m_ok, other=0)
                v = tl.where((ix >= 0) & (ix < K), v, 0.0)
                take = (v != 0.0)[:, None] & n_ok[None, :]
                if W_BITS == 8:
                    wq = tl.load(w_cols + ix.to(tl.int64)[:, None] * stride_wk, mask=take, other=0).to(tl.int32)
                else:
                    byte = tl.load(w_cols + (ix // 2).to(tl.int64)[:, None] * stride_wk, mask=take, other=0)
                    byte = byte.to(tl.int32)
                    nib = tl.where((ix % 2 == 0)[:, None], byte & 0xF, (byte >> 4) & 0xF)
                    wq = (nib ^ 8) - 8
                if HAS_W_ZERO:
                    wq = wq - zw[None, :]
                o += v[:, None] * wq.to(tl.float32)
        h = h + o
    h = tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0)[None, :] * h
    if HAS_BIAS:
        h = h + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]

    g = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    y = tl.math.div_rn(g - shift, tl.zeros_like(g) + out_scale)
    code = log2_code(y, SUBSTEPS, TOP, THR0, THR1, THR2, THR3)
    tl.store(codes_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :], code.to(tl.uint8),
             mask=m_ok[:, None] & n_ok[None, :])


def _config(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# wgmma-eligible H100 tiles (num_warps % 4 == 0, BLOCK_M % 64 == 0, BLOCK_N % 16 == 0, BLOCK_K >= 32);
# fc1 is K = d (384..1024), N = 4d.  The outlier gather and the GELU/encode epilogue keep
# more of the tile live, so the outlier variants get smaller tiles (no register spills).
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
_TUNE_KEY = ["m_bucket", "N", "K", "A_BITS", "W_BITS", "HAS_W_ZERO", "HAS_BIAS", "HAS_OUTLIERS"]
_tuned_dense = triton.autotune(configs=DENSE_CONFIGS, key=_TUNE_KEY)(_qgemm_gelu_shiftlog2_kernel)
_tuned_outliers = triton.autotune(configs=OUTLIER_CONFIGS, key=_TUNE_KEY)(_qgemm_gelu_shiftlog2_kernel)


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    return t if t.numel() else torch.empty(1, dtype=t.dtype, device=t.device)


def check_log_args(op: str, bits: int, substeps: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"{op}: Shift-Log2 bits must be in 1..8, got {bits}")
    if substeps not in reference.LOG_SUBSTEPS:
        raise ValueError(f"{op}: substeps must be 0 (base 2), 1 (base sqrt 2) or 2, got {substeps}")


def code_width(op: str, name: str, t, bits: int) -> int:
    """K of a code matrix: int8 [R, K] (8 bit) or packed uint8 [R, K/2] (3 or 4 bit)."""
    packed = code_container(op, f"{name}_bits", bits) == 4
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{op}: {name} must be a 2-D tensor")
    check_dtype(op, f"{name} ({bits}-bit codes)", t, (torch.uint8,) if packed else (torch.int8,))
    return t.shape[1] * (2 if packed else 1)


def qgemm_gelu_shiftlog2(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias=None, outlier_idx=None,
                         outlier_val=None, a_bits=8, w_bits=8, shift=reference.GELU_MIN - 1e-4, out_scale=1.0,
                         out_bits=4, substeps=0):
    """Triton version of reference.qgemm_gelu_shiftlog2: uint8 codes [M, N].  No host sync."""
    op = "qgemm_gelu_shiftlog2"
    check_log_args(op, out_bits, substeps)
    if not math.isfinite(shift):
        raise ValueError(f"{op}: shift must be finite, got {shift}")
    scale32 = float(torch.tensor(out_scale, dtype=torch.float32))
    if not (math.isfinite(scale32) and scale32 > 0):
        raise ValueError(f"{op}: out_scale must be finite and > 0 in fp32, got {out_scale}")
    K = code_width(op, "a", a, a_bits)
    Kw = code_width(op, "w", w, w_bits)
    if K != Kw:
        raise ValueError(f"{op}: K mismatch: activations have {K}, weights {Kw}")
    if K > MAX_K:
        raise ValueError(f"{op}: K={K} > {MAX_K} could overflow the int32 accumulator")
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
    device = check_device(_qgemm_gelu_shiftlog2_kernel, op, a=a, a_scale=a_scale, a_zero=a_zero,
                          a_rowsum=a_rowsum, w=w, w_scale=w_scale, w_zero=w_zero, w_colsum=w_colsum, bias=bias,
                          outlier_idx=outlier_idx, outlier_val=outlier_val)
    codes = torch.empty((M, N), dtype=torch.uint8, device=device)
    if M == 0 or N == 0:
        return codes

    absent = a_zero     # stands in for an absent optional tensor; never read
    args = (_nonempty(a), a_scale, a_zero, a_rowsum, _nonempty(w), w_scale,
            w_zero if w_zero is not None else absent, w_colsum, bias if bias is not None else absent,
            _nonempty(outlier_idx) if C else absent, _nonempty(outlier_val) if C else absent, codes,
            M, N, K, C, triton.next_power_of_2(M), float(shift), scale32,
            a.stride(0), a.stride(1), w.stride(0), w.stride(1), codes.stride(0))
    # the kernel is specialised on the code container: 3-bit codes run the int4 variant
    flags = dict(A_BITS=reference.container_bits(a_bits), W_BITS=reference.container_bits(w_bits),
                 HAS_W_ZERO=w_zero is not None, HAS_BIAS=bias is not None, HAS_OUTLIERS=C > 0, SUBSTEPS=substeps, TOP=(1 << out_bits) - 1, **log2_code_constants(substeps))
    if is_interpreted(_qgemm_gelu_shiftlog2_kernel):
        cfg = INTERPRETER_CONFIG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _qgemm_gelu_shiftlog2_kernel[grid](*args, **flags, **cfg, num_warps=4, enable_fp_fusion=False)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        (_tuned_outliers if C else _tuned_dense)[grid](*args, **flags, enable_fp_fusion=False)
    return codes


__all__ = ["qgemm_gelu_shiftlog2", "DENSE_CONFIGS", "OUTLIER_CONFIGS", "INTERPRETER_CONFIG", "log2_code",
           "log2_code_constants", "check_log_args", "code_width"]
