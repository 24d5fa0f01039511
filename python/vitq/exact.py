"""Integer evaluation path of the fake-quant model: in evaluation it computes the kernels' numbers.

The emulation forward (``F.linear`` of dequantized tensors, fp32 attention and softmax, torch's
LayerNorm and GELU) is what reconstruction differentiates through.  It lands on the same codes
as the kernels almost everywhere, but not exactly: an fp32 matmul of dequantized values rounds
differently from the kernels' exact integer product and epilogue, and a one-ulp difference that
lands on a rounding boundary flips a code, which then propagates through the following blocks.

So whenever gradients are off (``torch.no_grad``/``inference_mode``: evaluation, metrics and
the input captures of reconstruction) and a layer's quantizers are final, the wrapped modules
compute with the kernels' arithmetic instead (reference.py, and the CPU kernels' choices where
reference.py leaves an fp step open):

  * matmul inputs become integer codes exactly as ``reference.per_token_quantize`` makes them
    (``uniform_scale_zero``/``quantize_rows``/``outlier_mask``/``extract_outliers``);
  * linear layers: ``reference.qgemm``'s epilogue on the exact integer product
    (y = sw (s acc + o) + b, o the fp32 outlier sum in slot order), see ``qgemm_exact``;
  * attention: ``reference.log2_attention`` (exact logits, 40-bit fixed-point row sum, log2 P
    codes, exact P^ V planes), see ``log2_attention_exact``;
  * fc2 after Shift-Log2: ``reference.shift_log2_codes`` + ``reference.shiftlog2_qgemm`` with the
    shift folded into the bias (``reference.fold_shift_into_bias``), as the deploy MLP;
  * LayerNorm feeding a quantized matmul, and the GELU feeding Shift-Log2: the CPU kernels'
    float64 evaluation rounded once to fp32 (``layer_norm_f64``, ``gelu_f64``); the softmax
    exponent: float64 ``exp`` rounded once (the CPU kernel's ``expf`` is within 0.502 ulp of
    it, so the two round alike except on inputs within ~1e-3 ulp of a rounding midpoint).

Integer products are formed in fp32 when every partial sum is an integer below 2^24 (4-bit
operands, or 8-bit with short K), else in float64 (exact below 2^53), so they equal the kernels'
int32 accumulators in any summation order.

What remains different from the CPU kernels (measured in tests/test_export.py): the float64
LayerNorm / variance / erfc / exp are summed or evaluated in another order or library than the
kernels', an error of ~1e-16 relative that changes the fp32 result only when it falls within
that distance of an fp32 rounding midpoint (probability ~2^-29 per value), and then flips a
code only if that fp32 value also sits on a code boundary.

``emulation()`` switches the integer path off (the plain fake-quant forward, e.g. to measure
what it changes).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizers import (ActQuantizer, Log2Quantizer, ShiftLog2Quantizer, UniformActQuantizer, WeightQuantizer,
                         ref)

_FORCE_EMULATION = False
_EXACT_F32 = float(1 << 24)   # integers below this are exact fp32 partial sums


@contextlib.contextmanager
def emulation():
    """Use the float emulation forward even without gradients (the pre-integer behaviour)."""
    global _FORCE_EMULATION
    saved = _FORCE_EMULATION
    _FORCE_EMULATION = True
    try:
        yield
    finally:
        _FORCE_EMULATION = saved


def active() -> bool:
    """The integer path is used when no gradient is needed and it is not switched off."""
    return not _FORCE_EMULATION and not torch.is_grad_enabled()


# ---------------------------------------------------------------------------------------------
# readiness: a quantizer in its final, deterministic state
# ---------------------------------------------------------------------------------------------
def act_ready(q) -> bool:
    return (isinstance(q, ActQuantizer) and q.enabled
            and not q.observing and q.initialized and q.drop_prob == 0 and getattr(q, "blend", None) is None)


def weight_ready(wq) -> bool:
    return (isinstance(wq, WeightQuantizer) and wq.enabled and wq.mode in ("hard", "rtn")
            and wq.scale.numel() > 0 and getattr(wq, "blend", None) is None)


def _uniform_ready(q) -> bool:
    return isinstance(q, UniformActQuantizer) and act_ready(q) and q.bits <= 8


# ---------------------------------------------------------------------------------------------
# integer operands
# ---------------------------------------------------------------------------------------------
def weight_ints(wq: WeightQuantizer, w: torch.Tensor):
    """(w_jk - zw_j as float [N, K], sw fp32 [N], signed codes int8 [N, K], zw int32 [N])."""
    s = wq.scale.float()
    zc = wq.zero.float()[:, None]
    if wq.mode == "hard":
        q = wq.codes.reshape(wq.codes.shape[0], -1).float()
    else:  # rtn: the codes harden() would keep
        qmin, qmax = wq.qrange
        q = torch.clamp(torch.round(w.detach().float().reshape(w.shape[0], -1) / s[:, None]) + zc, qmin, qmax)
    return q - zc, s, q.to(torch.int8), wq.zero.to(torch.int32)


def act_ints(q: UniformActQuantizer, x2d: torch.Tensor):
    """Codes of x2d [M, K] as reference.per_token_quantize makes them, centered: (q - z as float
    [M, K] (0 at outliers), s fp32 [M], outlier mask [M, K] or None, x2d as fp32)."""
    xf = x2d.float()
    M, K = xf.shape
    mask = ref.outlier_mask(xf, q.alpha) if q.alpha is not None else None
    dense = xf if mask is None else torch.where(mask, torch.zeros_like(xf), xf)
    if mask is not None:
        q._check_capacity(mask)
    if q.granularity == "token":
        lo = dense.amin(dim=1).clamp(max=0) if K else torch.zeros(M, device=xf.device)
        hi = dense.amax(dim=1).clamp(min=0) if K else torch.zeros(M, device=xf.device)
        s, zu = ref.uniform_scale_zero(lo, hi, q.bits)
    else:
        T = q.scale.numel()
        if M % T:
            raise ValueError(f"static scales of length {T} do not tile {M} rows")
        s = q.scale.detach().float().reshape(T).repeat(M // T)
        zu = (q.zero.to(torch.int32) + (1 << (q.bits - 1))).reshape(T).repeat(M // T)
    codes = ref.quantize_rows(dense, s, zu, q.bits)
    centered = (codes - zu[:, None]).float()
    if mask is not None:
        centered = torch.where(mask, torch.zeros_like(centered), centered)
    return centered, s, mask, xf


def int_matmul(a: torch.Tensor, b: torch.Tensor, bound: float) -> torch.Tensor:
    """a @ b for integer-valued float tensors, exact, rounded once to fp32.  ``bound`` >= every
    |partial sum| (e.g. K max|a| max|b|): fp32 when below 2^24, else float64 (exact below 2^53)."""
    if bound < _EXACT_F32:
        return a.float() @ b.float()
    if bound >= 2.0 ** 53:
        raise ValueError(f"integer product bound {bound:.3g} exceeds float64's exact range")
    return (a.double() @ b.double()).float()


def qgemm_exact(a: torch.Tensor, s: torch.Tensor, mask, xf, wz: torch.Tensor, sw: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """reference.qgemm's arithmetic on centered integer operands: [M, N] fp32.

        acc = sum_k a_ik wz_jk (exact), y = sw_j (s_i float(acc) + o_ij) + b_j
    with o_ij = sum over row i's outlier columns k, in increasing k, of x_ik wz_jk (fp32)."""
    K = a.shape[1]
    bound = K * max(float(a.abs().max()) if a.numel() else 0.0, 1.0) * max(float(wz.abs().max()) if wz.numel() else 0.0, 1.0)
    acc = int_matmul(a, wz.t(), bound)
    y = s.float()[:, None] * acc
    if mask is not None:
        n_max = int(mask.sum(dim=1).max()) if mask.numel() else 0
        if n_max:
            # the fixed-capacity slot lists of reference.extract_outliers (columns in increasing
            # order, padding slots add 0), built on x's device
            count = mask.sum(dim=1)
            order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :n_max]
            keep = torch.arange(n_max, device=xf.device)[None, :] < count[:, None]
            idx = torch.where(keep, order, torch.zeros_like(order))
            val = torch.where(keep, torch.gather(xf, 1, order), torch.zeros((), device=xf.device))
            o = torch.zeros_like(y)
            for c in range(n_max):                           # slot order, as the kernels
                o = o + val[:, c:c + 1] * wz[:, idx[:, c].long()].t()
            y = y + o
    y = sw.float()[None, :] * y
    if bias is not None:
        y = y + bias.float()[None, :]
    return y


