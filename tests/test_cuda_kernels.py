"""The CUDA C++ kernels (csrc/cuda/*.cu, ops vitq::<op>_cuda) against reference.py.

All but the first test need a GPU.  The reference always runs on CPU copies: CUDA torch
divides by a scalar through a reciprocal, the CPU with a true IEEE division, and the
spec (and the kernels) use the latter.

Exactness: integer outputs (codes, zero points, row sums, outlier lists, the int32 GEMM
accumulator) must be bit-identical.  The qgemm epilogue performs the reference's fp32
operations in the reference's order with correctly rounded ops, so it is expected to be
bit-identical as well; the fp32 tolerance (1e-5 relative to the output's magnitude) only
leaves room for a last-bit difference, and fp16/bf16 outputs get one unit of their own
precision on top.
"""
import os
import shutil

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import requires_gpu
from vitq_kernels import reference as ref
import vitq_kernels  # noqa: F401  (registers the ops and their fakes)

CUDA_OPS = ("pack_int4", "unpack_int4", "per_token_quantize", "qgemm")


def _nvcc_available() -> bool:
    # where setup.py (through torch.utils.cpp_extension) looks for nvcc
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return shutil.which("nvcc") is not None or any(h and os.path.exists(os.path.join(h, "bin", "nvcc")) for h in homes)


# ---------------------------------------------------------------------------
# CPU-runnable: the build put the CUDA ops into the extension
# ---------------------------------------------------------------------------
@pytest.mark.skipif(os.environ.get("VITQ_SKIP_CUDA") == "1", reason="CPU-only build requested (VITQ_SKIP_CUDA=1)")
def test_cuda_ops_compiled_into_extension():
    expected = torch.version.cuda is not None and _nvcc_available()
    for name in CUDA_OPS:
        present = hasattr(torch.ops.vitq, f"{name}_cuda")
        assert present == expected, (
            f"vitq::{name}_cuda present={present}, expected {expected} (torch CUDA={torch.version.cuda}, "
            f"nvcc={_nvcc_available()}); rebuild: python setup.py build_ext --inplace without VITQ_SKIP_CUDA=1")
        if not expected:
            continue
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vitq::{name}_cuda", "CUDA")
        # same schema as the public op, apart from the name
        public = str(getattr(torch.ops.vitq, name).default._schema)
        cuda = str(getattr(torch.ops.vitq, f"{name}_cuda").default._schema)
        assert cuda.replace(f"{name}_cuda(", f"{name}(", 1) == public


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _cuda(t):
    return None if t is None else t.cuda()


def _cpu(t):
    return None if t is None else t.cpu()


def _rows_with_outliers(M, K, n_spikes, dtype, threshold=3.0):
    """Fresh normal rows with up to n_spikes values per row pushed beyond the threshold."""
    x = torch.randn(M, K) * (0.5 + torch.rand(M, 1))
    if n_spikes and K:
        cols = torch.randint(0, K, (M, n_spikes))
        spikes = (threshold + 1 + 10 * torch.rand(M, n_spikes)) * torch.where(torch.rand(M, n_spikes) < 0.5, -1, 1)
        x.scatter_(1, cols, spikes)
    return x.to(dtype)


def _quant_case(M, N, K, a_bits, w_bits, symmetric, n_spikes, capacity_extra, with_bias):
    """Reference-made qgemm inputs (CPU) for a fresh random problem."""
    threshold = 3.0 if n_spikes else None
    x = _rows_with_outliers(M, K, n_spikes, torch.float32)
    capacity = 0
    if n_spikes:
        count = (x.abs() > threshold).sum(1)
        capacity = int(count.max()) + capacity_extra if M else capacity_extra
    codes, s, z, rs, idx, val, _ = ref.per_token_quantize(x, a_bits, None, None, threshold, capacity)
    wc, sw, zw = ref.quantize_weight_per_channel(torch.randn(N, K) * (0.1 + torch.rand(N, 1)), w_bits, symmetric)
    w = ref.pack_int4(wc) if ref.is_packed(w_bits) else wc
    bias = torch.randn(N) if with_bias else None
    return dict(a=codes, a_scale=s, a_zero=z, a_rowsum=rs, w=w, w_scale=sw, w_zero=None if symmetric else zw,
                w_colsum=ref.weight_colsum(wc), bias=bias, outlier_idx=idx if capacity else None,
                outlier_val=val if capacity else None, a_bits=a_bits, w_bits=w_bits)


_ARG_ORDER = ("a", "a_scale", "a_zero", "a_rowsum", "w", "w_scale", "w_zero", "w_colsum", "bias", "outlier_idx",
              "outlier_val", "a_bits", "w_bits")


