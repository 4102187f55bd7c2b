"""What `pip install` gets: an sdist that can build the extension (every header its sources include) and a wheel
with every module and data file of the package. Built from a copy of the source tree with setuptools' own PEP 517
backend, as pip and `python -m build` run it (without importing the tree's top-level ``kernels/`` folder, which
would shadow an installed package of that name)."""
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="python -P (no source folder on sys.path): 3.11+")
ROOT = Path(__file__).resolve().parent.parent
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "runs",
                                     ".hypothesis", ".ruff_cache", ".benchmarks", ".pytest_cache", ".out", ".whl")


def _build(kind: str, tmp_path: Path, **env) -> Path:
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)
    code = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out)!r}))"
    r = subprocess.run([sys.executable, "-P", "-c", code], cwd=src, capture_output=True, text=True, timeout=600,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out / r.stdout.strip().splitlines()[-1]


def _tracked(*folders: str, suffixes=None):
    files = [p for f in folders for p in (ROOT / f).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return {p.relative_to(ROOT).as_posix() for p in files if suffixes is None or p.suffix in suffixes}


def test_sdist_builds_the_extension_sources(tmp_path):
    sdist = _build("sdist", tmp_path)
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        texts = {n.split("/", 1)[1]: tar.extractfile(n).read().decode() for n in tar.getnames()
                 if n.endswith((".h", ".cuh", ".cpp", ".cu"))}
    sources = _tracked("csrc", suffixes={".h", ".cuh", ".cpp", ".cu"})
    assert sources and not sources - names, f"missing from the sdist: {sorted(sources - names)}"
    unresolved = []
    for name, text in texts.items():
        for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, re.M):
            here = os.path.normpath(os.path.join(os.path.dirname(name), inc))
            if here not in names and os.path.normpath(os.path.join("csrc", inc)) not in names:
                unresolved.append(f"{name}: {inc}")
    assert not unresolved, f"includes the sdist cannot resolve: {unresolved}"
    python = _tracked("fastattn", "kernels", suffixes={".py"}) | _tracked("fastattn/data")
    assert not python - names, f"missing from the sdist: {sorted(python - names)}"
    assert {"setup.py", "pyproject.toml", "README.md", "fastattn/version.py"} <= names


def test_wheel_has_every_module_and_data_file(tmp_path):
    wheel = _build("wheel", tmp_path, FASTATTN_SKIP_CPP_BUILD="1")  # the pure-Python part; the extension is above
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    expected = {n for n in _tracked("fastattn") if not n.endswith(".so")}
    expected |= {"fastattn/kernels/" + n.split("/", 1)[1] for n in _tracked("kernels", suffixes={".py"})}
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    assert "fastattn = fastattn.__main__:main" in entry_points
