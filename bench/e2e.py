"""End-to-end deploy-model benchmark: fp16 eager, fp16 torch.compile, vitq W8A8 and W4A4.

Models have random weights of the real shapes (speed does not depend on the values); the
quantized ones are calibrated minimally (min/max, no reconstruction) and exported.
Columns: images/s, latency (median of triton.testing.do_bench on GPU, of repeated
perf_counter runs on CPU), peak memory.  Prints the device, versions and commit.

    python bench/e2e.py                      # GPU: DeiT-S, ViT-B, DINOv2-S at batch 1, 8, 64, 256
    python bench/e2e.py --cpu-small          # CPU: tiny sizes, exercises the code path
    python bench/e2e.py --out bench/results/e2e_<device>.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]

MODELS = {
    "deit_s": ("deit_small_patch16_224", {}, 224),
    "vit_b": ("vit_base_patch16_224", {}, 224),
    "dinov2_s": ("vit_small_patch14_dinov2", {}, 224),
}


def commit() -> str:
    try:
        return subprocess.check_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def time_ms(fn, device) -> float:
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1000 * sorted(ts)[len(ts) // 2]


def peak_mb(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def build(name, kw, img, bits, device, depth=None):
    import timm
    import vitq
    from vitq.export import export

    args = dict(kw, pretrained=False, img_size=img)
    if depth is not None:
        args["depth"] = depth
    fp = timm.create_model(name, **args).eval().to(device)
    if bits is None:
        return fp
    calib = torch.randn(4, 3, img, img, device=device)
    cfg = vitq.ADFQConfig(w_bits=bits, a_bits=bits, amo=False, progress=False, a_init="minmax", w_init="minmax",
                          device=device.type)
    return export(vitq.quantize(fp, cfg, calib)).to(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-small", action="store_true", help="tiny CPU run (2 blocks, 64 px, batch 1 and 4)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import triton
    import vitq_kernels

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_small else "cpu")
    depth, batches = None, [int(b) for b in args.batches.split(",")]
    if args.cpu_small:
        depth, batches = 2, [1, 4]
    head = (f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (timings are noisy)'}; "
            f"torch {torch.__version__}, triton {triton.__version__}, backend {vitq_kernels.get_backend()}; "
            f"commit {commit()}; {datetime.date.today()}\n"
            f"command: python bench/e2e.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(head)
    lines = [head, "", "| model | batch | variant | images/s | latency (ms) | ratio vs fp16 eager | peak MB |",
             "|---|---|---|---|---|---|---|"]
    for key in args.models.split(","):
        name, kw, size = MODELS[key]
        size = (56 if "patch14" in name else 64) if args.cpu_small else size
        variants = {}
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        fp = build(name, kw, size, None, device, depth).to(dtype)
        variants["fp16 eager" if device.type == "cuda" else "fp32 eager"] = (fp, dtype)
        if not args.no_compile and device.type == "cuda":
            variants["fp16 compile"] = (torch.compile(fp), dtype)
        variants["vitq W8A8"] = (build(name, kw, size, 8, device, depth), torch.float32)
        variants["vitq W4A4"] = (build(name, kw, size, 4, device, depth), torch.float32)
        for b in batches:
            base = None
            for vname, (model, dt) in variants.items():
                x = torch.randn(b, 3, size, size, device=device, dtype=dt)

                def run(model=model, x=x):
                    with torch.no_grad():
                        return model(x)
                ms = time_ms(run, device)
                base = base or ms
                row = (f"| {key} | {b} | {vname} | {1000 * b / ms:.1f} | {ms:.2f} | {base / ms:.2f}x | "
                       f"{peak_mb(run, device):.0f} |")
                print(row, flush=True)
                lines.append(row)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
