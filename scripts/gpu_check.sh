#!/usr/bin/env bash
# Everything a session with a GPU runs in ONE call on the device machine (fresh copy of the
# repo, nothing built, no network), inside a 10-minute limit:
#   1. environment stamp; carried wheels (.whl/, see /work/.library/device/README.md) are
#      installed to /tmp/site only when a needed module is missing
#   2. build vitq_kernels._C in place (CUDA kernels for this GPU's arch only, to save time)
#   3. the whole pytest suite on the GPU (tests/ and bench/, benchmarks disabled)
#   4. compute-sanitizer memcheck over a small script calling every CUDA C++ and Triton
#      kernel once (odd shapes, tile tails), then racecheck over the CUDA C++ kernels
#   5. bench/bench_qgemm.py --quick, then any other bench/bench_*.py that accepts --quick
# GPU_CHECK_SKIP_BUILD=1 reuses an existing in-place build (a warm machine, second call).
# Stages get a share of a global budget (GPU_CHECK_BUDGET_S, default 570 s); a stage that
# runs out is stopped and marked, the rest still report.  Results land in $OUT (the device
# tool brings back at most 8 files): summary.md, bench_qgemm.{md,json}, logs.tar.gz.
#
#   device run:   bash scripts/gpu_check.sh            (carry .whl only if wheels are needed)
#   elsewhere:    OUT=/tmp/gpu_out bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-570}
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MAX_JOBS=${MAX_JOBS:-16}
SUMMARY=$WORK/stages.md
FAILED=0
printf '| stage | exit | seconds | log |\n|---|---|---|---|\n' >"$SUMMARY"

left() { echo $((BUDGET - ($(date +%s) - START))); }

# stage NAME LIMIT_S CMD...: runs CMD with at most LIMIT_S (and never past the budget)
stage() {
  local name=$1 limit=$2
  shift 2
  local avail=$(($(left) - 15))
  ((limit > avail)) && limit=$avail
  if ((limit < 10)); then
    echo "| $name | skipped (budget spent) | 0 | - |" >>"$SUMMARY"
    echo "== $name: skipped, budget spent"
    FAILED=1
    return 99
  fi
  echo "== $name (limit ${limit}s)"
  local t0=$(date +%s) rc
  timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  local note=$rc
  ((rc == 124 || rc == 137)) && note="$rc (timed out)"
  ((rc != 0)) && FAILED=1
  echo "| $name | $note | $(($(date +%s) - t0)) | $name.log |" >>"$SUMMARY"
  tail -n 5 "$WORK/$name.log"
  return $rc
}

# ---------------------------------------------------------------- 1. environment
environment() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import sys, torch, triton; print(sys.version)
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
  nvcc --version | tail -n 2
  compute-sanitizer --version | head -n 2
  git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "no git metadata"
}
export -f environment
export PY ROOT
stage environment 60 bash -c environment

MODULES="torch triton numpy timm hypothesis pytest pytest_benchmark safetensors onnx"
missing_modules() {
  "$PY" - $MODULES <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}
MISSING=$(missing_modules)
if [ -n "$MISSING" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  stage wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$ROOT"/.whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  MISSING=$(missing_modules)
fi
if [ -n "$MISSING" ]; then
  echo "| missing modules | $MISSING | - | carry wheels in .whl/ |" >>"$SUMMARY"
  FAILED=1
fi

# ---------------------------------------------------------------- 2. build
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo 9.0)
export VITQ_CUDA_ARCHS=${VITQ_CUDA_ARCHS:-$ARCH}
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then  # a warm machine that already built it
  BUILD_RC=0
else
  stage build 240 "$PY" setup.py build_ext --inplace
  BUILD_RC=$?
fi
if ! "$PY" -c "import vitq_kernels; assert vitq_kernels.ops.has_cuda_kernels(), 'no CUDA C++ kernels in _C'" \
  >>"$WORK/build.log" 2>&1; then
  echo "| import check | vitq_kernels with CUDA kernels failed to import: later stages skipped | - | build.log |" \
    >>"$SUMMARY"
  tail -n 5 "$WORK/build.log"
  BUILD_RC=1
  FAILED=1
