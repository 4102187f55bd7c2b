"""One generation at a time per model.

``generate`` keeps its state on the model, gpt-fast style: the preallocated KV caches of its layers, the cache
bookkeeping buffers, and results such as ``beam_scores`` or ``speculation_stats``. Two threads generating with one
model at once would write over each other's caches: wrong tokens, no error. So ``generate`` takes the model's lock
(and its assistant model's): calls from several threads take turns and each gets the output it would get alone.
A generate called again on the same model from inside its own call (a streamer callback, in the same thread) would
overwrite the caches in use: it raises instead. Many prompts at once: batch them (left padding, attention_mask).
"""
from __future__ import annotations

import contextlib
import functools
import threading
import weakref

_locks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its lock (not an attribute: deepcopy)
_owners: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> the thread generating with it
_guard = threading.Lock()


def _lock(model) -> threading.Lock:
    with _guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.Lock()
        return lock


@contextlib.contextmanager
def _turn(model, what: str):
    me = threading.get_ident()
    if _owners.get(model) == me:
        raise RuntimeError(f"{what}: this model is already generating in this thread (a streamer calling generate "
                           "again?); its KV caches are in use. Use another model object, or batch the prompts")
    with _lock(model):
        _owners[model] = me
        try:
            yield
        finally:
            _owners.pop(model, None)


def one_generation_at_a_time(fn):
    """Decorates a model's generate: the model (and ``assistant_model``, when given) held for the call."""
    what = fn.__qualname__

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        models = [self]
        assistant = kwargs.get("assistant_model")
        if assistant is not None and assistant is not self:
            models.append(assistant)
        with contextlib.ExitStack() as stack:
            for m in sorted(models, key=id):  # one order for every caller: no deadlock between two such pairs
                stack.enter_context(_turn(m, what))
            return fn(self, *args, **kwargs)

    return wrapper
