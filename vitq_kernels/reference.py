"""The one spec of vitq's math, in plain PyTorch.

Every kernel (C++ CPU, Triton, CUDA) and every fake quantizer of the calibration
layer is tested against the functions in this file.  Equation numbers refer to
ADFQ-ViT (Jiang et al., 2025; seed 002).

Formats
-------
* **Activation codes** (eq. 16-17, per token = per patch, asymmetric).
  Row i of x[M, K] has

      lo_i = min(0, min_k x_ik),  hi_i = max(0, max_k x_ik)   (outliers excluded)
      s_i  = (hi_i - lo_i) / (2^b - 1)        (s_i = 1 when hi_i == lo_i, i.e. an all-zero row)
      z_i  = round(-lo_i / s_i)               in [0, 2^b - 1]
      q_ik = clamp(round(x_ik / s_i) + z_i, 0, 2^b - 1)

  The range is widened to contain 0 (as torch's observers do): 0 is then exactly
  representable, z_i is always a valid code, and an outlier can be given the code
  z_i so that it adds exactly 0 to the dense product.  Rounding is half-to-even
  (``torch.round``); every division is an IEEE fp32 division (kernels must use a
  correctly rounded divide, not an approximate reciprocal).

  Codes are stored **signed**: ``c = q - 2^(b-1)`` (int8), and so is the zero point
  ``zc = z - 2^(b-1)``; dequantization is ``s * (c - zc)``, identical to ``s * (q - z)``.
  The signed form lets int8 tensor cores (s8 x s8 -> s32) consume the codes directly.

* **Static scales** (calibrated): ``scale``/``zero`` of length T with M % T == 0;
  row i uses entry i % T.  T == 1 is per-tensor, T == tokens is the per-position
  (per-patch) scale of the public ADFQ-ViT code.

* **Outliers** (eq. 18, POQ): entries with |x_ik| > alpha are removed from the row's
  min/max, get the dense code z_i (so they contribute exactly 0 to the integer
  product), and are kept in full precision in a *fixed-capacity list per row*:
  ``outlier_idx`` int32[M, C] (column k), ``outlier_val`` float32[M, C] (x_ik),
  ``outlier_count`` int32[M].  Entries are in increasing column order; unused slots
  hold idx 0 and val 0.0 so a kernel may sum over all C slots without branching.
  A row with more than C outliers is an error (``ValueError``), never a silent drop.
  NaN/Inf in x is an error.

* **int4 packing**: two signed 4-bit codes per byte along K, element 2j in the low
  nibble, element 2j+1 in the high nibble (two's complement nibbles).  Packed
  tensors are uint8 [.., K/2]; K must be even.

* **Weights** (per output channel j): signed codes w[N, K] (int8, or packed int4),
  fp32 scale sw_j and int32 signed-domain zero point zw_j (0 for symmetric weights),
  plus ``w_colsum_j = sum_k w_jk`` precomputed once at pack time.

qgemm
-----
With A = activation codes (zero za_i, scale s_i, row sums ra_i = sum_k a_ik) and
W = weight codes (zero zw_j, scale sw_j, col sums rw_j):

    acc_ij = sum_k a_ik w_jk                               (exact, int32)
           - za_i rw_j - zw_j ra_i + K za_i zw_j           (= sum_k (a_ik - za_i)(w_jk - zw_j))
    o_ij   = sum_c outlier_val_ic * (w_{j, outlier_idx_ic} - zw_j)      (fp32, c = 0..C-1 in order)
    y_ij   = sw_j * (s_i * float(acc_ij) + o_ij) + bias_j

computed in fp32 and cast to the output dtype.  Every intermediate integer fits in
int32 for K <= 2^16 at 8 bit (|a - za| <= 255, |w - zw| <= 255 for K <= 32768).
"""
from __future__ import annotations

import torch

ACT_BITS = (4, 8)
WEIGHT_BITS = (3, 4, 8)


# ---------------------------------------------------------------------------
# checks shared by every implementation (the C++ kernels raise the same errors)
# ---------------------------------------------------------------------------
def check_bits(bits: int, allowed=ACT_BITS, what: str = "bits") -> None:
    if bits not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {bits}")


def check_finite(x: torch.Tensor, what: str = "x") -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or Inf; quantization is undefined for non-finite values")


