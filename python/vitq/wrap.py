"""Model wrapper: puts a fake quantizer on the input of every matmul of a timm ViT.

Covered (seed 002 sec. 4.1): qkv, q.k^T (q and k), attn.v (the post-softmax P and v), proj, fc1,
fc2, the patch embedding and the classifier head(s), plus Swin's patch-merging reduction.
LayerNorm and softmax stay in floating point.

Supported modules: timm ``Attention`` (ViT, DeiT incl. distilled, DINOv2 with layer scale),
Swin ``WindowAttention`` (relative-position bias, shifted-window mask), timm ``Mlp``, patch-embed
``Conv2d`` and any other ``nn.Linear`` (heads, patch merging).  Any other module that holds a
matmul (attention variants, GLU MLPs, non-patch convolutions, nn.MultiheadAttention) is refused
with an error naming it, since its matmuls would silently stay in fp.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import exact
from .config import ADFQConfig
from .quantizers import (ActQuantizer, Log2Quantizer, ShiftLog2Quantizer, TruncatedLog2Quantizer,
                         UniformActQuantizer, WeightQuantizer)

try:  # timm is optional for the quantizers, required for wrapping
    from timm.layers import Attention as TimmAttention
    from timm.layers import Mlp as TimmMlp
except ImportError:  # pragma: no cover
    TimmAttention = TimmMlp = None
try:
    from timm.models.swin_transformer import WindowAttention as SwinWindowAttention
except ImportError:  # pragma: no cover
    SwinWindowAttention = None


class UnsupportedModuleError(NotImplementedError):
    """A module holds a matmul that the wrapper cannot quantize."""


# ---------------------------------------------------------------------------------------------
# quantized layers
# ---------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """y = x_hat W_hat^T + b with x_hat = act_quant(x), W_hat = weight_quant(W)."""

    def __init__(self, linear: nn.Linear, act_quant: ActQuantizer, weight_quant: WeightQuantizer, role: str):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.act_quant, self.weight_quant, self.role = act_quant, weight_quant, role

    def extra_repr(self):
        return f"role={self.role}, in={self.in_features}, out={self.out_features}"

    def forward(self, x):
        if exact.linear_ready(self):   # evaluation: the kernels' integer arithmetic (exact.py)
            return exact.linear(self, x)
        return F.linear(self.act_quant(x), self.weight_quant(self.weight), self.bias)


class QuantConv2d(nn.Module):
    """Patch-embedding convolution with a per-tensor input quantizer and per-channel weights.

    Quantizing the image elementwise before the convolution equals quantizing the im2col rows that
    a GEMM kernel consumes, since the quantizer has one scale."""

    def __init__(self, conv: nn.Conv2d, act_quant: ActQuantizer, weight_quant: WeightQuantizer, role: str):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise UnsupportedModuleError(f"Conv2d padding_mode={conv.padding_mode!r} is not supported")
        self.act_quant, self.weight_quant, self.role = act_quant, weight_quant, role

    def forward(self, x):
        if exact.conv_ready(self):
            return exact.conv(self, x)
        return F.conv2d(self.act_quant(x), self.weight_quant(self.weight), self.bias, self.stride,
                        self.padding, self.dilation, self.groups)


class _QuantAttentionBase(nn.Module):
    """Shared attention core: q, k, v per-tensor uniform; S = (q_hat k_hat^T) * scale + bias;
    P = softmax(S) in fp32; P_hat log2 (or uniform); out = P_hat v_hat.

    ``record_probs``: keep the fp32 softmax output (before P's quantizer) in ``last_probs`` for the
    AMO KL loss and the attention metrics; ``last_probs_hat`` holds P_hat."""

    def _init_quant(self, cfg: ADFQConfig, num_heads: int, head_dim: int, scale: float):
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.q_quant = UniformActQuantizer(cfg.a_bits, "tensor", init=cfg.a_init)
        self.k_quant = UniformActQuantizer(cfg.a_bits, "tensor", init=cfg.a_init)
        self.v_quant = UniformActQuantizer(cfg.a_bits, "tensor", init=cfg.a_init)
        if cfg.softmax_quant == "log2":
            self.p_quant = Log2Quantizer(cfg.a_bits, cfg.softmax_substeps_resolved)
        elif cfg.softmax_quant == "tul2":
            self.p_quant = TruncatedLog2Quantizer(cfg.a_bits, sample_seed=cfg.seed)
        else:
            self.p_quant = UniformActQuantizer(cfg.a_bits, "tensor", init=cfg.a_init)
        self.record_probs = False
        self.last_probs = self.last_probs_hat = None

    def _attend(self, q, k, v, bias=None):
        if exact.attention_ready(self):
            return exact.attention(self, q, k, v, bias)
        q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if bias is not None:
            attn = attn + bias
        probs = attn.float().softmax(dim=-1)
        if self.p_quant.observing and hasattr(self.p_quant, "observe_values"):
            self.p_quant.observe_values(v)          # tul2 calibrates on the output error (P^ - P) V
        p_hat = self.p_quant(probs)
        if self.record_probs:
            self.last_probs, self.last_probs_hat = probs, p_hat
        return p_hat.to(v.dtype) @ v


class QuantAttention(_QuantAttentionBase):
    """timm ``Attention`` (ViT, DeiT, DINOv2) with every matmul input quantized."""

    def __init__(self, attn, cfg: ADFQConfig):
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise UnsupportedModuleError("timm Attention with gated=True is not supported")
        self._init_quant(cfg, attn.num_heads, attn.head_dim, attn.scale)
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.qkv = make_linear(attn.qkv, "qkv", cfg)
        self.proj = make_linear(attn.proj, "proj", cfg)
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, getattr(attn, "norm", nn.Identity())
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None
        if is_causal:
            bias = x.new_full((N, N), float("-inf")).triu_(1)
        elif attn_mask is not None:
            bias = attn_mask if attn_mask.dtype != torch.bool else \
                torch.zeros_like(attn_mask, dtype=x.dtype).masked_fill_(~attn_mask, float("-inf"))
        out = self._attend(q, k, v, bias)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out)
        return self.proj_drop(self.proj(out))


class QuantWindowAttention(_QuantAttentionBase):
    """Swin ``WindowAttention``: relative-position bias and the shifted-window mask are added to S
    before the softmax, as in timm's unfused path."""

    def __init__(self, attn, cfg: ADFQConfig):
        super().__init__()
        head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        self._init_quant(cfg, attn.num_heads, head_dim, attn.scale)
        self.window_area = attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.relative_position_bias_table.requires_grad_(False)
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv = make_linear(attn.qkv, "qkv", cfg)
        self.proj = make_linear(attn.proj, "proj", cfg)
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop

    def _rel_pos_bias(self):
        n = self.window_area
        b = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return b.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x, mask=None):
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self._rel_pos_bias()
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0))            # [1, nW, H, N, N]
            bias = bias.expand(B_ // nw, -1, -1, -1, -1).reshape(B_, self.num_heads, N, N)
        out = self._attend(q, k, v, bias)
        out = out.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(out))


