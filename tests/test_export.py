"""Export: the deploy model (torch.ops.vitq only) computes what the fake-quant model emulated.

Models: DeiT-S and ViT-S shapes with random weights (2 blocks, 64 px, so the CPU suite stays
fast; every block is the same code path), with W4A4 and W8A8.  The real DINOv2-S case runs
in the demo and in bench/e2e.py.

Why the thresholds: the fake-quant model and the kernels use the same codes except where a
value computed in a different order (the fake model's fp32 matmul of dequantized values vs
the kernels' exact integer product; LayerNorm, softmax, GELU) lands within a few ulps of a
rounding boundary (reference.py documents each case).  A flipped code is a discontinuity of
the quantized model itself: feeding the *fake* model an input perturbed by 2.5e-6 moves a
2-block W8A8 output by up to 0.04 (measured), exactly as a flip between the two models does.
So the tight check is per module on a shared input (>= 98% of tokens within 1e-5 relative);
end to end it is statistical (half the images at logit cosine >= 0.9999, all >= 0.95; top-1
equal wherever the fake model's top-2 margin exceeds twice the deviation).  Closing the
end-to-end gap needs the fake model to use the kernels' exact integer GEMM in its forward.
"""
import json

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import vitq  # noqa: E402
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


@pytest.mark.parametrize("case", sorted(CASES))
def test_deploy_matches_fake_quant(case):
    _, _, _, qm = _calibrated(case)
    dep = export(qm)
    # every matmul runs on the ops: no fake-quant module is left, and each block is a QBlock
    assert not any(type(m).__name__.startswith("Quant") for m in dep.modules())
    assert sum(isinstance(m, dm.QBlock) for m in dep.modules()) == 2
    x = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        # module by module on the same input: the kernels compute what emulation computes
        t = qm.norm_pre(qm._pos_embed(qm.patch_embed(x)))
        t_dep = dep.norm_pre(dep._pos_embed(dep.patch_embed(x)))
        assert (t - t_dep).abs().max() <= 1e-5 * t.abs().max()
        for bq, bd in zip(qm.blocks, dep.blocks):
            a, b = bq(t), bd(t)
            rel = ((a - b).norm(dim=-1) / a.norm(dim=-1)).flatten()
            # all but a few tokens (those holding a boundary flip) agree to fp32 accumulation error
            assert (rel <= 1e-5).double().mean() >= 0.98 and rel.max() <= 0.05, rel.max()
            t = a
        # end to end, flips propagate (see module doc)
        a, b = qm(x), dep(x)
    cos = _features_match(a, b)
    assert (cos >= 0.9999).double().mean() >= 0.5 and cos.min() >= 0.95, cos
    # top-1 must agree wherever the fake model's top-2 margin exceeds what the deviation can flip
    top2 = a.topk(2, dim=1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * (a - b).abs().amax(dim=1)
    assert decisive.any()
    assert torch.equal(a.argmax(1)[decisive], b.argmax(1)[decisive])


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