def qmin_qmax(bits: int) -> tuple[int, int]:
    """Range of the *signed* stored codes for a b-bit quantizer."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


# ---------------------------------------------------------------------------
# int4 packing
# ---------------------------------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], shape [..., K] (K even) -> uint8 [..., K/2]."""
    if codes.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {codes.shape[-1]}")
    if codes.numel() and (codes.min() < -8 or codes.max() > 7):
        raise ValueError("pack_int4: codes outside the signed 4-bit range [-8, 7]")
    nib = codes.to(torch.int16) & 0xF
    packed = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return packed.to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int8 codes in [-8, 7], shape [..., K]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {packed.dtype}")
    p = packed.to(torch.int16)
    lo = p & 0xF
    hi = (p >> 4) & 0xF
    both = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


# ---------------------------------------------------------------------------
# per-token (per-patch) activation quantization, eq. 16-20
# ---------------------------------------------------------------------------
def uniform_scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and (unsigned) zero point from a range that contains 0.

    lo <= 0 <= hi elementwise.  Returns fp32 scale and int32 zero point in [0, 2^b-1].
    """
    levels = float((1 << bits) - 1)
    lo = lo.float()
    hi = hi.float()
    rng = hi - lo
    scale = torch.where(rng > 0, rng / levels, torch.ones_like(rng))
    zero = torch.round(-lo / scale).clamp(0, levels).to(torch.int32)
    return scale, zero


def quantize_rows(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes q = clamp(round(x / s) + z, 0, 2^b - 1) with per-row s, z. Returns int32."""
    levels = (1 << bits) - 1
    q = torch.round(x.float() / scale.float()[:, None]) + zero.float()[:, None]
    return q.clamp(0, levels).to(torch.int32)


def outlier_mask(x: torch.Tensor, threshold: float | None) -> torch.Tensor:
    if threshold is None:
        return torch.zeros_like(x, dtype=torch.bool)
    return x.float().abs() > threshold


def extract_outliers(x: torch.Tensor, mask: torch.Tensor, capacity: int):
    """Fixed-capacity outlier list (see module doc). Raises if a row overflows."""
    M, K = x.shape
    count = mask.sum(dim=1).to(torch.int32)
    if M and int(count.max()) > capacity:
        row = int(count.argmax())
        raise ValueError(
            f"row {row} has {int(count[row])} outliers but max_outliers={capacity}; "
            "raise max_outliers (or the outlier threshold)")
    idx = torch.zeros(M, capacity, dtype=torch.int32)
    val = torch.zeros(M, capacity, dtype=torch.float32)
    if capacity and M:
        # stable sort puts the outlier columns first, in increasing column order
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :capacity]
        keep = torch.arange(capacity)[None, :] < count[:, None]
        idx = torch.where(keep, order, torch.zeros_like(order)).to(torch.int32)
        val = torch.where(keep, torch.gather(x.float(), 1, order), torch.zeros_like(order, dtype=torch.float32))
    return idx.to(x.device), val.to(x.device), count.to(x.device)


