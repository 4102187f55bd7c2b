"""Backend selection shared by every op.

Each op registers one :class:`Impl` per backend. An Impl declares what it supports (devices, dtypes, plus an
op-specific check) and explains every refusal. Auto mode walks a priority list per device type and takes the
first backend with no reasons against it; a forced backend (``with fastattn.backend("triton"):`` or the
``FASTATTN_BACKEND`` environment variable) that cannot run raises :class:`BackendNotSupported` listing why.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from . import _ext

log = logging.getLogger("fastattn")


def debug(msg: str, *args) -> None:
    """log.debug, skipped while dynamo traces: a logger call there breaks the graph (fullgraph=True fails)."""
    if not torch.compiler.is_compiling():
        log.debug(msg, *args)


BACKENDS = ("cuda", "triton", "cpu", "reference")
# Auto-mode order per tensor device type. Triton on CPU tensors runs only in the (slow) interpreter, so auto
# mode never picks it there; force it to test the Triton kernels without a GPU.
PRIORITY = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fastattn_backend", default=None)


class BackendNotSupported(RuntimeError):
    """Raised when a forced backend cannot run an op, or no backend can."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {BACKENDS} (or 'auto')")
    return name


@contextlib.contextmanager
def backend(name: Optional[str]) -> Iterator[None]:
    """Force every fastattn op in this block to run on ``name`` ("cuda", "triton", "cpu", "reference"), or
    restore auto selection with ``None`` / "auto". Applies to the backward of ops run inside the block too."""
    token = _forced.set(None if name in (None, "auto") else _check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> Optional[str]:
    """The backend forced by the innermost ``backend()`` block, else by ``FASTATTN_BACKEND``, else None."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get("FASTATTN_BACKEND", "").strip().lower()
    return None if env in ("", "auto") else _check_name(env)


def forced_backend_name() -> str:
    """The forced backend to record with a call ("" = auto). Under torch.compile it is left to the custom op, which
    reads it when it runs (dynamo cannot trace ContextVar.get)."""
    if torch.compiler.is_compiling():
        return ""
    return forced_backend() or ""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def unavailable_reason(name: str) -> Optional[str]:
    """Why a backend cannot run on this machine at all, or None when it can."""
    if name == "reference":
        return None
    if name == "cpu":
        return None if _ext.has_cpp() else _ext.cpp_missing_reason()
    if name == "cuda":
        if not _ext.has_cpp():
            return _ext.cpp_missing_reason()
        if not _ext.has_cuda_ops():
            return "fastattn._C was built without CUDA ops"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if not torch.cuda.is_available() and not triton_interpreted():
            return "no GPU for triton and TRITON_INTERPRET=1 is not set"
        return None
    raise ValueError(f"unknown backend {name!r}")


def available_backends() -> List[str]:
    """The backends that can run on this machine, in the order auto mode prefers them."""
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def triton_op(module: str, name: str) -> Callable:
    """fastattn.kernels.<module>.<name>, imported at its first call: triton loads only when a Triton backend runs."""
    def call(*args, **kwargs):
        return getattr(importlib.import_module(f"{__package__}.kernels.{module}"), name)(*args, **kwargs)
    return call


def compiled_op(name: str) -> Callable:
    """fastattn._C.<name>, looked up when called (the extension may be absent or built without it)."""
    def call(*args):
        return getattr(_ext._C, name)(*args)
    return call


def compiled_has(name: str) -> Callable[..., List[str]]:
    """An Impl check: fastattn._C was built with this op."""
    def check(req) -> List[str]:
        return [] if hasattr(_ext._C, name) else [f"fastattn._C has no {name}"]
    return check


# The reference backend's devices: meta too (shapes only), as torch's own modules run on meta tensors.
REFERENCE_DEVICES = ("cpu", "cuda", "meta")


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op and what it supports."""
    backend: str
    fwd: Callable
    bwd: Callable
    devices: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    # op-specific limits: (request) -> reasons; the request is the op's hashable description of its inputs
    check: Callable[..., List[str]] = field(default=lambda req: [])

    def not_supported_reasons(self, req) -> List[str]:
        why = unavailable_reason(self.backend)
        return [why] if why is not None else self.declared_reasons(req)

    def declared_reasons(self, req) -> List[str]:
        """What this backend declares it cannot run in req (device, dtype, features), on any machine."""
        reasons = []
        devices = self.devices
        if self.backend == "triton" and triton_interpreted():
            devices = devices + ("cpu",)
        if req.device not in devices:
            reasons.append(f"device={req.device} (supports {', '.join(devices)})")
        if req.dtype not in self.dtypes:
            reasons.append(f"dtype={req.dtype} (supports {', '.join(str(d) for d in self.dtypes)})")
        return reasons + list(self.check(req))


Priority = Union[Tuple[str, ...], Callable[[object], Tuple[str, ...]]]


class Dispatcher:
    """Picks the Impl of one op for a request: a NamedTuple with at least ``device`` and ``dtype``, built and hashed
    on every call (about half the cost of a frozen dataclass)."""

    def __init__(self, op: str, impls: Sequence[Impl], priority: Optional[Dict[str, Priority]] = None):
        self.op = op
        self.impls: Dict[str, Impl] = {i.backend: i for i in impls}
        self.priority = dict(PRIORITY, **(priority or {}))  # auto-mode order per device type (or req -> order)

    def select(self, req, forced: Optional[str] = None) -> Impl:
        """The Impl for req: forced names a backend, "" is auto mode as the caller has already read it (its
        forced_backend_name()), None reads forced_backend() now."""
        return self._select(req, (forced if forced is not None else forced_backend()) or None)

    @functools.lru_cache(maxsize=1024)  # noqa: B019 (the cache keeps self alive: dispatchers live as long as fastattn)
    def _select(self, req, forced: Optional[str]) -> Impl:
        if forced is not None:
            impl = self.impls.get(forced)
            reasons = ["not implemented for this op"] if impl is None else impl.not_supported_reasons(req)
            if reasons:
                raise BackendNotSupported(
                    f"fastattn.{self.op}: the forced backend {forced!r} cannot run this call: " + "; ".join(reasons))
            debug("fastattn.%s: running on forced backend %r for %s", self.op, forced, req)
            return impl
        refused = []
        order = self.priority.get(req.device, ("reference",))
        for name in order(req) if callable(order) else order:
            impl = self.impls.get(name)
            reasons = ["not implemented for this op"] if impl is None else impl.not_supported_reasons(req)
            if not reasons:
                if refused:
                    debug("fastattn.%s: running on %r for %s; refused: %s", self.op, name, req, " | ".join(refused))
                return impl
            refused.append(f"{name}: " + "; ".join(reasons))
        raise BackendNotSupported(f"fastattn.{self.op}: no backend can run this call: " + " | ".join(refused))

    def why_not(self, req) -> Dict[str, List[str]]:
        """Every backend's reasons against this request (empty list = supported)."""
        return {name: impl.not_supported_reasons(req) for name, impl in self.impls.items()}
