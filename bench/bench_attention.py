"""Benchmark of vitq log2_attention (int8 q/k/v codes, log2-coded P, one fused kernel).

GPU: against ``F.scaled_dot_product_attention`` on fp16 q/k/v [B, H, N, D] (the fp16
baseline; the SDPA backend is whatever PyTorch picks), and against SDPA followed by the
transpose + reshape to [B, N, H*D] that timm does before proj (log2_attention writes that
layout directly).  Shapes: ViT-S (6 heads) and ViT-B (12 heads) at 197 tokens, DINOv2-S/14
at 257 tokens (224 px), head dim 64; batch 1, 8, 64, 256; plus a SAM-style global
attention row (4096 tokens, 12 heads, batch 1) on the two-pass kernel.  Timings are
``triton.testing.do_bench`` medians over rotating input sets larger than L2
(bench/common.py).  Reported: median ms, speedup = SDPA time / log2_attention time (> 1
means log2_attention is faster).  Target on H100: >= 1.0x SDPA fp16 at 197 tokens, batch >= 64.

CPU (no GPU): tiny sizes, the C++ CPU kernel against fp32 SDPA, median wall-clock ms,
labelled CPU timings.

    python bench/bench_attention.py [--quick] [--device cpu|cuda] [--out bench/results/attention]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
import vitq_kernels  # noqa: E402,F401  (registers torch.ops.vitq)

MODELS = {"vit_s": (6, 197), "vit_b": (12, 197), "dinov2_s": (6, 257), "sam_b_global": (12, 4096)}
HEAD_DIM = 64
COLUMNS = ("model", "batch", "H", "N", "variant", "ms", "x_vs_sdpa", "x_vs_sdpa_transpose")


def attention_inputs(B, H, N, D, device):
    """One random input set: int8 codes with per-tensor scales/zeros, and the fp16 q/k/v they decode to."""
    codes = [torch.randint(-128, 128, (B, H, N, D), dtype=torch.int8, device=device) for _ in range(3)]
    scales = [torch.full((1,), s, device=device) for s in (0.02, 0.02, 0.01)]
    zeros = [torch.randint(-8, 8, (1,), dtype=torch.int32, device=device) for _ in range(3)]
    act = torch.float16 if device == "cuda" else torch.float32
    floats = [(s * (c.float() - z)).to(act) for c, s, z in zip(codes, scales, zeros)]
    qargs = (codes[0], codes[1], codes[2], scales[0], zeros[0], scales[1], zeros[1], scales[2], zeros[2])
    return qargs, tuple(floats)


def bench_shape(model, batch, device, quick):
    H, N = MODELS[model]
    D = HEAD_DIM
    act_bytes = 2 if device == "cuda" else 4
    n_sets = common.rotation_count(batch * H * N * D * (3 + 3 * act_bytes), device)
    sets = [attention_inputs(batch, H, N, D, device) for _ in range(n_sets)]
    out_dtype = torch.float16 if device == "cuda" else torch.float32
    sm = D ** -0.5

    def log2_attn(qargs, floats):
        return torch.ops.vitq.log2_attention(*qargs, sm, None, 4, 0, None, None, 8, out_dtype)

    def sdpa(qargs, floats):
        return F.scaled_dot_product_attention(*floats)

    def sdpa_transpose(qargs, floats):
        return F.scaled_dot_product_attention(*floats).transpose(1, 2).reshape(batch, N, H * D)

    if device == "cuda":
        warm, rep = (10, 30) if quick else (25, 100)
        timer = lambda fn: common.time_gpu(fn, sets, warmup_ms=warm, rep_ms=rep)  # noqa: E731
    else:
        timer = lambda fn: common.time_cpu(fn, sets, warmup=1, reps=3 if quick else 7)  # noqa: E731
    t_sdpa = timer(sdpa)
    t_sdpa_t = timer(sdpa_transpose)
    rows = [dict(model=model, batch=batch, H=H, N=N, variant="sdpa fp16" if device == "cuda" else "sdpa fp32",
                 ms=t_sdpa),
            dict(model=model, batch=batch, H=H, N=N, variant="sdpa + transpose", ms=t_sdpa_t)]
    try:
        t = timer(log2_attn)
        rows.append(dict(model=model, batch=batch, H=H, N=N, variant="log2_attention W8 P4", ms=t,
                         x_vs_sdpa=t_sdpa / t, x_vs_sdpa_transpose=t_sdpa_t / t))
    except Exception as exc:  # report, keep benchmarking the other shapes
        rows.append(dict(model=model, batch=batch, H=H, N=N, variant="log2_attention W8 P4", error=repr(exc)))
    return rows


def run(device, batches, models, quick, log=print):
    rows = []
    for model in models:
        for batch in (batches if model != "sam_b_global" else [1]):
            for row in bench_shape(model, batch, device, quick):
                rows.append(row)
                log(common.markdown_table([row], COLUMNS).splitlines()[-1])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    p.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results", "attention"),
                   help="output prefix for .json and .md")
    args = p.parse_args(argv)
    device = args.device
    if device == "cuda":
        batches = [1, 64] if args.quick else [1, 8, 64, 256]
        models = ["vit_s", "vit_b"] if args.quick else list(MODELS)
        title = "log2_attention vs SDPA fp16 (GPU)"
    else:
        batches = [1] if args.quick else [1, 2]
        models = ["vit_s"] if args.quick else ["vit_s", "dinov2_s"]
        title = "log2_attention vs SDPA fp32 (CPU timings, tiny sizes)"
    env = common.environment(device)
    print(f"# {title}\n" + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    print("| " + " | ".join(COLUMNS) + " |")
    rows = run(device, batches, models, args.quick)
    table = common.markdown_table(rows, COLUMNS)
    json_path, md_path = common.write_results(args.out, env, rows, table, title)
    print("\n" + table)
    print(f"\nwrote {json_path} and {md_path}")
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"FAILED {r['model']} batch={r['batch']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
