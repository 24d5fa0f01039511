"""Deploy modules: a quantized ViT block built only from torch.ops.vitq ops.

They hold integer weights and static quantization parameters as buffers (no calibration
state, no Python objects beyond ints/floats), so a deploy model is saved as safetensors
+ JSON and loaded without the calibration layer.  Data flow of one block:

    x ─ layernorm_quantize ─ qkv qgemm ─ per-tensor q/k/v codes ─ log2_attention (codes out)
      ─ proj qgemm ─ (layer scale) ─ + x
      ─ layernorm_quantize ─ fc1 qgemm+GELU+Shift-Log2 codes ─ fc2 decode GEMM ─ (layer scale) ─ + x

Everything between LayerNorm and the residual add stays in integer codes; the only fp
tensors written are the qkv output (quantized per tensor right away) and the residual stream.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops  # noqa: F401  (registers torch.ops.vitq)
from .reference import ACT_BITS, WEIGHT_BITS, is_packed, qmin_qmax

vitq = torch.ops.vitq


def _expand_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A static per-tensor [1] or per-position [T] parameter repeated over `rows` rows."""
    return t.repeat(rows // t.numel())


class ActQuant(nn.Module):
    """How a matmul input is quantized: uniform per-token (dynamic, with optional POQ outliers)
    or static ([1] per-tensor / [T] per-position) scale and signed zero point."""

    def __init__(self, bits: int, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                 outlier_threshold: float | None = None, max_outliers: int = 0):
        super().__init__()
        if bits not in ACT_BITS:
            raise ValueError(f"deployable activation bits are {ACT_BITS}, got {bits}")
        self.bits = int(bits)
        self.outlier_threshold = None if outlier_threshold is None else float(outlier_threshold)
        self.max_outliers = int(max_outliers) if outlier_threshold is not None else 0
        self.register_buffer("scale", None if scale is None else scale.detach().float().reshape(-1).clone())
        self.register_buffer("zero", None if zero is None else zero.detach().to(torch.int32).reshape(-1).clone())

    def extra_repr(self):
        kind = "dynamic" if self.scale is None else f"static[{self.scale.numel()}]"
        return f"bits={self.bits}, {kind}, alpha={self.outlier_threshold}, capacity={self.max_outliers}"

    def quantize(self, x2d: torch.Tensor):
        return vitq.per_token_quantize(x2d, self.bits, self.scale, self.zero, self.outlier_threshold,
                                       self.max_outliers)


class QLinear(nn.Module):
    """y = qgemm(quantize(x), W) with per-channel weights: int8, or packed int4 for 3/4-bit codes."""

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
                 bias: torch.Tensor | None, act: ActQuant, w_bits: int):
        super().__init__()
        if w_bits not in WEIGHT_BITS:
            raise ValueError(f"deployable weight bits are {WEIGHT_BITS}, got {w_bits}")
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise TypeError("weight codes must be int8 [N, K] (signed domain)")
        self.out_features, self.in_features = codes.shape
        self.w_bits = int(w_bits)
        lo, hi = qmin_qmax(w_bits)     # the declared width's range (3 bit: [-4, 3] in the int4 container)
        if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
            raise ValueError(f"weight codes outside the {w_bits}-bit range [{lo}, {hi}]")
        self.register_buffer("weight", vitq.pack_int4(codes.contiguous()) if is_packed(w_bits) else codes.clone())
        self.register_buffer("w_scale", w_scale.detach().float().clone())
        zero_used = w_zero is not None and bool((w_zero != 0).any())
        self.register_buffer("w_zero", w_zero.detach().to(torch.int32).clone() if zero_used else None)
        self.register_buffer("w_colsum", codes.to(torch.int32).sum(1, dtype=torch.int32))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.act = act

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}"

    def gemm(self, q, out_dtype=torch.float32):
        codes, s, z, rs, idx, val, _ = q
        has_out = idx.shape[1] > 0
        return vitq.qgemm(codes, s, z, rs, self.weight, self.w_scale, self.w_zero, self.w_colsum, self.bias,
                          idx if has_out else None, val if has_out else None, self.act.bits, self.w_bits,
                          out_dtype)

    def forward(self, x):
        shape = x.shape
        y = self.gemm(self.act.quantize(x.reshape(-1, shape[-1]).contiguous()))
        return y.reshape(*shape[:-1], self.out_features)


