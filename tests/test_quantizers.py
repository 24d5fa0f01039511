"""Each fake quantizer against the spec (vitq_kernels/reference.py): forward values bit for bit."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vitq.quantizers import (GELU_MIN, Log2Quantizer, ShiftLog2Quantizer, UniformActQuantizer,
                             WeightQuantizer, ref, rectified_sigmoid)


def heavy_tailed(*shape, seed=None):
    """Gaussian bulk with a few large values, like post-LayerNorm activations."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(*shape, generator=g)
    spikes = torch.rand(*shape, generator=g) < 0.01
    return torch.where(spikes, x * 20, x)


def ref_per_token(x, bits, alpha, capacity, scale=None, zero=None):
    out = ref.per_token_quantize(x, bits, scale, zero, alpha, capacity if alpha is not None else 0)
    codes, s, z, _, idx, val, _ = out
    return ref.dequantize_rows(codes, s, z, bits, idx if alpha is not None else None,
                               val if alpha is not None else None)


def ref_rows_any_bits(x, bits, alpha):
    """per_token_quantize's formulas at widths the kernels do not take (3, 5, 6, 7 bit)."""
    mask = ref.outlier_mask(x, alpha)
    dense = torch.where(mask, torch.zeros_like(x), x)
    lo, hi = dense.amin(1).clamp(max=0), dense.amax(1).clamp(min=0)
    s, zu = ref.uniform_scale_zero(lo, hi, bits)
    q = ref.quantize_rows(dense, s, zu, bits)
    half = 1 << (bits - 1)
    deq = s[:, None] * ((q - half).float() - (zu - half).float()[:, None])
    return torch.where(mask, x, deq)


# ---------------------------------------------------------------------------------------------
# POQ / uniform activations
# ---------------------------------------------------------------------------------------------
@given(M=st.integers(1, 40), K2=st.integers(1, 48), bits=st.sampled_from([4, 8]),
       alpha=st.sampled_from([None, 2.0, 5.0]), seed=st.integers(0, 2**31 - 1))
def test_poq_dynamic_matches_reference(M, K2, bits, alpha, seed):
    x = heavy_tailed(M, 2 * K2, seed=seed)
    q = UniformActQuantizer(bits, "token", alpha=alpha, capacity=2 * K2)
    q.finish_calibration()
    assert torch.equal(q(x), ref_per_token(x, bits, alpha, 2 * K2))


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
def test_poq_dynamic_other_widths(bits):
    x = heavy_tailed(33, 64)
    q = UniformActQuantizer(bits, "token", alpha=3.0, capacity=64)
    q.finish_calibration()
    assert torch.equal(q(x), ref_rows_any_bits(x, bits, 3.0))


def test_poq_3d_input_is_per_token():
    x = heavy_tailed(3, 7, 16)
    q = UniformActQuantizer(4, "token", alpha=5.0, capacity=16)
    q.finish_calibration()
    assert torch.equal(q(x), ref_per_token(x.reshape(-1, 16), 4, 5.0, 16).reshape(3, 7, 16))


@given(B=st.integers(1, 4), T=st.integers(1, 9), K2=st.integers(1, 24), bits=st.sampled_from([4, 8]),
       per_position=st.booleans(), alpha=st.sampled_from([None, 3.0]), seed=st.integers(0, 2**31 - 1))
