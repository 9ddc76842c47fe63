"""The per-rank process: ``horovodrun -np N python -m hvdkit.train RECIPE [options] [key=value ...]``.

``hvdkit run`` starts exactly this under horovodrun, or under ``srun --mpi=pmix`` inside a Slurm
allocation (hvdkit.launch.slurm), so a plain horovodrun or srun line behaves the same.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from importlib import import_module
from pathlib import Path

import click

from hvdkit._files import atomic_write_json
from hvdkit._ids import experiment_name
from hvdkit._rank import from_rank_zero, rank_zero
from hvdkit.errors import HvdkitError


class _Killed(BaseException):
    """SIGTERM/SIGINT: unwinds the training loop so the run ends as KILLED, not RUNNING."""


def _stop_handler(rank: int):
    from hvdkit.tracking._rank import stagger_peer_exit

    def on_signal(signum, _frame):
        stagger_peer_exit(rank)  # rank 0 first: it records the job KILLED, not "a peer failed"
        raise _Killed(signal.Signals(signum).name)

    return on_signal


# Set by benchmarks (bench/): rank 0 writes the Summary and wall-clock marks of the run's phases
# there as JSON, so throughput and time to first step are read exactly, not parsed from a table.
_T_IMPORT = time.time()  # this module imported: the interpreter is up, no framework loaded yet


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds of this process so far: per Python thread (by name), the threads Python does
    not know (Horovod's background thread, Gloo, the framework's pools) together, and in total."""
    import threading

    import psutil

    proc = psutil.Process()
    by_tid = {t.id: t.user_time + t.system_time for t in proc.threads()}
    out: dict[str, float] = {}
    for t in threading.enumerate():
        cpu = by_tid.pop(t.native_id, None) if t.native_id is not None else None
        if cpu is not None:
            out[t.name] = out.get(t.name, 0.0) + cpu
    out["(native threads)"] = sum(by_tid.values())
    times = proc.cpu_times()
    out["(process)"] = times.user + times.system
    return out


def _first_step_mark(marks: dict):
    """An ``after_step`` hook that records when the first optimizer step ended (``--summary-json``)."""
    def after_step(step: int) -> None:
        if "first_step" not in marks:
            marks["first_step"] = time.time()
    return after_step


def _write_summary_json(path, summary, recipe, size, marks, threads=None, comm_bytes=None) -> None:
    atomic_write_json(path, {"recipe": recipe.name, "framework": recipe.framework, "size": size, "steps": summary.steps,
                             "epochs": summary.epochs, "loss": summary.loss, "samples_per_sec": summary.samples_per_sec,
                             "seconds": summary.seconds, "val_metrics": summary.val_metrics, "marks": marks,
                             "stopped_early": summary.stopped_early, "replicas_equal": summary.replicas_equal,
                             "thread_cpu_s": threads or {}, "comm_bytes": comm_bytes or {}}, compact=True)


def _tracking_config(recipe, no_track, log_every, experiment, parent_run_id, job=None, accelerator=None):
    from hvdkit.tracking import TrackingConfig

    return TrackingConfig(
        parallel_model=recipe.parallel.model,  # the layout on the runs, and layer_comm_s when split
        enabled=not no_track,
        experiment=experiment_name(experiment),
        run_name=f"{recipe.name}-{recipe.framework}",
        log_every=log_every or recipe.log.every_steps,
        per_rank_runs=recipe.log.per_rank_runs,
        system_metrics_interval_s=recipe.log.system_metrics_interval_s,  # one sampler per host, 0: off
        parent_run_id=parent_run_id,
        job_id=job.job_id if job else None,
        resume_runs=dict(job.manifest.get("runs") or {}) if job and job.resumed else {},
        resumes=int(job.manifest.get("resumes") or 0) if job and job.resumed else 0,
        accelerator=accelerator,  # the framework layer's device: a GPU job's baseline is a GPU job
    )


def _open_job(recipe, backend, resume, force, track, experiment):
    """The job this process belongs to: rank 0 decides (a new id, ``$HVDKIT_JOB_ID`` from the
    launcher, or the checked ``--resume`` / Slurm-requeue target) and broadcasts it; an error is
    broadcast too, so every rank exits 2 instead of hanging. A collective."""
    return _job_from(from_rank_zero(backend.rank, backend.broadcast_object, _decide_job, recipe, backend.size, resume,
                                    force, track, experiment))


