"""What this install of fastattn was built with and can run."""
import platform

import torch

from . import _ext
from .backends import BACKENDS, unavailable_reason
from .version import __version__


def build_info() -> dict:
    """Versions, what was compiled (CPU ops, CUDA archs) and each backend's availability on this machine."""
    C = _ext._C
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "fastattn": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cpp_ops": C is not None,
        "openmp": bool(C is not None and C.with_openmp),
        "cpu_avx2": bool(C is not None and C.cpu_has_avx2()),
        "cpu_int8_path": (C.cpu_int8_path() if C is not None and hasattr(C, "cpu_int8_path") else None),
        "cpu_w8a16_path": (C.cpu_w8a16_path() if C is not None and hasattr(C, "cpu_w8a16_path") else None),
        "cpu_stream_min_bytes": (C.cpu_stream_min_bytes() if C is not None else None),
        "cuda_ops": bool(C is not None and C.with_cuda),
        "cuda_archs": (C.cuda_archs if C is not None and C.with_cuda else ""),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": {b: unavailable_reason(b) or "available" for b in BACKENDS},
    }