class QLayerNormQuant(nn.Module):
    """LayerNorm fused with the consumer's activation quantizer (POQ for qkv/fc1)."""

    def __init__(self, norm: nn.LayerNorm, act: ActQuant):
        super().__init__()
        self.register_buffer("weight", norm.weight.detach().float().clone())
        self.register_buffer("bias", norm.bias.detach().float().clone())
        self.eps = float(norm.eps)
        self.act = act

    def forward(self, x2d):
        a = self.act
        return vitq.layernorm_quantize(x2d, self.weight, self.bias, self.eps, a.bits, a.scale, a.zero,
                                       a.outlier_threshold, a.max_outliers)


class QAttention(nn.Module):
    """Multi-head self-attention on codes: qkv qgemm -> q/k/v per-tensor codes ->
    log2_attention (P log2-coded, output quantized for proj) -> proj qgemm."""

    def __init__(self, qkv: QLinear, proj: QLinear, num_heads: int, sm_scale: float,
                 qkv_scale: torch.Tensor, qkv_zero: torch.Tensor, qkv_bits: int, p_bits: int, p_substeps: int,
                 p_max_code: int | None = None):
        super().__init__()
        self.qkv, self.proj = qkv, proj
        self.num_heads = int(num_heads)
        self.sm_scale = float(sm_scale)
        # q, k and v rows of the qkv output, viewed as [tokens * 3, C], tile as T = 3 static scales
        self.qkv_act = ActQuant(qkv_bits, qkv_scale.reshape(3), qkv_zero.reshape(3))
        self.p_bits, self.p_substeps = int(p_bits), int(p_substeps)
        # truncated uniform-log2 (TP-ViT): codes above p_max_code mean P^ = 0; None = plain log2
        self.p_max_code = None if p_max_code is None else int(p_max_code)
        if proj.act.scale is None or proj.act.scale.numel() != 1:
            raise ValueError("the proj input must use a static per-tensor quantizer")

    def forward(self, q_in, B: int, N: int, bias: torch.Tensor | None = None):
        """q_in: the quantized block input (layernorm_quantize outputs); returns fp32 [B*N, C]."""
        C = self.qkv.out_features // 3
        H = self.num_heads
        D = C // H
        qkv = self.qkv.gemm(q_in)                                            # fp32 [B*N, 3C]
        codes = self.qkv_act.quantize(qkv.view(B * N * 3, C))[0]
        if is_packed(self.qkv_act.bits):
            codes = vitq.unpack_int4(codes)                                  # attention takes 1 code/byte
        qkv_c = codes.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)             # [3, B, H, N, D], D contiguous
        s, z = self.qkv_act.scale, self.qkv_act.zero
        pa = self.proj.act
        out = vitq.log2_attention(qkv_c[0], qkv_c[1], qkv_c[2], s[0:1], z[0:1], s[1:2], z[1:2], s[2:3], z[2:3],
                                  self.sm_scale, bias, self.p_bits, self.p_substeps, pa.scale, pa.zero, pa.bits,
                                  torch.float32, self.p_max_code)
        a = out.reshape(B * N, -1)
        rows = B * N
        rowsum = (vitq.unpack_int4(a) if is_packed(pa.bits) else a).to(torch.int32).sum(1, dtype=torch.int32)
        empty_i = a.new_zeros((rows, 0), dtype=torch.int32)
        q = (a, _expand_rows(pa.scale, rows), _expand_rows(pa.zero, rows), rowsum, empty_i,
             a.new_zeros((rows, 0), dtype=torch.float32), None)
        return self.proj.gemm(q)