def _decide_job(recipe, np, resume, force, track, experiment) -> dict:
    """Rank 0's part of :func:`_open_job` (no collective): the job, as a dict every rank can
    rebuild it from, or ``{"error": one line}``. ``np`` None: an elastic job (no fixed size)."""
    from hvdkit.core.job import JobFolder, new_job_id, resolve_resume, slurm_requeue_spec
    from hvdkit.tracking import keys

    try:
        spec = resume or slurm_requeue_spec(recipe)
        if spec:
            job = resolve_resume(spec, recipe, np=np, force=force).folder
            job.claim()  # held until this process exits: a second start of the job is refused meanwhile
            runs = dict(job.manifest.get("runs") or {})
            if track and "parent" not in runs:  # rank 0 died before recording them
                from hvdkit.tracking._resume import find_job_runs

                runs = find_job_runs(job.job_id, experiment_name(experiment))
            job.update(status="RUNNING", resumes=int(job.manifest.get("resumes") or 0) + 1, runs=runs,
                       recipe=recipe.model_dump(mode="json"), np=np)
        else:
            # $HVDKIT_JOB_ID from hvdkit run; else (a plain horovodrun/srun line) rank 0 decides,
            # from SLURM_JOB_ID inside a Slurm job (new_job_id).
            job = JobFolder.for_recipe(recipe.checkpoint.dir,
                                       os.environ.get(keys.ENV_JOB_ID) or new_job_id(recipe.checkpoint.dir))
            job.claim()
            job.update(status="RUNNING", resumes=0, recipe=recipe.model_dump(mode="json"), np=np,
                       experiment=experiment_name(experiment), slurm_job_id=os.environ.get("SLURM_JOB_ID"))
        return {"job_id": job.job_id, "dir": str(job.dir) if job.dir else None, "resumed": job.resumed,
                "manifest": job.manifest}
    except HvdkitError as exc:
        return {"error": exc.one_line()}


def _job_from(shared: dict):
    """The JobFolder rank 0 decided (raises its error on every rank)."""
    from hvdkit.core.job import JobFolder

    if shared.get("error"):
        raise UsageErrorFromRankZero(shared["error"])
    return JobFolder(shared["job_id"], Path(shared["dir"]) if shared["dir"] else None, shared["resumed"],
                     shared["manifest"] or {})


class UsageErrorFromRankZero(HvdkitError):
    """Rank 0's one-line error (already with its fix), raised on every rank."""

    exit_code = 2


def _params(recipe) -> dict:
    from hvdkit.build import env as build_env

    knobs = {k: os.environ[k] for k in ("HOROVOD_FUSION_THRESHOLD", "HOROVOD_CYCLE_TIME", "HOROVOD_AUTOTUNE",
                                        "HOROVOD_CONTROLLER", "HOROVOD_CPU_OPERATIONS", "HOROVOD_TIMELINE") if k in os.environ}
    versions = {f"version.{n}": build_env.dist_version(d) or "none" for n, d in
                (("hvdkit", "hvdkit"), ("horovod", "horovod"), ("mlflow", "mlflow"), ("torch", "torch"),
                 ("tensorflow", "tensorflow-cpu"), ("keras", "keras"))}
    return {"recipe": recipe.model_dump(mode="json"), "horovod_env": knobs, **versions}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe_path")
@click.option("--framework", type=click.Choice(["torch", "tensorflow"]), default=None)
@click.option("--no-track", is_flag=True)
@click.option("--log-every", type=int, default=None)
@click.option("--experiment", default=None)
@click.option("--baseline", default=None)
@click.option("--parent-run-id", default=None)
@click.option("--resume", "resume", default=None, help="continue job JOB_ID | RUN_ID | last")
@click.option("--force", is_flag=True, help="with --resume: allow changing epochs/steps/eval/np")
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None,
              help="rank 0 writes its summary here as JSON when the job finishes (see hvdkit run --help)")
@click.argument("overrides", nargs=-1)
def main(recipe_path, framework, no_track, log_every, experiment, baseline, parent_run_id, resume, force, summary_json,
         overrides) -> None:
    from hvdkit.recipe import load_recipe

    try:
        loaded = load_recipe(recipe_path, list(overrides), framework=framework)
    except HvdkitError as exc:
        click.echo(f"hvdkit.train: error: {exc.one_line()}", err=True)
        sys.exit(exc.exit_code)
    try:
        rc = train(loaded, no_track=no_track, log_every=log_every, experiment=experiment,
                   baseline=baseline, parent_run_id=parent_run_id, resume=resume, force=force,
                   summary_json=summary_json)
    except HvdkitError as exc:  # e.g. an unknown --baseline, raised on every rank by tracker.start
        click.echo(f"hvdkit.train: error: {exc.one_line()}", err=True)
        sys.exit(exc.exit_code)
    _exit(rc)


