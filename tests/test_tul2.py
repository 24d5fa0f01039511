"""Truncated uniform-log2 post-softmax quantizer (TP-ViT, docs/tp_vit.md): the reference
functions, the calibration quantizer, log2_attention with a truncation code on the CPU and
Triton kernels, and a calibrated model that exports and runs on the kernels."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vitq_kernels  # noqa: F401  (registers torch.ops.vitq)
from vitq_kernels import reference as ref

from test_log2_attention import (W_CPU, W_GPU, assert_matches_reference, make_inputs, run_cpu, run_triton,
                                 swin_bias)


def random_probs(shape, zeros=True):
    """Positive values spread over ~40 octaves, plus exact 1.0, 0.0 and a subnormal."""
    p = torch.exp2(-torch.rand(shape) * 40).float()
    flat = p.view(-1)
    if zeros and flat.numel() >= 4:
        flat[0], flat[1], flat[2], flat[3] = 1.0, 0.0, 1e-40, 0.5
    return p


def expected_codes_float64(p, bits, m, max_code):
    """The definition computed independently in float64 (no tie is possible: the half-code
    boundaries 2^(-(c + 1/2) / 2^m) are irrational)."""
    top = (1 << bits) - 1
    pd = p.double()
    normal = pd >= 2.0 ** -126
    c = torch.round(-(2 ** m) * torch.log2(torch.where(normal, pd, torch.ones_like(pd)))).clamp(min=0)
    keep = normal & (c <= max_code)
    return torch.where(keep, c, torch.full_like(c, top)).to(torch.int64), keep


# ---------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------
@settings(max_examples=60)
@given(bits=st.integers(2, 8), m=st.sampled_from([0, 1, 2]), frac=st.floats(0, 1), n=st.integers(1, 3000))
def test_reference_codes_range_truncation_decode(bits, m, frac, n):
    top = (1 << bits) - 1
    max_code = int(round(frac * (top - 1)))
    p = random_probs((n,))
    codes = ref.tul2_quantize(p, bits, m, max_code)
    assert codes.dtype == torch.uint8 and codes.shape == p.shape
    c = codes.to(torch.int64)
    # codes in range: a kept code <= max_code, else the zero code
    assert bool(((c <= max_code) | (c == top)).all())
    # the definition, independently in float64
    expect, keep = expected_codes_float64(p, bits, m, max_code)
    assert torch.equal(c, expect)
    # below t_min -> 0; at or above it -> kept (log2 p vs t_min in float64)
    t_min = ref.tul2_truncation_point(m, max_code)
    pos = p.double() >= 2.0 ** -126
    lg = torch.log2(torch.where(pos, p.double(), torch.ones_like(p.double())))
    assert torch.equal(keep, pos & (lg >= t_min))
    # decode: exactly fp32(2^(-c / 2^m)), 0 for the zero code
    v = ref.tul2_dequantize(codes, bits, m, max_code)
    exact = torch.tensor([2.0 ** (-int(x) / (1 << m)) for x in c.tolist()], dtype=torch.float64).float()
    assert torch.equal(v, torch.where(keep, exact, torch.zeros_like(exact)))
    # relative error of a kept value is at most 2^(1/2^(m+1)) - 1
    kept = keep & (p > 0)
    if kept.any():
        ratio = (v[kept].double() / p[kept].double())
        assert float((ratio - 1).abs().max()) <= 2 ** (1 / (1 << (m + 1))) - 1 + 1e-6


@pytest.mark.parametrize("m", [0, 1, 2])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_reference_monotone_and_plain_log2_is_a_member(bits, m):
    top = (1 << bits) - 1
    p = torch.sort(random_probs((5000,), zeros=False)).values
    for max_code in sorted({0, (top - 1) // 2, top - 1}):
        v = ref.tul2_dequantize(ref.tul2_quantize(p, bits, m, max_code), bits, m, max_code)
        assert bool((v[1:] >= v[:-1]).all()), "P^ must be non-decreasing in P"
    # max_code = 2^b - 2 (or None) is the existing log2 quantizer with the zero code
    plain = ref.log2_quantize(p, bits, 1.0, m, zero_code=True)
    assert torch.equal(ref.tul2_quantize(p, bits, m, top - 1), plain)
    assert torch.equal(ref.tul2_quantize(p, bits, m), plain)
    assert torch.equal(ref.tul2_dequantize(plain, bits, m), ref.log2_dequantize(plain, bits, 1.0, m))


def test_reference_bad_inputs():
    p = random_probs((16,))
    with pytest.raises(ValueError, match="max_code"):
        ref.tul2_quantize(p, 4, 0, 15)          # 15 is the zero code
    with pytest.raises(ValueError, match="max_code"):
        ref.tul2_quantize(p, 3, 1, -1)
    with pytest.raises(ValueError, match="max_code"):
        ref.tul2_quantize(p, 3, 1, 2.5)
    with pytest.raises(ValueError, match="substeps"):
        ref.tul2_quantize(p, 4, 3, 4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ref.tul2_quantize(torch.tensor([0.5, float("nan")]), 4, 0, 4)
    with pytest.raises(ValueError, match="zero code"):  # code 9 lies between max_code 4 and the zero code
        ref.tul2_dequantize(torch.tensor([1, 9], dtype=torch.uint8), 4, 0, 4)


# ---------------------------------------------------------------------------
# calibration quantizer
# ---------------------------------------------------------------------------
def peaky_attention(B, H, N, D, temp):
    """Softmax rows of random logits (temperature temp) and random V."""
    logits = torch.randn(B, H, N, N) * temp
    logits[..., 0] += temp * 2                 # a sink token with large probability, as in ViTs
    return logits.softmax(-1), torch.randn(B, H, N, D)


@settings(max_examples=20)
@given(bits=st.integers(2, 8), m=st.sampled_from([0, 1, 2]), frac=st.floats(0, 1))
def test_quantizer_equals_reference_bit_for_bit(bits, m, frac):
    from vitq.quantizers import TruncatedLog2Quantizer
    top = (1 << bits) - 1
    max_code = int(round(frac * (top - 1)))
    q = TruncatedLog2Quantizer(bits, substeps=m, max_code=max_code)
    assert q.initialized
    p, _ = peaky_attention(2, 2, 33, 8, 3.0)
    p = p.requires_grad_(True)
    out = q(p)
    expect = ref.tul2_dequantize(ref.tul2_quantize(p.detach(), bits, m, max_code), bits, m, max_code)
    assert torch.equal(out.detach(), expect)
    # straight-through gradient: 1 where P^ is a kept code, 0 where truncation zeroed it
    out.sum().backward()
    kept = ref.tul2_quantize(p.detach(), bits, m, max_code).to(torch.int64) <= max_code
    assert torch.equal(p.grad, kept.float())
    assert q.export_params() == {"bits": bits, "substeps": m, "max_code": max_code, "scale": 1.0,
                                 "t_min": -(max_code + 0.5) / (1 << m)}


@pytest.mark.parametrize("with_values", [True, False])
@pytest.mark.parametrize("bits", [3, 4])
def test_calibration_search_is_exact_and_never_worse_than_log2(bits, with_values):
    from vitq.quantizers import TruncatedLog2Quantizer, tul2_search
    q = TruncatedLog2Quantizer(bits)
    q.observing = True
    batches = [peaky_attention(2, 3, 40, 16, t) for t in (1.0, 4.0)]
    for p, v in batches:
        if with_values:
            q.observe_values(v)
        q(p)
    q.observing = False
    samples = list(q._samples)
    q.finish_calibration()
    assert q.objective == ("output" if with_values else "probs")
    errors = q.search_errors
    top = (1 << bits) - 1
    assert set(errors) == {(m, k) for m in (0, 1, 2) for k in range(top)}
    assert errors[(q.substeps, q.max_code)] == min(errors.values())
    assert errors[(q.substeps, q.max_code)] <= errors[(0, top - 1)]    # plain log2 is in the search space
    # the prefix-sum search equals the brute-force objective on the same samples
    for (m, k) in [(0, top - 1), (1, 2), (2, top // 2), (q.substeps, q.max_code)]:
        brute = 0.0
        for p, v in samples:
            ph = ref.tul2_dequantize(ref.tul2_quantize(p, bits, m, k), bits, m, k).double()
            if with_values:
                brute += float(((ph - p.double()) @ v.double()).pow(2).sum())
            else:
                brute += float((ph - p.double()).pow(2).sum())
        assert math.isclose(errors[(m, k)], brute, rel_tol=1e-9, abs_tol=1e-12), (m, k)
    assert tul2_search(samples, bits, (1,), 3) .keys() == {(1, 3)}
    # after calibration the forward value is the reference at the chosen point
    p, _ = batches[0]
    assert torch.equal(q(p), ref.tul2_dequantize(ref.tul2_quantize(p, bits, q.substeps, q.max_code), bits,
                                                 q.substeps, q.max_code))


def test_sampling_leaves_the_global_rng_alone():
    """The search sample is drawn from the quantizer's own generator: calibrating with tul2
    must not shift the global stream that other quantizers' searches and QDrop draw from."""
    from vitq.quantizers import TruncatedLog2Quantizer
    batches = [peaky_attention(2, 3, 40, 16, t) for t in (1.0, 2.0, 4.0, 8.0)]

    def calibrate():
        q = TruncatedLog2Quantizer(4)
        q.SAMPLE_CAP = 1 << 12              # small cap: also exercise the keep-a-random-half branch
        q.observing = True
        for p, v in batches:
            q.observe_values(v)
            q(p)
        return q

    state = torch.get_rng_state()
    q = calibrate()
    assert torch.equal(torch.get_rng_state(), state)
    assert 0 < q._n_samples < sum(p.numel() + v.numel() for p, v in batches)   # it did subsample
    torch.manual_seed(123)                  # a different global state: the same sample
    again = calibrate()
    assert len(again._samples) == len(q._samples)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again._samples, q._samples))


