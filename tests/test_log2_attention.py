"""log2_attention: C++ CPU kernel, Triton (interpreter / GPU) and the native CUDA op vs
reference.log2_attention.

What "equal" means here (see the reference section): every output element must equal the
reference bit for bit, except in rows where a reference probability lies within W ulps of
a log2 code boundary; there the exp of the implementation (std::exp, np.exp, ex2.approx)
may legitimately pick the neighbouring code, and the difference must stay within what such
flips can change (reference.log2_attention_flip_bound).  Configurations whose P^ V sums are
not exact in fp32 (E = (2^b - 2) >> m > 15) also get the fp32 summation bound.
"""
import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vitq_kernels  # noqa: F401  (registers torch.ops.vitq)
from vitq_kernels import reference as ref

# the package exports the launcher function under the module's name; take the module itself
tk = importlib.import_module("vitq_kernels.triton_kernels.log2_attention")

from conftest import requires_gpu

W_CPU = 8      # ulps: std::exp / np.exp vs torch.exp, then l and the product
W_GPU = 64     # ulps: ex2.approx(x * log2 e), see the reference section


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------
def make_inputs(B, H, N, D, per_head=False, spread=None, device="cpu"):
    """Random codes, scales and zero points; the logit spread (std of t) is random in [0.5, 8]."""
    q, k, v = (torch.randint(-128, 128, (B, H, N, D), dtype=torch.int8) for _ in range(3))
    n = H if per_head else 1
    zq, zk, zv = (torch.randint(-128, 128, (n,), dtype=torch.int32) for _ in range(3))
    spread = float(torch.empty(()).uniform_(0.5, 8.0)) if spread is None else spread
    sm_scale = D ** -0.5
    # std of sum_d (q - zq)(k - zk) is about sqrt(D) * E|q - zq| * E|k - zk| ~ sqrt(D) * 80^2
    s_qk = math.sqrt(spread / (sm_scale * math.sqrt(D) * 6400.0))
    sq = (torch.rand(n) * 0.5 + 0.75) * s_qk
    sk = (torch.rand(n) * 0.5 + 0.75) * s_qk
    sv = torch.rand(n) * 0.05 + 0.001
    args = [q, k, v, sq.float(), zq, sk.float(), zk, sv.float(), zv]
    return [a.to(device) for a in args], sm_scale


def swin_bias(B, H, N, n_windows):
    """Relative-position bias [H, N, N] plus a 0/-100 shift mask [nW, N, N], as Swin adds them."""
    rel = torch.randn(H, N, N) * 2.0
    group = torch.randint(0, 3, (n_windows, N))
    mask = torch.where(group[:, :, None] == group[:, None, :], 0.0, -100.0)
    return (rel[None] + mask[:, None]).contiguous()


