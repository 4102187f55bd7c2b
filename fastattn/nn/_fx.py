"""fastattn's drop-in modules under ``torch.fx.symbolic_trace``.

fx keeps the modules of torch.nn as leaves: one ``call_module`` node each, their forward never traced (it is
Python control flow on shapes, which a Proxy cannot follow). fastattn's modules live outside torch.nn, so fx would
trace into theirs and fail; ``fx_leaf`` records them as fx records torch's, so a model traces the same after
``fastattn.convert`` (FX quantization, pruning, torchvision's feature extraction). As for any module fx traces into
first, hooks registered on such a module also run while tracing (on Proxies)."""
from __future__ import annotations

import functools

from torch.fx import Proxy
from torch.fx.proxy import TraceError


def fx_leaf(forward):
    """Wrap a module's forward: under symbolic tracing (its input a Proxy) record one call_module
    node for the module; otherwise run forward. The root of a trace cannot be a call of itself: refused (fx cannot
    trace torch's MultiheadAttention or Transformer layers at the root either)."""

    @functools.wraps(forward)
    def traced(self, *args, **kwargs):
        # a Proxy exists only under symbolic tracing; the first argument (the input) is one then (~50 ns a call)
        first = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(first, Proxy):
            name = first.tracer.path_of_module(self)
            if not name:
                raise TraceError(f"torch.fx.symbolic_trace: fastattn.nn.{type(self).__name__} cannot be the root "
                                 f"of a trace (its forward is Python control flow on shapes); trace a module "
                                 f"that holds it: it is recorded as one call, as torch.nn's modules are")
            return first.tracer.create_proxy("call_module", name, args, kwargs)
        return forward(self, *args, **kwargs)

    return traced