# ---------------------------------------------------------------------------------------------
# factories
# ---------------------------------------------------------------------------------------------
def act_quantizer_for(role: str, cfg: ADFQConfig, slq_shift=None) -> ActQuantizer:
    """The activation quantizer of a matmul input, by role (seed 002 sec. 4.1)."""
    if role in ("qkv", "fc1") and cfg.poq:
        alpha = cfg.alpha_qkv if role == "qkv" else cfg.alpha_fc1
        return UniformActQuantizer(cfg.a_bits, cfg.poq_granularity, alpha=alpha, capacity=cfg.outlier_capacity,
                                   init=cfg.a_init, capacity_factor=cfg.capacity_factor,
                                   min_capacity=cfg.min_capacity)
    if role == "fc2" and cfg.slq:
        return ShiftLog2Quantizer(cfg.a_bits, cfg.slq_substeps_resolved, slq_shift if slq_shift is not None else cfg.slq_shift,
                                  cfg.slq_eps, init="minmax" if cfg.a_init == "minmax" else "mse")
    bits = {"stem": cfg.stem_bits, "head": cfg.head_bits}.get(role, cfg.a_bits)
    return UniformActQuantizer(bits, "tensor", init=cfg.a_init)


def weight_quantizer_for(role: str, cfg: ADFQConfig) -> WeightQuantizer:
    bits = {"stem": cfg.stem_bits, "head": cfg.head_bits}.get(role, cfg.w_bits)
    return WeightQuantizer(bits, symmetric=cfg.w_symmetric, init=cfg.w_init)


def make_linear(linear: nn.Module, role: str, cfg: ADFQConfig, slq_shift=None) -> QuantLinear:
    if type(linear) is not nn.Linear:
        raise UnsupportedModuleError(f"expected nn.Linear for role {role!r}, got {type(linear).__name__}")
    return QuantLinear(linear, act_quantizer_for(role, cfg, slq_shift), weight_quantizer_for(role, cfg), role)


def _is_exact_gelu(act: nn.Module) -> bool:
    return isinstance(act, nn.GELU) and getattr(act, "approximate", "none") == "none"


