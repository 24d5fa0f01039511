"""Fake quantizers of ADFQ-ViT (seed 002, sec. 3.1-3.3), computed with the spec's own functions.

Every forward value here is *bit-identical* to what ``vitq_kernels.reference`` computes (and so to
what the exported kernels compute): the integer codes come from ``uniform_scale_zero`` /
``quantize_rows`` / ``log_code_unclamped`` and the values from the same dequantization formulas.
Only the backward pass is ours: straight-through estimators (STE) that let reconstruction (AMO)
train AdaRound's V and the static activation scales s_a.

Quantizers
----------
``UniformActQuantizer``  asymmetric uniform activations, one of three granularities:
    ``token``    dynamic per-token (= per-patch) scales, POQ eq. 16-17;
    ``position`` static per-position scales (the public ADFQ-ViT code), length T = tokens;
    ``tensor``   one static scale (the "per-tensor uniform" of sec. 4.1).
    With ``alpha`` set, |x| > alpha are outliers kept in full precision (POQ eq. 18-20).
``Log2Quantizer``        post-softmax log2 with a zero code, scale fixed at 1 (eq. 13-15).
``TruncatedLog2Quantizer`` post-softmax truncated uniform-log2 (TP-ViT): calibrated 1/2^m-octave
                         steps and truncation point (docs/tp_vit.md).
``ShiftLog2Quantizer``   SLQ for post-GELU: static shift, learnable scale (eq. 22-24).
``WeightQuantizer``      per-output-channel uniform weights with AdaRound (eq. 25-26, 30).

Bit widths: emulation accepts 2..8 bits everywhere; the kernels take activation codes and weights
of 3, 4 or 8 bits, 3-bit codes in the int4 container (``exportable``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn


def _load_reference():
    """The spec module.  It is pure PyTorch, but importing it through its package also loads the
    compiled ops; when those are missing or stale, calibration still works from the file itself."""
    try:
        from vitq_kernels import reference
        return reference
    except (ImportError, RuntimeError, OSError) as err:
        import importlib.util
        import os
        import sys
        import warnings
        spec = importlib.util.find_spec("vitq_kernels")
        roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
        if not roots:
            raise
        warnings.warn(f"vitq_kernels could not be imported ({err}); using reference.py alone")
        sp = importlib.util.spec_from_file_location("_vitq_reference", os.path.join(roots[0], "reference.py"))
        module = importlib.util.module_from_spec(sp)
        sys.modules["_vitq_reference"] = module
        sp.loader.exec_module(module)
        return module


ref = _load_reference()

EMULATED_BITS = range(2, 9)
CHECK_FINITE = True  # the kernels reject NaN/Inf; so does emulation (one device sync per call)
GELU_MIN = getattr(ref, "GELU_MIN", -0.16997120747990366)  # min_x x*Phi(x), at x = -0.7518
ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1
GRANULARITIES = ("token", "position", "tensor")
INIT_METHODS = ("minmax", "percentile", "mse")


def check_emulated_bits(bits: int, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in EMULATED_BITS:
        raise ValueError(f"{what} must be an integer in 2..8 for emulation, got {bits!r}")
    return bits


class _RoundSTE(torch.autograd.Function):
    """torch.round in the forward pass (half-to-even, as the spec), identity gradient."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _PassThrough(torch.autograd.Function):
    """Returns ``value`` (computed without autograd) and sends the gradient straight to ``x``."""

    @staticmethod
    def forward(ctx, x, value):
        return value

    @staticmethod
    def backward(ctx, g):
        return g, None


round_ste = _RoundSTE.apply


class ActQuantizer(nn.Module):
    """Common switches of the activation quantizers.

    ``enabled=False`` makes the quantizer the identity (the fp model); ``observing=True`` records
    calibration statistics and passes x through; ``drop_prob`` > 0 (QDrop) keeps a random share of
    the elements unquantized, during reconstruction only."""

    learnable_scale = False
    blend = None  # bit_decline.py: fn(quantizer, x, y) -> y mixing in another width while reconstructing

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_emulated_bits(bits, "activation bits")
        self.enabled = True
        self.observing = False
        self.drop_prob = 0.0
        self.initialized = False

    @property
    def exportable(self) -> bool:
        return self.bits in ref.ACT_BITS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            with torch.no_grad():
                self.observe(x.detach())
            return x
        if not self.enabled:
            return x
        if not self.initialized:
            raise RuntimeError(f"{type(self).__name__} used before calibration (call vitq.quantize)")
        if CHECK_FINITE and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{type(self).__name__}: input contains NaN or Inf; quantization is "
                             "undefined for non-finite values")
        y = self.fake_quant(x)
        if self.blend is not None:
            y = self.blend(self, x, y)
        if self.drop_prob > 0:
            y = torch.where(torch.rand_like(x) < self.drop_prob, x, y)
        return y

    def observe(self, x: torch.Tensor) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def finish_calibration(self) -> None:
        self.initialized = True


