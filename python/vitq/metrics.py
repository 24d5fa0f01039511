"""Quantization metrics: SQNR (dB), attention KL, ARPR, and a per-layer report of a fake-quant model.

Definitions (also in docs/calibration.md):

* SQNR(x, x_hat) = 10 log10( sum x^2 / sum (x - x_hat)^2 ) dB, over all elements (inf if equal).
* Attention KL = mean over attention rows (image, head, query) of
  KL(p || p_hat) = sum_j p_j (log p_j - log p_hat_j), p the fp model's softmax row, p_hat the
  quantized model's softmax row *before* P's own quantizer (p_hat > 0, so the KL is finite).
* ARPR (attention ranking preservation rate) = over the pairs (j, k) of key positions in every
  attention row (all pairs, or ``pairs`` random ones per row), excluding pairs tied in the fp row
  (p_j == p_k), the share whose order is kept: sign(p_hat_j - p_hat_k) == sign(p_j - p_k).  A pair
  that the quantized row ties counts as not kept.  p_hat is the same row as for the KL.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .wrap import attention_modules, fp_mode, quant_layers, record_attention


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    noise = (ref - test).pow(2).sum()
    signal = ref.pow(2).sum()
    if float(noise) == 0:
        return math.inf
    return float(10 * torch.log10(signal / noise))


def attention_kl(p: torch.Tensor, p_hat: torch.Tensor) -> float:
    """Mean KL(p_row || p_hat_row) over the rows of [..., N] probability tensors."""
    p, q = p.double(), p_hat.double().clamp_min(1e-300)
    kl = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.log()), torch.zeros_like(p)).sum(-1)
    return float(kl.mean())


def _pair_counts(p, q, j, k):
    dp = p.gather(-1, j) - p.gather(-1, k)
    dq = q.gather(-1, j) - q.gather(-1, k)
    valid = dp != 0
    kept = valid & (torch.sign(dp) == torch.sign(dq))
    return int(kept.sum()), int(valid.sum())


def arpr(p: torch.Tensor, p_hat: torch.Tensor, pairs: Optional[int] = 256,
         generator: Optional[torch.Generator] = None) -> tuple:
    """(kept, counted) pair counts of the ARPR definition above; ARPR = kept / counted.

    ``pairs=None`` uses every pair j < k of each row (N(N-1)/2 per row)."""
    if p.shape != p_hat.shape:
        raise ValueError(f"shape mismatch {tuple(p.shape)} vs {tuple(p_hat.shape)}")
    N = p.shape[-1]
    rows_p, rows_q = p.reshape(-1, N).float(), p_hat.reshape(-1, N).float()
    if pairs is None:
        jj, kk = torch.triu_indices(N, N, offset=1, device=p.device)
        kept = counted = 0
        for i in range(0, rows_p.shape[0], 256):
            a, b = rows_p[i:i + 256], rows_q[i:i + 256]
            j = jj.expand(a.shape[0], -1)
            k = kk.expand(a.shape[0], -1)
            kk_, cc_ = _pair_counts(a, b, j, k)
            kept, counted = kept + kk_, counted + cc_
        return kept, counted
    g = generator or torch.Generator().manual_seed(0)
    R = rows_p.shape[0]
    j = torch.randint(0, N, (R, pairs), generator=g).to(p.device)
    k = (j + torch.randint(1, N, (R, pairs), generator=g).to(p.device)) % N  # k != j
    return _pair_counts(rows_p, rows_q, j, k)


@torch.no_grad()
def layer_report(qmodel: nn.Module, images: torch.Tensor, batch_size: int = 16, pairs: Optional[int] = 256,
                 device=None) -> dict:
    """Per quantized layer: SQNR (dB) of its output, quantized model vs the same model in fp mode,
    on the same images (errors accumulate along the network).  Per attention module: KL and ARPR.
    Returns {"layers": {name: sqnr}, "attention": {name: {"kl", "arpr"}}, "mean_attention_kl",
    "arpr", "mean_layer_sqnr"}."""
    dev = torch.device(device) if device is not None else next(qmodel.parameters()).device
    layers = dict(quant_layers(qmodel))
    attns = dict(attention_modules(qmodel))
    sig = {n: 0.0 for n in layers}
    noise = {n: 0.0 for n in layers}
    kl_sum = {n: 0.0 for n in attns}
    kl_rows = {n: 0 for n in attns}
    kept = {n: 0 for n in attns}
    counted = {n: 0 for n in attns}
    g = torch.Generator().manual_seed(0)
    outs = {}

    def hook_for(name):
        def hook(_m, _i, out):
            outs[name] = out.detach().double()
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in layers.items()]
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(dev)
            with fp_mode(qmodel), record_attention(qmodel):
                qmodel(x)
                ref_out = dict(outs)
                ref_p = {n: m.last_probs for n, m in attns.items()}
            with record_attention(qmodel):
                qmodel(x)
                q_p = {n: m.last_probs for n, m in attns.items()}
            for n in layers:
                sig[n] += float(ref_out[n].pow(2).sum())
                noise[n] += float((ref_out[n] - outs[n]).pow(2).sum())
            for n in attns:
                rows = ref_p[n].numel() // ref_p[n].shape[-1]
                kl_sum[n] += attention_kl(ref_p[n], q_p[n]) * rows
                kl_rows[n] += rows
                a, b = arpr(ref_p[n], q_p[n], pairs, g)
                kept[n] += a
                counted[n] += b
            outs.clear()
    finally:
        for h in handles:
            h.remove()
    layer_sqnr = {n: (math.inf if noise[n] == 0 else 10 * math.log10(sig[n] / noise[n])) for n in layers}
    att = {n: {"kl": kl_sum[n] / max(1, kl_rows[n]), "arpr": kept[n] / max(1, counted[n])} for n in attns}
    finite = [v for v in layer_sqnr.values() if math.isfinite(v)]
    return {
        "layers": layer_sqnr,
        "attention": att,
        "mean_layer_sqnr": sum(finite) / len(finite) if finite else math.inf,
        "mean_attention_kl": sum(kl_sum.values()) / max(1, sum(kl_rows.values())),
        "arpr": sum(kept.values()) / max(1, sum(counted.values())),
    }


@torch.no_grad()
def attention_ranking(qmodel: nn.Module, images: torch.Tensor, batch_size: int = 16, pairs: Optional[int] = 256,
                      device=None) -> dict:
    """ARPR alone (cheap: two forwards per batch, no per-layer hooks), over every attention row of
    every attention module on ``images``: {"arpr", "kept", "counted", "images", "pairs_per_row"}."""
    dev = torch.device(device) if device is not None else next(qmodel.parameters()).device
    attns = dict(attention_modules(qmodel))
    if not attns:
        raise ValueError("ARPR needs a quantized model with attention modules")
    g = torch.Generator().manual_seed(0)
    kept = counted = 0
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(dev)
        with fp_mode(qmodel), record_attention(qmodel):
            qmodel(x)
            ref_p = [m.last_probs for m in attns.values()]
        with record_attention(qmodel):
            qmodel(x)
            q_p = [m.last_probs for m in attns.values()]
        for a, b in zip(ref_p, q_p):
            k, c = arpr(a, b, pairs, g)
            kept, counted = kept + k, counted + c
    return {"arpr": kept / max(1, counted), "kept": kept, "counted": counted, "images": int(images.shape[0]),
            "pairs_per_row": pairs}
