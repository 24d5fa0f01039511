"""Ahead-of-time compilation of every Triton kernel for sm_90 (H100), on a machine
without a GPU: TTIR -> TTGIR -> PTX -> cubin with the ptxas shipped in the Triton wheel.

It catches what the interpreter cannot: code that does not compile (non-constexpr
globals, Triton compiler assertions), an int8 dot that does not lower to wgmma, a
division that is not correctly rounded, the 2^23 rounding trick folded away, and
register spills in any autotune config.

The compile runs in subprocesses without TRITON_INTERPRET: under the interpreter
@triton.jit returns interpreter functions, which cannot be compiled.  The subprocess
loads only the Triton kernels (vitq_kernels/triton_kernels), not the C++ extension,
which the compile does not need.  Two shards run in parallel (one per core).
"""
import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
qgemm_mod = importlib.import_module("vitq_kernels.triton_kernels.qgemm")

_BOOT = f"""
import sys, types
pkg = types.ModuleType("vitq_kernels")
pkg.__path__ = [{os.path.join(ROOT, "vitq_kernels")!r}]
sys.modules["vitq_kernels"] = pkg
from vitq_kernels.triton_kernels import aot
aot.main(sys.argv[1:])
"""
SHARDS = 2


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = []
    for shard in range(SHARDS):
        env_i = dict(env, TRITON_CACHE_DIR=str(tmp_path_factory.mktemp(f"triton_cache{shard}")))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _BOOT, "--arch", "90", "--all-configs", "--ptxas-stats",
             f"--shard={shard}/{SHARDS}"],
            env=env_i, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    records = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"AOT compile failed:\n{err[-6000:]}"
        records += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["name"]: r for r in records}


def test_every_kernel_variant_compiles_without_spills(compiled):
    n_qgemm = 2 * len(qgemm_mod.DENSE_CONFIGS) + 3 * len(qgemm_mod.OUTLIER_CONFIGS) + 1
    kinds = {"pack_int4": 1, "unpack_int4": 1, "per_token_quantize": 20, "qgemm": n_qgemm}   # 4 of them 3-bit
    for kind, n in kinds.items():
        names = [name for name in compiled if name.split("[")[0] == kind]
        assert len(names) == n, (kind, names)
    for name, r in compiled.items():
        assert r["cubin_bytes"] > 0, name
        assert r["spill_bytes"] == 0, f"{name} spills {r['spill_bytes']} bytes ({r['registers']} registers)"
        assert r["registers"] <= 255, name


def test_qgemm_int8_dot_lowers_to_wgmma(compiled):
    for name, r in compiled.items():
        if name.startswith("qgemm["):
            assert r["wgmma_s8"] > 0, f"{name}: no wgmma .s8 instruction in the PTX"


def test_quantize_divides_correctly_rounded_and_rounds_half_even(compiled):
    for name, r in compiled.items():
        if name.startswith("per_token_quantize["):
            assert r["div_rn_f32"] > 0, name
            assert r["div_approx_or_full"] == 0, f"{name}: approximate fp32 division"
            assert r["magic_2p23"] > 0, f"{name}: the 2^23 round-half-even constant was folded away"


def test_tiles_meet_wgmma_rules():
    for cfg in qgemm_mod.DENSE_CONFIGS + qgemm_mod.OUTLIER_CONFIGS:
        kw = cfg.kwargs
        assert cfg.num_warps % 4 == 0 and kw["BLOCK_M"] % 64 == 0, cfg
        assert kw["BLOCK_N"] % 16 == 0 and kw["BLOCK_K"] >= 64, cfg     # >= 64: a packed int4 row is >= 32 B
    interp = qgemm_mod.INTERPRETER_CONFIG
    assert min(interp["BLOCK_M"], interp["BLOCK_N"], interp["BLOCK_K"]) >= 64
