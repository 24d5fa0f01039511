"""vitq::layernorm_quantize: the C++ CPU kernel and the Triton kernel (interpreter here,
native on a GPU) against reference.layernorm_quantize.

What the tests accept, and why.  A kernel's fp32 LayerNorm reduces in another order than
torch's, so its y' differs from the reference's y in the last places, and a code can then
differ by one step where y/s lies within that difference of a rounding boundary.  Rather
than guess which elements may differ, the contract is checked in two exact parts:
  (1) the kernel's 7 outputs are *exactly* reference.per_token_quantize(y') (torch.equal);
  (2) y' is within reference.layernorm_error_bound of the float64 LayerNorm (an fp32
      rounding-error bound, see its docstring); torch's own fp32 LayerNorm is checked
      against the same bound, so the bound is neither vacuous nor too tight for torch.
y' is read back from the kernel itself: with outlier_threshold = -1 every element is an
"outlier" (|y| > -1 always), so the outlier list holds all of y' in full fp32.  The
LayerNorm part of the kernels does not depend on the other arguments (same blocks, no fp
contraction), so that y' is the y' of every other call on the same x.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vitq_kernels  # noqa: F401  (registers torch.ops.vitq)
from conftest import requires_gpu
from vitq_kernels import reference as R
from vitq_kernels import triton_kernels as TK

OP = torch.ops.vitq.layernorm_quantize


def _impls(device):
    # on CPU: the C++ kernel (the op) and the Triton kernel under the interpreter;
    # on CUDA: the op, which dispatches to Triton
    return [OP, TK.layernorm_quantize] if device == "cpu" else [OP]


def make_ln_inputs(M, K, dtype=torch.float32, offset=0.0, spikes=0.0, device="cpu"):
    """Residual-stream-like rows: per-row scale and offset, a few planted spikes that
    become post-LN outliers, and a random affine LayerNorm."""
    x = torch.randn(M, K) * torch.rand(M, 1).add(0.1) * 3 + offset * torch.randn(M, 1)
    if spikes and M * K:
        hit = torch.rand(M, K) < spikes
        x = torch.where(hit, x + torch.randn(M, K).sign() * (8 + 8 * torch.rand(M, K)) * x.std(), x)
    weight = 1 + 0.3 * torch.randn(K)
    bias = 0.2 * torch.randn(K)
    return x.to(dtype).to(device), weight.to(device), bias.to(device)


def kernel_layernorm(impl, x, weight, bias, eps):
    """The kernel's own fp32 LayerNorm, read back through the outlier list."""
    M, K = x.shape
    out = impl(x, weight, bias, eps, 8, None, None, -1.0, K)
    idx, val, count = out[4], out[5], out[6]
    assert torch.equal(count, torch.full_like(count, K))
    assert torch.equal(idx, torch.arange(K, dtype=torch.int32, device=x.device).expand(M, K))
    return val


def assert_contract(impl, x, weight, bias, eps, bits, scale=None, zero=None, threshold=None, cap=0):
    y_k = kernel_layernorm(impl, x, weight, bias, eps)
    y64, tol = R.layernorm_error_bound(x.cpu().float(), weight.cpu(), bias.cpu(), eps)
    err = (y_k.cpu().double() - y64).abs()
    assert bool((err <= tol).all()), f"LayerNorm error {float((err / tol).max()):.3g} x the bound"
    got = impl(x, weight, bias, eps, bits, scale, zero, threshold, cap)
    want = R.per_token_quantize(y_k.cpu(), bits, None if scale is None else scale.cpu(),
                                None if zero is None else zero.cpu(), threshold, cap)
    names = ("codes", "scale", "zero", "rowsum", "outlier_idx", "outlier_val", "outlier_count")
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g.cpu(), w), f"{name} differs from per_token_quantize(kernel LayerNorm)"
    return got


def static_scales(T, bits, device="cpu"):
    half = 1 << (bits - 1)
    scale = (torch.rand(T) * 0.05 + 0.01).to(device)
    zero = torch.randint(-half, half, (T,), dtype=torch.int32).to(device)
    return scale, zero


# ---------------------------------------------------------------------------
# the contract, over shapes and options
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("impl", _impls("cpu"), ids=["cpu", "triton"])
@given(M=st.integers(0, 40), half_k=st.integers(1, 160), bits=st.sampled_from([4, 8]),
       mode=st.sampled_from(["dynamic", "static", "outliers", "static+outliers"]),
       dtype=st.sampled_from([torch.float32, torch.float16]), offset=st.sampled_from([0.0, 4.0]))
