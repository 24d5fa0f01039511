"""C++ CPU kernel of vitq::qgemm against reference.py.

The integer part is checked exactly; the fp32 epilogue to within the rounding error of
its few fp32 operations (so a build that contracts them into FMAs still passes).
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vitq_kernels  # noqa: F401  (registers torch.ops.vitq)
from vitq_kernels import reference as R

qgemm = torch.ops.vitq.qgemm
ALPHA = 5.0
U32 = 2.0 ** -24  # unit roundoff of fp32
UNIT_ROUNDOFF = {torch.float32: U32, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
TINY = {torch.float32: 2.0 ** -149, torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -133}


def make_case(M, K, N, a_bits, w_bits, outliers, bias, w_zero, seed, out_dtype=torch.float32):
    """Quantizes real-looking activations and weights with the reference; returns qgemm's args."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    threshold, C = None, 0
    if outliers:
        mask = torch.rand(M, K, generator=g) < 0.03
        x = torch.where(mask, 30 * torch.rand(M, K, generator=g) - 15, x)
        threshold = ALPHA
        C = (int((x.abs() > ALPHA).sum(1).max()) if M else 0) + 1
    codes, s, z, rs, idx, val, _ = R.per_token_quantize(x, a_bits, None, None, threshold, C)
    wf = torch.randn(N, K, generator=g) * 0.05
    wc, ws, wz = R.quantize_weight_per_channel(wf, w_bits, symmetric=not w_zero)
    wp = R.pack_int4(wc) if w_bits == 4 else wc
    b = torch.randn(N, generator=g) if bias else None
    return (codes, s, z, rs, wp, ws, wz if w_zero else None, R.weight_colsum(wc), b,
            idx if outliers else None, val if outliers else None, a_bits, w_bits, out_dtype)


def error_bound(args):
    """Elementwise bound on |kernel - reference| for the fp32 epilogue (float64 [M, N]).

    Both evaluate y = sw (s acc + sum_c v_c w'_c) + b with fp32 roundings (C + 3 of them on
    each path, fewer with FMA); each rounding errs by at most u times the magnitude it
    rounds, all of which are at most |sw| (|s acc| + sum_c |v_c w'_c|) + |b|.
    """
    a, a_scale, a_zero, _, w, w_scale, w_zero, _, bias, idx, val, a_bits, w_bits, _ = args
    ac = (R.unpack_int4(a) if a_bits == 4 else a).double()
    wc = (R.unpack_int4(w) if w_bits == 4 else w).double()
    wz = wc - (w_zero.double()[:, None] if w_zero is not None else 0)
    acc = (ac - a_zero.double()[:, None]) @ wz.T
    mag = (a_scale.double()[:, None] * acc).abs()
    C = idx.shape[1] if idx is not None else 0
    for c in range(C):
        mag = mag + (val[:, c:c + 1].double() * wz[:, idx[:, c].long()].T).abs()
    mag = w_scale.double().abs()[None, :] * mag
    if bias is not None:
        mag = mag + bias.double().abs()[None, :]
    return 2 * (C + 4) * U32 * mag


def check_against_reference(args):
    out_dtype = args[-1]
    y = qgemm(*args)
    y_ref32 = R.qgemm(*args[:-1], torch.float32)
    assert y.dtype == out_dtype and y.shape == y_ref32.shape
    # the final cast errs by at most half a unit in the last place of out_dtype
    tol = 2 * error_bound(args) + UNIT_ROUNDOFF[out_dtype] * y_ref32.double().abs() + TINY[out_dtype]
    err = (y.double() - y_ref32.double()).abs()
    assert torch.all(err <= tol), f"max excess {float((err - tol).max())}"


@st.composite
def gemm_cases(draw):
    a_bits = draw(st.sampled_from([4, 8]))
    w_bits = draw(st.sampled_from([4, 8])) if a_bits == 8 else 4  # W8A8, W4A8, W4A4
    even = a_bits == 4 or w_bits == 4
    K = draw(st.integers(1, 80))
    if even:
        K += K % 2
    return dict(M=draw(st.sampled_from([0, 1, 2, 5, 9, 70])), K=K, N=draw(st.sampled_from([1, 3, 8, 67])),
                a_bits=a_bits, w_bits=w_bits, outliers=draw(st.booleans()), bias=draw(st.booleans()),
                w_zero=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
                out_dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])))


