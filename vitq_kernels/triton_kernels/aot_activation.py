"""Ahead-of-time sm_90 compilation of the issue-3A kernels (layernorm_quantize, the fc1
GELU/Shift-Log2 encoder, the fc2 decode GEMM), without a GPU, on top of aot.py.

Signatures are the ones the launchers produce for contiguous ViT-sized tensors.  Run with
TRITON_INTERPRET unset:

    python -c "...; from vitq_kernels.triton_kernels import aot_activation; aot_activation.main([...])"

prints one JSON line per variant: aot.summarize's PTX counts plus FMA count, registers and
spill bytes (ptxas -v).  `--which ln,encode,decode` (any subset), `--all-configs` for every
autotune config instead of the first of each list.
"""
from __future__ import annotations

import argparse
import importlib
import json

from . import aot
from .. import reference

# the package re-exports each launcher under its module's name, so import the modules by path
LN = importlib.import_module(".layernorm_quantize", __package__)
SL = importlib.import_module(".shiftlog2", __package__)
SQ = importlib.import_module(".shiftlog2_qgemm", __package__)


def layernorm_sources(variants=None):
    """(K, bits, static, outliers) variants."""
    variants = variants or [(768, 8, False, False), (384, 4, False, True), (768, 4, True, True),
                            (384, 3, False, True)]
    for K, bits, static, outliers in variants:
        block_m, block_k, warps = LN._blocks(K, interpreted=False)
        types = {"x_ptr": "*fp16", "stride_xm": "i32", "w_ptr": "*fp32", "b_ptr": "*fp32", "eps": "fp32",
                 "scale_in_ptr": "*fp32", "zero_in_ptr": "*i32", "T": "i32",
                 "codes_ptr": "*i8" if bits == 8 else "*u8", "scale_ptr": "*fp32", "zero_ptr": "*i32",
                 "rowsum_ptr": "*i32", "oidx_ptr": "*i32", "oval_ptr": "*fp32", "ocount_ptr": "*i32",
                 "status_ptr": "*i32", "M": "i32", "K": "i32", "threshold": "fp32", "C": "i32"}
        const = {"stride_xk": 1, "BITS": bits, "STATIC": static, "OUTLIERS": outliers, "BLOCK_M": block_m,
                 "BLOCK_K": block_k}
        name = f"layernorm_quantize[K={K},bits={bits},static={static},outliers={outliers}]"
        src = aot._source(LN._layernorm_quantize_kernel, types, const, ("x_ptr", "codes_ptr", "stride_xm", "K"))
        yield name, src, {"num_warps": warps, "enable_fp_fusion": False}


def encode_sources(all_configs=False, variants=None):
    """(a_bits, w_bits, w_zero, outliers, substeps) variants x autotune configs."""
    variants = variants or [(8, 8, False, False, 0), (4, 4, True, True, 1)]
    for a_bits, w_bits, w_zero, outliers, substeps in variants:
        configs = SL.OUTLIER_CONFIGS if outliers else SL.DENSE_CONFIGS
        for cfg in (configs if all_configs else configs[:1]):
            types = {"a_ptr": "*i8" if a_bits == 8 else "*u8", "a_scale_ptr": "*fp32", "a_zero_ptr": "*i32",
                     "a_rowsum_ptr": "*i32", "w_ptr": "*i8" if w_bits == 8 else "*u8", "w_scale_ptr": "*fp32",
                     "w_zero_ptr": "*i32", "w_colsum_ptr": "*i32", "bias_ptr": "*fp32", "oidx_ptr": "*i32",
                     "oval_ptr": "*fp32", "codes_ptr": "*u8", "M": "i32", "N": "i32", "K": "i32", "C": "i32",
                     "m_bucket": "i32", "shift": "fp32", "out_scale": "fp32", "stride_am": "i32",
                     "stride_wn": "i32", "stride_cm": "i32"}
            const = {"stride_ak": 1, "stride_wk": 1, "A_BITS": a_bits, "W_BITS": w_bits, "HAS_W_ZERO": w_zero,
                     "HAS_BIAS": True, "HAS_OUTLIERS": outliers, "SUBSTEPS": substeps, "TOP": 15,
                     **SL.log2_code_constants(substeps), **cfg.kwargs}
            tile = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            name = (f"qgemm_gelu_shiftlog2[W{w_bits}A{a_bits},w_zero={w_zero},outliers={outliers},m={substeps},"
                    f"tile={tile},warps={cfg.num_warps}]")
            src = aot._source(SL._qgemm_gelu_shiftlog2_kernel, types, const,
                              ("a_ptr", "w_ptr", "codes_ptr", "N", "K", "stride_am", "stride_wn", "stride_cm"))
            yield name, src, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": False}


def decode_sources(all_configs=False, variants=None):
    """(bits, substeps, w_bits, w_zero) variants x the autotune configs of their plane count."""
    # (3, 0, 4, False): 3-bit Shift-Log2 codes (W3A3's fc2 input; w_bits 3 is the int4 container)
    variants = variants or [(4, 0, 8, True), (4, 1, 4, False), (4, 2, 8, True), (8, 0, 8, True), (3, 0, 4, False)]
    for bits, substeps, w_bits, w_zero in variants:
        planes, groups = SQ.plan(bits, substeps)
        configs = {"float": SQ.CONFIGS_FLOAT, "planes<=2": SQ.CONFIGS_2_PLANES,
                   "planes=4": SQ.CONFIGS_4_PLANES}[SQ.configs_for(planes)]
        mants = list(reference.LOG_MANTISSAS[substeps]) + [1.0] * 4
        for cfg in (configs if all_configs else configs[:1]):
            types = {"codes_ptr": "*u8", "act_scale_ptr": "*fp32", "w_ptr": "*i8" if w_bits == 8 else "*u8",
                     "w_scale_ptr": "*fp32", "w_zero_ptr": "*i32", "bias_ptr": "*fp32", "y_ptr": "*fp16",
                     "M": "i32", "N": "i32", "K": "i32", "m_bucket": "i32", "stride_cm": "i32", "stride_wn": "i32",
                     "stride_ym": "i32"}
            const = {"stride_ck": 1, "stride_wk": 1, "BITS": bits, "SUBSTEPS": substeps, "W_BITS": w_bits,
                     "HAS_W_ZERO": w_zero, "HAS_BIAS": True, "PLANES": planes, "GROUPS": max(groups, 1),
                     "M1": mants[1], "M2": mants[2], "M3": mants[3],
                     "UNIT": 2.0 ** (-8 * (max(groups, 1) - 1) - 7), **cfg.kwargs}
            tile = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            name = (f"shiftlog2_qgemm[bits={bits},m={substeps},W{w_bits},w_zero={w_zero},planes={planes},"
                    f"tile={tile},warps={cfg.num_warps}]")
            src = aot._source(SQ._shiftlog2_qgemm_kernel, types, const,
                              ("codes_ptr", "w_ptr", "y_ptr", "N", "K", "stride_cm", "stride_wn", "stride_ym"))
            yield name, src, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": False}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--which", default="ln,encode,decode", help="comma-separated: ln, encode, decode")
    ap.add_argument("--all-configs", action="store_true")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    gens = {"ln": lambda: layernorm_sources(), "encode": lambda: encode_sources(args.all_configs),
            "decode": lambda: decode_sources(args.all_configs)}
    for which in args.which.split(","):
        for name, src, options in gens[which]():
            compiled = aot.compile_source(src, options, args.arch)
            record = aot.summarize(name, compiled, args.arch, with_ptxas=True)
            record["fma_f32"] = compiled.asm["ptx"].count("fma.rn.f32")
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
