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

* **3-bit codes** live in the int4 container (``PACKED_BITS``, ``container_bits``): no
  op has a 3-bit storage format or a 3-bit GEMM of its own.  Per op:
    per_token_quantize / layernorm_quantize, bits=3: the formulas above with b = 3, so
      unsigned q in [0, 7], stored c = q - 4 in [-4, 3], zero point zc in [-4, 3]; the
      codes are packed two per byte exactly like int4 (K even).  A static zero point
      outside [-4, 3] is an error even though the nibble could hold it.
    qgemm a_bits / w_bits = 3: the int4 path, bit for bit: the operand is a packed
      uint8 [.., K/2] and the product is the same exact integer GEMM.  The bit width
      declares the producer's code range; the GEMM does not re-read the codes to check
      it (on a GPU that would cost a sync), and is exact for any nibble values anyway.
      Producers guarantee the range: the quantizers above clamp to [-4, 3], 3-bit
      weights come from quantize_weight_per_channel (symmetric [-3, 3], asymmetric
      [-4, 3]) and the deploy QLinear rejects weight codes outside the declared range.
    shiftlog2 (qgemm_gelu_shiftlog2 out_bits=3, shiftlog2_qgemm bits=3): Shift-Log2
      codes 0..7, one per byte as for every log width (1..8 bits); shiftlog2_qgemm
      reads the low 3 bits.  Its w_bits=3 is the int4 path as in qgemm.
    log2_attention: p_bits=3 is the log2 code 0..6 plus the zero code 7 (p_bits 1..8
      were always accepted); out_bits=3 output codes are per_token_quantize's, packed
      like 4 bit.

qgemm
-----
With A = activation codes (zero za_i, scale s_i, row sums ra_i = sum_k a_ik) and
W = weight codes (zero zw_j, scale sw_j, col sums rw_j):

    acc_ij = sum_k a_ik w_jk                               (exact, int32)
           - za_i rw_j - zw_j ra_i + K za_i zw_j           (= sum_k (a_ik - za_i)(w_jk - zw_j))
    o_ij   = sum_c outlier_val_ic * (w_{j, outlier_idx_ic} - zw_j)      (fp32, c = 0..C-1 in order)
    y_ij   = sw_j * (s_i * float(acc_ij) + o_ij) + bias_j

computed in fp32 and cast to the output dtype.  Every intermediate integer fits in
int32 for K <= 32768 at 8 bit (|acc| <= K * 255^2 < 2^31); larger K is rejected.
"""
from __future__ import annotations

import torch

ACT_BITS = (3, 4, 8)
WEIGHT_BITS = (3, 4, 8)
PACKED_BITS = (3, 4)        # widths stored in the int4 container, two codes per byte


def is_packed(bits: int) -> bool:
    """True when b-bit codes are stored packed, two per byte (the int4 container)."""
    return bits in PACKED_BITS


def container_bits(bits: int) -> int:
    """The storage container (4 or 8) of b-bit uniform codes: what selects a kernel variant."""
    return 4 if bits in PACKED_BITS else 8


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
    if capacity and M and K:
        # stable sort puts the outlier columns first, in increasing column order
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :capacity]
        if order.shape[1] < capacity:  # capacity > K: pad the slots past the last column
            order = torch.cat([order, order.new_zeros(M, capacity - order.shape[1])], dim=1)
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
      codes   int8 [M, K] (bits 8) or uint8 [M, K/2] packed (bits 3, 4), signed-domain
      scale   fp32 [M];  zero int32 [M] (signed domain);  rowsum int32 [M] = sum_k codes_ik
      outliers as in the module doc, C = max_outliers.
    """
    check_bits(bits)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a float tensor, got {x.dtype}")
    if is_packed(bits) and x.shape[1] % 2:
        raise ValueError(f"{bits}-bit codes are packed in pairs along K; K={x.shape[1]} is odd")
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
    if is_packed(bits):
        codes = pack_int4(codes)
    return codes, s, (zu - half).to(torch.int32), rowsum, idx, val, count


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    outlier_idx: torch.Tensor | None = None, outlier_val: torch.Tensor | None = None):
    """Inverse of per_token_quantize: s_i (c_ik - zc_i), with outliers put back. fp32 [M, K]."""
    c = unpack_int4(codes) if is_packed(bits) else codes
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
    check_bits(w_bits, WEIGHT_BITS, "w_bits")
    ac = unpack_int4(a) if is_packed(a_bits) else a
    wc = unpack_int4(w) if is_packed(w_bits) else w
    if ac.dtype != torch.int8 or wc.dtype != torch.int8:
        raise TypeError("codes must be int8 (8 bit) or packed uint8 (3 or 4 bit)")
    M, K = ac.shape
    N, Kw = wc.shape
    if K != Kw:
        raise ValueError(f"K mismatch: activations have {K}, weights {Kw}")
    if K > 32768:
        raise ValueError(f"K={K} > 32768: the int32 accumulator could overflow")
    if outlier_idx is not None and outlier_idx.numel() and (int(outlier_idx.min()) < 0 or int(outlier_idx.max()) >= K):
        raise ValueError(f"outlier_idx must lie in [0, {K})")
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
    wp = pack_int4(w_codes) if is_packed(w_bits) else w_codes
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