fi

# ---------------------------------------------------------------- 3. tests
if ((BUILD_RC == 0)); then
  PYTEST_ARGS=(-q -ra --durations=15 -p no:cacheprovider --benchmark-disable --junitxml "$WORK/junit.xml")
  "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout 150)
  stage pytest 240 "$PY" -m pytest "${PYTEST_ARGS[@]}" tests bench
fi

# ---------------------------------------------------------------- 4. sanitizers
cat >"$WORK/exercise_kernels.py" <<'EOF'
"""Calls every vitq GPU kernel once on small odd shapes (tile tails, unaligned K)."""
import sys
import torch
sys.path.insert(0, ".")
from vitq_kernels import ops, reference as ref  # noqa: E402

only_cuda = "--only-cuda" in sys.argv
torch.manual_seed(0)
results, covered = [], set()


def exercise(name, op, fn):
    covered.add(op)
    try:
        fn()
        torch.cuda.synchronize()
        results.append((name, "ok"))
    except Exception as e:  # reported, and turned into a non-zero exit below
        results.append((name, f"FAILED {type(e).__name__}: {str(e)[:300]}"))


def qgemm_args(M, K, N, a_bits, w_bits, C, offset=False):
    """C > 0: outliers (|x| > 5) listed with C spare slots per row; C == 0: none."""
    x = torch.randn(M, K)
    x[:, ::37] *= 20
    if C:
        C += int((x.abs() > 5.0).sum(1).max())
    codes, s, z, rs, idx, val, _ = ref.per_token_quantize(x, a_bits, None, None, 5.0 if C else None, C)
    wc, sw, zw = ref.quantize_weight_per_channel(torch.randn(N, K), w_bits, symmetric=False)
    w = ref.pack_int4(wc) if w_bits == 4 else wc
    args = [codes, s, z, rs, w, sw, zw, ref.weight_colsum(wc), torch.randn(N), idx if C else None,
            val if C else None]
    args = [t.cuda() if isinstance(t, torch.Tensor) else t for t in args]
    if offset:  # contiguous but misaligned codes: the byte-wise load path
        for i in (0, 4):
            buf = torch.empty(args[i].numel() + 1, dtype=args[i].dtype, device="cuda")
            buf[1:] = args[i].reshape(-1)
            args[i] = buf[1:].view(args[i].shape)
    return args + [a_bits, w_bits]


backends = ["cuda"] + ([] if only_cuda else ["triton"])
for backend in backends:
    ops.set_backend(backend)
    call = (lambda name: getattr(torch.ops.vitq, name + "_cuda")) if backend == "cuda" else \
        (lambda name: getattr(torch.ops.vitq, name))
    codes = torch.randint(-8, 8, (37, 66), dtype=torch.int8, device="cuda")
    exercise(f"{backend} pack_int4", "pack_int4", lambda: call("pack_int4")(codes))
    exercise(f"{backend} unpack_int4", "unpack_int4", lambda: call("unpack_int4")(codes.view(torch.uint8)))
    for bits in (4, 8):
        x = torch.randn(133, 200, device="cuda", dtype=torch.float16)
        x[:, ::41] = 30
        exercise(f"{backend} per_token_quantize {bits}b", "per_token_quantize",
                 lambda: call("per_token_quantize")(x, bits, None, None, 5.0, 8))
    for a_bits, w_bits in ((8, 8), (8, 4), (4, 4), (4, 8)):
        for M, K, N, C, off in ((130, 200, 200, 6, False), (77, 256, 131, 0, True), (300, 768, 260, 4, False)):
            args = qgemm_args(M, K, N, a_bits, w_bits, C, off)
            exercise(f"{backend} qgemm a{a_bits}w{w_bits} {M}x{K}x{N} C={C}{' misaligned' if off else ''}",
                     "qgemm", lambda: call("qgemm")(*args, torch.float16))