def test_tul2_that_picks_plain_log2_calibrates_exactly_like_log2(monkeypatch):
    """When the search returns plain log2 in every block, the whole calibrated model equals the
    log2 one: choosing tul2 changes nothing else (before the sampler had its own generator, it
    shifted the global random stream and so every later MSE search sample)."""
    timm = pytest.importorskip("timm")
    import vitq
    from vitq import quantizers

    def plain_wins(samples, bits, substeps_choices, max_code=None):
        return {(0, (1 << bits) - 2): 0.0, (1, 0): 1.0}
    monkeypatch.setattr(quantizers, "tul2_search", plain_wins)
    torch.manual_seed(0)
    fp = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=2, img_size=56, num_classes=10,
                           init_values=0.5).eval()
    calib = torch.randn(8, 3, 56, 56)
    x = torch.randn(3, 3, 56, 56)
    outs = []
    for sq in ("log2", "tul2"):
        cfg = vitq.ADFQConfig(w_bits=4, a_bits=4, softmax_quant=sq, amo=False, progress=False)
        qm = vitq.quantize(fp, cfg, calib)
        with torch.no_grad():
            outs.append(qm(x))
    assert (qm.blocks[0].attn.p_quant.substeps, qm.blocks[0].attn.p_quant.max_code) == (0, 14)
    assert torch.equal(outs[0], outs[1])


