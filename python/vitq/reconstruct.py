"""Reconstruction: AMO (seed 002 sec. 3.4, module-wise) and the block-wise BRECQ/QDrop baseline.

Units are reconstructed one at a time, in forward order.  For each unit:

1. its inputs are captured twice over the calibration images: from the fp model (to compute the
   targets) and from the quantized model, whose preceding units are already final (so the unit
   learns to correct the error that reaches it).  Both caches live on the CPU; minibatches move to
   the compute device.
2. AdaRound V of every weight in the unit (Adam, ``lr_v``) and the static activation scales s_a
   (Adam, ``lr_scale``) minimise
       MLP:   L_o + lambda L_round
       MHA:   L_as + L_o + lambda L_round (+ registered extra terms)
   L_o = ||X - X_hat||^2 summed over a sample's elements, averaged over the batch (eq. 29);
   L_as = KL(AS || AS_hat) taken over the key axis of every head's attention rows, with the same
   reduction (eq. 32); L_round of eq. 30 with beta annealed linearly from beta[0] to beta[1] after
   a warm-up share of the iterations.
3. the weights are hardened (h(V) >= 0.5) before the next unit's inputs are captured.

Hooks for other methods (e.g. DHE's ranking loss, TP-ViT's bit decline):
* ``register_mha_loss(name, fn)``; ``ADFQConfig.mha_extra_losses = [(name or fn, weight), ...]``.
  ``fn(ctx: LossContext) -> scalar tensor`` is added (times weight) to the loss of every unit that
  contains attention.
* ``ADFQConfig.step_hooks = [fn, ...]``; ``fn(step, total, unit)`` runs before every iteration and
  may change the unit's quantizers (``unit.weight_quantizers``, ``unit.act_quantizers``).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ADFQConfig
from .quantizers import ActQuantizer, WeightQuantizer
from .wrap import QuantConv2d, QuantLinear, _QuantAttentionBase, fp_mode, record_attention

MHA_LOSSES: Dict[str, Callable] = {}


def register_mha_loss(name: str, fn: Callable) -> None:
    """Make ``fn(ctx: LossContext) -> tensor`` available as ``mha_extra_losses=[(name, weight)]``."""
    MHA_LOSSES[name] = fn


@dataclasses.dataclass
class LossContext:
    """What an extra loss term sees at one iteration of one unit."""
    unit: "Unit"
    out_fp: torch.Tensor
    out_q: torch.Tensor
    probs_fp: List[torch.Tensor]      # per attention module in the unit: [B, H, N, N] fp softmax
    probs_q: List[torch.Tensor]       # same, quantized model, before P's quantizer (has grad)
    step: int
    total: int


@dataclasses.dataclass
class Unit:
    name: str
    module: nn.Module
    kind: str  # 'mha' | 'mlp' | 'block'

    @property
    def layers(self) -> List[nn.Module]:
        return [m for m in self.module.modules() if isinstance(m, (QuantLinear, QuantConv2d))]

    @property
    def weight_quantizers(self) -> List[WeightQuantizer]:
        return [m for m in self.module.modules() if isinstance(m, WeightQuantizer)]

    @property
    def act_quantizers(self) -> List[ActQuantizer]:
        return [m for m in self.module.modules() if isinstance(m, ActQuantizer)]

    @property
    def has_attention(self) -> bool:
        return any(isinstance(m, _QuantAttentionBase) for m in self.module.modules())


# ---------------------------------------------------------------------------------------------
# units, in forward order
# ---------------------------------------------------------------------------------------------
def _forward_order(model: nn.Module, modules: List[nn.Module], sample: torch.Tensor) -> List[nn.Module]:
    seen: List[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _a: seen.append(mod) if mod not in seen else None)
             for m in modules]
    try:
        with torch.no_grad(), fp_mode(model):
            model(sample)
    finally:
        for h in hooks:
            h.remove()
    missing = [m for m in modules if m not in seen]
    if missing:
        raise RuntimeError(f"{len(missing)} quantized modules were not called by the forward pass")
    return seen


def find_units(model: nn.Module, granularity: str, sample: torch.Tensor) -> List[Unit]:
    """'module': every attention module and every MLP (the module holding an fc1 QuantLinear);
    'block': every module that directly holds both (a transformer block)."""
    names = {m: n for n, m in model.named_modules()}
    attn = [m for m in model.modules() if isinstance(m, _QuantAttentionBase)]
    mlps = [m for m in model.modules()
            if any(isinstance(c, QuantLinear) and c.role == "fc1" for c in m.children())]
    if granularity == "module":
        kinds = {**{m: "mha" for m in attn}, **{m: "mlp" for m in mlps}}
    elif granularity == "block":
        kinds = {}
        for m in model.modules():
            kids = list(m.children())
            if any(k in attn for k in kids) and any(k in mlps for k in kids):
                kinds[m] = "block"
        if not kinds:
            raise RuntimeError("block-wise reconstruction found no module holding both attention and MLP")
    else:
        raise ValueError(f"granularity must be 'module' or 'block', got {granularity!r}")
    order = _forward_order(model, list(kinds), sample)
    return [Unit(names[m], m, kinds[m]) for m in order]


# ---------------------------------------------------------------------------------------------
# input capture
# ---------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


class CachedInputs:
    """A unit's call arguments over n images: tensors stored per image as [n, k, ...] on the CPU
    (k = rows per image, e.g. Swin's windows); the keyword arguments are the same for every call."""

    def __init__(self, args: list, kwargs: dict, per_image: List[bool], k: List[int]):
        self.args, self.kwargs, self.per_image, self.k = args, kwargs, per_image, k

    @property
    def n(self) -> int:
        return next(a.shape[0] for a, p in zip(self.args, self.per_image) if p)

    def batch(self, idx: torch.Tensor, device) -> tuple:
        out = []
        for a, p in zip(self.args, self.per_image):
            if p:
                t = a[idx]
                out.append(t.reshape(-1, *t.shape[2:]).to(device, non_blocking=True))
            else:
                out.append(a.to(device) if isinstance(a, torch.Tensor) else a)
        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.kwargs.items()}
        return tuple(out), kw