def out_quant(bits):
    half = 1 << (bits - 1)
    return torch.rand(1) * 0.002 + 0.0005, torch.randint(-half // 2, half // 2, (1,), dtype=torch.int32)


# ---------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------
def exact_config(p_bits, substeps, p_max_code=None):
    max_code = (1 << p_bits) - 2 if p_max_code is None else p_max_code
    return max_code >> substeps <= 15


def tolerance(args, sm_scale, bias, p_bits, substeps, window, p_max_code=None):
    """Allowed |out - ref| per element [B, N, H, D] (float64) and the near-boundary count."""
    q, k, v, sq, zq, sk, zk, sv, zv = [a.cpu() for a in args]
    bias = bias.cpu() if bias is not None else None
    P = ref.log2_attention_probs(q, k, sq, zq, sk, zk, sm_scale, bias)
    tol, n_near = ref.log2_attention_flip_bound(P, v, sv, zv, p_bits, substeps, window, p_max_code)
    H, N = q.shape[1], q.shape[2]
    if not exact_config(p_bits, substeps, p_max_code):
        # fp32 accumulation of the planes: (N - 1) 2^-24 sum_j 2^-(c >> m) |v - zv|, per plane
        c = ref.tul2_quantize(P, p_bits, substeps, p_max_code).to(torch.int64)
        w = torch.where(c < (1 << p_bits) - 1, torch.exp2(-(c >> substeps).double()), torch.zeros((), dtype=torch.float64))
        vh = (v.double() - zv.double().reshape(-1).expand(H)[None, :, None, None]).abs()
        acc = (w @ vh) * max(N - 1, 1) * 2.0 ** -24 * 1.5
        tol = tol + (acc * sv.double().reshape(-1).expand(H)[None, :, None, None]).permute(0, 2, 1, 3)
    return tol, n_near, P


def assert_matches_reference(out, args, sm_scale, bias=None, p_bits=4, substeps=0, out_scale=None, out_zero=None,
                             out_bits=8, out_dtype=torch.float32, window=W_CPU, p_max_code=None):
    cpu = [a.cpu() for a in args]
    bias_c = bias.cpu() if bias is not None else None
    expect = ref.log2_attention(*cpu, sm_scale, bias_c, p_bits, substeps,
                                out_scale.cpu() if out_scale is not None else None,
                                out_zero.cpu() if out_zero is not None else None, out_bits, out_dtype, p_max_code)
    out = out.cpu()
    assert out.shape == expect.shape and out.dtype == expect.dtype
    tol, n_near, P = tolerance(args, sm_scale, bias, p_bits, substeps, window, p_max_code)
    # the boundary allowance must stay an exception, or the test would prove little
    assert n_near <= max(8, P.numel() // 1000), f"{n_near} of {P.numel()} probabilities near a code boundary"
    if out_scale is None:
        y, e = out.double(), expect.double()
        # the final cast to fp16/bf16 can move a perturbed value by one ulp of that dtype
        slack = torch.where(tol > 0, 2 * e.abs() * torch.finfo(out_dtype).eps + 1e-30, torch.zeros_like(tol))
        bad = (y - e).abs() > tol * (1 + 1e-6) + slack
    else:
        if ref.is_packed(out_bits):
            out, expect = ref.unpack_int4(out), ref.unpack_int4(expect)
        code_tol = torch.where(tol > 0, torch.ceil(tol / float(out_scale)) + 1, torch.zeros_like(tol))
        bad = (out.double() - expect.double()).abs() > code_tol
    assert not bool(bad.any()), (f"{int(bad.sum())} of {bad.numel()} outputs differ beyond the allowance; "
                                 f"{n_near} near-boundary probabilities")
    if n_near == 0 and exact_config(p_bits, substeps, p_max_code):
        assert torch.equal(out, expect)
    return n_near


def run_cpu(args, sm_scale, bias=None, p_bits=4, substeps=0, out_scale=None, out_zero=None, out_bits=8,
            out_dtype=torch.float32, p_max_code=None):
    return torch.ops.vitq.log2_attention(*args, sm_scale, bias, p_bits, substeps, out_scale, out_zero, out_bits,
                                         out_dtype, p_max_code)


def run_triton(args, sm_scale, bias=None, p_bits=4, substeps=0, out_scale=None, out_zero=None, out_bits=8,
               out_dtype=torch.float32, **kw):
    return tk.launch_log2_attention(*args, sm_scale, bias, p_bits, substeps, out_scale, out_zero, out_bits,
                                    out_dtype, **kw)


# shapes: (B, H, N, D, Swin windows per image or 0)
VIT_SHAPES = [
    (4, 2, 49, 32, 2),       # Swin window 7x7 with rel-pos bias and shift mask (2 windows per image)
    (2, 3, 65, 64, 0),       # DINOv2-S/14 at 112 px
    (2, 2, 197, 64, 0),      # ViT/DeiT at 224 px
    (2, 2, 257, 64, 0),      # DINOv2-S/14 at 224 px
]


# ---------------------------------------------------------------------------
# C++ CPU kernel
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("B,H,N,D,nw", VIT_SHAPES + [(1, 2, 1024, 64, 0)])
@pytest.mark.parametrize("substeps,per_head", [(0, False), (1, True)])
def test_cpu_matches_reference(B, H, N, D, nw, substeps, per_head):
    args, sm = make_inputs(B, H, N, D, per_head)
    bias = swin_bias(B, H, N, nw) if nw else None
    out = run_cpu(args, sm, bias, 4, substeps)
    assert_matches_reference(out, args, sm, bias, 4, substeps)


@pytest.mark.parametrize("out_bits", [8, 4, 3])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_cpu_output_formats(out_bits, out_dtype):
    args, sm = make_inputs(2, 3, 197, 64)
    assert_matches_reference(run_cpu(args, sm, out_dtype=out_dtype), args, sm, out_dtype=out_dtype)
    so, zo = out_quant(out_bits)
    codes = run_cpu(args, sm, None, 4, 0, so, zo, out_bits)
    assert codes.dtype == (torch.int8 if out_bits == 8 else torch.uint8)
    assert_matches_reference(codes, args, sm, None, 4, 0, so, zo, out_bits)


def test_cpu_output_feeds_qgemm_format():
    """Quantized output = per_token_quantize's codes with the static per-tensor scale."""
    args, sm = make_inputs(2, 3, 65, 64)
    so, zo = out_quant(8)
    y = run_cpu(args, sm)
    codes = run_cpu(args, sm, None, 4, 0, so, zo, 8)
    B, N, H, D = y.shape
    expect = ref.per_token_quantize(y.reshape(B * N, H * D), 8, so, zo)[0]
    assert torch.equal(codes.reshape(B * N, H * D), expect)


def test_cpu_strided_qkv_views():
    """q, k, v as views into one qkv tensor [B, N, 3, H, D] (last dim contiguous)."""
    B, N, H, D = 2, 65, 3, 32
    args, sm = make_inputs(B, H, N, D)
    qkv = torch.randint(-128, 128, (B, N, 3, H, D), dtype=torch.int8)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    args[0], args[1], args[2] = q, k, v
    out = run_cpu(args, sm)
    dense = [a.contiguous() for a in args]
    assert torch.equal(out, run_cpu(dense, sm))
    assert_matches_reference(out, args, sm)


@settings(max_examples=25)
@given(B=st.integers(1, 3), H=st.integers(1, 3), N=st.integers(1, 300), D=st.sampled_from([8, 16, 40, 64, 96]),
       p_bits=st.integers(1, 8), substeps=st.sampled_from([0, 1, 2]), per_head=st.booleans(),
       bias_shape=st.sampled_from([None, "1,1", "1,H", "B,1", "B,H"]), spread=st.floats(0.1, 20.0))
def test_cpu_property(B, H, N, D, p_bits, substeps, per_head, bias_shape, spread):
    args, sm = make_inputs(B, H, N, D, per_head, spread)
    bias = None
    if bias_shape:
        bb, bh = bias_shape.split(",")
        bias = torch.randn(B if bb == "B" else 1, H if bh == "H" else 1, N, N) * 3
    out = run_cpu(args, sm, bias, p_bits, substeps)
    assert_matches_reference(out, args, sm, bias, p_bits, substeps)


# ---------------------------------------------------------------------------
# Triton kernels (TRITON_INTERPRET=1 without a GPU)
# ---------------------------------------------------------------------------
def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("B,H,N,D,nw", [(4, 1, 49, 32, 2), (1, 2, 65, 64, 0), (1, 2, 197, 64, 0),
                                        (1, 1, 257, 64, 0)])
def test_triton_one_block_matches_reference(B, H, N, D, nw):
    args, sm = make_inputs(B, H, N, D, per_head=True, device=_dev())
    bias = swin_bias(B, H, N, nw).to(_dev()) if nw else None
    substeps = int(torch.randint(0, 2, ()))
    out = run_triton(args, sm, bias, 4, substeps, path="one_block")
    assert_matches_reference(out, args, sm, bias, 4, substeps,
                             window=W_GPU if torch.cuda.is_available() else W_CPU)


def test_triton_two_pass_long_row_matches_reference():
    args, sm = make_inputs(1, 1, 1024, 64, device=_dev())
    out = run_triton(args, sm, None, 4, 0, path="two_pass")
    assert_matches_reference(out, args, sm, window=W_GPU if torch.cuda.is_available() else W_CPU)


@pytest.mark.parametrize("p_bits,substeps", [(4, 0), (5, 1), (6, 2)])
def test_triton_one_block_and_two_pass_bit_identical(p_bits, substeps):
    """Same exp inputs, exact max, fixed-point sum, exact P^ V: the two kernels agree bit for bit."""
    B, H, N, D, nw = 2, 1, 197, 32, 2
    args, sm = make_inputs(B, H, N, D, device=_dev())
    bias = swin_bias(B, H, N, nw).to(_dev())
    one = run_triton(args, sm, bias, p_bits, substeps, path="one_block")
    two = run_triton(args, sm, bias, p_bits, substeps, path="two_pass", block_m=256, block_n=64)   # 4 chunks
    assert torch.equal(one, two)


@pytest.mark.parametrize("out_bits", [8, 4, 3])
def test_triton_quantized_output(out_bits):
    args, sm = make_inputs(1, 2, 65, 64, device=_dev())
    so, zo = out_quant(out_bits)
    codes = run_triton(args, sm, None, 4, 0, so.to(_dev()), zo.to(_dev()), out_bits)
    assert_matches_reference(codes, args, sm, None, 4, 0, so, zo, out_bits,
                             window=W_GPU if torch.cuda.is_available() else W_CPU)


@settings(max_examples=6)
@given(H=st.integers(1, 2), N=st.integers(1, 140), D=st.sampled_from([16, 40, 64]), p_bits=st.integers(2, 8),
       substeps=st.sampled_from([0, 1, 2]), two_pass=st.booleans(), spread=st.floats(0.1, 20.0))
def test_triton_property(H, N, D, p_bits, substeps, two_pass, spread):
    args, sm = make_inputs(1, H, N, D, per_head=H > 1, spread=spread, device=_dev())
    out = run_triton(args, sm, None, p_bits, substeps, path="two_pass" if two_pass else "one_block",
                     block_n=64 if two_pass else None)
    assert_matches_reference(out, args, sm, None, p_bits, substeps,
                             window=W_GPU if torch.cuda.is_available() else W_CPU)


def test_triton_log2_codes_on_boundaries():
    """The kernels' code extraction equals reference.log2_quantize on every fp32 value next to a
    code threshold, at exponents across the code range, and on the special values."""
    import triton
    import triton.language as tl

    @triton.jit
    def codes_kernel(p_ptr, c_ptr, n, max_code, TOP: tl.constexpr, SUBSTEPS: tl.constexpr, THR_A: tl.constexpr,
                     THR_B: tl.constexpr, THR_C: tl.constexpr, THR_D: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        p = tl.load(p_ptr + offs, mask=offs < n, other=0.0)
        c, keep = tk.log2_codes(p, max_code, SUBSTEPS, THR_A, THR_B, THR_C, THR_D)
        tl.store(c_ptr + offs, tl.where(keep, c, TOP), mask=offs < n)

    for substeps in (0, 1, 2):
        mant = []
        for t in ref.LOG_MANTISSA_THRESHOLDS[substeps]:
            mant += [t + d for d in range(-2, 3)]
        mant += [0, 1, (1 << 23) - 1]
        exps = torch.tensor([127, 126, 120, 113, 100, 64, 2, 1])        # 1.0 down to 2^-126
        bits = (exps[:, None] << 23) | torch.tensor(mant)[None, :]
        p = bits.to(torch.int32).view(torch.float32).reshape(-1)
        p = torch.cat([p, torch.tensor([0.0, 1.0, 1e-40, 0.7071067, 0.70710677, 0.7071068])]).to(_dev())
        thr = tk.code_constants(substeps)[:4]
        for p_bits, max_code in ((1, None), (3, None), (3, 2), (4, None), (4, 5), (8, None), (8, 100)):
            top = (1 << p_bits) - 1
            c = torch.empty(p.numel(), dtype=torch.int32, device=p.device)
            codes_kernel[(triton.cdiv(p.numel(), 128),)](p, c, p.numel(), top - 1 if max_code is None else max_code,
                                                         TOP=top, SUBSTEPS=substeps, THR_A=thr[0], THR_B=thr[1],
                                                         THR_C=thr[2], THR_D=thr[3], BLOCK=128)
            expect = ref.tul2_quantize(p.cpu(), p_bits, substeps, max_code).to(torch.int32)
            assert torch.equal(c.cpu(), expect), (substeps, p_bits, max_code)
            if max_code is None:
                assert torch.equal(expect, ref.log2_quantize(p.cpu(), p_bits, 1.0, substeps).to(torch.int32))


# ---------------------------------------------------------------------------
# op registration, fakes, empty inputs, bad inputs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["float", "bias_fp16", "codes4", "truncated_m2"])
def test_opcheck(variant):
    args, sm = make_inputs(2, 2, 49, 32, per_head=True)
    bias, so, zo, out_bits, out_dtype, substeps, extra = None, None, None, 8, torch.float32, 1, ()
    if variant == "bias_fp16":
        bias, out_dtype = swin_bias(2, 2, 49, 2), torch.float16
    if variant == "codes4":
        (so, zo), out_bits = out_quant(4), 4
    if variant == "truncated_m2":
        substeps, extra = 2, (9,)                    # p_max_code, the schema's trailing optional int
    torch.library.opcheck(torch.ops.vitq.log2_attention,
                          (*args, sm, bias, 4, substeps, so, zo, out_bits, out_dtype, *extra))


def test_python_entry_point_defaults():
    args, _ = make_inputs(1, 2, 65, 64)
    out = vitq_kernels.log2_attention(*args)
    assert out.dtype == torch.float16 and out.shape == (1, 65, 2, 64)
    assert torch.equal(out, run_cpu(args, 64 ** -0.5, out_dtype=torch.float16))


@pytest.mark.parametrize("impl", ["cpu", "triton", "reference"])
def test_empty_batch(impl):
    args, sm = make_inputs(0, 2, 49, 32, device=_dev() if impl == "triton" else "cpu")
    fn = {"cpu": run_cpu, "triton": run_triton,
          "reference": lambda a, s: ref.log2_attention(*a, s)}[impl]
    out = fn(args, sm)
    assert out.shape == (0, 49, 2, 32)


def _bad_cases():
    """(description, mutate(args, kw) -> None, exception type, message fragment)."""
    def setk(key, val):
        return lambda a, kw: kw.__setitem__(key, val)

    def seta(i, fn):
        return lambda a, kw: a.__setitem__(i, fn(a[i]))

    return [
        ("q dtype", seta(0, lambda t: t.to(torch.int32)), TypeError, "int8"),
        ("q 3-D", seta(0, lambda t: t[0]), ValueError, "[B, H, N, D]"),
        ("k shape", seta(1, lambda t: t[:, :, :-1]), ValueError, "shapes differ"),
        ("D too big", lambda a, kw: [a.__setitem__(i, torch.zeros(1, 1, 4, 300, dtype=torch.int8) + 1)
                                     for i in range(3)], ValueError, "head dim"),
        ("v last dim strided", seta(2, lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
         "contiguous last dimension"),
        ("scale dtype", seta(3, lambda t: t.double()), TypeError, "q_scale"),
        ("scale length", seta(5, lambda t: torch.cat([t, t, t])), ValueError, "per head"),
        ("scale zero", seta(7, lambda t: t * 0), ValueError, "v_scale must be finite"),
        ("scale nan", seta(3, lambda t: t * float("nan")), ValueError, "q_scale must be finite"),
        ("zero range", seta(4, lambda t: t * 0 + 200), ValueError, "q_zero must lie"),
        ("p_bits", setk("p_bits", 9), ValueError, "p_bits"),
        ("substeps", setk("substeps", 3), ValueError, "substeps"),
        ("p_max_code too big", setk("p_max_code", 15), ValueError, "p_max_code"),
        ("p_max_code negative", setk("p_max_code", -1), ValueError, "p_max_code"),
        ("sm_scale inf", setk("sm_scale", float("inf")), ValueError, "sm_scale"),
        ("bias nan", setk("bias", torch.full((1, 1, 49, 49), float("nan"))), ValueError, "NaN or Inf"),
        ("bias -inf mask", setk("bias", torch.zeros(1, 1, 49, 49).index_fill_(3, torch.tensor([3]), float("-inf"))),
         ValueError, "NaN or Inf"),
        ("bias batch", setk("bias", torch.zeros(3, 1, 49, 49) + 0.5), ValueError, "multiple of Bb"),
        ("bias dtype", setk("bias", torch.zeros(1, 1, 49, 49, dtype=torch.float16)), TypeError, "bias"),
        ("bias expanded", setk("bias", torch.ones(1, 1, 1, 49).expand(1, 1, 49, 49)), ValueError, "contiguous"),
        ("out_scale alone", setk("out_scale", torch.ones(1)), ValueError, "together"),
        ("out_bits", lambda a, kw: kw.update(out_scale=torch.ones(1), out_zero=torch.zeros(1, dtype=torch.int32),
                                             out_bits=5), ValueError, "out_bits"),
        ("out_zero range", lambda a, kw: kw.update(out_scale=torch.ones(1), out_zero=torch.full((1,), 9, dtype=torch.int32),
                                                   out_bits=4), ValueError, "out_zero must lie"),
        ("out_dtype", setk("out_dtype", torch.int32), TypeError, "out_dtype"),
    ]


@pytest.mark.parametrize("impl", ["cpu", "triton", "reference"])
def test_bad_inputs(impl):
    value_checks = impl != "triton"                  # the Triton launcher reads no values (no host sync)
    for name, mutate, exc, fragment in _bad_cases():
        if not value_checks and name in ("scale zero", "scale nan", "zero range", "bias nan", "bias -inf mask",
                                         "out_zero range"):
            continue
        args, sm = make_inputs(2, 2, 49, 32)
        kw = dict(sm_scale=sm, bias=None, p_bits=4, substeps=0, out_scale=None, out_zero=None, out_bits=8,
                  out_dtype=torch.float32, p_max_code=None)
        mutate(args, kw)
        call = [*args, kw["sm_scale"], kw["bias"], kw["p_bits"], kw["substeps"], kw["out_scale"], kw["out_zero"],
                kw["out_bits"], kw["out_dtype"]]
        fn = {"cpu": torch.ops.vitq.log2_attention, "triton": tk.launch_log2_attention,
              "reference": ref.log2_attention}[impl]
        with pytest.raises(exc) as info:
            fn(*call, p_max_code=kw["p_max_code"])
        assert fragment in str(info.value), f"{impl} / {name}: {info.value}"


def test_odd_head_dim_4bit_output_rejected():
    args, sm = make_inputs(1, 1, 9, 7)
    so, zo = out_quant(4)
    for fn in (torch.ops.vitq.log2_attention, ref.log2_attention):
        with pytest.raises(ValueError, match="odd"):
            fn(*args, sm, None, 4, 0, so, zo, 4, torch.float32)


# ---------------------------------------------------------------------------
# native CUDA (the registered op on GPU tensors, through Triton)
# ---------------------------------------------------------------------------
@requires_gpu
@pytest.mark.parametrize("B,H,N,D,nw", [(8, 6, 197, 64, 0), (4, 6, 257, 64, 0), (8, 3, 49, 32, 4),
                                        (4, 6, 65, 64, 0), (2, 2, 512, 64, 0), (1, 2, 4096, 64, 0)])
@pytest.mark.parametrize("substeps", [0, 1])
def test_cuda_op_matches_reference(B, H, N, D, nw, substeps):
    args, sm = make_inputs(B, H, N, D, per_head=substeps == 1, device="cuda")
    bias = swin_bias(B, H, N, nw).cuda() if nw else None
    out = torch.ops.vitq.log2_attention(*args, sm, bias, 4, substeps, None, None, 8, torch.float32)
    assert_matches_reference(out, args, sm, bias, 4, substeps, window=W_GPU)


@requires_gpu
@pytest.mark.parametrize("N", [197, 512])
def test_cuda_one_block_and_two_pass_bit_identical(N):
    args, sm = make_inputs(4, 6, N, 64, device="cuda")
    one = run_triton(args, sm, None, 4, 0, path="one_block")
    two = run_triton(args, sm, None, 4, 0, path="two_pass")
    assert torch.equal(one, two)


@requires_gpu
@pytest.mark.parametrize("out_bits", [8, 4])
def test_cuda_quantized_output_and_opcheck(out_bits):
    args, sm = make_inputs(4, 6, 197, 64, device="cuda")
    so, zo = out_quant(out_bits)
    so, zo = so.cuda(), zo.cuda()
    codes = torch.ops.vitq.log2_attention(*args, sm, None, 4, 0, so, zo, out_bits, torch.float32)
    assert_matches_reference(codes, args, sm, None, 4, 0, so, zo, out_bits, window=W_GPU)
    torch.library.opcheck(torch.ops.vitq.log2_attention, (*args, sm, None, 4, 0, so, zo, out_bits, torch.float32))


# ---------------------------------------------------------------------------
# the benchmark script runs (CPU, tiny size)
# ---------------------------------------------------------------------------
def test_bench_attention_cpu_smoke():
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import bench_attention
    rows = bench_attention.run("cpu", [1], ["vit_s"], quick=True, log=lambda *_: None)
    ours = [r for r in rows if r["variant"].startswith("log2_attention")]
    assert len(ours) == 1 and "error" not in ours[0] and ours[0]["ms"] > 0 and ours[0]["x_vs_sdpa"] > 0
