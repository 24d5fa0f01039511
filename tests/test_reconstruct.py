"""AMO (module-wise) and block-wise reconstruction: losses, schedule, hooks, and that AMO lowers the
reconstruction loss of a real pretrained DINOv2 block on real images."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vitq
from vitq import reconstruct as rc
from vitq.api import _init_quantizers
from vitq.config import ADFQConfig
from vitq.wrap import wrap_model


def tiny_vit():
    return VisionTransformer(img_size=28, patch_size=7, embed_dim=64, depth=2, num_heads=2, num_classes=10,
                             init_values=0.5).eval()


def test_kl_is_over_the_key_axis():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(2, 3, 5, 7, generator=g).softmax(-1)
    q = torch.randn(2, 3, 5, 7, generator=g).softmax(-1)
    # each (image, head, query) row is one distribution over the keys
    rows = torch.distributions.kl_divergence(torch.distributions.Categorical(probs=p),
                                             torch.distributions.Categorical(probs=q))
    assert rows.shape == (2, 3, 5)
    torch.testing.assert_close(rc.attention_kl_loss(p, q, 2), rows.sum() / 2, rtol=1e-5, atol=0)
    assert abs(float(rc.attention_kl_loss(p, p, 2))) < 1e-6  # zero up to fp32 rounding


def test_output_loss_and_beta_schedule():
    a, b = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
    torch.testing.assert_close(rc.output_loss(a, b, 4), (a - b).pow(2).sum() / 4, rtol=1e-6, atol=0)
    cfg = ADFQConfig(warmup=0.2)
    assert rc.beta_at(0, 100, cfg) is None and rc.beta_at(19, 100, cfg) is None
    assert rc.beta_at(20, 100, cfg) == 10.0 and rc.beta_at(99, 100, cfg) == 2.0
    betas = [rc.beta_at(s, 100, cfg) for s in range(20, 100)]
    assert all(x > y for x, y in zip(betas, betas[1:]))


def test_units_in_forward_order():
    q = wrap_model(tiny_vit(), ADFQConfig())
    x = torch.randn(1, 3, 28, 28)
    units = rc.find_units(q, "module", x)
    assert [(u.name, u.kind) for u in units] == [("blocks.0.attn", "mha"), ("blocks.0.mlp", "mlp"),
                                                 ("blocks.1.attn", "mha"), ("blocks.1.mlp", "mlp")]
    assert [u.name for u in rc.find_units(q, "block", x)] == ["blocks.0", "blocks.1"]
    with pytest.raises(ValueError, match="granularity"):
        rc.find_units(q, "layer", x)


def test_hooks_are_called_and_extra_loss_is_added():
    calls, seen = [], []

    def rank_loss(ctx):
        seen.append((ctx.unit.kind, ctx.step, ctx.total, len(ctx.probs_fp), ctx.probs_q[0].requires_grad))
        return ctx.probs_q[0].sum() * 0.0 + 1.0

    def hook(step, total, unit):
        calls.append((unit.name, step, total))

    rc.register_mha_loss("test_rank", rank_loss)
    cfg = ADFQConfig(iters=3, calib_images=4, batch_size=2, progress=False,
                     mha_extra_losses=[("test_rank", 0.5)], step_hooks=[hook])
    vitq.quantize(tiny_vit(), cfg, torch.randn(4, 3, 28, 28))
    assert [c for c in calls if c[0] == "blocks.0.attn"] == [("blocks.0.attn", s, 3) for s in range(3)]
    assert len(calls) == 12
    assert seen and all(k == "mha" and n == 1 and g for k, _, _, n, g in seen)
    with pytest.raises(ValueError, match="unknown MHA loss"):
        vitq.quantize(tiny_vit(), ADFQConfig(iters=1, calib_images=2, progress=False,
                                             mha_extra_losses=[("nope", 1.0)]), torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("preset,overrides,expected", [
    ("fast", {}, (3e-2, 4e-5)), ("paper", {}, (3e-3, 4e-5)), ("fast", {"lr_v": 1e-3, "lr_scale": 2e-5}, (1e-3, 2e-5))])
def test_learning_rates_come_from_the_preset_unless_given(monkeypatch, preset, overrides, expected):
    seen = []
    real_adam = torch.optim.Adam

    def spy(params, lr):
        params = list(params)
        seen.append((lr, len(params)))
        return real_adam(params, lr=lr)

    monkeypatch.setattr(rc.torch.optim, "Adam", spy)
    cfg = ADFQConfig(preset=preset, iters=1, calib_images=2, batch_size=2, progress=False, **overrides)
    assert cfg.to_dict()["resolved"]["lr_v"] == expected[0]
    vitq.quantize(tiny_vit(), cfg, torch.randn(2, 3, 28, 28))
    # per unit (2 MHA + 2 MLP): one optimizer for V, one for the scales s_a
    assert [lr for lr, _ in seen] == [expected[0], expected[1]] * 4, seen
    assert all(n > 0 for _, n in seen)


@pytest.mark.parametrize("bad", [0, -1e-3, float("nan"), float("inf"), True, "1e-3"])
def test_bad_learning_rates_are_refused(bad):
    for name in ("lr_v", "lr_scale"):
        with pytest.raises(ValueError, match=name):
            ADFQConfig(**{name: bad})


def test_block_wise_baseline_runs_and_hardens():
    cfg = ADFQConfig(recon="block", qdrop_prob=0.5, iters=3, calib_images=4, batch_size=2, progress=False)
    q = vitq.quantize(tiny_vit(), cfg, torch.randn(4, 3, 28, 28))
    stats = q.vitq_report["reconstruction"]
    assert [s["unit"] for s in stats] == ["blocks.0", "blocks.1"]
    assert all(wq.mode == "hard" for _, wq in vitq.wrap.weight_quantizers(q))
    assert all(aq.drop_prob == 0.0 for _, aq in vitq.wrap.act_quantizers(q))


@pytest.fixture(scope="module")
def dinov2_and_images():
    from vitq import data, models
    try:
        model = models.load_dinov2_small(img_size=56)
        ds = data.fashion_mnist("train", n=500, model=model)
    except models.AssetMissingError as err:  # pragma: no cover - assets are part of the setup
        pytest.fail(f"offline assets missing: {err}")
    images, _ = data.calibration_batch(ds, 32, seed=0)
    return model, images


@pytest.mark.parametrize("unit_name", ["blocks.1.attn", "blocks.1.mlp"])
def test_amo_lowers_reconstruction_loss_on_a_real_dinov2_block(dinov2_and_images, unit_name):
    model, images = dinov2_and_images
    cfg = ADFQConfig(w_bits=4, a_bits=4, iters=40, batch_size=8, progress=False)
    q = wrap_model(__import__("copy").deepcopy(model), cfg)
    _init_quantizers(q, images, cfg, torch.device("cpu"))
    units = {u.name: u for u in rc.find_units(q, "module", images[:1])}
    for name in ("blocks.0.attn", "blocks.0.mlp"):          # the preceding units: final, round-to-nearest
        for layer in units[name].layers:
            layer.weight_quant.harden(layer.weight)
    unit = units[unit_name]
    before = rc.unit_output_loss(q, unit, images, 16, "cpu")
    fp_in = rc.capture_inputs(q, unit.module, images, 16, "cpu", quantized=False)
    q_in = rc.capture_inputs(q, unit.module, images, 16, "cpu", quantized=True)
    st = rc.reconstruct_unit(unit, fp_in, q_in, cfg, "cpu", torch.Generator().manual_seed(0))
    after = rc.unit_output_loss(q, unit, images, 16, "cpu")
    assert all(layer.weight_quant.mode == "hard" for layer in unit.layers)
    assert st["last_output_loss"] is not None
    # hard-rounded AdaRound + trained scales beat round-to-nearest on the calibration images
    assert after < 0.97 * before, (before, after)