# ---------------------------------------------------------------------------------------------
# search helpers
# ---------------------------------------------------------------------------------------------
_SAMPLE_CAP = 1 << 18  # values kept per observed batch for the MSE/percentile search
_SEARCH_CAP = 1 << 17  # values the search itself uses (a clipping ratio needs no more)


def _subsample(x: torch.Tensor, cap: int, dim0: bool = False) -> torch.Tensor:
    """Random subset of the values of x (flattened), or of its rows when dim0."""
    n = x.shape[0] if dim0 else x.numel()
    if n <= cap:
        return x if dim0 else x.reshape(-1)
    idx = torch.randperm(n, device=x.device)[:cap]
    return x[idx] if dim0 else x.reshape(-1)[idx]


def _uniform_dequant(x, scale, zero_u, bits):
    """s (clamp(round(x/s) + z, 0, L) - z) with broadcastable s, z (float): the spec's formula."""
    levels = (1 << bits) - 1
    q = torch.clamp(torch.round(x / scale) + zero_u, 0, levels)
    return scale * (q - zero_u)


def search_range(values: torch.Tensor, bits: int, method: str, lo: torch.Tensor, hi: torch.Tensor,
                 percentile: float = 1e-4, grid: int = 50):
    """Range [lo', hi'] (containing 0) for asymmetric uniform codes of ``values``.

    values: [S, G] samples of G independent groups (G=1 per tensor, G=T per position);
    lo/hi: [G] exact min/max over all observed data.  ``minmax`` keeps [lo, hi]; ``percentile``
    clips to the (p, 1-p) quantiles; ``mse`` shrinks the range by the ratio r in (0.2, 1] that
    minimises the squared error of each group (the usual PTQ range search)."""
    lo = lo.clamp(max=0).float()
    hi = hi.clamp(min=0).float()
    if method == "minmax" or values.numel() == 0:
        return lo, hi
    if method == "percentile":
        v = values.float()
        qlo = torch.quantile(v, percentile, dim=0).clamp(max=0)
        qhi = torch.quantile(v, 1 - percentile, dim=0).clamp(min=0)
        return torch.maximum(qlo, lo), torch.minimum(qhi, hi)
    if method != "mse":
        raise ValueError(f"init method must be one of {INIT_METHODS}, got {method!r}")
    v = values.float()
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for r in torch.linspace(1.0, 0.2, grid).tolist():
        s, z = ref.uniform_scale_zero(lo * r, hi * r, bits)
        err = (_uniform_dequant(v, s, z.float(), bits) - v).pow(2).sum(dim=0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * r, best_lo)
        best_hi = torch.where(better, hi * r, best_hi)
    return best_lo, best_hi