# ---------------------------------------------------------------------------
# truncated uniform-log2 (TP-ViT, seed 001) for post-softmax P; docs/tp_vit.md
# ---------------------------------------------------------------------------
# Uniform steps of 1/2^m octave in the log2 domain over the truncated range [t_min, 0]:
#     c    = max(0, round(-2^m log2 P))       exact from P's fp32 bits (log_code_unclamped)
#     code = c               if c <= c_max    (c_max: the calibrated truncation code)
#          = Z = 2^b - 1     otherwise, and for P <= 0 or subnormal P     (the zero code)
#     P^   = 2^-(c >> m) * LOG_MANTISSAS[m][c & (2^m - 1)]  (= fp32(2^(-c/2^m)), exact), 0 for Z
# with 0 <= c_max <= 2^b - 2.  A code c covers -log2 P in [(c - 1/2) / 2^m, (c + 1/2) / 2^m),
# so P^ = 0 exactly when log2 P < t_min = -(c_max + 1/2) / 2^m (tul2_truncation_point).
# c_max = 2^b - 2 is log2_quantize(zero_code=True): the plain log2 quantizer is one point
# of the family, and calibration searches (m, c_max) jointly.

def check_tul2(bits: int, substeps: int, max_code: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"truncated log2 bits must be in 1..8, got {bits}")
    if substeps not in LOG_SUBSTEPS:
        raise ValueError(f"substeps must be one of {LOG_SUBSTEPS}, got {substeps}")
    top = (1 << bits) - 1
    if isinstance(max_code, bool) or not isinstance(max_code, int) or not 0 <= max_code <= top - 1:
        raise ValueError(f"max_code (truncation code) must be an int in [0, {top - 1}] for {bits}-bit codes "
                         f"(code {top} is the zero code), got {max_code!r}")


def tul2_truncation_point(substeps: int, max_code: int) -> float:
    """t_min = -(c_max + 1/2) / 2^m: P^ = 0 exactly for log2 P < t_min."""
    return -(max_code + 0.5) / (1 << substeps)


def tul2_quantize(p: torch.Tensor, bits: int, substeps: int = 0, max_code: int | None = None) -> torch.Tensor:
    """Truncated uniform-log2 codes of p (uint8, in [0, max_code] or the zero code 2^b - 1).

    max_code None means 2^b - 2 (no truncation beyond the code range = log2_quantize)."""
    top = (1 << bits) - 1
    max_code = top - 1 if max_code is None else max_code
    check_tul2(bits, substeps, max_code)
    check_finite(p, "p")
    c = log_code_unclamped(p.float(), substeps).clamp(min=0)
    return torch.where(c <= max_code, c, torch.full_like(c, top)).to(torch.uint8)


def tul2_dequantize(codes: torch.Tensor, bits: int, substeps: int = 0, max_code: int | None = None) -> torch.Tensor:
    """P^ (fp32) of truncated uniform-log2 codes: 2^(-c/2^m) by shift + mantissa table; 0 for
    the zero code.  Codes in (max_code, 2^b - 1) never come out of tul2_quantize: an error."""
    top = (1 << bits) - 1
    max_code = top - 1 if max_code is None else max_code
    check_tul2(bits, substeps, max_code)
    c = codes.to(torch.int32)
    if c.numel() and bool(((c < 0) | (c > top) | ((c > max_code) & (c < top))).any()):
        raise ValueError(f"truncated log2 codes must lie in [0, {max_code}] or be the zero code {top}")
    keep = c <= max_code
    v = log_decode(torch.where(keep, c, torch.zeros_like(c)), substeps)
    return torch.where(keep, v, torch.zeros_like(v))


