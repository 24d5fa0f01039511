"""`vitq demo`: the main job on the embedded default.

1. DINOv2-S/14 (real weights) + the committed Fashion-MNIST linear probe, at 112 px.
2. ADFQ-ViT W4A4 calibration, the full method (`fast` preset on CPU, `paper` on GPU).
3. Export to the kernels and run the deploy model.
4. A table: fp / fake-quant / real-kernel accuracy, agreement, size, latency.
5. A plot: per-layer SQNR and the activation histograms that motivate POQ and SLQ.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .api import iter_batches, predictions, quantize, top1
from .config import ADFQConfig
from .data import calibration_batch, fashion_mnist
from .export import export, save, size_report, skeleton_of
from .metrics import layer_report
from .models import load_default_model


def _latency_ms(model, x, reps: int = 3) -> float:
    with torch.no_grad():
        model(x)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
    return 1000 * sorted(ts)[len(ts) // 2]


def _histograms(fp_model, images, path: Path, sqnr: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = fp_model.backbone.blocks
    grabbed = {}
    hooks = [blocks[0].norm1.register_forward_hook(lambda m, i, o: grabbed.__setitem__("ln", o.detach())),
             blocks[0].mlp.act.register_forward_hook(lambda m, i, o: grabbed.__setitem__("gelu", o.detach()))]
    with torch.no_grad():
        fp_model(images[:8])
    for h in hooks:
        h.remove()
    fig, ax = plt.subplots(1, 3, figsize=(16, 4))
    names = list(sqnr)
    ax[0].bar(range(len(names)), [sqnr[n] for n in names])
    ax[0].set_title("per-layer SQNR (dB), W4A4 fake-quant vs fp")
    ax[0].set_xlabel("quantized layer (model order)")
    ln = grabbed["ln"].flatten().float()
    ax[1].hist(ln.numpy(), bins=200, log=True)
    ax[1].set_title(f"post-LayerNorm (block 0 qkv input): {100 * float((ln.abs() > 5).float().mean()):.2f}% |x|>5")
    g = grabbed["gelu"].flatten().float()
    ax[2].hist(g.numpy(), bins=200, log=True)
    ax[2].set_title(f"post-GELU (block 0 fc2 input): min {float(g.min()):.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(out_dir="out/demo", n_test: int = 300, n_calib: int = 64, preset: str | None = None,
             device: str | None = None, progress: bool = True, iters: int | None = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = preset or ("paper" if dev.type == "cuda" else "fast")
    print(f"[1/5] DINOv2-S/14 + Fashion-MNIST probe (112 px) on {dev}")
    fp = load_default_model(112).to(dev)
    # the same draw as `vitq quantize` and bench/accuracy.py (seed 0 over the whole train split),
    # so the demo's figure is the bench's W4A4 row and not a different calibration set
    calib, _ = calibration_batch(fashion_mnist("train", model=fp), n_calib if preset != "paper" else 1024, seed=0)
    test = fashion_mnist("test", n=n_test, model=fp)
    print(f"[2/5] ADFQ-ViT W4A4 calibration, preset {preset!r}, {calib.shape[0]} images")
    t0 = time.perf_counter()
    cfg = ADFQConfig(w_bits=4, a_bits=4, preset=preset, progress=progress, device=dev.type, iters=iters)
    qm = quantize(fp, cfg, calib)
    t_cal = time.perf_counter() - t0
    print("[3/5] export to torch.ops.vitq")
    dep = export(qm).to(dev)
    art = save(dep, out / "artifact", skeleton_of(fp), {"method": "ADFQ-ViT", "w_bits": 4, "a_bits": 4,
                                                         "preset": preset})
    from vitq_kernels import get_backend
    kernels = "C++ CPU kernels" if dev.type == "cpu" else f"{get_backend()} CUDA kernels"
    print(f"[4/5] evaluating on {len(test)} Fashion-MNIST test images ({kernels})")
    with torch.no_grad():
        preds = predictions({"fp": fp, "fq": qm, "dep": dep}, test, progress=progress,
                            desc="evaluating fp / fake-quant / kernels")
        acc = {k: top1(v, preds["label"]) for k, v in preds.items() if k != "label"}
        agree = {k: top1(preds[k], preds["fp"]) for k in ("fq", "dep")}
        r_fq = {"fp_top1": acc["fp"], "top1": acc["fq"], "agreement": agree["fq"]}
        r_dep = {"top1": acc["dep"], "agreement": agree["dep"]}
        agree_dep_fq = top1(preds["dep"], preds["fq"])
        xb = next(iter_batches(test, 32))[0].to(dev)
        feats = (fp.features(xb), qm.features(xb), dep.features(xb))
    cos = torch.nn.functional.cosine_similarity(feats[1].flatten(1), feats[2].flatten(1)).min().item()
    sizes = size_report(dep, fp)
    lat = {"fp32": _latency_ms(fp, xb), "fake-quant": _latency_ms(qm, xb), "vitq kernels": _latency_ms(dep, xb)}
    rep = layer_report(qm, calib[:16].to(dev))
    print("[5/5] plot")
    _histograms(fp, calib.to(dev), out / "demo.png", rep["layers"])
    rows = [("fp32", r_fq["fp_top1"], 100.0, sizes["model_bytes_fp16"] * 2, lat["fp32"]),
            ("fake-quant W4A4", r_fq["top1"], r_fq["agreement"], None, lat["fake-quant"]),
            ("vitq kernels W4A4", r_dep["top1"], r_dep["agreement"], sizes["model_bytes"], lat["vitq kernels"])]
    lines = ["| model | top-1 (%) | agreement with fp (%) | size (MB) | latency, batch 32 (ms) |",
             "|---|---|---|---|---|"]
    for name, acc, agr, size, ms in rows:
        lines.append(f"| {name} | {acc:.2f} | {agr:.2f} | {'-' if size is None else f'{size / 1e6:.1f}'} | {ms:.0f} |")
    table = "\n".join(lines)
    summary = {
        "device": str(dev), "kernels": kernels, "preset": preset, "calibration_s": round(t_cal, 1),
        "n_test": len(test), "fp_top1": r_fq["fp_top1"], "fakequant_top1": r_fq["top1"],
        "kernel_top1": r_dep["top1"], "kernel_vs_fakequant_agreement": agree_dep_fq,
        "min_feature_cosine_kernel_vs_fakequant": cos, "sizes": sizes, "latency_ms": lat,
        "mean_layer_sqnr_db": rep["mean_layer_sqnr"], "arpr": rep["arpr"], "artifact": str(art),
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    (out / "demo.md").write_text(table + "\n")
    print(table)
    print(f"kernel vs fake-quant: top-1 agreement {agree_dep_fq:.2f}%, min feature cosine {cos:.6f}")
    print(f"matmul weights {sizes['matmul_weight_ratio']:.2f}x smaller than fp16; "
          f"ARPR {100 * rep['arpr']:.1f}%, mean layer SQNR {rep['mean_layer_sqnr']:.1f} dB")
    print(f"wrote {out / 'demo.png'}, {out / 'demo.json'}, {art}")
    return summary
