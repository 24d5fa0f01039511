"""DHE (seed 000): an attention *ranking* loss added to AMO's MHA loss.

The loss compares, pair by pair, the order of two keys in an attention row of the fp model (p,
the target) with their order in the quantized model (p_hat, the softmax output before P's own
quantizer, with gradient).  For one row and one pair (j, k) with d = p_j - p_k (d != 0),
d_hat = p_hat_j - p_hat_k and sigma = sign(d):

    l_jk = max(0, tau_jk - sigma * d_hat),      tau_jk = min(m_row, |d|)

the hinge of Liu et al. 2021 on the orderings, with a margin tau that

* (a) **dynamic margin** (``margin_quantile`` = q): m_row is the q-quantile of the row's fp gaps
  |d| over its (sampled, non-tied) pairs, so it follows each row's attention distribution; with
  ``margin_quantile=None`` m_row is the fixed threshold ``fixed_margin`` for every row;
* is capped by the pair's own fp gap |d|: the fp attention itself (p_hat = p) has zero loss, and
  no pair is asked to be separated more than the fp model separates it.

So l = 0 for every pair iff each pair keeps its fp order with a quantized gap of at least
min(m_row, |d|); a swapped pair costs at least tau > 0.

* (b) **sensitivity weighting** (``sensitivity``): w_jk = N (p_j + p_k) / (2 sum_l p_l), the
  pair's share of the fp attention mass relative to an average pair (mean 1 under uniform pair
  sampling); off: w = 1.
* (c) **multi-head normalization** (``head_norm``): head h's loss is divided by s_h, the mean fp
  gap |d| over that head's sampled pairs in the batch (detached), so every head's term is in units
  of its own gap scale and a head whose probabilities are 100x larger weighs the same; off: one
  scale s, the mean over all heads, for the whole module (the loss keeps the same units).

    L_rank = (1/B) sum_modules sum_h (1/s_h) sum_rows mean_{valid pairs} w_jk l_jk

(B images; rows = query rows of head h (Swin: of every window); summed over heads and rows and
averaged over images like AMO's L_as.)  Pairs: ``pairs`` per row drawn uniformly with replacement among ordered pairs j != k
(j uniform, k uniform among the others), fresh at every call; all unordered pairs j < k when
N(N-1)/2 <= ``pairs`` or ``pairs=None``.  Pairs tied in the fp row (d == 0, e.g. two masked keys)
are excluded everywhere (margin quantile, scale, loss).

Enable with ``ADFQConfig(dhe=True, dhe_weight=...)`` or as a named extra term
``mha_extra_losses=[("dhe_ranking", weight)]`` (default settings).  docs/dhe.md has the details.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .reconstruct import LossContext, register_mha_loss

_EPS = 1e-12


def sample_pairs(n_rows: int, n_keys: int, pairs: Optional[int], generator: Optional[torch.Generator] = None,
                 device=None):
    """(j, k) index tensors [n_rows, K]: all j < k when cheap or ``pairs`` is None, else ``pairs``
    uniformly drawn ordered pairs j != k per row."""
    if n_keys < 2:
        raise ValueError(f"ranking needs at least 2 keys per row, got {n_keys}")
    total = n_keys * (n_keys - 1) // 2
    if pairs is None or total <= pairs:
        jj, kk = torch.triu_indices(n_keys, n_keys, offset=1, device=device)
        return jj.expand(n_rows, -1), kk.expand(n_rows, -1)
    j = torch.randint(0, n_keys, (n_rows, pairs), generator=generator)
    k = (j + torch.randint(1, n_keys, (n_rows, pairs), generator=generator)) % n_keys
    return j.to(device), k.to(device)


@dataclasses.dataclass
class DHERankingLoss:
    """Callable ``fn(ctx: LossContext) -> scalar``; see the module docstring for the definition."""

    margin_quantile: Optional[float] = 0.5
    fixed_margin: float = 0.0
    sensitivity: bool = True
    head_norm: bool = True
    pairs: Optional[int] = 64
    seed: int = 0

    def __post_init__(self):
        if self.margin_quantile is not None and not 0.0 <= float(self.margin_quantile) <= 1.0:
            raise ValueError(f"dhe margin quantile must be in [0, 1] or None, got {self.margin_quantile!r}")
        if not self.fixed_margin >= 0:
            raise ValueError(f"dhe fixed margin must be >= 0, got {self.fixed_margin!r}")
        if self.pairs is not None and (not isinstance(self.pairs, int) or self.pairs < 1):
            raise ValueError(f"dhe pairs must be a positive int or None, got {self.pairs!r}")
        self._gen = torch.Generator().manual_seed(self.seed)

    @classmethod
    def from_config(cls, cfg) -> "DHERankingLoss":
        return cls(margin_quantile=cfg.dhe_margin_quantile, fixed_margin=cfg.dhe_fixed_margin,
                   sensitivity=cfg.dhe_sensitivity, head_norm=cfg.dhe_head_norm, pairs=cfg.dhe_pairs,
                   seed=cfg.seed)

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        total = None
        for p, p_hat in zip(ctx.probs_fp, ctx.probs_q):
            term = self.loss(p, p_hat, ctx.n_images or None)
            total = term if total is None else total + term
        if total is None:
            raise RuntimeError("the DHE ranking loss needs attention probabilities (a unit with attention)")
        return total

    def loss(self, p: torch.Tensor, p_hat: torch.Tensor, n_images: Optional[int] = None) -> torch.Tensor:
        """L_rank of one attention module: p (fp target) and p_hat (quantized, with grad), both
        [B, H, Nq, Nk]; summed over heads and rows, divided by ``n_images`` (default B; Swin's
        window attention has B = images x windows)."""
        return self.head_terms(p, p_hat, n_images).sum()

    def head_terms(self, p: torch.Tensor, p_hat: torch.Tensor, n_images: Optional[int] = None) -> torch.Tensor:
        """Each head's term of ``loss`` ([H], summing to it)."""
        if p.shape != p_hat.shape or p.dim() != 4:
            raise ValueError(f"expected two [B, H, Nq, Nk] tensors, got {tuple(p.shape)} and {tuple(p_hat.shape)}")
        B, H, Nq, Nk = p.shape
        rows_p = p.detach().float().reshape(B * H * Nq, Nk)
        rows_q = p_hat.float().reshape(B * H * Nq, Nk)
        j, k = sample_pairs(rows_p.shape[0], Nk, self.pairs, self._gen, p.device)
        pj, pk = rows_p.gather(1, j), rows_p.gather(1, k)
        d = pj - pk
        d_hat = rows_q.gather(1, j) - rows_q.gather(1, k)
        valid = d != 0
        gap = d.abs()
        if self.margin_quantile is not None:
            m = torch.nanquantile(torch.where(valid, gap, torch.full_like(gap, float("nan"))),
                                  float(self.margin_quantile), dim=1, keepdim=True)
            m = torch.nan_to_num(m, nan=0.0)
        else:
            m = torch.full_like(gap[:, :1], float(self.fixed_margin))
        tau = torch.minimum(m, gap)
        hinge = torch.relu(tau - torch.sign(d) * d_hat)
        if self.sensitivity:
            mass = rows_p.sum(dim=1, keepdim=True).clamp_min(_EPS)
            hinge = hinge * (Nk * (pj + pk) / (2 * mass))
        hinge = torch.where(valid, hinge, torch.zeros_like(hinge))
        row_loss = (hinge.sum(dim=1) / valid.sum(dim=1).clamp_min(1)).reshape(B, H, Nq)
        # gap scale: per head, or one for the whole module (the loss keeps the same units)
        gap_sum = torch.where(valid, gap, torch.zeros_like(gap)).reshape(B, H, -1).sum(dim=(0, 2))
        cnt = valid.reshape(B, H, -1).sum(dim=(0, 2))
        if self.head_norm:
            scale = gap_sum / cnt.clamp_min(1)
        else:
            scale = (gap_sum.sum() / cnt.sum().clamp_min(1)).expand(H)
        return row_loss.sum(dim=(0, 2)) / scale.clamp_min(_EPS) / (n_images or B)


register_mha_loss("dhe_ranking", DHERankingLoss())