def test_static_scales_match_reference(B, T, K2, bits, per_position, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    x = heavy_tailed(B, T, 2 * K2, seed=seed)
    n = T if per_position else 1
    half = 1 << (bits - 1)
    scale = torch.rand(n, generator=g) * 0.5 + 0.01
    zero = torch.randint(-half, half, (n,), generator=g, dtype=torch.int32)
    q = UniformActQuantizer(bits, "position" if per_position else "tensor", alpha=alpha, capacity=2 * K2)
    q.set_static(scale, zero)
    expect = ref_per_token(x.reshape(-1, 2 * K2), bits, alpha, 2 * K2, scale, zero).reshape(x.shape)
    assert torch.equal(q(x), expect)


def test_calibrated_static_scales_are_valid_and_exact():
    x = heavy_tailed(4, 10, 32)
    for gran in ("tensor", "position"):
        for init in ("minmax", "percentile", "mse"):
            q = UniformActQuantizer(8, gran, init=init)
            q.observing = True
            q(x)
            q.observing = False
            q.finish_calibration()
            p = q.export_params()
            assert p["scale"].dtype == torch.float32 and p["zero"].dtype == torch.int32
            assert p["scale"].numel() == (1 if gran == "tensor" else 10)
            expect = ref_per_token(x.reshape(-1, 32), 8, None, 0, p["scale"], p["zero"]).reshape(x.shape)
            assert torch.equal(q(x), expect)
    # min/max range: nothing is clipped, so the error is at most half a step
    q = UniformActQuantizer(8, "tensor", init="minmax")
    q.observing = True
    q(x)
    q.observing = False
    q.finish_calibration()
    assert float((q(x) - x).abs().max()) <= float(q.scale) / 2 * (1 + 1e-5)


def test_mse_init_beats_minmax_on_outliers():
    x = heavy_tailed(8, 64, 64)
    errs = {}
    for init in ("minmax", "mse"):
        q = UniformActQuantizer(4, "tensor", init=init)
        q.observing = True
        q(x)
        q.observing = False
        q.finish_calibration()
        errs[init] = float((q(x) - x).pow(2).sum())
    assert errs["mse"] < errs["minmax"]


def test_outlier_capacity_from_calibration_and_overflow_error():
    x = torch.randn(16, 64)
    x[3, :5] = 50.0
    q = UniformActQuantizer(4, "token", alpha=5.0, capacity_factor=2.0, min_capacity=8)
    q.observing = True
    q(x)
    q.observing = False
    q.finish_calibration()
    assert q.max_outliers_seen == 5 and q.capacity == 10
    assert torch.equal(q(x), ref_per_token(x, 4, 5.0, 10))
    y = x.clone()
    y[0, :11] = -40.0
    with pytest.raises(ValueError, match="max_outliers=10"):
        q(y)
    with pytest.raises(ValueError, match="max_outliers"):  # the spec raises the same error
        ref_per_token(y, 4, 5.0, 10)


def test_outliers_are_kept_exactly():
    x = heavy_tailed(20, 32)
    q = UniformActQuantizer(4, "token", alpha=2.0, capacity=32)
    q.finish_calibration()
    y = q(x)
    mask = x.abs() > 2.0
    assert mask.any() and torch.equal(y[mask], x[mask])


def test_uniform_ste_gradients():
    x = heavy_tailed(6, 5, 16).requires_grad_(True)
    q = UniformActQuantizer(4, "tensor", init="minmax")
    q.set_static(torch.tensor([0.3]), torch.tensor([-1], dtype=torch.int32))
    q.scale.requires_grad_(True)
    y = q(x)
    with torch.no_grad():
        assert torch.equal(y, q(x.detach()))
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(q.scale.grad).all() and float(q.scale.grad.abs()) > 0
    # inside the range the STE passes the gradient unchanged; clipped elements get none
    inside = ((torch.round(x.detach() / 0.3) + 7 >= 0) & (torch.round(x.detach() / 0.3) + 7 <= 15))
    assert torch.equal(x.grad != 0, inside & (x.grad != 0))


def test_dynamic_ste_passes_gradient():
    x = heavy_tailed(5, 16).requires_grad_(True)
    q = UniformActQuantizer(4, "token", alpha=5.0, capacity=16)
    q.finish_calibration()
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# ---------------------------------------------------------------------------------------------
# log2 family
# ---------------------------------------------------------------------------------------------
@given(rows=st.integers(1, 30), N=st.integers(1, 70), bits=st.integers(2, 8), substeps=st.sampled_from([0, 1]),
       temp=st.floats(0.1, 10.0), seed=st.integers(0, 2**31 - 1))
def test_log2_softmax_matches_reference(rows, N, bits, substeps, temp, seed):
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(rows, N, generator=g) * temp).softmax(-1)
    q = Log2Quantizer(bits, substeps)
    expect = ref.log2_dequantize(ref.log2_quantize(p, bits, 1.0, substeps), bits, 1.0, substeps)
    assert torch.equal(q(p), expect)