# ---------------------------------------------------------------------------------------------
# the walk
# ---------------------------------------------------------------------------------------------
_QUANT_TYPES = (QuantLinear, QuantConv2d, QuantAttention, QuantWindowAttention)
_MATMUL_HINTS = ("attention", "attn", "mlp", "glu", "mixer")


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def wrap_model(model: nn.Module, cfg: ADFQConfig) -> nn.Module:
    """Replaces, in place, every supported matmul holder of ``model`` with its quantized version.

    Quantizers start uncalibrated; ``vitq.quantize`` calibrates them.  Raises
    ``UnsupportedModuleError`` naming every module it cannot quantize (nothing is changed then)."""
    if TimmAttention is None:
        raise ImportError("wrapping needs timm (pip install timm)")
    if any(isinstance(m, _QUANT_TYPES) for m in model.modules()):
        raise ValueError("model is already wrapped")
    plan: Dict[str, nn.Module] = {}
    problems: List[str] = []
    covered = set()

    def claim(prefix):
        covered.update(n for n, _ in model.named_modules() if n == prefix or n.startswith(prefix + "."))

    for name, m in model.named_modules():
        if name in covered:
            continue
        t = type(m)
        if t is TimmAttention:
            plan[name] = ("attn", m)
            claim(name)
        elif SwinWindowAttention is not None and t is SwinWindowAttention:
            plan[name] = ("wattn", m)
            claim(name)
        elif t is TimmMlp:
            if not isinstance(m.norm, nn.Identity):
                problems.append(f"{name} ({t.__name__} with a norm between fc1 and fc2)")
            if type(m.fc1) is not nn.Linear or type(m.fc2) is not nn.Linear:
                problems.append(f"{name} ({t.__name__} with non-Linear fc layers, e.g. use_conv=True)")
            plan[name] = ("mlp", m)
            claim(name)
        elif t is nn.Linear:
            role = "merge" if name.endswith("reduction") or ".downsample." in name else "head"
            plan[name] = (role, m)
        elif t is nn.Conv2d:
            if "patch_embed" in name or type(model.get_submodule(name.rpartition(".")[0] or "")).__name__.startswith("PatchEmbed"):
                plan[name] = ("stem", m)
            else:
                problems.append(f"{name} (Conv2d outside the patch embedding)")
        elif isinstance(m, (nn.MultiheadAttention, nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d,
                            nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear)):
            problems.append(f"{name} ({t.__name__})")
        elif name and any(h in t.__name__.lower() for h in _MATMUL_HINTS) and _has_own_matmul_params(m):
            problems.append(f"{name} ({t.__module__}.{t.__name__})")
    if problems:
        raise UnsupportedModuleError(
            "cannot quantize these modules (their matmuls would stay in floating point): "
            + "; ".join(problems) + ". Supported: timm Attention, Swin WindowAttention, timm Mlp, "
            "patch-embed Conv2d and nn.Linear.")
    if not any(kind in ("attn", "wattn") for kind, _ in plan.values()):
        raise UnsupportedModuleError(f"no supported attention module found in {type(model).__name__}")

    for name, (kind, m) in plan.items():
        if kind == "attn":
            _set_child(model, name, QuantAttention(m, cfg))
        elif kind == "wattn":
            _set_child(model, name, QuantWindowAttention(m, cfg))
        elif kind == "mlp":
            shift = None if _is_exact_gelu(m.act) else "calibrated"
            m.fc1 = make_linear(m.fc1, "fc1", cfg)
            m.fc2 = make_linear(m.fc2, "fc2", cfg, slq_shift=shift)
        elif kind == "stem":
            _set_child(model, name, QuantConv2d(m, act_quantizer_for("stem", cfg), weight_quantizer_for("stem", cfg), "stem"))
        else:
            _set_child(model, name, make_linear(m, kind, cfg))
    for p in model.parameters():
        p.requires_grad_(False)
    exact.attach_producers(model)
    model.vitq_config = cfg
    return model


def _has_own_matmul_params(m: nn.Module) -> bool:
    """A module with a >= 2-D parameter of its own or a Linear child we would not reach as such."""
    own = any(p.dim() >= 2 for p in m.parameters(recurse=False))
    return own or any(isinstance(c, nn.Linear) for c in m.children())


# ---------------------------------------------------------------------------------------------
# iteration and modes
# ---------------------------------------------------------------------------------------------
def quant_layers(model: nn.Module) -> Iterator:
    """(name, QuantLinear | QuantConv2d) in module order."""
    for n, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            yield n, m


def attention_modules(model: nn.Module) -> Iterator:
    for n, m in model.named_modules():
        if isinstance(m, _QuantAttentionBase):
            yield n, m


def act_quantizers(model: nn.Module) -> Iterator:
    for n, m in model.named_modules():
        if isinstance(m, ActQuantizer):
            yield n, m


def weight_quantizers(model: nn.Module) -> Iterator:
    for n, m in model.named_modules():
        if isinstance(m, WeightQuantizer):
            yield n, m


@contextlib.contextmanager
def fp_mode(module: nn.Module):
    """Every quantizer under ``module`` becomes the identity (the floating-point model)."""
    qs = [m for m in module.modules() if isinstance(m, (ActQuantizer, WeightQuantizer))]
    saved = [q.enabled for q in qs]
    for q in qs:
        q.enabled = False
    try:
        yield module
    finally:
        for q, e in zip(qs, saved):
            q.enabled = e


@contextlib.contextmanager
def record_attention(module: nn.Module):
    """Attention modules under ``module`` keep their last probabilities (see _QuantAttentionBase)."""
    mods = [m for m in module.modules() if isinstance(m, _QuantAttentionBase)]
    for m in mods:
        m.record_probs = True
    try:
        yield mods
    finally:
        for m in mods:
            m.record_probs = False
            m.last_probs = m.last_probs_hat = None


def is_wrapped(model: nn.Module) -> bool:
    return any(isinstance(m, _QUANT_TYPES) for m in model.modules())
