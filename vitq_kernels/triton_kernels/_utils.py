"""Pieces shared by the Triton kernels: exact rounding, int4 nibbles, launcher checks."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import ACT_BITS, container_bits

# Largest finite fp32; |x| <= FP32_MAX is false for NaN and +-Inf, so it tests finiteness
# without relying on x - x == 0 (which fast-math could fold away).
FP32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def round_half_even(x):
    """torch.round for fp32: round half to even, exact and portable.

    libdevice.rint does not run under TRITON_INTERPRET, so use the 2^23 trick: for
    0 <= a < 2^23, a + 2^23 lies in [2^23, 2^24) where the fp32 spacing is 1, so the
    add itself rounds a to an integer with the IEEE default mode (half to even), and
    subtracting 2^23 back is exact.  Values with |x| >= 2^23 are already integers.
    """
    two23 = 8388608.0
    ax = tl.abs(x)
    r = (ax + two23) - two23
    r = tl.where(x < 0, -r, r)
    return tl.where(ax < two23, r, x)


@triton.jit
def nibbles_to_int8(packed):
    """uint8 [..., H] -> int8 [..., 2H]: low nibble is element 2j, high nibble 2j+1."""
    v = packed.to(tl.int32)                 # zero-extends the byte
    lo = ((v & 0xF) ^ 8) - 8                # sign-extend a two's complement nibble
    hi = (((v >> 4) & 0xF) ^ 8) - 8
    return tl.interleave(lo, hi).to(tl.int8)


@triton.jit
def int_pairs_to_nibbles(codes, ROWS: tl.constexpr, PAIRS: tl.constexpr):
    """int32 codes [ROWS, 2*PAIRS] in [-8, 7] (3- or 4-bit) -> uint8 [ROWS, PAIRS], element 2j low."""
    lo, hi = tl.split(tl.reshape(codes, [ROWS, PAIRS, 2]))
    return ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)


def code_container(op: str, what: str, bits: int) -> int:
    """Checks a uniform code width (reference.ACT_BITS) and returns its storage container:
    4 (packed, two codes per byte: 3- and 4-bit codes) or 8 (int8).  GEMM kernels are
    specialised on the container only, so 3-bit codes run the int4 variants unchanged."""
    if bits not in ACT_BITS:
        raise ValueError(f"{op}: {what} must be one of {ACT_BITS}, got {bits}")
    return container_bits(bits)


def is_interpreted(kernel) -> bool:
    """True when @triton.jit produced an interpreter function (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(kernel, InterpretedFunction)


def check_device(kernel, op: str, **tensors) -> torch.device:
    """All tensors on one device; CUDA, or CPU only under the Triton interpreter."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{op}: all tensors must be on one device, but {name} is on {dev} "
                             f"and others on {first}")
    if first.type == "cpu" and not is_interpreted(kernel):
        raise ValueError(f"{op}: the Triton kernels need CUDA tensors (CPU tensors run only with "
                         "TRITON_INTERPRET=1 set before import; use torch.ops.vitq.* for the C++ CPU kernels)")
    if first.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: unsupported device {first}")
    return first


def check_dtype(op: str, name: str, t: torch.Tensor, dtypes) -> None:
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must be {allowed}, got {t.dtype}")


def check_vector(op: str, name: str, t: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D per-row / per-column vector of the given length and dtype, made contiguous."""
    check_dtype(op, name, t, (dtype,))
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{op}: {name} must have shape [{length}], got {tuple(t.shape)}")
    return t.contiguous()
