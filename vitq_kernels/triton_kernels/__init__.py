"""Triton kernels of the vitq ops, one kernel per module.

Each launcher is exported under its op's name with the op's positional signature
(csrc/ops.cpp); vitq_kernels/ops.py registers them as the ops' CUDA implementation.
With TRITON_INTERPRET=1 set before import they also run on CPU tensors (tests).
"""
from .pack import pack_int4, unpack_int4
from .qgemm import qgemm
from .quantize import per_token_quantize
from .log2_attention import log2_attention
from .layernorm_quantize import layernorm_quantize
from .shiftlog2 import qgemm_gelu_shiftlog2
from .shiftlog2_qgemm import shiftlog2_qgemm

__all__ = ["pack_int4", "unpack_int4", "per_token_quantize", "qgemm"]
__all__ += ["log2_attention"]
__all__ += ["layernorm_quantize", "qgemm_gelu_shiftlog2", "shiftlog2_qgemm"]
