"""The small accuracy check CI runs on the real model (DINOv2-S/14 + Fashion-MNIST probe, 112 px):
W8A8 with the full method within 1 point of fp, and W4A4 with everything on better than W4A4 with
everything off.  Accuracy is that of the exported model on the C++ kernels (bit-identical to the
fake-quant model's integer path, and ~8x faster to evaluate on CPU).

W8A8 uses the `fast` preset as it is (80 iterations per module): measured on these 300 images
with the paper's learning rates, 20 iterations gave 86.33% against fp 88.00% (agreement 97.3%),
80 iterations 87.67% (97.7%), so the short schedule is not the method; with the current `fast`
rates (V's at 10x) and one thread, 87.33% (98.0%).  But on 300 images the gap to fp has a standard
error of up to sqrt(d/300) ~ 1 point (d ~ 3% changed predictions), and reconstruction is not
bit-reproducible across CPUs and thread counts: CI's machine got 86.67% (-1.33) where this one,
at 2 threads, got 88.33% (+0.33).  So W8A8 is judged on the first 2000 test images (error ~0.4
points): 85.55% against fp 86.00% (-0.45, agreement 96.85%, 2 threads, 2026-12-02).  The W4A4
on/off comparison keeps 300 images and 20 iterations, its margin is wide.  The full tables are
bench/accuracy.py's (bench/results/accuracy_*.md)."""
import pytest
import torch

import vitq
from vitq import data, models
from vitq.export import export

N_TEST = 300
N_TEST_W8A8 = 2000
ITERS = 20


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    fp = models.load_default_model(img_size=112)
    calib, _ = data.calibration_batch(data.fashion_mnist("train", model=fp), 64, seed=0)
    test = data.fashion_mnist("test", n=N_TEST_W8A8, model=fp)
    return fp, calib, test


def _top1(qmodel, fp, test, n=N_TEST):
    return vitq.evaluate(export(qmodel), test, fp_model=fp, max_images=n, progress=False)


def test_w8a8_full_method_within_one_point_of_fp(setup):
    fp, calib, test = setup
    q = vitq.quantize(fp, vitq.ADFQConfig(w_bits=8, a_bits=8, preset="fast", progress=False), calib)
    r = _top1(q, fp, test, N_TEST_W8A8)
    assert r["n"] == N_TEST_W8A8
    assert r["top1"] >= r["fp_top1"] - 1.0, r
    assert r["agreement"] >= 95.0, r


def test_w4a4_all_components_beat_none(setup):
    fp, calib, test = setup
    on = vitq.quantize(fp, vitq.ADFQConfig(w_bits=4, a_bits=4, preset="fast", iters=ITERS, progress=False), calib)
    off = vitq.quantize(fp, vitq.ADFQConfig(w_bits=4, a_bits=4, poq=False, slq=False, amo=False, progress=False),
                        calib)
    r_on, r_off = _top1(on, fp, test), _top1(off, fp, test)
    # 300 images: one image is 0.33 points; ask for a clear margin, not a tie
    assert r_on["top1"] >= r_off["top1"] + 5.0, (r_on, r_off)
    assert r_on["agreement"] > r_off["agreement"], (r_on, r_off)
