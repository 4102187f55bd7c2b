"""Build fastattn: the Python package, the Triton kernels (``kernels/`` -> ``fastattn.kernels``) and the
C++/CUDA extension ``fastattn._C``.

Environment:
  FASTATTN_SKIP_CUDA_BUILD=1   build the CPU C++ ops only
  FASTATTN_SKIP_CPP_BUILD=1    build no extension at all (Triton + reference only)
  FASTATTN_CUDA_ARCHS="80;90"  CUDA architectures (default "80;90")
  MAX_JOBS=N                   parallel compile jobs (ninja)
"""
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def _version():
    """__version__ from fastattn/version.py, read as text: building must not import the package (or torch)."""
    text = (ROOT / "fastattn" / "version.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    if match is None:
        raise RuntimeError("fastattn/version.py: no line __version__ = \"...\"")
    return match.group(1)


VERSION = _version()


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """CUDA_HOME from the environment, else the toolkit root behind the real nvcc.

    The nvcc on PATH may be a wrapper script (ours is), so cpp_extension's guess (dirname of nvcc/..) can be wrong.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
        try:  # a wrapper script: find the nvcc it execs
            text = Path(nvcc).read_text(errors="ignore")
            for tok in text.split():
                if tok.endswith("/bin/nvcc") and Path(tok).exists():
                    candidates.insert(0, Path(tok).parent.parent)
        except OSError:
            pass
    candidates += [Path("/usr/local/cuda")]
    for c in candidates:
        if (c / "bin" / "nvcc").exists() and (c / "include" / "cuda_runtime.h").exists():
            return str(c)
    return None


def _nvidia_include_dirs():
    """Headers of torch's nvidia pip packages (cuBLAS, cuSPARSE ...) missing from a minimal local toolkit."""
    dirs = []
    for p in sys.path:
        base = Path(p) / "nvidia"
        if base.is_dir():
            dirs += [str(d) for d in base.glob("*/include") if d.is_dir()]
    return dirs


def _arch_flags(archs):
    flags = []
    for a in archs.replace(",", ";").split(";"):
        a = a.strip().replace(".", "")
        if a:
            flags += [f"-gencode=arch=compute_{a},code=sm_{a}"]
    return flags


def _extensions():
    if _env_flag("FASTATTN_SKIP_CPP_BUILD"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("torch is not importable at build time: building without the C++/CUDA extension "
                      "(install with --no-build-isolation to build it)", stacklevel=2)
        return [], {}

    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    sources = ["csrc/bindings.cpp"] + cpu_sources
    cxx_flags = ["-O3", "-fopenmp", "-DFASTATTN_VERSION=\"" + VERSION + "\""]
    link_flags = ["-fopenmp"]
    include_dirs = [str(ROOT / "csrc")]

    with_cuda = False
    cuda_archs = os.environ.get("FASTATTN_CUDA_ARCHS", "80;90")
    if not _env_flag("FASTATTN_SKIP_CUDA_BUILD"):
        cuda_home = _find_cuda_home()
        if torch.version.cuda is None:
            warnings.warn("torch is a CPU-only build: skipping the CUDA ops (cpp_extension cannot compile .cu "
                          "files against it)", stacklevel=2)
        elif cuda_home is None:
            warnings.warn("nvcc not found: skipping the CUDA ops (set CUDA_HOME to build them)", stacklevel=2)
        else:
            os.environ["CUDA_HOME"] = cuda_home
            cpp_extension.CUDA_HOME = cuda_home
            with_cuda = True

    nvcc_flags = []
    if with_cuda:
        cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        cuda_sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cpp"))
        sources += cuda_sources
        cxx_flags += ["-DFASTATTN_WITH_CUDA", "-DFASTATTN_CUDA_ARCHS=\"" + cuda_archs + "\""]
        include_dirs += _nvidia_include_dirs()
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                      "-DFASTATTN_WITH_CUDA"] + _arch_flags(cuda_archs)
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}

    ext = ext_cls(name="fastattn._C", sources=sources, include_dirs=include_dirs,
                  extra_compile_args=extra, extra_link_args=link_flags)
    return [ext], {"build_ext": _persistent_build_ext(cpp_extension.BuildExtension.with_options(use_ninja=True))}


def _persistent_build_ext(base):
    """build_ext with its objects in ROOT/build/temp.* for every kind of build.

    pip's editable install (setuptools' editable_wheel) points build_temp at a fresh TemporaryDirectory on every run,
    so ninja found no objects and recompiled every C++/CUDA source (~8 min on 2 cores) even when nothing changed.
    With a fixed folder ninja compares sources, headers (its depfiles) and command lines, and a rerun with no change
    compiles nothing."""
    import sysconfig

    class BuildExt(base):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(ROOT / "build" / f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")

    return BuildExt


try:
    ext_modules, cmdclass = _extensions()
except Exception as e:  # never fail the install for the optional extension's set-up
    warnings.warn(f"fastattn: not building the C++/CUDA extension: {e}", stacklevel=1)
    ext_modules, cmdclass = [], {}

setup(
    name="fastattn",
    version=VERSION,
    description="Fused attention, residual+LayerNorm and INT8 matmul kernels for PyTorch (Triton, CUDA C++, CPU C++)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["fastattn", "fastattn.nn", "fastattn.ops", "fastattn.ops.attention", "fastattn.kernels",
              "fastattn.models", "fastattn.cli", "fastattn.data"],
    package_data={"fastattn.data": ["*.txt.xz", "*.json", "*.md"]},
    package_dir={"fastattn.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy", "safetensors", "tomli>=1.1; python_version < '3.11'"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib", "transformers>=5.4", "safetensors"],
    },
    entry_points={"console_scripts": ["fastattn=fastattn.__main__:main"]},
    zip_safe=False,
)
