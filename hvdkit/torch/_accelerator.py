"""The accelerator a PyTorch rank trains on, by name (for tracking's host type and config).

torch loads inside the functions: the autolog adapter imports this module before it knows that
the script uses torch at all.
"""

from __future__ import annotations

from typing import Any


def accelerator_name(device: Any) -> str | None:
    """``torch.cuda.get_device_name(device)`` when ``device`` is a CUDA device, else None."""
    if device is None:
        return None
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_name(device)


def model_device(model: Any) -> Any:
    """Where ``model``'s parameters live (the CPU for a model without any)."""
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def rank_cuda_device(local_rank: int) -> Any:
    """The CUDA device a Horovod script trains this rank on by convention
    (``torch.cuda.set_device(hvd.local_rank())``), or None when CUDA is not available."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
