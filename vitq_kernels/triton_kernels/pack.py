"""int4 packing: two signed 4-bit codes per byte along the last dimension (reference.pack_int4).

The last dimension is even, so in a contiguous tensor every pair (2j, 2j+1) of one row is
also a pair of the flattened tensor: both kernels work on the flat buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_device, int_pairs_to_nibbles, nibbles_to_int8

_BLOCK = 1024          # bytes per program


@triton.jit
def _pack_int4_kernel(codes_ptr, packed_ptr, bad_ptr, n_bytes, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start * 2 + tl.arange(0, 2 * BLOCK)
    codes = tl.load(codes_ptr + offs, mask=offs < n_bytes * 2, other=0).to(tl.int32)
    # out-of-range codes are counted, not clamped; the launcher turns a count > 0 into an error
    n_bad = tl.sum(((codes < -8) | (codes > 7)).to(tl.int32), axis=0)
    tl.atomic_add(bad_ptr, n_bad)
    packed = tl.reshape(int_pairs_to_nibbles(tl.reshape(codes, [1, 2 * BLOCK]), 1, BLOCK), [BLOCK])
    out = start + tl.arange(0, BLOCK)
    tl.store(packed_ptr + out, packed, mask=out < n_bytes)


@triton.jit
def _unpack_int4_kernel(packed_ptr, codes_ptr, n_bytes, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    packed = tl.load(packed_ptr + offs, mask=offs < n_bytes, other=0)
    codes = nibbles_to_int8(packed)
    out = start * 2 + tl.arange(0, 2 * BLOCK)
    tl.store(codes_ptr + out, codes, mask=out < n_bytes * 2)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], [..., K] with K even -> uint8 [..., K/2].

    A non-contiguous input is copied first.  Checking the code range costs one 4-byte
    device-to-host copy (a sync); packing happens once per weight, off the hot path.
    """
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"pack_int4: codes must be a tensor, got {type(codes).__name__}")
    if codes.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 codes, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("pack_int4 needs a tensor with at least one dimension")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {codes.shape[-1]}")
    check_device(_pack_int4_kernel, "pack_int4", codes=codes)
    out = torch.empty((*codes.shape[:-1], codes.shape[-1] // 2), dtype=torch.uint8, device=codes.device)
    n_bytes = out.numel()
    if n_bytes == 0:
        return out
    codes = codes.contiguous()
    bad = torch.zeros(1, dtype=torch.int32, device=codes.device)
    _pack_int4_kernel[(triton.cdiv(n_bytes, _BLOCK),)](codes, out, bad, n_bytes, BLOCK=_BLOCK)
    n_bad = int(bad.item())
    if n_bad:
        raise ValueError(f"pack_int4: {n_bad} codes outside the signed 4-bit range [-8, 7]")
    return out


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int8 codes in [-8, 7], [..., K].  Non-contiguous input is copied."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"unpack_int4: packed must be a tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("unpack_int4 needs a tensor with at least one dimension")
    check_device(_unpack_int4_kernel, "unpack_int4", packed=packed)
    out = torch.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=torch.int8, device=packed.device)
    n_bytes = packed.numel()
    if n_bytes == 0:
        return out
    packed = packed.contiguous()
    _unpack_int4_kernel[(triton.cdiv(n_bytes, _BLOCK),)](packed, out, n_bytes, BLOCK=_BLOCK)
    return out


__all__ = ["pack_int4", "unpack_int4"]
