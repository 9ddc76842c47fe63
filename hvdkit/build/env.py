"""What the build environment has: frameworks, compiler, cmake, MPI, CUDA. No framework imports."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

FRAMEWORKS = ("torch", "tensorflow")
# Distributions that provide each framework's import package.
_DISTS = {"torch": ("torch",), "tensorflow": ("tensorflow-cpu", "tensorflow", "tensorflow-gpu")}
INSTALL_HINT = {
    "torch": "pip install 'hvdkit[torch]'  (torch==2.13.0, the CPU wheel)",
    "tensorflow": "pip install 'hvdkit[tensorflow]'  (tensorflow-cpu 2.21)",
}


def framework_version(framework: str) -> str | None:
    """Installed version of ``framework`` without importing it (importing TF costs seconds)."""
    if importlib.util.find_spec(framework) is None:
        return None
    for dist in _DISTS[framework]:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def find_compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx):
        return shutil.which(cxx)
    for name in ("g++", "c++", "clang++"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def cmake_version(cmake: str | None = None) -> tuple[str | None, str | None]:
    """(path, version) of the cmake on PATH, (None, None) when there is none."""
    path = cmake or shutil.which("cmake")
    if not path:
        return None, None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return path, None
    m = re.search(r"version\s+([\d.]+)", out)
    return path, m.group(1) if m else None


def find_mpi() -> dict[str, str | None]:
    return {"mpicxx": shutil.which("mpicxx"), "mpirun": shutil.which("mpirun")}


def find_cuda() -> dict[str, str | None]:
    nvcc = shutil.which("nvcc") or (
        str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
        if (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc").exists()
        else None
    )
    nccl = None
    for d in filter(None, [os.environ.get("HOROVOD_NCCL_HOME"), "/usr", "/usr/local/cuda", "/usr/local/nccl"]):
        for lib in ("lib/x86_64-linux-gnu/libnccl.so", "lib64/libnccl.so", "lib/libnccl.so", "lib/aarch64-linux-gnu/libnccl.so"):
            if (Path(d) / lib).exists():
                nccl = str(Path(d) / lib)
    return {"nvcc": nvcc, "nccl": nccl}


MARKER = Path(sys.prefix) / "hvdkit-horovod.json"


def installed_build() -> dict | None:
    """What ``hvdkit build-horovod`` last installed into this environment, if it did."""
    try:
        return json.loads(MARKER.read_text())
    except (OSError, ValueError):
        return None


# Runs in a fresh interpreter: Horovod's framework layers must not be imported into the CLI
# process (TF and torch in one process is slow, and a broken build must not crash the caller).
_PROBE = r"""
import importlib, json, sys
fw = sys.argv[1]
out = {"framework": fw}
try:
    hvd = importlib.import_module({"torch": "horovod.torch", "tensorflow": "horovod.tensorflow"}[fw])
    out.update(ok=True, version=getattr(importlib.import_module("horovod"), "__version__", "?"),
               gloo=bool(hvd.gloo_built()), mpi=bool(hvd.mpi_built()), nccl=bool(hvd.nccl_built()),
               ddl=bool(hvd.ddl_built()), ccl=bool(hvd.ccl_built()), cuda=bool(hvd.cuda_built()),
               rocm=bool(hvd.rocm_built()))
except Exception as exc:
    out.update(ok=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
print(json.dumps(out))
"""


def probe_horovod(frameworks: list[str], python: str = sys.executable) -> dict[str, dict]:
    """Import ``horovod.<framework>`` in a subprocess per framework (in parallel) and report."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    procs = {
        fw: subprocess.Popen([python, "-c", _PROBE, fw], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for fw in frameworks
    }
    results = {}
    for fw, p in procs.items():
        out, err = p.communicate(timeout=300)
        try:
            results[fw] = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            results[fw] = {"framework": fw, "ok": False, "error": (err.strip().splitlines() or ["no output"])[-1][:300]}
    return results
