"""TP-ViT (seed 001) progressive bit-decline reconstruction, on top of AMO (reconstruct.py).

``ADFQConfig(bit_decline=(8, 6, 4))``: each reconstruction unit starts at the first width and
steps down to the target, one *transition* b_out -> b_in per pair of neighbouring widths.  The
unit's iterations are split evenly over the transitions (iteration ranges [ceil(i T / S),
ceil((i+1) T / S)), T iterations, S transitions).  At the i-th iteration of a transition of L
iterations every quantizer of the unit computes

    Q_t(x) = (1 - t) Q_{b_out}(x) + t Q_{b_in}(x),        t = (i + 1) / L

so t ramps up to exactly 1 at the transition's last iteration, and the unit's last iteration runs
the plain target-width quantizers.  A quantizer whose own target width b* is higher than a
schedule entry uses max(b, b*) (e.g. 8-bit activations of a W4A8 model never decline).

How one quantizer exists at several widths (docs/tp_vit.md):

* static uniform activations (per tensor / per position): one calibrated range.  The learnable
  target scale s* is the only parameter; width b uses s_b = s* (2^b* - 1)/(2^b - 1) and the
  unsigned zero point round(z* (2^b - 1)/(2^b* - 1)), i.e. the same range on a finer grid.
  AMO's gradient reaches s* through every width.
* dynamic per-token uniform (POQ), post-softmax log2 (scale 1) and Shift-Log2 (shift and scale
  anchor the top of the log grid): their parameters do not depend on the width; Q_b is the same
  quantizer with b bits, i.e. a wider width adds codes below the same top.  (So is any other
  activation quantizer: its ``bits`` is switched.)
* truncated uniform-log2 (post-softmax, ``max_code`` c*): same log step 2^-m; width b uses
  c_b = min(2^b - 2, c* + 2^b - 2^b*), the extra codes extending the truncation point downwards.
* weights (AdaRound): per channel, the target scale/zero are rescaled as above (symmetric: by
  (2^(b*-1) - 1)/(2^(b-1) - 1)).  During a transition the weight quantizer *is* at b_in: AdaRound
  trains V on the b_in grid, and V is re-initialised at the start of the transition by AdaRound's
  own rule on that grid (h(V) = frac(w / s_b)).  Q_{b_out}(w) is the previous transition's result,
  its hardened b_out weights, frozen (round-to-nearest at the first width).  Adam's
  moments carry over.  At the end the quantizer holds exactly its calibrated target scale and zero
  point and the V learned in the last transition.

After the unit, every quantizer is back at its target width with no blend attached, so the model
is a plain target-width model (tested).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .quantizers import (ActQuantizer, UniformActQuantizer, WeightQuantizer,
                         check_emulated_bits, rectified_sigmoid, round_ste)


def check_schedule(schedule, target: int) -> Tuple[int, ...]:
    """The schedule as a tuple of ints: at least two widths in 2..8, strictly decreasing, ending at
    ``target`` (min(w_bits, a_bits)).  Accepts a sequence or a string "8,6,4"."""
    if isinstance(schedule, str):
        try:
            schedule = [int(s) for s in schedule.replace(" ", "").split(",") if s]
        except ValueError:
            raise ValueError(f"bit_decline must be comma-separated integers, got {schedule!r}") from None
    if not isinstance(schedule, (list, tuple)) or len(schedule) < 2:
        raise ValueError(f"bit_decline must list at least two widths (e.g. (8, 6, 4)), got {schedule!r}")
    widths = tuple(check_emulated_bits(b, "bit_decline width") for b in schedule)
    if any(a <= b for a, b in zip(widths, widths[1:])):
        raise ValueError(f"bit_decline must be strictly decreasing, got {widths}")
    if widths[-1] != target:
        raise ValueError(f"bit_decline must end at the target width min(w_bits, a_bits) = {target}, got {widths}")
    return widths


def stage_at(step: int, total: int, transitions: int, share: float = 1.0) -> Tuple[int, float]:
    """(transition index, t) at iteration ``step`` of ``total``.  The transitions take the first
    ceil(share * total) iterations; the rest run at the target width (last transition, t = 1).
    With fewer decline iterations than transitions only the last ones run (one iteration each)."""
    decline = max(1, math.ceil(share * total - 1e-9))   # epsilon: 0.07 * 100 is 7.000000000000001
    if step >= decline:
        return transitions - 1, 1.0
    total = decline
    n = min(transitions, total)
    s = step * n // total
    start = -(-s * total // n)
    end = -(-(s + 1) * total // n)
    return transitions - n + s, (step - start + 1) / (end - start)


# ---------------------------------------------------------------------------------------------
# one quantizer at another width
# ---------------------------------------------------------------------------------------------
def _static_uniform_at(q: UniformActQuantizer, x: torch.Tensor, bits: int) -> torch.Tensor:
    lt, lb = (1 << q.bits) - 1, (1 << bits) - 1
    s = q.scale * (lt / lb)                                        # same range, grad to s*
    zu = torch.round((q.zero.float() + (1 << (q.bits - 1))) * (lb / lt))
    rows = q._rows(x)
    xf = rows.float()
    mask, dense = q._outliers(xf)
    T = s.numel()
    M, K = xf.shape
    d = dense.reshape(M // T, T, K)
    s, zu = s.reshape(1, T, 1), zu.reshape(1, T, 1)
    code = torch.clamp(round_ste(d / s) + zu, 0, lb)
    deq = (s * (code - zu)).reshape(M, K)
    return torch.where(mask, xf, deq).to(x.dtype).reshape(x.shape)


def quantize_at(q: ActQuantizer, x: torch.Tensor, bits: int) -> torch.Tensor:
    """Q_bits(x) of activation quantizer ``q`` (calibrated at ``q.bits``), as described above."""
    check_emulated_bits(bits, "bit_decline width")
    if bits == q.bits:
        return q.fake_quant(x)
    if isinstance(q, UniformActQuantizer) and q.granularity != "token":
        return _static_uniform_at(q, x, bits)
    saved = q.bits, getattr(q, "max_code", None)
    q.bits = bits
    if saved[1] is not None:
        # truncated log2: same log step; the codes a width adds (or drops) move the truncation point
        q.max_code = min((1 << bits) - 2, max(0, saved[1] + (1 << bits) - (1 << saved[0])))
    try:
        return q.fake_quant(x)
    finally:
        q.bits = saved[0]
        if saved[1] is not None:
            q.max_code = saved[1]


def weight_grid(scale: torch.Tensor, zero: torch.Tensor, target: int, bits: int, symmetric: bool):
    """(scale, signed zero) of width ``bits`` from the target-width (scale, signed zero)."""
    if bits == target:
        return scale, zero
    if symmetric:
        return scale * (((1 << (target - 1)) - 1) / ((1 << (bits - 1)) - 1)), torch.zeros_like(zero)
    lt, lb = (1 << target) - 1, (1 << bits) - 1
    zu = torch.round((zero.float() + (1 << (target - 1))) * (lb / lt))
    return scale * (lt / lb), (zu - (1 << (bits - 1))).to(torch.int32)


def _weight_value(wq: WeightQuantizer, w: torch.Tensor, hard_v: bool) -> torch.Tensor:
    """The weight on ``wq``'s current grid: hardened AdaRound (h(V) >= 0.5) in soft mode, else
    round to nearest."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    s, zc = wq.scale[:, None], wq.zero.float()[:, None]
    qmin, qmax = wq.qrange
    if hard_v and wq.mode == "soft" and wq.alpha_v is not None:
        c = torch.floor(w2 / s) + (rectified_sigmoid(wq.alpha_v.detach()) >= 0.5).float()
    else:
        c = torch.round(w2 / s)
    return s * (torch.clamp(c + zc, qmin, qmax) - zc)


