"""DHE ranking loss (python/vitq/ranking.py) and the ARPR metric (vitq.metrics.arpr).

The loss is checked against a naive per-pair loop written here from the definition in docs/dhe.md
(numpy quantile, no shared code), then property by property: zero when orders are kept, positive
when swapped, gradient direction, what each switch does, head normalization."""
import itertools
import math

import numpy as np
import pytest
import torch

import vitq
from vitq import metrics
from vitq import reconstruct as rc
from vitq.config import ADFQConfig
from vitq.ranking import DHERankingLoss, sample_pairs

SWITCHES = list(itertools.product([0.5, None], [True, False], [True, False]))  # quantile, sensitivity, head_norm


def naive_loss(p, q, quantile, fixed, sensitivity, head_norm):
    """Loop version of docs/dhe.md with every pair j < k of every row."""
    p, q = p.double().numpy(), q.double().numpy()
    B, H, Nq, Nk = p.shape
    pairs = list(itertools.combinations(range(Nk), 2))
    head_rows = np.zeros(H)
    gaps = [[] for _ in range(H)]
    for b, h, i in itertools.product(range(B), range(H), range(Nq)):
        row, qrow = p[b, h, i], q[b, h, i]
        row_gaps = [abs(row[j] - row[k]) for j, k in pairs if row[j] != row[k]]
        gaps[h] += row_gaps
        if not row_gaps:
            continue
        m = np.quantile(row_gaps, quantile) if quantile is not None else fixed
        terms = []
        for j, k in pairs:
            d = row[j] - row[k]
            if d == 0:
                continue
            sig = 1.0 if d > 0 else -1.0
            hinge = max(0.0, min(m, abs(d)) - sig * (qrow[j] - qrow[k]))
            if sensitivity:
                hinge *= Nk * (row[j] + row[k]) / (2 * row.sum())
            terms.append(hinge)
        head_rows[h] += sum(terms) / len(terms)
    if head_norm:
        scale = np.array([np.mean(g) for g in gaps])
    else:
        scale = np.full(H, np.mean([x for g in gaps for x in g]))
    return float((head_rows / scale).sum() / B)


def rand_probs(*shape, temp=1.0):
    return (torch.randn(*shape) * temp).softmax(-1)


@pytest.mark.parametrize("quantile,sensitivity,head_norm", SWITCHES)
def test_matches_the_definition_on_all_pairs(quantile, sensitivity, head_norm):
    p = rand_probs(2, 3, 4, 6, temp=2.0)
    q = (p + 0.05 * torch.randn_like(p)).clamp_min(1e-4)
    fn = DHERankingLoss(margin_quantile=quantile, fixed_margin=0.02, sensitivity=sensitivity,
                        head_norm=head_norm, pairs=None)
    got = float(fn.loss(p, q))
    want = naive_loss(p, q, quantile, 0.02, sensitivity, head_norm)
    assert want > 0
    assert math.isclose(got, want, rel_tol=1e-4), (got, want)
    # pairs >= N(N-1)/2 takes all pairs too, and the head terms add up to the loss
    fn15 = DHERankingLoss(margin_quantile=quantile, fixed_margin=0.02, sensitivity=sensitivity,
                          head_norm=head_norm, pairs=15)
    assert math.isclose(float(fn15.loss(p, q)), want, rel_tol=1e-4)
    assert math.isclose(float(fn.head_terms(p, q).sum()), got, rel_tol=1e-5)


@pytest.mark.parametrize("quantile,sensitivity,head_norm", SWITCHES)
def test_zero_when_orders_and_gaps_are_kept(quantile, sensitivity, head_norm):
    fn = DHERankingLoss(margin_quantile=quantile, fixed_margin=0.05, sensitivity=sensitivity,
                        head_norm=head_norm, pairs=None)
    p = rand_probs(2, 2, 5, 7)
    assert float(fn.loss(p, p.clone())) == 0.0
    # every gap widened by 30 %: order kept with gaps >= min(margin, |d|)
    wider = p + 0.3 * (p - p.mean(-1, keepdim=True))
    assert float(fn.loss(p, wider)) == 0.0
    # margin 0 (fixed): pure order semantics, a monotone sharpening that shrinks some gaps is free
    order_only = DHERankingLoss(margin_quantile=None, fixed_margin=0.0, sensitivity=sensitivity,
                                head_norm=head_norm, pairs=None)
    sharpened = (2 * p.log()).softmax(-1)
    assert float(order_only.loss(p, sharpened)) == 0.0