def _exit(rc: int) -> None:
    """``sys.exit(rc)`` minus the interpreter's teardown, when this module is the process.

    Freeing every module of torch (or TensorFlow), Horovod and MLflow one object at a time takes
    seconds after the job is done (bench/launch: ~3 s of a 2-rank job's wall time on 2 cores),
    and horovodrun waits for it on every rank. The atexit handlers still run (Horovod's
    shutdown, logging, MLflow), the streams are flushed, then the process ends. Only as
    ``python -m hvdkit.train`` and with no non-daemon thread left: anything else exits normally.
    """
    import threading

    if (__name__ != "__main__"
            or any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate())):
        sys.exit(rc)
    import atexit

    try:
        atexit._run_exitfuncs()  # what a normal exit runs first
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe must not change the exit code
                pass
        os._exit(rc)


def log_job_artifacts(tracker, summary, loaded) -> None:
    """What a finished job leaves on its parent run: Horovod's timeline and autotune log, the
    last checkpoint, the recipe (rank 0; a no-op elsewhere)."""
    for env_key in ("HOROVOD_TIMELINE", "HOROVOD_AUTOTUNE_LOG"):
        if os.environ.get(env_key) and os.path.exists(os.environ[env_key]):
            tracker.log_artifact(os.environ[env_key], "horovod")
    if summary.checkpoint:
        tracker.log_artifact(summary.checkpoint, "checkpoints")
    if loaded.source.exists():
        tracker.log_artifact(str(loaded.source), "recipe")


def log_job_model(tracker, backend, loaded, data, summary) -> None:
    """Rank 0, a FINISHED job: the datasets (with the per-rank shard layout) and, unless
    ``log.model: false``, the trained model with MLflow's flavour on the parent run. Bounded; a
    failure is one warning (hvdkit.tracking._logged_model)."""
    from hvdkit.core.sharding import shard_layout
    from hvdkit.tracking._logged_model import log_model_and_data

    val = data.x_val if hasattr(data, "x_val") else data.val  # arrays, or a pipeline (DataSplits)
    try:
        n_val = len(val) if val is not None else None
    except TypeError:  # a tf.data pipeline of unknown cardinality
        n_val = None
    layout = shard_layout(backend.layout, loaded.recipe, n_val)
    log_model_and_data(tracker, backend, loaded.recipe, data, layout, str(loaded.source), step=summary.steps)


def end_job(tracker, job, status: str, steps: int, previous: dict, before_finish=None) -> None:
    """End the runs with ``status`` and record it in the job's manifest (``job``: rank 0's
    JobFolder, None on the other ranks), then restore the signal handlers ``previous``.

    Ending the runs must not be cut short by a signal (horovodrun's SIGTERM after a peer
    failed, a second Ctrl-C): _Killed raised inside finish() would leave them RUNNING."""
    for sig in previous:
        signal.signal(sig, signal.SIG_IGN)
    try:
        if before_finish is not None:
            before_finish()
        tracker.finish(status)
        if job is not None:
            done = {"steps": steps} if status == "FINISHED" else {}
            job.update(status=status, runs={**job.manifest.get("runs", {}), **tracker.run_ids()}, **done)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_data(layer, recipe, data) -> None:
    """Before any collective: data this job cannot train on is one line and exit 2 on every rank
    (``hvdkit run`` made the same checks before launching; a plain horovodrun line did not)."""
    from hvdkit.core.data import check_data

    check_data(data, recipe, elastic=os.environ.get("HOROVOD_ELASTIC") == "1")
    layer.check_data(data)


def _build_model(py, recipe, data):
    """The Python recipe's model; with parallel.model > 1 and a build_model that takes
    ``parallel``, a factory the backend calls once the process sets exist (the layers need them)."""
    from hvdkit.recipe._python import accepts_parallel

    if recipe.parallel.model > 1 and accepts_parallel(py):
        return lambda parallel: py.build_model(recipe.framework, data.input_shape, data.num_classes, parallel=parallel)
    return py.build_model(recipe.framework, data.input_shape, data.num_classes)


