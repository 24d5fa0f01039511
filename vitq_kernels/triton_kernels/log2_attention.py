"""Quantized attention with the log2 post-softmax quantizer, fused (reference.log2_attention).

One program owns BLOCK_M query rows of one (batch, head).  Logits come from an int8
tl.dot (exact int32) with the zero-point corrections; the softmax is fp32 with the 40-bit
fixed-point row sum; P's log2 code is read from its fp32 bits; P^ is built in the exponent
field (2^-e = bits (127 - e) << 23), so P^ V is a dot of exact powers of two with exact
integers v - zv (bf16 operands on a GPU: both are exact in bf16; fp32 under the
interpreter, where bf16 dots are unreliable) accumulated in fp32, which is exact for the
code ranges the reference calls exact.  m = 2^substeps planes (m <= 2) hold the mantissa
classes of P^; a runtime truncation code max_code (TP-ViT's truncated uniform-log2,
reference.tul2_quantize) zeroes every code above it without recompiling.

Two kernels share every arithmetic step (the @triton.jit helpers below):
* one-block, N <= ONE_BLOCK_MAX_N: a whole row of logits lives in registers;
* two-pass, any N (SAM-style 4096 tokens): a statistics pass over K (a sweep for the row
  max, then a sweep for the fixed-point sum, which needs the final max), then an output
  pass that recomputes the logits chunk by chunk.
The row max is exact, the fixed-point sum is order-independent and P^ V sums are exact,
so both kernels give bit-identical outputs (for codes whose sums are exact; beyond that
only the fp32 accumulation order of P^ V differs).  Floating-point fusion is disabled at
launch so that t = alpha * acc + bias and o = X0 + mu_1 X1 (+ ...) round like the reference.

On CUDA the launcher checks shapes, dtypes and devices only: scale/zero/bias values are
not read (no host sync, so the op stays asynchronous and graph-capturable).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference as ref
from ._utils import check_device, int_pairs_to_nibbles, is_interpreted, round_half_even

ONE_BLOCK_MAX_N = 512
_FIXED = float(1 << ref.ATTN_FIXED_POINT_BITS)
THR0 = ref.LOG_MANTISSA_THRESHOLDS[0][0]
THR1 = ref.LOG_MANTISSA_THRESHOLDS[1]


def code_constants(substeps: int):
    """(THR_A, THR_B, THR_C, THR_D, MU_1, MU_2, MU_3) for m = substeps: the mantissa thresholds
    of the code (unused ones repeat the last) and the plane multipliers LOG_MANTISSAS[m][1..3]
    (unused ones 0)."""
    thr = list(ref.LOG_MANTISSA_THRESHOLDS[substeps])
    thr += [thr[-1]] * (4 - len(thr))
    mu = list(ref.LOG_MANTISSAS[substeps][1:])
    mu += [0.0] * (3 - len(mu))
    return (*thr, *mu)


# ---------------------------------------------------------------------------
# shared steps
# ---------------------------------------------------------------------------
@triton.jit
def _logits(q, q_rowsum, k_base, stride_kn, offs_n, offs_d, D, N, zq, zk, alpha,
            bias_rows, offs_m, HAS_BIAS: tl.constexpr):
    """t [BLOCK_M, BLOCK_N] fp32: alpha * sum_d (q - zq)(k - zk) (+ bias); -inf past N."""
    n_ok = offs_n < N
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d[None, :] < D), other=0)
    acc = tl.zeros([q.shape[0], offs_n.shape[0]], dtype=tl.int32)
    acc += tl.dot(q, tl.trans(k))
    k_rowsum = tl.sum(k.to(tl.int32), axis=1)
    acc = acc - zk * q_rowsum[:, None] - zq * k_rowsum[None, :] + D * zq * zk
    t = acc.to(tl.float32) * alpha
    if HAS_BIAS:
        b = tl.load(bias_rows + offs_m[:, None] * N + offs_n[None, :],
                    mask=(offs_m[:, None] < N) & n_ok[None, :], other=0.0)
        t = t + b
    return tl.where(n_ok[None, :], t, float("-inf"))


@triton.jit
def _exp_fixed(t, m):
    """e = exp(t - m) and its 40-bit fixed-point truncation (int64)."""
    e = tl.exp(t - m[:, None])
    return e, (e * 1099511627776.0).to(tl.int64)


@triton.jit
def _reciprocal_sum(L):
    """r = 1 / (float(L) * 2^-40), correctly rounded."""
    l = L.to(tl.float32) * 9.094947017729282e-13
    return tl.math.div_rn(tl.full(l.shape, 1.0, tl.float32), l)


@triton.jit
def _pow2_neg(e):
    """2^-e in fp32 from the exponent field, 0 <= e <= 126."""
    return ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def log2_codes(p, max_code, SUBSTEPS: tl.constexpr, THR_A: tl.constexpr, THR_B: tl.constexpr,
               THR_C: tl.constexpr, THR_D: tl.constexpr):
    """reference.tul2_quantize(p, bits, m, max_code) for 0 <= p <= 1, from p's bits
    (max_code = 2^b - 2 is log2_quantize(zero_code=True)).

    Returns (c, keep): c clamped below at 0; keep is False where P^ = 0 (c > max_code,
    subnormal or zero p), and c is only meaningful where keep is True.
    """
    bits = p.to(tl.int32, bitcast=True)
    ex = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    if SUBSTEPS == 0:
        c = (127 - ex) - (mant >= THR_A).to(tl.int32)
    elif SUBSTEPS == 1:
        c = ((127 - ex) << 1) - (mant >= THR_A).to(tl.int32) - (mant >= THR_B).to(tl.int32)
    else:
        c = ((127 - ex) << 2) - (mant >= THR_A).to(tl.int32) - (mant >= THR_B).to(tl.int32) \
            - (mant >= THR_C).to(tl.int32) - (mant >= THR_D).to(tl.int32)
    c = tl.maximum(c, 0)
    return c, (ex > 0) & (c <= max_code)


@triton.jit
def _plane_dot(w, vh, x, DOT_FP32: tl.constexpr):
    """x += w @ vh: fp32 ieee under the interpreter; bf16 operands on a GPU (both exact there)."""
    if DOT_FP32:
        x = tl.dot(w, vh, x, input_precision="ieee")
    else:
        x = tl.dot(w.to(tl.bfloat16), vh, x)
    return x


@triton.jit
def _pv_planes(p, vh, x0, x1, x2, x3, max_code, SUBSTEPS: tl.constexpr, THR_A: tl.constexpr,
               THR_B: tl.constexpr, THR_C: tl.constexpr, THR_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """Add the planes of P^ V: x_r += sum_j [c_j = r mod 2^m] 2^-(c_j >> m) vh_j."""
    c, keep = log2_codes(p, max_code, SUBSTEPS, THR_A, THR_B, THR_C, THR_D)
    if SUBSTEPS == 0:
        x0 = _plane_dot(tl.where(keep, _pow2_neg(c), 0.0), vh, x0, DOT_FP32)
    else:
        MASK: tl.constexpr = (1 << SUBSTEPS) - 1
        w = _pow2_neg(c >> SUBSTEPS)
        r = c & MASK
        x0 = _plane_dot(tl.where(keep & (r == 0), w, 0.0), vh, x0, DOT_FP32)
        x1 = _plane_dot(tl.where(keep & (r == 1), w, 0.0), vh, x1, DOT_FP32)
        if SUBSTEPS == 2:
            x2 = _plane_dot(tl.where(keep & (r == 2), w, 0.0), vh, x2, DOT_FP32)
            x3 = _plane_dot(tl.where(keep & (r == 3), w, 0.0), vh, x3, DOT_FP32)
    return x0, x1, x2, x3


@triton.jit
def _load_vh(v_base, stride_vn, offs_n, offs_d, D, N, zv, DOT_FP32: tl.constexpr):
    """v - zv as exact dot operands [BLOCK_N, BLOCK_D] (0 outside the tile)."""
    ok = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=ok, other=0)
    vh = tl.where(ok, v.to(tl.int32) - zv, 0).to(tl.float32)
    if DOT_FP32:
        return vh
    return vh.to(tl.bfloat16)


@triton.jit
def _epilogue(x0, x1, x2, x3, sv, out_ptr, so_ptr, zo_ptr, b, h, offs_m, offs_d, N, H, D,
              SUBSTEPS: tl.constexpr, MU_1: tl.constexpr, MU_2: tl.constexpr, MU_3: tl.constexpr,
              QUANT: tl.constexpr, OUT_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """y = sv * (((X0 + mu_1 X1) + mu_2 X2) + mu_3 X3) (planes up to 2^m - 1) stored
    token-major [B, N, H, D], as floats or static codes."""
    o = x0
    if SUBSTEPS >= 1:
        o = o + MU_1 * x1
    if SUBSTEPS == 2:
        o = o + MU_2 * x2
        o = o + MU_3 * x3
    y = sv * o
    rows = (b * N + offs_m).to(tl.int64) * H + h           # row of [B*N*H, D]
    m_ok = offs_m < N
    if not QUANT:
        ptrs = out_ptr + rows[:, None] * D + offs_d[None, :]
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < D))
    else:
        HALF: tl.constexpr = 1 << (OUT_BITS - 1)
        LEVELS: tl.constexpr = (1 << OUT_BITS) - 1
        so = tl.load(so_ptr)
        zu = (tl.load(zo_ptr) + HALF).to(tl.float32)
        qv = round_half_even(tl.math.div_rn(y, tl.full(y.shape, 1.0, tl.float32) * so)) + zu
        qv = tl.minimum(tl.maximum(qv, 0.0), LEVELS * 1.0)
        codes = qv.to(tl.int32) - HALF
        if OUT_BITS == 8:
            ptrs = out_ptr + rows[:, None] * D + offs_d[None, :]
            tl.store(ptrs, codes.to(tl.int8), mask=m_ok[:, None] & (offs_d[None, :] < D))
        else:
            packed = int_pairs_to_nibbles(codes, BLOCK_M, BLOCK_D // 2)
            offs_p = tl.arange(0, BLOCK_D // 2)
            ptrs = out_ptr + rows[:, None] * (D // 2) + offs_p[None, :]
            tl.store(ptrs, packed, mask=m_ok[:, None] & (offs_p[None, :] < D // 2))


@triton.jit
def _program_setup(q_ptr, sqb, sqh, sqn, q_scale_ptr, q_zero_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr,
                   v_zero_ptr, sm_scale, N, H, D, n_mblocks, PER_HEAD_Q: tl.constexpr,
                   PER_HEAD_K: tl.constexpr, PER_HEAD_V: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid % n_mblocks
    bh = pid // n_mblocks
    b = bh // H
    h = bh % H
    hq = h if PER_HEAD_Q else 0
    hk = h if PER_HEAD_K else 0
    hv = h if PER_HEAD_V else 0
    zq = tl.load(q_zero_ptr + hq)
    zk = tl.load(k_zero_ptr + hk)
    zv = tl.load(v_zero_ptr + hv)
    sv = tl.load(v_scale_ptr + hv)
    alpha = (sm_scale * tl.load(q_scale_ptr + hq)) * tl.load(k_scale_ptr + hk)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :],
                mask=(offs_m[:, None] < N) & (offs_d[None, :] < D), other=0)
    q_rowsum = tl.sum(q.to(tl.int32), axis=1)
    return b, h, zq, zk, zv, sv, alpha, offs_m, offs_d, q, q_rowsum


# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------
@triton.jit
def _log2_attention_one_block(
        q_ptr, sqb, sqh, sqn, k_ptr, skb, skh, skn, v_ptr, svb, svh, svn,
        q_scale_ptr, q_zero_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, sm_scale,
        bias_ptr, bias_b, bias_h, out_ptr, so_ptr, zo_ptr, N, H, D, n_mblocks, max_code,
        PER_HEAD_Q: tl.constexpr, PER_HEAD_K: tl.constexpr, PER_HEAD_V: tl.constexpr,
        HAS_BIAS: tl.constexpr, SUBSTEPS: tl.constexpr, THR_A: tl.constexpr, THR_B: tl.constexpr,
        THR_C: tl.constexpr, THR_D: tl.constexpr, MU_1: tl.constexpr, MU_2: tl.constexpr,
        MU_3: tl.constexpr, QUANT: tl.constexpr,
        OUT_BITS: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b, h, zq, zk, zv, sv, alpha, offs_m, offs_d, q, q_rowsum = _program_setup(
        q_ptr, sqb, sqh, sqn, q_scale_ptr, q_zero_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr,
        sm_scale, N, H, D, n_mblocks, PER_HEAD_Q, PER_HEAD_K, PER_HEAD_V, BLOCK_M, BLOCK_D)
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    bias_rows = bias_ptr + ((b % bias_b) * bias_h + (h % bias_h)).to(tl.int64) * N * N
    offs_n = tl.arange(0, BLOCK_N)

    t = _logits(q, q_rowsum, k_base, skn, offs_n, offs_d, D, N, zq, zk, alpha, bias_rows, offs_m, HAS_BIAS)
    m = tl.max(t, axis=1)
    e, e_fixed = _exp_fixed(t, m)
    r = _reciprocal_sum(tl.sum(e_fixed, axis=1))
    p = e * r[:, None]
    vh = _load_vh(v_base, svn, offs_n, offs_d, D, N, zv, DOT_FP32)
    x0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    x1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    x2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    x3 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    x0, x1, x2, x3 = _pv_planes(p, vh, x0, x1, x2, x3, max_code, SUBSTEPS, THR_A, THR_B,
                                THR_C, THR_D, DOT_FP32)
    _epilogue(x0, x1, x2, x3, sv, out_ptr, so_ptr, zo_ptr, b, h, offs_m, offs_d, N, H, D, SUBSTEPS, MU_1,
              MU_2, MU_3, QUANT, OUT_BITS, BLOCK_M, BLOCK_D)


@triton.jit
def _log2_attention_two_pass(
        q_ptr, sqb, sqh, sqn, k_ptr, skb, skh, skn, v_ptr, svb, svh, svn,
        q_scale_ptr, q_zero_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, sm_scale,
        bias_ptr, bias_b, bias_h, out_ptr, so_ptr, zo_ptr, N, H, D, n_mblocks, max_code,
        PER_HEAD_Q: tl.constexpr, PER_HEAD_K: tl.constexpr, PER_HEAD_V: tl.constexpr,
        HAS_BIAS: tl.constexpr, SUBSTEPS: tl.constexpr, THR_A: tl.constexpr, THR_B: tl.constexpr,
        THR_C: tl.constexpr, THR_D: tl.constexpr, MU_1: tl.constexpr, MU_2: tl.constexpr,
        MU_3: tl.constexpr, QUANT: tl.constexpr,
        OUT_BITS: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b, h, zq, zk, zv, sv, alpha, offs_m, offs_d, q, q_rowsum = _program_setup(
        q_ptr, sqb, sqh, sqn, q_scale_ptr, q_zero_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr,
        sm_scale, N, H, D, n_mblocks, PER_HEAD_Q, PER_HEAD_K, PER_HEAD_V, BLOCK_M, BLOCK_D)
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    bias_rows = bias_ptr + ((b % bias_b) * bias_h + (h % bias_h)).to(tl.int64) * N * N
    cols = tl.arange(0, BLOCK_N)

    # statistics pass: the exact row max, then the fixed-point sum at that max
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        t = _logits(q, q_rowsum, k_base, skn, n0 + cols, offs_d, D, N, zq, zk, alpha, bias_rows, offs_m,
                    HAS_BIAS)
        m = tl.maximum(m, tl.max(t, axis=1))
    L = tl.zeros([BLOCK_M], dtype=tl.int64)
    for n0 in range(0, N, BLOCK_N):
        t = _logits(q, q_rowsum, k_base, skn, n0 + cols, offs_d, D, N, zq, zk, alpha, bias_rows, offs_m,
                    HAS_BIAS)
        e, e_fixed = _exp_fixed(t, m)
        L += tl.sum(e_fixed, axis=1)
    r = _reciprocal_sum(L)

    # output pass
    x0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    x1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    x2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    x3 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + cols
        t = _logits(q, q_rowsum, k_base, skn, offs_n, offs_d, D, N, zq, zk, alpha, bias_rows, offs_m, HAS_BIAS)
        e, e_fixed = _exp_fixed(t, m)
        p = e * r[:, None]
        vh = _load_vh(v_base, svn, offs_n, offs_d, D, N, zv, DOT_FP32)
        x0, x1, x2, x3 = _pv_planes(p, vh, x0, x1, x2, x3, max_code, SUBSTEPS, THR_A, THR_B,
                                    THR_C, THR_D, DOT_FP32)
    _epilogue(x0, x1, x2, x3, sv, out_ptr, so_ptr, zo_ptr, b, h, offs_m, offs_d, N, H, D, SUBSTEPS, MU_1,
              MU_2, MU_3, QUANT, OUT_BITS, BLOCK_M, BLOCK_D)


# ---------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------
def _blocks(N: int, D: int, path: str, interpreted: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_D).  The interpreter's cost is mostly per program and per
    @triton.jit call, so it gets large tiles; a GPU gets tiles that keep a row block's
    logits in registers."""
    block_d = max(32, triton.next_power_of_2(D))
    if path == "one_block":
        block_n = max(64, triton.next_power_of_2(N))
        if interpreted:
            return min(256, block_n), block_n, block_d
        return (64 if block_n <= 256 else 32), block_n, block_d
    if interpreted:
        return 256, 512, block_d
    return 64, (128 if D <= 128 else 64), block_d