@given(M=st.integers(1, 30), K=st.integers(1, 64), bits=st.integers(2, 8), substeps=st.sampled_from([0, 1]),
       log_scale=st.floats(-3, 4), shift_mode=st.sampled_from(["gelu", "calibrated"]),
       seed=st.integers(0, 2**31 - 1))
def test_shift_log2_matches_reference(M, K, bits, substeps, log_scale, shift_mode, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.gelu(torch.randn(M, K, generator=g) * 3)
    q = ShiftLog2Quantizer(bits, substeps, shift=shift_mode, init="minmax")
    q.observing = True
    q(x)
    q.observing = False
    q.finish_calibration()
    q.scale.data.fill_(2.0 ** log_scale)
    shift, scale = float(q.shift), q.scale.detach()
    expect = ref.shift_log2_dequantize(ref.shift_log2_quantize(x, bits, shift, scale, substeps),
                                       bits, shift, scale, substeps)
    assert torch.equal(q(x), expect)


def test_shift_log2_defaults():
    q = ShiftLog2Quantizer(4)
    assert math.isclose(float(q.shift), GELU_MIN - 1e-3, rel_tol=1e-6)
    x = torch.nn.functional.gelu(torch.randn(64, 128) * 2)
    q.observing = True
    q(x)
    q.observing = False
    q.finish_calibration()
    # eq. 14 init is the max of the shifted data; the MSE search can only lower the error
    q2 = ShiftLog2Quantizer(4, init="minmax")
    q2.observing = True
    q2(x)
    q2.observing = False
    q2.finish_calibration()
    assert math.isclose(float(q2.scale), float(x.max() - q2.shift), rel_tol=1e-6)
    assert float((q(x) - x).pow(2).sum()) <= float((q2(x) - x).pow(2).sum())


def test_log_ste_scale_gradient():
    x = torch.nn.functional.gelu(torch.randn(32, 32) * 2).requires_grad_(True)
    q = ShiftLog2Quantizer(4, init="minmax")
    q.observing = True
    q(x.detach())
    q.observing = False
    q.finish_calibration()
    q.scale.requires_grad_(True)
    y = q(x)
    (y - x.detach()).pow(2).sum().backward()
    assert torch.isfinite(q.scale.grad).all() and float(q.scale.grad.abs()) > 0
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
@given(N=st.integers(1, 24), K=st.integers(1, 40), bits=st.sampled_from([3, 4, 8]), symmetric=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_weight_rtn_matches_reference(N, K, bits, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05 + (torch.rand(N, 1, generator=g) - 0.5) * 0.05
    q = WeightQuantizer(bits, symmetric=symmetric, init="minmax")
    q.calibrate(w)
    codes, s, z = ref.quantize_weight_per_channel(w, bits, symmetric)
    expect = s[:, None] * (codes.float() - z.float()[:, None])
    assert torch.equal(q(w), expect)
    q.harden(w)
    p = q.export_params()
    assert torch.equal(p["codes"], codes) and torch.equal(p["scale"], s) and torch.equal(p["zero"], z)
    assert torch.equal(q(w), expect)


def test_weight_6bit_and_conv_shapes():
    w = torch.randn(8, 3, 4, 4) * 0.1
    q = WeightQuantizer(6, init="minmax")
    q.calibrate(w)
    w2 = w.reshape(8, -1)
    lo, hi = w2.amin(1).clamp(max=0), w2.amax(1).clamp(min=0)
    s, zu = ref.uniform_scale_zero(lo, hi, 6)
    qq = ref.quantize_rows(w2, s, zu, 6)
    expect = (s[:, None] * ((qq - 32).float() - (zu - 32).float()[:, None])).reshape(w.shape)
    assert torch.equal(q(w), expect)
    assert not q.exportable and WeightQuantizer(4).exportable


def test_weight_mse_init_lowers_error():
    w = torch.randn(32, 64) * 0.02
    w[:, 0] = 0.5  # one large weight per channel
    errs = []
    for init in ("minmax", "mse"):
        q = WeightQuantizer(4, init=init)
        q.calibrate(w)
        errs.append(float((q(w) - w).pow(2).sum()))
    assert errs[1] < errs[0]


def test_adaround_soft_hard_and_round_loss():
    w = torch.randn(16, 32) * 0.05
    q = WeightQuantizer(4, init="minmax")
    q.calibrate(w)
    rtn = q(w)
    v = q.start_adaround(w)
    # h(V) starts at the fractional part of w/s: the soft weights reproduce w, clipped to the code
    # range (the rounded zero point can cut up to half a step off the range), up to the clamp of
    # the fraction to [1e-4, 1 - 1e-4]
    s, z = q.scale[:, None], q.zero.float()[:, None]
    clipped = s * (torch.clamp(w / s + z, -8, 7) - z)
    with torch.no_grad():
        assert float((q(w) - clipped).abs().max()) <= 1e-3 * float(q.scale.max())
    assert float(q.round_loss(2.0).detach()) > 0
    # push every V to a hard decision and check the codes are floor + [h >= 0.5]
    with torch.no_grad():
        v.copy_(torch.randn_like(v) * 10)
    up = (rectified_sigmoid(v) >= 0.5).float()
    expect_codes = torch.clamp(torch.floor(w / q.scale[:, None]) + up + q.zero.float()[:, None], -8, 7)
    q.harden(w)
    assert q.mode == "hard" and torch.equal(q.codes.float(), expect_codes)
    assert torch.equal(q(w), q.scale[:, None] * (expect_codes - q.zero.float()[:, None]))
    assert not torch.equal(q(w), rtn)  # random decisions differ from round-to-nearest somewhere


def test_adaround_gradient_reaches_v():
    w = torch.randn(8, 16) * 0.05
    q = WeightQuantizer(4)
    q.calibrate(w)
    v = q.start_adaround(w)
    (q(w) * torch.randn(8, 16)).sum().backward()
    assert v.grad is not None and float(v.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True])
def test_bad_bits(bits):
    for make in (lambda: UniformActQuantizer(bits), lambda: Log2Quantizer(bits),
                 lambda: ShiftLog2Quantizer(bits), lambda: WeightQuantizer(bits)):
        with pytest.raises(ValueError, match="2..8"):
            make()


def test_bad_arguments():
    with pytest.raises(ValueError, match="granularity"):
        UniformActQuantizer(4, "channel")
    with pytest.raises(ValueError, match="alpha"):
        UniformActQuantizer(4, "token", alpha=-1.0)
    with pytest.raises(ValueError, match="substeps"):
        Log2Quantizer(4, substeps=3)
    with pytest.raises(ValueError, match="shift"):
        ShiftLog2Quantizer(4, shift="max")


def test_non_finite_and_uncalibrated_inputs():
    q = UniformActQuantizer(4, "token", alpha=5.0, capacity=8)
    with pytest.raises(RuntimeError, match="before calibration"):
        UniformActQuantizer(4, "tensor")(torch.randn(2, 4))
    q.finish_calibration()
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        q(x)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        Log2Quantizer(4)(x)
    w = torch.randn(4, 4)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        WeightQuantizer(4).calibrate(w)
    s = UniformActQuantizer(4, "position")
    s.set_static(torch.ones(3), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="do not tile"):
        s(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="zero points"):
        s.set_static(torch.ones(1), torch.tensor([9], dtype=torch.int32))
    with pytest.raises(ValueError, match="> 0"):
        s.set_static(torch.zeros(1), torch.tensor([0], dtype=torch.int32))


def test_empty_batch():
    q = UniformActQuantizer(8, "token", alpha=5.0, capacity=8)
    q.finish_calibration()
    assert q(torch.randn(0, 16)).shape == (0, 16)
    assert Log2Quantizer(4)(torch.rand(0, 5)).shape == (0, 5)
