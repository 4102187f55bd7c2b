"""CPU weights in transparent huge pages (Linux): fastattn.hugepages.

A decode step streams every weight once per token. With 4 KiB pages, a 500 MB GPT-2-small costs ~120k TLB misses a
token and the hardware prefetchers stop at every page boundary; in 2 MiB pages the same GEMVs run ~10 % faster on
our hosts (benchmarks/results/2026-12-05-cpu-session14). Linux hands anonymous memory huge pages only where the
program asks (``madvise``, the usual setting of /sys/kernel/mm/transparent_hugepage/enabled), which torch's allocator
does only under the environment variable THP_MEM_ALLOC_ENABLE=1, read once at startup.

So the models place what they create on the CPU (from_hf / from_pretrained weights, the KV cache, the CLI's loads,
fastattn.quantize's int8 weights) in private anonymous mappings advised MADV_HUGEPAGE, 2 MiB-aligned, for tensors of
2 MiB or more. Elsewhere (another OS, THP "always" or "never", a GPU) nothing changes. FASTATTN_HUGEPAGES=0 turns it
off. The tensors are ordinary CPU tensors (their storage cannot be resized, as any torch.frombuffer tensor's).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
from typing import Sequence

import torch
from torch import Tensor, nn

log = logging.getLogger("fastattn")

HUGE_PAGE = 2 << 20
_THP_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.lru_cache(maxsize=None)
def _thp_mode() -> str:
    """The bracketed word of the THP setting ("always", "madvise", "never"), or "" where there is none."""
    try:
        with open(_THP_FILE) as f:
            text = f.read()
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def enabled() -> bool:
    """Whether placing tensors in huge pages changes anything here (THP on madvise, not turned off)."""
    return os.environ.get("FASTATTN_HUGEPAGES", "1") != "0" and _thp_mode() == "madvise" and \
        hasattr(mmap, "MADV_HUGEPAGE")


def empty(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """An uninitialised CPU tensor whose memory is advised for huge pages when that helps (see the module's text);
    else torch.empty."""
    shape = torch.Size(shape)
    nbytes = shape.numel() * dtype.itemsize
    if nbytes < HUGE_PAGE or not enabled():
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(buf)  # only to read the mapping's address
    offset = -ctypes.addressof(view) % HUGE_PAGE
    del view
    buf.madvise(mmap.MADV_HUGEPAGE, offset, nbytes - nbytes % mmap.PAGESIZE)
    # frombuffer holds a reference to buf: the mapping lives as long as the tensor's storage
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).view(shape)


def zeros(shape: Sequence[int], dtype: torch.dtype, device=None) -> Tensor:
    """torch.zeros(shape, dtype, device), in huge pages on the CPU where that helps."""
    if device is not None and torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return empty(shape, dtype).zero_()


def _placed(t: Tensor) -> bool:
    return t.data_ptr() % HUGE_PAGE == 0 and not t.untyped_storage().resizable()


@torch.no_grad()
def place(module: nn.Module) -> nn.Module:
    """Move ``module``'s CPU parameters and buffers of 2 MiB or more into huge pages, in place (each parameter keeps
    its identity; tensors shared by several names stay shared). A no-op where ``enabled()`` is False."""
    if not enabled():
        return module
    moved, total = {}, 0
    for mod in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(mod, kind).items():
                nbytes = 0 if t is None else t.numel() * t.element_size()
                # only a tensor that is its whole storage: a view's sharing would not survive the copy
                if nbytes < HUGE_PAGE or t.device.type != "cpu" or not t.is_contiguous() or \
                        t.storage_offset() or t.untyped_storage().nbytes() != nbytes or _placed(t):
                    continue
                key = (t.data_ptr(), t.dtype, tuple(t.shape))
                if key not in moved:
                    new = empty(t.shape, t.dtype)
                    new.copy_(t)
                    moved[key] = new
                    total += nbytes
                if isinstance(t, nn.Parameter):
                    t.data = moved[key]
                else:
                    getattr(mod, kind)[name] = moved[key]
    if total:
        log.debug("fastattn.hugepages: %.1f MB of weights placed in huge pages", total / 1e6)
    return module
