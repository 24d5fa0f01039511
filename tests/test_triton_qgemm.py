"""Triton qgemm against reference.qgemm.

* Integer part: with unit scales, no outliers and no bias, every output is an integer
  below 2^24 in magnitude, so the fp32 result must equal the exact integer product.
* Full epilogue: y = sw (s acc + o) + bias has about C + 4 fp32 roundings (C outlier
  slots), each at most 2^-24 of the magnitude of the terms it combines.  The tolerance
  is 1e-5 times mag = |sw| (|s| |acc| + sum_c |val| |w - zw|) + |bias| (covers C <= 80),
  computed per element, so cancellation between terms cannot hide an error.  With fp16 /
  bf16 output both sides are rounded separately: one more ulp (2^-10 / 2^-7 relative).

Without a GPU the kernel runs under TRITON_INTERPRET on CPU tensors (conftest sets it);
with one, the same tests run natively on CUDA, plus the `requires_gpu` group (bf16
output, ViT shapes, opcheck).  The reference always runs on CPU copies.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import requires_gpu
from vitq_kernels import reference as ref
from vitq_kernels.triton_kernels import qgemm

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BITS = [(8, 8), (8, 4), (4, 4), (4, 8)]        # (a_bits, w_bits): W8A8, W4A8, W4A4, W8A4


def _problem(gen, M, K, N, a_bits, w_bits, w_zero, bias, n_outliers, slack=0, alpha=3.0):
    """Quantized operands from random floats, through the reference quantizers."""
    x = torch.randn(M, K, generator=gen).clamp(-0.9 * alpha, 0.9 * alpha)
    if n_outliers and K:
        cols = torch.randint(0, K, (M, n_outliers), generator=gen)
        x.scatter_(1, cols, alpha * (1.5 + torch.rand(M, n_outliers, generator=gen)) *
                   torch.where(torch.rand(M, n_outliers, generator=gen) < 0.5, -1.0, 1.0))
    # capacity <= K: reference.extract_outliers cannot pad a list longer than the row
    cap = min((int((x.abs() > alpha).sum(1).max()) if M and K else 0) + slack, K) if n_outliers else 0
    a, s, z, rs, idx, val, _ = ref.per_token_quantize(x, a_bits, None, None, alpha if cap else None, cap)
    w = torch.randn(N, K, generator=gen) * 0.05
    wc, ws, wz = ref.quantize_weight_per_channel(w, w_bits, symmetric=not w_zero)
    return dict(a=a, a_scale=s, a_zero=z, a_rowsum=rs, w=ref.pack_int4(wc) if w_bits == 4 else wc,
                w_scale=ws, w_zero=wz if w_zero else None, w_colsum=ref.weight_colsum(wc),
                bias=torch.randn(N, generator=gen) if bias else None,
                outlier_idx=idx if cap else None, outlier_val=val if cap else None,
                a_bits=a_bits, w_bits=w_bits)


def _run(p, out_dtype, device=DEV):
    args = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    y = qgemm(**args, out_dtype=out_dtype)
    assert y.device.type == torch.device(device).type and y.dtype == out_dtype
    return y.cpu()


def _magnitude(p):
    """Per-element |sw| (|s| |acc| + sum_c |val| |w - zw|) + |bias| (see module doc)."""
    ac = ref.unpack_int4(p["a"]) if p["a_bits"] == 4 else p["a"]
    wc = ref.unpack_int4(p["w"]) if p["w_bits"] == 4 else p["w"]
    zw = p["w_zero"] if p["w_zero"] is not None else torch.zeros(wc.shape[0], dtype=torch.int32)
    acc = (ac.double() - p["a_zero"].double()[:, None]) @ (wc.double() - zw.double()[:, None]).T
    mag = p["a_scale"].double()[:, None] * acc.abs()
    if p["outlier_idx"] is not None:
        wz = (wc.double() - zw.double()[:, None]).abs()            # [N, K]
        for c in range(p["outlier_idx"].shape[1]):
            mag += p["outlier_val"][:, c:c + 1].double().abs() * wz[:, p["outlier_idx"][:, c].long()].T
    mag = p["w_scale"].double().abs()[None, :] * mag
    if p["bias"] is not None:
        mag += p["bias"].double().abs()[None, :]
    return mag


# one ulp of the output format relative to |y|, and its smallest subnormal
_ULP = {torch.float32: (0.0, 0.0), torch.float16: (2.0 ** -10, 2.0 ** -24), torch.bfloat16: (2.0 ** -7, 2.0 ** -133)}


def _assert_close(y, p, out_dtype, want32=None, mag=None):
    """want32/mag: the fp32 reference and _magnitude(p), when the caller already has them
    (the reference computes in fp32 and casts last, so want = want32.to(out_dtype))."""
    want32 = ref.qgemm(**p, out_dtype=torch.float32) if want32 is None else want32
    want = want32.to(out_dtype)
    assert y.shape == want.shape and y.dtype == want.dtype
    rel_ulp, subnormal = _ULP[out_dtype]
    tol = 1e-5 * (_magnitude(p) if mag is None else mag) + rel_ulp * want.double().abs() + subnormal + 1e-30
    err = (y.double() - want.double()).abs()
    assert bool((err <= tol).all()), f"max error {float(err.max()):.3g}, worst err/tol {float((err / tol).max()):.3g}"


@given(M=st.integers(1, 100), half_k=st.integers(1, 128), N=st.integers(1, 100), bits=st.sampled_from(BITS),
       w_zero=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_integer_part_exact(M, half_k, N, bits, w_zero, seed):
    """Unit scales, no bias/outliers: y is the exact sum_k (a - za)(w - zw)."""
    gen = torch.Generator().manual_seed(seed)
    a_bits, w_bits = bits
    K = 2 * half_k if 4 in bits else 2 * half_k - seed % 2   # K <= 256: |acc| <= 256 * 255^2 < 2^24
    lo_a, hi_a = ref.qmin_qmax(a_bits)
    lo_w, hi_w = ref.qmin_qmax(w_bits)
    ac = torch.randint(lo_a, hi_a + 1, (M, K), generator=gen, dtype=torch.int8)
    wc = torch.randint(lo_w, hi_w + 1, (N, K), generator=gen, dtype=torch.int8)
    za = torch.randint(lo_a, hi_a + 1, (M,), generator=gen, dtype=torch.int32)
    zw = torch.randint(lo_w, hi_w + 1, (N,), generator=gen, dtype=torch.int32) if w_zero else None
    p = dict(a=ref.pack_int4(ac) if a_bits == 4 else ac, a_scale=torch.ones(M), a_zero=za,
             a_rowsum=ref.weight_colsum(ac), w=ref.pack_int4(wc) if w_bits == 4 else wc, w_scale=torch.ones(N),
             w_zero=zw, w_colsum=ref.weight_colsum(wc), bias=None, outlier_idx=None, outlier_val=None,
             a_bits=a_bits, w_bits=w_bits)
    exact = (ac.long() - za.long()[:, None]) @ (wc.long() - (zw.long() if w_zero else torch.zeros(N).long())[:, None]).T
    assert int(exact.abs().max()) < 2**24
    y = _run(p, torch.float32)
    assert torch.equal(y, exact.float())
    assert torch.equal(y, ref.qgemm(**p, out_dtype=torch.float32))


@given(M=st.integers(1, 100), half_k=st.integers(1, 100), N=st.integers(1, 100), bits=st.sampled_from(BITS),
       w_zero=st.booleans(), bias=st.booleans(), n_outliers=st.sampled_from([0, 0, 1, 3, 6]),
       slack=st.integers(0, 3), out_dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_full_epilogue_matches_reference(M, half_k, N, bits, w_zero, bias, n_outliers, slack, out_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    K = 2 * half_k if 4 in bits else 2 * half_k - seed % 2    # odd K when nothing is packed
    p = _problem(gen, M, K, N, *bits, w_zero, bias, n_outliers, slack)
    _assert_close(_run(p, out_dtype), p, out_dtype)


@pytest.mark.parametrize("bits", BITS)
def test_dense_outliers_and_empty_rows(bits):
    """Up to C = 16 outliers per row, rows with none, and whole 64-row tiles with none
    (the kernel skips slots that are empty in every row of a tile)."""
    gen = torch.Generator().manual_seed(sum(bits))
    p = _problem(gen, 140, 128, 40, *bits, True, True, 12, slack=2)
    idx, val = p["outlier_idx"].clone(), p["outlier_val"].clone()
    idx[::3], val[::3] = 0, 0.0                          # rows without outliers
    idx[64:128], val[64:128] = 0, 0.0                    # a whole tile without outliers
    p.update(outlier_idx=idx, outlier_val=val)
    assert int((val != 0).sum(1).max()) >= 10
    _assert_close(_run(p, torch.float32), p, torch.float32)


def test_out_of_range_outlier_index_contributes_zero():
    """Documented behaviour: a slot whose column is outside [0, K) is ignored (never read)."""
    gen = torch.Generator().manual_seed(9)
    p = _problem(gen, 20, 64, 30, 8, 4, True, False, 2, slack=2)
    idx, val = p["outlier_idx"].clone(), p["outlier_val"].clone()
    idx[3, -1], val[3, -1] = 64, 5.0                     # one past the end
    idx[4, -1], val[4, -1] = -1, -7.0
    y = _run(dict(p, outlier_idx=idx, outlier_val=val), torch.float32)
    assert torch.equal(y, _run(p, torch.float32))


def test_strided_operands():
    gen = torch.Generator().manual_seed(10)
    for a_bits, w_bits in BITS:
        p = _problem(gen, 33, 96, 40, a_bits, w_bits, True, True, 2)
        a_big = torch.zeros(33, p["a"].shape[1] + 9, dtype=p["a"].dtype)
        a_big[:, 4:4 + p["a"].shape[1]] = p["a"]
        w_t = p["w"].t().contiguous()                    # the weight stored K-major: w is a transposed view
        strided = dict(p, a=a_big[:, 4:4 + p["a"].shape[1]], w=w_t.t())
        assert not strided["a"].is_contiguous() and not strided["w"].is_contiguous()
        assert torch.equal(_run(strided, torch.float32), _run(p, torch.float32))
        _assert_close(_run(strided, torch.float32), p, torch.float32)


def test_empty_shapes():
    gen = torch.Generator().manual_seed(11)
    for M, N in ((0, 8), (8, 0)):
        p = _problem(gen, M, 32, N, 8, 8, True, True, 0)
        y = _run(p, torch.float32)
        assert y.shape == (M, N)
        assert torch.equal(y, ref.qgemm(**p, out_dtype=torch.float32))
    # K = 0 (the reference weight quantizers need K > 0): y = sw (s (-za rw - zw ra)) + bias
    M, N = 8, 6
    i32 = dict(generator=gen, dtype=torch.int32)
    p = dict(a=torch.empty(M, 0, dtype=torch.int8), a_scale=torch.rand(M, generator=gen),
             a_zero=torch.randint(-128, 128, (M,), **i32), a_rowsum=torch.randint(-9, 9, (M,), **i32),
             w=torch.empty(N, 0, dtype=torch.int8), w_scale=torch.rand(N, generator=gen),
             w_zero=torch.randint(-128, 128, (N,), **i32), w_colsum=torch.randint(-9, 9, (N,), **i32),
             bias=torch.randn(N, generator=gen), outlier_idx=None, outlier_val=None, a_bits=8, w_bits=8)
    _assert_close(_run(p, torch.float32), p, torch.float32)


def test_bad_inputs():
    gen = torch.Generator().manual_seed(12)
    p = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v)
         for k, v in _problem(gen, 8, 64, 16, 8, 8, True, True, 2, slack=1).items()}
    M, N = 8, 16
    i32 = dict(dtype=torch.int32, device=DEV)
    cases = [
        (dict(a_bits=5), ValueError, "a_bits must be one of"),
        (dict(w_bits=2), ValueError, "w_bits must be one of"),
        (dict(a_bits=4), TypeError, "4-bit codes"),
        (dict(a=p["a"].view(torch.uint8)), TypeError, "8-bit codes"),
        (dict(a=p["a"][:, :32]), ValueError, "K mismatch"),
        (dict(a=p["a"][0]), ValueError, "2-D"),
        (dict(a_scale=p["a_scale"][:4]), ValueError, r"a_scale must have shape \[8\]"),
        (dict(a_scale=p["a_scale"].double()), TypeError, "a_scale must be torch.float32"),
        (dict(a_zero=p["a_zero"].float()), TypeError, "a_zero must be torch.int32"),
        (dict(a_rowsum=torch.zeros(M + 1, **i32)), ValueError, "a_rowsum"),
        (dict(w_scale=torch.ones(N - 1, device=DEV)), ValueError, "w_scale"),
        (dict(w_zero=torch.zeros(N, dtype=torch.int64, device=DEV)), TypeError, "w_zero"),
        (dict(w_colsum=torch.zeros(N, 1, **i32)), ValueError, "w_colsum"),
        (dict(bias=torch.zeros(N, **i32)), TypeError, "bias"),
        (dict(bias=torch.zeros(N + 1, device=DEV)), ValueError, "bias"),
        (dict(outlier_val=None), ValueError, "given together"),
        (dict(outlier_idx=p["outlier_idx"][:4]), ValueError, "must both have shape"),
        (dict(outlier_idx=p["outlier_idx"].long()), TypeError, "outlier_idx"),
        (dict(outlier_val=p["outlier_val"].half()), TypeError, "outlier_val"),
        (dict(out_dtype=torch.int32), TypeError, "out_dtype"),
        (dict(a=torch.zeros(1, 32770, dtype=torch.int8, device=DEV), w=torch.zeros(N, 32770, dtype=torch.int8,
                                                                                    device=DEV)),
         ValueError, "int32 accumulator"),
    ]
    for change, exc, msg in cases:
        args = dict(p, out_dtype=torch.float32)
        args.update(change)
        with pytest.raises(exc, match=msg):
            qgemm(**args)


# ---------------------------------------------------------------------------
# native CUDA only
# ---------------------------------------------------------------------------
@requires_gpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(197 * 2, 768, 2304), (197 * 4, 3072, 768), (50, 384, 1536), (1, 768, 768)])
def test_cuda_vit_shapes_all_out_dtypes(bits, shape):
    M, K, N = shape
    gen = torch.Generator().manual_seed(M + K + N)
    p = _problem(gen, M, K, N, *bits, True, True, 10, slack=4)       # ~1% outliers, C ~ 14..20
    want32, mag = ref.qgemm(**p, out_dtype=torch.float32), _magnitude(p)
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        _assert_close(_run(p, out_dtype, "cuda"), p, out_dtype, want32, mag)


@requires_gpu
def test_cuda_opcheck_and_device_mismatch():
    gen = torch.Generator().manual_seed(13)
    op = torch.ops.vitq.qgemm.default
    for bits in BITS:
        for w_zero, bias, n_out in ((False, False, 0), (True, True, 3)):
            p = _problem(gen, 40, 128, 48, *bits, w_zero, bias, n_out, slack=1)
            args = [p[k].cuda() if isinstance(p[k], torch.Tensor) else p[k] for k in
                    ("a", "a_scale", "a_zero", "a_rowsum", "w", "w_scale", "w_zero", "w_colsum", "bias",
                     "outlier_idx", "outlier_val", "a_bits", "w_bits")]
            torch.library.opcheck(op, (*args, torch.float16))
    p = _problem(gen, 8, 64, 16, 8, 8, True, True, 0)
    cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    with pytest.raises(ValueError, match="one device"):
        qgemm(**dict(cuda, w_scale=p["w_scale"]), out_dtype=torch.float32)
