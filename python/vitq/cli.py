"""Command line: ``vitq quantize`` and ``vitq eval`` (also ``python -m vitq``).

    vitq quantize --model dinov2_small_fmnist --data fashion-mnist --w-bits 4 --a-bits 4 \\
                  --preset fast --out runs/w4a4
    vitq eval --quantized runs/w4a4 --data fashion-mnist --out runs/w4a4/eval.json

``--data``: ``fashion-mnist`` (calibrate on train, evaluate on test), ``foolbox-imagenet`` (the 20
ImageNet samples of the foolbox wheel: calibration and evaluation share them), or a folder path
(an ImageFolder; with ``train/`` and ``val/`` sub-folders those are used for calibration and
evaluation, otherwise disjoint random subsets of the one folder).
Each command writes a JSON report; ``quantize`` also saves the fake-quant model
(``model.safetensors`` + ``quant_config.json``, no pickle).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "dinov2_small_fmnist"
DATA_CHOICES = ("fashion-mnist", "foolbox-imagenet")


class CliError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------------
def build_model(name: str, checkpoint=None, img_size=None):
    from . import models
    kw = {} if img_size is None else {"img_size": img_size}
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise CliError(f"checkpoint not found: {checkpoint}")
    return models.create_model(name, checkpoint=checkpoint, **kw)


def build_data(spec: str, model, calib_images: int, eval_images: int | None, seed: int = 0):
    """(calibration images tensor, evaluation dataset, note)."""
    from torch.utils.data import Subset

    from . import data
    key = spec.lower().replace("_", "-")
    note = None
    if key == "fashion-mnist":
        train = data.fashion_mnist("train", model=model)
        calib, _ = data.calibration_batch(train, calib_images, seed)
        test = data.fashion_mnist("test", n=eval_images, model=model)
        return calib, test, note
    if key == "foolbox-imagenet":
        ds = data.foolbox_images("imagenet", model=model)
        n = min(calib_images, len(ds))
        calib, _ = data.calibration_batch(ds, n, seed)
        note = f"calibration and evaluation share the {len(ds)} foolbox images"
        return calib, _limit(ds, eval_images), note
    path = Path(spec)
    if not path.exists():
        raise CliError(f"data path not found: {spec} (use one of {', '.join(DATA_CHOICES)} or an image folder)")
    if (path / "train").is_dir() and (path / "val").is_dir():
        train, val = data.image_folder(path / "train", model=model), data.image_folder(path / "val", model=model)
        calib, _ = data.calibration_batch(train, min(calib_images, len(train)), seed)
        return calib, _limit(val, eval_images), note
    ds = data.image_folder(path, model=model)
    n = min(calib_images, max(1, len(ds) // 2))
    _, rest = data.calibration_split(ds, n, seed)
    calib, _ = data.calibration_batch(ds, n, seed)
    note = f"calibration uses {n} images of {path}; evaluation the other {len(rest)}"
    return calib, _limit(rest if len(rest) else Subset(ds, list(range(len(ds)))), eval_images), note


def _limit(ds, n):
    from torch.utils.data import Subset
    if n is None or n >= len(ds):
        return ds
    return Subset(ds, list(range(n)))


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def _config_from_args(args):
    from .config import ADFQConfig
    kw = dict(w_bits=args.w_bits, a_bits=args.a_bits, poq=not args.no_poq, slq=not args.no_slq,
              amo=not args.no_amo, preset=args.preset, recon=args.recon, seed=args.seed,
              progress=not args.quiet, device=args.device)
    for name in ("iters", "calib_images", "batch_size"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    # a modifier without its switch would be silently ignored: refuse it instead
    for modifier, switch in (("dhe_weight", "dhe"), ("bit_decline_share", "bit_decline"),
                             ("bit_decline_iters", "bit_decline")):
        if getattr(args, modifier) is not None and not getattr(args, switch):
            raise CliError(f"--{modifier.replace('_', '-')} needs --{switch.replace('_', '-')}")
    if args.dhe:
        kw.update(dhe=True)
        if args.dhe_weight is not None:
            kw["dhe_weight"] = args.dhe_weight
    if args.bit_decline:
        kw["bit_decline"] = _parse_widths(args.bit_decline)
        if args.bit_decline_share is not None:
            kw["bit_decline_share"] = args.bit_decline_share
        if args.bit_decline_iters is not None:
            kw["bit_decline_iters"] = args.bit_decline_iters
    if args.softmax_quant is not None:
        kw["softmax_quant"] = args.softmax_quant
    if args.baseline:
        return ADFQConfig.baseline(**kw)
    return ADFQConfig(**kw)


def _parse_widths(text: str):
    try:
        return tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise CliError(f"--bit-decline takes comma-separated widths such as 8,6,4, got {text!r}") from None


def _arpr_report(args, qmodel, evalset, batch_size):
    """ARPR (docs/dhe.md) on the first --metric-images evaluation images, unless --no-arpr."""
    if args.no_arpr:
        return None
    from . import api, metrics
    n = min(args.metric_images, len(evalset)) if hasattr(evalset, "__len__") else args.metric_images
    images = api.collect_images(evalset, n)
    dev = next(qmodel.parameters()).device
    out = metrics.attention_ranking(qmodel, images, batch_size=min(batch_size, 16), device=dev)
    out["split"] = "evaluation"
    return out


def _versions():
    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import timm
        out["timm"] = timm.__version__
    except ImportError:
        pass
    return out


def _write_report(report: dict, out):
    from .api import _jsonable
    path = Path(out)
    if path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "report.json"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(report), indent=2))
    return path


def cmd_quantize(args) -> dict:
    import torch

    from . import api, metrics
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _config_from_args(args)
    t0 = time.perf_counter()
    fp = build_model(args.model, args.checkpoint, args.img_size)
    draw_seed = args.seed if args.calib_seed is None else args.calib_seed
    calib, evalset, note = build_data(args.data, fp, cfg.resolved("calib_images"), args.eval_images, draw_seed)
    qmodel = api.quantize(fp, cfg, calib)
    dev = next(qmodel.parameters()).device
    fp.to(dev)
    res = api.evaluate(qmodel, evalset, fp_model=fp, batch_size=cfg.eval_batch_size, progress=cfg.progress)
    report = {"command": " ".join(["vitq"] + sys.argv[1:]) if args.argv is None else " ".join(["vitq"] + args.argv),
              "model": args.model, "checkpoint": args.checkpoint, "img_size": args.img_size, "data": args.data,
              "note": note, "eval": res, "quantize": qmodel.vitq_report, "versions": _versions(),
              "method": {"dhe": cfg.dhe, "dhe_weight": cfg.dhe_weight if cfg.dhe else None,
                         "bit_decline": list(cfg.bit_decline) if cfg.bit_decline else None,
                         "bit_decline_share": cfg.bit_decline_share if cfg.bit_decline else None,
                         "bit_decline_iters": cfg.bit_decline_iters if cfg.bit_decline else None}}
    report["attention_ranking"] = _arpr_report(args, qmodel, evalset, cfg.eval_batch_size)
    if args.metrics:
        report["metrics"] = metrics.layer_report(qmodel, calib[:args.metric_images].to(dev))
    report["seconds"] = time.perf_counter() - t0
    if args.out:
        api.save_quantized(qmodel, args.out, model_name=args.model,
                           extra={"checkpoint": args.checkpoint, "img_size": args.img_size})
        report["report_path"] = str(_write_report(report, args.out))
    _print_summary(report)
    return report


def cmd_eval(args) -> dict:
    import torch

    from . import api, metrics
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model_name, checkpoint, img_size = args.model, args.checkpoint, args.img_size
    meta = None
    if args.quantized:
        qdir = Path(args.quantized)
        if not (qdir / "quant_config.json").is_file():
            raise CliError(f"{qdir} holds no quant_config.json (write one with `vitq quantize --out`)")
        meta = json.loads((qdir / "quant_config.json").read_text())
        model_name = meta.get("model_name") or model_name
        checkpoint = meta.get("checkpoint", checkpoint)
        img_size = meta.get("img_size", img_size)
    fp = build_model(model_name, checkpoint, img_size)
    calib, evalset, note = build_data(args.data, fp, args.metric_images if args.metrics else 1, args.eval_images)
    report = {"command": " ".join(["vitq"] + (args.argv if args.argv is not None else sys.argv[1:])),
              "model": model_name, "data": args.data, "note": note, "versions": _versions()}
    if meta is None:
        report["eval"] = api.evaluate(fp, evalset, progress=not args.quiet)
    else:
        qmodel = api.load_quantized(args.quantized, build_model(model_name, checkpoint, img_size))
        report["eval"] = api.evaluate(qmodel, evalset, fp_model=fp, progress=not args.quiet)
        report["quantized"] = str(args.quantized)
        report["attention_ranking"] = _arpr_report(args, qmodel, evalset, 16)
        if args.metrics:
            report["metrics"] = metrics.layer_report(qmodel, calib)
    report["seconds"] = time.perf_counter() - t0
    if args.out:
        report["report_path"] = str(_write_report(report, args.out))
    _print_summary(report)
    return report


def _print_summary(report: dict):
    ev = report.get("eval", {})
    parts = [f"n={ev.get('n')}"]
    for key in ("fp_top1", "top1", "agreement"):
        if ev.get(key) is not None:
            parts.append(f"{key}={ev[key]:.2f}%")
    ar = report.get("attention_ranking")
    if ar:
        parts.append(f"arpr={100 * ar['arpr']:.2f}%")
    m = report.get("metrics")
    if m:
        parts.append(f"mean_layer_sqnr={m['mean_layer_sqnr']:.2f}dB attention_kl={m['mean_attention_kl']:.4g} "
                     f"calib_arpr={100 * m['arpr']:.2f}%")
    print("vitq: " + " ".join(parts) + (f"  (report: {report['report_path']})" if "report_path" in report else ""))


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------
def _common(p):
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"timm model name or an offline model (dinov2_small, dinov2_small_fmnist); default {DEFAULT_MODEL}")
    p.add_argument("--checkpoint", default=None, help="state dict (.safetensors/.pth) for a timm model name")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--data", default="fashion-mnist",
                   help=f"{' | '.join(DATA_CHOICES)} | a folder path (default fashion-mnist)")
    p.add_argument("--eval-images", type=int, default=None, help="evaluate on the first N images")
    p.add_argument("--metrics", action="store_true", help="also per-layer SQNR, attention KL and ARPR")
    p.add_argument("--metric-images", type=int, default=32,
                   help="images for --metrics and for ARPR (default 32)")
    p.add_argument("--no-arpr", action="store_true",
                   help="skip the attention ranking preservation rate (reported by default for quantized models)")
    p.add_argument("--out", default=None, help="output folder (or .json file for the report)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitq", description="ADFQ-ViT post-training quantization of ViTs")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="calibrate a fake-quant model, evaluate it, save it")
    _common(q)
    q.add_argument("--w-bits", type=int, default=4)
    q.add_argument("--a-bits", type=int, default=4)
    q.add_argument("--preset", default="fast", choices=("fast", "paper"))
    q.add_argument("--no-poq", action="store_true", help="per-tensor uniform on the qkv/fc1 inputs")
    q.add_argument("--no-slq", action="store_true", help="per-tensor uniform on the fc2 input")
    q.add_argument("--no-amo", action="store_true", help="no reconstruction")
    q.add_argument("--recon", default="module", choices=("module", "block"),
                   help="module: AMO (paper); block: BRECQ-style block-wise baseline")
    q.add_argument("--baseline", action="store_true", help="plain per-tensor min/max PTQ (ignores the switches)")
    q.add_argument("--iters", type=int, default=None, help="reconstruction iterations per unit (default: preset)")
    q.add_argument("--calib-images", type=int, default=None, help="calibration images (default: preset)")
    q.add_argument("--batch-size", type=int, default=None, help="reconstruction batch (default: preset)")
    q.add_argument("--dhe", action="store_true",
                   help="DHE: add the attention ranking loss to AMO's MHA loss (docs/dhe.md)")
    q.add_argument("--dhe-weight", type=float, default=None,
                   help="weight of the DHE ranking loss (with --dhe; default 1.0)")
    q.add_argument("--bit-decline", default=None, metavar="WIDTHS",
                   help="TP-ViT progressive bit decline, e.g. 8,6,4 (ending at min(w-bits, a-bits)); docs/tp_vit.md")
    q.add_argument("--bit-decline-share", type=float, default=None, metavar="S",
                   help="share of each unit's iterations spent on the bit-decline transitions; the rest "
                        "train at the target width (with --bit-decline; default 1.0)")
    q.add_argument("--bit-decline-iters", type=int, default=None, metavar="N",
                   help="iterations of each bit-decline transition, run before the unit's --iters at the "
                        "target width (with --bit-decline; default: the transitions share --iters)")
    q.add_argument("--softmax-quant", default=None, choices=("log2", "uniform", "tul2"),
                   help="post-softmax quantizer: log2 (ADFQ-ViT, default), tul2 (TP-ViT truncated "
                        "uniform-log2, docs/tp_vit.md), uniform")
    q.add_argument("--seed", type=int, default=0, help="ADFQConfig.seed, and the calibration draw's")
    q.add_argument("--calib-seed", type=int, default=None,
                   help="seed of the calibration draw alone (default: --seed)")
    q.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    q.set_defaults(func=cmd_quantize)
    e = sub.add_parser("eval", help="evaluate an fp model, or a saved fake-quant model against its fp model")
    _common(e)
    e.add_argument("--quantized", default=None, help="folder written by `vitq quantize --out`")
    e.set_defaults(func=cmd_eval)
    d = sub.add_parser("demo", help="the main job: DINOv2-S + Fashion-MNIST probe, W4A4, export, run, table, plot")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--n-test", type=int, default=300)
    d.add_argument("--preset", default=None, choices=("fast", "paper"), help="default: paper on GPU, fast on CPU")
    d.add_argument("--device", default=None)
    d.add_argument("--n-calib", type=int, default=64, help="calibration images (the paper preset uses 1024)")
    d.add_argument("--iters", type=int, default=None, help="reconstruction iterations per module (default: preset)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)
    x = sub.add_parser("export", help="turn a saved fake-quant model into a deploy artifact on torch.ops.vitq")
    x.add_argument("--quantized", required=True, help="folder written by `vitq quantize --out`")
    x.add_argument("--model", default="dinov2_small_fmnist")
    x.add_argument("--checkpoint", default=None)
    x.add_argument("--out", required=True)
    x.set_defaults(func=cmd_export)
    r = sub.add_parser("run", help="inference with a deploy artifact over an image folder or the bundled images")
    r.add_argument("--artifact", required=True)
    r.add_argument("--data", default="fashion-mnist", help="fashion-mnist | foolbox-imagenet | a folder path")
    r.add_argument("--n", type=int, default=16)
    r.add_argument("--device", default=None)
    r.set_defaults(func=cmd_run)
    b = sub.add_parser("bench", help="latency / throughput / peak memory of a deploy artifact vs the fp model")
    b.add_argument("--artifact", required=True)
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--device", default=None)
    b.set_defaults(func=cmd_bench)
    return parser


def cmd_demo(args) -> dict:
    from .demo import run_demo
    return run_demo(args.out, n_test=args.n_test, n_calib=args.n_calib, preset=args.preset, device=args.device,
                    progress=not args.quiet, iters=args.iters)


def cmd_export(args) -> dict:
    from .api import load_quantized
    from .export import export, save, skeleton_of
    fp = build_model(args.model, args.checkpoint)
    qm = load_quantized(args.quantized, fp)
    timm_name = None if args.model.startswith("dinov2_small") else args.model
    path = save(export(qm), args.out, skeleton_of(fp, timm_name=timm_name), {"source": str(args.quantized)})
    print(f"wrote deploy artifact {path}")
    return {"artifact": str(path)}


def _artifact_and_data(args):
    import torch
    from .export import load
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load(args.artifact, device=dev)
    return model, dev


def cmd_run(args) -> dict:
    import torch
    from . import data
    model, dev = _artifact_and_data(args)
    key = args.data.lower().replace("_", "-")
    if key == "fashion-mnist":
        ds = data.fashion_mnist("test", n=args.n, model=model)
    elif key.startswith("foolbox-"):
        ds = data.foolbox_images(key.split("-", 1)[1], model=model)
    else:
        ds = data.image_folder(args.data, model=model)
    classes = getattr(ds, "classes", None)
    rows = []
    with torch.no_grad():
        for i in range(min(args.n, len(ds))):
            img, label = ds[i]
            pred = int(model(img[None].to(dev)).argmax(-1))
            name = classes[pred] if classes and pred < len(classes) else str(pred)
            rows.append((i, pred, int(label)))
            print(f"image {i}: predicted {name} (class {pred}), label {label}")
    acc = 100.0 * sum(p == y for _, p, y in rows) / max(1, len(rows))
    print(f"top-1 on {len(rows)} images: {acc:.1f}% (torch.ops.vitq kernels on {dev})")
    return {"top1": acc, "n": len(rows)}


def cmd_bench(args) -> dict:
    import time
    import torch
    from .export import build_skeleton
    model, dev = _artifact_and_data(args)
    import json
    from pathlib import Path
    cfg = json.loads((Path(args.artifact) / "config.json").read_text())
    fp = build_skeleton(cfg["skeleton"]).eval().to(dev)
    size = fp.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    x = torch.randn(args.batch, 3, size, size, device=dev)
    out = {}
    for name, m, xx in (("fp16" if dev == "cuda" else "fp32", fp.half() if dev == "cuda" else fp,
                         x.half() if dev == "cuda" else x), ("vitq", model, x)):
        with torch.no_grad():
            m(xx)
            if dev == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                m(xx)
                if dev == "cuda":
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
        ms = 1000 * sorted(ts)[2]
        peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else float("nan")
        out[name] = {"latency_ms": ms, "images_per_s": 1000 * args.batch / ms, "peak_mb": peak}
        print(f"{name}: {ms:.1f} ms / batch {args.batch}, {1000 * args.batch / ms:.1f} img/s, peak {peak:.0f} MB")
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    try:
        args.func(args)
    except (CliError, ValueError, FileNotFoundError, TypeError, RuntimeError, NotImplementedError) as err:
        msg = str(err).strip() or type(err).__name__
        print(f"vitq {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