def launch_log2_attention(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale, bias=None,
                          p_bits=4, substeps=0, out_scale=None, out_zero=None, out_bits=8,
                          out_dtype=torch.float16, path="auto", block_m=None, block_n=None, num_warps=None,
                          p_max_code=None):
    """log2_attention on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).

    path: "auto" (one-block up to ONE_BLOCK_MAX_N tokens, else two-pass), "one_block" or
    "two_pass"; block_m/block_n override the tile sizes (tests, tuning); p_max_code: the
    truncation code of the truncated uniform-log2 quantizer (None: 2^p_bits - 2).
    """
    ref.check_log2_attention_meta(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale, bias,
                                  p_bits, substeps, out_scale, out_zero, out_bits, out_dtype, p_max_code)
    kernel = _log2_attention_one_block
    check_device(kernel, "log2_attention", q=q, k=k, v=v, q_scale=q_scale, bias=bias, out_scale=out_scale)
    interpreted = is_interpreted(kernel)
    B, H, N, D = q.shape
    quant = out_scale is not None
    if quant:
        out = torch.empty((B, N, H, D // 2) if ref.is_packed(out_bits) else (B, N, H, D),
                          dtype=torch.uint8 if ref.is_packed(out_bits) else torch.int8, device=q.device)
    else:
        out = torch.empty((B, N, H, D), dtype=out_dtype, device=q.device)
    if out.numel() == 0:
        return out
    if path == "auto":
        path = "one_block" if N <= ONE_BLOCK_MAX_N else "two_pass"
    if path not in ("one_block", "two_pass"):
        raise ValueError(f"log2_attention: path must be 'auto', 'one_block' or 'two_pass', got {path!r}")
    if path == "one_block" and N > ONE_BLOCK_MAX_N:
        raise ValueError(f"log2_attention: the one-block kernel takes N <= {ONE_BLOCK_MAX_N}, got N={N}")
    bm, bn, bd = _blocks(N, D, path, interpreted)
    bm = block_m or bm
    bn = block_n or bn
    if path == "one_block" and bn < N:
        raise ValueError(f"log2_attention: one-block needs block_n >= N={N}, got {bn}")
    n_mblocks = triton.cdiv(N, bm)
    dummy = q_scale                                   # stands in for absent optional pointers
    kernel = _log2_attention_one_block if path == "one_block" else _log2_attention_two_pass
    thr_a, thr_b, thr_c, thr_d, mu_1, mu_2, mu_3 = code_constants(substeps)
    max_code = (1 << p_bits) - 2 if p_max_code is None else int(p_max_code)
    kernel[(n_mblocks * B * H,)](
        q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2),
        q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, float(torch.tensor(sm_scale, dtype=torch.float32)),
        bias if bias is not None else dummy, bias.shape[0] if bias is not None else 1,
        bias.shape[1] if bias is not None else 1,
        out, out_scale if quant else dummy, out_zero if quant else q_zero, N, H, D, n_mblocks, max_code,
        PER_HEAD_Q=q_scale.shape[0] != 1, PER_HEAD_K=k_scale.shape[0] != 1, PER_HEAD_V=v_scale.shape[0] != 1,
        HAS_BIAS=bias is not None, SUBSTEPS=substeps, THR_A=thr_a, THR_B=thr_b, THR_C=thr_c, THR_D=thr_d,
        MU_1=mu_1, MU_2=mu_2, MU_3=mu_3, QUANT=quant, OUT_BITS=out_bits, DOT_FP32=interpreted,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        num_warps=num_warps or (8 if path == "one_block" and bn >= 256 else 4),
        enable_fp_fusion=False)
    return out


def log2_attention(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale, bias, p_bits,
                   substeps, out_scale, out_zero, out_bits, out_dtype, p_max_code=None):
    """torch.ops.vitq.log2_attention's CUDA implementation (positional op signature)."""
    return launch_log2_attention(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale, bias,
                                 p_bits, substeps, out_scale, out_zero, out_bits, out_dtype,
                                 p_max_code=p_max_code)