# ---------------------------------------------------------------------------------------------
# blends
# ---------------------------------------------------------------------------------------------
class ActBlend:
    """``ActQuantizer.blend``: (1 - t) Q_{b_out}(x) + t Q_{b_in}(x); y = Q_{target}(x) is reused."""

    def __init__(self, target: int):
        self.target = target
        self.b_out = self.b_in = target
        self.t = 1.0

    def _at(self, q, x, y, bits):
        return y if bits == self.target else quantize_at(q, x, bits)

    def __call__(self, q: ActQuantizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y_in = self._at(q, x, y, self.b_in)
        if self.t >= 1.0 or self.b_out == self.b_in:
            return y_in
        y_out = self._at(q, x, y, self.b_out)
        if self.t <= 0.0:
            return y_out
        return (1.0 - self.t) * y_out + self.t * y_in


class WeightBlend:
    """``WeightQuantizer.blend``: (1 - t) W_{b_out} + t W_hat, W_hat the quantizer's own (b_in)
    value and W_{b_out} the frozen result of the previous transition."""

    def __init__(self):
        self.w_out: Optional[torch.Tensor] = None
        self.t = 1.0

    def __call__(self, wq: WeightQuantizer, w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
        if self.w_out is None or self.t >= 1.0:
            return w_hat
        w_out = self.w_out.reshape(w_hat.shape).to(w_hat.dtype)
        if self.t <= 0.0:
            return w_out
        return (1.0 - self.t) * w_out + self.t * w_hat


# ---------------------------------------------------------------------------------------------
# the step hook
# ---------------------------------------------------------------------------------------------
class BitDeclineHook:
    """``ADFQConfig.step_hooks`` entry driving one unit's bit decline (added by reconstruct.py
    when ``bit_decline`` is set); ``end_unit`` puts every quantizer back at its target width."""

    def __init__(self, schedule: Sequence[int], share: float = 1.0):
        self.schedule = tuple(schedule)
        self.share = share
        if len(self.schedule) < 2:
            raise ValueError(f"bit_decline needs at least two widths, got {self.schedule}")
        self.unit = None
        self.history: List[Tuple[int, float]] = []   # (transition, t) per step, for reports/tests

    def widths(self, target: int) -> List[int]:
        return [max(b, target) for b in self.schedule]

    def _begin(self, unit):
        if self.unit is not None:
            self.end_unit(self.unit)
        self.unit, self.stage = unit, None
        self.history = []
        self.acts: Dict[ActQuantizer, ActBlend] = {}
        for q in unit.act_quantizers:
            if q.enabled and len(set(self.widths(q.bits))) > 1:
                self.acts[q] = q.blend = ActBlend(q.bits)
        self.weights = {}
        for layer in unit.layers:
            wq = layer.weight_quant
            if wq.enabled and len(set(self.widths(wq.bits))) > 1:
                wq.blend = WeightBlend()
                self.weights[wq] = (layer, wq.bits, wq.scale.clone(), wq.zero.clone())

    def _enter(self, stage: int):
        first = self.stage is None
        for q, blend in self.acts.items():
            ws = self.widths(blend.target)
            blend.b_out, blend.b_in = ws[stage], ws[stage + 1]
        for wq, (layer, target, scale, zero) in self.weights.items():
            ws = self.widths(target)
            b_out, b_in = ws[stage], ws[stage + 1]
            if first:   # the first width: round to nearest on its grid
                wq.bits = b_out
                wq.scale, wq.zero = weight_grid(scale, zero, target, b_out, wq.symmetric)
                w_out = _weight_value(wq, layer.weight, hard_v=False)
            elif b_out == b_in:    # width unchanged for this weight: keep training the same V
                wq.blend.w_out = None
                continue
            else:                  # the previous transition's result, hardened on its grid
                w_out = _weight_value(wq, layer.weight, hard_v=True)
            wq.blend.w_out = w_out
            wq.bits = b_in
            wq.scale, wq.zero = weight_grid(scale, zero, target, b_in, wq.symmetric)
            if wq.alpha_v is not None:
                # V restarts from AdaRound's own init on the b_in grid (h(V) = frac(w/s)): the blend
                # with the frozen w_out already makes the transition continuous.  Starting V at
                # w_out projected on the new grid instead rounds twice, and it saturates h(V)
                # wherever w_out is off the new grid, so V could not learn (DINOv2-S W3A3, tul2 +
                # decline 8,6,4,3, fast preset: top-1 14.3% with that init, 27.7% with this one).
                with torch.no_grad():
                    wq.alpha_v.copy_(wq.adaround_init(layer.weight))
        self.stage = stage

    def __call__(self, step: int, total: int, unit) -> None:
        if self.unit is not unit:
            self._begin(unit)
        stage, t = stage_at(step, total, len(self.schedule) - 1, self.share)
        if stage != self.stage:
            self._enter(stage)
        for blend in list(self.acts.values()) + [wq.blend for wq in self.weights]:
            blend.t = t
        self.history.append((stage, t))

    def end_unit(self, unit) -> None:
        """Every quantizer of the unit at its target width (calibrated scale/zero), no blends."""
        if self.unit is not unit:
            return
        for q in self.acts:
            q.blend = None
        for wq, (_layer, target, scale, zero) in self.weights.items():
            wq.blend = None
            wq.bits, wq.scale, wq.zero = target, scale, zero
        self.unit = None
        self.acts, self.weights = {}, {}
