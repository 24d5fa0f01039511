"""C++ CPU kernel of vitq::per_token_quantize against reference.py: all seven outputs bit-exact."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vitq_kernels  # noqa: F401  (registers torch.ops.vitq)
from vitq_kernels import reference as R

quantize = torch.ops.vitq.per_token_quantize
ALPHA = 5.0  # outlier threshold of the qkv input (paper, sec. 4.1)


def assert_same(got, want):
    names = ("codes", "scale", "zero", "rowsum", "outlier_idx", "outlier_val", "outlier_count")
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g, w), name


def activations(M, K, seed, outlier_rate=0.0, dtype=torch.float32):
    """randn rows with a per-row spread, plus planted outliers |x| in (8, 40) at the given rate."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * (0.2 + 1.5 * torch.rand(M, 1, generator=g))
    if outlier_rate:
        mask = torch.rand(M, K, generator=g) < outlier_rate
        big = (8 + 32 * torch.rand(M, K, generator=g)) * torch.where(torch.rand(M, K, generator=g) < 0.5, -1, 1)
        x = torch.where(mask, big, x)
    return x.to(dtype)


@st.composite
def quantize_cases(draw):
    bits = draw(st.sampled_from([4, 8]))
    M = draw(st.sampled_from([0, 1, 2, 3, 7, 12, 33]))
    K = draw(st.integers(0, 96))
    if bits == 4:
        K -= K % 2
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    rate = draw(st.sampled_from([0.0, 0.005, 0.02, 0.05]))
    static = draw(st.booleans()) and M > 0
    T = draw(st.sampled_from([t for t in range(1, M + 1) if M % t == 0])) if static else 0
    return bits, M, K, dtype, rate, T, draw(st.integers(0, 2**31 - 1))


@given(case=quantize_cases())
def test_matches_reference(case):
    bits, M, K, dtype, rate, T, seed = case
    x = activations(M, K, seed, rate, dtype)
    scale = zero = None
    if T:
        g = torch.Generator().manual_seed(seed + 1)
        half = 1 << (bits - 1)
        scale = 0.005 + 0.2 * torch.rand(T, generator=g)
        zero = torch.randint(-half, half, (T,), dtype=torch.int32, generator=g)
    threshold, C = None, 0
    if rate:
        threshold = ALPHA
        counts = (x.float().abs() > ALPHA).sum(1)
        C = (int(counts.max()) if M else 0) + seed % 3  # room to spare, padded slots exercised
        C = C if K else 0  # the reference fails for K = 0 < C (see test_capacity_above_k)
    got = quantize(x, bits, scale, zero, threshold, C)
    assert_same(got, R.per_token_quantize(x, bits, scale, zero, threshold, C))
    if rate and M:
        count, idx = got[6], got[4]
        assert int(count.sum()) == int((x.float().abs() > ALPHA).sum())
        for i in range(M):  # ascending columns, zero padding
            n = int(count[i])
            assert torch.all(idx[i, 1:n] > idx[i, : max(n - 1, 0)])
            assert torch.all(idx[i, n:] == 0) and torch.all(got[5][i, n:] == 0)


def test_capacity_above_k():
    # outlier lists are [M, C] for any C, also C > K (padded slots past the last column)
    x = activations(3, 4, 2)
    x[0, 1] = x[2, 3] = 20.0
    got = quantize(x, 8, None, None, ALPHA, 6)
    assert got[4].shape == got[5].shape == (3, 6)
    assert_same(got, R.per_token_quantize(x, 8, None, None, ALPHA, 6))
    # K = 0: nothing to split, every slot is padding (the reference's gather fails here)
    got = quantize(torch.empty(2, 0), 4, None, None, ALPHA, 3)
    assert torch.equal(got[4], torch.zeros(2, 3, dtype=torch.int32)) and torch.equal(got[5], torch.zeros(2, 3))
    assert torch.equal(got[6], torch.zeros(2, dtype=torch.int32)) and torch.equal(got[1], torch.ones(2))


