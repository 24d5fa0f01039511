"""3-bit activations and weights end to end (issue 6), in the int4 container.

3-bit uniform codes are unsigned q in [0, 7], stored signed as q - 4 in [-4, 3] and packed
two per byte exactly like int4 (reference.py, "3-bit codes").  No op has a 3-bit GEMM: a_bits
or w_bits = 3 selects the int4 container and the int4 kernels.  What is checked here:
  * every producer of 3-bit codes (per_token_quantize, layernorm_quantize, both on the C++ CPU
    kernel and the Triton kernel) is bit-exact against the reference and never leaves
    [-4, 3] (codes and zero points), on random inputs with extreme rows (magnitudes from 1e-30
    to ~1e38, constant, one-sided and all-zero rows, static scales that force clamping);
  * the int4 GEMMs on 3-bit codes: the integer part exact, the call with bits 3 bit-identical
    to the same call with bits 4 (one code path), and the fp32 epilogue within the same bound
    as the 4/8-bit tests; Shift-Log2 at 3 bits (fc1 codes 0..7, fc2 decode bit-exact);
  * opcheck of every bits=3 variant; widths 2, 5 and 9 rejected with a clear error everywhere;
  * calibration at W3A3 / W3A4 is exportable, and an exported W3A3 DINOv2-style ViT computes
    what its fake-quant emulation computes (see test_w3a3_deploy_matches_emulation for the
    bounds and why).
"""
import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vitq_kernels  # noqa: F401  (registers torch.ops.vitq)
from test_layernorm_quantize import assert_contract, make_ln_inputs
from test_shiftlog2 import assert_fc1_accepted
from vitq_kernels import reference as R
from vitq_kernels import triton_kernels as TK

OPS = torch.ops.vitq
# the Triton kernels run on CUDA tensors when there is a GPU, else under the interpreter on CPU
DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("codes", "scale", "zero", "rowsum", "outlier_idx", "outlier_val", "outlier_count")
BAD_BITS = (2, 5, 9)
LO3, HI3 = -4, 3


def assert_in_3bit_range(codes, zero=None):
    """Packed 3-bit codes (uint8 [.., K/2]) and zero points lie in [-4, 3]."""
    assert codes.dtype == torch.uint8
    c = R.unpack_int4(codes.cpu())
    if c.numel():
        assert int(c.min()) >= LO3 and int(c.max()) <= HI3, (int(c.min()), int(c.max()))
    if zero is not None and zero.numel():
        assert int(zero.min()) >= LO3 and int(zero.max()) <= HI3


def extreme_rows(M, K, gen, kinds, spike=1e6):
    """[M, K] fp32 rows, row i of kind kinds[i % len(kinds)]."""
    x = torch.randn(M, K, generator=gen)
    for i in range(M):
        kind = kinds[i % len(kinds)]
        if kind == "huge":
            x[i] *= 1e37
        elif kind == "tiny":
            x[i] *= 1e-30
        elif kind == "zero":
            x[i] = 0.0
        elif kind == "constant":
            x[i] = float(x[i, 0])
        elif kind == "positive":
            x[i] = x[i].abs() + 0.5
        elif kind == "negative":
            x[i] = -x[i].abs() - 0.5
        elif kind == "spike":
            x[i, int(torch.randint(0, K, (1,), generator=gen))] = spike
    return x


KINDS = ("gauss", "huge", "tiny", "zero", "constant", "positive", "negative", "spike")


def on_device(fn):
    """fn with its tensor arguments moved to DEV and its outputs brought back to the CPU."""
    def run(*args):
        out = fn(*[a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args])
        return tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()
    run.__name__ = f"{fn.__name__}_on_{DEV}"
    return run


def _impls():
    return [OPS.per_token_quantize, on_device(TK.per_token_quantize)]


