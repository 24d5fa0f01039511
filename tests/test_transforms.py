"""Key centering (python/vitq/transforms.py) is an exact rewrite: the fp model's outputs do not change,
while the key range that the per-tensor key quantizer covers shrinks."""
import pytest
import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

import vitq
from vitq.transforms import center_keys
from vitq.wrap import QuantAttention, QuantWindowAttention, fp_mode, wrap_model


def _vit():
    return VisionTransformer(img_size=28, patch_size=7, embed_dim=64, depth=2, num_heads=2, num_classes=10,
                             init_values=1e-1, dynamic_img_size=True)


def _swin():
    return SwinTransformer(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2),
                           num_heads=(2, 4), num_classes=10)


@pytest.mark.parametrize("make,size", [(_vit, 28), (_swin, 64)], ids=["vit", "swin"])
def test_center_keys_keeps_fp_outputs_and_shrinks_key_range(make, size):
    torch.manual_seed(0)
    model = make().eval()
    # give the keys a large common offset, the situation the rewrite is for
    for m in model.modules():
        if hasattr(m, "qkv"):
            d = m.qkv.out_features // 3
            m.qkv.bias.data[d:2 * d] += 20 * torch.rand(d)
    q = wrap_model(make().eval(), vitq.ADFQConfig())
    q.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(6, 3, size, size)

    def key_absmax(net):
        seen = []
        hooks = [m.qkv.register_forward_hook(lambda mod, i, o: seen.append(
            o.reshape(-1, 3, o.shape[-1] // 3)[:, 1].abs().max()))
            for m in net.modules() if isinstance(m, (QuantAttention, QuantWindowAttention))]
        with torch.no_grad(), fp_mode(net):
            out = net(x)
        for h in hooks:
            h.remove()
        return out, torch.stack(seen)

    before, k_before = key_absmax(q)
    shifts = center_keys(q, x, batch_size=4, device="cpu")
    after, k_after = key_absmax(q)
    assert len(shifts) == len(k_before) and min(shifts.values()) > 1.0
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)   # fp32 softmax of shifted logits
    assert bool((k_after < 0.5 * k_before).all()), (k_before, k_after)
