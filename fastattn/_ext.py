"""Loads the compiled extension ``fastattn._C`` (optional) and reports what was built."""
import importlib
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which fastattn._C links against)

try:
    _C = importlib.import_module("fastattn._C")
    _C_ERROR = None
except ImportError as e:  # installed without a compiler, or the build was skipped
    _C = None
    _C_ERROR = str(e)
    warnings.warn(
        "fastattn: the C++/CUDA extension fastattn._C is not built "
        f"({_C_ERROR}); running on the Triton and reference backends only. "
        "Reinstall with `pip install --no-build-isolation -e .` and a C++ compiler to build it.",
        RuntimeWarning, stacklevel=2)


def has_cpp() -> bool:
    return _C is not None


def has_cuda_ops() -> bool:
    return _C is not None and bool(_C.with_cuda)


def cpp_missing_reason() -> str:
    return f"fastattn._C is not built ({_C_ERROR})"