def _qgemm_args(case, out_dtype, to=_cuda):
    return tuple(to(case[k]) if isinstance(case[k], torch.Tensor) else case[k] for k in _ARG_ORDER) + (out_dtype,)


def _assert_epilogue_close(y, expected):
    assert y.dtype == expected.dtype and y.shape == expected.shape
    yf, ef = y.float().cpu(), expected.float()
    assert torch.isfinite(yf).all()
    unit = {torch.float32: 1e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[y.dtype]
    scale = float(ef.abs().max()) if ef.numel() else 0.0
    torch.testing.assert_close(yf, ef, rtol=unit, atol=unit * scale + 1e-30)


# ---------------------------------------------------------------------------
# pack / unpack
# ---------------------------------------------------------------------------
@requires_gpu
@given(rows=st.integers(0, 40), half_k=st.integers(1, 300))
def test_pack_unpack_int4_cuda(rows, half_k):
    codes = torch.randint(-8, 8, (rows, 2 * half_k), dtype=torch.int8)
    packed = torch.ops.vitq.pack_int4_cuda(codes.cuda())
    assert torch.equal(packed.cpu(), ref.pack_int4(codes))
    raw = torch.randint(0, 256, (rows, half_k), dtype=torch.uint8)
    assert torch.equal(torch.ops.vitq.unpack_int4_cuda(raw.cuda()).cpu(), ref.unpack_int4(raw))


@requires_gpu
def test_pack_int4_cuda_bad_inputs():
    with pytest.raises(ValueError, match="outside the signed 4-bit range"):
        torch.ops.vitq.pack_int4_cuda(torch.tensor([[3, 9]], dtype=torch.int8, device="cuda"))
    with pytest.raises(ValueError, match="even last dimension"):
        torch.ops.vitq.pack_int4_cuda(torch.zeros(2, 3, dtype=torch.int8, device="cuda"))
    with pytest.raises(TypeError, match="int8"):
        torch.ops.vitq.pack_int4_cuda(torch.zeros(2, 4, dtype=torch.int32, device="cuda"))
    with pytest.raises(TypeError, match="uint8"):
        torch.ops.vitq.unpack_int4_cuda(torch.zeros(2, 4, dtype=torch.int8, device="cuda"))


# ---------------------------------------------------------------------------
# per_token_quantize
# ---------------------------------------------------------------------------
def _check_quantize(x, bits, scale=None, zero=None, threshold=None, capacity=0):
    got = torch.ops.vitq.per_token_quantize_cuda(x.cuda(), bits, _cuda(scale), _cuda(zero), threshold, capacity)
    want = ref.per_token_quantize(x.cpu(), bits, _cpu(scale), _cpu(zero), threshold, capacity)
    names = ("codes", "scale", "zero", "rowsum", "outlier_idx", "outlier_val", "outlier_count")
    for name, g, w in zip(names, got, want):
        assert g.is_cuda and g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g.cpu(), w), f"{name} differs from the reference"


@requires_gpu
@given(M=st.integers(1, 70), half_k=st.integers(1, 700), bits=st.sampled_from([3, 4, 8]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), n_spikes=st.integers(0, 6),
       extra=st.integers(0, 3))
def test_per_token_quantize_cuda_dynamic(M, half_k, bits, dtype, n_spikes, extra):
    K = 2 * half_k
    x = _rows_with_outliers(M, K, n_spikes, dtype)
    if n_spikes:
        capacity = int((x.float().abs() > 3.0).sum(1).max()) + extra
        _check_quantize(x, bits, threshold=3.0, capacity=capacity)
    else:
        _check_quantize(x, bits)


@requires_gpu
@given(reps=st.integers(1, 4), T=st.integers(1, 9), K=st.integers(1, 500), bits=st.sampled_from([3, 4, 8]),
       with_outliers=st.booleans())
def test_per_token_quantize_cuda_static(reps, T, K, bits, with_outliers):
    K += K % 2 if ref.is_packed(bits) else 0
    M = reps * T
    half = 1 << (bits - 1)
    x = _rows_with_outliers(M, K, 2 if with_outliers else 0, torch.float32)
    scale = 0.01 + torch.rand(T) * 0.2
    zero = torch.randint(-half, half, (T,), dtype=torch.int32)
    threshold, capacity = (3.0, int((x.abs() > 3.0).sum(1).max())) if with_outliers else (None, 0)
    _check_quantize(x, bits, scale, zero, threshold, capacity)