@pytest.mark.parametrize("quantile,sensitivity,head_norm", SWITCHES)
def test_positive_when_a_pair_is_swapped(quantile, sensitivity, head_norm):
    fn = DHERankingLoss(margin_quantile=quantile, fixed_margin=0.0, sensitivity=sensitivity,
                        head_norm=head_norm, pairs=None)
    p = rand_probs(1, 1, 1, 6)
    order = p[0, 0, 0].argsort(descending=True)
    j, k = int(order[0]), int(order[1])          # the two largest keys
    q = p.clone()
    q[..., j], q[..., k] = p[..., k], p[..., j]
    loss = float(fn.loss(p, q))
    assert loss > 0
    if quantile is None and not sensitivity:
        # order-only hinge: only (j, k) is violated, by its fp gap; mean over the 15 pairs of the
        # row, divided by the mean fp gap (one head, so both scalings agree)
        gap = float(p[0, 0, 0, j] - p[0, 0, 0, k])
        assert math.isclose(loss, gap / 15 / float(_mean_gap(p)), rel_tol=1e-5)


def _mean_gap(p):
    row = p.reshape(-1)
    return torch.stack([(row[a] - row[b]).abs() for a, b in itertools.combinations(range(row.numel()), 2)]).mean()


def test_gradient_moves_a_swapped_pair_back():
    fn = DHERankingLoss(pairs=None)
    p = rand_probs(1, 2, 3, 8, temp=1.5)
    q = p.clone()
    j, k = 2, 5
    q[..., j], q[..., k] = p[..., k], p[..., j]      # every row has pair (j, k) swapped
    q = q.requires_grad_(True)
    loss = fn.loss(p, q)
    loss.backward()
    sign = torch.sign(p[..., j] - p[..., k])
    # descent raises the fp-larger key and lowers the fp-smaller one
    assert bool((sign * q.grad[..., j] < 0).all()) and bool((sign * q.grad[..., k] > 0).all())
    with torch.no_grad():
        q2 = q - 0.002 * q.grad / q.grad.abs().max()
    assert float(fn.loss(p, q2)) < float(loss.detach())
    before = sign * (q.detach()[..., j] - q.detach()[..., k])
    after = sign * (q2[..., j] - q2[..., k])
    assert bool((after > before).all())


def test_sensitivity_weights_high_mass_pairs_more():
    p = torch.tensor([0.40, 0.35, 0.15, 0.10]).reshape(1, 1, 1, 4)
    swap_top, swap_low = p.clone(), p.clone()
    swap_top[..., 0], swap_top[..., 1] = p[..., 1], p[..., 0]     # gap 0.05, mass 0.75
    swap_low[..., 2], swap_low[..., 3] = p[..., 3], p[..., 2]     # gap 0.05, mass 0.25
    # order-only margin, so the swapped pair is the only violation; weights 4 * 0.75 / 2 vs 4 * 0.25 / 2
    on = DHERankingLoss(margin_quantile=None, sensitivity=True, pairs=None)
    off = DHERankingLoss(margin_quantile=None, sensitivity=False, pairs=None)
    assert math.isclose(float(off.loss(p, swap_top)), float(off.loss(p, swap_low)), rel_tol=1e-5)
    assert math.isclose(float(on.loss(p, swap_top)), 1.5 * float(off.loss(p, swap_top)), rel_tol=1e-5)
    assert math.isclose(float(on.loss(p, swap_low)), 0.5 * float(off.loss(p, swap_low)), rel_tol=1e-5)
    # with the dynamic margin the high-mass violation still costs more
    dyn = DHERankingLoss(sensitivity=True, pairs=None)
    assert float(dyn.loss(p, swap_top)) > 2 * float(dyn.loss(p, swap_low))


