"""``hvdkit build-horovod``: Horovod sdist + shipped patches -> cached wheel -> installed, checked."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from hvdkit._files import atomic_write_json
from hvdkit.build import env as _env  # the probes (public: hvdkit.build.env)
from hvdkit.build._cache import BuildKey, CachedWheel, WheelCache, cache_root
from hvdkit.build._patches import PATCHES, apply_patches
from hvdkit.errors import BuildError, CacheError, UsageError

# The releases hvdkit's patches are written for. Any other version would build unpatched and fail
# (or worse, half-work), so it is refused up front.
SUPPORTED_HOROVOD = ("0.28.1",)
CONTROLLERS = ("gloo", "mpi")


@dataclass
class BuildPlan:
    horovod_version: str = SUPPORTED_HOROVOD[-1]
    frameworks: list[str] = field(default_factory=list)  # empty: every framework installed
    controllers: list[str] = field(default_factory=lambda: list(CONTROLLERS))
    gpu: bool = False
    jobs: int = 0  # 0: one per core
    force: bool = False  # rebuild even on a cache hit
    install: bool = True
    sdist: Path | None = None  # a local sdist instead of downloading from PyPI
    cache: WheelCache = field(default_factory=WheelCache)


@dataclass
class BuildResult:
    wheel: Path
    key: BuildKey
    cache_hit: bool
    installed: bool
    seconds: float
    probe: dict[str, dict]


def patch_digest() -> str:
    h = hashlib.sha256()
    for p in PATCHES:
        h.update(f"{p.name}\0{p.path}\0{p.old}\0{p.new}\0".encode())
    return h.hexdigest()


def resolve(plan: BuildPlan) -> tuple[BuildKey, dict[str, str]]:
    """Check the request against the machine; return the cache key and the framework versions."""
    if plan.horovod_version not in SUPPORTED_HOROVOD:
        raise UsageError(
            f"unknown --horovod-version {plan.horovod_version!r}: hvdkit ships patches for {', '.join(SUPPORTED_HOROVOD)} only",
            fix=f"use --horovod-version {SUPPORTED_HOROVOD[-1]}",
        )
    bad = [c for c in plan.controllers if c not in CONTROLLERS]
    if bad or not plan.controllers:
        raise UsageError(f"unknown controller(s) {bad or plan.controllers}", fix=f"choose from {', '.join(CONTROLLERS)}")
    unknown = [f for f in plan.frameworks if f not in _env.FRAMEWORKS]
    if unknown:
        raise UsageError(f"unknown framework(s) {unknown}", fix=f"choose from {', '.join(_env.FRAMEWORKS)}")

    versions = {fw: v for fw in _env.FRAMEWORKS if (v := _env.framework_version(fw))}
    wanted = plan.frameworks or list(versions)
    if not wanted:
        raise BuildError(
            "no deep-learning framework is installed, so there is nothing to build Horovod for",
            fix="pip install 'hvdkit[torch]' and/or 'hvdkit[tensorflow]', then rerun",
        )
    missing = [fw for fw in wanted if fw not in versions]
    if missing:
        raise BuildError(
            f"requested framework {missing[0]!r} is not installed in {sys.prefix}",
            fix=_env.INSTALL_HINT[missing[0]],
        )

    if not _env.find_compiler():
        raise BuildError("no C++ compiler found (looked for $CXX, g++, c++, clang++)", fix="apt-get install g++  (or set CXX)")
    cmake, cmake_ver = _env.cmake_version()
    if not cmake or not cmake_ver:
        raise BuildError("cmake not found on PATH", fix="apt-get install cmake  (Debian's 3.25 is known good)")
    if "mpi" in plan.controllers:
        mpi = _env.find_mpi()
        if not mpi["mpicxx"] or not mpi["mpirun"]:
            raise BuildError(
                "MPI controller requested but mpicxx/mpirun not found",
                fix="apt-get install openmpi-bin libopenmpi-dev, or pass --controllers gloo",
            )
    if plan.gpu:
        cuda = _env.find_cuda()
        if not cuda["nvcc"]:
            raise BuildError("--gpu requested but nvcc not found (checked PATH and $CUDA_HOME/bin)", fix="use a CUDA devel image or set CUDA_HOME")
        if not cuda["nccl"]:
            raise BuildError("--gpu requested but libnccl.so not found", fix="install libnccl-dev or set HOROVOD_NCCL_HOME")

    key = BuildKey.for_python(
        horovod=plan.horovod_version,
        torch=versions.get("torch") if "torch" in wanted else None,
        tensorflow=versions.get("tensorflow") if "tensorflow" in wanted else None,
        gpu=plan.gpu,
        mpi="mpi" in plan.controllers,
        patches=patch_digest(),
    )
    return key, {fw: versions[fw] for fw in wanted}


def build_env(plan: BuildPlan, frameworks: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    for fw, var in (("torch", "PYTORCH"), ("tensorflow", "TENSORFLOW")):
        env[f"HOROVOD_WITH_{var}" if fw in frameworks else f"HOROVOD_WITHOUT_{var}"] = "1"
    env["HOROVOD_WITHOUT_MXNET"] = "1"
    for c in CONTROLLERS:
        env[f"HOROVOD_WITH_{c.upper()}" if c in plan.controllers else f"HOROVOD_WITHOUT_{c.upper()}"] = "1"
    if plan.gpu:
        env["HOROVOD_GPU_OPERATIONS"] = "NCCL"
    else:
        for var in ("HOROVOD_GPU_OPERATIONS", "HOROVOD_GPU_ALLREDUCE", "HOROVOD_GPU_BROADCAST"):
            env.pop(var, None)
        env["HOROVOD_CPU_OPERATIONS"] = "gloo" if "gloo" in plan.controllers else "mpi"
    env["MAKEFLAGS"] = f"-j{plan.jobs or os.cpu_count() or 1}"
    # cmake 4 rejects Gloo's ancient cmake_minimum_required; harmless on 3.x.
    env.setdefault("CMAKE_POLICY_VERSION_MINIMUM", "3.5")
    # The venv's bin first, so Horovod's setup finds this interpreter's pip and frameworks.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def fetch_sdist(plan: BuildPlan, log: Callable[[str], None]) -> Path:
    if plan.sdist:
        if not Path(plan.sdist).is_file():
            raise UsageError(f"--sdist {plan.sdist} does not exist", fix="point --sdist at a horovod-X.Y.Z.tar.gz")
        return Path(plan.sdist)
    sdists = plan.cache.root / "sdists"
    target = sdists / f"horovod-{plan.horovod_version}.tar.gz"
    if target.is_file() and tarfile.is_tarfile(target):
        return target
    sdists.mkdir(parents=True, exist_ok=True)
    log(f"downloading horovod=={plan.horovod_version} sdist from PyPI")
    with tempfile.TemporaryDirectory(dir=sdists) as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
             f"horovod=={plan.horovod_version}", "-d", tmp],
            capture_output=True, text=True,
        )
        got = list(Path(tmp).glob("horovod-*.tar.gz"))
        if proc.returncode != 0 or not got:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise BuildError(f"could not download the horovod=={plan.horovod_version} sdist: {tail}", fix="check access to PyPI, or pass --sdist PATH")
        os.replace(got[0], target)
    return target


def _compile(plan: BuildPlan, sdist: Path, frameworks: list[str], logfile: Path, log: Callable[[str], None]) -> Path:
    with tempfile.TemporaryDirectory(prefix="hvdkit-build-") as tmp:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        roots = [p for p in Path(tmp).iterdir() if p.is_dir()]
        if len(roots) != 1:
            raise BuildError(f"unexpected layout in {sdist}", fix="delete it and rerun to download a fresh copy")
        src = roots[0]
        applied = apply_patches(src)
        log(f"patched {src.name}: {', '.join(applied) or 'already patched'}")
        out = Path(tmp) / "wheelhouse"
        cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(out), "-v"]
        log(f"compiling Horovod for {', '.join(frameworks)} with {', '.join(plan.controllers)} "
            f"({'GPU/NCCL' if plan.gpu else 'CPU'}); log: {logfile}")
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "w") as lf:
            proc = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, env=build_env(plan, frameworks), cwd=tmp)
        if proc.returncode != 0:
            tail = [l for l in logfile.read_text(errors="replace").splitlines() if "error" in l.lower()][-3:]
            raise BuildError(
                "compiling Horovod failed: " + (" | ".join(s.strip()[:200] for s in tail) or f"pip exited {proc.returncode}"),
                fix=f"read the full log at {logfile}",
            )
        wheels = list(out.glob("horovod-*.whl"))
        if not wheels:
            raise BuildError("pip reported success but produced no horovod wheel", fix=f"read {logfile}")
        # Copy out of the temp dir before it disappears; the cache copies it again atomically.
        keep = logfile.parent / wheels[0].name
        shutil.copy2(wheels[0], keep)
        return keep


def install_wheel(cached: CachedWheel, versions: dict[str, str], log: Callable[[str], None]) -> bool:
    """pip-install the cached wheel unless this exact wheel is already installed. True if installed now."""
    current = _env.installed_build()
    if current and current.get("sha256") == cached.sha256 and _env.dist_version("horovod"):
        log("this exact Horovod wheel is already installed")
        return False
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-build-isolation", str(cached.wheel)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"installing {cached.wheel.name} failed: {tail}", fix="rerun with a writable environment")
    # Horovod's runtime Python deps (cloudpickle, psutil, pyyaml, packaging) come with hvdkit itself.
    atomic_write_json(_env.MARKER, {"sha256": cached.sha256, "wheel": cached.wheel.name, "key": asdict(cached.key),
                                    "frameworks": versions})
    return True


def verify(plan: BuildPlan, frameworks: list[str]) -> dict[str, dict]:
    probe = _env.probe_horovod(frameworks)
    for fw in frameworks:
        r = probe[fw]
        if not r.get("ok"):
            raise BuildError(f"Horovod built, but `import horovod.{fw}` fails: {r.get('error')}", fix="run `hvdkit build-horovod --force`")
        for c in plan.controllers:
            if not r.get(c):
                raise BuildError(f"Horovod's {fw} layer was built without the {c} controller", fix="install what it needs and run `hvdkit build-horovod --force`")
        if plan.gpu and not r.get("nccl"):
            raise BuildError(f"--gpu build of Horovod's {fw} layer has no NCCL", fix="set HOROVOD_NCCL_HOME and rebuild with --force")
    return probe


def _record_controllers(probe: dict[str, dict]) -> None:
    """Remember what the check saw, so launches need not import every framework to ask again."""
    marker = _env.installed_build()
    if marker is None:
        return
    marker["controllers"] = {c: all(p.get(c) for p in probe.values()) for c in CONTROLLERS}
    atomic_write_json(_env.MARKER, marker)


def build_horovod(plan: BuildPlan, log: Callable[[str], None] = print) -> BuildResult:
    t0 = time.perf_counter()
    key, versions = resolve(plan)
    frameworks = list(versions)
    plan.cache.clean_stale_staging()
    cached = None if plan.force else plan.cache.lookup(key)
    hit = cached is not None
    if hit:
        log(f"cache hit: {cached.wheel}")
    else:
        sdist = fetch_sdist(plan, log)
        logfile = cache_root() / "logs" / f"build-{key.slug()}.log"
        built = _compile(plan, sdist, frameworks, logfile, log)
        cached = plan.cache.store(key, built)
        built.unlink(missing_ok=True)
        log(f"cached {cached.wheel}")
    installed = False
    probe: dict[str, dict] = {}
    if plan.install:
        installed = install_wheel(cached, versions, log)
        probe = verify(plan, frameworks)
        _record_controllers(probe)
    return BuildResult(wheel=cached.wheel, key=key, cache_hit=hit, installed=installed,
                       seconds=time.perf_counter() - t0, probe=probe)


__all__ = ["BuildPlan", "BuildResult", "SUPPORTED_HOROVOD", "build_horovod", "resolve", "CacheError"]
