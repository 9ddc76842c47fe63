"""The allreduce probe of ``hvdkit plan``: time ``hvd.allreduce`` of fp32 tensors, ~4 KiB to 64 MiB.

Run under horovodrun like any job (``python -m hvdkit.torch._probe OUT.json [--budget-s S]``);
rank 0 writes ``{"size": N, "controller": ..., "points": [[bytes, seconds], ...]}`` to OUT.json.
The fitting is framework-free and lives in ``hvdkit/plan.py``. Horovod's torch layer is used
whatever framework the job trained with: the probe measures the controller (Gloo or MPI) and the
transport, which both frameworks share.
"""

from __future__ import annotations

import json
import sys
import time

SIZES = [4 << 10 << (2 * i) for i in range(8)]  # 4 KiB, 16 KiB, ... 64 MiB


def _timed(hvd, torch, nbytes: int, budget_s: float) -> float:
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    for i in range(2):  # warm-up: buffers and the controller's response cache
        hvd.allreduce(x, op=hvd.Sum, name=f"probe.w{nbytes}.{i}")
    # Every rank must run the same number of calls: the count is rank 0's, broadcast.
    t0 = time.perf_counter()
    hvd.allreduce(x, op=hvd.Sum, name=f"probe.e{nbytes}")
    est = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    est = hvd.broadcast(est, 0, name=f"probe.b{nbytes}").item()
    reps = int(max(3, min(50, budget_s / max(est, 1e-6))))
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        hvd.allreduce(x, op=hvd.Sum, name=f"probe.t{nbytes}")
        times.append(time.perf_counter() - t0)
    # The slowest rank bounds a synchronous collective: the max over ranks of each rank's median.
    times.sort()
    med = torch.tensor([times[len(times) // 2]], dtype=torch.float64)
    return float(hvd.allreduce(med, op=hvd.Max, name=f"probe.m{nbytes}").item())


def main(argv: list[str] | None = None) -> None:
    from hvdkit._frameworks import require
    from hvdkit._rank import rank_zero

    argv = sys.argv[1:] if argv is None else argv
    out = argv[0]
    budget = float(argv[argv.index("--budget-s") + 1]) if "--budget-s" in argv else 12.0
    torch, hvd = require("torch")
    torch.set_num_threads(1)
    hvd.init()
    per_size = budget / len(SIZES)
    points = [[n, _timed(hvd, torch, n, per_size)] for n in SIZES]
    controller = "mpi" if hvd.mpi_enabled() and not hvd.gloo_enabled() else "gloo"
    doc = {"size": hvd.size(), "controller": controller, "points": points}

    def write() -> None:
        from hvdkit._files import atomic_write_json

        atomic_write_json(out, doc)

    rank_zero(hvd.rank(), write)
    hvd.shutdown()


if __name__ == "__main__":
    main()