def test_realistic_outlier_rate():
    # ~1% planted outliers, as measured on DINOv2 qkv inputs (0.2-2.1%)
    x = activations(197, 384, 7, outlier_rate=0.01)
    rate = float((x.abs() > ALPHA).float().mean())
    assert 0.005 < rate < 0.05
    C = int((x.abs() > ALPHA).sum(1).max())
    for bits in (4, 8):
        got = quantize(x, bits, None, None, ALPHA, C)
        assert_same(got, R.per_token_quantize(x, bits, None, None, ALPHA, C))
        # outliers come back exactly; the dense part is within half a step, plus the fp32
        # roundings of x / s and s * (c - z) (each within 2^-24 of a value <= |x| + s)
        back = R.dequantize_rows(got[0], got[1], got[2], bits, got[4], got[5])
        s = got[1][:, None]
        assert torch.all((back - x).abs() <= 0.5 * s + 2.0 ** -22 * (x.abs() + s))


def test_round_half_to_even_ties():
    # x / s lands exactly on k + 0.5: codes must round to even like torch.round
    s = torch.tensor([0.25])
    x = (torch.arange(-40, 40, dtype=torch.float32) + 0.5)[None, :] * 0.25
    z = torch.tensor([0], dtype=torch.int32)
    got = quantize(x, 8, s, z, None, 0)
    assert_same(got, R.per_token_quantize(x, 8, s, z, None, 0))
    assert torch.equal(got[0][0].float(), torch.round(x[0] / 0.25))


def test_ieee_division_not_reciprocal():
    # inputs where round(x / s) != round(x * (1 / s)): only a true division is exact
    g = torch.Generator().manual_seed(1)
    s = 0.01 + torch.rand(200000, generator=g)
    n = torch.randint(-100, 100, (200000,), generator=g).float() + 0.5
    x = (n * s).nextafter(torch.full_like(s, float("inf")))
    for _ in range(3):
        hit = torch.round(x / s) != torch.round(x * (1 / s))
        if hit.sum() >= 8:
            break
        x = x.nextafter(torch.full_like(s, -float("inf")))
    assert hit.sum() >= 8, "no reciprocal-sensitive inputs found"
    xs, ss = x[hit][:64], s[hit][:64]
    M = xs.numel()
    xm = xs[:, None].expand(M, 2).contiguous()  # row i: [x_i, x_i] with static scale s_i
    zero = torch.zeros(M, dtype=torch.int32)
    got = quantize(xm, 8, ss, zero, None, 0)
    assert_same(got, R.per_token_quantize(xm, 8, ss, zero, None, 0))


