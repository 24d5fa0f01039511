"""fc2's decode GEMM on Shift-Log2 codes (reference.shiftlog2_qgemm):

    Y_ij = sw_j s_a S_ij + bias_j,   S_ij = sum_k 2^(-c_ik / 2^m) (w_jk - zw_j)

Exact integer path (every 4-bit code, and more; see `plan`).  Write a code as c = 2^m e + r
and e = 8 g + e' (e' = e & 7).  Then 2^(-c/2^m) = M_r 2^(-8g-7) * 2^(7-e'), and 2^(7-e')
is the int8 value -(-128 >> e') up to sign: each (r, g) "plane" holds A_rg = -128 >> e'
(= -2^(7-e'), in [-128, -1]) where the code has that r and g, else 0.  So

    S = -sum_r M_r sum_g 2^(-8g-7) T_rg,   T_rg = sum_k A_rg,ik (w_jk - zw_j)

and every T_rg is an int8 x int8 tensor-core dot accumulated exactly in int32
(|T| <= 128 * 255 * K < 2^31 for K <= 65536), its zero-point part from the plane's row sum.
2^-c is thus built by shifts in registers; no exp2 on floats.  The planes are combined
exactly: for m = 0, U = sum_g T_g 2^(8(G-1-g)) in int64 (< 2^55) and S = -U 2^(-8(G-1)-7)
with one int64 -> fp32 rounding; for m > 0 (then G = 1) sum_r M_r T_r is exact in float64
for K <= 16448 (|T_r| M_r needs <= 2^29 * 2^24 < 2^53) and is rounded to fp32 once.  S is
therefore the exact sum rounded once, bit-identical to the reference's float64 sum while
reference.shiftlog2_sum_is_exact; the epilogue then runs the reference's fp32 operations in
its order (fp-contraction off).  Cost: one int8 dot per plane; 4-bit codes need 2 planes
for base 2 and for base sqrt 2, about one fp16 dot, with int8 weights read as they are.

Float path (codes whose exponents need more than 4 planes, e.g. 8-bit base-2 codes):
2^(-c/2^m) is built by exponent-field construction as an fp32 and multiplied with the
fp32 (w - zw) in an IEEE fp32 dot, accumulated in fp32; slow on a GPU (no tensor cores)
and held to the fp32 accumulation bound of the reference docstring.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._utils import (autotune_config, check_device, check_dtype, check_vector, code_matrix_width, grouped_tile,
                     is_interpreted, nibbles_to_int8, nonempty)
from .shiftlog2 import check_log_args

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_K = 16384   # exactness bound of the m > 0 combination (and far inside the int32 bound)
MAX_PLANES = 4


def plan(bits: int, substeps: int) -> tuple[int, int]:
    """(planes, groups) of the integer path, or (0, 0) for the float path."""
    e_max = ((1 << bits) - 1) >> substeps
    groups = e_max // 8 + 1
    planes = (1 << substeps) * groups
    if planes > MAX_PLANES or (substeps > 0 and groups > 1):
        return 0, 0
    return planes, groups


@triton.jit
def _plane(c, e, SLOT: tl.constexpr, GROUPS: tl.constexpr, SUBSTEPS: tl.constexpr):
    """int8 plane SLOT = r * GROUPS + g: -2^(7 - (e & 7)) where the code has remainder r and
    exponent group g, else 0 (built by an arithmetic shift of -128)."""
    r = SLOT // GROUPS
    g = SLOT % GROUPS
    sel = ((c & ((1 << SUBSTEPS) - 1)) == r) & ((e >> 3) == g)
    return tl.where(sel, tl.full(c.shape, -128, tl.int32) >> (e & 7), 0).to(tl.int8)


@triton.jit
def _decode_fp32(c, SUBSTEPS: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr):
    """2^(-c / 2^m) as fp32: 2^-e from the exponent field (0 for e > 126) times M_r."""
    e = c >> SUBSTEPS
    r = c & ((1 << SUBSTEPS) - 1)
    pow2 = (tl.maximum(127 - e, 0) << 23).to(tl.float32, bitcast=True)
    mant = tl.where(r == 1, M1, tl.where(r == 2, M2, tl.where(r == 3, M3, 1.0)))
    return pow2 * mant


@triton.jit
def _shiftlog2_qgemm_kernel(
        codes_ptr, act_scale_ptr, w_ptr, w_scale_ptr, w_zero_ptr, bias_ptr, y_ptr,
        M, N, K, m_bucket,
        stride_cm, stride_ck, stride_wn, stride_wk, stride_ym,
        BITS: tl.constexpr, SUBSTEPS: tl.constexpr, W_BITS: tl.constexpr,
        HAS_W_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
        PLANES: tl.constexpr, GROUPS: tl.constexpr,
        M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, UNIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    c_rows = codes_ptr + rm.to(tl.int64)[:, None] * stride_cm
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
    kk = tl.arange(0, BLOCK_K)
    kh = tl.arange(0, BLOCK_K // 2)
    if HAS_W_ZERO:
        zw = tl.load(w_zero_ptr + rn, mask=n_ok, other=0)

    acc0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    rs0 = tl.zeros([BLOCK_M], dtype=tl.int32)
    rs1 = tl.zeros([BLOCK_M], dtype=tl.int32)
    rs2 = tl.zeros([BLOCK_M], dtype=tl.int32)
    rs3 = tl.zeros([BLOCK_M], dtype=tl.int32)
    accf = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + kk < K)[None, :]
        c = tl.load(c_rows + (k0 + kk)[None, :] * stride_ck, mask=m_ok[:, None] & k_ok, other=0)
        c = c.to(tl.int32) & ((1 << BITS) - 1)
        if W_BITS == 8:
            b = tl.load(w_cols + (k0 + kk)[:, None] * stride_wk,
                        mask=(k0 + kk < K)[:, None] & n_ok[None, :], other=0)
        else:
            pw = tl.load(w_rows + (k0 // 2 + kh)[None, :] * stride_wk,
                         mask=n_ok[:, None] & (k0 // 2 + kh < K // 2)[None, :], other=0)
            b = tl.trans(nibbles_to_int8(pw))
        if PLANES > 0:
            e = tl.where(k_ok, c >> SUBSTEPS, 1 << 20)     # padding selects no plane
            p = _plane(c, e, 0, GROUPS, SUBSTEPS)
            acc0 += tl.dot(p, b)
            if HAS_W_ZERO:
                rs0 += tl.sum(p.to(tl.int32), axis=1)
            if PLANES > 1:
                p = _plane(c, e, 1, GROUPS, SUBSTEPS)
                acc1 += tl.dot(p, b)
                if HAS_W_ZERO:
                    rs1 += tl.sum(p.to(tl.int32), axis=1)
            if PLANES > 2:
                p = _plane(c, e, 2, GROUPS, SUBSTEPS)
                acc2 += tl.dot(p, b)
                if HAS_W_ZERO:
                    rs2 += tl.sum(p.to(tl.int32), axis=1)
            if PLANES > 3:
                p = _plane(c, e, 3, GROUPS, SUBSTEPS)
                acc3 += tl.dot(p, b)
                if HAS_W_ZERO:
                    rs3 += tl.sum(p.to(tl.int32), axis=1)
        else:
            d = tl.where(k_ok, _decode_fp32(c, SUBSTEPS, M1, M2, M3), 0.0)
            wz = b.to(tl.int32)
            if HAS_W_ZERO:
                wz = wz - zw[None, :]
            accf += tl.dot(d, wz.to(tl.float32), input_precision="ieee")

    if PLANES > 0:
        if HAS_W_ZERO:   # T = sum_k A (w - zw) = A.w - zw * rowsum(A), exact in int32
            acc0 -= zw[None, :] * rs0[:, None]
            if PLANES > 1:
                acc1 -= zw[None, :] * rs1[:, None]
            if PLANES > 2:
                acc2 -= zw[None, :] * rs2[:, None]
            if PLANES > 3:
                acc3 -= zw[None, :] * rs3[:, None]
        if SUBSTEPS == 0:
            # Horner over the exponent groups, exact in int64; one rounding to fp32
            u = acc0.to(tl.int64)
            if GROUPS > 1:
                u = u * 256 + acc1.to(tl.int64)
            if GROUPS > 2:
                u = u * 256 + acc2.to(tl.int64)
            if GROUPS > 3:
                u = u * 256 + acc3.to(tl.int64)
            s = (-u).to(tl.float32) * UNIT
        else:
            # one exponent group; planes are the mantissa classes r (exact in float64)
            t = acc0.to(tl.float64)
            t += acc1.to(tl.float64) * M1
            if PLANES > 2:
                t += acc2.to(tl.float64) * M2
                t += acc3.to(tl.float64) * M3
            s = (t * -0.0078125).to(tl.float32)
    else:
        s = accf

    y = tl.load(act_scale_ptr) * s
    y = tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0)[None, :] * y
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# wgmma-eligible H100 tiles; fc2 is K = 4d (1536..4096), N = d.  Each plane keeps its own
# int32 accumulator and the plane construction works on [BLOCK_M, BLOCK_K] int32 values, so
# the tiles shrink with the plane count; every config below compiles for sm_90 without
# register spills (checked with ptxas -v, see tests/test_shiftlog2.py::test_aot_sm90).
CONFIGS_2_PLANES = [
    autotune_config(128, 128, 32, 8, 3),
    autotune_config(64, 128, 64, 4, 3),
    autotune_config(64, 128, 32, 4, 3),
    autotune_config(64, 64, 64, 4, 3),
    autotune_config(64, 64, 32, 4, 3),
]
CONFIGS_4_PLANES = [
    autotune_config(64, 64, 32, 4, 3),
    autotune_config(64, 32, 32, 4, 2),
]
CONFIGS_FLOAT = [
    autotune_config(128, 64, 32, 4, 3),
    autotune_config(64, 128, 32, 4, 3),
    autotune_config(64, 64, 64, 4, 3),
    autotune_config(64, 64, 32, 4, 3),
]
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}
_TUNE_KEY = ["m_bucket", "N", "K", "BITS", "SUBSTEPS", "W_BITS", "HAS_W_ZERO", "HAS_BIAS"]
_TUNED = {name: triton.autotune(configs=cfgs, key=_TUNE_KEY)(_shiftlog2_qgemm_kernel)
          for name, cfgs in (("planes<=2", CONFIGS_2_PLANES), ("planes=4", CONFIGS_4_PLANES),
                             ("float", CONFIGS_FLOAT))}


def configs_for(planes: int) -> str:
    return "float" if planes == 0 else ("planes<=2" if planes <= 2 else "planes=4")


def shiftlog2_qgemm(codes, bits, substeps, act_scale, w, w_scale, w_zero=None, bias=None, w_bits=8,
                    out_dtype=torch.float16):
    """Triton version of reference.shiftlog2_qgemm.  codes: uint8 [M, K], any strides.  No host sync."""
    op = "shiftlog2_qgemm"
    check_log_args(op, bits, substeps)
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"{op}: codes must be a 2-D tensor [M, K]")
    check_dtype(op, "codes (one Shift-Log2 code per byte)", codes, (torch.uint8,))
    M, K = codes.shape
    Kw = code_matrix_width(op, "w", w, w_bits)
    if K != Kw:
        raise ValueError(f"{op}: K mismatch: codes have {K}, weights {Kw}")
    if K > MAX_K:
        raise ValueError(f"{op}: K={K} > {MAX_K}, beyond the kernel's exactness bound")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    check_dtype(op, "act_scale", act_scale, (torch.float32,))
    if act_scale.numel() != 1:
        raise ValueError(f"{op}: act_scale must have exactly one element, got shape {tuple(act_scale.shape)}")
    N = w.shape[0]
    w_scale = check_vector(op, "w_scale", w_scale, N, torch.float32)
    if w_zero is not None:
        w_zero = check_vector(op, "w_zero", w_zero, N, torch.int32)
    if bias is not None:
        check_dtype(op, "bias", bias, _FLOAT_DTYPES)
        bias = check_vector(op, "bias", bias, N, bias.dtype)
    device = check_device(_shiftlog2_qgemm_kernel, op, codes=codes, act_scale=act_scale, w=w, w_scale=w_scale,
                          w_zero=w_zero, bias=bias)
    y = torch.empty((M, N), dtype=out_dtype, device=device)
    if M == 0 or N == 0:
        return y

    planes, groups = plan(bits, substeps)
    mants = list(reference.LOG_MANTISSAS[substeps]) + [1.0] * 4
    absent = w_scale    # stands in for an absent optional tensor; never read
    args = (nonempty(codes), act_scale.reshape(1), nonempty(w), w_scale,
            w_zero if w_zero is not None else absent, bias if bias is not None else absent, y,
            M, N, K, triton.next_power_of_2(M),
            codes.stride(0), codes.stride(1), w.stride(0), w.stride(1), y.stride(0))
    flags = dict(BITS=bits, SUBSTEPS=substeps, W_BITS=reference.container_bits(w_bits), HAS_W_ZERO=w_zero is not None,
                 HAS_BIAS=bias is not None, PLANES=planes, GROUPS=max(groups, 1),
                 M1=mants[1], M2=mants[2], M3=mants[3], UNIT=2.0 ** (-8 * (max(groups, 1) - 1) - 7))
    if is_interpreted(_shiftlog2_qgemm_kernel):
        cfg = INTERPRETER_CONFIG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _shiftlog2_qgemm_kernel[grid](*args, **flags, **cfg, num_warps=4, enable_fp_fusion=False)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _TUNED[configs_for(planes)][grid](*args, **flags, enable_fp_fusion=False)
    return y


__all__ = ["shiftlog2_qgemm", "plan", "configs_for", "CONFIGS_2_PLANES", "CONFIGS_4_PLANES", "CONFIGS_FLOAT"]