# ---------------------------------------------------------------------------
# the spec
# ---------------------------------------------------------------------------
def test_reference_spec_of_3bit_codes():
    assert 3 in R.ACT_BITS and 3 in R.WEIGHT_BITS and R.PACKED_BITS == (3, 4)
    assert R.container_bits(3) == R.container_bits(4) == 4 and R.container_bits(8) == 8
    assert R.qmin_qmax(3) == (LO3, HI3)
    x = torch.randn(6, 10) * 3
    codes, s, z, rs, *_ = R.per_token_quantize(x, 3)
    assert codes.dtype == torch.uint8 and codes.shape == (6, 5)
    # the formulas of the module doc with b = 3, written out independently
    lo, hi = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    s_want = (hi - lo) / 7
    zu = torch.round(-lo / s_want).clamp(0, 7)
    q = (torch.round(x / s_want[:, None]) + zu[:, None]).clamp(0, 7)
    assert torch.equal(s, s_want) and torch.equal(z, (zu - 4).int())
    assert torch.equal(R.unpack_int4(codes), (q - 4).to(torch.int8))
    assert torch.equal(rs, (q - 4).sum(1).int())
    # dequantization recovers x to within half a step
    err = (R.dequantize_rows(codes, s, z, 3) - x).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-6)).all())


