"""Export: the deploy model (torch.ops.vitq only) computes what the fake-quant model emulated.

Models: DeiT-S and ViT-S shapes with random weights (2 blocks, 64 px, so the CPU suite stays
fast; every block is the same code path), with W4A4 and W8A8, and a small random Swin (window
attention with relative-position bias and shift mask, patch merging).  The real DINOv2-S case
is measured by bench/export_exactness.py.

Bounds (issue 5): on the same inputs, top-1 agreement >= 99.9% and feature cosine >= 0.9999 for
every image, on CPU with the CPU kernels.  They hold because without gradients the fake-quant
model takes the integer path of vitq/exact.py: the same codes, the same exact integer products
and the kernels' fp32 epilogues, LayerNorm/GELU/exp evaluated as the CPU kernels do.  Per block
the outputs are then bit-identical except where a float64 LayerNorm/erfc/exp of another
summation order or library rounds to the other fp32 neighbour (probability ~1e-7 per value),
which can move a POQ outlier's fp32 value by one ulp but not flip a code in practice; the
per-block check allows that (relative 1e-6 per token) and nothing larger.  The float emulation
forward (used with gradients, for reconstruction) is checked separately to stay close.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import vitq  # noqa: E402
from vitq import exact as vexact  # noqa: E402
from vitq.export import ArtifactError, ExportError, export, load, save, size_report  # noqa: E402
from vitq_kernels import modules as dm  # noqa: E402

CASES = {
    "deit_w4a4": ("deit_small_distilled_patch16_224", 4, 4),
    "vit_w8a8": ("vit_small_patch16_224", 8, 8),
}
_cache = {}


def _calibrated(case):
    if case not in _cache:
        name, wb, ab = CASES[case]
        torch.manual_seed(0)
        kw = dict(pretrained=False, depth=2, img_size=64, num_classes=10)
        fp = timm.create_model(name, **kw).eval()
        calib = torch.randn(8, 3, 64, 64)
        cfg = vitq.ADFQConfig(w_bits=wb, a_bits=ab, amo=False, progress=False, a_init="minmax", w_init="minmax")
        qm = vitq.quantize(fp, cfg, calib)
        _cache[case] = (name, kw, fp, qm)
    return _cache[case]


def _features_match(a, b):
    cos = F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)
    return cos


def _assert_issue_bounds(a, b):
    """Issue 5: top-1 agreement >= 99.9% and feature cosine >= 0.9999 on every input."""
    cos = _features_match(a, b)
    assert cos.min() >= 0.9999, cos.min()
    assert (a.argmax(1) == b.argmax(1)).double().mean() >= 0.999


def _assert_block_match(a, b):
    rel = ((a - b).flatten(0, -2).norm(dim=-1) / a.flatten(0, -2).norm(dim=-1).clamp_min(1e-30))
    # bit-identical except for one-ulp roundings of a float64 LayerNorm/erfc/exp (module doc)
    assert (rel == 0).double().mean() >= 0.99 and rel.max() <= 1e-6, rel.max()


@pytest.mark.parametrize("case", sorted(CASES))
def test_deploy_matches_fake_quant(case):
    _, _, _, qm = _calibrated(case)
    dep = export(qm)
    # every matmul runs on the ops: no fake-quant module is left, and each block is a QBlock
    assert not any(type(m).__name__.startswith("Quant") for m in dep.modules())
    assert sum(isinstance(m, dm.QBlock) for m in dep.modules()) == 2
    x = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        # module by module on the same input
        t = qm.norm_pre(qm._pos_embed(qm.patch_embed(x)))
        t_dep = dep.norm_pre(dep._pos_embed(dep.patch_embed(x)))
        assert torch.equal(t, t_dep)
        for bq, bd in zip(qm.blocks, dep.blocks):
            a, b = bq(t), bd(t)
            _assert_block_match(a, b)
            t = a
        a, b = qm(x), dep(x)
        with vexact.emulation():
            emulated = qm(x)
    _assert_issue_bounds(a, b)
    # the float emulation (the reconstruction forward) lands on nearly the same model; a code flip
    # between the two cascades through a random-weight W4A4 model, so this is judged on the median
    # (measured: most images at cosine 1.0000, single images down to 0.87)
    assert _features_match(emulated, a).median() >= 0.99


def test_integer_path_only_without_gradients():
    _, _, _, qm = _calibrated("deit_w4a4")
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        exact_out = qm(x)
        with vexact.emulation():
            emulated = qm(x)
    with torch.enable_grad():
        x.requires_grad_(True)
        out = qm(x)
        out.sum().backward()          # the emulation path is differentiable
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.equal(out.detach(), emulated)
    assert not torch.equal(exact_out, emulated)


def test_save_load_roundtrip_and_size(tmp_path):
    name, kw, fp, qm = _calibrated("deit_w4a4")
    dep = export(qm)
    path = save(dep, tmp_path / "art", {"builder": "timm", "name": name, "kwargs": kw}, {"w_bits": 4})
    loaded = load(path, expect_model=name)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dep(x), loaded(x))          # same tensors, same kernels: bit-identical
    rep = size_report(dep, fp)
    # int4 codes + fp32 per-channel scale, int32 zero and colsum per row of 384..1536 columns
    assert 3.5 <= rep["matmul_weight_ratio"] <= 4.0, rep
    assert not list(tmp_path.glob("art/*.pt")) and not list(tmp_path.glob("art/*.pkl"))


def test_artifact_errors(tmp_path):
    name, kw, _, qm = _calibrated("deit_w4a4")
    dep = export(qm)
    path = save(dep, tmp_path / "a", {"builder": "timm", "name": name, "kwargs": kw})
    with pytest.raises(ArtifactError, match="expected 'vit_base"):
        load(path, expect_model="vit_base_patch16_224")
    cfg = json.loads((path / "config.json").read_text())
    cfg["format_version"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="format version 99"):
        load(path)
    cfg["format_version"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="checksum"):
        load(path)
    tampered = bytearray(data)
    tampered[-5] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(tampered))
    with pytest.raises(ArtifactError, match="checksum"):
        load(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load(path)
    with pytest.raises(ArtifactError, match="not a vitq artifact"):
        load(tmp_path / "missing")


def test_export_refuses_emulation_only_bits():
    torch.manual_seed(0)
    fp = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=4).eval()
    qm = vitq.quantize(fp, vitq.ADFQConfig(w_bits=6, a_bits=6, amo=False, progress=False, a_init="minmax",
                                           w_init="minmax"), torch.randn(4, 3, 32, 32))
    with pytest.raises(ExportError, match="emulation-only"):
        export(qm)


def test_deploy_compiles_fullgraph():
    _, _, _, qm = _calibrated("vit_w8a8")
    dep = export(qm)
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(dep, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x), dep(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Swin: window attention (relative-position bias + shift mask), patch merging
# ---------------------------------------------------------------------------------------------
SWIN_KW = dict(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
               num_classes=10)
SWIN_NAME = "swin_tiny_patch4_window7_224"   # a registered timm Swin; SWIN_KW override its shape


def _swin_calibrated():
    if "swin" not in _cache:
        torch.manual_seed(0)
        fp = timm.create_model(SWIN_NAME, pretrained=False, **SWIN_KW).eval()
        cfg = vitq.ADFQConfig(w_bits=4, a_bits=4, iters=2, calib_images=4, batch_size=2, progress=False)
        _cache["swin"] = (fp, vitq.quantize(fp, cfg, torch.randn(4, 3, 64, 64)))
    return _cache["swin"]


def test_swin_deploy_matches_fake_quant(tmp_path):
    fp, qm = _swin_calibrated()
    dep = export(qm)
    assert not any(type(m).__name__.startswith("Quant") for m in dep.modules())
    blocks = [m for m in dep.modules() if isinstance(m, dm.QSwinBlock)]
    assert len(blocks) == 4 and sum(isinstance(m, dm.QPatchMerging) for m in dep.modules()) == 1
    # the shifted blocks carry one bias per window (relative-position bias + mask), the others one
    assert [b.attn_bias.shape[0] for b in blocks] == [1, 16, 1, 4]
    assert [b.shift_size for b in blocks] == [(0, 0), (2, 2), (0, 0), (2, 2)]
    assert all(float(b.attn_bias.amin()) <= -99 for b in blocks[1::2])
    x = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        t = qm.patch_embed(x)
        assert torch.equal(t, dep.patch_embed(x))
        for sq, sd in zip(qm.layers, dep.layers):
            t_q, t_d = sq.downsample(t), sd.downsample(t)
            _assert_block_match(t_q, t_d)
            t = t_q
            for bq, bd in zip(sq.blocks, sd.blocks):
                a, b = bq(t), bd(t)
                _assert_block_match(a, b)
                t = a
        a, b = qm(x), dep(x)
    _assert_issue_bounds(a, b)
    # save / load through the timm skeleton
    path = save(dep, tmp_path / "swin", {"builder": "timm", "name": SWIN_NAME, "kwargs": SWIN_KW})
    loaded = load(path, expect_model=SWIN_NAME)
    with torch.no_grad():
        assert torch.equal(loaded(x[:4]), dep(x[:4]))


def test_swin_deploy_compiles_fullgraph():
    _, qm = _swin_calibrated()
    dep = export(qm)
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(dep, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), dep(x))


def test_swin_block_refuses_other_resolutions():
    _, qm = _swin_calibrated()
    shifted = [m for m in export(qm).modules() if isinstance(m, dm.QSwinBlock)][1]
    with torch.no_grad():
        with pytest.raises(ValueError, match="not a multiple of the window"):
            shifted(torch.randn(1, 10, 10, 32))
        with pytest.raises(ValueError, match="shift mask depends on the resolution"):
            shifted(torch.randn(1, 12, 12, 32))      # 9 windows, the mask was built for 16


@pytest.mark.skipif(os.environ.get("VITQ_SLOW_TESTS") != "1",
                    reason="Swin-T shape at 224 px: ~3 CPU-minutes; set VITQ_SLOW_TESTS=1 to run")
def test_swin_tiny_shape_exports_and_runs():
    # Swin-T's shape (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, 224 px), random weights,
    # range calibration on two images: every stage, shifted windows and all three mergings deploy
    torch.manual_seed(0)
    fp = timm.create_model(SWIN_NAME, pretrained=False, num_classes=10).eval()
    cfg = vitq.ADFQConfig(w_bits=4, a_bits=4, amo=False, calib_images=2, progress=False)
    qm = vitq.quantize(fp, cfg, torch.randn(2, 3, 224, 224))
    dep = export(qm)
    assert sum(isinstance(m, dm.QSwinBlock) for m in dep.modules()) == 12
    assert sum(isinstance(m, dm.QPatchMerging) for m in dep.modules()) == 3
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = qm(x), dep(x)
    _assert_issue_bounds(a, b)