# ---------------------------------------------------------------------------------------------
# uniform activations: per token (dynamic), per position (static), per tensor (static)
# ---------------------------------------------------------------------------------------------
class UniformActQuantizer(ActQuantizer):
    """Asymmetric uniform activation quantizer over rows x[..., K] -> [M, K] (rows = tokens).

    Forward value == ``reference.dequantize_rows(*per_token_quantize(x, bits, scale, zero,
    alpha, capacity))`` (bits 4/8; the same formulas at other widths).  Static scales are
    ``nn.Parameter`` (s_a, trained by AMO with an LSQ-style STE); zero points stay fixed.

    Outliers (``alpha`` not None): the kernels keep at most ``capacity`` per row.  Calibration
    records the largest count seen (``max_outliers_seen``); ``finish_calibration`` sets the
    capacity to max(min_capacity, ceil(factor * seen)) unless one was given.  A row with more
    outliers than the capacity is an error, exactly as in the kernels."""

    def __init__(self, bits: int, granularity: str = "tensor", alpha: Optional[float] = None,
                 capacity: Optional[int] = None, init: str = "mse", capacity_factor: float = 2.0,
                 min_capacity: int = 8):
        super().__init__(bits)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if init not in INIT_METHODS:
            raise ValueError(f"init method must be one of {INIT_METHODS}, got {init!r}")
        if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"outlier threshold alpha must be a finite number > 0 or None, got {alpha!r}")
        if capacity is not None and (not isinstance(capacity, int) or capacity < 0):
            raise ValueError(f"outlier capacity must be an int >= 0, got {capacity!r}")
        self.granularity = granularity
        self.alpha = None if alpha is None else float(alpha)
        self.capacity = capacity
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        self.init = init
        self.max_outliers_seen = 0
        self.learnable_scale = granularity != "token"
        # static parameters (empty until calibration); zero is the *signed* zero point, as exported
        self.scale = nn.Parameter(torch.ones(0), requires_grad=False)
        self.register_buffer("zero", torch.zeros(0, dtype=torch.int32))
        self._lo = self._hi = None
        self._samples = []

    def extra_repr(self):
        return (f"bits={self.bits}, granularity={self.granularity}, alpha={self.alpha}, "
                f"capacity={self.capacity}")

    # -- helpers ---------------------------------------------------------------------------
    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"activation must have a feature dimension, got shape {tuple(x.shape)}")
        return x.reshape(-1, x.shape[-1])

    def _outliers(self, rows: torch.Tensor):
        mask = ref.outlier_mask(rows, self.alpha)
        return mask, torch.where(mask, torch.zeros_like(rows), rows)

    def _check_capacity(self, mask: torch.Tensor) -> None:
        if self.alpha is None or self.capacity is None or mask.numel() == 0:
            return
        count = mask.sum(dim=1)
        worst = int(count.max())
        if worst > self.capacity:
            row = int(count.argmax())
            raise ValueError(f"row {row} has {worst} outliers but max_outliers={self.capacity}; "
                             "raise max_outliers (or the outlier threshold)")

    # -- calibration -------------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        rows = self._rows(x).float()
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("calibration activations contain NaN or Inf")
        mask, dense = self._outliers(rows)
        if self.alpha is not None and mask.numel():
            self.max_outliers_seen = max(self.max_outliers_seen, int(mask.sum(dim=1).max()))
        if self.granularity == "token":
            return
        if self.granularity == "tensor":
            groups = dense.reshape(-1, 1)
        else:  # position: rows of one image are consecutive; T = tokens per image
            T = x.shape[-2] if x.dim() >= 3 else 1
            if self._lo is not None and self._lo.numel() != T:
                raise ValueError(f"per-position quantizer saw {T} tokens after {self._lo.numel()}")
            # values of position t: all its rows, all channels -> [S, T]
            groups = dense.reshape(-1, T, dense.shape[-1]).permute(0, 2, 1).reshape(-1, T)
        lo, hi = groups.amin(dim=0), groups.amax(dim=0)
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        if self.init != "minmax":
            self._samples.append(_subsample(groups, max(1, _SAMPLE_CAP // groups.shape[1]), dim0=True).cpu())

    def finish_calibration(self) -> None:
        if self.alpha is not None and self.capacity is None:
            self.capacity = max(self.min_capacity, math.ceil(self.capacity_factor * self.max_outliers_seen))
        if self.granularity != "token":
            if self._lo is None:
                raise RuntimeError("static activation quantizer saw no calibration data")
            samples = torch.cat(self._samples) if self._samples else torch.zeros(0, self._lo.numel())
            samples = _subsample(samples, max(_SEARCH_CAP // samples.shape[1], 2048), dim0=True)
            lo, hi = search_range(samples, self.bits, self.init, self._lo.cpu(), self._hi.cpu())
            s, zu = ref.uniform_scale_zero(lo, hi, self.bits)
            self.set_static(s, zu - (1 << (self.bits - 1)))
        self._lo = self._hi = None
        self._samples = []
        super().finish_calibration()

    def set_static(self, scale: torch.Tensor, zero_signed: torch.Tensor) -> None:
        """Static parameters in the exported format: fp32 scale [T] > 0, signed int32 zero [T]."""
        half = 1 << (self.bits - 1)
        scale = scale.detach().float().reshape(-1)
        zero_signed = zero_signed.detach().to(torch.int32).reshape(-1)
        if scale.numel() != zero_signed.numel() or not bool((scale > 0).all()):
            raise ValueError("static scales must be > 0 and match the zero points in length")
        if bool(((zero_signed < -half) | (zero_signed > half - 1)).any()):
            raise ValueError(f"zero points must lie in [{-half}, {half - 1}]")
        dev = self.scale.device
        self.scale = nn.Parameter(scale.to(dev), requires_grad=False)
        self.zero = zero_signed.to(dev)
        self.initialized = True

    # -- forward ---------------------------------------------------------------------------
    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows(x)
        if not rows.is_floating_point():
            raise TypeError(f"activations must be floating point, got {rows.dtype}")
        xf = rows.float()
        mask, dense = self._outliers(xf)
        self._check_capacity(mask)
        if self.granularity == "token":
            with torch.no_grad():
                K = xf.shape[1]
                lo = dense.amin(dim=1).clamp(max=0) if K else torch.zeros(xf.shape[0], device=xf.device)
                hi = dense.amax(dim=1).clamp(min=0) if K else torch.zeros(xf.shape[0], device=xf.device)
                s, zu = ref.uniform_scale_zero(lo, hi, self.bits)
                q = ref.quantize_rows(dense, s, zu, self.bits)
                deq = s[:, None] * (q.float() - zu.float()[:, None])
                value = torch.where(mask, xf, deq)
            out = _PassThrough.apply(xf, value)
        else:
            T = self.scale.numel()
            M, K = xf.shape
            if M % T:
                raise ValueError(f"static scales of length {T} do not tile {M} rows "
                                 f"(per-position scales need the calibration token count)")
            s = self.scale.reshape(1, T, 1)
            zu = (self.zero.float() + (1 << (self.bits - 1))).reshape(1, T, 1)
            d = dense.reshape(M // T, T, K)
            q = torch.clamp(round_ste(d / s) + zu, 0, (1 << self.bits) - 1)
            deq = (s * (q - zu)).reshape(M, K)
            out = torch.where(mask, xf, deq)
        return out.to(x.dtype).reshape(x.shape)

    def export_params(self) -> dict:
        """Static scale/zero (signed) in the kernels' format, plus the outlier settings."""
        out = {"bits": self.bits, "granularity": self.granularity, "alpha": self.alpha,
               "capacity": self.capacity if self.alpha is not None else 0}
        if self.granularity != "token":
            out.update(scale=self.scale.detach().float().clone(), zero=self.zero.clone())
        return out


# ---------------------------------------------------------------------------------------------
# log2 family: post-softmax (zero code) and Shift-Log2 (post-GELU)
# ---------------------------------------------------------------------------------------------
class _LogFakeQuant(torch.autograd.Function):
    """x_hat = s * 2^(-c / 2^m) + shift with the spec's exact codes c (zero code: top code -> 0).

    Backward (STE on the code): inside the code range dx_hat/dx = 1 and dx_hat/ds = y_hat - y
    (y = (x - shift)/s, y_hat its quantized value, as LSQ); clamped or zeroed elements pass no
    gradient to x and y_hat to s."""

    @staticmethod
    def forward(ctx, x, scale, shift, bits, substeps, zero_code):
        top = (1 << bits) - 1
        y = (x.float() - shift) / scale
        c_raw = ref.log_code_unclamped(y, substeps)
        codes = c_raw.clamp(0, top)
        v = ref.log_decode(codes, substeps)
        if zero_code:
            v = torch.where(codes == top, torch.zeros_like(v), v)
        out = v * scale + shift
        inside = (c_raw >= 0) & ((c_raw < top) if zero_code else (c_raw <= top))
        ctx.save_for_backward(inside, v, y)
        ctx.scale_shape = scale.shape
        return out

    @staticmethod
    def backward(ctx, g):
        inside, v, y = ctx.saved_tensors
        gx = g * inside
        gs = (g * (v - torch.where(inside, y, torch.zeros_like(y)))).sum()
        return gx, gs.reshape(ctx.scale_shape), None, None, None, None


class Log2Quantizer(ActQuantizer):
    """Post-softmax log2 quantizer: codes ``reference.log2_quantize(p, bits, 1.0, substeps)``.

    The scale is fixed at 1: a softmax row's maximum is <= 1, and scale 1 lets the attention
    kernel decode P with shifts alone.  The top code means exactly 0."""

    def __init__(self, bits: int, substeps: int = 0):
        super().__init__(bits)
        if substeps not in ref.LOG_SUBSTEPS:
            raise ValueError(f"log2 substeps must be one of {ref.LOG_SUBSTEPS}, got {substeps}")
        self.substeps = substeps
        self.register_buffer("scale", torch.ones(1))
        self.initialized = True

    def extra_repr(self):
        return f"bits={self.bits}, base=2^(1/{1 << self.substeps})"

    def observe(self, x):
        pass

    def fake_quant(self, x):
        zero_shift = torch.zeros((), device=x.device)
        out = _LogFakeQuant.apply(x, self.scale, zero_shift, self.bits, self.substeps, True)
        return out.to(x.dtype)

    def export_params(self):
        return {"bits": self.bits, "substeps": self.substeps, "scale": 1.0}


class TruncatedLog2Quantizer(ActQuantizer):
    """Post-softmax truncated uniform-log2 quantizer (TP-ViT, seed 001; docs/tp_vit.md).

    Codes ``reference.tul2_quantize(p, bits, m, c_max)``: uniform steps of 1/2^m octave in the
    log2 domain over [t_min, 0], t_min = -(c_max + 1/2) / 2^m; below t_min P^ = 0.  Scale 1, so
    the attention kernel decodes by shift plus a 2^m-entry mantissa table.

    Calibration picks (m, c_max) from ``substeps_choices`` x [0, 2^b - 2] by minimising, over
    sampled rows of calibration attention, the squared error of the attention output
    sum_i ||(P^_i - P_i) V||^2 when the attention module handed over V (``observe_values``),
    else the squared error of P^ itself.  (m, c_max) = (0, 2^b - 2) is the plain log2
    quantizer, so the chosen point is never worse than plain log2 on that objective.
    ``substeps``/``max_code`` given at construction fix those parameters instead."""

    SAMPLE_CAP = 1 << 21   # values kept for the search (sampled P rows and their V), 2x at most
    ROWS_PER_SLICE = 32    # query rows kept per sampled (image, head) slice

    def __init__(self, bits: int, substeps_choices=(0, 1, 2), substeps: Optional[int] = None,
                 max_code: Optional[int] = None, sample_seed: int = 0):
        super().__init__(bits)
        choices = tuple(substeps_choices) if substeps is None else (substeps,)
        if not choices or any(m not in ref.LOG_SUBSTEPS for m in choices):
            raise ValueError(f"substeps must be in {ref.LOG_SUBSTEPS}, got {choices}")
        self.substeps_choices = choices
        top = (1 << bits) - 1
        if max_code is not None:
            ref.check_tul2(bits, choices[0], max_code)
        self.fixed_max_code = max_code
        self.substeps = choices[0]
        self.max_code = top - 1 if max_code is None else max_code
        self.register_buffer("scale", torch.ones(1))
        self.search_errors = None       # {(m, c_max): error} of the last calibration
        self.objective = None           # 'output' ((P^ - P) V) or 'probs' (P^ - P) once calibrated
        self._pending_values = None
        self._samples = []              # (P rows [S, R, N], V [S, N, D] or None), on CPU
        self._n_samples = 0
        # the sampler's own stream: drawing from the global one would shift every later draw
        # (other quantizers' search samples, QDrop masks), so choosing tul2 over log2 would change
        # the rest of the calibration even where the search returns plain log2
        self._gen = torch.Generator().manual_seed(sample_seed)
        self.initialized = substeps is not None and max_code is not None

    @property
    def t_min(self) -> float:
        return ref.tul2_truncation_point(self.substeps, self.max_code)

    def extra_repr(self):
        return (f"bits={self.bits}, base=2^(1/{1 << self.substeps}), max_code={self.max_code}, "
                f"t_min={self.t_min:.3f}")

    # -- calibration -------------------------------------------------------------------------
    def observe_values(self, v: torch.Tensor) -> None:
        """V [B, H, N, D] of the attention whose P comes next (the output-error objective)."""
        self._pending_values = v.detach()

    def observe(self, x: torch.Tensor) -> None:
        v, self._pending_values = self._pending_values, None
        p = x.float()
        if not bool(torch.isfinite(p).all()):
            raise ValueError("calibration probabilities contain NaN or Inf")
        N = p.shape[-1]
        heads = p.shape[-3] if p.dim() >= 3 else 1
        p3 = p.reshape(-1, p.shape[-2], N)                       # [images * heads, Nq, N]
        if v is not None and (v.dim() != p.dim() or v.shape[:-1] != p.shape[:-2] + (N,)):
            v = None                                             # not the V of this P: P-error objective
        v3 = None if v is None else v.float().reshape(-1, N, v.shape[-1])
        # every head of a few random images (heads differ far more than images), a few random
        # query rows per (image, head), within a per-call budget of stored values
        rows = min(self.ROWS_PER_SLICE, p3.shape[1])
        per_image = heads * (rows * N + (0 if v3 is None else N * v3.shape[-1]))
        n_images = p3.shape[0] // heads
        n_pick = max(1, min(n_images, (self.SAMPLE_CAP // 2) // per_image))
        pick = torch.randperm(n_images, generator=self._gen)[:n_pick].to(p.device)
        sl = (pick[:, None] * heads + torch.arange(heads, device=p.device)).reshape(-1)
        rw = torch.rand(sl.numel(), p3.shape[1], generator=self._gen).argsort(dim=1)[:, :rows].to(p.device)
        ps = torch.gather(p3[sl], 1, rw[:, :, None].expand(-1, -1, N)).cpu()
        vs = None if v3 is None else v3[sl].cpu()
        self._samples.append((ps, vs))
        self._n_samples += ps.numel() + (0 if vs is None else vs.numel())
        if self._n_samples > 2 * self.SAMPLE_CAP:               # keep a random half of the batches
            keep = [s for s in self._samples if bool(torch.rand((), generator=self._gen) < 0.5)] or self._samples[-1:]
            self._samples = keep
            self._n_samples = sum(a.numel() + (0 if b is None else b.numel()) for a, b in keep)

    def finish_calibration(self) -> None:
        if self.fixed_max_code is None or len(self.substeps_choices) > 1:
            if not self._samples:
                raise RuntimeError("truncated log2 quantizer saw no calibration data")
            errors = tul2_search(self._samples, self.bits, self.substeps_choices, self.fixed_max_code)
            self.search_errors = errors
            self.objective = "output" if all(v is not None for _, v in self._samples) else "probs"
            self.substeps, self.max_code = min(errors, key=lambda k: (errors[k], k))
        self._samples = []
        self._n_samples = 0
        super().finish_calibration()

    # -- forward ---------------------------------------------------------------------------
    def fake_quant(self, x):
        with torch.no_grad():
            codes = ref.tul2_quantize(x, self.bits, self.substeps, self.max_code)
            value = ref.tul2_dequantize(codes, self.bits, self.substeps, self.max_code)
            inside = (codes.to(torch.int32) <= self.max_code).to(value.dtype)
        xf = x.float()
        # forward value exactly `value`; STE gradient 1 where P^ != 0 by truncation
        out = value + (xf - xf.detach()) * inside
        return out.to(x.dtype)

    def export_params(self):
        return {"bits": self.bits, "substeps": self.substeps, "max_code": self.max_code, "scale": 1.0,
                "t_min": self.t_min}


def tul2_search(samples, bits: int, substeps_choices, max_code: Optional[int] = None) -> dict:
    """Error of every (m, c_max) on sampled attention rows, float64: {(m, c_max): error}.

    samples: [(P [S, R, N], V [S, N, D] or None)].  Output objective (all samples have V):
    sum ||(P^ - P) V||^2, from per-code partial products G_k = sum_{j: c_j = k} P^_j V_j
    (one scatter pass per m) and their prefix sums over k.  Otherwise sum (P^ - P)^2."""
    top = (1 << bits) - 1
    use_v = all(v is not None for _, v in samples)
    errors = {}
    for m in substeps_choices:
        cands = range(top) if max_code is None else (max_code,)
        err = torch.zeros(top, dtype=torch.float64)
        for p, v in samples:
            c = ref.log_code_unclamped(p, m).clamp(min=0)
            ok = c < top                                       # codes that can ever be kept
            val = ref.log_decode(torch.where(ok, c, torch.zeros_like(c)), m).double()
            val = torch.where(ok, val, torch.zeros_like(val))
            cc = torch.where(ok, c, torch.full_like(c, top))   # bucket `top`: always zero
            pd = p.double()
            if use_v:
                vd = v.double()                                # [S, N, D]
                S, R, N = p.shape
                D = vd.shape[-1]
                # slices per chunk: bounded buffers for the scatter source and G (32 MiB each)
                step = max(1, min((1 << 22) // max(R * N * D, 1), (1 << 22) // max(R * (top + 1) * D, 1)))
                for s0 in range(0, S, step):
                    s1 = min(S, s0 + step)
                    exact = pd[s0:s1] @ vd[s0:s1]                                 # [s, R, D]
                    src = val[s0:s1, :, :, None] * vd[s0:s1, None, :, :]          # [s, R, N, D]
                    idx = cc[s0:s1, :, :, None].expand(-1, -1, -1, D)
                    G = torch.zeros(s1 - s0, R, top + 1, D, dtype=torch.float64)
                    G.scatter_add_(2, idx, src)
                    out = G[:, :, :top].cumsum(dim=2)          # the output with c_max = k, k < top
                    err += (out - exact[:, :, None, :]).pow(2).sum(dim=(0, 1, 3))
            else:
                a = torch.bincount(cc.reshape(-1), ((val - pd) ** 2).reshape(-1), minlength=top + 1)
                b = torch.bincount(cc.reshape(-1), (pd ** 2).reshape(-1), minlength=top + 1)
                total_b = b.sum()
                err += a[:top].cumsum(0) + (total_b - b[:top].cumsum(0))
        for k in cands:
            errors[(m, k)] = float(err[k])
    return errors


class ShiftLog2Quantizer(ActQuantizer):
    """Shift-Log2 quantizer (eq. 22-24) for post-GELU activations.

    shift = min(X_g) - eps, static: ``shift="gelu"`` uses GELU's exact minimum (a constant, so
    the kernels can fold shift * sum_k W into fc2's bias); ``"calibrated"`` the calibration minimum.
    The scale s_a is learnable; initialised to max(x - shift) (eq. 14) or by an MSE search over
    s = max * 2^-t, t in [0, 2) (the log grid repeats every octave, so t needs fine steps)."""

    learnable_scale = True

    def __init__(self, bits: int, substeps: int = 0, shift: str | float = "gelu", eps: float = 1e-3,
                 init: str = "mse"):
        super().__init__(bits)
        if substeps not in ref.LOG_SUBSTEPS:
            raise ValueError(f"log2 substeps must be one of {ref.LOG_SUBSTEPS}, got {substeps}")
        if init not in ("minmax", "mse"):
            raise ValueError(f"SLQ init must be 'minmax' or 'mse', got {init!r}")
        if not (isinstance(shift, (int, float)) or shift in ("gelu", "calibrated")):
            raise ValueError(f"SLQ shift must be 'gelu', 'calibrated' or a number, got {shift!r}")
        self.substeps = substeps
        self.shift_mode = shift
        self.eps = float(eps)
        self.init = init
        fixed = GELU_MIN if shift == "gelu" else (float(shift) if not isinstance(shift, str) else 0.0)
        self.register_buffer("shift", torch.tensor(fixed - self.eps if shift != "calibrated" else 0.0))
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self._min = self._max = None
        self._samples = []

    def extra_repr(self):
        return f"bits={self.bits}, base=2^(1/{1 << self.substeps}), shift={float(self.shift):.6f}"

    def observe(self, x):
        xf = x.float()
        if not bool(torch.isfinite(xf).all()):
            raise ValueError("calibration activations contain NaN or Inf")
        mn, mx = xf.min(), xf.max()
        self._min = mn if self._min is None else torch.minimum(self._min, mn)
        self._max = mx if self._max is None else torch.maximum(self._max, mx)
        if self.init == "mse":
            self._samples.append(_subsample(xf, _SAMPLE_CAP).cpu())

    def finish_calibration(self):
        if self._min is None:
            raise RuntimeError("Shift-Log2 quantizer saw no calibration data")
        if self.shift_mode == "calibrated":
            self.shift.fill_(float(self._min) - self.eps)
        elif float(self._min) < float(self.shift):
            # x below a fixed shift takes the top code (still defined), but say so
            import warnings
            warnings.warn(f"post-GELU minimum {float(self._min):.5f} is below the fixed shift "
                          f"{float(self.shift):.5f}; is the activation an exact GELU?")
        shift = float(self.shift)
        smax = max(float(self._max) - shift, 1e-8)
        best = smax
        if self.init == "mse" and self._samples:
            v = _subsample(torch.cat(self._samples), _SEARCH_CAP // 2)
            errs = []
            cands = [smax * 2.0 ** (-t / 32) for t in range(64)]
            for s in cands:
                out = _LogFakeQuant.apply(v, torch.tensor([s]), torch.tensor(shift), self.bits,
                                          self.substeps, False)
                errs.append(float((out - v).pow(2).sum()))
            best = cands[min(range(len(cands)), key=errs.__getitem__)]
        self.scale = nn.Parameter(torch.tensor([best], dtype=torch.float32, device=self.scale.device),
                                  requires_grad=False)
        self._min = self._max = None
        self._samples = []
        super().finish_calibration()

    def fake_quant(self, x):
        out = _LogFakeQuant.apply(x, self.scale, self.shift, self.bits, self.substeps, False)
        return out.to(x.dtype)

    def export_params(self):
        return {"bits": self.bits, "substeps": self.substeps, "shift": float(self.shift),
                "scale": self.scale.detach().float().clone()}


# ---------------------------------------------------------------------------------------------
# weights: per-channel uniform + AdaRound
# ---------------------------------------------------------------------------------------------
def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) of eq. 26."""
    return torch.clamp(torch.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0, 1)


class WeightQuantizer(nn.Module):
    """Per-output-channel uniform weights w[N, ...] (flattened to [N, K]).

    Modes: ``rtn`` (round to nearest, == ``reference.quantize_weight_per_channel`` for the
    min/max init), ``soft`` (AdaRound: floor(w/s) + h(V), eq. 25), ``hard`` (the stored integer
    codes, what export packs).  Codes are kept in the signed domain (c - zc), like the spec."""

    blend = None  # bit_decline.py: fn(quantizer, w, w_hat) -> w_hat mixing in another width

    def __init__(self, bits: int, symmetric: bool = False, init: str = "mse"):
        super().__init__()
        self.bits = check_emulated_bits(bits, "weight bits")
        if init not in ("minmax", "mse"):
            raise ValueError(f"weight init must be 'minmax' or 'mse', got {init!r}")
        self.symmetric = bool(symmetric)
        self.init = init
        self.enabled = True
        self.mode = "rtn"
        self.register_buffer("scale", torch.zeros(0))
        self.register_buffer("zero", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("codes", torch.zeros(0, dtype=torch.int8))
        self.alpha_v = None  # AdaRound V (nn.Parameter) while mode == "soft"

    def extra_repr(self):
        return f"bits={self.bits}, symmetric={self.symmetric}, mode={self.mode}"

    @property
    def exportable(self) -> bool:
        return self.bits in ref.WEIGHT_BITS

    @property
    def qrange(self):
        half = 1 << (self.bits - 1)
        return (-(half - 1) if self.symmetric else -half), half - 1

    def _scale_zero(self, w2: torch.Tensor, ratio: float | torch.Tensor = 1.0):
        half = 1 << (self.bits - 1)
        if self.symmetric:
            amax = w2.abs().amax(dim=1) * ratio
            s = torch.where(amax > 0, amax / (half - 1), torch.ones_like(amax))
            return s, torch.zeros_like(s, dtype=torch.int32)
        lo = w2.amin(dim=1).clamp(max=0) * ratio
        hi = w2.amax(dim=1).clamp(min=0) * ratio
        s, zu = ref.uniform_scale_zero(lo, hi, self.bits)
        return s, zu - half

    def _rtn(self, w2, s, zc):
        qmin, qmax = self.qrange
        return torch.clamp(torch.round(w2 / s[:, None]) + zc.float()[:, None], qmin, qmax)

    @torch.no_grad()
    def calibrate(self, w: torch.Tensor) -> None:
        w2 = w.detach().float().reshape(w.shape[0], -1)
        if not bool(torch.isfinite(w2).all()):
            raise ValueError("weights contain NaN or Inf")
        s, zc = self._scale_zero(w2)
        if self.init == "mse":
            best = ((s[:, None] * (self._rtn(w2, s, zc) - zc[:, None]) - w2) ** 2).sum(dim=1)
            for r in torch.linspace(0.99, 0.5, 50).tolist():
                s_r, z_r = self._scale_zero(w2, r)
                err = ((s_r[:, None] * (self._rtn(w2, s_r, z_r) - z_r[:, None]) - w2) ** 2).sum(dim=1)
                better = err < best
                best = torch.where(better, err, best)
                s = torch.where(better, s_r, s)
                zc = torch.where(better, z_r, zc)
        self.scale = s
        self.zero = zc.to(torch.int32)
        self.codes = self._rtn(w2, s, zc).to(torch.int8)
        self.mode = "rtn"

    # -- AdaRound ----------------------------------------------------------------------------
    def adaround_init(self, w: torch.Tensor) -> torch.Tensor:
        """V on the current grid with h(V) equal to the fractional part of w/s (AdaRound's init)."""
        x = w.detach().float().reshape(w.shape[0], -1) / self.scale[:, None]
        rest = (x - torch.floor(x)).clamp(1e-4, 1 - 1e-4)
        return -torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (rest - ADAROUND_GAMMA) - 1)

    def start_adaround(self, w: torch.Tensor) -> nn.Parameter:
        """Soft mode with V initialised so that h(V) equals the fractional part of w/s."""
        self.alpha_v = nn.Parameter(self.adaround_init(w))
        self.mode = "soft"
        return self.alpha_v

    def round_loss(self, beta: float) -> torch.Tensor:
        """L_round of eq. 30: sum 1 - |2 h(V) - 1|^beta."""
        if self.alpha_v is None:
            return torch.zeros(())
        return (1 - (2 * rectified_sigmoid(self.alpha_v) - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def harden(self, w: torch.Tensor) -> None:
        """Final integer codes: floor(w/s) + [h(V) >= 0.5] (rtn codes if AdaRound never ran)."""
        if self.mode == "soft":
            w2 = w.detach().float().reshape(w.shape[0], -1)
            qmin, qmax = self.qrange
            up = (rectified_sigmoid(self.alpha_v) >= 0.5).float()
            q = torch.clamp(torch.floor(w2 / self.scale[:, None]) + up + self.zero.float()[:, None], qmin, qmax)
            self.codes = q.to(torch.int8)
        self.alpha_v = None
        self.mode = "hard"

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if self.scale.numel() == 0:
            raise RuntimeError("WeightQuantizer used before calibration (call vitq.quantize)")
        s = self.scale[:, None]
        zc = self.zero.float()[:, None]
        if self.mode == "hard":
            q = self.codes.float()
        elif self.mode == "soft":
            w2 = w.float().reshape(w.shape[0], -1)
            qmin, qmax = self.qrange
            q = torch.clamp(torch.floor(w2.detach() / s) + rectified_sigmoid(self.alpha_v) + zc, qmin, qmax)
        else:
            w2 = w.float().reshape(w.shape[0], -1)
            qmin, qmax = self.qrange
            q = torch.clamp(round_ste(w2 / s) + zc, qmin, qmax)
        out = (s * (q - zc)).reshape(w.shape).to(w.dtype)
        return out if self.blend is None else self.blend(self, w, out)

    def export_params(self) -> dict:
        """Signed int8 codes [N, K], fp32 scale [N], signed int32 zero [N] (0 when symmetric)."""
        if self.mode != "hard":
            raise RuntimeError("weights are not final yet: harden() after reconstruction")
        return {"bits": self.bits, "symmetric": self.symmetric, "codes": self.codes.clone(),
                "scale": self.scale.clone(), "zero": self.zero.clone()}
