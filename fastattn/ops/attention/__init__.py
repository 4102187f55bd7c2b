"""Scaled dot-product attention: the public API (api.py), argument checks and layout (validation.py), the backend
table and custom ops (dispatch.py, which states the kernels' contract), the autograd.Functions (function.py) and the
parameters every layer passes on (params.py)."""
from .api import attention, scaled_dot_product_attention
from .dispatch import dispatcher, dropout_mask, select_backend
from .function import AttentionFunction
from .params import AttnParams, AttnRequest, request

__all__ = ["attention", "scaled_dot_product_attention", "dispatcher", "dropout_mask", "select_backend",
           "AttentionFunction", "AttnParams", "AttnRequest", "request"]