def test_contract(impl, M, half_k, bits, mode, dtype, offset):
    K = 2 * half_k
    x, w, b = make_ln_inputs(M, K, dtype, offset, spikes=0.02)
    scale = zero = None
    if "static" in mode:
        T = 1 if M == 0 else [t for t in (1, 2, M) if M % t == 0][torch.randint(0, 2, ()).item()]
        scale, zero = static_scales(T, bits)
    threshold, cap = (3.0, K) if "outliers" in mode else (None, 0)
    assert_contract(impl, x, w, b, 1e-6, bits, scale, zero, threshold, cap)


@pytest.mark.parametrize("impl", _impls("cpu"), ids=["cpu", "triton"])
@pytest.mark.parametrize("K", [1, 7, 384, 768])
def test_odd_and_vit_widths(impl, K):
    # odd K (8-bit only), K = 1 (variance 0: y = bias), and the ViT-S/B widths
    x, w, b = make_ln_inputs(5, K, spikes=0.01)
    # capacity <= K: reference.extract_outliers cannot pad a list longer than the row
    assert_contract(impl, x, w, b, 1e-5, 8, None, None, 4.0, min(16, K))


@pytest.mark.parametrize("impl", _impls("cpu"), ids=["cpu", "triton"])
def test_outlier_rates_and_order(impl):
    # realistic post-LN outlier rates (0.5-5 %): the list is in column order and the dense
    # code of an outlier is the zero point
    x, w, b = make_ln_inputs(24, 384, spikes=0.02)
    codes, s, z, rs, idx, val, cnt = assert_contract(impl, x, w, b, 1e-6, 8, None, None, 5.0, 64)
    assert 0 < int(cnt.sum()) < 0.1 * x.numel()
    for i in range(x.shape[0]):
        n = int(cnt[i])
        assert torch.all(idx[i, 1:n] > idx[i, :n - 1])
        assert torch.all(codes[i, idx[i, :n].long()] == z[i])


def test_bf16_input_cpu():
    x, w, b = make_ln_inputs(9, 96, torch.bfloat16, spikes=0.02)
    assert_contract(OP, x, w, b, 1e-6, 4, None, None, 3.0, 96)


@pytest.mark.parametrize("impl", _impls("cpu"), ids=["cpu", "triton"])
def test_large_offset_rows(impl):
    # |mu| >> sigma: x - mu cancels; the bound's |mu|/sigma term is what fp32 allows
    x = 100 + 0.01 * torch.randn(6, 256)
    w, b = 1 + 0.3 * torch.randn(256), 0.2 * torch.randn(256)
    assert_contract(impl, x, w, b, 1e-6, 8)


def test_bound_holds_for_torch_and_is_tight():
    # torch's fp32 layer_norm meets the bound that the kernels are held to, and the bound
    # is within ~2^-18 relative of the output scale (not a vacuous tolerance)
    x, w, b = make_ln_inputs(64, 768, offset=2.0, spikes=0.01)
    y = torch.nn.functional.layer_norm(x, (768,), w, b, 1e-6)
    y64, tol = R.layernorm_error_bound(x, w, b, 1e-6)
    assert bool(((y.double() - y64).abs() <= tol).all())
    assert float(tol.median()) < 2.0 ** -14 * float(y64.abs().median() + 1)


@pytest.mark.parametrize("impl", _impls("cpu"), ids=["cpu", "triton"])
def test_matches_reference_where_unambiguous(impl):
    # End to end against reference.layernorm_quantize (dynamic 8-bit).  With the kernel's
    # y' known, the pre-rounding values y/s and -lo/s of kernel and reference differ by at
    # most  slack_i = max_k |y' - y| / s + 256 |s' - s| / s  (plus fp32 rounding of the
    # quotients, < 2^-22 * 256).  Codes farther than that from a .5 boundary, in rows whose
    # zero point is also farther, must be equal; all others within 2 steps (zero point and
    # code may each move by one).
    M, K = 32, 256
    x, w, b = make_ln_inputs(M, K)
    got = impl(x, w, b, 1e-6, 8, None, None, None, 0)
    want = R.layernorm_quantize(x, w, b, 1e-6, 8)
    y_ref = torch.nn.functional.layer_norm(x, (K,), w, b, 1e-6).double()
    y_k = kernel_layernorm(impl, x, w, b, 1e-6).double()
    s, s_k = want[1].double()[:, None], got[1].double()[:, None]
    slack = (y_k - y_ref).abs().amax(dim=1, keepdim=True) / s + 256 * (s_k - s).abs() / s + 2.0 ** -22 * 256
    dist = lambda t: ((t - t.floor()) - 0.5).abs()   # noqa: E731  distance to the nearest .5
    lo = y_ref.amin(dim=1, keepdim=True).clamp(max=0)
    sure = (dist(y_ref / s) > slack) & (dist(-lo / s) > slack)
    diff = (got[0].int() - want[0].int()).abs()
    assert float(sure.double().mean()) > 0.5          # the check is not vacuous
    assert bool((diff[sure] == 0).all())
    assert bool((diff <= 2).all())


