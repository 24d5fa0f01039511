"""LayerNorm -> per-token quantize -> outlier split, one pass over the residual stream.

Semantics: reference.layernorm_quantize.  One program holds BLOCK_M whole rows in
registers (BLOCK_K = next power of two >= K, so K <= MAX_K): it reads x once, computes the
fp32 LayerNorm (two-pass mean / variance over the registers, no second read of x), and
from that same y the scale and zero point (dynamic min/max of the non-outliers, or the
static per-position entry), the codes (int8, or packed int4), the row sum, and the outlier
list.  Only the codes and the small per-row outputs are written; y never is.

Exactness: the LayerNorm is not torch's operation for operation, so y differs from the
reference's in the last places (reference.layernorm_error_bound gives the contract); the
quantization of y is exact (correctly rounded fp32 division, round half to even), so the
outputs are bit for bit reference.per_token_quantize(y).  The row statistics are summed
in float64 and the kernel runs with fp-contraction off, so y depends on x, weight, bias
and eps alone, not on the tile, the layout Triton picks or the other arguments: the tests
read y back through the outlier list of one call and check the codes of another.

Errors (non-finite x, LayerNorm overflow, bad static scales / zero points, a row with
more than C outliers) are raised by the launcher from a status word the kernel writes:
one 8-byte device-to-host copy per call, which blocks the host until the kernel has run.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import (FP32_MAX, check_device, check_static_scales, code_container, int_pairs_to_nibbles,
                     is_interpreted, nonempty, round_half_even)

# status word bits (globals read by a kernel must be tl.constexpr)
X_NONFINITE, BAD_SCALE, BAD_ZERO, Y_NONFINITE = 1, 2, 4, 8
_X_NONFINITE = tl.constexpr(X_NONFINITE)
_BAD_SCALE = tl.constexpr(BAD_SCALE)
_BAD_ZERO = tl.constexpr(BAD_ZERO)
_Y_NONFINITE = tl.constexpr(Y_NONFINITE)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_K = 16384   # a row must fit one program's registers
FP32_MAX_C = tl.constexpr(FP32_MAX)


@triton.jit
def _layernorm_quantize_kernel(
        x_ptr, stride_xm, stride_xk, w_ptr, b_ptr, eps, scale_in_ptr, zero_in_ptr, T,
        codes_ptr, scale_ptr, zero_ptr, rowsum_ptr, oidx_ptr, oval_ptr, ocount_ptr, status_ptr,
        M, K, threshold, C,
        BITS: tl.constexpr, STATIC: tl.constexpr, OUTLIERS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    LEVELS: tl.constexpr = (1 << BITS) - 1
    HALF: tl.constexpr = 1 << (BITS - 1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < K
    ok = row_ok[:, None] & col_ok[None, :]

    # LayerNorm in fp32, the whole row in registers
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xk, mask=ok, other=0.0)
    x = x.to(tl.float32)
    x_bad = tl.sum((ok & ~(tl.abs(x) <= FP32_MAX_C)).to(tl.int32), axis=1)
    # statistics in float64: a float64 sum of fp32 values (and of their exact squares) does
    # not depend on the reduction order except in ties far below fp32 resolution, so y
    # below is a function of x, weight, bias and eps alone, whatever the tile or layout
    mean = (tl.sum(x.to(tl.float64), axis=1) / K).to(tl.float32)
    d = tl.where(ok, x - mean[:, None], 0.0)
    d64 = d.to(tl.float64)
    var = tl.sum(d64 * d64, axis=1) / K
    rstd = (1.0 / tl.sqrt(var + eps)).to(tl.float32)     # float64 sqrt is correctly rounded
    gamma = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    beta = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = (d * rstd[:, None]) * gamma[None, :] + beta[None, :]
    y = tl.where(ok, y, 0.0)
    y_bad = tl.sum((ok & ~(tl.abs(y) <= FP32_MAX_C)).to(tl.int32), axis=1)

    if OUTLIERS:
        is_out = ok & (tl.abs(y) > threshold)
        dense = tl.where(is_out, 0.0, y)
    else:
        dense = y
    flags = 0
    if STATIC:
        t = rows % T
        s = tl.load(scale_in_ptr + t, mask=row_ok, other=1.0)
        zc = tl.load(zero_in_ptr + t, mask=row_ok, other=0)
        bad_s = row_ok & ~((s > 0.0) & (s <= FP32_MAX_C))
        bad_z = row_ok & ((zc < -HALF) | (zc > HALF - 1))
        flags = flags | tl.where(tl.max(bad_s.to(tl.int32), axis=0) > 0, _BAD_SCALE, 0)
        flags = flags | tl.where(tl.max(bad_z.to(tl.int32), axis=0) > 0, _BAD_ZERO, 0)
        zu = (zc + HALF).to(tl.float32)
    else:
        # min/max of the dense part, widened to contain 0 (padding is 0 too)
        lo = tl.minimum(tl.min(dense, axis=1), 0.0)
        hi = tl.maximum(tl.max(dense, axis=1), 0.0)
        rng = hi - lo
        s = tl.where(rng > 0.0, tl.math.div_rn(rng, tl.full([BLOCK_M], LEVELS, tl.float32)), 1.0)
        zu = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(-lo, s)), 0.0), LEVELS)

    q = round_half_even(tl.math.div_rn(dense, s[:, None])) + zu[:, None]
    q = tl.minimum(tl.maximum(q, 0.0), LEVELS)
    if OUTLIERS:
        q = tl.where(is_out, zu[:, None], q)     # adds exactly 0 to the integer product
    c = tl.where(ok, q.to(tl.int32) - HALF, 0)
    if BITS == 8:
        tl.store(codes_ptr + rows64[:, None] * K + cols[None, :], c.to(tl.int8), mask=ok)
    else:
        pairs = tl.arange(0, BLOCK_K // 2)
        tl.store(codes_ptr + rows64[:, None] * (K // 2) + pairs[None, :],
                 int_pairs_to_nibbles(c, BLOCK_M, BLOCK_K // 2),
                 mask=row_ok[:, None] & (pairs < K // 2)[None, :])
    tl.store(scale_ptr + rows, s, mask=row_ok)
    tl.store(zero_ptr + rows, zu.to(tl.int32) - HALF, mask=row_ok)
    tl.store(rowsum_ptr + rows, tl.sum(c, axis=1), mask=row_ok)

    if OUTLIERS:
        # slot = number of outliers to the left in the row; slots >= C are dropped here
        # and reported through the count (the launcher raises)
        hit = is_out.to(tl.int32)
        slot = tl.cumsum(hit, axis=1) - 1
        keep = is_out & (slot < C)
        dst = rows64[:, None] * C + slot
        tl.store(oidx_ptr + dst, tl.broadcast_to(cols[None, :], [BLOCK_M, BLOCK_K]), mask=keep)
        tl.store(oval_ptr + dst, y, mask=keep)
        count = tl.sum(hit, axis=1)
        tl.store(ocount_ptr + rows, count, mask=row_ok)
        tl.atomic_max(status_ptr + 1, tl.max(tl.where(row_ok, count, 0), axis=0))

    flags = flags | tl.where(tl.max(x_bad, axis=0) > 0, _X_NONFINITE, 0)
    flags = flags | tl.where(tl.max(y_bad, axis=0) > 0, _Y_NONFINITE, 0)
    tl.atomic_or(status_ptr, flags)


def _blocks(K: int, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps), from K alone (so every call reduces in one order):
    about 4k elements per program on a GPU (8 warps), 16k under the interpreter."""
    bk = max(16, triton.next_power_of_2(max(K, 1)))
    if interpreted:
        return max(1, min(64, 16384 // bk)), bk, 4
    bm = max(1, min(16, 4096 // bk))
    # ~16 elements per thread: the outlier variant keeps a dozen row-sized values live
    return bm, bk, max(4, min(16, bm * bk // 512))



def layernorm_quantize(x, weight, bias, eps, bits, scale=None, zero=None, outlier_threshold=None, max_outliers=0):
    """Triton version of reference.layernorm_quantize (same outputs, same errors).

    x: fp16/bf16/fp32 [M, K], any strides; weight, bias: float [K].  One small sync (module doc).
    """
    op = "layernorm_quantize"
    packed = code_container(op, "bits", bits) == 4     # 3-bit codes are packed like 4-bit
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{op}: x must be a 2-D tensor [M, K], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    M, K = x.shape
    for name, t in (("weight", weight), ("bias", bias)):
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a float tensor, got {t.dtype}")
        if tuple(t.shape) != (K,):
            raise ValueError(f"{op}: {name} must have shape [{K}], got {tuple(t.shape)}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{op}: eps must be finite and > 0, got {eps}")
    if packed and K % 2:
        raise ValueError(f"{op}: {bits}-bit codes are packed in pairs along K; K={K} is odd")
    if K > MAX_K:
        raise ValueError(f"{op}: K={K} > {MAX_K}: the Triton kernel keeps a whole row in registers")
    if max_outliers < 0:
        raise ValueError(f"{op}: max_outliers must be >= 0, got {max_outliers}")
    if outlier_threshold is None and max_outliers != 0:
        raise ValueError(f"{op}: max_outliers > 0 needs an outlier_threshold")
    T = check_static_scales(op, scale, zero, M)
    static = T > 0
    device = check_device(_layernorm_quantize_kernel, op, x=x, weight=weight, bias=bias, scale=scale, zero=zero)

    C = int(max_outliers)
    codes = torch.empty((M, K // 2) if packed else (M, K), dtype=torch.uint8 if packed else torch.int8,
                        device=device)
    s_out = torch.empty(M, dtype=torch.float32, device=device)
    z_out = torch.empty(M, dtype=torch.int32, device=device)
    rowsum = torch.empty(M, dtype=torch.int32, device=device)
    idx = torch.zeros((M, C), dtype=torch.int32, device=device)    # unused slots: idx 0, val 0.0
    val = torch.zeros((M, C), dtype=torch.float32, device=device)
    count = torch.zeros(M, dtype=torch.int32, device=device)
    if M == 0:
        return codes, s_out, z_out, rowsum, idx, val, count

    if static:
        scale_in, zero_in = scale.contiguous(), zero.contiguous()
    else:
        T, scale_in, zero_in = 1, s_out, z_out     # not read by the dynamic variant
    status = torch.zeros(2, dtype=torch.int32, device=device)
    interpreted = is_interpreted(_layernorm_quantize_kernel)
    block_m, block_k, warps = _blocks(K, interpreted)
    outliers = outlier_threshold is not None
    _layernorm_quantize_kernel[(triton.cdiv(M, block_m),)](
        nonempty(x), x.stride(0), x.stride(1), weight.contiguous(), bias.contiguous(), float(eps),
        scale_in, zero_in, T,
        nonempty(codes), s_out, z_out, rowsum, nonempty(idx), nonempty(val), count, status,
        M, K, float(outlier_threshold) if outliers else 0.0, C,
        BITS=bits, STATIC=static, OUTLIERS=outliers, BLOCK_M=block_m, BLOCK_K=block_k,
        num_warps=warps, enable_fp_fusion=False)

    flags, max_count = status.tolist()          # the one sync of this op
    if flags & X_NONFINITE:
        raise ValueError(f"{op}: x contains NaN or Inf; quantization is undefined for non-finite values")
    if flags & Y_NONFINITE:
        raise ValueError(f"{op}: LayerNorm(x) overflows fp32 (weight or bias too large)")
    if flags & BAD_SCALE:
        raise ValueError(f"{op}: static scales must be finite and > 0")
    if flags & BAD_ZERO:
        half = 1 << (bits - 1)
        raise ValueError(f"{op}: static zero points must lie in [{-half}, {half - 1}]")
    if outliers and max_count > C:
        row = int(count.argmax())
        raise ValueError(f"{op}: row {row} has {int(count[row])} outliers but max_outliers={C}; "
                         "raise max_outliers (or the outlier threshold)")
    return codes, s_out, z_out, rowsum, idx, val, count


__all__ = ["layernorm_quantize"]
