"""torch.compile(fullgraph=True) traces per_token_quantize -> qgemm through the fakes and
runs the same C++ CPU kernels as eager, so the results are identical."""
import pytest
import torch

import vitq_kernels  # noqa: F401  (registers torch.ops.vitq)
from vitq_kernels import reference as R


def quantized_linear(x, w_packed, w_scale, w_zero, w_colsum, bias):
    codes, s, z, rowsum, idx, val, _ = torch.ops.vitq.per_token_quantize(x, 4, None, None, 5.0, 8)
    return torch.ops.vitq.qgemm(codes, s, z, rowsum, w_packed, w_scale, w_zero, w_colsum, bias, idx, val, 4, 4,
                                torch.float32)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_matches_eager(backend):
    torch._dynamo.reset()
    x = torch.randn(12, 64)
    x[torch.rand(12, 64) < 0.02] = 9.0
    wc, ws, wz = R.quantize_weight_per_channel(torch.randn(24, 64), 4, symmetric=False)
    args = (x, R.pack_int4(wc), ws, wz, R.weight_colsum(wc), torch.randn(24))
    compiled = torch.compile(quantized_linear, backend=backend, fullgraph=True)
    y = compiled(*args)
    assert torch.equal(y, quantized_linear(*args))
    # fp32 epilogue: a few roundings of terms no larger than max|y| (FMA contraction allowed)
    y_ref = R.linear_reference(x, wc, ws, wz, args[5], 4, 4, 5.0, 8)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * float(y_ref.abs().max()))