if not only_cuda:
    ops.set_backend("triton")
    V = torch.ops.vitq
    if hasattr(V, "layernorm_quantize"):
        x = torch.randn(70, 192, device="cuda")
        exercise("triton layernorm_quantize", "layernorm_quantize",
                 lambda: V.layernorm_quantize(x, torch.randn(192, device="cuda"), torch.randn(192, device="cuda"),
                                              1e-6, 8, None, None, 3.0, 16))
    if hasattr(V, "qgemm_gelu_shiftlog2"):
        args = qgemm_args(130, 200, 260, 8, 4, 4)
        exercise("triton qgemm_gelu_shiftlog2", "qgemm_gelu_shiftlog2",
                 lambda: V.qgemm_gelu_shiftlog2(*args, ref.GELU_MIN - 1e-3, 0.05, 4, 0))
    if hasattr(V, "shiftlog2_qgemm"):
        wc, sw, zw = ref.quantize_weight_per_channel(torch.randn(150, 300), 4, symmetric=True)
        sl_args = (torch.randint(0, 16, (90, 300), dtype=torch.uint8).cuda(), 4, 0, torch.tensor([0.05]).cuda(),
                   ref.pack_int4(wc).cuda(), sw.cuda(), None, torch.randn(150).cuda(), 4, torch.float16)
        exercise("triton shiftlog2_qgemm", "shiftlog2_qgemm", lambda: V.shiftlog2_qgemm(*sl_args))
    if hasattr(V, "log2_attention"):
        q, k, v = (torch.randint(-128, 128, (2, 3, 197, 64), dtype=torch.int8, device="cuda") for _ in range(3))
        s1, z1 = torch.tensor([0.02], device="cuda"), torch.zeros(1, dtype=torch.int32, device="cuda")
        exercise("triton log2_attention", "log2_attention",
                 lambda: V.log2_attention(q, k, v, s1, z1, s1, z1, s1, z1, 0.125, None, 4, 0, None, None, 8,
                                          torch.float16))
    skipped = sorted(set(ops._FAKES) - covered)
    if skipped:
        results.append(("ops not exercised", ", ".join(skipped)))

width = max(len(n) for n, _ in results)
for name, status in results:
    print(f"{name:<{width}}  {status}")
sys.exit(2 if any(s.startswith("FAILED") for _, s in results) else 0)
EOF
if ((BUILD_RC == 0)); then
  # no caching allocator, so an overrun past a tensor's end is outside any allocation
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  stage memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
    "$PY" "$WORK/exercise_kernels.py"
  stage racecheck 75 compute-sanitizer --tool racecheck --error-exitcode 9 --print-limit 20 \
    "$PY" "$WORK/exercise_kernels.py" --only-cuda
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
fi

# ---------------------------------------------------------------- 5. benchmarks
if ((BUILD_RC == 0)); then
  stage bench_qgemm 180 "$PY" bench/bench_qgemm.py --quick --out "$WORK/bench_qgemm"
  for script in bench/bench_*.py; do
    name=$(basename "$script" .py)
    [ "$name" = bench_qgemm ] && continue
    if grep -q -- "--quick" "$script"; then
      stage "$name" 90 "$PY" "$script" --quick --out "$WORK/$name"
    else
      stage "$name" 90 "$PY" "$script"
    fi
  done
fi

# ---------------------------------------------------------------- results
{
  echo "# gpu_check $(date -u +%FT%TZ), $(($(date +%s) - START)) s"
  echo
  cat "$SUMMARY"
  for name in environment pytest memcheck racecheck; do
    [ -f "$WORK/$name.log" ] || continue
    printf '\n## %s (last lines)\n\n```\n' "$name"
    tail -n 40 "$WORK/$name.log"
    printf '```\n'
  done
  for md in "$WORK"/bench_*.md; do
    [ -f "$md" ] && printf '\n' && cat "$md"
  done
} >"$OUT/summary.md"
cp "$WORK"/bench_qgemm.md "$WORK"/bench_qgemm.json "$OUT"/ 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$WORK" . 2>/dev/null
cat "$SUMMARY"
exit $FAILED