# ---------------------------------------------------------------------------
# producers: exact and in range
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("impl", _impls(), ids=["cpu", "triton"])
@given(M=st.integers(0, 40), half_k=st.integers(1, 90), mode=st.sampled_from(
       ["dynamic", "static", "outliers", "static+outliers"]), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_per_token_quantize_3bit_exact_and_in_range(impl, M, half_k, mode, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    K = 2 * half_k
    kinds = KINDS if dtype == torch.float32 else ("gauss", "zero", "constant", "positive", "negative")
    x = extreme_rows(M, K, gen, kinds).to(dtype)
    scale = zero = None
    if "static" in mode:
        T = 1 if M == 0 or seed % 2 else M
        # scales far too small for most rows: the clamp to [0, 7] is exercised
        scale = torch.rand(T, generator=gen) * 0.5 + 1e-3
        zero = torch.randint(LO3, HI3 + 1, (T,), generator=gen, dtype=torch.int32)
    threshold, cap = None, 0
    if "outliers" in mode:
        threshold = 2.0
        cap = min(K, int((x.float().abs() > threshold).sum(1).max()) if M else 0)
    got = impl(x, 3, scale, zero, threshold, cap)
    want = R.per_token_quantize(x, 3, scale, zero, threshold, cap)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), f"{name} differs from the reference"
    assert_in_3bit_range(got[0], got[2])
    if "static" not in mode and M:
        # a dynamic range always holds 0 and the row's extremes: both ends of the code range are
        # reached in every row that has a negative and a positive dense value
        c = R.unpack_int4(got[0]).int()
        dense = torch.where(x.float().abs() > threshold, 0.0, x.float()) if threshold else x.float()
        both = (dense.amin(1) < 0) & (dense.amax(1) > 0)
        assert bool((c.amin(1)[both] == LO3).all() and (c.amax(1)[both] == HI3).all())


@pytest.mark.parametrize("impl", [OPS.layernorm_quantize, on_device(TK.layernorm_quantize)],
                         ids=["cpu", "triton"])
@given(M=st.integers(0, 30), half_k=st.integers(1, 96), mode=st.sampled_from(
       ["dynamic", "static", "outliers", "static+outliers"]), offset=st.sampled_from([0.0, 4.0]),
       big_affine=st.booleans())
def test_layernorm_quantize_3bit_contract_and_range(impl, M, half_k, mode, offset, big_affine):
    K = 2 * half_k
    x, w, b = make_ln_inputs(M, K, offset=offset, spikes=0.02)
    if big_affine:       # large LayerNorm outputs: static scales clamp hard
        w, b = w * 1e4, b * 1e4
    scale = zero = None
    if "static" in mode:
        scale = torch.rand(1) * 0.2 + 0.01
        zero = torch.randint(LO3, HI3 + 1, (1,), dtype=torch.int32)
    threshold, cap = (3.0, K) if "outliers" in mode else (None, 0)
    # (1) outputs == per_token_quantize(kernel's own LayerNorm), (2) the LayerNorm bound
    out = assert_contract(impl, x, w, b, 1e-6, 3, scale, zero, threshold, cap)
    assert_in_3bit_range(out[0], out[2])


# ---------------------------------------------------------------------------
# the int4 GEMMs on 3-bit codes
# ---------------------------------------------------------------------------
QGEMM_BITS = [(3, 3), (3, 4), (4, 3), (3, 8), (8, 3)]          # (a_bits, w_bits)


def _codes_operand(codes, bits):
    return R.pack_int4(codes) if R.is_packed(bits) else codes


@pytest.mark.parametrize("impl", [OPS.qgemm, on_device(TK.qgemm)], ids=["cpu", "triton"])
@given(M=st.integers(1, 70), half_k=st.integers(1, 100), N=st.integers(1, 70), bits=st.sampled_from(QGEMM_BITS),
       w_zero=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_qgemm_3bit_integer_part_exact(impl, M, half_k, N, bits, w_zero, seed):
    """Unit scales, no bias/outliers: y is the exact integer sum_k (a - za)(w - zw)."""
    gen = torch.Generator().manual_seed(seed)
    a_bits, w_bits = bits
    K = 2 * half_k
    (lo_a, hi_a), (lo_w, hi_w) = R.qmin_qmax(a_bits), R.qmin_qmax(w_bits)
    ac = torch.randint(lo_a, hi_a + 1, (M, K), generator=gen, dtype=torch.int8)
    wc = torch.randint(lo_w, hi_w + 1, (N, K), generator=gen, dtype=torch.int8)
    za = torch.randint(lo_a, hi_a + 1, (M,), generator=gen, dtype=torch.int32)
    zw = torch.randint(lo_w, hi_w + 1, (N,), generator=gen, dtype=torch.int32) if w_zero else None
    args = [_codes_operand(ac, a_bits), torch.ones(M), za, R.weight_colsum(ac), _codes_operand(wc, w_bits),
            torch.ones(N), zw, R.weight_colsum(wc), None, None, None, a_bits, w_bits, torch.float32]
    exact = (ac.long() - za.long()[:, None]) @ (wc.long() - (zw.long()[:, None] if w_zero else 0)).T
    y = impl(*args)
    assert torch.equal(y, exact.float())
    assert torch.equal(y, R.qgemm(*args))


@pytest.mark.parametrize("impl", [OPS.qgemm, on_device(TK.qgemm)], ids=["cpu", "triton"])
@given(M=st.integers(1, 60), half_k=st.integers(1, 96), N=st.integers(1, 60), bits=st.sampled_from(QGEMM_BITS),
       w_zero=st.booleans(), bias=st.booleans(), outliers=st.booleans(),
       out_dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**31 - 1))
def test_qgemm_3bit_is_the_int4_path(impl, M, half_k, N, bits, w_zero, bias, outliers, out_dtype, seed):
    """Real quantized operands: the bits-3 call is bit-identical to the same operands declared
    4-bit (one kernel), and within the epilogue's fp32 rounding of the reference."""
    gen = torch.Generator().manual_seed(seed)
    a_bits, w_bits = bits
    K = 2 * half_k
    # spikes of 50 (outliers when the split is on): large but no fp16 overflow of y
    x = extreme_rows(M, K, gen, ("gauss", "spike", "positive", "zero", "tiny"), spike=50.0)
    thr, cap = (4.0, min(K, int((x.abs() > 4.0).sum(1).max()))) if outliers else (None, 0)
    a, s, z, rs, idx, val, _ = R.per_token_quantize(x, a_bits, None, None, thr, cap)
    wc, sw, zw = R.quantize_weight_per_channel(torch.randn(N, K, generator=gen) * 0.05, w_bits,
                                               symmetric=not w_zero)
    lo_w, hi_w = R.qmin_qmax(w_bits)
    assert int(wc.min()) >= lo_w and int(wc.max()) <= hi_w
    args = [a, s, z, rs, _codes_operand(wc, w_bits), sw, zw if w_zero else None, R.weight_colsum(wc),
            torch.randn(N, generator=gen) if bias else None, idx if cap else None, val if cap else None]
    y = impl(*args, a_bits, w_bits, out_dtype)
    as_int4 = impl(*args, R.container_bits(a_bits), R.container_bits(w_bits), out_dtype)
    assert torch.equal(y, as_int4)
    want32 = R.qgemm(*args, a_bits, w_bits, torch.float32)
    assert torch.equal(want32, R.qgemm(*args, R.container_bits(a_bits), R.container_bits(w_bits),
                                       torch.float32))
    # epilogue bound as in test_triton_qgemm: 1e-5 of the magnitude it rounds, plus the final cast
    ac = R.unpack_int4(a) if R.is_packed(a_bits) else a
    wzd = wc.double() - (zw.double()[:, None] if w_zero else 0)
    mag = s.double()[:, None] * ((ac.double() - z.double()[:, None]) @ wzd.T).abs()
    for c in range(cap):
        mag += val[:, c:c + 1].double().abs() * wzd.abs()[:, idx[:, c].long()].T
    mag = sw.double()[None, :] * mag + (args[8].double().abs()[None, :] if bias else 0)
    rel = 2.0 ** -10 if out_dtype == torch.float16 else 0.0
    tol = 1e-5 * mag + rel * want32.double().abs() + (2.0 ** -24 if out_dtype == torch.float16 else 0) + 1e-30
    assert bool(((y.double() - want32.to(out_dtype).double()).abs() <= tol).all())


@pytest.mark.parametrize("impl", [OPS.qgemm_gelu_shiftlog2, on_device(TK.qgemm_gelu_shiftlog2)],
                         ids=["cpu", "triton"])
@given(M=st.integers(0, 50), half_k=st.sampled_from([1, 15, 32, 65]), N=st.integers(1, 90),
       bits=st.sampled_from([(3, 3), (3, 4), (4, 3)]), out_bits=st.sampled_from([3, 4]),
       substeps=st.sampled_from([0, 1]), w_zero=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fc1_shiftlog2_3bit(impl, M, half_k, N, bits, out_bits, substeps, w_zero, seed):
    """fc1 on 3-bit codes (int4 path) writing 3-bit Shift-Log2 codes: every code in 0..7 (or
    0..15) and within the GELU-rounding interval of test_shiftlog2."""
    gen = torch.Generator().manual_seed(seed)
    a_bits, w_bits = bits
    K = 2 * half_k
    x = torch.randn(M, K, generator=gen)
    a, s, z, rs, *_ = R.per_token_quantize(x, a_bits)
    wc, sw, zw = R.quantize_weight_per_channel(torch.randn(N, K, generator=gen), w_bits, symmetric=not w_zero)
    sw = sw * (2.0 / K ** 0.5)
    args = [a, s, z, rs, _codes_operand(wc, w_bits), sw, zw if w_zero else None, R.weight_colsum(wc),
            torch.randn(N, generator=gen) * 0.5, None, None, a_bits, w_bits]
    shift, scale = R.GELU_MIN - 1e-3, 2.0
    got = impl(*args, shift, scale, out_bits, substeps)
    assert got.dtype == torch.uint8 and (got.numel() == 0 or int(got.max()) <= (1 << out_bits) - 1)
    assert_fc1_accepted(got, args, shift, scale, out_bits, substeps)
    # the int4 path: identical when the operands are declared 4-bit
    args4 = args[:-2] + [R.container_bits(a_bits), R.container_bits(w_bits)]
    assert torch.equal(got, impl(*args4, shift, scale, out_bits, substeps))


@pytest.mark.parametrize("impl", [OPS.shiftlog2_qgemm, on_device(TK.shiftlog2_qgemm)], ids=["cpu", "triton"])
@given(M=st.integers(0, 60), half_k=st.integers(1, 100), N=st.integers(1, 60), w_bits=st.sampled_from([3, 4, 8]),
       substeps=st.sampled_from([0, 1]), w_zero=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fc2_decode_3bit_codes_exact(impl, M, half_k, N, w_bits, substeps, w_zero, bias, seed):
    """fc2 on 3-bit Shift-Log2 codes (0..7) with 3/4/8-bit weights: bit-exact (the sum is exact,
    reference.shiftlog2_sum_is_exact).  High code bits are ignored: codes may carry garbage
    above bit 2 and still decode as their low 3 bits."""
    gen = torch.Generator().manual_seed(seed)
    K = 2 * half_k
    assert R.shiftlog2_sum_is_exact(3, substeps, K)
    codes = torch.randint(0, 8, (M, K), generator=gen, dtype=torch.uint8)
    wc, sw, zw = R.quantize_weight_per_channel(torch.randn(N, K, generator=gen), w_bits, symmetric=not w_zero)
    args = [3, substeps, torch.rand(1, generator=gen) + 0.5, _codes_operand(wc, w_bits), sw,
            zw if w_zero else None, torch.randn(N, generator=gen) if bias else None, w_bits, torch.float32]
    want = R.shiftlog2_qgemm(codes, *args)
    assert torch.equal(impl(codes, *args), want)
    garbage = codes | (torch.randint(0, 32, (M, K), generator=gen, dtype=torch.uint8) << 3)
    assert torch.equal(impl(garbage, *args), want)


# ---------------------------------------------------------------------------
# opcheck of the bits=3 variants
# ---------------------------------------------------------------------------
def _opcheck_cases():
    torch.manual_seed(1)
    x = torch.randn(12, 32)
    x[:, 5] *= 9
    w, b = 1 + 0.2 * torch.randn(32), 0.1 * torch.randn(32)
    a, s, z, rs, idx, val, _ = R.per_token_quantize(x, 3, None, None, 4.0, 8)
    wc, sw, zw = R.quantize_weight_per_channel(torch.randn(20, 32), 3, symmetric=False)
    wp, cs = R.pack_int4(wc), R.weight_colsum(wc)
    static = (torch.tensor([0.3, 0.2, 0.5]), torch.tensor([-4, 0, 3], dtype=torch.int32))
    return {
        "per_token_quantize dynamic": (OPS.per_token_quantize, (x, 3, None, None, None, 0)),
        "per_token_quantize static+outliers": (OPS.per_token_quantize, (x, 3, *static, 4.0, 8)),
        "layernorm_quantize": (OPS.layernorm_quantize, (x, w, b, 1e-6, 3, None, None, 3.0, 32)),
        "layernorm_quantize static": (OPS.layernorm_quantize, (x, w, b, 1e-6, 3, *static, None, 0)),
        "qgemm W3A3": (OPS.qgemm, (a, s, z, rs, wp, sw, zw, cs, torch.randn(20), idx, val, 3, 3, torch.float16)),
        "qgemm W3A8": (OPS.qgemm, (R.per_token_quantize(x, 8)[0], s, z, rs, wp, sw, None, cs, None, None, None,
                                   8, 3, torch.float32)),
        "qgemm_gelu_shiftlog2 W3A3": (OPS.qgemm_gelu_shiftlog2, (a, s, z, rs, wp, sw, zw, cs, None, idx, val, 3, 3,
                                                                 -0.17, 2.0, 3, 0)),
        "shiftlog2_qgemm 3-bit": (OPS.shiftlog2_qgemm, (torch.randint(0, 8, (12, 32), dtype=torch.uint8), 3, 0,
                                                        torch.ones(1), wp, sw, zw, torch.randn(20), 3, torch.float32)),
    }


@pytest.mark.parametrize("case", sorted(_opcheck_cases()))
def test_opcheck_3bit(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------
# bad widths: a clear error from every implementation
# ---------------------------------------------------------------------------
def _bad_bits_calls(bits):
    x = torch.randn(4, 16)
    w, b = torch.ones(16), torch.zeros(16)
    a, s, z, rs, *_ = R.per_token_quantize(x, 4)
    wc = torch.randint(-4, 4, (8, 16), dtype=torch.int8)
    wp, cs, sw = R.pack_int4(wc), R.weight_colsum(wc), torch.ones(8)
    codes = torch.zeros(4, 16, dtype=torch.uint8)
    yield "per_token_quantize", [R.per_token_quantize, OPS.per_token_quantize, TK.per_token_quantize], \
        (x, bits, None, None, None, 0)
    yield "layernorm_quantize", [R.layernorm_quantize, OPS.layernorm_quantize, TK.layernorm_quantize], \
        (x, w, b, 1e-6, bits, None, None, None, 0)
    for name, ab, wb in (("a_bits", bits, 4), ("w_bits", 4, bits)):
        yield f"qgemm {name}", [R.qgemm, OPS.qgemm, TK.qgemm], \
            (a, s, z, rs, wp, sw, None, cs, None, None, None, ab, wb, torch.float32)
        yield f"qgemm_gelu_shiftlog2 {name}", [R.qgemm_gelu_shiftlog2, OPS.qgemm_gelu_shiftlog2,
                                               TK.qgemm_gelu_shiftlog2], \
            (a, s, z, rs, wp, sw, None, cs, None, None, None, ab, wb, -0.17, 1.0, 4, 0)
    yield "shiftlog2_qgemm w_bits", [R.shiftlog2_qgemm, OPS.shiftlog2_qgemm, TK.shiftlog2_qgemm], \
        (codes, 4, 0, torch.ones(1), wp, sw, None, None, bits, torch.float32)


@pytest.mark.parametrize("bits", BAD_BITS)
def test_bad_bits_rejected_everywhere(bits):
    n = 0
    for what, impls, args in _bad_bits_calls(bits):
        for impl in impls:
            with pytest.raises(ValueError, match=rf"must be one of \(3, 4, 8\), got {bits}"):
                impl(*args)
            n += 1
    assert n == 21


# ---------------------------------------------------------------------------
# deploy modules and the calibration layer
# ---------------------------------------------------------------------------
def test_deploy_modules_check_the_3bit_range():
    from vitq_kernels import modules as dm
    act = dm.ActQuant(3)
    codes = torch.randint(-4, 4, (6, 8), dtype=torch.int8)
    lin = dm.QLinear(codes, torch.rand(6) + 0.1, None, None, act, 3)
    assert lin.w_bits == 3 and lin.weight.dtype == torch.uint8 and lin.weight.shape == (6, 4)
    y = lin(torch.randn(5, 8))
    q = R.per_token_quantize(torch.randn(5, 8), 3)
    assert y.shape == (5, 6)
    torch.testing.assert_close(lin.gemm(q), R.qgemm(*q[:4], lin.weight, lin.w_scale, None, lin.w_colsum,
                                                    None, None, None, 3, 3), rtol=1e-5, atol=1e-6)
    for bad in (4, -5):
        c = codes.clone()
        c[2, 3] = bad
        with pytest.raises(ValueError, match=r"outside the 3-bit range \[-4, 3\]"):
            dm.QLinear(c, torch.ones(6), None, None, act, 3)
    dm.QLinear(codes.clone().fill_(-5), torch.ones(6), None, None, act, 4)      # fine in a 4-bit layer
    for bits in BAD_BITS:
        with pytest.raises(ValueError, match="deployable activation bits"):
            dm.ActQuant(bits)
        with pytest.raises(ValueError, match="deployable weight bits"):
            dm.QLinear(codes, torch.ones(6), None, None, act, bits)


def test_config_exportable_at_3_bits():
    import vitq
    for w_bits, a_bits in ((3, 3), (3, 4), (4, 3), (3, 8)):
        cfg = vitq.ADFQConfig(w_bits=w_bits, a_bits=a_bits)
        assert cfg.exportable, (w_bits, a_bits)
    assert not vitq.ADFQConfig(w_bits=2, a_bits=3).exportable
    assert not vitq.ADFQConfig(w_bits=3, a_bits=5).exportable
    assert not vitq.ADFQConfig(w_bits=3, a_bits=3, head_bits=6).exportable


# ---------------------------------------------------------------------------
# an exported W3A3 model against its emulation
# ---------------------------------------------------------------------------
_W3A3 = {}


def _w3a3_model():
    """A DINOv2-style ViT (layer scale, dynamic image size; tests/test_wrap.py MODELS) with random
    weights, calibrated at W3A3 with two AMO iterations per module, and its export."""
    if not _W3A3:
        import vitq
        from timm.models.vision_transformer import VisionTransformer
        from vitq.export import export
        torch.manual_seed(0)
        fp = VisionTransformer(img_size=28, patch_size=7, embed_dim=64, depth=2, num_heads=2, num_classes=10,
                               init_values=1e-1, dynamic_img_size=True).eval()
        cfg = vitq.ADFQConfig(w_bits=3, a_bits=3, iters=2, calib_images=8, batch_size=4, progress=False,
                              a_init="minmax", w_init="minmax")
        assert cfg.exportable
        qm = vitq.quantize(fp, cfg, torch.randn(8, 3, 28, 28))
        _W3A3.update(fp=fp, qm=qm, dep=export(qm))
    return _W3A3["qm"], _W3A3["dep"]


def test_w3a3_export_holds_3bit_codes():
    from vitq_kernels import modules as dm
    qm, dep = _w3a3_model()
    blocks = [m for m in dep.modules() if isinstance(m, dm.QBlock)]
    assert len(blocks) == 2 and not any(type(m).__name__.startswith("Quant") for m in dep.modules())
    for blk in blocks:
        at = blk.attn
        assert at.qkv_act.bits == 3 and at.p_bits == 3 and at.proj.act.bits == 3
        assert blk.ln1.act.bits == 3 and blk.ln2.act.bits == 3 and blk.mlp.slq and blk.mlp.slq_bits == 3
        assert at.qkv_act.zero.min() >= LO3 and at.qkv_act.zero.max() <= HI3
        assert at.proj.act.zero.min() >= LO3 and at.proj.act.zero.max() <= HI3
        for lin in (at.qkv, at.proj, blk.mlp.fc1, blk.mlp.fc2):
            assert lin.w_bits == 3 and lin.weight.dtype == torch.uint8
            c = R.unpack_int4(lin.weight)
            assert int(c.min()) >= LO3 and int(c.max()) <= HI3
    # every 3-bit code the deploy model produces at run time stays in range: the ops' outputs,
    # captured on the way (uniform codes from LN-quant, q/k/v and the attention output for
    # proj; Shift-Log2 codes from fc1)
    seen = []
    where_bits = {"per_token_quantize": 1, "layernorm_quantize": 4, "log2_attention": 15,
                  "qgemm_gelu_shiftlog2": 15}

    class SpyOps:
        def __getattr__(self, name):
            op = getattr(torch.ops.vitq, name)
            if name not in where_bits:
                return op

            def spy(*args):
                out = op(*args)
                seen.append((name, args[where_bits[name]], out))
                return out
            return spy

    import vitq_kernels.modules as mods
    saved = mods.vitq
    mods.vitq = SpyOps()
    try:
        with torch.no_grad():
            dep(torch.randn(4, 3, 28, 28) * 3)
    finally:
        mods.vitq = saved
    counts = {}
    for name, bits, out in seen:
        if bits != 3:
            continue
        counts[name] = counts.get(name, 0) + 1
        if name in ("per_token_quantize", "layernorm_quantize"):
            assert_in_3bit_range(out[0], out[2])
        elif name == "log2_attention":
            assert_in_3bit_range(out)
        else:
            assert out.dtype == torch.uint8 and int(out.max()) <= 7
    # per block: LN1, LN2, the q/k/v codes, the attention output, fc1's Shift-Log2 codes
    assert counts == {"layernorm_quantize": 4, "per_token_quantize": 2, "log2_attention": 2,
                      "qgemm_gelu_shiftlog2": 2}, counts


def _float_emulation():
    """The plain fake-quant forward (dequantized fp32 matmuls, torch's LayerNorm/softmax/GELU).
    Without gradients the wrapped model otherwise evaluates through vitq/exact.py's integer
    path, which follows the kernels' arithmetic; both are compared with the deploy model."""
    try:
        from vitq.exact import emulation
    except ImportError:          # no integer evaluation path: the default forward is the float one
        return contextlib.nullcontext()
    return emulation()


@pytest.mark.parametrize("forward", ["evaluation", "float_emulation"])
def test_w3a3_deploy_matches_emulation(forward):
    """Bounds, and why.  The deploy model and the fake-quant model use the same codes except
    where a value computed in another order (fp32 matmul of dequantized values vs the exact
    integer GEMM; LayerNorm, softmax, GELU) lands within a few ulps of a rounding boundary,
    and a flipped code is a discontinuity of the quantized model itself (test_export.py).  So,
    as in test_export.py: per block, on the same input, >= 98% of the tokens must agree to
    fp32 accumulation error (1e-5 relative) and every token to 0.1 relative (a 3-bit step is
    1/7 of a row's range, twice test_export's 0.05 allowance for one flip at 4 bits); end to
    end, where flips would propagate, logit cosine median >= 0.9999 and min >= 0.95, top-1
    equal wherever the fake model's top-2 margin exceeds twice the deviation (where no flip
    can decide it), that being >= 90% of the images, and top-1 agreement >= 90% overall.
    Measured (32 images x 6 seeds, both forwards): every token of every block within 1e-7
    relative, logits within 9e-8 absolute, top-1 agreement 100%: no flip occurred."""
    qm, dep = _w3a3_model()
    x = torch.randn(32, 3, 28, 28)
    with torch.no_grad(), (_float_emulation() if forward == "float_emulation" else contextlib.nullcontext()):
        t = qm.norm_pre(qm._pos_embed(qm.patch_embed(x)))
        t_dep = dep.norm_pre(dep._pos_embed(dep.patch_embed(x)))
        assert (t - t_dep).abs().max() <= 1e-5 * t.abs().max()
        for bq, bd in zip(qm.blocks, dep.blocks):
            a, b = bq(t), bd(t)
            rel = ((a - b).norm(dim=-1) / a.norm(dim=-1)).flatten()
            assert (rel <= 1e-5).double().mean() >= 0.98 and rel.max() <= 0.1, \
                (float((rel <= 1e-5).double().mean()), float(rel.max()))
            t = a
        a, b = qm(x), dep(x)
        fp_out = _W3A3["fp"](x)
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)
    assert cos.median() >= 0.9999 and cos.min() >= 0.95, cos
    top2 = a.topk(2, dim=1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * (a - b).abs().amax(dim=1)
    assert decisive.double().mean() >= 0.9, float(decisive.double().mean())
    assert torch.equal(a.argmax(1)[decisive], b.argmax(1)[decisive])
    assert (a.argmax(1) == b.argmax(1)).double().mean() >= 0.9
    # the emulation is a 3-bit model, not the fp one: it differs clearly from the fp logits
    assert (fp_out - a).abs().max() > 10 * (a - b).abs().max()