# ---------------------------------------------------------------------------
# log2_attention: quantized attention with the log2 post-softmax quantizer (sec. 4.1)
# ---------------------------------------------------------------------------
# Inputs.  q, k, v: int8 signed codes [B, H, N, D] of per-tensor (the paper's setting) or
# per-head asymmetric uniform quantizers, dequantized as s * (c - z).  Any strides are
# accepted except that the last dimension must be contiguous (so q/k/v can be views into
# the qkv projection output).  A b-bit quantizer (b <= 8) stores one code per int8; 4-bit
# codes are not packed here.  scale: fp32 [1] or [H]; zero: int32 of the same length, in the
# signed domain [-128, 127].  1 <= D <= 256.
#
# Logits, from an exact integer product:
#     acc_ij = sum_d (q_id - zq)(k_jd - zk)        int32; |acc| <= 255^2 D < 2^24 for D <= 256,
#                                                   so float(acc) is exact
#     alpha  = (f32(sm_scale) * sq) * sk            fp32, in this order (per head if per-head)
#     t_ij   = alpha * float(acc_ij)  [+ bias_ij]   fp32, two separate roundings (no FMA)
# bias (optional): fp32, contiguous, [Bb, Hb, N, N] with Hb in {1, H} and B % Bb == 0; batch
# item b uses bias[b % Bb].  For Swin, x is [images * nW, N, C] with window index b % nW:
# pass rel_pos_bias[None] + shift_mask[:, None] as [nW, H, N, N] (or rel_pos_bias[None]
# alone for unshifted blocks).  Masks must be finite (Swin's -100 is); -inf is rejected.
#
# Softmax, in fp32:
#     m_i = max_j t_ij,   e_ij = exp(t_ij - m_i)
#     L_i = sum_j trunc(e_ij * 2^40)                int64, exact
#     l_i = float(L_i) * 2^-40,  r_i = 1 / l_i      (IEEE division),   P_ij = e_ij * r_i
# The row sum is taken in 40-bit fixed point so that it does not depend on summation order:
# the one-block and two-pass kernels, the CPU kernel and this reference then get the same l
# from the same e.  l >= 1 (the row max contributes exp(0) = 1) and the truncation loses
# at most N * 2^-40 <= 2^-28 (N <= 4096) of it, below fp32 resolution; L < 2^63 for N < 2^23.
# The whole row is normalised before P is quantized (long rows need a statistics pass).
#
# P codes: c_ij = log2_quantize(P_ij, p_bits, 1.0, substeps, zero_code=True), exact from the
# fp32 bits of P.  The top code Z = 2^b - 1 means P^ = 0: every P whose exact code would be
# >= Z (and every subnormal P) contributes nothing.  We chose zero over clamping to the
# smallest power because clamping would give each of the many tiny probabilities of a long
# row the weight 2^-(Z-1) (4 bits, 4096 tokens: up to 4096 * 2^-14 = 0.25 of extra mass).
# substeps m = 0 is the paper's base-2 quantizer, m = 1 the base-sqrt(2) variant, m = 2
# quarter-octave steps.
# Truncation (TP-ViT's truncated uniform-log2, tul2_quantize): with p_max_code = c_max given,
# codes c_max < c < Z also mean P^ = 0, i.e. c_ij = tul2_quantize(P_ij, p_bits, m, c_max);
# p_max_code None is c_max = Z - 1 (the plain log2 codes above).  Valid: 0 <= c_max <= Z - 1.
#
# Output.  With Vh_jd = v_jd - zv and one plane per mantissa class r = c mod 2^m:
#     X_r,id = sum_{j: c_ij <= c_max, c_ij mod 2^m = r} 2^-(c_ij >> m) * Vh_jd   (exact; float64 here)
#     o_id   = f32(X_0)                              (m = 0)
#     o_id   = f32(X_0) + mu_1 * f32(X_1)            (m = 1; mu_r = LOG_MANTISSAS[m][r], fp32 ops)
#     o_id   = ((f32(X_0) + mu_1 f32(X_1)) + mu_2 f32(X_2)) + mu_3 f32(X_3)    (m = 2, in this order)
#     y_id   = sv * o_id                             fp32
# so P^ V needs only powers of two (exponent-field construction) and exact products.
# Exactness: P^ <= 2^(1/2^(m+1)) P, and sum_j P_ij <= 1 + 2^-20, so every partial sum of
# plane r is a multiple of 2^-E with magnitude < 2^9, where E = c_max >> m.  When
# E <= 15 (p_bits <= 4 for m = 0, <= 5 for m = 1, <= 6 for m = 2, or a smaller c_max)
# all partial sums are exact fp32 numbers:
# a kernel accumulating in fp32 in any order (tensor cores included: nothing is ever
# rounded) gets X exactly, and y is bit-exact.  For larger E a kernel's fp32 accumulation
# is within N * 2^-24 * sum_j 2^-(c_ij >> m) |Vh_jd| of X (standard summation bound).
#
# Layout and output formats.  The output is token-major [B, N, H, D] (contiguous), so
# out.view(B * N, H * D) is the proj GEMM's input without a transpose.  With out_scale is
# None it is y cast to out_dtype.  With a static per-tensor out_scale (fp32 [1]) and
# out_zero (int32 [1]) it is per_token_quantize(y.view(B*N, H*D), out_bits, out_scale,
# out_zero)[0] reshaped: int8 [B, N, H, D] (8 bit) or packed uint8 [B, N, H, D/2] (4 bit, D
# even).  Those codes, with out_scale/out_zero expanded to B*N rows, are qgemm's a, a_scale,
# a_zero (a_rowsum = codes.sum(-1), needed only for weights with zero points).
#
# Tolerance (the one inexact step is exp).  Implementations use different exp: torch's here,
# std::exp in the CPU kernel, np.exp under the Triton interpreter, ex2.approx on NVIDIA GPUs.
# A different e moves P by a few ulps and so flips a code only where P lies within those
# ulps of a code boundary (a LOG_MANTISSA_THRESHOLDS entry, or the normal/subnormal edge).
# Tests therefore require every output element to equal this reference bit for bit, except
# in rows with a reference P within W ulps of a boundary, where the difference is bounded
# by what those flips can do (see log2_attention_flip_bound).  W = 8 for the CPU kernel and
# the interpreter (exp within 1-2 ulps, then l and the product), W = 64 on a GPU (rounding
# of x * log2(e) with |x log2 e| < 128 costs up to ~22 ulps in e, then l and P).

