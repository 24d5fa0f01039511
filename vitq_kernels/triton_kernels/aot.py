"""Ahead-of-time compilation of the Triton kernels for a GPU target, without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs the whole
pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin via the ptxas in the Triton wheel) on
the host.  The signatures below are the ones the launchers produce for contiguous
tensors: pointers 16-byte aligned, unit strides specialized to the constant 1, and the
ViT sizes (multiples of 16) marked divisible by 16, as Triton's JIT would mark them.

Must run with TRITON_INTERPRET unset: under the interpreter @triton.jit returns
interpreter functions, which cannot be compiled.

    python -m vitq_kernels.triton_kernels.aot [--arch 90] [--all-configs] [--ptxas-stats]
prints one JSON line per compiled variant (PTX instruction counts, cubin size, and with
--ptxas-stats the registers and spill bytes reported by ptxas).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from .pack import _BLOCK as PACK_BLOCK
from .pack import _pack_int4_kernel, _unpack_int4_kernel
from .qgemm import DENSE_CONFIGS, OUTLIER_CONFIGS, _qgemm_kernel
from .quantize import _per_token_quantize_kernel


def _source(kernel, types: dict, constexprs: dict, aligned: tuple):
    """ASTSource with `types` for runtime args, `constexprs` for the rest (unit strides
    included) and tt.divisibility=16 on the `aligned` args."""
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        else:
            raise KeyError(f"{kernel.__name__}: no type for argument {name}")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def _ptrs_and(types: dict, ints=(), floats=()) -> dict:
    out = dict(types)
    out.update({n: "i32" for n in ints})
    out.update({n: "fp32" for n in floats})
    return out


def pack_sources():
    yield "pack_int4", _source(
        _pack_int4_kernel, {"codes_ptr": "*i8", "packed_ptr": "*u8", "bad_ptr": "*i32", "n_bytes": "i32"},
        {"BLOCK": PACK_BLOCK}, ("codes_ptr", "packed_ptr", "bad_ptr", "n_bytes")), {"num_warps": 4}
    yield "unpack_int4", _source(
        _unpack_int4_kernel, {"packed_ptr": "*u8", "codes_ptr": "*i8", "n_bytes": "i32"},
        {"BLOCK": PACK_BLOCK}, ("packed_ptr", "codes_ptr", "n_bytes")), {"num_warps": 4}


def quantize_sources(x_type="*fp32", K=768, bit_widths=(8, 4)):
    """3-bit codes are a BITS=3 variant of the same kernel (levels 7, zero offset 4, packed
    like 4 bit); the GEMMs have no 3-bit variant (they take the int4 container)."""
    from .quantize import _blocks
    block_m, block_k, warps = _blocks(K, interpreted=False)
    ptrs = {"x_ptr": x_type, "scale_in_ptr": "*fp32", "zero_in_ptr": "*i32", "scale_ptr": "*fp32",
            "zero_ptr": "*i32", "rowsum_ptr": "*i32", "oidx_ptr": "*i32", "oval_ptr": "*fp32",
            "ocount_ptr": "*i32", "status_ptr": "*i32"}
    for bits in bit_widths:
        for static in (False, True):
            for outliers in (False, True):
                types = _ptrs_and(ptrs, ints=("stride_xm", "T", "M", "K", "C"), floats=("threshold",))
                types["codes_ptr"] = "*i8" if bits == 8 else "*u8"
                const = {"stride_xk": 1, "BITS": bits, "STATIC": static, "OUTLIERS": outliers,
                         "BLOCK_M": block_m, "BLOCK_K": block_k, "BLOCK_C": 64}
                aligned = tuple(ptrs) + ("codes_ptr", "stride_xm", "K")
                name = f"per_token_quantize[bits={bits},static={static},outliers={outliers},x={x_type[1:]}]"
                yield name, _source(_per_token_quantize_kernel, types, const, aligned), {"num_warps": warps}


def qgemm_sources(all_configs=False, variants=None, out_type="*fp16"):
    """(a_bits, w_bits, w_zero, bias, outliers) variants x autotune configs."""
    variants = variants or [(8, 8, False, True, False), (8, 8, True, True, True), (4, 8, False, True, True),
                            (4, 4, True, True, True), (8, 4, False, False, False)]
    ptrs = {"a_scale_ptr": "*fp32", "a_zero_ptr": "*i32", "a_rowsum_ptr": "*i32", "w_scale_ptr": "*fp32",
            "w_zero_ptr": "*i32", "w_colsum_ptr": "*i32", "bias_ptr": "*fp32", "oidx_ptr": "*i32",
            "oval_ptr": "*fp32", "y_ptr": out_type}
    for a_bits, w_bits, w_zero, bias, outliers in variants:
        configs = OUTLIER_CONFIGS if outliers else DENSE_CONFIGS
        for cfg in (configs if all_configs else configs[:1]):
            types = _ptrs_and(ptrs, ints=("M", "N", "K", "C", "m_bucket", "stride_am", "stride_wn", "stride_ym"))
            types["a_ptr"] = "*i8" if a_bits == 8 else "*u8"
            types["w_ptr"] = "*i8" if w_bits == 8 else "*u8"
            const = {"stride_ak": 1, "stride_wk": 1, "A_BITS": a_bits, "W_BITS": w_bits, "HAS_W_ZERO": w_zero,
                     "HAS_BIAS": bias, "HAS_OUTLIERS": outliers, **cfg.kwargs}
            aligned = tuple(ptrs) + ("a_ptr", "w_ptr", "N", "K", "stride_am", "stride_wn", "stride_ym")
            tile = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            name = (f"qgemm[W{w_bits}A{a_bits},w_zero={w_zero},bias={bias},outliers={outliers},y={out_type[1:]},"
                    f"tile={tile},warps={cfg.num_warps},stages={cfg.num_stages}]")
            yield name, _source(_qgemm_kernel, types, const, aligned), {"num_warps": cfg.num_warps,
                                                                         "num_stages": cfg.num_stages}


def compile_source(src, options, arch=90):
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _ptxas_path() -> str:
    try:
        return triton.knobs.nvidia.ptxas.path        # Triton >= 3.4
    except AttributeError:
        here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        return here if os.path.exists(here) else "/usr/local/cuda/bin/ptxas"


def ptxas_stats(ptx: str, arch: int = 90) -> dict:
    """Registers and spill bytes from `ptxas -v` on the kernel's PTX (Triton keeps only the cubin)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch == 90 else ""
        log = subprocess.run([_ptxas_path(), "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", src + ".o"],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"registers": int(regs.group(1)) if regs else -1, "spill_bytes": sum(spills)}