def test_tul2_sample_follows_the_config_seed(monkeypatch):
    """ADFQConfig.seed seeds the sampler: the same seed draws the same sample, another seed another."""
    timm = pytest.importorskip("timm")
    import vitq
    from vitq import quantizers
    firsts = []

    def capture(samples, bits, substeps_choices, max_code=None):
        if len(firsts) < 3:
            firsts.append(torch.cat([p.reshape(-1) for p, _ in samples]))
        return {(0, (1 << bits) - 2): 0.0}
    monkeypatch.setattr(quantizers, "tul2_search", capture)
    torch.manual_seed(0)
    fp = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=1, img_size=56, num_classes=10,
                           init_values=0.5).eval()
    calib = torch.randn(8, 3, 56, 56)
    for seed in (0, 0, 1):
        cfg = vitq.ADFQConfig(w_bits=4, a_bits=4, softmax_quant="tul2", amo=False, progress=False, seed=seed)
        vitq.quantize(fp, cfg, calib)
    assert len(firsts) == 3       # one attention block per run: its search sample
    assert torch.equal(firsts[0], firsts[1])
    assert firsts[0].shape != firsts[2].shape or not torch.equal(firsts[0], firsts[2])


def test_quantizer_bad_arguments():
    from vitq.quantizers import TruncatedLog2Quantizer
    with pytest.raises(ValueError, match="substeps"):
        TruncatedLog2Quantizer(4, substeps=3)
    with pytest.raises(ValueError, match="max_code"):
        TruncatedLog2Quantizer(4, substeps=0, max_code=15)
    q = TruncatedLog2Quantizer(4)
    with pytest.raises(RuntimeError, match="no calibration data"):
        q.finish_calibration()
    with pytest.raises(RuntimeError, match="before calibration"):
        q(torch.rand(2, 4).softmax(-1))