@requires_gpu
def test_per_token_quantize_cuda_special_rows():
    # an all-zero row (scale 1), a constant row, a row of outliers only, and an empty batch
    x = torch.randn(4, 64)
    x[0] = 0
    x[1] = 0.25
    x[2] = 50 * torch.sign(torch.randn(64))
    for bits in (3, 4, 8):
        _check_quantize(x, bits, threshold=10.0, capacity=64)
        _check_quantize(torch.empty(0, 32), bits)
        _check_quantize(torch.empty(0, 32), bits, torch.ones(1), torch.zeros(1, dtype=torch.int32))


@requires_gpu
def test_per_token_quantize_cuda_bad_inputs():
    op = torch.ops.vitq.per_token_quantize_cuda
    x = torch.randn(8, 32, device="cuda")
    with pytest.raises(ValueError, match="bits"):
        op(x, 5, None, None, None, 0)
    with pytest.raises(ValueError, match="2-D"):
        op(x[0], 8, None, None, None, 0)
    with pytest.raises(TypeError, match="float"):
        op(x.to(torch.int32), 8, None, None, None, 0)
    with pytest.raises(RuntimeError, match="CUDA"):
        op(x.cpu(), 8, None, None, None, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(x.t(), 8, None, None, None, 0)
    with pytest.raises(ValueError, match="odd"):
        op(torch.randn(4, 7, device="cuda"), 4, None, None, None, 0)
    with pytest.raises(ValueError, match="needs an outlier_threshold"):
        op(x, 8, None, None, None, 2)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[3, 5] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            op(y, 8, None, None, 1.0, 32)
    y = x.clone()
    y[5, :7] = 100.0
    with pytest.raises(ValueError, match="row 5 has 7 outliers but max_outliers=4"):
        op(y, 8, None, None, 10.0, 4)
    with pytest.raises(ValueError, match="do not tile"):
        op(x, 8, torch.ones(3, device="cuda"), torch.zeros(3, dtype=torch.int32, device="cuda"), None, 0)
    with pytest.raises(ValueError, match="finite and > 0"):
        op(x, 8, torch.tensor([1.0, -1.0], device="cuda"), torch.zeros(2, dtype=torch.int32, device="cuda"),
           None, 0)
    with pytest.raises(ValueError, match="zero points must lie"):
        op(x, 4, torch.ones(2, device="cuda"), torch.tensor([0, 8], dtype=torch.int32, device="cuda"), None, 0)


# ---------------------------------------------------------------------------
# qgemm
# ---------------------------------------------------------------------------
@requires_gpu
@given(M=st.integers(1, 300), N=st.integers(1, 300), half_k=st.integers(1, 600),
       bits=st.sampled_from([(8, 8), (8, 4), (4, 4), (4, 8), (3, 3), (3, 8), (8, 3)]), symmetric=st.booleans())
def test_qgemm_cuda_integer_accumulator_exact(M, N, half_k, bits, symmetric):
    # unit scales, no bias, no outliers: y = float(acc) (the int32 accumulator with the
    # zero-point corrections), compared bit for bit
    a_bits, w_bits = bits
    case = _quant_case(M, N, 2 * half_k, a_bits, w_bits, symmetric, 0, 0, False)
    case["a_scale"] = torch.ones(M)
    case["w_scale"] = torch.ones(N)
    y = torch.ops.vitq.qgemm_cuda(*_qgemm_args(case, torch.float32))
    assert torch.equal(y.cpu(), ref.qgemm(*_qgemm_args(case, torch.float32, to=lambda t: t)))


@requires_gpu
@given(M=st.integers(1, 260), N=st.integers(1, 260), half_k=st.integers(1, 520),
       bits=st.sampled_from([(8, 8), (8, 4), (4, 4), (3, 3)]), symmetric=st.booleans(), n_spikes=st.integers(0, 5),
       extra=st.integers(0, 3), with_bias=st.booleans(),
       out_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_qgemm_cuda_matches_reference(M, N, half_k, bits, symmetric, n_spikes, extra, with_bias, out_dtype):
    a_bits, w_bits = bits
    case = _quant_case(M, N, 2 * half_k, a_bits, w_bits, symmetric, n_spikes, extra, with_bias)
    y = torch.ops.vitq.qgemm_cuda(*_qgemm_args(case, out_dtype))
    _assert_epilogue_close(y, ref.qgemm(*_qgemm_args(case, out_dtype, to=lambda t: t)))


@requires_gpu
@pytest.mark.parametrize("bits", [(8, 8), (8, 4), (4, 4)])
def test_qgemm_cuda_vit_shape_with_outliers(bits):
    # a ViT-B fc1-like problem: many K tiles through the double buffer, full 128x128 tiles
    case = _quant_case(2 * 197, 3072, 768, bits[0], bits[1], False, 8, 2, True)
    y = torch.ops.vitq.qgemm_cuda(*_qgemm_args(case, torch.float16))
    _assert_epilogue_close(y, ref.qgemm(*_qgemm_args(case, torch.float16, to=lambda t: t)))


@requires_gpu
@pytest.mark.parametrize("bits", [(8, 8), (4, 4)])
def test_qgemm_cuda_misaligned_rows(bits):
    # contiguous views at an odd storage offset take the byte-wise load path
    case = _quant_case(70, 90, 128, bits[0], bits[1], True, 2, 1, True)
    args = list(_qgemm_args(case, torch.float32))
    for i in (0, 4):
        t = args[i]
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
        buf[1:] = t.reshape(-1)
        args[i] = buf[1:].view(t.shape)
        assert args[i].is_contiguous() and args[i].data_ptr() % 16
    y = torch.ops.vitq.qgemm_cuda(*args)
    _assert_epilogue_close(y, ref.qgemm(*_qgemm_args(case, torch.float32, to=lambda t: t)))


@requires_gpu
def test_qgemm_cuda_empty_and_tiny():
    for M, N in ((0, 16), (16, 0), (1, 1)):
        case = _quant_case(M, N, 32, 8, 8, False, 0, 0, True)
        y = torch.ops.vitq.qgemm_cuda(*_qgemm_args(case, torch.float16))
        assert y.shape == (M, N) and y.dtype == torch.float16 and y.is_cuda
        _assert_epilogue_close(y, ref.qgemm(*_qgemm_args(case, torch.float16, to=lambda t: t)))


@requires_gpu
def test_qgemm_cuda_bad_inputs():
    case = _quant_case(8, 16, 32, 8, 8, False, 2, 0, True)
    good = list(_qgemm_args(case, torch.float32))
    op = torch.ops.vitq.qgemm_cuda

    def call(**changes):
        args = list(good)
        for k, v in changes.items():
            args[(*_ARG_ORDER, "out_dtype").index(k)] = v
        return op(*args)

    with pytest.raises(ValueError, match="a_bits"):
        call(a_bits=5)
    with pytest.raises(ValueError, match="out_dtype"):
        call(out_dtype=torch.int32)
    with pytest.raises(TypeError, match="int8"):
        call(a=good[0].to(torch.int32))
    with pytest.raises(RuntimeError, match="CUDA"):
        call(w=good[4].cpu())
    with pytest.raises(RuntimeError, match="contiguous"):
        call(a=good[0].t().contiguous().t())
    with pytest.raises(ValueError, match="K mismatch"):
        call(w=good[4][:, :16].contiguous())
    with pytest.raises(ValueError, match="a_scale"):
        call(a_scale=good[1][:4].contiguous())
    with pytest.raises(TypeError, match="w_colsum"):
        call(w_colsum=good[7].float())
    with pytest.raises(ValueError, match="together"):
        call(outlier_val=None)


# ---------------------------------------------------------------------------
# registration: opcheck and the public op's cuda backend
# ---------------------------------------------------------------------------
@requires_gpu
def test_opcheck_cuda_ops():
    codes = torch.randint(-8, 8, (6, 10), dtype=torch.int8, device="cuda")
    torch.library.opcheck(torch.ops.vitq.pack_int4_cuda.default, (codes,))
    torch.library.opcheck(torch.ops.vitq.unpack_int4_cuda.default, (torch.ops.vitq.pack_int4_cuda(codes),))
    x = _rows_with_outliers(12, 40, 2, torch.float16).cuda()
    for bits in (3, 4, 8):
        torch.library.opcheck(torch.ops.vitq.per_token_quantize_cuda.default, (x, bits, None, None, 3.0, 4))
    for bits in ((8, 8), (4, 4), (3, 3)):
        case = _quant_case(20, 24, 48, bits[0], bits[1], False, 2, 1, True)
        torch.library.opcheck(torch.ops.vitq.qgemm_cuda.default, _qgemm_args(case, torch.bfloat16))


@requires_gpu
def test_public_ops_dispatch_to_cuda_backend():
    from vitq_kernels import ops
    case = _quant_case(33, 47, 96, 4, 4, False, 2, 1, True)
    args = _qgemm_args(case, torch.float16)
    previous = ops.get_backend()
    try:
        ops.set_backend("cuda")
        assert torch.equal(torch.ops.vitq.qgemm(*args), torch.ops.vitq.qgemm_cuda(*args))
    finally:
        ops.set_backend(previous)