# ---------------------------------------------------------------------------------------------
# the CPU kernels' fp steps outside reference.py's exact parts
# ---------------------------------------------------------------------------------------------
def layer_norm_f64(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """LayerNorm with float64 statistics and one rounding to fp32 (csrc/cpu/layernorm_quantize.cpp:
    mean, then the centered sum of squares, rstd = 1 / sqrt(var + eps), y = (x - mean) rstd w + b)."""
    xd = x.double()
    K = x.shape[-1]
    mean = xd.sum(dim=-1, keepdim=True) / K
    d = xd - mean
    rstd = 1.0 / torch.sqrt((d * d).sum(dim=-1, keepdim=True) / K + eps)
    y = d * rstd
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y.float()


def gelu_f64(h: torch.Tensor) -> torch.Tensor:
    """Exact-erf GELU as the CPU fc1 kernel: fp32(0.5 h erfc(-h / sqrt 2)) evaluated in float64."""
    hd = h.double()
    return (0.5 * hd * torch.special.erfc(-hd * math.sqrt(0.5))).float()


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------
def linear_ready(layer) -> bool:
    if not (active() and weight_ready(layer.weight_quant)):
        return False
    q = layer.act_quant
    if isinstance(q, ShiftLog2Quantizer):
        return act_ready(q) and q.bits <= 8
    return _uniform_ready(q)


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    """QuantLinear's forward with the kernels' arithmetic (see the module doc)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    wz, sw, wcodes, wzero = weight_ints(layer.weight_quant, layer.weight)
    q = layer.act_quant
    if isinstance(q, ShiftLog2Quantizer):
        # the deploy MLP: Shift-Log2 codes, exact decode GEMM, the shift folded into the bias
        shift, scale = float(q.shift), q.scale.detach().float().reshape(-1)[:1]
        codes = ref.shift_log2_codes(x2, q.bits, shift, float(scale), q.substeps)
        bias = ref.fold_shift_into_bias(layer.bias, shift, wcodes, sw, wzero)
        y = ref.shiftlog2_qgemm(codes, q.bits, q.substeps, scale, wcodes, sw, wzero, bias, 8, torch.float32)
    else:
        a, s, mask, xf = act_ints(q, x2)
        y = qgemm_exact(a, s, mask, xf, wz, sw, layer.bias)
    return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])


def conv_ready(conv) -> bool:
    k = tuple(conv.weight.shape[2:])
    return (active() and weight_ready(conv.weight_quant) and _uniform_ready(conv.act_quant)
            and conv.act_quant.granularity == "tensor" and tuple(conv.stride) == k
            and all(p == 0 for p in conv.padding) and conv.groups == 1 and tuple(conv.dilation) == (1, 1))


def conv(conv, x: torch.Tensor) -> torch.Tensor:
    """Patch convolution (kernel == stride) as the deploy model runs it: im2col rows in
    (cin, kh, kw) order through the per-tensor quantizer and qgemm."""
    B, Cin, H, W = x.shape
    ph, pw = conv.weight.shape[2:]
    gh, gw = H // ph, W // pw
    x = x[:, :, :gh * ph, :gw * pw]
    cols = x.float().reshape(B, Cin, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B * gh * gw, -1)
    a, s, mask, xf = act_ints(conv.act_quant, cols)
    wz, sw, _, _ = weight_ints(conv.weight_quant, conv.weight)
    y = qgemm_exact(a, s, mask, xf, wz, sw, conv.bias)
    return y.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
def _p_max_code(p):
    """The largest kept log2 code of a post-softmax quantizer the attention kernel runs, or None
    when the quantizer is not one of them (it then stays emulated)."""
    from . import quantizers as Q
    top = (1 << p.bits) - 1
    truncated = getattr(Q, "TruncatedLog2Quantizer", None)
    if type(p) is Log2Quantizer and set(p.export_params()) == {"bits", "substeps", "scale"}:
        return top - 1
    if truncated is not None and type(p) is truncated and 0 <= int(p.max_code) <= top - 1:
        return int(p.max_code)
    return None


def attention_ready(attn) -> bool:
    if not active():
        return False
    if not all(_uniform_ready(q) and q.granularity == "tensor" and q.alpha is None
               for q in (attn.q_quant, attn.k_quant, attn.v_quant)):
        return False
    p = attn.p_quant
    # _p_max_code first: it is None for quantizers the kernel does not run (softmax_quant='uniform')
    return (_p_max_code(p) is not None and act_ready(p) and p.bits <= 8 and p.substeps in ref.ATTN_SUBSTEPS
            and float(p.scale.reshape(-1)[0]) == 1.0)


def _tensor_ints(q: UniformActQuantizer, x: torch.Tensor):
    a, s, _, _ = act_ints(q, x.reshape(-1, x.shape[-1]))
    return a.reshape(x.shape), s[:1]


def log2_attention_exact(aq, ak, av, sq, sk, sv, sm_scale: float, bias, p_bits: int, substeps: int,
                         max_code: int | None = None):
    """reference.log2_attention on centered integer q/k/v [B, H, N, D] with per-tensor scales, the
    exponent evaluated in float64 and rounded once; codes above ``max_code`` (truncated log2;
    None: 2^b - 2) are zero.  Returns (y [B, H, N, D] fp32, P, P^)."""
    D = aq.shape[-1]
    acc = int_matmul(aq, ak.transpose(-1, -2), D * float(aq.abs().max().clamp(min=1) * ak.abs().max().clamp(min=1)))
    alpha = (torch.tensor(sm_scale, dtype=torch.float32) * sq.float().cpu().reshape(())) * sk.float().cpu().reshape(())
    t = acc * alpha.to(acc.device)
    if bias is not None:
        t = t + bias.float()
    m = t.amax(dim=-1, keepdim=True)
    e = torch.exp((t - m).double()).float()
    fixed = float(1 << ref.ATTN_FIXED_POINT_BITS)
    L = (e * fixed).to(torch.int64).sum(dim=-1, keepdim=True)
    l = L.float() * (1.0 / fixed)
    P = e * torch.div(torch.ones_like(l), l)
    top = (1 << p_bits) - 1
    codes = ref.log_code_unclamped(P, substeps).clamp(0, top)
    keep = codes <= (top - 1 if max_code is None else max_code)
    vh = av.double()
    planes = []
    for r in range(1 << substeps):
        sel = keep & ((codes & ((1 << substeps) - 1)) == r)
        val = torch.where(sel, torch.exp2(-(codes >> substeps).double()), torch.zeros((), dtype=torch.float64,
                                                                                       device=P.device))
        planes.append((val @ vh).float())
    o = planes[0]
    for r in range(1, 1 << substeps):
        o = o + torch.tensor(ref.LOG_MANTISSAS[substeps][r], dtype=torch.float32) * planes[r]
    y = sv.float().reshape(()) * o
    p_hat = torch.where(keep, ref.log_decode(codes, substeps), torch.zeros_like(P))
    return y, P, p_hat


def attention(attn, q, k, v, bias=None) -> torch.Tensor:
    """_QuantAttentionBase._attend with the kernels' arithmetic: [B, H, N, D] in v's dtype."""
    aq, sq = _tensor_ints(attn.q_quant, q)
    ak, sk = _tensor_ints(attn.k_quant, k)
    av, sv = _tensor_ints(attn.v_quant, v)
    if bias is not None:
        bias = bias.float().expand(*aq.shape[:-2], aq.shape[-2], ak.shape[-2])
    p = attn.p_quant
    y, P, p_hat = log2_attention_exact(aq, ak, av, sq, sk, sv, float(attn.scale), bias, p.bits, p.substeps,
                                       _p_max_code(p))
    if attn.record_probs:
        attn.last_probs, attn.last_probs_hat = P, p_hat
    return y.to(v.dtype)


# ---------------------------------------------------------------------------------------------
# producers: the LayerNorm before a quantized matmul, the GELU before Shift-Log2
# ---------------------------------------------------------------------------------------------
class ExactLayerNorm(nn.LayerNorm):
    """nn.LayerNorm that, on the integer path, computes as the fused LayerNorm-quantize kernel
    (float64 statistics, one rounding) when its consumer quantizes its output."""

    def forward(self, x):
        consumer = self.__dict__.get("_vitq_consumer")
        if active() and consumer is not None and act_ready(consumer):
            return layer_norm_f64(x, self.weight, self.bias, self.eps).to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class ExactGELU(nn.GELU):
    """Exact-erf GELU that, on the integer path, computes as the fc1 kernel's epilogue."""

    def forward(self, x):
        consumer = self.__dict__.get("_vitq_consumer")
        if active() and consumer is not None and act_ready(consumer):
            return gelu_f64(x).to(x.dtype)
        return F.gelu(x)


def _link(module: nn.Module, consumer: nn.Module) -> None:
    # a plain attribute, not a submodule: the quantizer is registered where it lives
    object.__setattr__(module, "_vitq_consumer", consumer)


def _exact_norm(norm: nn.Module, consumer) -> nn.Module:
    if type(norm) is ExactLayerNorm:
        _link(norm, consumer)
        return norm
    new = ExactLayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.weight is not None)
    new.weight, new.bias = norm.weight, norm.bias          # the same parameters
    new.train(norm.training)
    _link(new, consumer)
    return new


