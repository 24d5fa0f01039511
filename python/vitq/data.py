"""Datasets that exist offline, preprocessed the way the model expects.

- ``fashion_mnist``: the full Fashion-MNIST (60k train / 10k test) from the Debian package
  ``dataset-fashion-mnist`` (idx .gz files in /usr/share/datasets/fashion-mnist).
- ``foolbox_images``: the 20 labelled samples per dataset shipped in the ``foolbox==3.3.4`` wheel
  (ImageNet JPEGs, CIFAR-10/100, MNIST, Fashion-MNIST); the label is the file name's last field.
- ``image_folder``: any torchvision ImageFolder tree (e.g. an ImageNet validation set).

Every dataset goes through timm's eval transform for the model (``resolve_data_config`` +
``create_transform``): the model's resize, center crop and mean/std normalization; grayscale images
are converted to 3 identical channels.

Calibration vs evaluation: ``calibration_split(dataset, n, seed)`` draws ``n`` indices from a seeded
permutation and returns (calibration, evaluation) subsets that never share an image;
``calibration_batch`` stacks exactly that calibration subset.  With Fashion-MNIST, calibrate on the
train split and evaluate on the test split.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from .models import DINOV2_ARCH, FASHION_MNIST_CLASSES, AssetMissingError

DEFAULT_IMG_SIZE = 112
FASHION_MNIST_DIR = Path(os.environ.get("VITQ_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FOOLBOX_PIN = "foolbox==3.3.4"
FOOLBOX_KINDS = {"imagenet": "imagenet", "cifar10": "cifar10", "cifar100": "cifar100",
                 "mnist": "mnist", "fashion_mnist": "fashionMNIST", "fashionmnist": "fashionMNIST"}


# ----------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------
def _model_input_size(model) -> Optional[int]:
    """The square input size the model is built for, when it has one (timm ViTs record it in
    patch_embed.img_size; a ProbeClassifier exposes its backbone's)."""
    inner = getattr(model, "backbone", model)
    size = getattr(getattr(inner, "patch_embed", None), "img_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size", (None, None))[1:]
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return int(size[0]) if size and size[0] is not None else None


def model_transform(model=None, img_size: Optional[int] = None):
    """timm eval transform for ``model`` (a timm model or ProbeClassifier); without a model, the
    DINOv2 config (ImageNet mean/std, bicubic, crop_pct 1.0).  ``img_size`` overrides the size;
    by default it is the model's own input size, or 112 px without a model."""
    import timm.data

    if model is not None:
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        img_size = img_size or _model_input_size(model)
    else:
        cfg = timm.models.get_pretrained_cfg(DINOV2_ARCH).to_dict()
    img_size = int(img_size or DEFAULT_IMG_SIZE)
    if img_size <= 0:
        raise ValueError(f"img_size must be positive, got {img_size}")
    data_cfg = timm.data.resolve_data_config({"input_size": (3, img_size, img_size)}, pretrained_cfg=cfg)
    return timm.data.create_transform(**data_cfg, is_training=False)


class _LabelledImages(Dataset):
    """PIL images (decoded on access) + integer labels + the model transform."""

    def __init__(self, load_image, labels: Sequence[int], transform, classes):
        self._load, self.targets, self.transform, self.classes = load_image, list(labels), transform, classes

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        img = self._load(i % len(self)).convert("RGB")  # grayscale -> 3 identical channels
        return self.transform(img), self.targets[i]


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    if raw[:3] != b"\x00\x00\x08" or ndim not in (1, 3):  # 0x08: unsigned byte data
        raise ValueError(f"{path} is not a uint8 idx file")
    dims = [int.from_bytes(raw[4 + 4 * d: 8 + 4 * d], "big") for d in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def fashion_mnist_arrays(split: str, root=None) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of the 'train' or 'test' split."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    files = [root / f"{prefix}-{kind}-idx{d}-ubyte.gz" for kind, d in (("images", 3), ("labels", 1))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise AssetMissingError(f"Fashion-MNIST files missing: {missing}; install the Debian package "
                                f"`apt-get install dataset-fashion-mnist` (scripts/assets.sh) or set "
                                f"VITQ_FASHION_MNIST to a folder holding the idx .gz files")
    images, labels = _read_idx(files[0]), _read_idx(files[1])
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
    return images, labels


def fashion_mnist(split: str = "test", n: Optional[int] = None, img_size: Optional[int] = None,
                  model=None, root=None) -> Dataset:
    """Fashion-MNIST ``split`` ('train' 60k / 'test' 10k), the first ``n`` images in file order.
    ``img_size``: default the model's input size, or 112 px without a model."""
    images, labels = fashion_mnist_arrays(split, root)
    if n is not None:
        if not 0 < n <= len(images):
            raise ValueError(f"n must be in [1, {len(images)}] for the {split} split, got {n}")
        images, labels = images[:n], labels[:n]
    return _LabelledImages(lambda i: Image.fromarray(images[i]), labels.astype(np.int64).tolist(),
                           model_transform(model, img_size), list(FASHION_MNIST_CLASSES))


# ----------------------------------------------------------------------------------------------
# foolbox samples and image folders
# ----------------------------------------------------------------------------------------------
def foolbox_data_dir() -> Path:
    spec = importlib.util.find_spec("foolbox")  # locate only: importing foolbox needs eagerpy etc.
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(f"the sample images come from the PyPI wheel {FOOLBOX_PIN}, which is not "
                                f"installed; run `pip install --no-deps {FOOLBOX_PIN}` (scripts/assets.sh)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def foolbox_images(kind: str = "imagenet", img_size: Optional[int] = None, model=None) -> Dataset:
    """The 20 labelled ``kind`` samples of the foolbox wheel: 'imagenet' (JPEGs, ImageNet-1k class
    indices), 'cifar10', 'cifar100', 'mnist' or 'fashion_mnist'."""
    prefix = FOOLBOX_KINDS.get(kind.lower() if isinstance(kind, str) else kind)
    if prefix is None:
        raise ValueError(f"kind must be one of {sorted(set(FOOLBOX_KINDS) - {'fashionmnist'})}, got {kind!r}")
    pattern = re.compile(rf"^{prefix}_(\d+)_(\d+)\.(png|jpg)$")
    root = foolbox_data_dir()
    found = sorted((int(m[1]), int(m[2]), p) for p in root.glob(f"{prefix}_*")
                   if (m := pattern.match(p.name)))
    if not found:
        raise AssetMissingError(f"no {prefix}_*.png/jpg samples under {root}: reinstall {FOOLBOX_PIN}")
    paths = [p for _, _, p in found]
    return _LabelledImages(lambda i: Image.open(paths[i]), [lab for _, lab, _ in found],
                           model_transform(model, img_size), None)


def image_folder(path, img_size: Optional[int] = None, model=None) -> Dataset:
    """torchvision ImageFolder (one sub-folder per class, classes in sorted folder order; for
    ImageNet use the wnid folder names so indices match the 1k-class heads)."""
    from torchvision.datasets import ImageFolder

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {path} (expected <path>/<class>/<image>)")
    return ImageFolder(str(path), transform=model_transform(model, img_size))


# ----------------------------------------------------------------------------------------------
# calibration / evaluation split
# ----------------------------------------------------------------------------------------------
def calibration_split(dataset: Dataset, n: int, seed: int = 0) -> Tuple[Subset, Subset]:
    """(calibration subset of ``n`` images, evaluation subset of the rest): disjoint, drawn from a
    permutation seeded by ``seed`` (independent of the global torch RNG)."""
    total = len(dataset)
    if not 0 < n <= total:
        raise ValueError(f"calibration size must be in [1, {total}], got {n}")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(perm[:n])), Subset(dataset, sorted(perm[n:]))


def calibration_batch(dataset: Dataset, n: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images [n, 3, H, W], labels [n]) of ``calibration_split(dataset, n, seed)[0]``."""
    calib, _ = calibration_split(dataset, n, seed)
    items = [calib[i] for i in range(len(calib))]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])
