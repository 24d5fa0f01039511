"""vitq runtime: importing this package registers torch.ops.vitq.* (see ops.py)."""
from . import ops  # noqa: F401  (registers the C++ library, fakes and CUDA dispatch)
from .ops import *  # noqa: F401,F403
