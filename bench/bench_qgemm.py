"""Benchmark of vitq qgemm (quantized GEMM with fused dequant + outlier epilogue).

GPU: the four GEMMs of a ViT block (qkv, proj, fc1, fc2; MLP ratio 4) of ViT-S (d=384) and
ViT-B (d=768) at 197 tokens per image and batch 1, 8, 64, 256; formats W8A8, W4A8, W4A4;
outlier capacity 0, 0.5% and 2% of K per token; the Triton and CUDA C++ backends.
Baselines timed in the same run on the same shapes: fp16 ``F.linear`` (cuBLAS) and int8
``torch._int_mm`` (cuBLASLt) followed by a separate per-token x per-channel rescale to
fp16.  Reported: median ms (``triton.testing.do_bench``), TOPS (2MNK / t) and speedups
x_vs_float / x_vs_int_mm (baseline time / this row's time; > 1 means faster than the
float GEMM / the int8 GEMM + rescale of the same shape).

CPU (no GPU): small shapes, the C++ CPU kernel against fp32 ``F.linear`` and
``torch._int_mm`` + rescale, median wall-clock ms; labelled CPU timings.

    python bench/bench_qgemm.py [--quick] [--out bench/results/qgemm] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
import vitq_kernels  # noqa: E402,F401  (registers torch.ops.vitq)

TOKENS_PER_IMAGE = 197
MODELS = {"vit_s": 384, "vit_b": 768}
FORMATS = {"W8A8": (8, 8), "W4A8": (8, 4), "W4A4": (4, 4)}   # name -> (a_bits, w_bits)
COLUMNS = ("model", "gemm", "batch", "M", "K", "N", "format", "outliers", "backend", "ms", "TOPS",
           "x_vs_float", "x_vs_int_mm")


def vit_gemms(d: int) -> list[tuple[str, int, int]]:
    """(name, K, N) of the four linear layers of a ViT block."""
    return [("qkv", d, 3 * d), ("proj", d, d), ("fc1", d, 4 * d), ("fc2", 4 * d, d)]


def _codes(rows, K, bits, device):
    if bits == 4:
        return torch.randint(0, 256, (rows, K // 2), dtype=torch.uint8, device=device)
    return torch.randint(-128, 128, (rows, K), dtype=torch.int8, device=device)


def qgemm_inputs(M, K, N, a_bits, w_bits, outlier_frac, device):
    """One random input set for qgemm (all positional args but the out dtype)."""
    a = _codes(M, K, a_bits, device)
    w = _codes(N, K, w_bits, device)
    a_scale = torch.rand(M, device=device) * 0.05 + 1e-3
    a_zero = torch.randint(-8, 8, (M,), dtype=torch.int32, device=device)
    a_rowsum = torch.randint(-1000, 1000, (M,), dtype=torch.int32, device=device)
    w_scale = torch.rand(N, device=device) * 0.01 + 1e-4
    w_zero = torch.randint(-4, 4, (N,), dtype=torch.int32, device=device)
    w_colsum = torch.randint(-1000, 1000, (N,), dtype=torch.int32, device=device)
    bias = torch.randn(N, device=device)
    C = math.ceil(outlier_frac * K)
    if C:
        idx = torch.randint(0, K, (M, C), device=device).sort(dim=1).values.to(torch.int32)
        val = (5 + 10 * torch.rand(M, C, device=device)) * torch.sign(torch.randn(M, C, device=device))
    else:
        idx = val = None
    return (a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias, idx, val, a_bits, w_bits)


def _bytes(t) -> int:
    return sum(x.numel() * x.element_size() for x in t if isinstance(x, torch.Tensor))


class Runner:
    def __init__(self, device: str, quick: bool):
        self.device = device
        self.quick = quick
        self.out_dtype = torch.float16 if device == "cuda" else torch.float32

    def time(self, fn, sets):
        if self.device == "cuda":
            warm, rep = (5, 20) if self.quick else (25, 100)
            return common.time_gpu(fn, sets, warmup_ms=warm, rep_ms=rep)
        return common.time_cpu(fn, sets, warmup=1, reps=3 if self.quick else 7)

    def sets(self, make, out_bytes):
        """Enough input sets (made by make()) to rotate through more than the L2 cache."""
        first = make()
        n = common.rotation_count(_bytes(first) + out_bytes, self.device)
        return [first] + [make() for _ in range(n - 1)]

    def baselines(self, M, K, N):
        dev = self.device
        fdt = torch.float16 if dev == "cuda" else torch.float32

        def make_float():
            return (torch.randn(M, K, device=dev, dtype=fdt), torch.randn(N, K, device=dev, dtype=fdt) * 0.05,
                    torch.randn(N, device=dev, dtype=fdt))

        def make_int():
            return (_codes(M, K, 8, dev), _codes(N, K, 8, dev), torch.rand(M, device=dev),
                    torch.rand(N, device=dev), torch.randn(N, device=dev))

        def int_mm_rescale(a, w, sa, sw, b):
            acc = torch._int_mm(a, w.t())
            return (acc.float() * sa[:, None] * sw[None, :] + b).to(self.out_dtype)

        t_float = self.time(F.linear, self.sets(make_float, M * N * 2))
        t_int = self.time(int_mm_rescale, self.sets(make_int, M * N * 4))
        return t_float, t_int

    def qgemm(self, backend, M, K, N, a_bits, w_bits, frac):
        sets = self.sets(lambda: qgemm_inputs(M, K, N, a_bits, w_bits, frac, self.device), M * N * 2)
        if backend == "cuda":
            op = torch.ops.vitq.qgemm_cuda
        else:  # triton on GPU, the C++ kernel on CPU: the public op dispatches by device
            vitq_kernels.ops.set_backend("triton")
            op = torch.ops.vitq.qgemm
        out_dtype = self.out_dtype
        return self.time(lambda *args: op(*args, out_dtype), sets)


def run(device: str, quick: bool, backends: list[str], models: list[str], batches: list[int],
        fracs: list[float], formats: list[str], gemms=("qkv", "proj", "fc1", "fc2"), log=print) -> list[dict]:
    runner = Runner(device, quick)
    rows = []
    for model in models:
        d = MODELS[model]
        for batch in batches:
            M = batch * TOKENS_PER_IMAGE
            for gemm, K, N in [g for g in vit_gemms(d) if g[0] in gemms]:
                flops = 2.0 * M * N * K
                base = dict(model=model, gemm=gemm, batch=batch, M=M, K=K, N=N)
                t_float, t_int = runner.baselines(M, K, N)
                float_name = "fp16 F.linear (cuBLAS)" if device == "cuda" else "fp32 F.linear"
                for name, t in ((float_name, t_float), ("int8 _int_mm + rescale", t_int)):
                    rows.append(dict(base, format="-", outliers="-", backend=name, ms=t,
                                     TOPS=flops / t / 1e9, x_vs_float=t_float / t, x_vs_int_mm=t_int / t))
                for fmt in formats:
                    a_bits, w_bits = FORMATS[fmt]
                    for frac in fracs:
                        for backend in backends:
                            row = dict(base, format=fmt, outliers=f"{100 * frac:g}%", backend=backend)
                            try:
                                t = runner.qgemm(backend, M, K, N, a_bits, w_bits, frac)
                                row.update(ms=t, TOPS=flops / t / 1e9, x_vs_float=t_float / t, x_vs_int_mm=t_int / t)
                            except Exception as e:  # a missing backend must not stop the table
                                row.update(ms=None, error=f"{type(e).__name__}: {e}"[:200])
                            rows.append(row)
                            log(common.markdown_table([row], COLUMNS).splitlines()[-1])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing (smoke / CI)")
    p.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results", "qgemm"),
                   help="prefix of the .json and .md result files")
    p.add_argument("--backends", default=None, help="comma list: triton,cuda (GPU) / cpu (CPU)")
    args = p.parse_args(argv)

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gemms = ("qkv", "proj", "fc1", "fc2")
    if device == "cuda":
        default_backends = ["triton"] + (["cuda"] if hasattr(torch.ops.vitq, "qgemm_cuda") else [])
        models, fracs, formats = list(MODELS), [0.0, 0.005, 0.02], list(FORMATS)
        batches = [1, 64, 256] if args.quick else [1, 8, 64, 256]
        if args.quick:
            fracs = [0.0, 0.02]
    else:
        # small shapes only: exact integer GEMMs on a few cores, and torch._int_mm is slow on CPU
        default_backends, models, formats = ["cpu"], ["vit_s"], ["W8A8", "W4A4"]
        batches, fracs = [1], [0.0, 0.02]
        if args.quick:
            gemms = ("proj", "fc2")
    backends = args.backends.split(",") if args.backends else default_backends
    env = common.environment(device)
    title = "qgemm benchmark" + (" (CPU timings: C++ CPU kernels, not GPU numbers)" if device == "cpu" else "")
    print(f"# {title}\n" + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    torch.manual_seed(0)
    rows = run(device, args.quick, backends, models, batches, fracs, formats, gemms)
    table = common.markdown_table(rows, COLUMNS)
    json_path, md_path = common.write_results(args.out, env, rows, table, title)
    print("\n" + table)
    print(f"\nwrote {json_path} and {md_path}")
    failed = [r for r in rows if r.get("error")]
    for r in failed:
        print(f"FAILED {r['backend']} {r['format']} {r['gemm']} M={r['M']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
