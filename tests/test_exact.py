"""The integer evaluation path of the fake-quant model (vitq/exact.py) against the spec and the CPU
kernels, op by op, on fresh random inputs.  Integer parts and fp32 epilogues must be
bit-identical; the float64 LayerNorm / erfc / exp (rounded once to fp32) must give the CPU
kernels' codes bit for bit on these inputs (they differ from the kernels only where a float64
result lies within ~1e-16 relative of an fp32 rounding midpoint)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vitq_kernels  # noqa: F401  (registers torch.ops.vitq)
from vitq import exact
from vitq.quantizers import UniformActQuantizer
from vitq_kernels import reference as R

vitq = torch.ops.vitq


def _token_quantizer(bits, alpha=None, capacity=None):
    q = UniformActQuantizer(bits, "token", alpha=alpha, capacity=capacity)
    q.finish_calibration()
    return q


@given(M=st.integers(1, 24), K=st.sampled_from([8, 32, 96]), N=st.integers(1, 20), bits=st.sampled_from([4, 8]),
       outliers=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_qgemm_exact_equals_reference_and_kernel(M, K, N, bits, outliers, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 2
    if outliers:
        x[torch.rand(M, K, generator=g) < 0.05] = 12.0 * torch.sign(torch.randn(1, generator=g))
    alpha, cap = (5.0, K) if outliers else (None, 0)
    wc, ws, wz = R.quantize_weight_per_channel(torch.randn(N, K, generator=g), bits, symmetric=False)
    bias = torch.randn(N, generator=g)
    q = _token_quantizer(bits, alpha, cap if outliers else None)
    a, s, mask, xf = exact.act_ints(q, x)
    y = exact.qgemm_exact(a, s, mask, xf, (wc.int() - wz[:, None]).float(), ws, bias)
    codes, s_r, z_r, rs, idx, val, _ = R.per_token_quantize(x, bits, None, None, alpha, cap)
    assert torch.equal(s, s_r)
    wp = R.pack_int4(wc) if bits == 4 else wc
    args = (codes, s_r, z_r, rs, wp, ws, wz, R.weight_colsum(wc), bias, idx if cap else None,
            val if cap else None, bits, bits, torch.float32)
    assert torch.equal(y, R.qgemm(*args))
    assert torch.equal(y, vitq.qgemm(*args))


@pytest.mark.parametrize("K", [64, 384])
def test_layernorm_f64_gives_the_kernel_codes(K):
    x = torch.randn(256, K) * 3 + torch.randn(256, 1)
    w, b = torch.randn(K) * 0.5 + 1, torch.randn(K) * 0.1
    y = exact.layer_norm_f64(x, w, b, 1e-6)
    want = R.per_token_quantize(y, 4, None, None, 2.5, K)
    got = vitq.layernorm_quantize(x, w, b, 1e-6, 4, None, None, 2.5, K)
    for g_, w_ in zip(got, want):
        assert torch.equal(g_, w_)
    # and within the spec's LayerNorm contract
    y64, tol = R.layernorm_error_bound(x, w, b, 1e-6)
    assert bool(((y.double() - y64).abs() <= tol).all())


def test_gelu_f64_gives_the_kernel_codes():
    M, K, N = 64, 64, 96
    x = torch.randn(M, K)
    wc, ws, wz = R.quantize_weight_per_channel(torch.randn(N, K) * 0.3, 8)
    codes, s, z, rs, _, _, _ = R.per_token_quantize(x, 8)
    args = (codes, s, z, rs, wc, ws, wz, R.weight_colsum(wc), torch.randn(N))
    h = R.qgemm(*args, None, None, 8, 8, torch.float32)
    want = R.shift_log2_codes(exact.gelu_f64(h), 4, R.GELU_MIN - 1e-3, 0.05, 0)
    got = vitq.qgemm_gelu_shiftlog2(*args, None, None, 8, 8, R.GELU_MIN - 1e-3, 0.05, 4, 0)
    assert torch.equal(got, want)


@pytest.mark.parametrize("substeps,with_bias", [(0, False), (1, True), (0, True)])
def test_log2_attention_exact_equals_kernel(substeps, with_bias):
    B, H, N, D = 3, 2, 49, 32
    q, k, v = (torch.randint(-128, 128, (B, H, N, D), dtype=torch.int8) for _ in range(3))
    sc = [torch.tensor([0.02]), torch.tensor([0.03]), torch.tensor([0.05])]
    zc = [torch.tensor([3], dtype=torch.int32), torch.tensor([-5], dtype=torch.int32),
          torch.tensor([0], dtype=torch.int32)]
    bias = None
    if with_bias:   # Swin: relative-position bias + a -100 shift mask, one per window
        bias = (torch.randn(1, H, N, N) * 0.5 + torch.where(torch.rand(B, 1, N, N) < 0.3, -100.0, 0.0)).contiguous()
    cen = [t.float() - z.float() for t, z in zip((q, k, v), zc)]
    y, _, _ = exact.log2_attention_exact(*cen, *sc, 0.125, bias, 4, substeps)
    got = vitq.log2_attention(q, k, v, sc[0], zc[0], sc[1], zc[1], sc[2], zc[2], 0.125, bias, 4, substeps,
                              None, None, 8, torch.float32)
    assert torch.equal(y.permute(0, 2, 1, 3), got)


def test_emulation_switch_and_gradients():
    assert not exact.active() or not torch.is_grad_enabled()
    with torch.no_grad():
        assert exact.active()
        with exact.emulation():
            assert not exact.active()
        assert exact.active()
    with torch.enable_grad():
        assert not exact.active()


@pytest.mark.parametrize("softmax_quant", ["log2", "uniform"])
def test_attention_takes_the_kernel_path_only_for_log2_probabilities(softmax_quant):
    # the attention kernel decodes log2 codes; a uniform post-softmax quantizer (the plain
    # baseline) stays emulated in evaluation, and the model still runs without gradients
    timm = pytest.importorskip("timm")
    import vitq
    fp = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                           num_classes=5).eval()
    x = torch.randn(4, 3, 32, 32)
    qm = vitq.quantize(fp, vitq.ADFQConfig(w_bits=8, a_bits=8, amo=False, softmax_quant=softmax_quant,
                                           calib_images=4, progress=False), x)
    attn = qm.blocks[0].attn
    with torch.no_grad():
        assert exact.attention_ready(attn) is (softmax_quant == "log2")
        y = qm(x)
    assert y.shape == (4, 5) and torch.isfinite(y).all()
