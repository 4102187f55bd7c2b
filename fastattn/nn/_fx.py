"""fastattn's drop-in modules under ``torch.fx.symbolic_trace``.

fx keeps the modules of torch.nn as leaves: one ``call_module`` node each, their forward never traced (it is
Python control flow on shapes, which a Proxy cannot follow). fastattn's modules live outside torch.nn, so fx would
trace into theirs and fail; ``fx_leaf`` records them as fx records torch's, so a model traces the same after
``fastattn.convert`` (FX quantization, pruning, torchvision's feature extraction). The record is made inside the
module's call, after its hooks ran on the Proxies (they would be in the graph, and run again in the recorded call):
a module with hooks (its own or global ones) is refused with a TraceError instead."""
from __future__ import annotations

import functools

from torch.fx import Proxy
from torch.fx.proxy import TraceError
from torch.nn.modules import module as _module

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def fx_leaf(forward):
    """Wrap a module's forward: under symbolic tracing (its input a Proxy) record one call_module
    node for the module; otherwise run forward. The root of a trace cannot be a call of itself: refused (fx cannot
    trace torch's MultiheadAttention or Transformer layers at the root either)."""

    @functools.wraps(forward)
    def traced(self, *args, **kwargs):
        # a Proxy exists only under symbolic tracing; the first argument (the input) is one then
        first = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(first, Proxy):
            name = first.tracer.path_of_module(self)
            if not name:
                raise TraceError(f"torch.fx.symbolic_trace: fastattn.nn.{type(self).__name__} cannot be the root "
                                 f"of a trace (its forward is Python control flow on shapes); trace a module "
                                 f"that holds it: it is recorded as one call, as torch.nn's modules are")
            hooked = [h for h in _HOOKS if getattr(self, h, None)] + [h for h in _GLOBAL_HOOKS if getattr(_module, h)]
            if hooked:
                raise TraceError(f"torch.fx.symbolic_trace: {name} (fastattn.nn.{type(self).__name__}) has hooks "
                                 f"({', '.join(hooked)}): fx would record them and run them again in the module's "
                                 f"call; remove them for the trace, or keep torch.nn's module there (fastattn.convert"
                                 f"(..., skip=...))")
            return first.tracer.create_proxy("call_module", name, args, kwargs)
        return forward(self, *args, **kwargs)

    return traced
