"""Exact (fp-equivalent) model rewrites applied before calibration.

Key centering: softmax(q . (k_j - c)) = softmax(q . k_j - q . c) = softmax(q . k_j) for any vector c,
because q . c is the same for every key j of a row.  Subtracting from every key the per-channel
midpoint of its calibration range therefore leaves the fp model unchanged while it shrinks the range
that the per-tensor key quantizer has to cover (DINOv2-S: from +-38 to +-6 in block 3).  It is done
by editing the key part of the qkv bias, so the exported kernels need nothing new.  Not applied
when a LayerNorm acts on k (qk_norm), where the shift would not commute.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .wrap import QuantAttention, QuantWindowAttention, attention_modules, fp_mode


def _keys_view(qkv_out: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The k part of a fused qkv output [..., 3 * H * hd] as [rows, H * hd]."""
    return qkv_out.reshape(-1, 3, qkv_out.shape[-1] // 3)[:, 1]


@torch.no_grad()
def center_keys(qmodel: nn.Module, images: torch.Tensor, batch_size: int, device) -> dict:
    """Shifts every supported attention module's keys by their per-channel calibration midpoint.
    Returns {module name: largest |shift|}."""
    mods = {}
    for name, m in attention_modules(qmodel):
        if isinstance(m, QuantAttention) and not isinstance(m.k_norm, nn.Identity):
            continue
        if isinstance(m, (QuantAttention, QuantWindowAttention)):
            mods[name] = m
    lo, hi, hooks = {}, {}, []

    def hook_for(name, m):
        def hook(_mod, _inp, out):
            k = _keys_view(out.float(), m.num_heads)
            mn, mx = k.amin(0), k.amax(0)
            lo[name] = mn if name not in lo else torch.minimum(lo[name], mn)
            hi[name] = mx if name not in hi else torch.maximum(hi[name], mx)
        return hook

    for name, m in mods.items():
        hooks.append(m.qkv.register_forward_hook(hook_for(name, m)))
    try:
        with fp_mode(qmodel):
            for i in range(0, images.shape[0], batch_size):
                qmodel(images[i:i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    shifts = {}
    for name, m in mods.items():
        if name not in lo:
            continue
        c = (lo[name] + hi[name]) / 2
        lin = m.qkv
        d = lin.out_features // 3
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, device=lin.weight.device,
                                                dtype=lin.weight.dtype), requires_grad=False)
        lin.bias.data[d:2 * d] -= c.to(lin.bias.dtype)
        shifts[name] = float(c.abs().max())
    return shifts
