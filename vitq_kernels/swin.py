"""Deploy modules of the Swin Transformer on the vitq ops (issue 5B).

A Swin block is a pre-norm block whose attention runs inside windows:

    x [B, H, W, C] ─ roll(-shift) ─ window partition ─ layernorm_quantize ─ qkv qgemm
      ─ log2_attention(bias = relative-position bias + shift mask) ─ proj qgemm
      ─ window reverse ─ roll(+shift) ─ + x ─ layernorm_quantize ─ fc1+GELU+Shift-Log2 ─ fc2 ─ + x

LayerNorm and the quantizers act on each token on its own, so rolling and partitioning the
residual stream *before* the fused LayerNorm-quantize gives the same codes as timm's order
(norm, then roll and partition); the roll and partition are plain index permutations.  The
attention bias is input-independent: the relative-position bias [H, N, N] plus, for shifted
blocks, the -100 mask of each window [nW, N, N], summed in fp32 exactly as the fake-quant
attention sums them, and stored as one [nW or 1, H, N, N] buffer that log2_attention adds to the
logits (window w of image i is batch item i * nW + w, which uses bias[w]).

Patch merging: the 2x2 neighbourhood gather (a permutation), layernorm_quantize over 4C, and
the reduction qgemm (no bias).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import QAttention, QLayerNormQuant, QLinear, QMlp


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


class QSwinBlock(nn.Module):
    """A (shifted-)window attention block on the ops; input and output [B, H, W, C]."""

    def __init__(self, ln1: QLayerNormQuant, attn: QAttention, ln2: QLayerNormQuant, mlp: QMlp,
                 window_size, shift_size, attn_bias: torch.Tensor):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = ln1, attn, ln2, mlp
        self.window_size, self.shift_size = _pair(window_size), _pair(shift_size)
        N = self.window_size[0] * self.window_size[1]
        if attn_bias.dim() != 4 or attn_bias.shape[1:] != (attn.num_heads, N, N):
            raise ValueError(f"attn_bias must be [nW or 1, {attn.num_heads}, {N}, {N}], got {tuple(attn_bias.shape)}")
        self.register_buffer("attn_bias", attn_bias.detach().float().contiguous().clone())

    def extra_repr(self):
        return f"window={self.window_size}, shift={self.shift_size}, bias_windows={self.attn_bias.shape[0]}"

    def forward(self, x):
        B, H, W, C = x.shape
        wh, ww = self.window_size
        if H % wh or W % ww:
            raise ValueError(f"feature map {H}x{W} is not a multiple of the window {wh}x{ww}; the deploy Swin "
                             "block does not pad (export at the calibrated resolution)")
        nh, nw = H // wh, W // ww
        if self.attn_bias.shape[0] not in (1, nh * nw):
            raise ValueError(f"the attention bias holds {self.attn_bias.shape[0]} windows but a {H}x{W} map has "
                             f"{nh * nw}; the shift mask depends on the resolution it was exported at")
        dtype = x.dtype
        r = x.float()
        sh, sw = self.shift_size
        shifted = torch.roll(r, shifts=(-sh, -sw), dims=(1, 2)) if (sh or sw) else r
        rows = shifted.reshape(B, nh, wh, nw, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, C).contiguous()
        a = self.attn(self.ln1(rows), B * nh * nw, wh * ww, self.attn_bias)            # fp32 [rows, C]
        a = a.reshape(B, nh, nw, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        if sh or sw:
            a = torch.roll(a, shifts=(sh, sw), dims=(1, 2))
        r = (r + a).reshape(B * H * W, C)
        r = r + self.mlp(self.ln2(r))
        return r.reshape(B, H, W, C).to(dtype)


class QPatchMerging(nn.Module):
    """Swin patch merging: 2x2 gather -> fused LayerNorm-quantize (4C) -> reduction qgemm."""

    def __init__(self, ln: QLayerNormQuant, reduction: QLinear):
        super().__init__()
        self.ln, self.reduction = ln, reduction

    def forward(self, x):
        B, H, W, C = x.shape
        dtype = x.dtype
        x = F.pad(x.float(), (0, 0, 0, W % 2, 0, H % 2))
        _, H, W, _ = x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(-1, 4 * C).contiguous()
        y = self.reduction.gemm(self.ln(x))
        return y.reshape(B, H // 2, W // 2, -1).to(dtype)


# configs (see modules.module_config): structure only, the buffers come from the state dict
TYPES = ("QSwinBlock", "QPatchMerging")


def module_config(m: nn.Module) -> dict:
    from .modules import module_config as cfg_of
    if isinstance(m, QSwinBlock):
        return {"type": "QSwinBlock", "ln1": cfg_of(m.ln1), "attn": cfg_of(m.attn), "ln2": cfg_of(m.ln2),
                "mlp": cfg_of(m.mlp), "window_size": list(m.window_size), "shift_size": list(m.shift_size),
                "bias_windows": int(m.attn_bias.shape[0])}
    if isinstance(m, QPatchMerging):
        return {"type": "QPatchMerging", "ln": cfg_of(m.ln), "reduction": cfg_of(m.reduction)}
    raise TypeError(f"not a Swin deploy module: {type(m).__name__}")


def module_from_config(cfg: dict) -> nn.Module:
    from .modules import module_from_config as build
    if cfg["type"] == "QSwinBlock":
        attn = build(cfg["attn"])
        N = cfg["window_size"][0] * cfg["window_size"][1]
        return QSwinBlock(build(cfg["ln1"]), attn, build(cfg["ln2"]), build(cfg["mlp"]), cfg["window_size"],
                          cfg["shift_size"], torch.zeros(cfg["bias_windows"], attn.num_heads, N, N))
    if cfg["type"] == "QPatchMerging":
        return QPatchMerging(build(cfg["ln"]), build(cfg["reduction"]))
    raise ValueError(f"unknown Swin deploy module type {cfg['type']!r}")