# ---------------------------------------------------------------------------
# strides, empty batch, opcheck
# ---------------------------------------------------------------------------
def test_triton_accepts_strided_x():
    x, w, b = make_ln_inputs(8, 128)
    xt = x.t().contiguous().t()          # column-major view of the same values
    for a, c in zip(TK.layernorm_quantize(xt, w, b, 1e-6, 8, None, None, 3.0, 8),
                    TK.layernorm_quantize(x, w, b, 1e-6, 8, None, None, 3.0, 8)):
        assert torch.equal(a, c)


@pytest.mark.parametrize("impl", _impls("cpu"), ids=["cpu", "triton"])
def test_empty_batch(impl):
    x, w, b = make_ln_inputs(0, 64)
    out = impl(x, w, b, 1e-6, 4, None, None, 2.0, 3)
    shapes = [(0, 32), (0,), (0,), (0,), (0, 3), (0, 3), (0,)]
    assert [tuple(t.shape) for t in out] == shapes


@pytest.mark.parametrize("bits,mode", [(8, "dynamic"), (4, "outliers"), (8, "static")])
def test_opcheck_cpu(bits, mode):
    x, w, b = make_ln_inputs(6, 64, spikes=0.02)
    scale, zero = static_scales(3, bits) if mode == "static" else (None, None)
    thr, cap = (3.0, 16) if mode == "outliers" else (None, 0)
    torch.library.opcheck(OP, (x, w, b, 1e-6, bits, scale, zero, thr, cap))


# ---------------------------------------------------------------------------
# bad inputs: clear errors from both implementations
# ---------------------------------------------------------------------------
def _bad_cases():
    x, w, b = make_ln_inputs(4, 16)
    nan_x = x.clone()
    nan_x[2, 3] = float("nan")
    inf_x = x.clone()
    inf_x[1, 0] = float("inf")
    # rows with |z| <= 1.64 everywhere, except row 3: three spikes at z = 2.08
    spiky = torch.linspace(-1, 1, 16)[torch.randperm(16)] + 0.01 * torch.rand(4, 16)
    spiky[3, :3] = 1e4
    ones, zeros = torch.ones(16), torch.zeros(16)
    return [
        ("bits", (x, w, b, 1e-6, 5, None, None, None, 0), ValueError, "bits must be one of"),
        ("1-D x", (x[0], w, b, 1e-6, 8, None, None, None, 0), ValueError, "2-D"),
        ("int x", (x.to(torch.int32), w, b, 1e-6, 8, None, None, None, 0), TypeError, "x must be"),
        ("weight shape", (x, w[:8], b, 1e-6, 8, None, None, None, 0), ValueError, r"weight must have shape \[16\]"),
        ("bias dtype", (x, w, b.to(torch.int32), 1e-6, 8, None, None, None, 0), TypeError, "bias must be a float"),
        ("eps 0", (x, w, b, 0.0, 8, None, None, None, 0), ValueError, "eps must be finite and > 0"),
        ("eps nan", (x, w, b, float("nan"), 8, None, None, None, 0), ValueError, "eps must be finite and > 0"),
        ("NaN", (nan_x, w, b, 1e-6, 8, None, None, None, 0), ValueError, "NaN or Inf"),
        ("Inf", (inf_x, w, b, 1e-6, 8, None, None, None, 0), ValueError, "NaN or Inf"),
        ("overflow", (x, w * 1e38, torch.full((16,), 3e38), 1e-6, 8, None, None, None, 0), ValueError,
         "overflows fp32"),
        ("odd K 4-bit", (x[:, :15].contiguous(), w[:15], b[:15], 1e-6, 4, None, None, None, 0), ValueError,
         "K=15 is odd"),
        ("too many outliers", (spiky, ones, zeros, 1e-6, 8, None, None, 2.0, 2), ValueError,
         r"row 3 has \d+ outliers but max_outliers=2"),
        ("cap without threshold", (x, w, b, 1e-6, 8, None, None, None, 4), ValueError, "needs an outlier_threshold"),
        ("negative cap", (x, w, b, 1e-6, 8, None, None, 1.0, -1), ValueError, "max_outliers must be >= 0"),
        ("zero without scale", (x, w, b, 1e-6, 8, None, torch.zeros(1, dtype=torch.int32), None, 0), ValueError,
         "zero given without scale"),
        ("scale without zero", (x, w, b, 1e-6, 8, torch.ones(1), None, None, 0), ValueError, "needs a zero point"),
        ("scale not tiling", (x, w, b, 1e-6, 8, torch.ones(3), torch.zeros(3, dtype=torch.int32), None, 0),
         ValueError, "tiles? M=4"),
        ("scale <= 0", (x, w, b, 1e-6, 8, torch.tensor([0.1, -1.0]), torch.zeros(2, dtype=torch.int32), None, 0),
         ValueError, "finite and > 0"),
        ("zero range", (x, w, b, 1e-6, 4, torch.ones(1), torch.tensor([8], dtype=torch.int32), None, 0),
         ValueError, r"\[-8, 7\]"),
        ("scale dtype", (x, w, b, 1e-6, 8, torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.int32),
                         None, 0), TypeError, "scale must be"),
    ]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # numpy, inside the interpreter, on NaN/Inf rows
