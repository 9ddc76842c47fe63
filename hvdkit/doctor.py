"""``hvdkit doctor``: one screen saying whether this environment can train, and what to fix."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field

from packaging.version import Version

from hvdkit.build import env as build_env
from hvdkit.build._horovod import SUPPORTED_HOROVOD


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # make the install unusable: exit 1
    notes: list[str] = field(default_factory=list)  # known pitfalls that do not block

    @property
    def ok(self) -> bool:
        return not self.problems


def _mark(flag: bool) -> str:
    return "[X]" if flag else "[ ]"


def diagnose() -> Report:
    r = Report()
    versions = {fw: build_env.framework_version(fw) for fw in build_env.FRAMEWORKS}
    keras = build_env.dist_version("keras")
    mlflow_v = build_env.dist_version("mlflow")
    horovod_v = build_env.dist_version("horovod")
    r.lines += [
        "Versions",
        f"  python      {platform.python_version()}  ({sys.executable})",
        f"  torch       {versions['torch'] or 'not installed'}",
        f"  tensorflow  {versions['tensorflow'] or 'not installed'}",
        f"  keras       {keras or 'not installed'}",
        f"  mlflow      {mlflow_v or 'not installed'}",
        f"  horovod     {horovod_v or 'not installed'}",
    ]
    installed = [fw for fw, v in versions.items() if v]
    if not installed:
        r.problems.append("no framework installed — fix: pip install 'hvdkit[torch]' and/or 'hvdkit[tensorflow]'")
    if not horovod_v:
        r.problems.append("Horovod is not installed — fix: hvdkit build-horovod")
    elif horovod_v not in SUPPORTED_HOROVOD:
        r.notes.append(f"Horovod {horovod_v} was not built by hvdkit (it patches {', '.join(SUPPORTED_HOROVOD)}) — fix: hvdkit build-horovod")

    build = build_env.installed_build() or {}
    built_for = build.get("frameworks", {})
    probe = build_env.probe_horovod(installed) if horovod_v and installed else {}
    ops = {k: False for k in ("gloo", "mpi", "nccl", "ddl", "ccl", "cuda", "rocm")}
    r.lines.append("Horovod frameworks")
    for fw in build_env.FRAMEWORKS:
        p = probe.get(fw, {})
        detail = "" if p.get("ok") else (f"  ({p['error']})" if p.get("error") else "")
        r.lines.append(f"  {_mark(bool(p.get('ok')))} {fw}{detail}")
        if p.get("ok"):
            for k in ops:
                ops[k] = ops[k] or bool(p.get(k))
        if fw in installed and horovod_v and not p.get("ok"):
            err = p.get("error", "")
            if fw in built_for and built_for[fw] != versions[fw]:
                cause = f"Horovod was built against {fw} {built_for[fw]}, but {versions[fw]} is installed"
            elif "undefined symbol" in err:
                cause = f"Horovod's {fw} layer does not match the installed {fw} (ABI)"
            elif build and fw not in built_for:
                cause = f"Horovod was built before {fw} was installed"
            else:
                cause = f"`import horovod.{fw}` fails"
            r.problems.append(f"{cause} — fix: hvdkit build-horovod")
    r.lines.append("Horovod controllers")
    r.lines += [f"  {_mark(ops['gloo'])} Gloo", f"  {_mark(ops['mpi'])} MPI"]
    r.lines.append("Horovod tensor operations")
    r.lines += [f"  {_mark(ops[k])} {name}" for k, name in
                (("nccl", "NCCL"), ("ddl", "DDL"), ("ccl", "CCL"), ("mpi", "MPI"), ("gloo", "Gloo"), ("cuda", "CUDA"), ("rocm", "ROCm"))]
    if probe and any(p.get("ok") for p in probe.values()) and not (ops["gloo"] or ops["mpi"]):
        r.problems.append("Horovod has neither the Gloo nor the MPI controller — fix: hvdkit build-horovod --force")
    if ops["mpi"] and not build_env.find_mpi()["mpirun"]:
        r.problems.append("Horovod was built with MPI but mpirun is not on PATH — fix: apt-get install openmpi-bin")

    from hvdkit.tracking._credentials import mask_uri

    uri = mask_uri(os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")  # never print a password
    r.lines += ["Tracking", f"  MLFLOW_TRACKING_URI  {uri}{'' if os.environ.get('MLFLOW_TRACKING_URI') else '  (embedded default)'}"]

    # Known-bad combinations and their fixes.
    if keras and Version(keras).major >= 3 and versions["tensorflow"]:
        r.notes.append("Keras 3: upstream horovod.tensorflow.keras and DistributedGradientTape fail "
                       "('Variable' object has no attribute 'ref') — hvdkit.tensorflow is used instead")
    if mlflow_v and Version(mlflow_v) < Version("3.10"):
        r.notes.append(f"mlflow {mlflow_v} servers have known path-traversal and auth-bypass CVEs — fix: pip install 'mlflow>=3.10'")
    if versions["torch"] and Version(versions["torch"].split("+")[0]) >= Version("2.1") and horovod_v and not build:
        r.notes.append("torch >= 2.1 needs a C++17 Horovod build; a stock `pip install horovod` fails — fix: hvdkit build-horovod")
    if hasattr(os, "geteuid") and os.geteuid() == 0 and ops["mpi"] and not os.environ.get("OMPI_ALLOW_RUN_AS_ROOT"):
        r.notes.append("running as root: Open MPI refuses without OMPI_ALLOW_RUN_AS_ROOT=1 and "
                       "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 (hvdkit run sets them for you)")
    _, cmake_v = build_env.cmake_version()
    if cmake_v and Version(cmake_v) >= Version("4") and not os.environ.get("CMAKE_POLICY_VERSION_MINIMUM"):
        r.notes.append(f"cmake {cmake_v} rejects Gloo's old cmake_minimum_required (hvdkit build-horovod sets CMAKE_POLICY_VERSION_MINIMUM=3.5)")
    return r


def render(r: Report) -> str:
    out = ["hvdkit doctor", ""] + r.lines + [""]
    out += [f"  note: {n}" for n in r.notes]
    out += [f"  PROBLEM: {p}" for p in r.problems]
    out.append("Status: " + ("usable" if r.ok else f"NOT usable ({len(r.problems)} problem(s))"))
    return "\n".join(out)