def capture_inputs(model: nn.Module, unit: nn.Module, images: torch.Tensor, batch_size: int, device,
                   quantized: bool) -> CachedInputs:
    """Runs ``model`` (fp or quantized) over ``images`` up to ``unit`` and keeps its inputs."""
    calls = []

    def hook(_m, args, kwargs):
        calls.append(([a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in args],
                      {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}))
        raise _Stop

    h = unit.register_forward_pre_hook(hook, with_kwargs=True)
    sizes = []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(device)
            sizes.append(x.shape[0])
            try:
                with torch.no_grad():
                    if quantized:
                        model(x)
                    else:
                        with fp_mode(model):
                            model(x)
            except _Stop:
                pass
            else:
                raise RuntimeError("the unit was not called during the forward pass")
    finally:
        h.remove()
    first_args, kwargs = calls[0]
    args, per_image, ks = [], [], []
    for j, a0 in enumerate(first_args):
        if isinstance(a0, torch.Tensor) and a0.dim() >= 1 and a0.shape[0] % sizes[0] == 0:
            k = a0.shape[0] // sizes[0]
            parts = [c[0][j].reshape(b, k, *c[0][j].shape[1:]) for c, b in zip(calls, sizes)]
            args.append(torch.cat(parts))
            per_image.append(True)
            ks.append(k)
        else:
            args.append(a0)
            per_image.append(False)
            ks.append(0)
    return CachedInputs(args, kwargs, per_image, ks)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def output_loss(out_q: torch.Tensor, out_fp: torch.Tensor, n_images: int) -> torch.Tensor:
    """L_o: squared error summed over each sample's elements, averaged over the images."""
    return (out_q.float() - out_fp.float()).pow(2).sum() / n_images


def attention_kl_loss(probs_fp: torch.Tensor, probs_q: torch.Tensor, n_images: int) -> torch.Tensor:
    """L_as: sum over (heads, query rows) of KL(p_row || p_hat_row) over the key axis, averaged
    over the images.  (The public ADFQ-ViT code takes its KL over the heads axis; we do not.)"""
    log_q = probs_q.float().clamp_min(1e-12).log()
    return F.kl_div(log_q, probs_fp.float(), reduction="sum") / n_images


def beta_at(step: int, total: int, cfg: ADFQConfig) -> Optional[float]:
    """None during warm-up (no L_round), then linear from beta[0] to beta[1]."""
    warm = int(cfg.warmup * total)
    if step < warm:
        return None
    t = (step - warm) / max(1, total - warm - 1)
    return cfg.beta[0] + (cfg.beta[1] - cfg.beta[0]) * min(1.0, t)


