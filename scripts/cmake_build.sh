#!/usr/bin/env bash
# Configures and builds libvitq + vitq_smoke with CMake against the venv's libtorch, then
# runs the smoke program.  The pip CUDA wheels keep nvrtc and headers under nvidia/cu13,
# not in /usr/local/cuda, so their paths are passed explicitly.
#   VITQ_WITH_CUDA=ON|OFF (default ON when nvcc exists)   BUILD_DIR (default build-cmake)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
BUILD_DIR=${BUILD_DIR:-build-cmake}
TORCH_PREFIX=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DCMAKE_BUILD_TYPE=Release)
if $PY -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' && [ -x /usr/local/cuda/bin/nvcc ]; then
  NV=$($PY -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))' 2>/dev/null || true)
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;8.9;9.0"}   # no GPU to detect here
  args+=(-DCUDA_TOOLKIT_ROOT_DIR=/usr/local/cuda -DCUDAToolkit_ROOT=/usr/local/cuda
         -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc -DVITQ_WITH_CUDA="${VITQ_WITH_CUDA:-ON}")
  if [ -n "$NV" ] && [ -e "$NV/lib/libnvrtc.so.13" ]; then
    args+=(-DCUDA_nvrtc_LIBRARY="$NV/lib/libnvrtc.so.13" -DVITQ_EXTRA_CUDA_INCLUDE="$NV/include")
  fi
else
  args+=(-DVITQ_WITH_CUDA=OFF)
fi
cmake -S . -B "$BUILD_DIR" "${args[@]}"
cmake --build "$BUILD_DIR" -j "${MAX_JOBS:-2}"
"$BUILD_DIR/vitq_smoke"
