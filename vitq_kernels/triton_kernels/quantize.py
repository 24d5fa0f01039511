"""Per-token (per-patch) asymmetric activation quantization with the POQ outlier split.

Semantics: reference.per_token_quantize.  One program quantizes BLOCK_M rows.  Dynamic
scales take two passes over a row (min/max, then codes); static scales take one.  Every
division is a correctly rounded fp32 division (tl.math.div_rn) and rounding is half to
even, so codes, scales and zero points match the reference bit for bit.

Outliers (|x| > threshold) are written to a fixed-capacity list per row, in increasing
column order: a running per-row count plus a prefix sum over each chunk gives every
outlier its slot.  The kernel always writes the true count, also past the capacity C, and
raises status flags for non-finite x and invalid static scales / zero points.  The
launcher reads those flags and the largest count in one 8-byte device-to-host copy: this
sync is what lets bad input raise a Python error instead of producing silent garbage, and
it blocks the host until the kernel has run (so the op cannot be captured in a CUDA graph).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (FP32_MAX, check_device, check_static_scales, code_container, int_pairs_to_nibbles,
                     is_interpreted, nonempty, round_half_even)

# status[0] bits (constexpr so that the kernel may read them)
_NONFINITE = tl.constexpr(1)
_BAD_SCALE = tl.constexpr(2)
_BAD_ZERO = tl.constexpr(4)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _per_token_quantize_kernel(
        x_ptr, stride_xm, stride_xk, scale_in_ptr, zero_in_ptr, T,
        codes_ptr, scale_ptr, zero_ptr, rowsum_ptr, oidx_ptr, oval_ptr, ocount_ptr, status_ptr,
        M, K, threshold, C,
        BITS: tl.constexpr, STATIC: tl.constexpr, OUTLIERS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    LEVELS: tl.constexpr = (1 << BITS) - 1
    HALF: tl.constexpr = 1 << (BITS - 1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    x_rows = x_ptr + rows64[:, None] * stride_xm
    ks = tl.arange(0, BLOCK_K)
    flags = 0

    if STATIC:
        t = rows % T
        s = tl.load(scale_in_ptr + t, mask=row_ok, other=1.0)
        zc = tl.load(zero_in_ptr + t, mask=row_ok, other=0)
        bad_s = row_ok & ~((s > 0.0) & (s <= FP32_MAX))
        bad_z = row_ok & ((zc < -HALF) | (zc > HALF - 1))
        flags = flags | tl.where(tl.max(bad_s.to(tl.int32), axis=0) > 0, _BAD_SCALE, 0)
        flags = flags | tl.where(tl.max(bad_z.to(tl.int32), axis=0) > 0, _BAD_ZERO, 0)
        zu = (zc + HALF).to(tl.float32)
    else:
        # range of the dense part, widened to contain 0 (outliers count as 0 here)
        # (elementwise accumulators reduced after the loop: a loop-carried `acc = acc op
        # reduce(x)` trips an assertion in Triton 3.8's OptimizeThreadLocality pass)
        lo2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        hi2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + ks
            ok = row_ok[:, None] & (cols < K)[None, :]
            x = tl.load(x_rows + cols[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32)
            if OUTLIERS:
                x = tl.where(tl.abs(x) > threshold, 0.0, x)
            lo2 = tl.minimum(lo2, x)
            hi2 = tl.maximum(hi2, x)
        lo = tl.min(lo2, axis=1)
        hi = tl.max(hi2, axis=1)
        rng = hi - lo
        s = tl.where(rng > 0.0, tl.math.div_rn(rng, tl.full([BLOCK_M], LEVELS, tl.float32)), 1.0)
        zu = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(-lo, s)), 0.0), LEVELS)

    rowsum2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
    hits2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)        # outliers seen per lane
    nonfinite2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + ks
        ok = row_ok[:, None] & (cols < K)[None, :]
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32)
        nonfinite2 |= (ok & ~(tl.abs(x) <= FP32_MAX)).to(tl.int32)
        q = round_half_even(tl.math.div_rn(x, s[:, None])) + zu[:, None]
        q = tl.minimum(tl.maximum(q, 0.0), LEVELS)
        if OUTLIERS:
            is_out = ok & (tl.abs(x) > threshold)
            q = tl.where(is_out, zu[:, None], q)   # adds exactly 0 to the integer product
        c = q.to(tl.int32) - HALF
        rowsum2 += tl.where(ok, c, 0)
        if BITS == 8:
            tl.store(codes_ptr + rows64[:, None] * K + cols[None, :], c.to(tl.int8), mask=ok)
        else:
            pairs = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            tl.store(codes_ptr + rows64[:, None] * (K // 2) + pairs[None, :],
                     int_pairs_to_nibbles(c, BLOCK_M, BLOCK_K // 2),
                     mask=row_ok[:, None] & (pairs < K // 2)[None, :])
        if OUTLIERS:
            hit = is_out.to(tl.int32)
            seen = tl.sum(hits2, axis=1)                 # outliers in earlier chunks
            slot = seen[:, None] + tl.cumsum(hit, axis=1) - 1
            keep = is_out & (slot < C)
            dst = rows64[:, None] * C + slot
            tl.store(oidx_ptr + dst, tl.broadcast_to(cols[None, :], [BLOCK_M, BLOCK_K]), mask=keep)
            tl.store(oval_ptr + dst, x, mask=keep)
            hits2 += hit

    rowsum = tl.sum(rowsum2, axis=1)
    if OUTLIERS:
        count = tl.sum(hits2, axis=1)
        # unused slots hold idx 0, val 0.0 so consumers may sum all C slots
        for c0 in range(0, C, BLOCK_C):
            slots = c0 + tl.arange(0, BLOCK_C)
            pad = row_ok[:, None] & (slots[None, :] >= count[:, None]) & (slots < C)[None, :]
            dst = rows64[:, None] * C + slots[None, :]
            tl.store(oidx_ptr + dst, tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.int32), mask=pad)
            tl.store(oval_ptr + dst, tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32), mask=pad)
        tl.store(ocount_ptr + rows, count, mask=row_ok)
        tl.atomic_max(status_ptr + 1, tl.max(tl.where(row_ok, count, 0), axis=0))

    tl.store(scale_ptr + rows, s, mask=row_ok)
    tl.store(zero_ptr + rows, zu.to(tl.int32) - HALF, mask=row_ok)
    tl.store(rowsum_ptr + rows, rowsum, mask=row_ok)
    flags = flags | tl.where(tl.max(tl.max(nonfinite2, axis=1), axis=0) > 0, _NONFINITE, 0)
    tl.atomic_or(status_ptr, flags)


def _blocks(K: int, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps).  GPU: a whole ViT row (K <= 2048) per chunk, 8
    elements per thread (with outliers the kernel needs ~18 registers per element);
    interpreter: bigger blocks and fewer programs."""
    bk = max(64, triton.next_power_of_2(max(K, 1)))
    if interpreted:
        return 32, min(bk, 256), 4
    bk = min(bk, 2048)
    bm = max(1, 1024 // bk)
    return bm, bk, max(4, bm * bk // 256)



def per_token_quantize(x, bits, scale=None, zero=None, outlier_threshold=None, max_outliers=0):
    """Triton version of reference.per_token_quantize (same outputs, same errors).

    x: fp16/bf16/fp32/fp64 [M, K], any strides.  Costs one small sync (see module doc).
    """
    op = "per_token_quantize"
    packed = code_container(op, "bits", bits) == 4     # 3-bit codes are packed like 4-bit
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{op}: x must be a 2-D tensor [M, K], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be a float tensor, got {x.dtype}")
    M, K = x.shape
    if packed and K % 2:
        raise ValueError(f"{op}: {bits}-bit codes are packed in pairs along K; K={K} is odd")
    if max_outliers < 0:
        raise ValueError(f"{op}: max_outliers must be >= 0, got {max_outliers}")
    if outlier_threshold is None and max_outliers != 0:
        raise ValueError(f"{op}: max_outliers > 0 needs an outlier_threshold")
    # the op's contract on every backend (C++ CPU, CUDA): float32 / int32, 1-D, T tiles M
    T = check_static_scales(op, scale, zero, M)
    static = T > 0
    device = check_device(_per_token_quantize_kernel, op, x=x, scale=scale, zero=zero)

    C = int(max_outliers)
    codes = torch.empty((M, K // 2) if packed else (M, K), dtype=torch.uint8 if packed else torch.int8,
                        device=device)
    s_out = torch.empty(M, dtype=torch.float32, device=device)
    z_out = torch.empty(M, dtype=torch.int32, device=device)
    rowsum = torch.empty(M, dtype=torch.int32, device=device)
    idx = torch.empty((M, C), dtype=torch.int32, device=device)
    val = torch.empty((M, C), dtype=torch.float32, device=device)
    outliers = outlier_threshold is not None
    count = (torch.empty if outliers else torch.zeros)(M, dtype=torch.int32, device=device)
    if M == 0:
        return codes, s_out, z_out, rowsum, idx, val, count

    if static:
        scale_in, zero_in = scale.contiguous(), zero.contiguous()
    else:
        T, scale_in, zero_in = 1, s_out, z_out     # not read by the dynamic kernel
    status = torch.zeros(2, dtype=torch.int32, device=device)
    interpreted = is_interpreted(_per_token_quantize_kernel)
    block_m, block_k, warps = _blocks(K, interpreted)
    block_c = min(64, triton.next_power_of_2(max(C, 1)))
    threshold = float(outlier_threshold) if outliers else 0.0
    _per_token_quantize_kernel[(triton.cdiv(M, block_m),)](
        nonempty(x), x.stride(0), x.stride(1), scale_in, zero_in, T,
        nonempty(codes), s_out, z_out, rowsum, nonempty(idx), nonempty(val), count, status,
        M, K, threshold, C,
        BITS=bits, STATIC=static, OUTLIERS=outliers,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_C=block_c, num_warps=warps)

    flags, max_count = status.tolist()          # the one sync of this op
    if flags & _NONFINITE.value:
        raise ValueError(f"{op}: x contains NaN or Inf; quantization is undefined for non-finite values")
    if flags & _BAD_SCALE.value:
        raise ValueError(f"{op}: static scales must be finite and > 0")
    if flags & _BAD_ZERO.value:
        half = 1 << (bits - 1)
        raise ValueError(f"{op}: static zero points must lie in [{-half}, {half - 1}]")
    if outliers and max_count > C:
        row = int(count.argmax())
        raise ValueError(f"{op}: row {row} has {int(count[row])} outliers but max_outliers={C}; "
                         "raise max_outliers (or the outlier threshold)")
    return codes, s_out, z_out, rowsum, idx, val, count


__all__ = ["per_token_quantize"]
