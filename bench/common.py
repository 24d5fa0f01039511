"""Shared benchmark plumbing: environment stamp, timers, rotating inputs, result files.

GPU timings use ``triton.testing.do_bench(..., return_mode="median")`` (CUDA events, L2
flushed before each repetition) over a rotation of input sets whose total size exceeds
the L2 cache, so no repetition finds its operands cached.  CPU timings are medians of
``time.perf_counter`` over repetitions after a warm-up, and are labelled as CPU timings.
"""
from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L2_BYTES_FALLBACK = 50 * 2 ** 20   # an H100's L2, when the device does not report it


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str) -> dict:
    """What the numbers were measured on."""
    env = {"device": device, "torch": torch.__version__, "git_commit": git_commit(),
           "python": platform.python_version()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, sms=props.multi_processor_count, cuda=torch.version.cuda,
                   l2_bytes=l2_bytes())
    else:
        env.update(device_name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(0)
    return int(getattr(props, "L2_cache_size", 0) or L2_BYTES_FALLBACK)


def rotation_count(bytes_per_set: int, device: str, minimum: int = 2, maximum: int = 64) -> int:
    """How many input sets to rotate so that together they exceed twice the L2 (GPU only)."""
    if device != "cuda":
        return 1
    need = -(-2 * l2_bytes() // max(bytes_per_set, 1))
    return int(min(maximum, max(minimum, need)))


def time_gpu(fn: Callable, input_sets: Sequence[tuple], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of fn(*inputs), cycling through input_sets between calls."""
    import triton.testing
    cycle = itertools.cycle(input_sets)
    return float(triton.testing.do_bench(lambda: fn(*next(cycle)), warmup=warmup_ms, rep=rep_ms,
                                         return_mode="median"))


def time_cpu(fn: Callable, input_sets: Sequence[tuple], warmup: int = 1, reps: int = 5,
             budget_s: float = 2.0) -> float:
    """Median milliseconds of fn(*inputs) on the CPU (stops early once budget_s is spent)."""
    cycle = itertools.cycle(input_sets)
    for _ in range(warmup):
        fn(*next(cycle))
    times = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*next(cycle))
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return 1e3 * statistics.median(times)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_prefix: str, env: dict, rows: Sequence[dict], table: str, title: str) -> tuple[str, str]:
    """Writes <out_prefix>.json (environment + rows) and <out_prefix>.md (stamp + table)."""
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    json_path, md_path = out_prefix + ".json", out_prefix + ".md"
    with open(json_path, "w") as f:
        json.dump({"environment": env, "rows": list(rows)}, f, indent=1)
    stamp = ", ".join(f"{k}={v}" for k, v in env.items())
    with open(md_path, "w") as f:
        f.write(f"# {title}\n\n{stamp}\n\n{table}\n")
    return json_path, md_path
