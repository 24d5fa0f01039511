"""fc1 with GELU and Shift-Log2 encoding in the epilogue (reference.qgemm_gelu_shiftlog2).

The main loop and the dequant/outlier epilogue are qgemm.py's `qgemm_tile`, the same code
qgemm runs (int8 x int8 -> int32, int4 operands unpacked to int8 in registers).  Then, per
[BLOCK_M, BLOCK_N] tile, all in registers:

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
from ._utils import autotune_config, grouped_tile, is_interpreted
from .qgemm import check_operands, operand_args, operand_flags, qgemm_tile



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
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h = qgemm_tile(a_ptr, a_scale_ptr, a_zero_ptr, a_rowsum_ptr, w_ptr, w_scale_ptr, w_zero_ptr, w_colsum_ptr,
                   bias_ptr, oidx_ptr, oval_ptr, rm, rn, M, N, K, C, stride_am, stride_ak, stride_wn, stride_wk,
                   A_BITS, W_BITS, HAS_W_ZERO, HAS_BIAS, HAS_OUTLIERS, BLOCK_M, BLOCK_N, BLOCK_K)

    g = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    y = tl.math.div_rn(g - shift, tl.zeros_like(g) + out_scale)
    code = log2_code(y, SUBSTEPS, TOP, THR0, THR1, THR2, THR3)
    tl.store(codes_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :], code.to(tl.uint8),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


# wgmma-eligible H100 tiles (num_warps % 4 == 0, BLOCK_M % 64 == 0, BLOCK_N % 16 == 0, BLOCK_K >= 32);
# fc1 is K = d (384..1024), N = 4d.  The outlier gather and the GELU/encode epilogue keep
# more of the tile live, so the outlier variants get smaller tiles (no register spills).
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
_TUNE_KEY = ["m_bucket", "N", "K", "A_BITS", "W_BITS", "HAS_W_ZERO", "HAS_BIAS", "HAS_OUTLIERS"]
_tuned_dense = triton.autotune(configs=DENSE_CONFIGS, key=_TUNE_KEY)(_qgemm_gelu_shiftlog2_kernel)
_tuned_outliers = triton.autotune(configs=OUTLIER_CONFIGS, key=_TUNE_KEY)(_qgemm_gelu_shiftlog2_kernel)


def check_log_args(op: str, bits: int, substeps: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"{op}: Shift-Log2 bits must be in 1..8, got {bits}")
    if substeps not in reference.LOG_SUBSTEPS:
        raise ValueError(f"{op}: substeps must be 0 (base 2), 1 (base sqrt 2) or 2, got {substeps}")


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
    p = check_operands(op, a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias, outlier_idx,
                       outlier_val, a_bits, w_bits)
    M, N = p["M"], p["N"]
    codes = torch.empty((M, N), dtype=torch.uint8, device=p["device"])
    if M == 0 or N == 0:
        return codes
    args = operand_args(p, codes) + (float(shift), scale32, a.stride(0), a.stride(1), w.stride(0), w.stride(1),
                                     codes.stride(0))
    flags = dict(operand_flags(p), SUBSTEPS=substeps, TOP=(1 << out_bits) - 1, **log2_code_constants(substeps))
    if is_interpreted(_qgemm_gelu_shiftlog2_kernel):
        cfg = INTERPRETER_CONFIG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _qgemm_gelu_shiftlog2_kernel[grid](*args, **flags, **cfg, num_warps=4, enable_fp_fusion=False)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        (_tuned_outliers if p["C"] else _tuned_dense)[grid](*args, **flags, enable_fp_fusion=False)
    return codes


__all__ = ["qgemm_gelu_shiftlog2", "DENSE_CONFIGS", "OUTLIER_CONFIGS", "INTERPRETER_CONFIG", "log2_code",
           "log2_code_constants", "check_log_args"]