class QMlp(nn.Module):
    """fc1 -> GELU -> fc2.  With Shift-Log2 (slq=True): fc1's epilogue writes log2 codes and
    fc2 decodes them (shift folded into fc2's bias).  Without: fc1 -> GELU -> per-tensor
    uniform codes -> fc2, the ablation without SLQ."""

    def __init__(self, fc1: QLinear, fc2: QLinear, slq: dict | None):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.slq = slq is not None
        if self.slq:
            self.slq_bits, self.slq_substeps = int(slq["bits"]), int(slq["substeps"])
            self.slq_shift = float(slq["shift"])
            self.register_buffer("slq_scale", torch.as_tensor(slq["scale"], dtype=torch.float32).reshape(1).clone())
            self.slq_scale_value = float(self.slq_scale)   # a Python float for the op (no graph break)
            from .reference import fold_shift_into_bias
            wcodes = vitq.unpack_int4(fc2.weight) if is_packed(fc2.w_bits) else fc2.weight
            self.register_buffer("fc2_bias_folded", fold_shift_into_bias(fc2.bias, self.slq_shift, wcodes,
                                                                         fc2.w_scale, fc2.w_zero))

    def forward(self, q_in):
        if self.slq:
            f1 = self.fc1
            codes, s, z, rs, idx, val, _ = q_in
            has_out = idx.shape[1] > 0
            g = vitq.qgemm_gelu_shiftlog2(codes, s, z, rs, f1.weight, f1.w_scale, f1.w_zero, f1.w_colsum, f1.bias,
                                          idx if has_out else None, val if has_out else None, f1.act.bits,
                                          f1.w_bits, self.slq_shift, self.slq_scale_value, self.slq_bits,
                                          self.slq_substeps)
            f2 = self.fc2
            return vitq.shiftlog2_qgemm(g, self.slq_bits, self.slq_substeps, self.slq_scale, f2.weight,
                                        f2.w_scale, f2.w_zero, self.fc2_bias_folded, f2.w_bits, torch.float32)
        h = F.gelu(self.fc1.gemm(q_in))
        return self.fc2(h)


class QBlock(nn.Module):
    """A pre-norm ViT block (ViT, DeiT, DINOv2 with layer scale) on the vitq ops."""

    def __init__(self, ln1: QLayerNormQuant, attn: QAttention, ls1: torch.Tensor | None,
                 ln2: QLayerNormQuant, mlp: QMlp, ls2: torch.Tensor | None):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = ln1, attn, ln2, mlp
        self.register_buffer("ls1", None if ls1 is None else ls1.detach().float().clone())
        self.register_buffer("ls2", None if ls2 is None else ls2.detach().float().clone())

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise NotImplementedError("vitq deploy blocks support unmasked self-attention only")
        B, N, C = x.shape
        dtype = x.dtype
        r = x.reshape(B * N, C).float()
        a = self.attn(self.ln1(r), B, N)
        r = r + (a * self.ls1 if self.ls1 is not None else a)
        m = self.mlp(self.ln2(r))
        r = r + (m * self.ls2 if self.ls2 is not None else m)
        return r.reshape(B, N, C).to(dtype)


class QPatchEmbedConv(nn.Module):
    """Patch-embedding Conv2d (kernel == stride, no padding) as im2col + QLinear."""

    def __init__(self, linear: QLinear, patch: tuple[int, int], out_channels: int):
        super().__init__()
        self.linear = linear
        self.patch = tuple(int(p) for p in patch)
        self.out_channels = int(out_channels)

    def forward(self, x):
        B, Cin, Himg, Wimg = x.shape
        ph, pw = self.patch
        if Himg % ph or Wimg % pw:
            raise ValueError(f"image {Himg}x{Wimg} is not a multiple of the patch {ph}x{pw}")
        gh, gw = Himg // ph, Wimg // pw
        # rows in (cin, kh, kw) order, the flattening of Conv2d's weight [Cout, Cin, kh, kw]
        cols = x.float().reshape(B, Cin, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B * gh * gw, -1)
        y = self.linear(cols.contiguous())
        return y.reshape(B, gh, gw, self.out_channels).permute(0, 3, 1, 2).to(x.dtype)