ATTN_MAX_HEAD_DIM = 256
ATTN_FIXED_POINT_BITS = 40
ATTN_SUBSTEPS = (0, 1, 2)


def _attn_scale_zero(what: str, scale: torch.Tensor, zero: torch.Tensor, H: int, device) -> None:
    if not isinstance(scale, torch.Tensor) or not isinstance(zero, torch.Tensor):
        raise TypeError(f"log2_attention: {what}_scale and {what}_zero must be tensors")
    if scale.dtype != torch.float32:
        raise TypeError(f"log2_attention: {what}_scale must be float32, got {scale.dtype}")
    if zero.dtype != torch.int32:
        raise TypeError(f"log2_attention: {what}_zero must be int32, got {zero.dtype}")
    if scale.dim() != 1 or scale.shape[0] not in (1, H) or zero.shape != scale.shape:
        raise ValueError(f"log2_attention: {what}_scale/{what}_zero must both have shape [1] (per tensor) "
                         f"or [{H}] (per head), got {tuple(scale.shape)} and {tuple(zero.shape)}")
    if scale.device != device or zero.device != device:
        raise ValueError(f"log2_attention: {what}_scale/{what}_zero must be on {device}")


def check_log2_attention_meta(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale, bias,
                              p_bits, substeps, out_scale, out_zero, out_bits, out_dtype,
                              p_max_code=None) -> None:
    """Shape/dtype/device/argument checks (no data reads, so no host sync on a GPU)."""
    import math
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != torch.int8:
            raise TypeError(f"log2_attention: {name} must be int8 codes, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"log2_attention: {name} must be [B, H, N, D], got shape {tuple(t.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"log2_attention: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, N, D = q.shape
    if not 1 <= D <= ATTN_MAX_HEAD_DIM:
        raise ValueError(f"log2_attention: head dim D={D} must be in [1, {ATTN_MAX_HEAD_DIM}]")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"log2_attention: {name} must have a contiguous last dimension (stride 1), "
                             f"got strides {t.stride()}")
        if t.device != q.device:
            raise ValueError(f"log2_attention: {name} is on {t.device} but q is on {q.device}")
    for what, s, z in (("q", q_scale, q_zero), ("k", k_scale, k_zero), ("v", v_scale, v_zero)):
        _attn_scale_zero(what, s, z, H, q.device)
    if not math.isfinite(float(sm_scale)) or not math.isfinite(float(torch.tensor(sm_scale, dtype=torch.float32))):
        raise ValueError(f"log2_attention: sm_scale must be finite in fp32, got {sm_scale}")
    if not 1 <= p_bits <= 8:
        raise ValueError(f"log2_attention: p_bits must be in 1..8, got {p_bits}")
    if substeps not in ATTN_SUBSTEPS:
        raise ValueError(f"log2_attention: substeps must be one of {ATTN_SUBSTEPS}, got {substeps}")
    if p_max_code is not None and (isinstance(p_max_code, bool) or not isinstance(p_max_code, int)
                                   or not 0 <= p_max_code <= (1 << p_bits) - 2):
        raise ValueError(f"log2_attention: p_max_code must be None or an int in [0, {(1 << p_bits) - 2}] "
                         f"for p_bits={p_bits} (code {(1 << p_bits) - 1} is the zero code), got {p_max_code!r}")
    if bias is not None:
        if bias.dtype != torch.float32:
            raise TypeError(f"log2_attention: bias must be float32, got {bias.dtype}")
        if (bias.dim() != 4 or bias.shape[2:] != (N, N) or bias.shape[1] not in (1, H)
                or bias.shape[0] == 0 or B % bias.shape[0]):
            raise ValueError(f"log2_attention: bias must be [Bb, 1 or {H}, {N}, {N}] with B={B} a multiple of "
                             f"Bb, got {tuple(bias.shape)}")
        if not bias.is_contiguous():
            raise ValueError("log2_attention: bias must be contiguous (call .contiguous(); broadcast over "
                             "batch or heads with a size-1 dimension instead of expand)")
        if bias.device != q.device:
            raise ValueError(f"log2_attention: bias is on {bias.device} but q is on {q.device}")
    if (out_scale is None) != (out_zero is None):
        raise ValueError("log2_attention: out_scale and out_zero must be given together")
    if out_scale is not None:
        if out_bits not in ACT_BITS:
            raise ValueError(f"log2_attention: out_bits must be one of {ACT_BITS}, got {out_bits}")
        if out_scale.dtype != torch.float32 or out_zero.dtype != torch.int32:
            raise TypeError("log2_attention: out_scale must be float32 and out_zero int32")
        if out_scale.shape != (1,) or out_zero.shape != (1,):
            raise ValueError("log2_attention: out_scale/out_zero must have shape [1] (static per-tensor), got "
                             f"{tuple(out_scale.shape)} and {tuple(out_zero.shape)}")
        if out_scale.device != q.device or out_zero.device != q.device:
            raise ValueError(f"log2_attention: out_scale/out_zero must be on {q.device}")
        if is_packed(out_bits) and D % 2:
            raise ValueError(f"log2_attention: {out_bits}-bit output codes are packed in pairs along D; D={D} is odd")
    elif out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"log2_attention: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")


def check_log2_attention_values(q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, bias, out_scale,
                                out_zero, out_bits) -> None:
    """Value checks (read the data): finite positive scales, zero points in range, finite bias."""
    for what, s, z in (("q", q_scale, q_zero), ("k", k_scale, k_zero), ("v", v_scale, v_zero)):
        if not bool((torch.isfinite(s) & (s > 0)).all()):
            raise ValueError(f"log2_attention: {what}_scale must be finite and > 0")
        if bool(((z < -128) | (z > 127)).any()):
            raise ValueError(f"log2_attention: {what}_zero must lie in [-128, 127]")
    if bias is not None and not bool(torch.isfinite(bias).all()):
        raise ValueError("log2_attention: bias contains NaN or Inf (use a large finite negative value, "
                         "e.g. -100 as Swin does, to mask)")
    if out_scale is not None:
        half = 1 << (out_bits - 1)
        if not bool((torch.isfinite(out_scale) & (out_scale > 0)).all()):
            raise ValueError("log2_attention: out_scale must be finite and > 0")
        if bool(((out_zero < -half) | (out_zero > half - 1)).any()):
            raise ValueError(f"log2_attention: out_zero must lie in [{-half}, {half - 1}]")


def _per_head(x: torch.Tensor, H: int) -> torch.Tensor:
    return x.reshape(-1).expand(H)


def log2_attention_probs(q, k, q_scale, q_zero, k_scale, k_zero, sm_scale, bias=None) -> torch.Tensor:
    """P (fp32 [B, H, N, N]) of log2_attention: exact logits, fp32 softmax with the fixed-point sum."""
    B, H, N, D = q.shape
    zq = _per_head(q_zero, H).double()[None, :, None, None]
    zk = _per_head(k_zero, H).double()[None, :, None, None]
    # float64 products and sums of integers below 2^53 are exact, in any order
    acc = (q.double() - zq) @ (k.double() - zk).transpose(-1, -2)
    alpha = (torch.tensor(sm_scale, dtype=torch.float32) * _per_head(q_scale, H).float().cpu()) \
        * _per_head(k_scale, H).float().cpu()
    t = acc.float() * alpha.to(q.device)[None, :, None, None]
    if bias is not None:
        t = t + bias.float().repeat(B // bias.shape[0], 1, 1, 1)
    m = t.amax(dim=-1, keepdim=True)
    e = torch.exp(t - m)
    fixed = float(1 << ATTN_FIXED_POINT_BITS)
    L = (e * fixed).to(torch.int64).sum(dim=-1, keepdim=True)
    l = L.float() * (1.0 / fixed)
    r = torch.div(torch.ones_like(l), l)
    return e * r


def log2_attention(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale: float,
                   bias=None, p_bits: int = 4, substeps: int = 0, out_scale=None, out_zero=None,
                   out_bits: int = 8, out_dtype: torch.dtype = torch.float32,
                   p_max_code: int | None = None) -> torch.Tensor:
    """Quantized attention with log2-coded probabilities; see the section comment above.
    p_max_code: the truncation code c_max of the truncated uniform-log2 quantizer (None: 2^b - 2).

    Returns [B, N, H, D] in out_dtype, or output codes (int8 [B, N, H, D] / packed uint8
    [B, N, H, D/2]) when out_scale/out_zero are given.
    """
    check_log2_attention_meta(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale, bias,
                              p_bits, substeps, out_scale, out_zero, out_bits, out_dtype, p_max_code)
    check_log2_attention_values(q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, bias, out_scale,
                                out_zero, out_bits)
    B, H, N, D = q.shape
    if q.numel() == 0:
        if out_scale is None:
            return torch.empty(B, N, H, D, dtype=out_dtype, device=q.device)
        return torch.empty(B, N, H, D // 2 if is_packed(out_bits) else D,
                           dtype=torch.uint8 if is_packed(out_bits) else torch.int8, device=q.device)
    P = log2_attention_probs(q, k, q_scale, q_zero, k_scale, k_zero, sm_scale, bias)
    codes = tul2_quantize(P, p_bits, substeps, p_max_code).to(torch.int64)
    keep = codes < (1 << p_bits) - 1
    vh = v.double() - _per_head(v_zero, H).double()[None, :, None, None]
    planes = []
    for r in range(1 << substeps):
        sel = keep & ((codes & ((1 << substeps) - 1)) == r)
        val = torch.where(sel, torch.exp2(-(codes >> substeps).double()), torch.zeros((), dtype=torch.float64))
        planes.append((val @ vh).float())
    o = planes[0]
    for r in range(1, 1 << substeps):
        o = o + torch.tensor(LOG_MANTISSAS[substeps][r], dtype=torch.float32) * planes[r]
    y = _per_head(v_scale, H).float()[None, :, None, None] * o
    y = y.permute(0, 2, 1, 3).contiguous()
    if out_scale is None:
        return y.to(out_dtype)
    oc = per_token_quantize(y.reshape(B * N, H * D), out_bits, out_scale, out_zero)[0]
    return oc.reshape(B, N, H, -1)


def log2_attention_flip_bound(P, v, v_scale, v_zero, p_bits: int, substeps: int, window_ulps: int,
                              p_max_code: int | None = None):
    """Per-output-element bound on what code flips near boundaries can change, [B, N, H, D] float64.

    A reference P whose mantissa lies within ``window_ulps`` of a code threshold (or of the
    normal/subnormal edge) may get the neighbouring code in another implementation; that
    moves P^ by at most the larger neighbour's value.  Elements of rows without such a P get
    bound 0 (they must match exactly).  Also returns the count of near-boundary entries.
    """
    B, H, N, D = v.shape
    bits = P.float().contiguous().view(torch.int32).to(torch.int64)
    ex = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    # the normal/subnormal edge (2^-126), from either side
    near = ((ex == 1) & (mant <= window_ulps)) | ((ex == 0) & (mant >= (1 << 23) - window_ulps))
    for t in LOG_MANTISSA_THRESHOLDS[substeps]:
        near |= (mant - t).abs() <= window_ulps
    # codes past the truncation code c_max (default 2^b - 2) decode to 0, like the zero code
    zero_at = (1 << p_bits) - 1 if p_max_code is None else p_max_code + 1
    c = log_code_unclamped(P, substeps).clamp(0, zero_at)
    # the larger neighbour: code c - 1 (or c_max - 1, conservatively, when P^ is zero)
    nb = (torch.minimum(c, torch.full_like(c, zero_at - 1)) - 1).clamp(min=0)
    step = torch.where(near, log_decode(nb, substeps).double(), torch.zeros((), dtype=torch.float64))
    vh = (v.double() - _per_head(v_zero, H).double()[None, :, None, None]).abs()
    bound = (step @ vh) * _per_head(v_scale, H).double()[None, :, None, None]
    return bound.permute(0, 2, 1, 3), int(near.sum())


# ---------------------------------------------------------------------------
# fused producers and consumers of activation codes (issue 3A)
#   layernorm_quantize    LayerNorm -> per-token codes + POQ outliers   (qkv / fc1 input)
#   qgemm_gelu_shiftlog2  fc1 qgemm -> exact GELU -> Shift-Log2 codes   (fc2 input)
#   shiftlog2_qgemm       fc2 GEMM that decodes Shift-Log2 codes
# ---------------------------------------------------------------------------
# min_x x * Phi(x), at x = -0.75179152469...; a static Shift-Log2 shift is GELU_MIN - eps
GELU_MIN = -0.16997120747990366


def layernorm_quantize(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, bits: int,
                       scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                       outlier_threshold: float | None = None, max_outliers: int = 0):
    """LayerNorm over the last dimension, then per_token_quantize (same 7 outputs).

        y_ik = (x_ik - mu_i) / sqrt(var_i + eps) * weight_k + bias_k      (biased variance)
        outputs = per_token_quantize(y, bits, scale, zero, outlier_threshold, max_outliers)

    Here y is torch's fp32 layer_norm.  A kernel computes its own fp32 LayerNorm y' (its
    reductions run in another order), so it cannot match y bit for bit.  The contract:
      (1) the kernel's outputs are exactly per_token_quantize(y'), bit for bit;
      (2) |y' - y64| <= layernorm_error_bound(...) elementwise, y64 the float64 LayerNorm.
    Consequently codes, zero points and outlier masks can differ from this function's only
    where y/s (or -lo/s, or |y| vs the threshold) lies within that bound of a rounding
    boundary, and then by one step; tests check (1) and (2) separately.
    x: fp16/bf16/fp32 [M, K]; weight, bias: float [K]; eps finite and > 0.
    Non-finite x, or a LayerNorm that overflows fp32, is an error.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a float tensor, got {x.dtype}")
    K = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
        if tuple(t.shape) != (K,):
            raise ValueError(f"{name} must have shape [{K}], got {tuple(t.shape)}")
    if not (eps > 0 and eps < float("inf")):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    check_finite(x)
    y = torch.nn.functional.layer_norm(x.float(), (K,), weight.float(), bias.float(), float(eps))
    check_finite(y, "LayerNorm(x)")
    return per_token_quantize(y, bits, scale, zero, outlier_threshold, max_outliers)


def layernorm_error_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """(y64, tol): the float64 LayerNorm and the error every fp32 implementation must meet.

    fp32 LayerNorm error, with u = 2^-24, sigma = sqrt(var + eps), z = (x - mu) / sigma:
      the mean's rounding error is at most g * mean|x| <= g * (|mu| + sigma), the variance's
      relative error at most g, where g covers an fp32 sum of K terms (tree sums: ~log2(K) u;
      sequential: ~sqrt(K) u in practice).  Through y = w (x - mu) / sigma + b this gives
          |y' - y64| <= |w| g (1 + |mu| / sigma + |z|) + 2u |y64|.
    g = 2^-18 (64 u) covers K up to 2^16 with a tree sum and leaves room for the last-place
    differences of rsqrt / division.  The |mu| / sigma term is the cancellation in x - mu for
    rows with a large offset: there fp32 itself cannot do better.
    """
    xd = x.double()
    K = x.shape[1]
    mu = xd.mean(dim=1, keepdim=True)
    sigma = torch.sqrt(((xd - mu) ** 2).mean(dim=1, keepdim=True) + eps)
    z = (xd - mu) / sigma
    y64 = z * weight.double() + bias.double()
    g = 2.0 ** -18
    tol = weight.double().abs() * g * (1 + mu.abs() / sigma + z.abs()) + 2.0 ** -23 * y64.abs()
    if K == 0:
        tol = y64
    return y64, tol


def shift_log2_codes(g: torch.Tensor, bits: int, shift: float, scale: float, substeps: int = 0) -> torch.Tensor:
    """Shift-Log2 codes with a static shift and scale, defined for every fp32 input.

        v = fp32(g - shift),  y = fp32(v / scale)     (shift, scale rounded to fp32 first)
        c = clamp(round(-2^m log2 y), 0, 2^b - 1)      exact, from y's bits (log_code_unclamped)

    Values at or below the shift (y <= 0), NaN and subnormal y take the top code 2^b - 1;
    +Inf takes 0.  For finite g this equals shift_log2_quantize (which rejects non-finite g);
    here no input is rejected because the GEMM kernels that produce g never sync to check.
    Returns uint8 codes, one per byte.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"out_bits must be in 1..8, got {bits}")
    if substeps not in LOG_SUBSTEPS:
        raise ValueError(f"substeps must be one of {LOG_SUBSTEPS}, got {substeps}")
    _check_shift_scale(shift, scale)
    s32 = torch.tensor(shift, dtype=torch.float32)
    d32 = torch.tensor(scale, dtype=torch.float32)
    y = (g.float() - s32) / d32
    return log_code_unclamped(y, substeps).clamp(0, (1 << bits) - 1).to(torch.uint8)


def _check_shift_scale(shift: float, scale: float) -> None:
    import math
    if not math.isfinite(shift):
        raise ValueError(f"shift must be finite, got {shift}")
    s32 = float(torch.tensor(scale, dtype=torch.float32))
    if not (math.isfinite(s32) and s32 > 0):
        raise ValueError(f"out_scale must be finite and > 0 in fp32, got {scale}")


def qgemm_gelu_shiftlog2(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias, outlier_idx,
                         outlier_val, a_bits: int, w_bits: int, shift: float, out_scale: float, out_bits: int,
                         substeps: int = 0) -> torch.Tensor:
    """fc1 with GELU and Shift-Log2 encoding in its epilogue (eq. 21-23): uint8 codes [M, N].

        h = qgemm(..., out_dtype=float32)           the fp32 value before any output cast
        g = GELU(h) = h * Phi(h)                     exact erf form, fp32 (torch's gelu)
        c = shift_log2_codes(g, out_bits, shift, out_scale, substeps)

    One code per byte (not nibble-packed): the fc2 decode GEMM is compute-bound, so packing
    4-bit codes would save traffic that is not the bottleneck, and 5..8-bit codes fit as is.
    The fp32 h/g are never written by the kernels.  Kernels' erf differs from torch's in the
    last places (torch's own CPU GELU is off by up to ~2.6e-7 absolute where 1 + erf cancels,
    h < 0): a kernel's code may differ from this function's only where a value within
    2^-20 (1 + |g|) of the exact GELU(h) would take another code (tests check exactly that).
    """
    h = qgemm(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias, outlier_idx, outlier_val,
              a_bits, w_bits, torch.float32)
    g = torch.nn.functional.gelu(h)
    return shift_log2_codes(g, out_bits, shift, out_scale, substeps)


def shiftlog2_sum_is_exact(bits: int, substeps: int, K: int) -> bool:
    """True when S = sum_k 2^(-c_k / 2^m) (w_k - zw), summed in float64, is exact.

    With e = c >> m <= e_max = (2^b - 1) >> m and d = 2^-e * M_r (M_0 = 1; M_r, r > 0, an fp32
    in (0.5, 1) with quantum 2^-24), every product d (w - zw) is exact in float64 and a
    multiple of q = 2^-e_max (m = 0) or 2^(-e_max - 24) (m > 0); |w - zw| <= 255, so every
    partial sum is a multiple of q below 255 K, which float64 holds exactly while
    255 K / q <= 2^53.  E.g. b = 4: m = 0 for any K < 2^30, m = 1 for K <= 16448.
    """
    e_max = ((1 << bits) - 1) >> substeps
    frac_bits = e_max + (24 if substeps else 0)
    return 255 * K * 2.0 ** frac_bits <= 2.0 ** 53


def shiftlog2_qgemm(codes: torch.Tensor, bits: int, substeps: int, act_scale: torch.Tensor, w: torch.Tensor,
                    w_scale: torch.Tensor, w_zero: torch.Tensor | None, bias: torch.Tensor | None, w_bits: int,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fc2 on Shift-Log2 codes (eq. 24 folded into the GEMM): Y [M, N] in out_dtype.

        S_ij = sum_k 2^(-c_ik / 2^m) (w_jk - zw_j)        2^(-c/2^m) = log_decode(c, m)
        y_ij = fp32(sw_j * fp32(s_a * fp32(S_ij))) + bias_j

    The shift term (m - eps) sum_k W^_jk of eq. 24 is input-independent and belongs in the
    bias: pass fold_shift_into_bias(...) as ``bias``.  codes: uint8 [M, K], one code per byte,
    of which only the low ``bits`` bits are read.  act_scale: fp32 tensor with one element
    (the static per-tensor s).  w: int8 [N, K] or packed int4 uint8 [N, K/2] (w_bits 8 / 4).

    Exactness: S is computed in float64 and rounded once to fp32; that is the exact S
    rounded once whenever shiftlog2_sum_is_exact(bits, substeps, K).  Kernels that form
    S exactly (integer planes, see the Triton kernel) are then bit-identical to this
    function; kernels that accumulate in fp32 are held to the accumulation bound
    (K + 1) 2^-24 sum_k |2^(-c/2^m) (w - zw)| on S.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if substeps not in LOG_SUBSTEPS:
        raise ValueError(f"substeps must be one of {LOG_SUBSTEPS}, got {substeps}")
    check_bits(w_bits, WEIGHT_BITS, "w_bits")
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise TypeError(f"codes must be uint8 [M, K], got {codes.dtype} {tuple(codes.shape)}")
    if act_scale.numel() != 1:
        raise ValueError(f"act_scale must have exactly one element, got shape {tuple(act_scale.shape)}")
    wc = unpack_int4(w) if is_packed(w_bits) else w
    if wc.dtype != torch.int8:
        raise TypeError("w must be int8 (8 bit) or packed uint8 (3 or 4 bit)")
    if wc.shape[1] != codes.shape[1]:
        raise ValueError(f"K mismatch: codes have {codes.shape[1]}, weights {wc.shape[1]}")
    c = codes.to(torch.int32) & ((1 << bits) - 1)
    d = log_decode(c, substeps).double()
    wz = wc.to(torch.int32) - (w_zero.to(torch.int32)[:, None] if w_zero is not None else 0)
    S = (d @ wz.double().T).float()
    y = w_scale.float()[None, :] * (act_scale.float().reshape(()) * S)
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype)


def fold_shift_into_bias(bias: torch.Tensor | None, shift: float, w_codes: torch.Tensor, w_scale: torch.Tensor,
                         w_zero: torch.Tensor | None) -> torch.Tensor:
    """b'_j = b_j + shift * sum_k W^_jk with W^_jk = sw_j (w_jk - zw_j): fc2's bias once the
    Shift-Log2 shift (m - eps of eq. 24) is folded in.  w_codes: int8 [N, K] (or packed int4
    uint8 [N, K/2]).  The column sum is an exact integer; the rest is fp32, in this order:
    fp32(b + fp32(shift * fp32(sw * colsum))).  Returns fp32 [N].
    """
    wc = unpack_int4(w_codes) if w_codes.dtype == torch.uint8 else w_codes
    if wc.dtype != torch.int8 or wc.dim() != 2:
        raise TypeError(f"w_codes must be int8 [N, K] (or packed uint8), got {w_codes.dtype}")
    colsum = wc.to(torch.int64).sum(dim=1)
    if w_zero is not None:
        colsum = colsum - wc.shape[1] * w_zero.to(torch.int64)
    s32 = torch.tensor(shift, dtype=torch.float32)
    folded = s32 * (w_scale.float() * colsum.float())
    return folded if bias is None else bias.float() + folded