@pytest.mark.parametrize("impl", _impls("cpu"), ids=["cpu", "triton"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs(impl, case):
    _, args, exc, match = case
    with pytest.raises(exc, match=match):
        impl(*args)


def test_reference_rejects_the_same():
    # the spec raises on what the kernels raise on (spot checks)
    x, w, b = make_ln_inputs(4, 16)
    with pytest.raises(ValueError, match="eps"):
        R.layernorm_quantize(x, w, b, 0.0, 8)
    x[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        R.layernorm_quantize(x, w, b, 1e-6, 8)


def test_cpu_rejects_noncontiguous_and_cuda_free():
    x, w, b = make_ln_inputs(8, 32)
    with pytest.raises(ValueError, match="contiguous"):
        OP(x.t().contiguous().t(), w, b, 1e-6, 8, None, None, None, 0)


# ---------------------------------------------------------------------------
# native CUDA (the op dispatches to the Triton kernel)
# ---------------------------------------------------------------------------
@requires_gpu
@given(M=st.integers(1, 300), half_k=st.sampled_from([1, 5, 96, 192, 384, 512]), bits=st.sampled_from([4, 8]),
       mode=st.sampled_from(["dynamic", "static", "outliers"]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_contract_cuda(M, half_k, bits, mode, dtype):
    K = 2 * half_k
    x, w, b = make_ln_inputs(M, K, dtype, 1.0, spikes=0.01, device="cuda")
    scale = zero = None
    if mode == "static":
        scale, zero = static_scales(1, bits, "cuda")
    threshold, cap = (4.0, K) if mode == "outliers" else (None, 0)
    assert_contract(OP, x, w, b, 1e-6, bits, scale, zero, threshold, cap)


@requires_gpu
def test_opcheck_cuda():
    x, w, b = make_ln_inputs(40, 768, spikes=0.01, device="cuda")
    torch.library.opcheck(OP, (x, w, b, 1e-6, 4, None, None, 4.0, 64))
    torch.library.opcheck(OP, (x.half(), w, b, 1e-6, 8, None, None, None, 0))


@requires_gpu
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_cuda(case):
    _, args, exc, match = case
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(exc, match=match):
        OP(*args)


# ---------------------------------------------------------------------------
# ahead-of-time compile for sm_90 (what the interpreter cannot check)
# ---------------------------------------------------------------------------
_AOT_BOOT = """
import sys, types
pkg = types.ModuleType("vitq_kernels")
pkg.__path__ = [%r]
sys.modules["vitq_kernels"] = pkg
from vitq_kernels.triton_kernels import aot_activation
aot_activation.main(sys.argv[1:])
""" % os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vitq_kernels")


def aot_records(which, tmp_path):
    """Compile the `which` kernels for sm_90 in a subprocess without TRITON_INTERPRET (under
    the interpreter @triton.jit gives interpreter functions, which cannot be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _AOT_BOOT, "--which", which], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"AOT compile failed:\n{proc.stderr[-6000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_aot_sm90(tmp_path):
    # every variant compiles for H100 without register spills; the quantizer's divisions
    # are correctly rounded, the 2^23 round-half-even constant survives, and no FMA is
    # formed (fp-contraction off: the LayerNorm is the same in every call)
    records = aot_records("ln", tmp_path)
    assert len(records) == 4          # one of them 3-bit
    for r in records:
        assert r["cubin_bytes"] > 0 and r["spill_bytes"] == 0, r
        assert r["div_rn_f32"] > 0 and r["magic_2p23"] > 0 and r["fma_f32"] == 0, r
