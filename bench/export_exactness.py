"""Deploy vs fake-quant exactness on the default model (DINOv2-S/14 + Fashion-MNIST probe, 112 px).

Calibrates the fake-quant model (range calibration, no reconstruction, so it runs in minutes on
CPU), exports it, and compares on the same Fashion-MNIST test images:
  * the fake-quant model's evaluation forward (the integer path of vitq/exact.py),
  * the same model's float emulation (``vitq.exact.emulation()``: the forward without it),
against the deploy model on the CPU kernels.  Reports top-1 agreement, min / median feature
cosine (logits) and max |difference|, and writes a JSON beside the results.

    python bench/export_exactness.py --eval-images 256 --bits 4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "python"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vitq  # noqa: E402
from vitq import data, exact, models  # noqa: E402
from vitq.export import export  # noqa: E402


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    cos = F.cosine_similarity(a.double(), b.double(), dim=1)
    return {"top1_agreement": float((a.argmax(1) == b.argmax(1)).double().mean()),
            "cos_min": float(cos.min()), "cos_median": float(cos.median()),
            "frac_cos_ge_0.9999": float((cos >= 0.9999).double().mean()),
            "bit_identical_rows": float((a == b).all(dim=1).double().mean()),
            "max_abs_diff": float((a - b).abs().max())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-images", type=int, default=256)
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--bits", type=int, default=4, help="W and A bits (4 or 8)")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "export_exactness.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    fp = models.load_default_model(args.img_size)
    ds = data.fashion_mnist("test", n=args.calib_images + args.eval_images, model=fp)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    calib, x = xs[:args.calib_images], xs[args.calib_images:]
    t0 = time.perf_counter()
    qm = vitq.quantize(fp, vitq.ADFQConfig(w_bits=args.bits, a_bits=args.bits, amo=False, progress=False), calib)
    t_cal = time.perf_counter() - t0
    dep = export(qm)
    outs = {"integer_path": [], "emulation": [], "deploy": []}
    times = dict.fromkeys(outs, 0.0)
    with torch.no_grad():
        for i in range(0, x.shape[0], args.batch):
            xb = x[i:i + args.batch]
            for name in outs:
                t = time.perf_counter()
                if name == "emulation":
                    with exact.emulation():
                        y = qm(xb)
                else:
                    y = (qm if name == "integer_path" else dep)(xb)
                times[name] += time.perf_counter() - t
                outs[name].append(y)
    y = {k: torch.cat(v) for k, v in outs.items()}
    res = {"model": "dinov2_small_fmnist", "img_size": args.img_size, "bits": args.bits,
           "eval_images": int(x.shape[0]), "calib_images": int(calib.shape[0]), "calibration_s": t_cal,
           "forward_s": times, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "deploy_vs_integer_path": compare(y["integer_path"], y["deploy"]),
           "deploy_vs_emulation": compare(y["emulation"], y["deploy"])}
    print(json.dumps(res, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
