"""Test configuration.  Must run before any kernel module is imported:
- TRITON_INTERPRET=1 on machines without a GPU, so Triton kernels run on CPU tensors;
- HF_HUB_OFFLINE=1: tests never need hub weights.
"""
import os
import sys

import torch

_HAS_GPU = torch.cuda.is_available()
if not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "python")):
    if p not in sys.path:
        sys.path.insert(0, p)

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# device on which "native" tests run: cuda when present, else cpu
DEVICES = ["cpu"] + (["cuda"] if _HAS_GPU else [])
requires_gpu = pytest.mark.skipif(not _HAS_GPU, reason="needs a CUDA GPU (run on the device machine)")


@pytest.fixture(autouse=True)
def _seed():
    # fresh random inputs per test, but reproducible from the printed seed on failure
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"torch seed {seed}")
    torch.manual_seed(seed)
    yield seed
