"""Export: a calibrated fake-quant model -> a deploy model on torch.ops.vitq; save / load.

``export(qmodel)`` copies the model and replaces every quantized module by its deploy
counterpart from ``vitq_kernels.modules``: each pre-norm ViT block becomes a ``QBlock``
(fused LayerNorm-quantize, qkv qgemm, log2 attention, proj qgemm, fc1+GELU+Shift-Log2,
fc2 decode GEMM), each timm Swin block a ``QSwinBlock`` (the same ops inside shifted windows,
relative-position bias + shift mask as log2_attention's bias; vitq_kernels/swin.py), each
Swin patch merging a ``QPatchMerging``, the patch embedding a ``QPatchEmbedConv``, every other
quantized Linear (heads) a ``QLinear``.  Without gradients the fake-quant model computes the
kernels' numbers (vitq/exact.py), so deploy and fake-quant agree bit for bit on CPU up to
float64 rounding coincidences (tests/test_export.py).  Integer weight codes are the ones calibration fixed (AdaRound's
hard rounding), packed to int4 where they fit; static activation parameters, outlier
thresholds and capacities are copied; Shift-Log2's shift is folded into fc2's bias.
If any quantized matmul cannot be mapped, export raises: nothing falls back to fp silently.

Artifacts (``save``/``load``): ``model.safetensors`` (every tensor of the deploy model) and
``config.json`` (format version, how to rebuild the fp skeleton, the deploy modules' configs,
the method settings, library versions, and the tensors file's SHA-256).  No pickle.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from vitq_kernels import modules as dm
from vitq_kernels.reference import ACT_BITS, ATTN_SUBSTEPS, WEIGHT_BITS

from .quantizers import Log2Quantizer, ShiftLog2Quantizer, TruncatedLog2Quantizer, UniformActQuantizer
from .wrap import QuantAttention, QuantConv2d, QuantLinear, QuantWindowAttention

FORMAT = "vitq-deploy"
FORMAT_VERSION = 1


class ExportError(RuntimeError):
    """The fake-quant model holds something the kernels cannot run."""


class ArtifactError(ValueError):
    """A saved deploy model is missing, corrupt, tampered with, or does not match."""


# ---------------------------------------------------------------------------------------------
# fake-quant quantizers -> deploy parameters
# ---------------------------------------------------------------------------------------------
def _act(q, where: str) -> dm.ActQuant:
    if not isinstance(q, UniformActQuantizer):
        raise ExportError(f"{where}: expected a uniform activation quantizer, got {type(q).__name__}")
    p = q.export_params()
    if p["bits"] not in ACT_BITS:
        raise ExportError(f"{where}: {p['bits']}-bit activations are emulation-only; the kernels run "
                          f"{ACT_BITS} bit (3 in the int4 container)")
    if p["granularity"] == "token":
        scale = zero = None
    else:
        scale, zero = p["scale"].reshape(-1), p["zero"].reshape(-1)
    return dm.ActQuant(p["bits"], scale, zero, p["alpha"], p["capacity"])


def _weights(wq, where: str):
    p = wq.export_params()
    bits = p["bits"]
    if bits not in WEIGHT_BITS:
        raise ExportError(f"{where}: {bits}-bit weights are emulation-only; export supports 3/4 (int4) and 8")
    codes = p["codes"].reshape(p["codes"].shape[0], -1).to(torch.int8)
    # the width itself is passed on (QLinear packs 3 and 4 bit into int4 and checks the code range)
    return codes, p["scale"].float(), p["zero"].to(torch.int32), bits


def _linear(ql: QuantLinear | QuantConv2d, where: str, act: dm.ActQuant | None = None) -> dm.QLinear:
    codes, s, z, w_bits = _weights(ql.weight_quant, where)
    a = act if act is not None else _act(ql.act_quant, where)
    return dm.QLinear(codes, s, z, ql.bias, a, w_bits)


def _ln_quant(norm: nn.Module, ql: QuantLinear, where: str) -> dm.QLayerNormQuant:
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
        raise ExportError(f"{where}: the block's norm must be an affine nn.LayerNorm, got {type(norm).__name__}")
    return dm.QLayerNormQuant(norm, _act(ql.act_quant, where))


def _attention(attn: QuantAttention, where: str) -> dm.QAttention:
    ident = nn.Identity()
    if not all(isinstance(getattr(attn, n, ident), nn.Identity) for n in ("q_norm", "k_norm", "norm")):
        raise ExportError(f"{where}: q/k norms inside attention are not supported by the deploy kernels")
    if not isinstance(attn.p_quant, (Log2Quantizer, TruncatedLog2Quantizer)):
        raise ExportError(f"{where}: the deploy attention kernel needs the log2 (or truncated log2) "
                          "post-softmax quantizer")
    pp = attn.p_quant.export_params()
    if pp["substeps"] not in ATTN_SUBSTEPS:
        raise ExportError(f"{where}: post-softmax substeps {pp['substeps']} not in the kernels' {ATTN_SUBSTEPS}")
    if pp["scale"] != 1.0:
        raise ExportError(f"{where}: post-softmax log2 scale must be 1")
    qs, zs, bits = [], [], set()
    for name in ("q_quant", "k_quant", "v_quant"):
        p = getattr(attn, name).export_params()
        if p["granularity"] != "tensor":
            raise ExportError(f"{where}.{name}: q/k/v must be per-tensor")
        qs.append(p["scale"].reshape(1))
        zs.append(p["zero"].reshape(1))
        bits.add(p["bits"])
    if len(bits) != 1 or next(iter(bits)) not in ACT_BITS:
        raise ExportError(f"{where}: q/k/v need one shared bit width in {ACT_BITS}, got {sorted(bits)}")
    proj = _linear(attn.proj, f"{where}.proj")
    if proj.act.scale is None or proj.act.scale.numel() != 1 or proj.act.max_outliers:
        raise ExportError(f"{where}.proj: the attention output feeds proj through a static per-tensor quantizer")
    qkv = _linear(attn.qkv, f"{where}.qkv")
    return dm.QAttention(qkv, proj, attn.num_heads, float(attn.scale), torch.cat(qs), torch.cat(zs),
                         bits.pop(), pp["bits"], pp["substeps"], pp.get("max_code"))


def _mlp(mlp: nn.Module, where: str) -> dm.QMlp:
    if not (isinstance(mlp.fc1, QuantLinear) and isinstance(mlp.fc2, QuantLinear)):
        raise ExportError(f"{where}: fc1/fc2 are not quantized")
    act = getattr(mlp, "act", None)
    if not (isinstance(act, nn.GELU) and getattr(act, "approximate", "none") == "none"):
        raise ExportError(f"{where}: the deploy MLP implements exact-erf GELU only, got {act}")
    fc1 = _linear(mlp.fc1, f"{where}.fc1")
    q2 = mlp.fc2.act_quant
    if isinstance(q2, ShiftLog2Quantizer):
        p = q2.export_params()
        if p["bits"] > 8:
            raise ExportError(f"{where}.fc2: Shift-Log2 codes are at most 8 bit")
        slq = {"bits": p["bits"], "substeps": p["substeps"], "shift": p["shift"], "scale": float(p["scale"].reshape(-1)[0])}
        codes, s, z, w_bits = _weights(mlp.fc2.weight_quant, f"{where}.fc2")
        # fc2's own activation quantizer is replaced by the Shift-Log2 codes; keep a valid
        # placeholder ActQuant (unused) so the module has one shape for save/load
        fc2 = dm.QLinear(codes, s, z, mlp.fc2.bias, dm.ActQuant(8), w_bits)
    else:
        slq = None
        fc2 = _linear(mlp.fc2, f"{where}.fc2")
    return dm.QMlp(fc1, fc2, slq)


def _layer_scale(ls: nn.Module):
    if isinstance(ls, nn.Identity):
        return None
    gamma = getattr(ls, "gamma", None)
    if gamma is None:
        raise ExportError(f"unsupported layer-scale module {type(ls).__name__}")
    return gamma


def _block(block: nn.Module, where: str) -> dm.QBlock:
    for drop in ("drop_path1", "drop_path2"):
        if not isinstance(getattr(block, drop, nn.Identity()), nn.Identity) and block.training:
            raise ExportError(f"{where}: export needs eval mode (drop path)")
    attn = block.attn
    return dm.QBlock(_ln_quant(block.norm1, attn.qkv, f"{where}.norm1"), _attention(attn, f"{where}.attn"),
                     _layer_scale(block.ls1), _ln_quant(block.norm2, block.mlp.fc1, f"{where}.norm2"),
                     _mlp(block.mlp, f"{where}.mlp"), _layer_scale(block.ls2))


def _swin_block(block: nn.Module, where: str) -> dm.QSwinBlock:
    """A timm SwinTransformerBlock: the block's static window/shift and its attention bias
    (relative-position bias + shift mask, summed as QuantWindowAttention sums them)."""
    for drop in ("drop_path1", "drop_path2"):
        if not isinstance(getattr(block, drop, nn.Identity()), nn.Identity) and block.training:
            raise ExportError(f"{where}: export needs eval mode (drop path)")
    if getattr(block, "dynamic_mask", False):
        raise ExportError(f"{where}: a Swin block with dynamic_mask=True builds its mask per input; export "
                          "needs the static mask of a fixed resolution")
    attn = block.attn
    with torch.no_grad():
        rel = attn._rel_pos_bias().float()                                   # [1, H, N, N]
        mask = getattr(block, "attn_mask", None)
        bias = rel if mask is None else (rel.unsqueeze(1) + mask.float().unsqueeze(1).unsqueeze(0))[0]
    for n in ("qkv", "fc1"):
        q = (attn.qkv if n == "qkv" else block.mlp.fc1).act_quant
        if getattr(q, "granularity", "token") == "position":
            raise ExportError(f"{where}.{n}: per-position scales do not survive Swin's roll/partition; "
                              "use per-token or per-tensor quantizers")
    return dm.QSwinBlock(_ln_quant(block.norm1, attn.qkv, f"{where}.norm1"), _attention(attn, f"{where}.attn"),
                         _ln_quant(block.norm2, block.mlp.fc1, f"{where}.norm2"), _mlp(block.mlp, f"{where}.mlp"),
                         block.window_size, block.shift_size, bias.contiguous())


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def export(qmodel: nn.Module) -> nn.Module:
    """Deploy model on torch.ops.vitq from a calibrated fake-quant model (see module doc)."""
    model = copy.deepcopy(qmodel).eval()
    replaced: dict[str, nn.Module] = {}
    skip = set()
    for name, m in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if hasattr(m, "attn") and isinstance(m.attn, QuantWindowAttention) and hasattr(m, "mlp"):
            replaced[name] = _swin_block(m, name)
            skip.add(name)
        elif isinstance(m, QuantWindowAttention):
            raise ExportError(f"{name}: window attention outside a Swin block is not deployable")
        elif isinstance(getattr(m, "reduction", None), QuantLinear) and isinstance(getattr(m, "norm", None), nn.LayerNorm):
            replaced[name] = dm.QPatchMerging(_ln_quant(m.norm, m.reduction, f"{name}.norm"),
                                              _linear(m.reduction, f"{name}.reduction"))
            skip.add(name)
        elif hasattr(m, "attn") and isinstance(m.attn, QuantAttention) and hasattr(m, "mlp"):
            replaced[name] = _block(m, name)
            skip.add(name)
        elif isinstance(m, QuantConv2d):
            k = tuple(m.weight.shape[2:])
            if tuple(m.stride) != k or any(p != 0 for p in m.padding) or m.groups != 1 or tuple(m.dilation) != (1, 1):
                raise ExportError(f"{name}: only patch convolutions (kernel == stride, no padding) are deployable")
            replaced[name] = dm.QPatchEmbedConv(_linear(m, name), k, m.weight.shape[0])
            skip.add(name)
        elif isinstance(m, QuantLinear):
            replaced[name] = _linear(m, name)
            skip.add(name)
        elif isinstance(m, QuantAttention):
            raise ExportError(f"{name}: attention outside a pre-norm block is not deployable")
    for name, new in replaced.items():
        _set_child(model, name, new)
    left = [n for n, m in model.named_modules()
            if isinstance(m, (QuantLinear, QuantConv2d, QuantAttention, QuantWindowAttention))]
    if left:
        raise ExportError(f"quantized modules without a deploy mapping: {left}")
    model.vitq_deploy = {"modules": {n: dm.module_config(m) for n, m in replaced.items()}}
    return model


def deploy_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, dm.DEPLOY_TYPES)]


# ---------------------------------------------------------------------------------------------
# artifacts
# ---------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(deploy_model: nn.Module, path, skeleton: dict, method: dict | None = None) -> Path:
    """Writes ``path/model.safetensors`` and ``path/config.json``.

    ``skeleton`` says how to rebuild the fp model the deploy modules sit in, e.g.
    ``{"builder": "timm", "name": "deit_small_patch16_224", "kwargs": {...}}`` or
    ``{"builder": "dinov2_probe", "kwargs": {...}}`` (the default model); see ``skeleton_of``.
    """
    from safetensors.torch import save_file
    import timm
    import triton

    info = getattr(deploy_model, "vitq_deploy", None)
    if info is None:
        raise ArtifactError("not a deploy model: call vitq.export(qmodel) first")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in deploy_model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"))
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "skeleton": skeleton, "modules": info["modules"],
           "method": method or {}, "sha256": _sha256(out / "model.safetensors"),
           "versions": {"torch": torch.__version__, "triton": triton.__version__, "timm": timm.__version__}}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out


def build_skeleton(skeleton: dict) -> nn.Module:
    """The fp model (random weights) whose modules are then replaced and overwritten."""
    builder = skeleton.get("builder")
    if builder == "timm":
        import timm
        kw = {k: v for k, v in skeleton.get("kwargs", {}).items() if k != "pretrained"}
        return timm.create_model(skeleton["name"], pretrained=False, **kw)
    if builder == "dinov2_probe":
        # DINOv2-S/14 + linear probe (the default model); weights come from the artifact
        import timm
        from .models import ProbeClassifier
        kw = skeleton["kwargs"]
        backbone = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                                     dynamic_img_size=True, img_size=kw["img_size"])
        size = kw["img_size"]
        backbone.pretrained_cfg = dict(backbone.pretrained_cfg, input_size=(3, size, size))
        return ProbeClassifier(backbone, nn.Linear(kw["in_features"], kw["num_classes"]), pool=kw["pool"])
    raise ArtifactError(f"unknown skeleton builder {builder!r}")


def skeleton_of(model: nn.Module, timm_name: str | None = None, timm_kwargs: dict | None = None) -> dict:
    """The skeleton description ``save`` needs, for the default model or a timm model."""
    from .models import ProbeClassifier
    if isinstance(model, ProbeClassifier):
        head = model.head
        size = model.pretrained_cfg.get("input_size", (3, 112, 112))[-1]
        return {"builder": "dinov2_probe", "name": "dinov2_small_fmnist",
                "kwargs": {"img_size": int(size), "pool": model.pool,
                           "in_features": int(head.in_features), "num_classes": int(head.out_features)}}
    if timm_name is None:
        raise ArtifactError("name the timm architecture (timm_name=...) so load can rebuild the model")
    return {"builder": "timm", "name": timm_name, "kwargs": dict(timm_kwargs or {})}


def load(path, expect_model: str | None = None, device="cpu") -> nn.Module:
    """Loads a deploy model written by ``save``; verifies format, version, checksum and names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    cfg_path, w_path = p / "config.json", p / "model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise ArtifactError(f"{p} is not a vitq artifact: needs config.json and model.safetensors")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{cfg_path} is not valid JSON: {e}") from None
    if cfg.get("format") != FORMAT:
        raise ArtifactError(f"{cfg_path}: format {cfg.get('format')!r}, expected {FORMAT!r}")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{cfg_path}: format version {cfg.get('format_version')} is not supported "
                            f"(this vitq reads version {FORMAT_VERSION})")
    name = cfg["skeleton"].get("name", cfg["skeleton"].get("builder"))
    if expect_model is not None and expect_model != name:
        raise ArtifactError(f"artifact holds model {name!r}, expected {expect_model!r}")
    digest = _sha256(w_path)
    if digest != cfg.get("sha256"):
        raise ArtifactError(f"{w_path} does not match the checksum in config.json (truncated or modified)")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{w_path} is not a readable safetensors file: {e}") from None
    model = build_skeleton(cfg["skeleton"]).eval()
    for mname, mcfg in cfg["modules"].items():
        _set_child(model, mname, dm.module_from_config(mcfg))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{w_path} does not fit the model described by config.json: {e}") from None
    model.vitq_deploy = {"modules": cfg["modules"]}
    return model.to(device)


def size_report(deploy_model: nn.Module, fp_model: nn.Module) -> dict:
    """Bytes of the matmul weights: deploy (codes + scales + zeros + colsums) vs fp16."""
    q_bytes = fp16_bytes = 0
    for _, m in deploy_model.named_modules():
        if isinstance(m, dm.QLinear):
            for t in (m.weight, m.w_scale, m.w_zero, m.w_colsum):
                if t is not None:
                    q_bytes += t.numel() * t.element_size()
            fp16_bytes += m.in_features * m.out_features * 2
    total_q = sum(t.numel() * t.element_size() for t in deploy_model.state_dict().values())
    total_fp16 = sum(t.numel() * 2 for t in fp_model.state_dict().values() if t.is_floating_point())
    return {"matmul_weight_bytes": q_bytes, "matmul_weight_bytes_fp16": fp16_bytes,
            "matmul_weight_ratio": fp16_bytes / max(q_bytes, 1), "model_bytes": total_q,
            "model_bytes_fp16": total_fp16, "model_ratio": total_fp16 / max(total_q, 1)}