def per_token_quantize(x: torch.Tensor, bits: int, scale: torch.Tensor | None = None,
                       zero: torch.Tensor | None = None, outlier_threshold: float | None = None,
                       max_outliers: int = 0):
    """Per-token asymmetric quantization with optional outlier split (POQ, eq. 16-20).

    x: float [M, K].  Dynamic scales when ``scale`` is None; else static ``scale`` (fp32[T])
    and ``zero`` (int32[T], signed domain) with M % T == 0, row i using entry i % T.

    Returns (codes, scale, zero, rowsum, outlier_idx, outlier_val, outlier_count):
      codes   int8 [M, K] (bits 8) or uint8 [M, K/2] packed (bits 4), signed-domain
      scale   fp32 [M];  zero int32 [M] (signed domain);  rowsum int32 [M] = sum_k codes_ik
      outliers as in the module doc, C = max_outliers.
    """
    check_bits(bits)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a float tensor, got {x.dtype}")
    if bits == 4 and x.shape[1] % 2:
        raise ValueError(f"4-bit codes are packed in pairs along K; K={x.shape[1]} is odd")
    if outlier_threshold is None and max_outliers != 0:
        raise ValueError("max_outliers > 0 needs an outlier_threshold")
    if max_outliers < 0:
        raise ValueError("max_outliers must be >= 0")
    check_finite(x)
    M, K = x.shape
    xf = x.float()
    half = 1 << (bits - 1)
    mask = outlier_mask(xf, outlier_threshold)
    dense = torch.where(mask, torch.zeros_like(xf), xf)
    if scale is None:
        if zero is not None:
            raise ValueError("zero given without scale")
        lo = dense.amin(dim=1).clamp(max=0) if K else torch.zeros(M)
        hi = dense.amax(dim=1).clamp(min=0) if K else torch.zeros(M)
        s, zu = uniform_scale_zero(lo, hi, bits)
    else:
        if zero is None:
            raise ValueError("static scale needs a zero point")
        T = scale.numel()
        if T == 0 or M % T or zero.numel() != T:
            raise ValueError(f"static scale/zero of length {T}/{zero.numel()} do not tile M={M} rows")
        if not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
            raise ValueError("static scales must be finite and > 0")
        reps = M // T
        s = scale.float().reshape(T).repeat(reps)
        zu = zero.to(torch.int32).reshape(T).repeat(reps) + half
        if bool(((zu < 0) | (zu > 2 * half - 1)).any()):
            raise ValueError(f"static zero points must lie in [{-half}, {half - 1}]")
    q = quantize_rows(dense, s, zu, bits)
    q = torch.where(mask, zu[:, None].expand_as(q), q)
    codes = (q - half).to(torch.int8)
    rowsum = codes.to(torch.int32).sum(dim=1, dtype=torch.int32)
    idx, val, count = extract_outliers(xf, mask, max_outliers)
    if bits == 4:
        codes = pack_int4(codes)
    return codes, s, (zu - half).to(torch.int32), rowsum, idx, val, count


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    outlier_idx: torch.Tensor | None = None, outlier_val: torch.Tensor | None = None):
    """Inverse of per_token_quantize: s_i (c_ik - zc_i), with outliers put back. fp32 [M, K]."""
    c = unpack_int4(codes) if bits == 4 else codes
    x = scale.float()[:, None] * (c.float() - zero.float()[:, None])
    if outlier_idx is not None and outlier_idx.shape[1]:
        # an outlier's dense code is its row's zero point, so the dense part is exactly 0
        # there; padded slots add 0.0 at column 0
        x = x.scatter_add(1, outlier_idx.long(), outlier_val.float())
    return x


# ---------------------------------------------------------------------------
# weights: per-output-channel uniform (sec. 4.1; AdaRound rounding lives in calibration)
# ---------------------------------------------------------------------------
def quantize_weight_per_channel(w: torch.Tensor, bits: int, symmetric: bool = True):
    """Round-to-nearest per-channel quantization of w[N, K].

    Returns (codes int8 [N, K] signed domain, scale fp32 [N], zero int32 [N] signed domain).
    Symmetric: s_j = max|w_j| / (2^(b-1) - 1), zero 0, codes in [-(2^(b-1)-1), 2^(b-1)-1].
    Asymmetric: min/max range containing 0, as for activations.
    """
    check_bits(bits, WEIGHT_BITS, "weight bits")
    wf = w.detach().float()
    half = 1 << (bits - 1)
    if symmetric:
        amax = wf.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / (half - 1), torch.ones_like(amax))
        codes = torch.round(wf / s[:, None]).clamp(-(half - 1), half - 1)
        return codes.to(torch.int8), s, torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    lo = wf.amin(dim=1).clamp(max=0)
    hi = wf.amax(dim=1).clamp(min=0)
    s, zu = uniform_scale_zero(lo, hi, bits)
    q = quantize_rows(wf, s, zu, bits)
    return (q - half).to(torch.int8), s, (zu - half).to(torch.int32)


def weight_colsum(codes: torch.Tensor) -> torch.Tensor:
    """sum_k w_jk of signed codes (int8 [N, K]) -> int32 [N]."""
    return codes.to(torch.int32).sum(dim=1, dtype=torch.int32)


