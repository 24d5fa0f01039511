"""pytest-benchmark microbenchmarks of qgemm on CPU, plus a smoke run of bench_qgemm.py.

    pytest bench/test_bench_qgemm.py                       # times a few rounds
    pytest bench/test_bench_qgemm.py --benchmark-disable   # runs each kernel once

Each benchmarked call is also checked against reference.qgemm, so a benchmark of a
wrong kernel fails.  On a machine with a GPU the same tests time the CUDA tensors' path.
"""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import bench_qgemm  # noqa: E402
from vitq_kernels import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# ViT-S proj at batch 1 (197 tokens), and ViT-S fc2 (K = 4d) on 64 tokens: small enough for
# the exact int64 reference check to stay cheap on a 2-core CI machine
SHAPES = [(197, 384, 384), (64, 1536, 384)]


@pytest.mark.parametrize("fmt", ["W8A8", "W4A4"])
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_bench_qgemm(benchmark, M, K, N, fmt):
    a_bits, w_bits = bench_qgemm.FORMATS[fmt]
    args = bench_qgemm.qgemm_inputs(M, K, N, a_bits, w_bits, 0.02, DEVICE) + (torch.float32,)
    benchmark.extra_info.update(M=M, K=K, N=N, format=fmt, device=DEVICE)
    y = benchmark.pedantic(torch.ops.vitq.qgemm, args=args, rounds=3, iterations=1, warmup_rounds=1)
    cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    expected = reference.qgemm(*cpu_args)
    # same fp32 operations in the same order: equal up to a last-bit difference
    torch.testing.assert_close(y.cpu(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_bench_script_cpu_smoke(tmp_path):
    out = tmp_path / "qgemm"
    assert bench_qgemm.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    data = json.loads((tmp_path / "qgemm.json").read_text())
    assert data["environment"]["device"] == "cpu"
    rows = data["rows"]
    # 2 GEMMs x (2 baselines + 2 formats x 2 outlier rates x 1 backend)
    assert len(rows) == 2 * (2 + 2 * 2)
    assert all(r["ms"] > 0 and r["TOPS"] > 0 for r in rows)
    assert {r["backend"] for r in rows} == {"fp32 F.linear", "int8 _int_mm + rescale", "cpu"}
    md = (tmp_path / "qgemm.md").read_text()
    assert "CPU timings" in md and "| model | gemm |" in md
