"""ADFQConfig: every knob of the calibration layer (documented field by field in docs/calibration.md)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

from .quantizers import INIT_METHODS, check_emulated_bits

# iterations per module, calibration images, minibatch size
PRESETS = {
    "paper": dict(iters=3000, calib_images=1024, batch_size=32),
    "fast": dict(iters=80, calib_images=64, batch_size=16),
}


@dataclass
class ADFQConfig:
    """ADFQ-ViT settings.  Defaults follow seed 002 sec. 4.1 unless a field's comment says otherwise.

    The three components switch independently (Table 4's ablation): ``poq`` (Per-Patch
    Outlier-aware Quantizer on the qkv/fc1 inputs; off = per-tensor uniform), ``slq``
    (Shift-Log2 on the fc2 input; off = per-tensor uniform), ``amo`` (reconstruction; off =
    round-to-nearest weights and calibrated activation ranges only)."""

    w_bits: int = 4
    a_bits: int = 4
    poq: bool = True
    slq: bool = True
    amo: bool = True
    preset: str = "fast"

    # bit widths of the first and last matmul (patch embedding, classifier/probe head)
    stem_bits: int = 8
    head_bits: int = 8

    # POQ
    poq_granularity: str = "token"          # 'token' (dynamic, the paper) | 'position' (static, public code)
    alpha_qkv: Optional[float] = 5.0        # None: no outlier split
    alpha_fc1: Optional[float] = 10.0
    outlier_capacity: Optional[int] = None  # None: max(min_capacity, capacity_factor * max count seen)
    capacity_factor: float = 2.0
    min_capacity: int = 8

    # SLQ and post-softmax
    slq_shift: Union[str, float] = "gelu"   # 'gelu' (constant GELU minimum) | 'calibrated' | a number
    slq_eps: float = 1e-3
    slq_substeps: int = 0                   # 0: base 2 (paper); 1: base sqrt(2) (public code)
    softmax_quant: str = "log2"             # 'log2' | 'uniform' (the plain baseline)
    softmax_substeps: int = 0

    # exact fp-equivalent rewrite: subtract each key channel's calibration midpoint (transforms.py)
    center_keys: bool = True

    # initialisation of scales
    w_symmetric: bool = False
    w_init: str = "mse"                     # 'minmax' | 'mse'
    a_init: str = "mse"                     # 'minmax' | 'percentile' | 'mse' (static activation scales)
    init_images: Optional[int] = None       # images for the range statistics; None = all calibration images

    # reconstruction (AMO)
    recon: str = "module"                   # 'module' (AMO, the paper) | 'block' (BRECQ/QDrop baseline)
    iters: Optional[int] = None             # per module/block; None = preset
    calib_images: Optional[int] = None      # None = preset
    batch_size: Optional[int] = None        # None = preset
    lr_v: float = 3e-3
    lr_scale: float = 4e-5
    round_weight: float = 0.01              # lambda of eq. 28/31
    beta: Tuple[float, float] = (10.0, 2.0)
    warmup: float = 0.2                     # share of iterations before L_round starts (AdaRound/BRECQ)
    kl_weight: float = 1.0                  # weight of L_as in eq. 31
    qdrop_prob: float = 0.0                 # QDrop: share of activations left unquantized while training
    learn_act_scales: bool = True
    mha_extra_losses: Sequence[Tuple[Union[str, Callable], float]] = ()
    step_hooks: Sequence[Callable] = ()

    # running
    device: Optional[str] = None            # None: cuda when available, else cpu
    eval_batch_size: int = 32
    seed: int = 0
    progress: bool = True
    inplace: bool = False

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> "ADFQConfig":
        for name in ("w_bits", "a_bits", "stem_bits", "head_bits"):
            check_emulated_bits(getattr(self, name), name)
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        _choice("poq_granularity", self.poq_granularity, ("token", "position"))
        _choice("softmax_quant", self.softmax_quant, ("log2", "uniform"))
        _choice("recon", self.recon, ("module", "block"))
        _choice("w_init", self.w_init, ("minmax", "mse"))
        _choice("a_init", self.a_init, INIT_METHODS)
        _choice("slq_substeps", self.slq_substeps, (0, 1, 2))
        _choice("softmax_substeps", self.softmax_substeps, (0, 1, 2))
        for name in ("alpha_qkv", "alpha_fc1"):
            a = getattr(self, name)
            if a is not None and not (isinstance(a, (int, float)) and a > 0):
                raise ValueError(f"{name} must be > 0 or None, got {a!r}")
        if self.outlier_capacity is not None and (not isinstance(self.outlier_capacity, int)
                                                  or self.outlier_capacity < 0):
            raise ValueError(f"outlier_capacity must be an int >= 0 or None, got {self.outlier_capacity!r}")
        if not (isinstance(self.slq_shift, (int, float)) or self.slq_shift in ("gelu", "calibrated")):
            raise ValueError(f"slq_shift must be 'gelu', 'calibrated' or a number, got {self.slq_shift!r}")
        for name in ("iters", "calib_images", "batch_size", "init_images"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < (0 if name == "iters" else 1)):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if not 0 <= self.qdrop_prob < 1:
            raise ValueError(f"qdrop_prob must be in [0, 1), got {self.qdrop_prob}")
        if len(self.beta) != 2 or min(self.beta) <= 0:
            raise ValueError(f"beta must be (start, end) > 0, got {self.beta!r}")
        return self

    def resolved(self, key: str):
        """iters / calib_images / batch_size: the explicit value, else the preset's."""
        v = getattr(self, key)
        return PRESETS[self.preset][key] if v is None else v

    @property
    def exportable(self) -> bool:
        """The kernels take 4/8-bit activation codes and 3/4/8-bit weights."""
        return (self.a_bits in (4, 8) and self.w_bits in (3, 4, 8) and self.stem_bits in (4, 8)
                and self.head_bits in (4, 8))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mha_extra_losses"] = [(n if isinstance(n, str) else getattr(n, "__name__", repr(n)), w)
                                 for n, w in self.mha_extra_losses]
        d["step_hooks"] = [getattr(h, "__name__", repr(h)) for h in self.step_hooks]
        d["beta"] = list(self.beta)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ADFQConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and k not in ("mha_extra_losses", "step_hooks")}
        if "beta" in kw:
            kw["beta"] = tuple(kw["beta"])
        return cls(**kw)

    @classmethod
    def baseline(cls, w_bits: int = 4, a_bits: int = 4, **kw) -> "ADFQConfig":
        """Plain per-tensor min/max PTQ: every activation (softmax included) per-tensor uniform from
        its min/max, per-channel min/max round-to-nearest weights, no key centering, no
        reconstruction."""
        base = dict(poq=False, slq=False, amo=False, softmax_quant="uniform", w_init="minmax",
                    a_init="minmax", center_keys=False)
        base.update(kw)
        return cls(w_bits=w_bits, a_bits=a_bits, **base)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