def train(loaded, *, no_track=False, log_every=None, experiment=None, baseline=None, parent_run_id=None,
          resume=None, force=False, summary_json=None) -> int:
    from hvdkit.core import load_builtin, print_summary, run_training
    from hvdkit.tracking import World, open_job_tracker, prestart_writer

    recipe = loaded.recipe
    if not no_track and os.environ.get("HOROVOD_ELASTIC") != "1":  # an elastic job's rank 0 may change
        prestart_writer()  # MLflow's import in the apply process overlaps the framework's, below
    marks = {"module_imported": _T_IMPORT}
    try:
        import psutil

        marks["process_start"] = psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a mark, never worth failing for
        pass
    layer = import_module(f"hvdkit.{recipe.framework}")
    py = loaded.python
    data = (py.build_data(recipe.seed) if py else None) or load_builtin(recipe.data, recipe.seed)
    _check_data(layer, recipe, data)
    if py and hasattr(layer, "before_model_build"):
        layer.before_model_build(recipe)  # e.g. Keras' bf16 policy: it applies to layers built after it
    model = _build_model(py, recipe, data) if py else None
    marks["framework_imported"] = time.time()
    threads = None
    backend = layer.make_backend(recipe, data, model)  # hvd.init() happens here
    marks["backend_ready"] = time.time()
    if os.environ.get("HOROVOD_ELASTIC") == "1":  # horovodrun --min-np/--host-discovery-script: hvdkit.train_elastic
        from hvdkit.train_elastic import train_elastic

        return train_elastic(loaded, backend, data, no_track=no_track, log_every=log_every, experiment=experiment,
                             baseline=baseline, parent_run_id=parent_run_id, resume=resume, force=force)
    world = World.from_horovod_env(backend.rank, backend.size, backend.gather)  # every rank's hostname
    job = _open_job(recipe, backend, resume, force, not no_track, experiment)
    config = _tracking_config(recipe, no_track, log_every, experiment, parent_run_id, job, backend.accelerator)
    config.baseline_run_id = baseline
    tracker = open_job_tracker(config, world, gather=backend.gather, broadcast_object=backend.broadcast_object,
                               gather_async=getattr(backend, "gather_async", None))
    previous = {sig: signal.signal(sig, _stop_handler(backend.rank)) for sig in (signal.SIGTERM, signal.SIGINT)}
    status, summary = "FAILED", None
    try:
        tracker.start(params=_params(recipe), tags={"hvdkit.recipe": recipe.name, "hvdkit.framework": recipe.framework,
                                                    "hvdkit.batch_size": str(recipe.batch_size)})
        tracker.set_model_size(backend.parameters_local())  # this rank's slice when the model is split
        marks["tracker_started"] = time.time()
        if tracker.run_id:  # rank 0 only: the runs exist there
            rank_zero(backend.rank, job.update, parent_run_id=tracker.run_id,
                      runs={**job.manifest.get("runs", {}), **tracker.run_ids()})
        threads_at_start = rank_zero(backend.rank, _thread_cpu_s) if summary_json else None
        progress = rank_zero(backend.rank, lambda: _progress_bar) if recipe.log.progress else None
        if getattr(recipe, "keras_fit", False) and recipe.framework == "tensorflow":
            summary = backend.fit(recipe, tracker, job=job)
        else:
            after_step = rank_zero(backend.rank, _first_step_mark, marks) if summary_json else None
            summary = run_training(backend, recipe, data, tracker, progress=progress, after_step=after_step, job=job)
        marks["train_end"] = time.time()
        from hvdkit.core.loop import replicas_agree

        summary.replicas_equal = replicas_agree(backend)  # a collective
        if not summary.replicas_equal:
            rank_zero(backend.rank, print, "hvdkit: warning: the model replicas differ after training: the ranks did "
                      "not apply the same updates", file=sys.stderr, flush=True)
        from hvdkit.tracking import keys

        tracker.log_metrics({keys.REPLICAS_EQUAL: float(summary.replicas_equal)}, summary.steps)
        threads = {"train_start": threads_at_start, "train_end": _thread_cpu_s()} if threads_at_start else None
        # The last partial interval now (a collective; finish() would gather it anyway): the summary's
        # training-steps figure is then the parent run's samples_per_sec as MLflow holds it.
        tracker.flush_interval()
        steps_rate = tracker.throughput()
        if steps_rate is not None:
            summary.samples_per_sec_steps = steps_rate
        tracker.log_metrics({keys.SAMPLES_PER_SEC_END_TO_END: summary.samples_per_sec}, summary.steps)
        rank_zero(backend.rank, print_summary, summary, recipe, backend.size)
        log_job_artifacts(tracker, summary, loaded)
        marks["log_model_start"] = time.time()
        rank_zero(backend.rank, log_job_model, tracker, backend, loaded, data, summary)
        marks["log_model_end"] = time.time()
        status = "FINISHED"
        return 0
    except _Killed:
        status = "KILLED"
        return 130
    finally:
        end_job(tracker, rank_zero(backend.rank, lambda: job), status, summary.steps if summary else 0, previous)
        if summary_json and status == "FINISHED":
            marks["finished"] = time.time()
            rank_zero(backend.rank, _write_summary_json, summary_json, summary, recipe, backend.size, marks, threads,
                      getattr(backend, "comm_bytes", dict)())  # torch: rank 0's collective bytes


def _progress_bar(total: int, initial: int):
    from hvdkit.launch import _console

    if os.environ.get(_console.PROGRESS_ENV):  # hvdkit's launcher draws the bar from these lines
        return _console.ProgressLines(total, initial)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=0.5)


if __name__ == "__main__":
    main()
