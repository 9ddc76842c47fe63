"""Lazy framework imports with an install hint (cf. Horovod's ``check_extension``).

Only ``hvdkit.torch`` and ``hvdkit.tensorflow`` call these; nothing else imports a framework.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from hvdkit.errors import FrameworkMissingError

_HINTS = {
    "torch": "pip install 'hvdkit[torch]' && hvdkit build-horovod",
    "tensorflow": "pip install 'hvdkit[tensorflow]' && hvdkit build-horovod",
}
_HVD = {"torch": "horovod.torch", "tensorflow": "horovod.tensorflow"}


def require(framework: str) -> tuple[ModuleType, ModuleType]:
    """Import ``framework`` and Horovod's layer for it, or fail with the command that fixes it."""
    try:
        fw = importlib.import_module(framework)
    except ImportError as exc:
        raise FrameworkMissingError(f"{framework} is not installed ({exc})", fix=_HINTS[framework]) from None
    try:
        hvd = importlib.import_module(_HVD[framework])
    except ImportError as exc:
        raise FrameworkMissingError(
            f"Horovod's {framework} layer cannot be imported ({str(exc).splitlines()[0][:200]})",
            fix="hvdkit build-horovod  (builds Horovod for the frameworks installed; `hvdkit doctor` explains)",
        ) from None
    return fw, hvd