def _plain_layernorm(m) -> bool:
    if not isinstance(m, nn.LayerNorm) or isinstance(m, ExactLayerNorm):
        return isinstance(m, ExactLayerNorm)
    try:
        from timm.layers import LayerNorm as TimmLayerNorm
    except ImportError:  # pragma: no cover
        TimmLayerNorm = nn.LayerNorm
    if type(m) is TimmLayerNorm and getattr(m, "fast_norm", getattr(m, "_fast_norm", False)):
        return False
    return type(m) in (nn.LayerNorm, TimmLayerNorm) and len(m.normalized_shape) == 1


def attach_producers(model: nn.Module) -> None:
    """Links every LayerNorm that feeds a quantized matmul (block norm1 -> attention qkv, norm2 ->
    fc1, Swin patch merging norm -> reduction) and every exact GELU feeding a Shift-Log2 fc2 to
    the consumer's quantizer, so that the integer path computes them as the deploy kernels."""
    from .wrap import QuantLinear, _QuantAttentionBase
    for m in list(model.modules()):
        pairs = []
        attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
        if isinstance(attn, _QuantAttentionBase) and hasattr(m, "norm1"):
            pairs.append(("norm1", attn.qkv.act_quant))
        if mlp is not None and isinstance(getattr(mlp, "fc1", None), QuantLinear) and hasattr(m, "norm2"):
            pairs.append(("norm2", mlp.fc1.act_quant))
        if isinstance(getattr(m, "reduction", None), QuantLinear) and hasattr(m, "norm"):
            pairs.append(("norm", m.reduction.act_quant))
        for name, consumer in pairs:
            norm = getattr(m, name)
            if _plain_layernorm(norm):
                setattr(m, name, _exact_norm(norm, consumer))
        fc2 = getattr(m, "fc2", None)
        act = getattr(m, "act", None)
        if isinstance(fc2, QuantLinear) and isinstance(fc2.act_quant, ShiftLog2Quantizer) \
                and type(act) in (nn.GELU, ExactGELU) and act.approximate == "none":
            if type(act) is nn.GELU:
                act = ExactGELU()
                m.act = act
            _link(act, fc2.act_quant)