def test_dynamic_margin_follows_the_row_and_grows_with_the_quantile():
    p = rand_probs(2, 2, 4, 9, temp=2.0)
    shrunk = p.mean(-1, keepdim=True) + 0.5 * (p - p.mean(-1, keepdim=True))  # order kept, gaps halved
    losses = [float(DHERankingLoss(margin_quantile=qq, pairs=None).loss(p, shrunk)) for qq in (0.0, 0.25, 0.5, 1.0)]
    assert losses[0] > 0 and all(a < b for a, b in zip(losses, losses[1:])), losses
    assert float(DHERankingLoss(margin_quantile=None, fixed_margin=0.0, pairs=None).loss(p, shrunk)) == 0.0
    # the margin is relative: scaling a whole row (p and p_hat) scales each hinge, and the head
    # scale with it, so the loss is unchanged
    fn = DHERankingLoss(margin_quantile=0.5, pairs=None)
    torch.testing.assert_close(fn.loss(10 * p, 10 * shrunk), fn.loss(p, shrunk), rtol=1e-5, atol=0)


def test_head_normalization_keeps_a_scaled_head_from_dominating():
    p = rand_probs(2, 3, 5, 8)
    q = (p + 0.03 * torch.randn_like(p)).clamp_min(1e-4)
    ps, qs = p.clone(), q.clone()
    ps[:, 1] *= 100
    qs[:, 1] *= 100
    norm = DHERankingLoss(head_norm=True, pairs=None)
    flat = DHERankingLoss(head_norm=False, pairs=None)
    torch.testing.assert_close(norm.head_terms(ps, qs), norm.head_terms(p, q), rtol=1e-4, atol=1e-7)
    share = flat.head_terms(ps, qs)
    assert float(share[1] / share.sum()) > 0.95          # without it the x100 head takes everything
    share_n = norm.head_terms(ps, qs)
    assert float(share_n[1] / share_n.sum()) < 0.8


def test_sampled_pairs_bound_the_cost_and_keep_the_semantics():
    j, k = sample_pairs(1000, 257, 64, torch.Generator().manual_seed(0))
    assert j.shape == k.shape == (1000, 64)
    assert bool((j != k).all()) and int(j.min()) >= 0 and int(k.max()) < 257
    jj, kk = sample_pairs(3, 6, None)
    assert jj.shape == (3, 15) and bool((jj < kk).all())
    p = rand_probs(2, 2, 65, 65)
    fn = DHERankingLoss(pairs=32)
    assert float(fn.loss(p, p)) == 0.0
    assert float(fn.loss(p, p.flip(-1))) > 0
    with pytest.raises(ValueError, match="pairs"):
        DHERankingLoss(pairs=0)
    with pytest.raises(ValueError, match="quantile"):
        DHERankingLoss(margin_quantile=1.5)