# ---------------------------------------------------------------------------
# qgemm: int GEMM with per-token x per-channel dequant and the fused outlier term
# ---------------------------------------------------------------------------
def qgemm(a: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor, a_rowsum: torch.Tensor,
          w: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, w_colsum: torch.Tensor,
          bias: torch.Tensor | None = None, outlier_idx: torch.Tensor | None = None,
          outlier_val: torch.Tensor | None = None, a_bits: int = 8, w_bits: int = 8,
          out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y = sw_j (s_i acc_ij + o_ij) + bias_j, see the module doc. Returns [M, N] in out_dtype."""
    check_bits(a_bits, ACT_BITS, "a_bits")
    check_bits(w_bits, ACT_BITS, "w_bits")
    ac = unpack_int4(a) if a_bits == 4 else a
    wc = unpack_int4(w) if w_bits == 4 else w
    if ac.dtype != torch.int8 or wc.dtype != torch.int8:
        raise TypeError("codes must be int8 (8 bit) or packed uint8 (4 bit)")
    M, K = ac.shape
    N, Kw = wc.shape
    if K != Kw:
        raise ValueError(f"K mismatch: activations have {K}, weights {Kw}")
    acc = ac.to(torch.int64) @ wc.to(torch.int64).T          # exact; int64 only to use matmul on CPU
    za = a_zero.to(torch.int64)[:, None]
    rw = w_colsum.to(torch.int64)[None, :]
    acc = acc - za * rw
    if w_zero is not None:
        zw = w_zero.to(torch.int64)[None, :]
        acc = acc - zw * a_rowsum.to(torch.int64)[:, None] + K * za * zw
    acc = acc.to(torch.int32)
    y = a_scale.float()[:, None] * acc.float()
    if outlier_idx is not None and outlier_idx.shape[1]:
        wz = (wc.to(torch.int32) - (w_zero.to(torch.int32)[:, None] if w_zero is not None else 0)).float()
        o = torch.zeros(M, N, dtype=torch.float32, device=y.device)
        for c in range(outlier_idx.shape[1]):                 # fixed order: c = 0..C-1
            o = o + outlier_val[:, c:c + 1].float() * wz[:, outlier_idx[:, c].long()].T
        y = y + o
    y = w_scale.float()[None, :] * y
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype)


def linear_reference(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                     w_zero: torch.Tensor | None, bias: torch.Tensor | None, a_bits: int, w_bits: int,
                     outlier_threshold: float | None = None, max_outliers: int = 0,
                     scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Convenience composition: per_token_quantize -> qgemm, for a float x[M, K]."""
    codes, s, z, rs, idx, val, _ = per_token_quantize(x, a_bits, scale, zero, outlier_threshold, max_outliers)
    wp = pack_int4(w_codes) if w_bits == 4 else w_codes
    return qgemm(codes, s, z, rs, wp, w_scale, w_zero, weight_colsum(w_codes), bias,
                 idx if max_outliers else None, val if max_outliers else None, a_bits, w_bits, out_dtype)


# ---------------------------------------------------------------------------
# log2-family quantizers (eq. 13-15 log2; eq. 22-24 Shift-Log2; base sqrt(2) variant)
# ---------------------------------------------------------------------------
# A code c stands for 2^(-c / 2^m): m = 0 is the paper's base-2 quantizer, m = 1 the
# base-sqrt(2) variant of the public ADFQ-ViT code.  The code is computed *exactly* from
# the fp32 bit pattern of y = x / s (no log2 call): with y = 2^e * 1.f,
#     c = round(-2^m log2 y) = -2^m e - #{r : 1.f >= 2^((2r+1) / 2^(m+1))},  r = 0..2^m-1.
# The thresholds are irrational, so no fp32 value is ever a tie; every implementation
# compares the 23 mantissa bits against the same integer table (LOG_MANTISSA_THRESHOLDS).
# Decoding is exponent-field construction: 2^(-c/2^m) = 2^(-(c >> m)) * LOG_MANTISSAS[m][c & (2^m - 1)].

def _mantissa_thresholds(m: int) -> tuple[int, ...]:
    import math
    import struct
    out = []
    for r in range(1 << m):
        t = 2.0 ** ((2 * r + 1) / (1 << (m + 1)))          # in (1, 2)
        f = struct.unpack("<I", struct.pack("<f", t))[0]     # nearest fp32
        if struct.unpack("<f", struct.pack("<I", f))[0] < t:  # smallest fp32 >= t
            f += 1
        out.append(f & 0x7FFFFF)
        assert not math.isnan(t)
    return tuple(out)


LOG_SUBSTEPS = (0, 1, 2)   # m: 1, 2 or 4 codes per octave
LOG_MANTISSA_THRESHOLDS = {m: _mantissa_thresholds(m) for m in LOG_SUBSTEPS}
# fp32 values of 2^(-r / 2^m), r = 0..2^m-1 (the decode table; exact fp32 roundings)
LOG_MANTISSAS = {m: tuple(float(torch.tensor(2.0 ** (-r / (1 << m)), dtype=torch.float32))
                          for r in range(1 << m)) for m in LOG_SUBSTEPS}


def log_code_unclamped(y: torch.Tensor, substeps: int = 0) -> torch.Tensor:
    """round(-2^m log2 y) for fp32 y > 0, exact, as int64.  y <= 0 or subnormal -> +large."""
    if substeps not in LOG_SUBSTEPS:
        raise ValueError(f"substeps must be one of {LOG_SUBSTEPS}, got {substeps}")
    y = y.float().contiguous()
    bits = y.view(torch.int32).to(torch.int64)
    e = ((bits >> 23) & 0xFF) - 127
    mant = bits & 0x7FFFFF
    k = torch.zeros_like(mant)
    for t in LOG_MANTISSA_THRESHOLDS[substeps]:
        k = k + (mant >= t).to(torch.int64)
    c = -(e << substeps) - k
    big = torch.full_like(c, 1 << 20)
    return torch.where((y > 0) & (((bits >> 23) & 0xFF) > 0), c, big)


def log_decode(codes: torch.Tensor, substeps: int = 0) -> torch.Tensor:
    """2^(-c / 2^m) in fp32 for int codes 0 <= c, via the exponent field (c >> m <= 126)."""
    c = codes.to(torch.int32)
    e = c >> substeps
    mant = torch.tensor(LOG_MANTISSAS[substeps], dtype=torch.float32, device=c.device)[c & ((1 << substeps) - 1)]
    pow2 = ((127 - e).clamp(min=0) << 23).view(torch.float32)     # 2^-e, exact for e <= 126
    return pow2 * mant


def log2_quantize(x: torch.Tensor, bits: int, scale: float | torch.Tensor = 1.0, substeps: int = 0,
                  zero_code: bool = True) -> torch.Tensor:
    """Log2 quantizer (eq. 13): codes of x/s, uint8 in [0, 2^b - 1].

    zero_code=True (post-softmax): the top code 2^b-1 means 0, so codes 0..2^b-2 are powers
    and any value whose exact code is >= 2^b-1 (or x <= 0) becomes 0.
    zero_code=False (Shift-Log2): codes clamp at 2^b-1 (eq. 13's clamp), no zero.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"log2 bits must be in 1..8, got {bits}")
    check_finite(x)
    top = (1 << bits) - 1
    y = x.float() / (scale.float() if isinstance(scale, torch.Tensor) else float(scale))
    c = log_code_unclamped(y, substeps)
    return c.clamp(0, top).to(torch.uint8)


def log2_dequantize(codes: torch.Tensor, bits: int, scale: float | torch.Tensor = 1.0, substeps: int = 0,
                    zero_code: bool = True) -> torch.Tensor:
    """Inverse of log2_quantize (eq. 15): s * 2^(-c / 2^m), with the top code = 0 if zero_code."""
    v = log_decode(codes, substeps)
    if zero_code:
        v = torch.where(codes.to(torch.int32) == (1 << bits) - 1, torch.zeros_like(v), v)
    s = scale.float() if isinstance(scale, torch.Tensor) else float(scale)
    return v * s


def shift_log2_quantize(x: torch.Tensor, bits: int, shift: float, scale: float | torch.Tensor,
                        substeps: int = 0) -> torch.Tensor:
    """Shift-Log2 (eq. 22-23) with a static shift = min(X_g) - eps: codes of (x - shift) / s.

    Values at or below the shift (x - shift <= 0, possible at run time) take the top code.
    """
    return log2_quantize(x.float() - float(shift), bits, scale, substeps, zero_code=False)


def shift_log2_dequantize(codes: torch.Tensor, bits: int, shift: float, scale: float | torch.Tensor,
                          substeps: int = 0) -> torch.Tensor:
    """eq. 24: s * 2^(-c) + shift."""
    return log2_dequantize(codes, bits, scale, substeps, zero_code=False) + float(shift)
