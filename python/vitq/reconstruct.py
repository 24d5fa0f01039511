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
   While training, QDrop leaves each activation of the unit's quantizers unquantized with
   probability ``qdrop_prob`` (0.5 by default, the public code's value).
3. the weights are hardened (h(V) >= 0.5) before the next unit's inputs are captured.

Hooks for other methods (e.g. DHE's ranking loss, TP-ViT's bit decline):
* ``register_mha_loss(name, fn)``; ``ADFQConfig.mha_extra_losses = [(name or fn, weight), ...]``.
  ``fn(ctx: LossContext) -> scalar tensor`` is added (times weight) to the loss of every unit that
  contains attention.
* ``ADFQConfig.step_hooks = [fn, ...]``; ``fn(step, total, unit)`` runs before every iteration and
  may change the unit's quantizers (``unit.weight_quantizers``, ``unit.act_quantizers``).
"""
from __future__ import annotations

import contextlib
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
    n_images: int = 0                 # images in the minibatch (Swin's probs have images x windows rows)


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


def _to_cpu(v):
    return v.detach().cpu() if isinstance(v, torch.Tensor) else v


def _stack_calls(calls, sizes) -> CachedInputs:
    """Per-call (args, kwargs) of chunks of ``sizes`` images -> per-image CachedInputs."""
    first_args, kwargs = calls[0]
    args, per_image, ks = [], [], []
    for j, a0 in enumerate(first_args):
        if isinstance(a0, torch.Tensor) and a0.dim() >= 1 and a0.shape[0] % sizes[0] == 0:
            k = a0.shape[0] // sizes[0]
            args.append(torch.cat([c[0][j].reshape(b, k, *c[0][j].shape[1:]) for c, b in zip(calls, sizes)]))
            per_image.append(True)
            ks.append(k)
        else:
            args.append(a0)
            per_image.append(False)
            ks.append(0)
    return CachedInputs(args, kwargs, per_image, ks)


def _capture(target: nn.Module, chunks, quantized: bool, scope: nn.Module) -> CachedInputs:
    """Runs each ``fn`` of ``chunks`` = [(fn, n_images)] until ``target`` is called; keeps its inputs.
    ``scope``: the module whose quantizers fp mode switches off."""
    calls, sizes = [], []

    def hook(_m, args, kwargs):
        calls.append(([_to_cpu(a) for a in args], {k: _to_cpu(v) for k, v in kwargs.items()}))
        raise _Stop

    h = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for fn, b in chunks:
            sizes.append(b)
            try:
                with torch.no_grad(), (contextlib.nullcontext() if quantized else fp_mode(scope)):
                    fn()
            except _Stop:
                pass
            else:
                raise RuntimeError("the module to capture was not called during the forward pass")
    finally:
        h.remove()
    return _stack_calls(calls, sizes)


def _image_chunks(model, images, batch_size, device):
    return [((lambda x=images[i:i + batch_size]: model(x.to(device))), min(batch_size, images.shape[0] - i))
            for i in range(0, images.shape[0], batch_size)]


def _cached_chunks(module, cached: CachedInputs, batch_size, device, sink=None):
    out = []
    for i in range(0, cached.n, batch_size):
        idx = torch.arange(i, min(i + batch_size, cached.n))

        def fn(idx=idx):
            args, kw = cached.batch(idx, device)
            y = module(*args, **kw)
            if sink is not None:
                sink.append(y)
        out.append((fn, len(idx)))
    return out


def capture_inputs(model: nn.Module, unit: nn.Module, images: torch.Tensor, batch_size: int, device,
                   quantized: bool) -> CachedInputs:
    """Runs ``model`` (fp or quantized) over ``images`` up to ``unit`` and keeps its inputs."""
    return _capture(unit, _image_chunks(model, images, batch_size, device), quantized, model)


def capture_from(block: nn.Module, cached: CachedInputs, unit: nn.Module, batch_size: int, device,
                 quantized: bool) -> CachedInputs:
    """Like capture_inputs, starting from the cached inputs of ``block`` (which contains ``unit``)."""
    if unit is block:
        return cached
    return _capture(unit, _cached_chunks(block, cached, batch_size, device), quantized, block)


@torch.no_grad()
def run_block(block: nn.Module, cached: CachedInputs, batch_size: int, device, quantized: bool) -> CachedInputs:
    """The outputs of ``block`` on its cached inputs, as the cached inputs of the next block of a
    Sequential (same keyword arguments)."""
    outs, sizes = [], []
    for fn, b in _cached_chunks(block, cached, batch_size, device, sink=outs):
        with (contextlib.nullcontext() if quantized else fp_mode(block)):
            fn()
        sizes.append(b)
    calls = [([_to_cpu(y)], cached.kwargs) for y in outs]
    return _stack_calls(calls, sizes)


def _next_in_sequential(model: nn.Module, prev: nn.Module, block: nn.Module) -> bool:
    """True when ``block`` directly follows ``prev`` in the same nn.Sequential."""
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            kids = list(m.children())
            for a, b in zip(kids, kids[1:]):
                if a is prev and b is block:
                    return True
    return False


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
    if cfg.dhe and cfg.dhe_weight > 0:
        from .ranking import DHERankingLoss
        out.append((DHERankingLoss.from_config(cfg), float(cfg.dhe_weight)))
    return out


def decline_iters(cfg: ADFQConfig) -> int:
    """Iterations a unit runs before its ``iters`` at the target width: the bit-decline
    transitions when ``bit_decline_iters`` budgets them apart, else 0."""
    if not (cfg.bit_decline and cfg.bit_decline_iters):
        return 0
    return (len(cfg.bit_decline) - 1) * cfg.bit_decline_iters


def _step_hooks(cfg: ADFQConfig) -> list:
    """cfg.step_hooks, plus a fresh bit-decline driver when cfg.bit_decline is set."""
    hooks = list(cfg.step_hooks)
    if cfg.bit_decline:
        from .bit_decline import BitDeclineHook
        extra = decline_iters(cfg)
        # transitions budgeted apart are the first `extra` of the unit's iters + extra iterations
        share = extra / (cfg.resolved("iters") + extra) if extra else cfg.bit_decline_share
        hooks.append(BitDeclineHook(cfg.bit_decline, share))
    return hooks


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
class Targets:
    """The fp unit's outputs (and attention probabilities) for every cached image, on the CPU,
    computed once per unit."""

    def __init__(self, out: torch.Tensor, probs: List[torch.Tensor]):
        self.out, self.probs = out, probs  # [n, k, ...] per image

    @staticmethod
    def _per_image(t: torch.Tensor, b: int) -> torch.Tensor:
        return t.detach().reshape(b, t.shape[0] // b, *t.shape[1:]).cpu()

    @staticmethod
    def _flat(t: torch.Tensor, device) -> torch.Tensor:
        return t.reshape(-1, *t.shape[2:]).to(device, non_blocking=True)

    def batch(self, idx: torch.Tensor, device):
        return self._flat(self.out[idx], device), [self._flat(p[idx], device) for p in self.probs]


@torch.no_grad()
def compute_targets(unit: "Unit", fp_in: CachedInputs, device, batch_size: int, with_probs: bool) -> Targets:
    outs, probs = [], []
    for i in range(0, fp_in.n, batch_size):
        idx = torch.arange(i, min(i + batch_size, fp_in.n))
        args, kw = fp_in.batch(idx, device)
        with fp_mode(unit.module), record_attention(unit.module) as mods:
            out = unit.module(*args, **kw)
            p = [m.last_probs for m in mods] if with_probs else []
        outs.append(Targets._per_image(out, len(idx)))
        probs.append([Targets._per_image(t, len(idx)) for t in p])
    return Targets(torch.cat(outs), [torch.cat(ps) for ps in zip(*probs)] if with_probs else [])


def reconstruct_unit(unit: Unit, fp_in: CachedInputs, q_in: CachedInputs, cfg: ADFQConfig, device,
                     generator: torch.Generator, bar=None, targets: Optional[Targets] = None) -> dict:
    iters, bs = cfg.resolved("iters"), cfg.resolved("batch_size")
    extra = decline_iters(cfg)      # bit-decline transitions ahead of the target-width iterations
    total = iters + extra
    n = q_in.n
    layers = unit.layers
    extras = _extra_losses(cfg) if unit.has_attention else []
    use_kl = unit.kind == "mha" and cfg.kl_weight > 0
    if targets is None:
        targets = compute_targets(unit, fp_in, device, max(bs, cfg.eval_batch_size), use_kl or bool(extras))
    v_params = [layer.weight_quant.start_adaround(layer.weight) for layer in layers]
    s_params = []
    if cfg.learn_act_scales:
        s_params = [q.scale for q in unit.act_quantizers if q.learnable_scale and q.scale.numel()]
    for p in s_params:
        p.requires_grad_(True)
    opt_v = torch.optim.Adam(v_params, lr=cfg.resolved("lr_v"))
    opt_s = torch.optim.Adam(s_params, lr=cfg.resolved("lr_scale")) if s_params else None
    for q in unit.act_quantizers:
        q.drop_prob = cfg.qdrop_prob
    first = last = None
    running = None
    hooks = _step_hooks(cfg)
    try:
        for step in range(total):
            for hook in hooks:
                hook(step, total, unit)
            idx = torch.randint(0, n, (min(bs, n),), generator=generator)
            out_fp, probs_fp = targets.batch(idx, device)
            xq, kw_q = q_in.batch(idx, device)
            with record_attention(unit.module) as mods:
                out_q = unit.module(*xq, **kw_q)
                probs_q = [m.last_probs for m in mods]
            b = len(idx)
            l_o = output_loss(out_q, out_fp, b)
            loss = l_o
            if use_kl:
                loss = loss + cfg.kl_weight * sum(attention_kl_loss(p, q, b) for p, q in zip(probs_fp, probs_q))
            if extras:
                ctx = LossContext(unit, out_fp, out_q, probs_fp, probs_q, step, total, b)
                for fn, w in extras:
                    loss = loss + w * fn(ctx)
            # L_round's schedule spans the target-width iterations: all of them, or, with the
            # transitions budgeted apart, the ones after them (V is free while the widths decline)
            beta = beta_at(step - extra, iters, cfg) if step >= extra else None
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
        for hook in hooks:  # e.g. bit decline puts every quantizer back at its target width
            if hasattr(hook, "end_unit"):
                hook.end_unit(unit)
        for q in unit.act_quantizers:
            q.drop_prob = 0.0
        for p in s_params:
            p.requires_grad_(False)
        for layer in layers:
            layer.weight_quant.harden(layer.weight)
    return {"unit": unit.name, "kind": unit.kind, "first_output_loss": first, "last_output_loss": last}


def _block_of(model: nn.Module, unit: Unit) -> nn.Module:
    """The transformer block holding a unit (the unit itself for block-wise reconstruction)."""
    if unit.kind == "block":
        return unit.module
    parent = unit.name.rpartition(".")[0]
    return model.get_submodule(parent) if parent else unit.module


class _InputStream:
    """Cached fp and quantized inputs of the current block.  Moving to the next block of the same
    nn.Sequential runs only the finished block on its cached inputs (checked once against a full
    forward); otherwise the inputs are captured from the images.  This keeps capture O(depth)."""

    def __init__(self, model, images, batch_size, device):
        self.model, self.images, self.bs, self.device = model, images, batch_size, device
        self.block = self.fp = self.q = None
        self.chain_ok = None

    def _full(self, block):
        return (capture_inputs(self.model, block, self.images, self.bs, self.device, quantized=False),
                capture_inputs(self.model, block, self.images, self.bs, self.device, quantized=True))

    def enter(self, block: nn.Module):
        if block is self.block:
            return
        prev = self.block
        if prev is not None and self.chain_ok is not False and _next_in_sequential(self.model, prev, block):
            fp = run_block(prev, self.fp, self.bs, self.device, quantized=False)
            q = run_block(prev, self.q, self.bs, self.device, quantized=True)
            if self.chain_ok is None:  # verify once that the Sequential really feeds block by block
                ref = capture_inputs(self.model, block, self.images[:self.bs], self.bs, self.device, True)
                mine = q.args[0][:ref.args[0].shape[0]]
                self.chain_ok = (len(ref.args) == 1 and ref.args[0].shape == mine.shape
                                 and torch.allclose(ref.args[0], mine, rtol=1e-4, atol=1e-5))
            if self.chain_ok:
                self.block, self.fp, self.q = block, fp, q
                return
        self.block = block
        self.fp, self.q = self._full(block)

    def unit_inputs(self, unit: Unit):
        return (capture_from(self.block, self.fp, unit.module, self.bs, self.device, quantized=False),
                capture_from(self.block, self.q, unit.module, self.bs, self.device, quantized=True))


def reconstruct(model: nn.Module, images: torch.Tensor, cfg: ADFQConfig, device=None) -> List[dict]:
    """Runs AMO (cfg.recon == 'module') or block-wise reconstruction over all units in order."""
    device = torch.device(device or next(model.parameters()).device)
    units = find_units(model, cfg.recon, images[:1].to(device))
    iters = cfg.resolved("iters")
    fwd_bs = max(cfg.resolved("batch_size"), cfg.eval_batch_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    stream = _InputStream(model, images, fwd_bs, device)
    stats = []
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=(iters + decline_iters(cfg)) * len(units),
                   desc=f"{'AMO' if cfg.recon == 'module' else 'block'} reconstruction", unit="it", dynamic_ncols=True)
    try:
        for unit in units:
            t0 = time.perf_counter()
            stream.enter(_block_of(model, unit))
            fp_in, q_in = stream.unit_inputs(unit)
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