def test_zero_rows_and_empty_batch():
    x = torch.zeros(3, 10)
    x[1] = torch.randn(10)
    got = quantize(x, 8, None, None, None, 0)
    assert_same(got, R.per_token_quantize(x, 8, None, None, None, 0))
    assert got[1][0] == 1.0 and got[1][2] == 1.0  # s = 1 for an all-zero row
    for bits in (4, 8):
        got = quantize(torch.empty(0, 16), bits, None, None, 3.0, 4)
        assert [tuple(t.shape) for t in got] == [(0, 16 * bits // 8), (0,), (0,), (0,), (0, 4), (0, 4), (0,)]


def test_float64_input():
    x = activations(5, 24, 3).double()
    assert_same(quantize(x, 8, None, None, None, 0), R.per_token_quantize(x, 8, None, None, None, 0))


def test_threshold_is_compared_in_fp32():
    # 5 - 1e-9 rounds to 5.0f: an entry equal to 5.0 is not an outlier (as in the reference)
    x = torch.tensor([[5.0, 1.0, -6.0, 0.5]])
    got = quantize(x, 8, None, None, 5.0 - 1e-9, 2)
    assert_same(got, R.per_token_quantize(x, 8, None, None, 5.0 - 1e-9, 2))
    assert int(got[6][0]) == 1


def test_overflow_names_row_and_count():
    x = activations(6, 32, 4)
    x[2, :3] = 50.0
    x[4, :5] = -50.0  # the row with the most outliers is named
    with pytest.raises(ValueError, match=r"row 4 has 5 outliers but max_outliers=4"):
        quantize(x, 8, None, None, ALPHA, 4)
    with pytest.raises(ValueError, match=r"row 4 has 5 outliers but max_outliers=0"):
        quantize(x, 8, None, None, ALPHA, 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(bad):
    x = activations(4, 16, 5)
    x[3, 7] = bad
    with pytest.raises(ValueError, match=r"x contains NaN or Inf \(first in row 3\)"):
        quantize(x, 8, None, None, None, 0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(x.half(), 4, None, None, ALPHA, 4)


def test_bad_arguments():
    x = activations(4, 16, 6)
    s4, z4 = torch.full((4,), 0.1), torch.zeros(4, dtype=torch.int32)
    cases = [
        (ValueError, r"bits must be one of \(3, 4, 8\), got 5", (x, 5, None, None, None, 0)),
        (ValueError, "3-bit codes are packed in pairs along K; K=15 is odd", (x[:, :15].contiguous(), 3, None, None,
                                                                           None, 0)),
        (ValueError, r"zero points must lie in \[-4, 3\]; zero\[0\] = 4",
         (x, 3, s4[:1], torch.tensor([4], dtype=torch.int32), None, 0)),
        (ValueError, r"x must be 2-D \[M, K\], got shape \[64\]", (x.flatten(), 8, None, None, None, 0)),
        (TypeError, "x must be a float tensor, got int32", (x.int(), 8, None, None, None, 0)),
        (ValueError, "must be contiguous", (x.t(), 8, None, None, None, 0)),
        (ValueError, "K=15 is odd", (x[:, :15].contiguous(), 4, None, None, None, 0)),
        (ValueError, "max_outliers > 0 needs an outlier_threshold", (x, 8, None, None, None, 2)),
        (ValueError, "max_outliers must be >= 0, got -1", (x, 8, None, None, 3.0, -1)),
        (ValueError, "zero given without scale", (x, 8, None, z4, None, 0)),
        (ValueError, "static scale needs a zero point", (x, 8, s4, None, None, 0)),
        (TypeError, "scale must be float32, got float64", (x, 8, s4.double(), z4, None, 0)),
        (TypeError, "zero must be int32, got int64", (x, 8, s4, z4.long(), None, 0)),
        (ValueError, "scale must be contiguous", (x, 8, torch.full((4, 2), 0.1)[:, 0], z4, None, 0)),
        (ValueError, "must be 1-D", (x, 8, s4[None], z4[None], None, 0)),
        (ValueError, r"static scale/zero of length 3/3 do not tile M=4 rows", (x, 8, s4[:3], z4[:3], None, 0)),
        (ValueError, r"static scale/zero of length 2/4 do not tile M=4 rows", (x, 8, s4[:2], z4, None, 0)),
        (ValueError, r"finite and > 0; scale\[1\] = 0", (x, 8, torch.tensor([0.1, 0.0]), z4[:2], None, 0)),
        (ValueError, r"finite and > 0; scale\[0\] = -0.1", (x, 8, -s4, z4, None, 0)),
        (ValueError, r"finite and > 0; scale\[0\] = inf", (x, 8, torch.full((1,), float("inf")), z4[:1], None, 0)),
        (ValueError, r"zero points must lie in \[-8, 7\]; zero\[0\] = 8",
         (x, 4, s4[:1], torch.tensor([8], dtype=torch.int32), None, 0)),
        (ValueError, r"zero points must lie in \[-128, 127\]; zero\[0\] = -129",
         (x, 8, s4[:1], torch.tensor([-129], dtype=torch.int32), None, 0)),
    ]
    for exc, msg, args in cases:
        with pytest.raises(exc, match=msg):
            quantize(*args)


def test_device_is_checked():
    x = torch.empty(4, 8, device="meta")
    with pytest.raises(ValueError, match="x must be a CPU tensor, got device meta"):
        quantize.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), x, 8, None, None, None, 0)


@pytest.mark.parametrize("bits,static,threshold,C", [(8, False, None, 0), (4, False, ALPHA, 3), (8, True, ALPHA, 2),
                                                     (4, True, None, 0)])
def test_opcheck(bits, static, threshold, C):
    x = activations(6, 32, 8)
    x[1, 3] = 9.0
    scale = torch.rand(3) * 0.1 + 0.01 if static else None
    zero = torch.randint(-2, 2, (3,), dtype=torch.int32) if static else None
    torch.library.opcheck(quantize, (x, bits, scale, zero, threshold, C))
