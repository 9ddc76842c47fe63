"""The Horovod world as the tracker sees it: ranks, local ranks, and every rank's hostname."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Hostnames travel through the tracker's numeric allgather as fixed-width bytes.
HOSTNAME_BYTES = 64


@dataclass
class World:
    """The Horovod world as the framework layer sees it (filled from ``hvd``)."""

    rank: int
    size: int
    local_rank: int = 0
    local_size: int = 1
    hostnames: list[str] = field(default_factory=list)  # per rank, index = rank

    @classmethod
    def from_horovod_env(cls, rank: int, size: int, exchange: Callable[[Any], Any] | None = None) -> "World":
        """Local rank/size from the launcher's environment (horovodrun/gloo or mpirun), and every
        rank's hostname through ``exchange``, a collective that every rank must call:

        * an allgather (e.g. the tracker's ``gather``) returning ``[size, n]``: the hostnames
          travel as fixed-width bytes, so the numeric gather the tracker uses anyway suffices;
        * anything else (a broadcast) tells only rank 0's name: ``hostnames`` is left empty.
        """
        from hvdkit.tracking import _launch_env

        env = os.environ
        launch = _launch_env._launch()
        local_rank, local_size = 0, 1
        if launch is not None:
            _, (_, _, lr_var, ls_var) = launch
            local_rank = int(_launch_env.launch_value(env, lr_var) or 0)
            local_size = int(_launch_env.launch_value(env, ls_var) or 1)
        hostnames: list[str] = []
        if exchange is not None:
            me = _launch_env.rank_hostname(env).encode()[:HOSTNAME_BYTES]  # an srun task: its Slurm node
            buf = np.zeros(HOSTNAME_BYTES, dtype=np.uint8)
            buf[: len(me)] = np.frombuffer(me, dtype=np.uint8)
            got = np.asarray(exchange(buf))
            if got.ndim == 2 and got.shape == (size, HOSTNAME_BYTES):
                hostnames = [bytes(row.astype(np.uint8)).rstrip(b"\0").decode(errors="replace") for row in got]
        return cls(rank=rank, size=size, local_rank=local_rank, local_size=local_size, hostnames=hostnames)


def local_ranks(hostnames: list[str]) -> list[int]:
    """Each rank's local rank, from every rank's hostname: Horovod numbers local ranks in rank
    order within a host."""
    seen: dict[str, int] = {}
    out = []
    for h in hostnames:
        out.append(seen.get(h, 0))
        seen[h] = out[-1] + 1
    return out


__all__ = ["HOSTNAME_BYTES", "World", "local_ranks"]