@given(case=gemm_cases())
def test_matches_reference(case):
    check_against_reference(make_case(**case))


@given(a_bits=st.sampled_from([4, 8]), w_bits=st.sampled_from([4, 8]), w_zero=st.booleans(),
       M=st.integers(0, 70), K=st.integers(2, 130), N=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_integer_part_exact(a_bits, w_bits, w_zero, M, K, N, seed):
    # unit scales, no outliers, fp32 out: y is float(acc) exactly while |acc| < 2^24
    if a_bits == 4 or w_bits == 4:
        K -= K % 2
    args = list(make_case(M, K, N, a_bits, w_bits, False, False, w_zero, seed))
    args[1] = torch.ones(M)
    args[5] = torch.ones(N)
    y = qgemm(*args)
    ac = (R.unpack_int4(args[0]) if a_bits == 4 else args[0]).long()
    wc = (R.unpack_int4(args[4]) if w_bits == 4 else args[4]).long()
    zw = args[6].long()[:, None] if w_zero else 0
    acc = (ac - args[2].long()[:, None]) @ (wc - zw).T
    assert M == 0 or int(acc.abs().max()) < 2**24
    assert torch.equal(y, acc.float())
    assert torch.equal(y, R.qgemm(*args))


def test_empty_k():
    # K = 0: the dot is empty, so y = bias (the weight quantizer cannot build K = 0 codes)
    M, N = 3, 5
    a, w = torch.empty(M, 0, dtype=torch.int8), torch.empty(N, 0, dtype=torch.int8)
    args = (a, torch.rand(M), torch.randint(-128, 128, (M,), dtype=torch.int32), torch.zeros(M, dtype=torch.int32),
            w, torch.rand(N), torch.randint(-128, 128, (N,), dtype=torch.int32), torch.zeros(N, dtype=torch.int32),
            torch.randn(N), None, None, 8, 8, torch.float32)
    y = qgemm(*args)
    assert torch.equal(y, R.qgemm(*args))
    assert torch.equal(y, args[8].expand(M, N))


def test_largest_k_extreme_codes():
    # K = 32768 (the largest the spec allows) with extreme codes and zero points: the
    # accumulator reaches K * 255^2 / 2 and more, still exact in int32
    K = 32768
    a = torch.full((2, K), -128, dtype=torch.int8)
    a[1, ::2] = 127
    w = torch.full((3, K), 127, dtype=torch.int8)
    w[2] = torch.randint(-128, 128, (K,), dtype=torch.int8)
    a_zero = torch.tensor([127, -128], dtype=torch.int32)
    w_zero = torch.tensor([-128, 0, 5], dtype=torch.int32)
    args = (a, torch.ones(2), a_zero, a.int().sum(1, dtype=torch.int32), w, torch.ones(3), w_zero,
            w.int().sum(1, dtype=torch.int32), None, None, None, 8, 8, torch.float32)
    exact = (a.long() - a_zero.long()[:, None]) @ (w.long() - w_zero.long()[:, None]).T
    assert int(exact.abs().max()) > 2**30
    got = qgemm(*args)
    assert torch.equal(got.double(), exact.double().float().double())  # float(acc) rounds only beyond 2^24
    assert torch.equal(got, R.qgemm(*args))


def test_vit_shape():
    # ViT-B fc1 on a batch of 8 (M = 197 * 8); checks a row slice against the reference
    args = make_case(197 * 8, 768, 3072, 4, 4, True, True, True, 11)
    y = qgemm(*args)
    rows = slice(0, 197 * 8, 197)
    sliced = [t[rows] if i in (0, 1, 2, 3, 9, 10) else t for i, t in enumerate(args)]
    y_ref = R.qgemm(*sliced)
    assert torch.all((y[rows] - y_ref).abs() <= error_bound(sliced))


@pytest.mark.parametrize("a_bits,w_bits", [(8, 8), (8, 4), (4, 4)])
@pytest.mark.parametrize("extras", [False, True])
def test_opcheck(a_bits, w_bits, extras):
    args = make_case(5, 32, 6, a_bits, w_bits, extras, extras, extras, 3,
                     torch.float16 if extras else torch.float32)
    torch.library.opcheck(qgemm, args)


def test_empty_batch_and_bf16_bias():
    args = list(make_case(0, 16, 4, 8, 4, True, True, True, 5, torch.bfloat16))
    y = qgemm(*args)
    assert y.shape == (0, 4) and y.dtype == torch.bfloat16
    args = list(make_case(3, 16, 4, 8, 8, False, True, False, 6))
    args[8] = args[8].bfloat16()  # a low-precision bias is widened to fp32, as in the reference
    check_against_reference(tuple(args))


def test_bad_arguments():
    base = make_case(4, 16, 6, 8, 8, True, True, True, 9)
    a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias, idx, val, _, _, _ = base

    def with_(**kw):
        names = ["a", "a_scale", "a_zero", "a_rowsum", "w", "w_scale", "w_zero", "w_colsum", "bias", "idx",
                 "val", "a_bits", "w_bits", "out_dtype"]
        args = dict(zip(names, base))
        args.update(kw)
        return tuple(args[n] for n in names)

    long_k = torch.zeros(4, 32769, dtype=torch.int8)
    bad_idx = idx.clone()
    bad_idx[2, 0] = 16
    cases = [
        (ValueError, r"a_bits must be one of \(3, 4, 8\), got 2", with_(a_bits=2)),
        (ValueError, r"w_bits must be one of \(3, 4, 8\), got 16", with_(w_bits=16)),
        (TypeError, r"a must be int8 \(one code per byte, a_bits=8\), got uint8", with_(a=a.view(torch.uint8))),
        (TypeError, r"w must be uint8 \(two int4 codes per byte, w_bits=4\), got int8", with_(w_bits=4)),
        (ValueError, "a must be 2-D", with_(a=a.flatten())),
        (ValueError, "w must be contiguous", with_(w=w.t().contiguous().t())),
        (ValueError, "K mismatch: activations have 16, weights 15", with_(w=w[:, :15].contiguous())),
        (ValueError, "K mismatch: activations have 32, weights 16", with_(a=a.view(torch.uint8), a_bits=4)),
        (ValueError, "K=32769 > 32768: the int32 accumulator could overflow",
         with_(a=long_k, w=torch.zeros(6, 32769, dtype=torch.int8))),
        (TypeError, "a_scale must be float32, got float16", with_(a_scale=a_scale.half())),
        (ValueError, r"a_scale must have shape \[4\], got \[3\]", with_(a_scale=a_scale[:3])),
        (TypeError, "a_zero must be int32, got int64", with_(a_zero=a_zero.long())),
        (ValueError, r"a_rowsum must have shape \[4\], got \[4, 1\]", with_(a_rowsum=a_rowsum[:, None])),
        (ValueError, r"w_scale must have shape \[6\], got \[5\]", with_(w_scale=w_scale[:5])),
        (ValueError, "w_scale must be contiguous", with_(w_scale=torch.ones(6, 2)[:, 0])),
        (ValueError, r"w_zero must have shape \[6\], got \[7\]", with_(w_zero=torch.zeros(7, dtype=torch.int32))),
        (TypeError, "w_colsum must be int32, got float32", with_(w_colsum=w_colsum.float())),
        (ValueError, r"bias must have shape \[6\], got \[4\]", with_(bias=bias[:4])),
        (TypeError, "bias must be a float tensor, got int32", with_(bias=w_colsum)),
        (ValueError, "outlier_idx and outlier_val must be given together", with_(val=None)),
        (TypeError, "outlier_idx must be int32, got int64", with_(idx=idx.long())),
        (ValueError, r"outlier_idx must have shape \[M=4, C\]", with_(idx=idx[:3])),
        (ValueError, r"outlier_val must have shape \[4, %d\]" % idx.shape[1],
         with_(val=torch.zeros(4, idx.shape[1] + 1))),
        (ValueError, r"outlier_idx must lie in \[0, K=16\); outlier_idx\[2, 0\] = 16", with_(idx=bad_idx)),
        (ValueError, r"outlier_idx\[2, 0\] = -1", with_(idx=torch.where(bad_idx == 16, -1, bad_idx))),
        (ValueError, "out_dtype must be float32, float16 or bfloat16, got float64", with_(out_dtype=torch.float64)),
    ]
    for exc, msg, args in cases:
        with pytest.raises(exc, match=msg):
            qgemm(*args)


def test_device_is_checked():
    args = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in make_case(2, 8, 3, 8, 8, False, False,
                                                                                    False, 1)]
    with pytest.raises(ValueError, match="a must be a CPU tensor, got device meta"):
        qgemm.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)
