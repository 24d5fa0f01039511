"""The model wrapper on timm ViT / DeiT (distilled) / Swin / DINOv2-style models with random weights:
every matmul input is quantized, fp mode reproduces the original model, quantized forward runs."""
import pytest
import torch
import torch.nn as nn
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

import vitq
from vitq.quantizers import Log2Quantizer, ShiftLog2Quantizer, UniformActQuantizer
from vitq.wrap import (QuantAttention, QuantConv2d, QuantLinear, QuantWindowAttention, UnsupportedModuleError,
                       act_quantizers, fp_mode, quant_layers, wrap_model)

# small configurations of the real architectures (the code paths are those of the full models)
MODELS = {
    "deit_distilled": (lambda: VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                                          num_heads=2, num_classes=10), 32),
    "dinov2_style": (lambda: VisionTransformer(img_size=28, patch_size=7, embed_dim=64, depth=2, num_heads=2,
                                               num_classes=10, init_values=1e-1, dynamic_img_size=True), 28),
    "swin": (lambda: SwinTransformer(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2),
                                     num_heads=(2, 4), num_classes=10), 64),
}
FAST = dict(iters=2, calib_images=4, batch_size=2, progress=False)


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_wrap_covers_every_matmul_and_fp_mode_is_exact(name):
    make, size = MODELS[name]
    model = make().eval()
    linears = count(model, nn.Linear)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    q = wrap_model(make().eval(), vitq.ADFQConfig())
    q.load_state_dict(model.state_dict(), strict=False)
    # every Linear and the patch conv became quantized layers, nothing else holds a matmul
    assert count(q, nn.Linear) == 0 and count(q, nn.Conv2d) == 0
    assert count(q, QuantLinear) == linears and count(q, QuantConv2d) == 1
    attn_cls = QuantWindowAttention if name == "swin" else QuantAttention
    n_attn = count(q, attn_cls)
    assert n_attn == 4 if name == "swin" else n_attn == 2
    roles = [layer.role for _, layer in quant_layers(q)]
    for role in ("qkv", "proj", "fc1", "fc2"):
        assert roles.count(role) == n_attn
    assert roles.count("stem") == 1 and roles.count("head") == (2 if name == "deit_distilled" else 1)
    assert roles.count("merge") == (1 if name == "swin" else 0)
    # q, k, v, P of both attention matmuls have their own quantizers
    for m in q.modules():
        if isinstance(m, attn_cls):
            assert isinstance(m.q_quant, UniformActQuantizer) and isinstance(m.k_quant, UniformActQuantizer)
            assert isinstance(m.v_quant, UniformActQuantizer) and isinstance(m.p_quant, Log2Quantizer)
    # fp mode computes the original model (attention rewritten unfused: fp32 rounding only)
    with torch.no_grad(), fp_mode(q):
        out = q(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_quantized_forward_shapes_and_roles(name):
    make, size = MODELS[name]
    model = make().eval()
    x = torch.randn(4, 3, size, size)
    qm = vitq.quantize(model, vitq.ADFQConfig(w_bits=4, a_bits=4, **FAST), x)
    with torch.no_grad():
        y, y_fp = qm(x), model(x)
    assert y.shape == y_fp.shape and torch.isfinite(y).all()
    assert not torch.equal(y, y_fp)
    kinds = {n: type(q) for n, q in act_quantizers(qm)}
    assert any(t is ShiftLog2Quantizer for n, t in kinds.items() if n.endswith("fc2.act_quant"))
    for n, q in act_quantizers(qm):
        if n.endswith(("qkv.act_quant", "fc1.act_quant")):
            assert q.granularity == "token" and q.alpha in (5.0, 10.0) and q.capacity >= 8
        if n.endswith(("patch_embed.proj.act_quant", "head.act_quant")):
            assert q.bits == 8
    # the original model is untouched (quantize copies it)
    assert count(model, QuantLinear) == 0


def test_component_switches_change_quantizers():
    make, size = MODELS["dinov2_style"]
    x = torch.randn(4, 3, size, size)
    qm = vitq.quantize(make().eval(), vitq.ADFQConfig(poq=False, slq=False, amo=False, **FAST), x)
    for n, q in act_quantizers(qm):
        if n.endswith(("qkv.act_quant", "fc1.act_quant", "fc2.act_quant")):
            assert isinstance(q, UniformActQuantizer) and q.granularity == "tensor" and q.alpha is None
    base = vitq.quantize(make().eval(), vitq.ADFQConfig.baseline(**FAST), x)
    assert all(isinstance(m.p_quant, UniformActQuantizer) for m in base.modules() if isinstance(m, QuantAttention))
    static = vitq.quantize(make().eval(), vitq.ADFQConfig(poq_granularity="position", amo=False, **FAST), x)
    n_tokens = 1 + (size // 7) ** 2
    for n, q in act_quantizers(static):
        if n.endswith("qkv.act_quant"):
            assert q.granularity == "position" and q.scale.numel() == n_tokens


def test_unsupported_modules_are_named():
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = MODELS["deit_distilled"][0]()
            self.extra = nn.MultiheadAttention(64, 2)

        def forward(self, x):
            return self.vit(x)

    with pytest.raises(UnsupportedModuleError, match=r"extra \(MultiheadAttention\)"):
        wrap_model(WithMHA(), vitq.ADFQConfig())

    class ConvStem(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 3, 3, padding=1)
            self.vit = MODELS["deit_distilled"][0]()

    with pytest.raises(UnsupportedModuleError, match="stem .Conv2d outside the patch embedding"):
        wrap_model(ConvStem(), vitq.ADFQConfig())

    from timm.layers import GluMlp
    glu = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, mlp_layer=GluMlp)
    with pytest.raises(UnsupportedModuleError, match="GluMlp"):
        wrap_model(glu, vitq.ADFQConfig())
    with pytest.raises(UnsupportedModuleError, match="no supported attention"):
        wrap_model(nn.Sequential(nn.Linear(4, 4)), vitq.ADFQConfig())


def test_wrap_twice_is_refused():
    q = wrap_model(MODELS["deit_distilled"][0](), vitq.ADFQConfig())
    with pytest.raises(ValueError, match="already"):
        wrap_model(q, vitq.ADFQConfig())
