"""Benchmark of the fused activation producers/consumers of a ViT block (issue 3A).

1. LayerNorm -> quantize: vitq layernorm_quantize (one pass: x in, codes + per-row
   scale/zero/rowsum [+ outlier list] out) against a plain fp16 F.layer_norm, and against
   F.layer_norm followed by a separate per_token_quantize.  Reported with the bytes each
   variant must move and the bandwidth that implies (roofline: a device-to-device copy of
   x measured in the same run).  Target on H100: fused <= 1.3x the plain LayerNorm.
2. MLP pair: qgemm_gelu_shiftlog2 (fc1 + GELU + Shift-Log2 codes) then shiftlog2_qgemm
   (fc2 decode GEMM) against fp16 F.linear -> F.gelu -> F.linear.  Target on H100: >= 1.4x
   at batch >= 64.

Shapes: ViT-S (d=384) and ViT-B (d=768) at 197 tokens, DINOv2-S/14 (d=384) at 257 tokens
(224 px), batch 1, 8, 64, 256; MLP ratio 4.  GPU timings: do_bench medians over rotating
input sets larger than L2 (bench/common.py).  Without a GPU the script times the C++ CPU
kernels at small sizes (batch 1, 8) against fp32 torch, labelled as CPU timings.

    python bench/bench_activation_ops.py [--quick] [--device cpu|cuda] [--out bench/results/activation_ops]
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
from vitq_kernels import reference as R  # noqa: E402

MODELS = {"vit_s": (384, 197), "vit_b": (768, 197), "dinov2_s": (384, 257)}   # d, tokens per image
LN_COLUMNS = ("model", "batch", "M", "K", "variant", "ms", "MB_moved", "GB_s", "x_roofline", "x_vs_layernorm")
MLP_COLUMNS = ("model", "batch", "M", "d", "variant", "ms", "TOPS", "x_vs_dense")
SHIFT = R.GELU_MIN - 1e-4


def _ln_sets(M, K, dtype, device, n):
    w = 1 + 0.1 * torch.randn(K, device=device)
    b = 0.1 * torch.randn(K, device=device)
    return [(torch.randn(M, K, device=device).to(dtype), w.to(dtype), b.to(dtype)) for _ in range(n)]


def bench_layernorm(model, batch, device, timer):
    d, tokens = MODELS[model]
    M, K = batch * tokens, d
    act = torch.float16 if device == "cuda" else torch.float32
    el = torch.tensor([], dtype=act).element_size()
    n = common.rotation_count(M * K * el * 2, device)
    sets = _ln_sets(M, K, act, device, n)
    cap = max(1, K // 100)
    op = torch.ops.vitq
    variants = {
        "F.layer_norm": (lambda x, w, b: F.layer_norm(x, (K,), w, b, 1e-6), M * K * 2 * el),
        "F.layer_norm + per_token_quantize int8": (
            lambda x, w, b: op.per_token_quantize(F.layer_norm(x, (K,), w, b, 1e-6), 8, None, None, None, 0),
            M * K * (4 * el + 1)),
        "layernorm_quantize int8": (lambda x, w, b: op.layernorm_quantize(x, w, b, 1e-6, 8, None, None, None, 0),
                                    M * K * (el + 1)),
        "layernorm_quantize int4": (lambda x, w, b: op.layernorm_quantize(x, w, b, 1e-6, 4, None, None, None, 0),
                                    M * K * el + M * K // 2),
        "layernorm_quantize int4 + outliers(a=5, C=1%K)": (
            lambda x, w, b: op.layernorm_quantize(x, w, b, 1e-6, 4, None, None, 5.0, cap),
            M * K * el + M * K // 2 + M * cap * 8),
    }
    copy_ms = timer(lambda x, w, b: x.clone(), sets)
    copy_gbs = 2 * M * K * el / copy_ms / 1e6
    rows, base = [], None
    for name, (fn, nbytes) in variants.items():
        nbytes += 12 * M + 2 * K * el    # per-row outputs and the LayerNorm parameters
        ms = timer(fn, sets)
        base = ms if base is None else base
        gbs = nbytes / ms / 1e6
        rows.append(dict(model=model, batch=batch, M=M, K=K, variant=name, ms=ms, MB_moved=nbytes / 1e6, GB_s=gbs,
                         x_roofline=gbs / copy_gbs, x_vs_layernorm=ms / base))
    return rows


def _mlp_sets(M, d, device, n, a_bits, w1_bits, w2_bits, code_bits):
    """fp16 operands for the baseline and vitq codes for the quantized pair, same shapes."""
    sets = []
    for _ in range(n):
        x = torch.randn(M, d, device=device)
        w1, w2 = torch.randn(4 * d, d, device=device) / d ** 0.5, torch.randn(d, 4 * d, device=device) / (2 * d ** 0.5)
        b1, b2 = torch.randn(4 * d, device=device), torch.randn(d, device=device)
        a = torch.ops.vitq.per_token_quantize(x, a_bits, None, None, None, 0)
        q1 = R.quantize_weight_per_channel(w1.cpu(), w1_bits)
        q2 = R.quantize_weight_per_channel(w2.cpu(), w2_bits)
        pk = lambda c, bits: (R.pack_int4(c) if bits == 4 else c).to(device)   # noqa: E731
        fc1 = (a[0], a[1], a[2], a[3], pk(q1[0], w1_bits), q1[1].to(device), None,
               R.weight_colsum(q1[0]).to(device), b1, None, None, a_bits, w1_bits, SHIFT, 4.0, code_bits, 0)
        b2f = R.fold_shift_into_bias(b2.cpu(), SHIFT, q2[0], q2[1], None).to(device)
        fc2 = (pk(q2[0], w2_bits), q2[1].to(device), None, b2f, w2_bits)
        act = torch.float16 if device == "cuda" else torch.float32
        sets.append(((x.to(act), w1.to(act), b1.to(act), w2.to(act), b2.to(act)), fc1, fc2,
                     torch.full((1,), 4.0, device=device)))
    return sets


def bench_mlp(model, batch, device, timer, formats):
    d, tokens = MODELS[model]
    M = batch * tokens
    n = common.rotation_count(M * d * 2 + 8 * d * d * 2 + M * 4 * d * 2, device)
    rows = []
    ops = 2 * 2 * M * d * 4 * d

    def fp(dense, fc1, fc2, s):
        x, w1, b1, w2, b2 = dense
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    out_dtype = torch.float16 if device == "cuda" else torch.float32
    for fmt, (a_bits, w1_bits, w2_bits, code_bits) in formats.items():
        sets = _mlp_sets(M, d, device, n, a_bits, w1_bits, w2_bits, code_bits)
        if not rows:
            base = timer(fp, sets)
            rows.append(dict(model=model, batch=batch, M=M, d=d, variant=f"{out_dtype} linear-gelu-linear",
                             ms=base, TOPS=ops / base / 1e9, x_vs_dense=1.0))

        def pair(dense, fc1, fc2, s, code_bits=code_bits):
            codes = torch.ops.vitq.qgemm_gelu_shiftlog2(*fc1)
            return torch.ops.vitq.shiftlog2_qgemm(codes, code_bits, 0, s, fc2[0], fc2[1], fc2[2], fc2[3], fc2[4],
                                                  out_dtype)

        ms = timer(pair, sets)
        rows.append(dict(model=model, batch=batch, M=M, d=d, variant=f"vitq fc1+GELU+SLQ{code_bits} -> fc2 ({fmt})",
                         ms=ms, TOPS=ops / ms / 1e9, x_vs_dense=base / ms))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results", "activation_ops"))
    args = p.parse_args(argv)
    device = args.device
    if device == "cuda":
        timer = lambda fn, sets: common.time_gpu(fn, sets)   # noqa: E731
        batches = [1, 8, 64] if args.quick else [1, 8, 64, 256]
        models = list(MODELS)
        formats = {"A8 W8, W8": (8, 8, 8, 4), "A4 W4, W4": (4, 4, 4, 4)}
    else:
        timer = lambda fn, sets: common.time_cpu(fn, sets, reps=3)   # noqa: E731
        batches = [1] if args.quick else [1, 8]
        models = ["vit_s"] if args.quick else ["vit_s", "dinov2_s"]
        formats = {"A8 W8, W8": (8, 8, 8, 4)}
    env = common.environment(device)
    ln_rows, mlp_rows = [], []
    for model in models:
        for batch in batches:
            ln_rows += bench_layernorm(model, batch, device, timer)
            mlp_rows += bench_mlp(model, batch, device, timer, formats)
    label = "" if device == "cuda" else " (CPU timings: C++ kernels vs fp32 torch)"
    table = ("## LayerNorm -> quantize" + label + "\n\n" + common.markdown_table(ln_rows, LN_COLUMNS) +
             "\n\n## fc1 + GELU + Shift-Log2 -> fc2" + label + "\n\n" + common.markdown_table(mlp_rows, MLP_COLUMNS))
    print(table)
    paths = common.write_results(args.out + ("" if device == "cuda" else "_cpu"), env, ln_rows + mlp_rows, table,
                                 "vitq activation ops")
    print("wrote", *paths)


if __name__ == "__main__":
    main()