def _extra_losses(cfg: ADFQConfig):
    out = []
    for spec, weight in cfg.mha_extra_losses:
        fn = MHA_LOSSES.get(spec) if isinstance(spec, str) else spec
        if fn is None:
            raise ValueError(f"unknown MHA loss {spec!r}; registered: {sorted(MHA_LOSSES)}")
        out.append((fn, float(weight)))
    return out


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def reconstruct_unit(unit: Unit, fp_in: CachedInputs, q_in: CachedInputs, cfg: ADFQConfig, device,
                     generator: torch.Generator, bar=None) -> dict:
    iters, bs = cfg.resolved("iters"), cfg.resolved("batch_size")
    n = q_in.n
    layers = unit.layers
    v_params = [layer.weight_quant.start_adaround(layer.weight) for layer in layers]
    s_params = []
    if cfg.learn_act_scales:
        s_params = [q.scale for q in unit.act_quantizers if q.learnable_scale and q.scale.numel()]
    for p in s_params:
        p.requires_grad_(True)
    opt_v = torch.optim.Adam(v_params, lr=cfg.lr_v)
    opt_s = torch.optim.Adam(s_params, lr=cfg.lr_scale) if s_params else None
    extras = _extra_losses(cfg) if unit.has_attention else []
    use_kl = unit.kind == "mha" and cfg.kl_weight > 0
    for q in unit.act_quantizers:
        q.drop_prob = cfg.qdrop_prob
    first = last = None
    running = None
    try:
        for step in range(iters):
            for hook in cfg.step_hooks:
                hook(step, iters, unit)
            idx = torch.randint(0, n, (min(bs, n),), generator=generator)
            xf, kw_f = fp_in.batch(idx, device)
            xq, kw_q = q_in.batch(idx, device)
            with torch.no_grad(), fp_mode(unit.module), record_attention(unit.module) as mods:
                out_fp = unit.module(*xf, **kw_f)
                probs_fp = [m.last_probs for m in mods]
            with record_attention(unit.module) as mods:
                out_q = unit.module(*xq, **kw_q)
                probs_q = [m.last_probs for m in mods]
            b = len(idx)
            l_o = output_loss(out_q, out_fp, b)
            loss = l_o
            if use_kl:
                loss = loss + cfg.kl_weight * sum(attention_kl_loss(p, q, b) for p, q in zip(probs_fp, probs_q))
            if extras:
                ctx = LossContext(unit, out_fp, out_q, probs_fp, probs_q, step, iters)
                for fn, w in extras:
                    loss = loss + w * fn(ctx)
            beta = beta_at(step, iters, cfg)
            if beta is not None and cfg.round_weight > 0:
                loss = loss + cfg.round_weight * sum(layer.weight_quant.round_loss(beta) for layer in layers)
            opt_v.zero_grad(set_to_none=True)
            if opt_s:
                opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_v.step()
            if opt_s:
                opt_s.step()
                with torch.no_grad():
                    for p in s_params:
                        p.clamp_(min=1e-8)
            rec = float(l_o.detach())
            first = rec if first is None else first
            last = rec
            running = rec if running is None else 0.9 * running + 0.1 * rec
            if bar is not None:
                bar.update(1)
                bar.set_postfix(unit=unit.name, loss=f"{running:.4g}", refresh=False)
    finally:
        for q in unit.act_quantizers:
            q.drop_prob = 0.0
        for p in s_params:
            p.requires_grad_(False)
        for layer in layers:
            layer.weight_quant.harden(layer.weight)
    return {"unit": unit.name, "kind": unit.kind, "first_output_loss": first, "last_output_loss": last}


def reconstruct(model: nn.Module, images: torch.Tensor, cfg: ADFQConfig, device=None) -> List[dict]:
    """Runs AMO (cfg.recon == 'module') or block-wise reconstruction over all units in order."""
    device = torch.device(device or next(model.parameters()).device)
    units = find_units(model, cfg.recon, images[:1].to(device))
    iters = cfg.resolved("iters")
    fwd_bs = max(cfg.resolved("batch_size"), cfg.eval_batch_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    stats = []
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=iters * len(units), desc=f"{'AMO' if cfg.recon == 'module' else 'block'} reconstruction",
                   unit="it", dynamic_ncols=True)
    try:
        for unit in units:
            t0 = time.perf_counter()
            fp_in = capture_inputs(model, unit.module, images, fwd_bs, device, quantized=False)
            q_in = capture_inputs(model, unit.module, images, fwd_bs, device, quantized=True)
            st = reconstruct_unit(unit, fp_in, q_in, cfg, device, gen, bar)
            st["seconds"] = time.perf_counter() - t0
            stats.append(st)
    finally:
        if bar is not None:
            bar.close()
    return stats


@torch.no_grad()
def unit_output_loss(model: nn.Module, unit: Unit, images: torch.Tensor, batch_size: int, device) -> float:
    """L_o of a unit over all ``images`` (quantized inputs vs the fp unit on fp inputs)."""
    fp_in = capture_inputs(model, unit.module, images, batch_size, device, quantized=False)
    q_in = capture_inputs(model, unit.module, images, batch_size, device, quantized=True)
    idx = torch.arange(q_in.n)
    xf, kw_f = fp_in.batch(idx, device)
    xq, kw_q = q_in.batch(idx, device)
    with fp_mode(unit.module):
        out_fp = unit.module(*xf, **kw_f)
    return float(output_loss(unit.module(*xq, **kw_q), out_fp, q_in.n))
