"""Triton kernels for qtulu, importable as qtulu.kernels.

Each op lives in one module with a pure-torch reference, the Triton kernel(s), an autograd
Function and a dispatcher (CUDA tensors -> Triton; CPU tensors -> the torch path, or the Triton
kernels when TRITON_INTERPRET=1 was set before triton was first imported). Without triton
(macOS, Windows) everything falls back to the torch path. Imports only torch and triton.
"""

from .attention import varlen_attention, varlen_attention_reference
from .cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference

__all__ = [
    "fused_linear_cross_entropy",
    "linear_cross_entropy_reference",
    "varlen_attention",
    "varlen_attention_reference",
]
