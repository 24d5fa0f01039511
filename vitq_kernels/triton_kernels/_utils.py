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


def code_matrix_width(op: str, name: str, t, bits: int) -> int:
    """K of a uniform code matrix: int8 [R, K], or packed uint8 [R, K/2] for 3- and 4-bit codes."""
    packed = code_container(op, f"{name}_bits", bits) == 4
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{op}: {name} must be a 2-D tensor")
    check_dtype(op, f"{name} ({bits}-bit codes)", t, (torch.uint8,) if packed else (torch.int8,))
    return t.shape[1] * (2 if packed else 1)


def nonempty(t: torch.Tensor) -> torch.Tensor:
    """t, or a one-element stand-in when t is empty: a zero-size tensor may have no valid
    address, and the kernels never read it then."""
    return t if t.numel() else torch.empty(1, dtype=t.dtype, device=t.device)


def autotune_config(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order: GROUP_M row-tiles in a row share each
    weight tile while it is in L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows_in_group, (pid % per_group) // rows_in_group


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


def check_static_scales(op: str, scale, zero, M: int) -> int:
    """The static (per-position) scale/zero of the row quantizers, checked as the C++ backends
    check them (csrc/cpu/quantize_row.h): both or neither, float32/int32, 1-D, one length T that
    tiles the M rows.  Returns T, or 0 for dynamic scales.  Their values are checked in-kernel."""
    if scale is None:
        if zero is not None:
            raise ValueError(f"{op}: zero given without scale")
        return 0
    if zero is None:
        raise ValueError(f"{op}: static scale needs a zero point")
    if scale.dtype != torch.float32:
        raise TypeError(f"{op}: static scale must be float32, got {scale.dtype}")
    if zero.dtype != torch.int32:
        raise TypeError(f"{op}: static zero must be int32, got {zero.dtype}")
    if scale.dim() != 1 or zero.dim() != 1:
        raise ValueError(f"{op}: static scale and zero must be 1-D, got shapes {tuple(scale.shape)} "
                         f"and {tuple(zero.shape)}")
    T = scale.numel()
    if T == 0 or M % T or zero.numel() != T:
        raise ValueError(f"{op}: static scale/zero of length {T}/{zero.numel()} do not tile M={M} rows")
    return T