def test_config_accepts_tul2():
    import vitq
    assert vitq.ADFQConfig(softmax_quant="tul2").softmax_quant == "tul2"
    with pytest.raises(ValueError, match="softmax_quant"):
        vitq.ADFQConfig(softmax_quant="tul3")


# ---------------------------------------------------------------------------
# kernels: log2_attention with a truncation code
# ---------------------------------------------------------------------------
def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _max_code(p_bits, frac):
    return int(round(frac * ((1 << p_bits) - 2)))


@settings(max_examples=25)
@given(B=st.integers(1, 3), H=st.integers(1, 3), N=st.integers(1, 260), D=st.sampled_from([8, 16, 40, 64]),
       p_bits=st.sampled_from([3, 4, 8]), substeps=st.sampled_from([0, 1, 2]), frac=st.floats(0, 1),
       per_head=st.booleans(), with_bias=st.booleans(), spread=st.floats(0.1, 20.0))
def test_cpu_truncated_matches_reference(B, H, N, D, p_bits, substeps, frac, per_head, with_bias, spread):
    args, sm = make_inputs(B, H, N, D, per_head, spread)
    bias = torch.randn(1, H, N, N) * 3 if with_bias else None
    pmc = _max_code(p_bits, frac)
    out = run_cpu(args, sm, bias, p_bits, substeps, p_max_code=pmc)
    assert_matches_reference(out, args, sm, bias, p_bits, substeps, p_max_code=pmc)


@pytest.mark.parametrize("out_bits", [8, 4, 3])
@pytest.mark.parametrize("substeps", [0, 1, 2])
def test_cpu_truncated_quantized_output(out_bits, substeps):
    from test_log2_attention import out_quant
    args, sm = make_inputs(2, 3, 65, 64, per_head=True)
    so, zo = out_quant(out_bits)
    codes = run_cpu(args, sm, None, 4, substeps, so, zo, out_bits, p_max_code=5)
    assert_matches_reference(codes, args, sm, None, 4, substeps, so, zo, out_bits, p_max_code=5)


def test_truncation_changes_the_output_and_none_is_plain_log2():
    """p_max_code is not ignored: a small one zeroes probabilities that plain log2 keeps;
    p_max_code = 2^b - 2 is bit-identical to no truncation."""
    args, sm = make_inputs(1, 2, 197, 64, spread=4.0)
    plain = run_cpu(args, sm, None, 4, 1)
    assert torch.equal(run_cpu(args, sm, None, 4, 1, p_max_code=14), plain)
    trunc = run_cpu(args, sm, None, 4, 1, p_max_code=3)
    assert not torch.equal(trunc, plain)
    assert_matches_reference(trunc, args, sm, None, 4, 1, p_max_code=3)


@settings(max_examples=6)
@given(H=st.integers(1, 2), N=st.integers(1, 140), D=st.sampled_from([16, 40, 64]), p_bits=st.sampled_from([3, 4, 8]),
       substeps=st.sampled_from([0, 1, 2]), frac=st.floats(0, 1), two_pass=st.booleans(),
       spread=st.floats(0.1, 20.0))
def test_triton_truncated_matches_reference(H, N, D, p_bits, substeps, frac, two_pass, spread):
    args, sm = make_inputs(1, H, N, D, per_head=H > 1, spread=spread, device=_dev())
    pmc = _max_code(p_bits, frac)
    out = run_triton(args, sm, None, p_bits, substeps, path="two_pass" if two_pass else "one_block",
                     block_n=64 if two_pass else None, p_max_code=pmc)
    assert_matches_reference(out, args, sm, None, p_bits, substeps, p_max_code=pmc,
                             window=W_GPU if torch.cuda.is_available() else W_CPU)


@pytest.mark.parametrize("substeps", [1, 2])
def test_triton_truncated_one_block_and_two_pass_bit_identical_with_swin_bias(substeps):
    B, H, N, D, nw = 2, 1, 98, 32, 2
    args, sm = make_inputs(B, H, N, D, device=_dev())
    bias = swin_bias(B, H, N, nw).to(_dev())
    one = run_triton(args, sm, bias, 4, substeps, path="one_block", p_max_code=6)
    two = run_triton(args, sm, bias, 4, substeps, path="two_pass", block_m=256, block_n=64, p_max_code=6)
    assert torch.equal(one, two)
    assert_matches_reference(one, args, sm, bias, 4, substeps, p_max_code=6,
                             window=W_GPU if torch.cuda.is_available() else W_CPU)


