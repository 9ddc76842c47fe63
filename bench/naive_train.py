"""Per-rank runner of the tracking bench's *naive* variant (started under horovodrun).

hvdkit's own training loop (``hvdkit.core.run_training``) and PyTorch backend, with a tracker
that does what a hand-rolled integration (or Accelerate's MLflow tracker) does: rank 0 calls
``mlflow.log_metric`` synchronously, three metrics every step, on the training thread.

    python -m hvdkit._horovodrun -np 2 --gloo python -m bench.naive_train RECIPE [key=value ...]

Writes the Summary to ``$HVDKIT_SUMMARY_JSON`` like ``hvdkit.train`` does.
"""

from __future__ import annotations

import os
import sys
import time


class NaiveMlflowTracker:
    """The loop's Tracker protocol, logging synchronously from the training thread."""

    def __init__(self, rank: int, experiment: str) -> None:
        self.rank = rank
        self._mlflow = None
        if rank == 0:
            import mlflow

            mlflow.set_experiment(experiment)
            mlflow.start_run(run_name="naive-log_metric")
            self._mlflow = mlflow

    def record_step(self, step: int, *, samples: int, step_time_s: float, data_time_s: float, comm_wait_s: float,
                    loss: float) -> None:
        m = self._mlflow
        if m is None:
            return
        span = step_time_s + data_time_s
        m.log_metric("loss", loss, step=step)
        m.log_metric("samples_per_sec", samples / span if span > 0 else 0.0, step=step)
        m.log_metric("step_time_s", step_time_s, step=step)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._mlflow is not None:
            self._mlflow.log_metrics(dict(metrics), step=step)

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def finish(self) -> None:
        if self._mlflow is not None:
            self._mlflow.end_run()


def main(argv: list[str]) -> int:
    from hvdkit.core import load_builtin, run_training
    from hvdkit.recipe import load_recipe
    from hvdkit.torch import make_backend
    from hvdkit.train import _write_summary_json

    loaded = load_recipe(argv[0], argv[1:])
    recipe = loaded.recipe
    data = load_builtin(recipe.data, recipe.seed)
    backend = make_backend(recipe, data)
    tracker = NaiveMlflowTracker(backend.rank, os.environ.get("MLFLOW_EXPERIMENT_NAME") or "bench-naive")
    marks = {"backend_ready": time.time()}
    summary = run_training(backend, recipe, data, tracker)
    marks["train_end"] = time.time()
    tracker.finish()
    out = os.environ.get("HVDKIT_SUMMARY_JSON")
    if out and backend.rank == 0:
        _write_summary_json(out, summary, recipe, backend.size, marks)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
