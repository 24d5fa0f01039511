"""Public calibration API (seed 002 sec. 3.5): ``quantize`` and ``evaluate``; fake-quant state I/O.

``quantize`` = wrap the model (replace the matmul holders by quantized ones), initialise every
quantizer (weights per channel; activation ranges from the calibration images), optionally run
reconstruction (AMO), and fix the integer weight codes.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import time
import warnings
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn

from .config import ADFQConfig
from .quantizers import UniformActQuantizer
from .reconstruct import reconstruct
from .transforms import center_keys
from .wrap import act_quantizers, fp_mode, is_wrapped, quant_layers, wrap_model

STATE_FORMAT = "vitq-fakequant"
STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# data plumbing
# ---------------------------------------------------------------------------------------------
def iter_batches(data, batch_size: int = 32, limit: Optional[int] = None):
    """Yields (images, labels or None) from: a tensor of images, a tuple (images, labels), a
    ``torch.utils.data.Dataset`` of (image, label) or images, or an iterable of such batches."""
    if data is None:
        raise ValueError("no data given")
    if isinstance(data, (str, Path)):
        raise TypeError(f"data must be tensors or a dataset, got the path {data!r}; load it with "
                        "vitq.data.image_folder(path, model=model)")
    count = 0
    if isinstance(data, torch.Tensor) or (isinstance(data, (tuple, list)) and len(data) == 2
                                          and isinstance(data[0], torch.Tensor) and data[0].dim() == 4):
        x, y = (data, None) if isinstance(data, torch.Tensor) else data
        if x.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(x.shape)}")
        n = x.shape[0] if limit is None else min(limit, x.shape[0])
        for i in range(0, n, batch_size):
            yield x[i:min(i + batch_size, n)], (None if y is None else y[i:min(i + batch_size, n)])
        return
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        n = len(data) if limit is None else min(limit, len(data))
        for i in range(0, n, batch_size):
            items = [data[j] for j in range(i, min(i + batch_size, n))]
            if isinstance(items[0], (tuple, list)):
                yield torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])
            else:
                yield torch.stack(items), None
        return
    for batch in data:  # a DataLoader or any iterable of batches
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        if limit is not None and count + x.shape[0] > limit:
            x, y = x[:limit - count], (None if y is None else y[:limit - count])
        if x.shape[0] == 0:
            return
        count += x.shape[0]
        yield x, y
        if limit is not None and count >= limit:
            return


def collect_images(data, n: int) -> torch.Tensor:
    xs = [x for x, _ in iter_batches(data, 64, limit=n)]
    if not xs:
        raise ValueError("the calibration data is empty")
    images = torch.cat(xs).float()
    if not bool(torch.isfinite(images).all()):
        raise ValueError("calibration images contain NaN or Inf")
    if images.shape[0] < n:
        warnings.warn(f"asked for {n} calibration images, got {images.shape[0]}")
    return images


def _device(cfg: ADFQConfig) -> torch.device:
    if cfg.device is not None:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------
def quantize(model: nn.Module, config: Optional[ADFQConfig] = None, calib_data=None, **overrides) -> nn.Module:
    """ADFQ-ViT post-training quantization; returns the fake-quant model (eval mode, on the
    compute device).  ``model`` is left untouched unless ``config.inplace``.

    calib_data: unlabelled or labelled images in any form ``iter_batches`` takes; the first
    ``calib_images`` (preset) are used.  ``overrides`` replace config fields
    (``quantize(m, calib_data=x, w_bits=6)``).  The model's report (outlier capacities, timings,
    reconstruction losses) is in ``qmodel.vitq_report``."""
    cfg = config if config is not None else ADFQConfig()
    if not isinstance(cfg, ADFQConfig):
        raise TypeError(f"config must be an ADFQConfig, got {type(cfg).__name__}")
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if is_wrapped(model):
        raise ValueError("model is already quantized")
    if calib_data is None:
        raise ValueError("quantize needs calibration images (calib_data)")
    images = collect_images(calib_data, cfg.resolved("calib_images"))
    device = _device(cfg)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        qmodel = model if cfg.inplace else copy.deepcopy(model)
        qmodel.eval()
        wrap_model(qmodel, cfg)
        qmodel.to(device)
        report = {"config": cfg.to_dict(), "calib_images": int(images.shape[0])}
        if cfg.center_keys:
            n_init = images.shape[0] if cfg.init_images is None else min(cfg.init_images, images.shape[0])
            shifts = center_keys(qmodel, images[:n_init], cfg.eval_batch_size, device)
            report["key_centering_max_shift"] = max(shifts.values(), default=0.0)
        _init_quantizers(qmodel, images, cfg, device)
        report["init_seconds"] = time.perf_counter() - t0
        if cfg.amo and cfg.resolved("iters") > 0:
            t1 = time.perf_counter()
            report["reconstruction"] = reconstruct(qmodel, images, cfg, device)
            report["reconstruction_seconds"] = time.perf_counter() - t1
        for _, layer in quant_layers(qmodel):
            layer.weight_quant.harden(layer.weight)
    report["outliers"] = outlier_report(qmodel)
    report["seconds"] = time.perf_counter() - t0
    report["exportable"] = cfg.exportable
    qmodel.vitq_report = report
    return qmodel


@torch.no_grad()
def _init_quantizers(qmodel: nn.Module, images: torch.Tensor, cfg: ADFQConfig, device) -> None:
    for _, layer in quant_layers(qmodel):
        layer.weight_quant.calibrate(layer.weight)
    aqs = [q for _, q in act_quantizers(qmodel)]
    for q in aqs:
        q.observing = True
    n = images.shape[0] if cfg.init_images is None else min(cfg.init_images, images.shape[0])
    bs = cfg.eval_batch_size
    bar = _bar(cfg.progress, total=n, desc="calibrating ranges", unit="img")
    try:
        with fp_mode(qmodel):
            # fp_mode switched every quantizer off; the observers must still see the fp activations
            for q in aqs:
                q.enabled = True
            for i in range(0, n, bs):
                x = images[i:i + bs].to(device)
                qmodel(x)
                if bar:
                    bar.update(x.shape[0])
    finally:
        for q in aqs:
            q.observing = False
        if bar:
            bar.close()
    for q in aqs:
        q.finish_calibration()


def outlier_report(qmodel: nn.Module) -> dict:
    """Per POQ quantizer: alpha, the largest outlier count per row seen in calibration, capacity."""
    return {name: {"alpha": q.alpha, "max_outliers_seen": q.max_outliers_seen, "capacity": q.capacity}
            for name, q in act_quantizers(qmodel)
            if isinstance(q, UniformActQuantizer) and q.alpha is not None}


def _bar(enabled: bool, **kw):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(dynamic_ncols=True, **kw)


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def predictions(models: Dict[str, nn.Module], data, batch_size: int = 32, max_images: Optional[int] = None,
                progress: bool = False, desc: str = "evaluating") -> Dict[str, Optional[torch.Tensor]]:
    """Top-1 class of every image for each of ``models`` (name -> model, each on its own device),
    in one pass over ``data``; ``"label"`` holds the labels (None if the data has none)."""
    devs = {k: _model_device(m) for k, m in models.items()}
    for m in models.values():
        m.eval()
    out: Dict[str, list] = {k: [] for k in models}
    labels: list = []
    total = max_images or (len(data) if hasattr(data, "__len__") and not isinstance(data, torch.Tensor) else None)
    bar = _bar(progress, total=total, desc=desc, unit="img")
    try:
        for x, y in iter_batches(data, batch_size, limit=max_images):
            for k, m in models.items():
                out[k].append(m(x.to(devs[k])).argmax(dim=-1).cpu())
            labels.append(y)
            if bar:
                bar.update(x.shape[0])
    finally:
        if bar:
            bar.close()
    if not labels:
        raise ValueError("the evaluation data is empty")
    res: Dict[str, Optional[torch.Tensor]] = {k: torch.cat(v) for k, v in out.items()}
    res["label"] = None if any(y is None for y in labels) else torch.cat([y.cpu() for y in labels])
    return res


def _model_device(m: nn.Module) -> torch.device:
    t = next(itertools.chain(m.parameters(), m.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def top1(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """Share (%) of ``pred`` equal to ``ref`` (labels: accuracy; another model: agreement)."""
    return 100.0 * float((pred == ref).float().mean())


def evaluate(model: nn.Module, data, fp_model: Optional[nn.Module] = None, batch_size: int = 32,
             max_images: Optional[int] = None, progress: bool = True) -> dict:
    """Top-1 accuracy (%) of ``model`` on labelled ``data``; with ``fp_model``, also the fp model's
    top-1 and the top-1 agreement (% of images where both predict the same class)."""
    models = {"q": model} if fp_model is None else {"q": model, "fp": fp_model}
    p = predictions(models, data, batch_size, max_images, progress)
    y = p["label"]
    out = {"n": int(p["q"].numel()), "top1": None if y is None else top1(p["q"], y)}
    if fp_model is not None:
        out["fp_top1"] = None if y is None else top1(p["fp"], y)
        out["agreement"] = top1(p["q"], p["fp"])
    return out


# ---------------------------------------------------------------------------------------------
# fake-quant state: safetensors + JSON (never pickle)
# ---------------------------------------------------------------------------------------------
def save_quantized(qmodel: nn.Module, out_dir, model_name: Optional[str] = None, extra: Optional[dict] = None) -> Path:
    """Writes ``model.safetensors`` (every parameter and buffer, the integer weight codes and the
    quantizer scales included) and ``quant_config.json`` (format, config, per-quantizer layout)."""
    from safetensors.torch import save_file

    if not is_wrapped(qmodel):
        raise ValueError("save_quantized expects a model returned by vitq.quantize")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in qmodel.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": STATE_FORMAT})
    layout = {}
    for name, q in act_quantizers(qmodel):
        d = {"type": type(q).__name__, "bits": q.bits}
        for attr in ("granularity", "alpha", "capacity", "substeps", "shift_mode", "eps", "max_outliers_seen"):
            if hasattr(q, attr):
                d[attr] = getattr(q, attr)
        layout[name] = d
    for name, layer in quant_layers(qmodel):
        wq = layer.weight_quant
        layout[name + ".weight_quant"] = {"type": "WeightQuantizer", "bits": wq.bits, "symmetric": wq.symmetric,
                                          "role": layer.role}
    meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "model_name": model_name,
            "config": qmodel.vitq_config.to_dict(), "quantizers": layout,
            "torch": torch.__version__, "report": _jsonable(getattr(qmodel, "vitq_report", {}))}
    if extra:
        meta.update(_jsonable(extra))
    (out / "quant_config.json").write_text(json.dumps(meta, indent=2))
    return out


def load_quantized(path, model: nn.Module) -> nn.Module:
    """Rebuilds a fake-quant model saved by ``save_quantized`` on top of a fresh fp ``model`` of the
    same architecture (e.g. ``vitq.models.create_model(meta['model_name'])``)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, st_file = path / "quant_config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not st_file.is_file():
        raise FileNotFoundError(f"{path} does not hold quant_config.json and model.safetensors")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise ValueError(f"{cfg_file}: not a {STATE_FORMAT} v{STATE_VERSION} file "
                         f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
    cfg = ADFQConfig.from_dict(meta["config"])
    qmodel = wrap_model(model, dataclasses.replace(cfg, inplace=True))
    state = load_file(str(st_file))
    # quantizer tensors whose shape is set by calibration: size them before loading
    for name, q in act_quantizers(qmodel):
        info = meta["quantizers"].get(name, {})
        for attr in ("capacity", "max_outliers_seen"):
            if attr in info:
                setattr(q, attr, info[attr])
        if name + ".scale" in state:
            q.scale = nn.Parameter(torch.empty_like(state[name + ".scale"]), requires_grad=False)
        if name + ".zero" in state:
            q.zero = torch.empty_like(state[name + ".zero"])
        q.initialized = True
    for name, layer in quant_layers(qmodel):
        wq = layer.weight_quant
        for attr in ("scale", "zero", "codes"):
            setattr(wq, attr, torch.empty_like(state[f"{name}.weight_quant.{attr}"]))
        wq.mode = "hard"
    qmodel.load_state_dict(state, strict=True)
    qmodel.vitq_report = meta.get("report", {})
    return qmodel.eval()


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return repr(obj)
