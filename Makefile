# The two set-up commands of README.md: `make demo` and `make test`.  Each creates .venv
# with pinned dependencies and builds the extension first (scripts/bootstrap.sh).
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
# the packages run from the checkout (vitq_kernels at the root, vitq under python/)
export PYTHONPATH := $(CURDIR):$(CURDIR)/python$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: bootstrap demo test test-fast cmake bench-cpu gpu-check

bootstrap:
	bash scripts/bootstrap.sh

## the main job on the embedded default (DINOv2-S + Fashion-MNIST probe, W4A4)
demo: bootstrap
	$(PY) -m vitq demo

## the whole CPU test suite: C++ kernels, Triton kernels under the interpreter, calibration,
## export; then the libtorch (CMake) build and its smoke program
test: bootstrap
	TRITON_INTERPRET=1 $(PY) -m pytest tests bench -q -p no:cacheprovider --benchmark-disable --durations=15
	VITQ_WITH_CUDA=OFF bash scripts/cmake_build.sh

## tests only, no rebuild of the venv
test-fast:
	TRITON_INTERPRET=1 $(PY) -m pytest tests bench -q -x --benchmark-disable

cmake:
	bash scripts/cmake_build.sh

## the kernel benchmarks on this machine (CPU timings; GPU numbers come from scripts/gpu_check.sh)
bench-cpu:
	$(PY) bench/bench_qgemm.py
