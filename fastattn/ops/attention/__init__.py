"""Scaled dot-product attention: the public API (api.py), argument checks and layout (validation.py), the backend
table and custom ops (dispatch.py, which states the kernels' contract), the autograd.Functions (function.py), the
parameters every layer passes on (params.py), the split-KV decode attention with its own backends, contract and
route from ``attention`` (decode.py), and attention over packed variable-length sequences (varlen.py; with torch's
varlen_attn signature: varlen_attn.py)."""
from .api import attention, attention_qkvpacked, scaled_dot_product_attention
from .decode import decode_attention
from .dispatch import dispatcher, dropout_mask, select_backend
from .function import AttentionFunction
from .params import AttnParams, AttnRequest, request
from .varlen import attention_varlen
from .varlen_attn import varlen_attn

__all__ = ["attention", "attention_qkvpacked", "scaled_dot_product_attention", "decode_attention", "attention_varlen",
           "varlen_attn", "dispatcher", "dropout_mask", "select_backend", "AttentionFunction", "AttnParams",
           "AttnRequest", "request"]
