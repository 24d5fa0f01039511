"""TP-ViT progressive bit decline (python/vitq/bit_decline.py): schedule validation, the transition
weight, each quantizer at another width, the blend at t = 0 / 1, and a quantize() run (with DHE)
that ends as a plain target-width model."""
import copy
import json
import math

import pytest
import torch

import vitq
from vitq import bit_decline as bd
from vitq import metrics
from vitq import reconstruct as recon
from vitq.api import load_quantized, save_quantized
from vitq.config import ADFQConfig
from vitq.quantizers import (GELU_MIN, Log2Quantizer, ShiftLog2Quantizer, TruncatedLog2Quantizer,
                             UniformActQuantizer, WeightQuantizer, rectified_sigmoid)
from vitq.wrap import act_quantizers, weight_quantizers

from test_wrap import MODELS


def test_schedule_validation():
    assert bd.check_schedule((8, 6, 4), 4) == (8, 6, 4)
    assert bd.check_schedule("8, 6,4", 4) == (8, 6, 4)
    assert ADFQConfig(w_bits=3, a_bits=4, bit_decline=[8, 4, 3]).bit_decline == (8, 4, 3)
    for bad, needle in [((8, 6, 6, 4), "strictly decreasing"), ((6, 8, 4), "strictly decreasing"),
                        ((8, 6), "end at the target"), ((4,), "at least two"), ((9, 4), "2..8"),
                        ("8,x,4", "comma-separated")]:
        with pytest.raises(ValueError, match=needle):
            ADFQConfig(w_bits=4, a_bits=4, bit_decline=bad)
    with pytest.raises(ValueError, match="amo"):
        ADFQConfig(amo=False, bit_decline=(8, 4))
    from vitq.reconstruct import _step_hooks
    (hook,) = _step_hooks(ADFQConfig(bit_decline=(8, 4), bit_decline_share=0.5))
    assert hook.share == 0.5 and hook.schedule == (8, 4)
    for bad in (0, -0.5, 1.5, "half"):
        with pytest.raises(ValueError, match="bit_decline_share"):
            ADFQConfig(bit_decline=(8, 4), bit_decline_share=bad)
    cfg = ADFQConfig(bit_decline=(8, 6, 4))
    assert ADFQConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).bit_decline == (8, 6, 4)
    # transitions budgeted apart: the first 2 * 30 of 80 + 60 iterations, whatever the share field says
    (hook,) = _step_hooks(ADFQConfig(bit_decline=(8, 6, 4), bit_decline_iters=30))
    assert hook.share == 60 / 140
    cfg = ADFQConfig(bit_decline=(8, 6, 4), bit_decline_iters=30)
    assert ADFQConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).bit_decline_iters == 30
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(ValueError, match="bit_decline_iters must be a positive int"):
            ADFQConfig(bit_decline=(8, 4), bit_decline_iters=bad)
    with pytest.raises(ValueError, match="set one of them"):
        ADFQConfig(bit_decline=(8, 4), bit_decline_iters=10, bit_decline_share=0.5)


def test_transition_weight_ramps_to_one_and_ends_at_the_target():
    hist = [bd.stage_at(s, 10, 2) for s in range(10)]
    assert [h[0] for h in hist] == [0] * 5 + [1] * 5
    assert [round(h[1], 6) for h in hist] == [0.2, 0.4, 0.6, 0.8, 1.0] * 2
    for total in range(1, 30):
        for transitions in (1, 2, 3, 5):
            hist = [bd.stage_at(s, total, transitions) for s in range(total)]
            assert hist[-1] == (transitions - 1, 1.0)
            stages = [h[0] for h in hist]
            assert stages == sorted(stages)
            for a, b in zip(hist, hist[1:]):       # t grows inside a transition, hits 1 at its end
                assert (b[1] > a[1]) if a[0] == b[0] else (a[1] == 1.0)
    # with a share < 1 the transitions take the first ceil(share * total) iterations, then t = 1
    for total in (1, 7, 80):
        for share in (0.25, 0.5, 0.999):
            hist = [bd.stage_at(s, total, 3, share) for s in range(total)]
            decline = max(1, math.ceil(share * total - 1e-9))
            assert hist[decline - 1] == (2, 1.0) and hist[decline:] == [(2, 1.0)] * (total - decline)
            assert hist[:decline] == [bd.stage_at(s, decline, 3) for s in range(decline)]
    hook = bd.BitDeclineHook((8, 6, 4))
    assert hook.widths(4) == [8, 6, 4] and hook.widths(8) == [8, 8, 8] and hook.widths(6) == [8, 6, 6]