@pytest.mark.parametrize("p_bits,substeps,pmc", [(3, 0, 2), (4, 2, 9), (8, 1, 40)])
def test_opcheck_truncated(p_bits, substeps, pmc):
    args, sm = make_inputs(2, 2, 49, 32, per_head=True)
    torch.library.opcheck(torch.ops.vitq.log2_attention,
                          (*args, sm, None, p_bits, substeps, None, None, 8, torch.float32, pmc))


@pytest.mark.parametrize("impl", ["cpu", "triton", "reference", "entry"])
@pytest.mark.parametrize("p_bits,pmc", [(3, 7), (4, 15), (4, -1), (8, 255)])
def test_bad_p_max_code(impl, p_bits, pmc):
    import importlib
    tk = importlib.import_module("vitq_kernels.triton_kernels.log2_attention")
    args, sm = make_inputs(1, 1, 9, 8)
    call = (*args, sm, None, p_bits, 0, None, None, 8, torch.float32)
    fn = {"cpu": lambda: torch.ops.vitq.log2_attention(*call, pmc),
          "triton": lambda: tk.launch_log2_attention(*call, p_max_code=pmc),
          "reference": lambda: ref.log2_attention(*call, p_max_code=pmc),
          "entry": lambda: vitq_kernels.log2_attention(*call, p_max_code=pmc)}[impl]
    with pytest.raises(ValueError, match="p_max_code"):
        fn()


# ---------------------------------------------------------------------------
# a DINOv2-style ViT calibrated with softmax_quant="tul2" exports and runs on the kernels
# ---------------------------------------------------------------------------
def test_dinov2_style_tul2_calibrates_exports_and_matches_emulation():
    timm = pytest.importorskip("timm")
    import vitq
    from vitq.export import export
    from vitq.quantizers import TruncatedLog2Quantizer
    from vitq_kernels import modules as dm

    torch.manual_seed(0)
    fp = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=2, img_size=56, num_classes=10,
                           init_values=0.5).eval()
    # sharper attention than random init gives (real ViTs have peaky heads): scale q/k weights
    with torch.no_grad():
        for blk in fp.blocks:
            blk.attn.qkv.weight[:2 * fp.embed_dim] *= 4.0
    calib = torch.randn(8, 3, 56, 56)
    cfg = vitq.ADFQConfig(w_bits=8, a_bits=8, softmax_quant="tul2", amo=False, progress=False,
                          a_init="minmax", w_init="minmax")
    qm = vitq.quantize(fp, cfg, calib)
    pqs = [b.attn.p_quant for b in qm.blocks]
    assert all(isinstance(q, TruncatedLog2Quantizer) and q.initialized for q in pqs)
    assert all(q.objective == "output" for q in pqs)      # the attention handed V to the search
    for q in pqs:   # calibration objective: never worse than plain log2
        assert q.search_errors[(q.substeps, q.max_code)] <= q.search_errors[(0, 254)]
    dep = export(qm)
    attns = [m for m in dep.modules() if isinstance(m, dm.QAttention)]
    assert len(attns) == 2
    assert [(a.p_substeps, a.p_max_code) for a in attns] == [(q.substeps, q.max_code) for q in pqs]
    x = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        t = qm.norm_pre(qm._pos_embed(qm.patch_embed(x)))
        for bq, bd in zip(qm.blocks, dep.blocks):
            B, N, C = t.shape
            # the attention branch alone, same input: kernels vs emulation
            a_fake = bq.attn(bq.norm1(t)).reshape(B * N, C)
            a_dep = bd.attn(bd.ln1(t.reshape(B * N, C).float()), B, N)
            rel = ((a_fake - a_dep).norm(dim=-1) / a_fake.norm(dim=-1))
            assert (rel <= 1e-5).double().mean() >= 0.98 and rel.max() <= 0.05, rel.max()
            a, b = bq(t), bd(t)
            rel = ((a - b).norm(dim=-1) / a.norm(dim=-1)).flatten()
            assert (rel <= 1e-5).double().mean() >= 0.98 and rel.max() <= 0.05, rel.max()
            t = a
    # the module config (what save/load rebuilds from) carries the truncation code
    cfgs = [dm.module_config(a) for a in attns]
    assert [c["p_max_code"] for c in cfgs] == [q.max_code for q in pqs]
    rebuilt = dm.module_from_config(cfgs[0])
    assert rebuilt.p_max_code == pqs[0].max_code and rebuilt.p_substeps == pqs[0].substeps
