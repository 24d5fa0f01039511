"""Builds vitq_kernels._C: the C++ CPU kernels, plus the CUDA kernels when possible.

Build switches (environment variables):
  VITQ_SKIP_CUDA=1          build the CPU kernels only (CppExtension)
  VITQ_CUDA_ARCHS="8.0;8.9;9.0"   compute capabilities for the CUDA kernels
  MAX_JOBS=N                parallel compile jobs (ninja)
CUDA kernels are built when torch is a CUDA build and nvcc is found (CUDA_HOME or
/usr/local/cuda); no GPU is needed to compile them.
"""
import glob
import os

from setuptools import setup

# torch resolves CUDA_HOME when cpp_extension is imported, from `which nvcc`; on our machines
# that is a /usr/local/bin wrapper, which would give CUDA_HOME=/usr/local (no headers, no
# libcudart): point it at the toolkit first
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("VITQ_SKIP_CUDA", "0") == "1" or torch.version.cuda is None:
        return False
    return cpp_extension.CUDA_HOME is not None


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]  # torch picks the C++ standard it needs (17 or 20)
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not _want_cuda():
        return cpp_extension.CppExtension("vitq_kernels._C", sources, include_dirs=include_dirs,
                                          extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    archs = os.environ.get("VITQ_CUDA_ARCHS", "8.0;8.9;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    # the pip CUDA wheels keep cusparse.h etc. under nvidia/cu13/include (not in CUDA_HOME)
    try:
        import nvidia
        for base in nvidia.__path__:
            for sub in ("cu13", "cu12"):
                inc = os.path.join(base, sub, "include")
                if os.path.isdir(inc):
                    include_dirs.append(inc)
    except ImportError:
        pass
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return cpp_extension.CUDAExtension("vitq_kernels._C", sources, include_dirs=include_dirs,
                                       define_macros=[("VITQ_WITH_CUDA", "1")],
                                       extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                       extra_link_args=["-fopenmp"])


setup(
    name="vitq",
    version="0.1.0",
    description="ADFQ-ViT post-training quantization with real int4/int8 kernels",
    packages=["vitq_kernels", "vitq_kernels.triton_kernels", "vitq"],
    package_dir={"vitq_kernels": "vitq_kernels", "vitq": "python/vitq"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    entry_points={"console_scripts": ["vitq=vitq.cli:main"]},
    python_requires=">=3.10",
)
