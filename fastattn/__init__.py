"""fastattn: fused attention, residual+LayerNorm and INT8 matmul kernels for PyTorch.

Each op runs on one of four backends: ``cuda`` (CUDA C++), ``triton``, ``cpu`` (C++/OpenMP) and ``reference``
(pure PyTorch). Auto mode picks the fastest one that supports the inputs; ``with fastattn.backend("triton"):`` or
the ``FASTATTN_BACKEND`` environment variable forces one.
"""
from .backends import BackendNotSupported, available_backends, backend
from .errors import ArgumentError
from .info import build_info
from .ops.add_norm import add_layer_norm, add_rms_norm
from .ops.attention import (attention, attention_qkvpacked, attention_varlen, decode_attention,
                            scaled_dot_product_attention, varlen_attn)
from .ops.cross_entropy import linear_cross_entropy
from .ops.int8 import int8_matmul, quantize_per_channel, quantize_per_token, w8a16_matmul
from . import nn  # noqa: E402
from .quantization import apply_int8_layout, convert_qat, int8_layout, prepare_qat, quantize  # noqa: E402
from .convert import convert  # noqa: E402
from . import hf  # noqa: E402  (transformers is imported only by fastattn.hf.register())
from .version import __version__ as __version__

__all__ = ["add_layer_norm", "add_rms_norm", "attention", "attention_qkvpacked", "attention_varlen",
           "varlen_attn", "decode_attention",
           "scaled_dot_product_attention",
           "linear_cross_entropy", "available_backends", "backend", "ArgumentError", "build_info", "int8_matmul",
           "quantize_per_token",
           "quantize_per_channel", "w8a16_matmul", "quantize", "prepare_qat", "convert_qat", "int8_layout",
           "apply_int8_layout", "convert",
           "BackendNotSupported", "nn", "hf"]
