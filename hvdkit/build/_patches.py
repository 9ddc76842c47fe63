"""Source patches hvdkit applies to the Horovod sdist before building it.

Each patch is an exact text replacement in one file. A patch whose expected text is gone
(a different Horovod release, an edited tree) fails with a message naming the patch and the
file, never silently: a half-patched Horovod is worse than none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hvdkit.errors import PatchError


@dataclass(frozen=True)
class SourcePatch:
    name: str
    path: str  # relative to the sdist root
    old: str
    new: str
    why: str

    def apply(self, root: Path) -> bool:
        """Apply to the tree at ``root``; return False when it was already applied."""
        target = root / self.path
        if not target.is_file():
            raise PatchError(
                f"patch {self.name!r} targets {self.path}, which does not exist under {root}",
                fix="hvdkit's patches are written for Horovod 0.28.1; build that version (--horovod-version 0.28.1)",
            )
        text = target.read_text()
        if self.new in text:
            return False
        if self.old not in text:
            raise PatchError(
                f"patch {self.name!r} no longer applies to {self.path}: the text it replaces is not there",
                fix="build --horovod-version 0.28.1, or update the patch in hvdkit/build/_patches.py",
            )
        if text.count(self.old) != 1:
            raise PatchError(
                f"patch {self.name!r} is ambiguous in {self.path}: its text occurs {text.count(self.old)} times",
                fix="make the patch's text unique in hvdkit/build/_patches.py",
            )
        tmp = target.with_name(target.name + ".hvdkit-tmp")
        tmp.write_text(text.replace(self.old, self.new))
        tmp.replace(target)
        return True


PATCHES: tuple[SourcePatch, ...] = (
    SourcePatch(
        name="torch-cxx17",
        path="horovod/torch/CMakeLists.txt",
        old=(
            'if(NOT Pytorch_VERSION VERSION_LESS "1.5.0")\n'
            "    set(CMAKE_CXX_STANDARD 14)\n"
            "endif()"
        ),
        new=(
            "# hvdkit: torch >= 2.1 headers refuse C++14 (\"C++17 or later compatible compiler is required\")\n"
            'if(NOT Pytorch_VERSION VERSION_LESS "2.1.0")\n'
            "    set(CMAKE_CXX_STANDARD 17)\n"
            'elseif(NOT Pytorch_VERSION VERSION_LESS "1.5.0")\n'
            "    set(CMAKE_CXX_STANDARD 14)\n"
            "endif()"
        ),
        why="PyTorch >= 2.1 requires C++17; Horovod 0.28.1 forces C++14 for its torch extension.",
    ),
    SourcePatch(
        name="cxx17-default",
        path="CMakeLists.txt",
        old="set(CMAKE_CXX_STANDARD 14)\nset(CMAKE_CXX_STANDARD_REQUIRED ON)",
        new="set(CMAKE_CXX_STANDARD 17)  # hvdkit: one standard for Gloo and the C++17 torch layer\nset(CMAKE_CXX_STANDARD_REQUIRED ON)",
        why=(
            "With the torch layer in C++17, Gloo's static constexpr Store::kDefaultTimeout is an inline "
            "variable there but a strong C++14 definition in libgloo.a, and the link fails with a multiple "
            "definition. Building everything as C++17 makes them agree."
        ),
    ),
    SourcePatch(
        name="gloo-process-set-iface",
        path="horovod/common/gloo/gloo_context.cc",
        old=(
            "  attr device_attr;\n"
            "  device_attr.iface = gloo_iface_;\n"
            "  device_attr.ai_family = AF_UNSPEC;\n"
            "  auto dev = CreateDevice(device_attr);\n"
            "\n"
            "  global_ctx = global_context.ctx;"
        ),
        new=(
            "  // hvdkit: inherit the global context's interface (0.28.1 left it empty, so process-set\n"
            "  // contexts bound to whatever the hostname resolves to, often 127.0.1.1 across hosts)\n"
            "  gloo_iface_ = global_context.gloo_iface_;\n"
            "  attr device_attr;\n"
            "  device_attr.iface = gloo_iface_;\n"
            "  device_attr.ai_family = AF_UNSPEC;\n"
            "  auto dev = CreateDevice(device_attr);\n"
            "\n"
            "  global_ctx = global_context.ctx;"
        ),
        why="Multi-host Gloo jobs fail in hvd.init() with `connect [127.0.x.1]` when hostnames resolve to loopback.",
    ),
    SourcePatch(
        name="tf-xla-ops-optional",
        path="horovod/tensorflow/CMakeLists.txt",
        old='list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")',
        new=(
            "# hvdkit: the XLA custom-call ops only serve GPU XLA, and include headers TF >= 2.16 moved\n"
            "# (tensorflow/compiler/xla -> xla, highwayhash); opt in with HVDKIT_BUILD_XLA_OPS=1 on GPU.\n"
            "if((HAVE_CUDA OR HAVE_ROCM) AND DEFINED ENV{HVDKIT_BUILD_XLA_OPS})\n"
            '    list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")\n'
            "endif()"
        ),
        why="xla_mpi_ops.cc fails to compile against TF 2.21 headers and is only used for GPU XLA.",
    ),
    SourcePatch(
        name="torch-wait-without-spinning",
        path="horovod/torch/mpi_ops_v2.cc",
        old=(
            "void WaitAndClear(int handle) {\n"
            "  while (true) {\n"
            "    if (handle_manager.PollHandle(handle)) break;\n"
            "    {\n"
            "      py::gil_scoped_release release_python_gil;\n"
            "      std::this_thread::yield();\n"
            "    }\n"
            "  }\n"
        ),
        new=(
            "void WaitAndClear(int handle) {\n"
            "  // hvdkit: yield as before for a collective's usual wait, then poll every 100 us: a rank\n"
            "  // waiting seconds (for rank 0's checkpoint or run creation) no longer takes a whole core.\n"
            "  const auto spin_until = std::chrono::steady_clock::now() + std::chrono::milliseconds(10);\n"
            "  while (true) {\n"
            "    if (handle_manager.PollHandle(handle)) break;\n"
            "    {\n"
            "      py::gil_scoped_release release_python_gil;\n"
            "      if (std::chrono::steady_clock::now() < spin_until) {\n"
            "        std::this_thread::yield();\n"
            "      } else {\n"
            "        std::this_thread::sleep_for(std::chrono::microseconds(100));\n"
            "      }\n"
            "    }\n"
            "  }\n"
        ),
        why=(
            "hvd.synchronize() (every torch collective: the optimizer's allreduces, broadcast_object) "
            "spins in sched_yield until the operation completes, so a rank that waits seconds burns a "
            "core: on a host whose cores are all in use, it takes them from the process it waits for "
            "(rank 0's MLflow writer at nice 19 starved behind it: the tracker's start took 7 s)."
        ),
    ),
)


def apply_patches(root: Path, patches: tuple[SourcePatch, ...] = PATCHES) -> list[str]:
    """Apply every patch to the sdist tree at ``root``; return the names that changed the tree."""
    return [p.name for p in patches if p.apply(Path(root))]