# ---------------------------------------------------------------------------
# configs: every deploy module can be rebuilt from (config, state_dict) alone, so a saved
# deploy model needs neither calibration code nor calibration data to load
# ---------------------------------------------------------------------------
def module_config(m: nn.Module) -> dict:
    if isinstance(m, ActQuant):
        return {"type": "ActQuant", "bits": m.bits, "outlier_threshold": m.outlier_threshold,
                "max_outliers": m.max_outliers, "static_len": 0 if m.scale is None else m.scale.numel()}
    if isinstance(m, QLinear):
        return {"type": "QLinear", "in": m.in_features, "out": m.out_features, "w_bits": m.w_bits,
                "has_w_zero": m.w_zero is not None, "has_bias": m.bias is not None, "act": module_config(m.act)}
    if isinstance(m, QLayerNormQuant):
        return {"type": "QLayerNormQuant", "dim": m.weight.numel(), "eps": m.eps, "act": module_config(m.act)}
    if isinstance(m, QAttention):
        return {"type": "QAttention", "qkv": module_config(m.qkv), "proj": module_config(m.proj),
                "num_heads": m.num_heads, "sm_scale": m.sm_scale, "qkv_bits": m.qkv_act.bits,
                "p_bits": m.p_bits, "p_substeps": m.p_substeps, "p_max_code": m.p_max_code}
    if isinstance(m, QMlp):
        slq = ({"bits": m.slq_bits, "substeps": m.slq_substeps, "shift": m.slq_shift, "scale": m.slq_scale_value}
               if m.slq else None)
        return {"type": "QMlp", "fc1": module_config(m.fc1), "fc2": module_config(m.fc2), "slq": slq}
    if isinstance(m, QBlock):
        return {"type": "QBlock", "ln1": module_config(m.ln1), "attn": module_config(m.attn),
                "ln2": module_config(m.ln2), "mlp": module_config(m.mlp),
                "ls1": m.ls1 is not None, "ls2": m.ls2 is not None, "dim": m.ln1.weight.numel()}
    if isinstance(m, QPatchEmbedConv):
        return {"type": "QPatchEmbedConv", "linear": module_config(m.linear), "patch": list(m.patch),
                "out_channels": m.out_channels}
    from . import swin
    if isinstance(m, (swin.QSwinBlock, swin.QPatchMerging)):
        return swin.module_config(m)
    raise TypeError(f"not a vitq deploy module: {type(m).__name__}")


def module_from_config(cfg: dict) -> nn.Module:
    """A module with the right structure and placeholder buffers; load_state_dict fills them."""
    t = cfg["type"]
    if t == "ActQuant":
        n = cfg["static_len"]
        return ActQuant(cfg["bits"], torch.ones(n) if n else None, torch.zeros(n, dtype=torch.int32) if n else None,
                        cfg["outlier_threshold"], cfg["max_outliers"])
    if t == "QLinear":
        return QLinear(torch.zeros(cfg["out"], cfg["in"], dtype=torch.int8), torch.ones(cfg["out"]),
                       torch.ones(cfg["out"], dtype=torch.int32) if cfg["has_w_zero"] else None,
                       torch.zeros(cfg["out"]) if cfg["has_bias"] else None, module_from_config(cfg["act"]),
                       cfg["w_bits"])
    if t == "QLayerNormQuant":
        return QLayerNormQuant(nn.LayerNorm(cfg["dim"], eps=cfg["eps"]), module_from_config(cfg["act"]))
    if t == "QAttention":
        return QAttention(module_from_config(cfg["qkv"]), module_from_config(cfg["proj"]), cfg["num_heads"],
                          cfg["sm_scale"], torch.ones(3), torch.zeros(3, dtype=torch.int32), cfg["qkv_bits"],
                          cfg["p_bits"], cfg["p_substeps"], cfg.get("p_max_code"))
    if t == "QMlp":
        slq = cfg["slq"]
        return QMlp(module_from_config(cfg["fc1"]), module_from_config(cfg["fc2"]), slq)
    if t == "QBlock":
        d = cfg["dim"]
        return QBlock(module_from_config(cfg["ln1"]), module_from_config(cfg["attn"]),
                      torch.ones(d) if cfg["ls1"] else None, module_from_config(cfg["ln2"]),
                      module_from_config(cfg["mlp"]), torch.ones(d) if cfg["ls2"] else None)
    if t == "QPatchEmbedConv":
        return QPatchEmbedConv(module_from_config(cfg["linear"]), tuple(cfg["patch"]), cfg["out_channels"])
    from . import swin
    if t in swin.TYPES:
        return swin.module_from_config(cfg)
    raise ValueError(f"unknown deploy module type {t!r} in the artifact")


DEPLOY_TYPES = (QLinear, QLayerNormQuant, QAttention, QMlp, QBlock, QPatchEmbedConv)

from .swin import QPatchMerging, QSwinBlock  # noqa: E402  (swin.py builds on the classes above)

DEPLOY_TYPES = DEPLOY_TYPES + (QSwinBlock, QPatchMerging)