def test_config_fields_and_registration():
    assert "dhe_ranking" in rc.MHA_LOSSES
    cfg = ADFQConfig(dhe=True, dhe_weight=0.3, dhe_margin_quantile=None, dhe_fixed_margin=0.01,
                     dhe_sensitivity=False, dhe_head_norm=False, dhe_pairs=None)
    extras = rc._extra_losses(cfg)
    assert len(extras) == 1 and extras[0][1] == 0.3
    fn = extras[0][0]
    assert (fn.margin_quantile, fn.fixed_margin, fn.sensitivity, fn.head_norm, fn.pairs) == (None, 0.01, False, False, None)
    assert rc._extra_losses(ADFQConfig()) == []
    for bad in (dict(dhe_weight=-1.0), dict(dhe_margin_quantile=2.0), dict(dhe_pairs=0), dict(dhe_fixed_margin=-0.1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ADFQConfig(**bad)
    assert ADFQConfig.from_dict(cfg.to_dict()).dhe_weight == 0.3


def test_dhe_term_is_used_by_amo(monkeypatch):
    from timm.models.vision_transformer import VisionTransformer
    from vitq import ranking
    calls = []
    orig = ranking.DHERankingLoss.__call__

    def spy(self, ctx):
        out = orig(self, ctx)
        calls.append((ctx.unit.kind, float(out.detach()), out.requires_grad))
        return out
    monkeypatch.setattr(ranking.DHERankingLoss, "__call__", spy)
    model = VisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=1, num_heads=2, num_classes=10).eval()
    cfg = ADFQConfig(iters=2, calib_images=4, batch_size=2, progress=False, dhe=True)
    vitq.quantize(model, cfg, torch.randn(4, 3, 28, 28))
    assert len(calls) == 2 and all(k == "mha" and v >= 0 and g for k, v, g in calls), calls


# ---------------------------------------------------------------------------------------------
# ARPR
# ---------------------------------------------------------------------------------------------
def naive_arpr(p, q):
    kept = counted = 0
    for row_p, row_q in zip(p.reshape(-1, p.shape[-1]).tolist(), q.reshape(-1, q.shape[-1]).tolist()):
        for j, k in itertools.combinations(range(len(row_p)), 2):
            if row_p[j] == row_p[k]:
                continue
            counted += 1
            if (row_p[j] > row_p[k] and row_q[j] > row_q[k]) or (row_p[j] < row_p[k] and row_q[j] < row_q[k]):
                kept += 1
    return kept, counted


def test_arpr_all_pairs_against_a_hand_loop():
    # one readable row: (0,1) swapped, (0,2) kept, (1,2) kept, (2,3) fp tie -> excluded,
    # (0,3) kept, (1,3) tied in the quantized row -> not kept
    p = torch.tensor([[0.4, 0.3, 0.15, 0.15]])
    q = torch.tensor([[0.3, 0.4, 0.2, 0.1]])
    q[0, 3] = 0.4                                    # ties p_hat_1 == p_hat_3
    q[0, 2] = 0.2
    kept, counted = metrics.arpr(p, q, pairs=None)
    assert (kept, counted) == naive_arpr(p, q)
    assert counted == 5                              # 6 pairs minus the fp tie
    # random rows with ties injected on both sides
    p = rand_probs(2, 3, 4, 7)
    q = (p + 0.02 * torch.randn_like(p)).clamp_min(0)
    p[..., 1] = p[..., 0]
    q[..., 4] = q[..., 5]
    assert metrics.arpr(p, q, pairs=None) == naive_arpr(p, q)


def test_arpr_sampled_pairs():
    p = rand_probs(2, 2, 16, 16)
    kept, counted = metrics.arpr(p, p.pow(3), pairs=64)          # monotone: every order kept
    assert kept == counted == 2 * 2 * 16 * 64
    kept, counted = metrics.arpr(p, -p, pairs=64)                # reversed: none kept
    assert kept == 0 and counted == 2 * 2 * 16 * 64
    half = metrics.arpr(p, p + 0.01 * torch.randn_like(p), pairs=512)
    full = metrics.arpr(p, p + 0.0, pairs=None)
    assert full[0] == full[1]
    assert 0 < half[0] <= half[1]


def test_attention_ranking_on_a_quantized_vit():
    from timm.models.vision_transformer import VisionTransformer
    model = VisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    x = torch.randn(6, 3, 28, 28)
    q = vitq.quantize(model, ADFQConfig(w_bits=4, a_bits=4, amo=False, progress=False, calib_images=6), x)
    rep = metrics.attention_ranking(q, x, batch_size=4, pairs=None)
    # all pairs of every row of both blocks: 2 modules x 6 images x 2 heads x 17 rows x 136 pairs, minus fp ties
    assert 0 < rep["counted"] <= 2 * 6 * 2 * 17 * 136
    assert 0.5 < rep["arpr"] < 1.0
    lr = metrics.layer_report(q, x, batch_size=4, pairs=None)
    assert math.isclose(lr["arpr"], rep["arpr"], rel_tol=1e-12)