def summarize(name, compiled, arch=90, with_ptxas=False) -> dict:
    ptx = compiled.asm["ptx"]
    lines = ptx.splitlines()
    out = {
        "name": name,
        "cubin_bytes": len(compiled.asm["cubin"]),
        "shared_bytes": compiled.metadata.shared,
        "wgmma_s8": sum("wgmma.mma_async" in ln and ".s8" in ln for ln in lines),
        "div_rn_f32": ptx.count("div.rn.f32"),
        "div_approx_or_full": ptx.count("div.approx.f32") + ptx.count("div.full.f32"),
        "magic_2p23": ptx.count("0f4B000000"),
    }
    if with_ptxas:
        out.update(ptxas_stats(ptx, arch))
    return out


def all_sources(all_configs=False):
    yield from pack_sources()
    yield from quantize_sources(bit_widths=(8, 4, 3))
    yield from quantize_sources("*bf16", K=3072)
    yield from qgemm_sources(all_configs)
    yield from qgemm_sources(False, [(8, 8, True, True, True)], "*bf16")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--all-configs", action="store_true", help="every qgemm autotune config, not just the first")
    ap.add_argument("--ptxas-stats", action="store_true", help="add registers and spill bytes (runs ptxas -v)")
    ap.add_argument("--shard", default="0/1", help="i/n: compile every n-th variant starting at i")
    args = ap.parse_args(argv)
    shard, n_shards = (int(v) for v in args.shard.split("/"))
    for i, (name, src, options) in enumerate(all_sources(args.all_configs)):
        if i % n_shards == shard:
            compiled = compile_source(src, options, args.arch)
            print(json.dumps(summarize(name, compiled, args.arch, args.ptxas_stats)), flush=True)


if __name__ == "__main__":
    main()