# ---------------------------------------------------------------------------------------------
# each quantizer at another width == that quantizer built at that width
# ---------------------------------------------------------------------------------------------
def _calibrated_static(bits, x, granularity="tensor"):
    q = UniformActQuantizer(bits, granularity, init="minmax")
    q.observing = True
    q(x)
    q.observing = False
    q.finish_calibration()
    return q


@pytest.mark.parametrize("granularity", ["tensor", "position"])
def test_static_uniform_at_a_wider_width_keeps_the_range(granularity):
    x = torch.randn(3, 5, 16) * 2 + 0.5
    q4 = _calibrated_static(4, x, granularity)
    for b in (5, 6, 8):
        got = bd.quantize_at(q4, x, b)
        s_b = q4.scale.detach() * (15 / ((1 << b) - 1))
        zu_b = torch.round((q4.zero.float() + 8) * (((1 << b) - 1) / 15))
        ref_q = UniformActQuantizer(b, granularity)
        ref_q.set_static(s_b, (zu_b - (1 << (b - 1))).to(torch.int32))
        assert torch.equal(got, ref_q(x))
        # same range: the wide grid's ends lie within one fine step of the 4-bit grid's ends
        lo4, hi4 = -(q4.zero.float() + 8) * q4.scale, (15 - q4.zero.float() - 8) * q4.scale
        lo_b, hi_b = -zu_b * s_b, ((1 << b) - 1 - zu_b) * s_b
        assert torch.allclose(lo_b, lo4, atol=float(s_b.max()) + 1e-6)
        assert torch.allclose(hi_b, hi4, atol=float(s_b.max()) + 1e-6)
    # the gradient of the wide width reaches the learnable target scale
    q4.scale.requires_grad_(True)
    bd.quantize_at(q4, x, 6).pow(2).sum().backward()
    assert q4.scale.grad is not None and bool(torch.isfinite(q4.scale.grad).all())
    assert torch.equal(bd.quantize_at(q4, x, 4), q4(x))


def test_width_independent_quantizers_at_another_width():
    x = torch.randn(4, 7, 12) * 3
    tok4 = UniformActQuantizer(4, "token", alpha=5.0, capacity=12)
    tok4.finish_calibration()
    tok6 = UniformActQuantizer(6, "token", alpha=5.0, capacity=12)
    tok6.finish_calibration()
    assert torch.equal(bd.quantize_at(tok4, x, 6), tok6(x))
    p = torch.randn(2, 3, 9, 9).softmax(-1)
    assert torch.equal(bd.quantize_at(Log2Quantizer(4), p, 6), Log2Quantizer(6)(p))
    assert torch.equal(bd.quantize_at(Log2Quantizer(4, 1), p, 8), Log2Quantizer(8, 1)(p))
    g = torch.nn.functional.gelu(x)
    slq4 = ShiftLog2Quantizer(4, init="minmax")
    slq4.observing = True
    slq4(g)
    slq4.observing = False
    slq4.finish_calibration()
    slq6 = ShiftLog2Quantizer(6)
    slq6.scale = torch.nn.Parameter(slq4.scale.detach().clone(), requires_grad=False)
    slq6.initialized = True
    assert float(slq6.shift) == pytest.approx(GELU_MIN - 1e-3)
    assert torch.equal(bd.quantize_at(slq4, g, 6), slq6(g))
    assert tok4.bits == 4 and slq4.bits == 4       # switched back
    # truncated log2: the 2^6 - 2^4 extra codes extend the truncation point down by as many steps
    t4 = TruncatedLog2Quantizer(4, substeps=1, max_code=9)
    t6 = TruncatedLog2Quantizer(6, substeps=1, max_code=9 + 48)
    assert torch.equal(bd.quantize_at(t4, p, 6), t6(p)) and t4.max_code == 9 and t4.bits == 4


