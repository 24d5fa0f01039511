"""Triton per_token_quantize against reference.per_token_quantize: all seven outputs
bit-exact (codes, scale, zero, rowsum, outlier idx/val/count), and the same errors.

Without a GPU the kernel runs under TRITON_INTERPRET on CPU tensors (conftest sets it);
with one, the same tests run natively on CUDA, plus the `requires_gpu` group below.
The reference always runs on CPU copies.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import requires_gpu
from vitq_kernels import reference as ref
from vitq_kernels.triton_kernels import per_token_quantize

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("codes", "scale", "zero", "rowsum", "outlier_idx", "outlier_val", "outlier_count")


def _assert_matches_reference(x, bits, scale=None, zero=None, threshold=None, capacity=0, device=DEV):
    want = ref.per_token_quantize(x.cpu(), bits, None if scale is None else scale.cpu(),
                                  None if zero is None else zero.cpu(), threshold, capacity)
    to = (lambda t: None if t is None else t.to(device))
    got = per_token_quantize(x.to(device), bits, to(scale), to(zero), threshold, capacity)
    assert len(got) == 7
    for name, g, w in zip(NAMES, got, want):
        assert g.device.type == torch.device(device).type, name
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g.cpu(), w), f"{name} differs from the reference"
    return got


def _activations(gen, M, K, magnitude, n_outliers, alpha):
    """Gaussian rows plus n_outliers entries per row (at most) with |x| > alpha."""
    x = torch.randn(M, K, generator=gen) * magnitude
    x = x.clamp(-0.9 * alpha, 0.9 * alpha) if alpha is not None else x
    if n_outliers and K:
        cols = torch.randint(0, K, (M, n_outliers), generator=gen)
        big = (alpha * (1.0 + torch.rand(M, n_outliers, generator=gen) * 4)).float()
        sign = torch.where(torch.rand(M, n_outliers, generator=gen) < 0.5, -1.0, 1.0)
        x.scatter_(1, cols, big * sign)
    return x


@given(M=st.integers(1, 80), half_k=st.integers(1, 180), bits=st.sampled_from([4, 8]),
       outliers=st.sampled_from(["off", "threshold_only", "on"]), static=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]), log_mag=st.floats(-3, 3),
       slack=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_matches_reference(M, half_k, bits, outliers, static, dtype, log_mag, slack, seed):
    gen = torch.Generator().manual_seed(seed)
    K = 2 * half_k if bits == 4 else 2 * half_k - (seed % 2)      # odd K too at 8 bit
    magnitude = 10.0 ** log_mag
    alpha = 3.0 * magnitude if outliers != "off" else None
    n_out = 4 if outliers == "on" else 0
    x = _activations(gen, M, K, magnitude, n_out, alpha).to(dtype)
    threshold, capacity = None, 0
    if alpha is not None:
        threshold = alpha
        # capacity <= K: reference.extract_outliers cannot pad a list longer than the row
        capacity = min(int((x.float().abs() > alpha).sum(1).max()) + slack, K)
    scale = zero = None
    if static:
        T = M if seed % 3 else 1                                   # per position or per tensor
        half = 1 << (bits - 1)
        scale = torch.rand(T, generator=gen) * magnitude / 10 + 1e-3
        zero = torch.randint(-half, half, (T,), generator=gen, dtype=torch.int32)
    _assert_matches_reference(x, bits, scale, zero, threshold, capacity)


def test_round_half_to_even_in_codes_and_zero_points():
    # lo = 0, hi = 255 -> s = 1 exactly, z = 0; every x below is a tie or an integer
    row = torch.tensor([0.0, 255.0, 0.5, 1.5, 2.5, 3.5, 126.5, 127.5, 254.5, 100.0])
    codes = _assert_matches_reference(row[None, :], 8)[0]
    want_q = torch.tensor([0, 255, 0, 2, 2, 4, 126, 128, 254, 100])
    assert torch.equal(codes.cpu()[0].to(torch.int32) + 128, want_q)
    # range [-127.5, 127.5] and [-126.5, 128.5]: s = 1, z = round(127.5) = 128, round(126.5) = 126
    rows = torch.tensor([[-127.5, 127.5, 0.0, 1.0], [-126.5, 128.5, 0.0, 1.0]])
    _, s, z, *_ = _assert_matches_reference(rows, 8)
    assert torch.equal(s.cpu(), torch.ones(2))
    assert torch.equal(z.cpu(), torch.tensor([128, 126], dtype=torch.int32) - 128)


def test_all_zero_rows_and_one_sided_rows():
    x = torch.zeros(4, 70)
    x[1] = torch.rand(70) + 0.5          # all positive: lo = 0
    x[2] = -(torch.rand(70) + 0.5)       # all negative: hi = 0
    x[3, 5] = 1e-30                      # tiny range
    for bits in (4, 8):
        _, s, *_ = _assert_matches_reference(x, bits)
        assert s.cpu()[0] == 1.0


def test_threshold_is_strict_and_rounded_to_fp32():
    alpha = 0.1                                        # not representable: fp32(0.1) > 0.1
    a32 = float(torch.tensor(alpha, dtype=torch.float32))
    above = float(torch.nextafter(torch.tensor(a32), torch.tensor(1.0)))
    row = torch.tensor([[0.0, 0.05, -0.05, a32, -a32, above, -above]])
    got = _assert_matches_reference(row, 8, threshold=alpha, capacity=2)
    assert got[6].cpu().tolist() == [2]
    assert got[4].cpu().tolist() == [[5, 6]]


def test_outliers_span_chunks_in_column_order():
    # K = 1000 spans several K-chunks in every launch configuration
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(33, 1000, generator=gen).clamp(-2.5, 2.5)
    for col in (3, 250, 255, 256, 511, 700, 999):
        x[::2, col] = 9.0 * (1 if col % 2 else -1)
    for bits in (4, 8):
        got = _assert_matches_reference(x, bits, threshold=3.0, capacity=9)
        assert got[4].cpu()[0, :7].tolist() == [3, 250, 255, 256, 511, 700, 999]
        assert got[4].cpu()[0, 7:].tolist() == [0, 0] and got[5].cpu()[0, 7:].tolist() == [0.0, 0.0]
        assert got[6].cpu()[1] == 0


def test_capacity_exactly_full_and_static_per_position():
    gen = torch.Generator().manual_seed(6)
    tokens, batch = 13, 3
    x = _activations(gen, tokens * batch, 96, 1.0, 6, 4.0)
    cap = int((x.abs() > 4.0).sum(1).max())
    scale = torch.rand(tokens, generator=gen) * 0.05 + 0.01
    zero = torch.randint(-8, 8, (tokens,), generator=gen, dtype=torch.int32)
    _assert_matches_reference(x, 4, scale, zero, 4.0, cap)


def test_strided_input_and_empty_shapes():
    gen = torch.Generator().manual_seed(7)
    big = torch.randn(64, 90, generator=gen)
    _assert_matches_reference(big[:, 3:67], 8)           # row stride 90
    _assert_matches_reference(big.t()[:40], 4)           # column stride 90
    for bits in (4, 8):
        got = _assert_matches_reference(torch.empty(0, 16), bits, threshold=1.0, capacity=3)
        assert got[0].shape[0] == 0 and got[4].shape == (0, 3)
    _assert_matches_reference(torch.empty(5, 0), 8)


# invalid scales and non-finite x make the interpreter's numpy divide warn before the error
_NUMPY_DIVIDE = "ignore:.*encountered in divide:RuntimeWarning"


@pytest.mark.filterwarnings(_NUMPY_DIVIDE)
def test_bad_inputs():
    x = torch.randn(6, 8, device=DEV)
    cases = [
        (dict(x=x, bits=5), ValueError, "bits must be one of"),
        (dict(x=x[0], bits=8), ValueError, "2-D"),
        (dict(x=torch.ones(6, 8, dtype=torch.int32, device=DEV), bits=8), TypeError, "float"),
        (dict(x=torch.randn(6, 7, device=DEV), bits=4), ValueError, "odd"),
        (dict(x=x, bits=8, max_outliers=2), ValueError, "needs an outlier_threshold"),
        (dict(x=x, bits=8, outlier_threshold=1.0, max_outliers=-1), ValueError, ">= 0"),
        (dict(x=x, bits=8, zero=torch.zeros(1, dtype=torch.int32, device=DEV)), ValueError, "zero given without"),
        (dict(x=x, bits=8, scale=torch.ones(1, device=DEV)), ValueError, "needs a zero point"),
        (dict(x=x, bits=8, scale=torch.ones(4, device=DEV), zero=torch.zeros(4, dtype=torch.int32, device=DEV)),
         ValueError, "do not tile"),
        # the dtypes and rank the C++ CPU and CUDA kernels require (tests/test_quantize_cpu.py)
        (dict(x=x, bits=8, scale=torch.ones(3, dtype=torch.float64, device=DEV),
              zero=torch.zeros(3, dtype=torch.int32, device=DEV)),
         TypeError, r"scale must be float32, got (torch\.)?float64"),
        (dict(x=x, bits=8, scale=torch.ones(3, dtype=torch.float16, device=DEV),
              zero=torch.zeros(3, dtype=torch.int32, device=DEV)),
         TypeError, r"scale must be float32, got (torch\.)?float16"),
        (dict(x=x, bits=8, scale=torch.ones(3, device=DEV), zero=torch.zeros(3, dtype=torch.int64, device=DEV)),
         TypeError, r"zero must be int32, got (torch\.)?int64"),
        (dict(x=x, bits=8, scale=torch.ones(1, 3, device=DEV), zero=torch.zeros(1, 3, dtype=torch.int32, device=DEV)),
         ValueError, "must be 1-D"),
    ]
    for bad_s in (0.0, -1.0, float("nan"), float("inf")):
        cases.append((dict(x=x, bits=8, scale=torch.tensor([1.0, bad_s], device=DEV),
                           zero=torch.zeros(2, dtype=torch.int32, device=DEV)), ValueError, "finite and > 0"))
    for bits, bad_z in ((8, 128), (8, -129), (4, 8), (4, -9)):
        cases.append((dict(x=x, bits=bits, scale=torch.ones(3, device=DEV),
                           zero=torch.tensor([0, bad_z, 0], dtype=torch.int32, device=DEV)),
                      ValueError, "zero points must lie in"))
    for kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            per_token_quantize(**kwargs)


@pytest.mark.filterwarnings(_NUMPY_DIVIDE)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("static", [False, True])
def test_non_finite_input_raises(bad, static):
    x = torch.randn(40, 300)
    x[37, 290] = bad
    kw = dict(scale=torch.ones(1, device=DEV), zero=torch.zeros(1, dtype=torch.int32, device=DEV)) if static else {}
    with pytest.raises(ValueError, match="NaN or Inf"):
        per_token_quantize(x.to(DEV), 8, **kw)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ref.per_token_quantize(x, 8, **{k: v.cpu() for k, v in kw.items()})


def test_too_many_outliers_raises_with_row_and_count():
    x = torch.randn(40, 300).clamp(-2, 2)
    x[29, [1, 50, 280, 290, 299]] = 10.0
    x[3, [7, 8, 9]] = -10.0
    with pytest.raises(ValueError, match=r"row 29 has 5 outliers but max_outliers=4"):
        per_token_quantize(x.to(DEV), 8, None, None, 3.0, 4)
    with pytest.raises(ValueError, match=r"row 29 has 5 outliers but max_outliers=0"):
        per_token_quantize(x.to(DEV), 4, None, None, 3.0, 0)
    _assert_matches_reference(x, 8, threshold=3.0, capacity=5)


# ---------------------------------------------------------------------------
# native CUDA only
# ---------------------------------------------------------------------------
@requires_gpu
@pytest.mark.parametrize("K", [384, 768, 3072, 4096 + 64])
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_vit_shapes_bf16_and_fp32(K, bits):
    gen = torch.Generator().manual_seed(K + bits)
    x = _activations(gen, 197 * 4, K, 1.0, 12, 5.0)
    cap = int((x.abs() > 5.0).sum(1).max()) + 2
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        _assert_matches_reference(x.to(dtype), bits, threshold=5.0, capacity=cap, device="cuda")
    scale = torch.rand(197, generator=gen) * 0.05 + 0.01
    zero = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (197,), generator=gen, dtype=torch.int32)
    _assert_matches_reference(x, bits, scale, zero, 5.0, cap, device="cuda")


@requires_gpu
def test_cuda_opcheck_and_device_mismatch():
    gen = torch.Generator().manual_seed(8)
    x = _activations(gen, 50, 128, 1.0, 3, 3.0).cuda()
    s = torch.rand(10, generator=gen).cuda() + 0.01
    z = torch.zeros(10, dtype=torch.int32, device="cuda")
    op = torch.ops.vitq.per_token_quantize.default
    for args in [(x, 8, None, None, None, 0), (x, 4, None, None, 3.0, 4), (x, 8, s, z, 3.0, 4), (x, 4, s, z, None, 0)]:
        torch.library.opcheck(op, args)
    with pytest.raises(ValueError, match="one device"):
        per_token_quantize(x, 8, s.cpu(), z, None, 0)
