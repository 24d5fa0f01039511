"""ADFQConfig: every knob of the calibration layer (documented field by field in docs/calibration.md)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

from .quantizers import INIT_METHODS, check_emulated_bits

# iterations per module, calibration images, minibatch size, Adam learning rates of V and s_a.
# `fast` runs 37x fewer iterations than the paper, so it takes 10x the paper's rate for AdaRound's
# V, whose domain does not depend on the bit width.  s_a keeps the paper's rate: Adam's step is
# absolute, and an activation scale is 17x smaller at 8 bits than at 4; 10x there measured W8A8
# 2 images lower, under issue 4's 1-point line (docs/calibration.md, "Budget").
PRESETS = {
    "paper": dict(iters=3000, calib_images=1024, batch_size=32, lr_v=3e-3, lr_scale=4e-5),
    "fast": dict(iters=80, calib_images=64, batch_size=16, lr_v=3e-2, lr_scale=4e-5),
}


def log_substeps_for(levels: int, octaves: int) -> int:
    """The finest log base 2^(1/2^m), m <= 2, whose ``levels`` codes still span ``octaves``."""
    m = 0
    while m < 2 and levels / (1 << (m + 1)) >= octaves:
        m += 1
    return m


def slq_substeps_for(bits: int) -> int:
    """'auto' Shift-Log2 base: the finest one whose 2^b codes span the 15 octaves of the paper's
    4-bit base-2 quantizer, so base 2 at <= 4 bits (the paper) and 2^(1/4) from 6 bits on.  A log
    quantizer's relative step is fixed by its base, not its width: base 2 at 8 bits spends 240
    codes below 2^-15 and keeps a 41% worst-case error on the large values.  Measured on DINOv2-S
    W8A8 (no AMO, 96 images): logit cosine to fp 0.964 with base 2, 0.991 with 2^(1/4), 0.992
    with SLQ off."""
    return log_substeps_for((1 << bits) - 1, 15)


def softmax_substeps_for(bits: int) -> int:
    """'auto' post-softmax log2 base, by the same rule: the 2^b - 2 nonzero codes span the 14
    octaves of the paper's 4-bit base-2 quantizer (the top code is 0).  Measured on DINOv2-S W8A8
    (as above, with SLQ auto): logit cosine to fp 0.991 with base 2, 0.997 with 2^(1/4)."""
    return log_substeps_for((1 << bits) - 2, 14)


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
    slq_substeps: Union[int, str] = "auto"  # 0: base 2 (paper); 1: base sqrt(2) (public code); 2: 2^(1/4);
                                            # 'auto': slq_substeps_for(a_bits) (base 2 at <= 4 bits)
    softmax_quant: str = "log2"             # 'log2' | 'uniform' (the plain baseline) | 'tul2' (TP-ViT's
                                            # truncated uniform-log2: substeps m in {0,1,2} and truncation
                                            # calibrated per attention module, docs/tp_vit.md)
    softmax_substeps: Union[int, str] = "auto"  # m of 'log2' ('tul2' searches m itself); 'auto':
                                            # softmax_substeps_for(a_bits) (base 2 at <= 4 bits)

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
    lr_v: Optional[float] = None            # Adam lr of AdaRound V; None = preset (paper 3e-3, fast 3e-2)
    lr_scale: Optional[float] = None        # Adam lr of the activation scales s_a; None = preset (4e-5 both)
    round_weight: float = 0.01              # lambda of eq. 28/31
    beta: Tuple[float, float] = (10.0, 2.0)
    warmup: float = 0.2                     # share of iterations before L_round starts (AdaRound/BRECQ)
    kl_weight: float = 1.0                  # weight of L_as in eq. 31
    qdrop_prob: float = 0.5                 # QDrop: share of activations left unquantized while training
                                            # (the public ADFQ-ViT code's 0.5; the paper is silent)
    learn_act_scales: bool = True
    mha_extra_losses: Sequence[Tuple[Union[str, Callable], float]] = ()
    step_hooks: Sequence[Callable] = ()

    # DHE (seed 000, docs/dhe.md): attention ranking hinge added to the MHA loss (ranking.py)
    dhe: bool = False                       # add dhe_weight * L_rank to every unit with attention
    dhe_weight: float = 1.0                 # L_rank is in gap units, summed over heads/rows like L_as
    dhe_margin_quantile: Optional[float] = 0.5  # (a) dynamic margin: q-quantile of the row's fp gaps; None: fixed
    dhe_fixed_margin: float = 0.0           # margin when dhe_margin_quantile is None (0: order only)
    dhe_sensitivity: bool = True            # (b) weight pairs by their fp attention mass
    dhe_head_norm: bool = True              # (c) divide each head's loss by its own mean fp gap
    dhe_pairs: Optional[int] = 64           # sampled key pairs per attention row; None: all pairs

    # TP-ViT progressive bit-decline (seed 001, docs/tp_vit.md, bit_decline.py): e.g. (8, 6, 4);
    # strictly decreasing, ending at min(w_bits, a_bits); None = off.  Needs reconstruction (amo).
    bit_decline: Optional[Tuple[int, ...]] = None
    bit_decline_share: float = 1.0          # share of each unit's iterations spent on the transitions;
                                            # the rest train at the target width (t = 1)
    bit_decline_iters: Optional[int] = None  # iterations of each transition, run *before* the unit's
                                            # `iters` at the target width (which then get the whole
                                            # L_round schedule); None: the transitions share `iters`

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
        _choice("softmax_quant", self.softmax_quant, ("log2", "uniform", "tul2"))
        _choice("recon", self.recon, ("module", "block"))
        _choice("w_init", self.w_init, ("minmax", "mse"))
        _choice("a_init", self.a_init, INIT_METHODS)
        _choice("slq_substeps", self.slq_substeps, (0, 1, 2, "auto"))
        _choice("softmax_substeps", self.softmax_substeps, (0, 1, 2, "auto"))
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
        for name in ("lr_v", "lr_scale"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")):
                raise ValueError(f"{name} must be a positive number or None, got {v!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if not 0 <= self.qdrop_prob < 1:
            raise ValueError(f"qdrop_prob must be in [0, 1), got {self.qdrop_prob}")
        if len(self.beta) != 2 or min(self.beta) <= 0:
            raise ValueError(f"beta must be (start, end) > 0, got {self.beta!r}")
        if not (isinstance(self.dhe_weight, (int, float)) and self.dhe_weight >= 0):
            raise ValueError(f"dhe_weight must be a number >= 0, got {self.dhe_weight!r}")
        if self.dhe_margin_quantile is not None and not (
                isinstance(self.dhe_margin_quantile, (int, float)) and 0 <= self.dhe_margin_quantile <= 1):
            raise ValueError(f"dhe_margin_quantile must be in [0, 1] or None, got {self.dhe_margin_quantile!r}")
        if not (isinstance(self.dhe_fixed_margin, (int, float)) and self.dhe_fixed_margin >= 0):
            raise ValueError(f"dhe_fixed_margin must be a number >= 0, got {self.dhe_fixed_margin!r}")
        if self.dhe_pairs is not None and (isinstance(self.dhe_pairs, bool) or not isinstance(self.dhe_pairs, int)
                                           or self.dhe_pairs < 1):
            raise ValueError(f"dhe_pairs must be a positive int or None, got {self.dhe_pairs!r}")
        if not (isinstance(self.bit_decline_share, (int, float)) and 0 < self.bit_decline_share <= 1):
            raise ValueError(f"bit_decline_share must be in (0, 1], got {self.bit_decline_share!r}")
        if self.bit_decline_iters is not None:
            if isinstance(self.bit_decline_iters, bool) or not isinstance(self.bit_decline_iters, int) \
                    or self.bit_decline_iters < 1:
                raise ValueError(f"bit_decline_iters must be a positive int or None, got {self.bit_decline_iters!r}")
            if self.bit_decline_share != 1.0:
                raise ValueError("bit_decline_iters and bit_decline_share are two ways to budget the transitions: "
                                 "set one of them")
        if self.bit_decline is not None:
            from .bit_decline import check_schedule
            self.bit_decline = check_schedule(self.bit_decline, min(self.w_bits, self.a_bits))
            if not self.amo:
                raise ValueError("bit_decline works on top of reconstruction: it needs amo=True")
        return self

    def resolved(self, key: str):
        """iters / calib_images / batch_size / lr_v / lr_scale: the explicit value, else the preset's."""
        v = getattr(self, key)
        return PRESETS[self.preset][key] if v is None else v

    @property
    def slq_substeps_resolved(self) -> int:
        return slq_substeps_for(self.a_bits) if self.slq_substeps == "auto" else int(self.slq_substeps)

    @property
    def softmax_substeps_resolved(self) -> int:
        return softmax_substeps_for(self.a_bits) if self.softmax_substeps == "auto" else int(self.softmax_substeps)

    @property
    def exportable(self) -> bool:
        """The kernels take 3/4/8-bit activation codes and 3/4/8-bit weights (3 bit in the int4
        container); stem and head use one width for both."""
        return (self.a_bits in (3, 4, 8) and self.w_bits in (3, 4, 8) and self.stem_bits in (3, 4, 8)
                and self.head_bits in (3, 4, 8))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mha_extra_losses"] = [(n if isinstance(n, str) else getattr(n, "__name__", repr(n)), w)
                                 for n, w in self.mha_extra_losses]
        d["step_hooks"] = [getattr(h, "__name__", repr(h)) for h in self.step_hooks]
        d["beta"] = list(self.beta)
        d["resolved"] = {k: self.resolved(k) for k in PRESETS[self.preset]}  # what the preset filled in
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ADFQConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and k not in ("mha_extra_losses", "step_hooks")}
        if "beta" in kw:
            kw["beta"] = tuple(kw["beta"])
        if kw.get("bit_decline") is not None:
            kw["bit_decline"] = tuple(kw["bit_decline"])
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