def test_act_blend_at_t0_t1_and_between():
    x = torch.randn(2, 6, 10)
    q = _calibrated_static(4, x)
    q8, q6, q4 = (bd.quantize_at(q, x, b) for b in (8, 6, 4))
    assert not torch.equal(q8, q6) and not torch.equal(q6, q4)
    blend = bd.ActBlend(4)
    q.blend = blend
    blend.b_out, blend.b_in = 8, 6
    blend.t = 0.0
    assert torch.equal(q(x), q8)
    blend.t = 1.0
    assert torch.equal(q(x), q6)
    blend.t = 0.25
    torch.testing.assert_close(q(x), 0.75 * q8 + 0.25 * q6, rtol=0, atol=1e-6)
    blend.b_out, blend.b_in, blend.t = 6, 4, 1.0
    assert torch.equal(q(x), q4)
    q.blend = None
    assert torch.equal(q(x), q4)


@pytest.mark.parametrize("symmetric", [False, True])
def test_weight_grid_and_blend(symmetric):
    w = torch.randn(8, 20)
    wq = WeightQuantizer(4, symmetric=symmetric, init="minmax")
    wq.calibrate(w)
    s4, z4 = wq.scale.clone(), wq.zero.clone()
    s6, z6 = bd.weight_grid(s4, z4, 4, 6, symmetric)
    assert bd.weight_grid(s4, z4, 4, 4, symmetric)[0] is s4
    wq6 = WeightQuantizer(6, symmetric=symmetric, init="minmax")
    wq6.calibrate(w)
    if symmetric:   # max|w| / (2^(b-1) - 1): exactly the 6-bit min/max calibration up to fp rounding
        torch.testing.assert_close(s6, wq6.scale, rtol=1e-6, atol=0)
        assert bool((z6 == 0).all())
    else:           # the 4-bit grid's range [-zu s, (15 - zu) s] on the 6-bit grid
        torch.testing.assert_close(s6, wq6.scale, rtol=1e-6, atol=0)
        lo4 = -(z4.float() + 8) * s4
        lo6 = -(z6.float() + 32) * s6
        assert bool(((lo6 - lo4).abs() <= s6 / 2 + 1e-7).all())
    # the blend: t=0 the frozen outgoing weights, t=1 the quantizer's own value
    w_hat = wq(w)
    blend = bd.WeightBlend()
    blend.w_out = torch.randn(8, 20)
    wq.blend = blend
    blend.t = 0.0
    assert torch.equal(wq(w), blend.w_out)
    blend.t = 1.0
    assert torch.equal(wq(w), w_hat)
    blend.t = 0.5
    torch.testing.assert_close(wq(w), 0.5 * blend.w_out + 0.5 * w_hat, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# a full run
# ---------------------------------------------------------------------------------------------
def _tiny_vit():
    make, size = MODELS["dinov2_style"]
    return make().eval(), size


def test_unit_steps_down_and_ends_at_the_target(monkeypatch):
    seen = []
    orig = bd.BitDeclineHook.__call__

    v_starts = []

    def spy(self, step, total, unit):
        prev = self.stage if self.unit is unit else None
        orig(self, step, total, unit)
        if self.stage != prev:     # a transition starts: V is AdaRound's init on the new grid
            for layer in unit.layers:
                wq = layer.weight_quant
                if wq.alpha_v is not None and wq.blend is not None:
                    x = layer.weight.detach().float().reshape(layer.weight.shape[0], -1) / wq.scale[:, None]
                    frac = (x - torch.floor(x)).clamp(1e-4, 1 - 1e-4)
                    torch.testing.assert_close(rectified_sigmoid(wq.alpha_v.detach()), frac, rtol=0, atol=1e-4)
                    v_starts.append((unit.name, self.stage))
        wbits = sorted({layer.weight_quant.bits for layer in unit.layers})
        abits = sorted({b.b_out for b in self.acts.values()} | {b.b_in for b in self.acts.values()})
        seen.append((unit.name, step, self.stage, round(next(iter(self.acts.values())).t, 6), wbits, abits))
    monkeypatch.setattr(bd.BitDeclineHook, "__call__", spy)
    model, size = _tiny_vit()
    x = torch.randn(4, 3, size, size)
    cfg = ADFQConfig(w_bits=4, a_bits=4, iters=6, calib_images=4, batch_size=2, progress=False,
                     bit_decline=(8, 6, 4))
    q = vitq.quantize(model, cfg, x)
    first = [s for s in seen if s[0] == "blocks.0.attn"]
    assert [s[2] for s in first] == [0, 0, 0, 1, 1, 1]
    assert [s[3] for s in first] == [round(1 / 3, 6), round(2 / 3, 6), 1.0] * 2
    assert [s[4] for s in first] == [[6]] * 3 + [[4]] * 3       # weights train on the b_in grid
    assert [s[5] for s in first] == [[6, 8]] * 3 + [[4, 6]] * 3
    assert len(seen) == 6 * 4
    assert ("blocks.0.attn", 1) in v_starts and ("blocks.0.mlp", 1) in v_starts
    # afterwards: every quantizer at its target width, no blend, hard weights
    for name, aq in act_quantizers(q):
        assert aq.blend is None
        assert aq.bits == (8 if name.endswith(("patch_embed.proj.act_quant", "head.act_quant")) else 4), name
    for name, wq in weight_quantizers(q):
        assert wq.blend is None and wq.mode == "hard"
        assert wq.bits == (8 if name.startswith(("patch_embed", "head")) else 4), name
    # the weight grids are the calibrated target grids (calibration is deterministic)
    plain = vitq.quantize(model, ADFQConfig(w_bits=4, a_bits=4, amo=False, calib_images=4, progress=False), x)
    for (n1, a), (n2, b) in zip(weight_quantizers(q), weight_quantizers(plain)):
        assert n1 == n2 and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
        lo, hi = a.qrange
        assert lo <= int(a.codes.min()) and int(a.codes.max()) <= hi


def test_transitions_budgeted_apart_run_before_the_target_iterations(monkeypatch):
    # bit_decline_iters=2 with (8, 6, 4): 2 transitions x 2 iterations, then iters=3 at the target
    # width (t = 1), with L_round (beta) off during the transitions and its whole schedule after
    seen, betas = [], []
    orig_hook, orig_beta = bd.BitDeclineHook.__call__, recon.beta_at

    def spy(self, step, total, unit):
        orig_hook(self, step, total, unit)
        if unit.name == "blocks.0.mlp":
            wbits = sorted({layer.weight_quant.bits for layer in unit.layers})
            seen.append((step, total, self.stage, round(next(iter(self.acts.values())).t, 6), wbits))

    def beta_spy(step, total, cfg):
        betas.append((step, total))
        return orig_beta(step, total, cfg)
    monkeypatch.setattr(bd.BitDeclineHook, "__call__", spy)
    monkeypatch.setattr(recon, "beta_at", beta_spy)
    model, size = _tiny_vit()
    x = torch.randn(4, 3, size, size)
    cfg = ADFQConfig(w_bits=4, a_bits=4, iters=3, calib_images=4, batch_size=2, progress=False,
                     bit_decline=(8, 6, 4), bit_decline_iters=2)
    q = vitq.quantize(model, cfg, x)
    assert [s[:2] for s in seen] == [(i, 7) for i in range(7)]
    assert [s[2] for s in seen] == [0, 0, 1, 1, 1, 1, 1]
    assert [s[3] for s in seen] == [0.5, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert [s[4] for s in seen] == [[6], [6], [4], [4], [4], [4], [4]]
    # beta_at is asked only after the transitions, with the target-width step and count
    units = len(recon.find_units(q, "module", x[:1]))
    assert betas == [(i, 3) for i in range(3)] * units
    for _, wq in weight_quantizers(q):
        assert wq.blend is None and wq.mode == "hard" and wq.bits in (4, 8)
    for _, aq in act_quantizers(q):
        assert aq.blend is None


def test_quantize_with_dhe_and_bit_decline_equals_a_plain_target_model(tmp_path):
    model, size = _tiny_vit()
    x = torch.randn(4, 3, size, size)
    cfg = ADFQConfig(w_bits=4, a_bits=4, iters=4, calib_images=4, batch_size=2, progress=False,
                     bit_decline=(8, 6, 4), dhe=True, dhe_weight=0.5)
    q = vitq.quantize(model, cfg, x)
    assert q.vitq_report["config"]["bit_decline"] == (8, 6, 4) and q.vitq_report["config"]["dhe"] is True
    # the same learned parameters in a model configured plainly at the target width
    save_quantized(q, tmp_path)
    meta = json.loads((tmp_path / "quant_config.json").read_text())
    meta["config"].update(bit_decline=None, dhe=False)
    (tmp_path / "quant_config.json").write_text(json.dumps(meta))
    plain = load_quantized(tmp_path, copy.deepcopy(model))
    assert plain.vitq_config.bit_decline is None
    xt = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert torch.equal(q(xt), plain(xt))
    rep = metrics.attention_ranking(q, xt, pairs=None)
    assert rep["counted"] > 0 and 0.0 < rep["arpr"] <= 1.0


@pytest.mark.parametrize("name", ["deit_distilled", "swin"])
def test_other_architectures_run_dhe_and_bit_decline(name):
    make, size = MODELS[name]
    model = make().eval()
    x = torch.randn(4, 3, size, size)
    cfg = ADFQConfig(w_bits=4, a_bits=4, iters=2, calib_images=4, batch_size=2, progress=False,
                     bit_decline=(6, 4), dhe=True, dhe_pairs=16)
    q = vitq.quantize(model, cfg, x)
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()
    assert all(aq.blend is None for _, aq in act_quantizers(q))
    assert all(wq.bits in (4, 8) and wq.blend is None for _, wq in weight_quantizers(q))
    rep = metrics.attention_ranking(q, x[:2], pairs=64)
    assert rep["counted"] > 0 and 0.0 < rep["arpr"] <= 1.0


def test_cli_flags_reach_the_config(capsys):
    from vitq import cli
    args = cli.build_parser().parse_args(["quantize", "--dhe", "--dhe-weight", "0.3", "--bit-decline", "8,6,4"])
    cfg = cli._config_from_args(args)
    assert cfg.dhe and cfg.dhe_weight == 0.3 and cfg.bit_decline == (8, 6, 4) and cfg.bit_decline_share == 1.0
    cfg = cli._config_from_args(cli.build_parser().parse_args(
        ["quantize", "--bit-decline", "8,6,4", "--bit-decline-share", "0.5"]))
    assert cfg.bit_decline_share == 0.5
    cfg = cli._config_from_args(cli.build_parser().parse_args(
        ["quantize", "--bit-decline", "8,6,4", "--bit-decline-iters", "40"]))
    assert cfg.bit_decline_iters == 40 and cfg.bit_decline_share == 1.0
    cfg = cli._config_from_args(cli.build_parser().parse_args(["quantize"]))
    assert not cfg.dhe and cfg.bit_decline is None
    for bad, needle in ((["--bit-decline", "8,x,4"], "--bit-decline"), (["--bit-decline", "8,6"], "bit_decline"),
                        (["--bit-decline", "8,6,4", "--bit-decline-share", "0"], "bit_decline_share"),
                        (["--bit-decline-share", "0.5"], "--bit-decline-share needs --bit-decline"),
                        (["--bit-decline-iters", "5"], "--bit-decline-iters needs --bit-decline"),
                        (["--bit-decline", "8,6,4", "--bit-decline-iters", "0"], "bit_decline_iters"),
                        (["--dhe-weight", "0.5"], "--dhe-weight needs --dhe")):
        assert cli.main(["quantize"] + bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("vitq quantize: error:") and needle in err, err
