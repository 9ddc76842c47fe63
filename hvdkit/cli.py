"""The ``hvdkit`` command line (click, like MLflow's own CLI)."""

from __future__ import annotations

import os
import signal
import sys
import time

import click

from hvdkit.errors import HvdkitError, RecipeError


class _Group(click.Group):
    """Turns hvdkit's own errors into one line on stderr and their exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HvdkitError as exc:
            click.echo(f"hvdkit: error: {exc.one_line()}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hvdkit")
def main() -> None:
    """hvdkit: Horovod on today's PyTorch and TensorFlow, framework-agnostic recipes, MLflow tracking."""


@main.command("build-horovod")
@click.option("--horovod-version", default="0.28.1", show_default=True)
@click.option("--frameworks", default="", help="comma list (torch,tensorflow); default: every framework installed")
@click.option("--controllers", default="gloo,mpi", show_default=True)
@click.option("--gpu", is_flag=True, help="CUDA/NCCL build (for the GPU image; needs nvcc and NCCL)")
@click.option("--force", is_flag=True, help="rebuild even if the wheel is cached")
@click.option("--no-install", is_flag=True, help="build and cache the wheel only")
@click.option("--sdist", type=click.Path(dir_okay=False), default=None, help="use this Horovod sdist instead of PyPI's")
@click.option("-j", "--jobs", type=int, default=0, help="parallel compile jobs (default: one per core)")
def build_horovod_cmd(horovod_version, frameworks, controllers, gpu, force, no_install, sdist, jobs) -> None:
    """Build Horovod from its sdist with hvdkit's patches, cache the wheel, install and check it."""
    from hvdkit.build import BuildPlan, build_horovod

    plan = BuildPlan(
        horovod_version=horovod_version,
        frameworks=[f for f in frameworks.split(",") if f],
        controllers=[c for c in controllers.split(",") if c],
        gpu=gpu, force=force, install=not no_install, sdist=sdist, jobs=jobs,
    )
    res = build_horovod(plan, log=lambda m: click.echo(f"hvdkit: {m}"))
    fws = ", ".join(f"{fw} ({'gloo' if p.get('gloo') else ''}{'+mpi' if p.get('mpi') else ''})" for fw, p in res.probe.items())
    click.echo(f"hvdkit: Horovod {res.key.horovod} ready in {res.seconds:.1f}s "
               f"({'cache hit' if res.cache_hit else 'built'}; {res.wheel.name}){'; checked: ' + fws if fws else ''}")


@main.command()
def doctor() -> None:
    """Versions, Horovod frameworks/controllers/ops, tracking URI, known-bad combinations."""
    from hvdkit.doctor import diagnose, render

    report = diagnose()
    click.echo(render(report))
    sys.exit(0 if report.ok else 1)


def _launch_options(f):
    opts = [
        click.option("-np", "--num-proc", "np_", type=int, default=None, help="number of ranks [default: 1; with --resume, the job's]"),
        click.option("--framework", type=click.Choice(["torch", "tensorflow"]), default=None, help="override the recipe's framework"),
        click.option("-H", "--hosts", default=None, help="host:slots,... (as horovodrun)"),
        click.option("--hostfile", default=None, help="file of `host slots=N` lines"),
        click.option("--gloo", "controller", flag_value="gloo", default=True, help="Gloo controller (default)"),
        click.option("--mpi", "controller", flag_value="mpi", help="MPI controller"),
        click.option("--timeline", default=None, help="write a Horovod timeline here (logged as an artifact)"),
        click.option("--autotune", is_flag=True, help="Horovod autotuning of fusion/cycle knobs"),
        click.option("--autotune-log", default=None, help="autotune log file (logged as an artifact)"),
        click.option("--fusion-threshold-mb", type=float, default=None),
        click.option("--cycle-time-ms", type=float, default=None),
        click.option("-p", "--ssh-port", type=int, default=None, help="ssh port of remote hosts"),
        click.option("-i", "--ssh-identity-file", default=None, help="ssh key for remote hosts"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


# The launch options both `run` and `scale` take (besides -np and --framework): one LaunchOptions
# is built from them, by _launch_options_from, for either command.
_LAUNCH_FIELDS = ("hosts", "hostfile", "controller", "timeline", "autotune", "autotune_log", "fusion_threshold_mb",
                  "cycle_time_ms", "ssh_port", "ssh_identity_file")
_ELASTIC_FIELDS = ("elastic", "min_np", "max_np", "host_discovery_script", "slots_per_host", "elastic_timeout",
                   "reset_limit", "blacklist_cooldown_range", "network_interface")


def _launch_options_from(params: dict, **more):
    """The LaunchOptions of the `_launch_options` values in ``params`` (click's keyword arguments)."""
    from hvdkit.launch import LaunchOptions

    return LaunchOptions(**{k: params[k] for k in _LAUNCH_FIELDS}, **more)


def _elastic_options(f):
    """Horovod elastic (``hvdkit run`` only): hosts may come and go while the job trains."""
    opts = [
        click.option("--elastic", is_flag=True, help="elastic training: hosts from --host-discovery-script, "
                     "--hostfile (re-read every second) or -H; implied by --min-np/--max-np/--host-discovery-script"),
        click.option("--min-np", type=int, default=None, help="elastic: fewest ranks to train with [default: -np]"),
        click.option("--max-np", type=int, default=None, help="elastic: most ranks to train with"),
        click.option("--host-discovery-script", default=None, help="elastic: executable printing `host:slots` lines"),
        click.option("--slots-per-host", type=int, default=None, help="elastic: slots of a host listed without :slots"),
        click.option("--elastic-timeout", type=int, default=None, help="elastic: seconds to wait for --min-np slots [600]"),
        click.option("--reset-limit", type=int, default=None, help="elastic: most membership changes before the job fails"),
        click.option("--blacklist-cooldown-range", type=int, nargs=2, default=None, metavar="LOW HIGH",
                     help="elastic: seconds before a failed host may rejoin, backing off from LOW to HIGH [10 300]"),
        click.option("--network-interface", default=None, help="interface(s) for Horovod's traffic, e.g. eth0 (comma list)"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _check_layout(loaded, np_: int, elastic: dict) -> None:
    """parallel.model against -np, elastic and the model: one line, exit 2, before anything starts."""
    from hvdkit.core._layout import check_recipe_layout
    from hvdkit.recipe._python import model_kind

    check_recipe_layout(loaded.recipe, np_, elastic=any(elastic.values()), **model_kind(loaded.python))
    _check_data(loaded, elastic=any(elastic.values()))
    stop = loaded.recipe.early_stopping.metric
    if stop is not None and any(elastic.values()):
        raise RecipeError(f"early_stopping.metric={stop} in an elastic job: the elastic loop does not stop early yet",
                          fix="run without elastic options, or unset early_stopping.metric")


def _check_data(loaded, elastic: bool) -> None:
    """A shard folder (its index and file headers) and a Python recipe's own data, before launching:
    a bad folder, a corrupt or mismatched shard, the other framework's pipeline are one line, exit 2."""
    from hvdkit.core.data import check_data, load_builtin
    from hvdkit.recipe._python import overrides_build_data

    recipe = loaded.recipe
    if overrides_build_data(loaded.python):
        # Building a pipeline object is cheap (tf.data and Dataset objects read lazily); a recipe
        # returning arrays loads them once more here.
        data = loaded.python.build_data(recipe.seed)
        if data is not None:
            check_data(data, recipe, elastic=elastic)
            return
    if recipe.data.name == "files":
        check_data(load_builtin(recipe.data, recipe.seed), recipe, elastic=elastic)


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("recipe")
@_launch_options
@click.option("--no-track", is_flag=True, help="run without MLflow tracking")
@click.option("--log-every", type=int, default=None, help="steps between metric gathers (default: the recipe's log.every_steps)")
@click.option("--experiment", default=None, help="MLflow experiment (default: hvdkit)")
@click.option("--baseline", default=None, help="np=1 run id for scaling efficiency")
@click.option("--resume", "resume", default=None, metavar="JOB_ID|RUN_ID|last",
              help="continue that job (its checkpoints, the same MLflow runs); a new job starts fresh")
@click.option("--force", is_flag=True, help="with --resume: allow changing epochs, steps, eval or -np")
@click.option("--launcher", type=click.Choice(["auto", "srun", "horovodrun"]), default="auto", show_default=True,
              help="auto: srun inside a Slurm allocation (SLURM_JOB_ID set), else horovodrun")
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None,
              help="when the job finishes, rank 0 writes its summary here as JSON (samples/s, steps, loss, "
                   "val metrics, timing marks from process start to first step): for scripts and benchmarks")
@_elastic_options
@click.argument("overrides", nargs=-1)
def run(recipe, np_, framework, no_track, log_every, experiment, baseline, resume, force, launcher, summary_json,
        overrides, **options) -> None:
    """Train RECIPE on NP ranks under horovodrun, or srun inside a Slurm allocation.
    OVERRIDES are key=value (e.g. optimizer.lr=0.1)."""
    from hvdkit.launch import slurm as S
    from hvdkit import launch as L
    from hvdkit.core.job import JobFolder, new_job_id, resolve_resume, slurm_requeue_spec
    from hvdkit.errors import UsageError
    from hvdkit.recipe import load_recipe

    elastic = {k: options.pop(k) for k in _ELASTIC_FIELDS}
    loaded = load_recipe(recipe, list(overrides), framework=framework)
    launcher = S.choose_launcher(launcher)
    # Inside an allocation the ranks' places come from it: srun's own, or -H for horovodrun when
    # the user gave no hosts (scontrol missing: one line, exit 2, before anything is decided).
    alloc = None
    if S.in_allocation() and (launcher == "srun" or not (options["hosts"] or options["hostfile"] or any(elastic.values()))):
        alloc = S.allocation()
        if launcher == "horovodrun":
            options["hosts"] = ",".join(f"{h}:{n}" for h, n in alloc.hosts)
    default_np = alloc.ntasks if alloc else 1
    if not no_track:
        from hvdkit.tracking._uri import check_tracking_args

        check_tracking_args(experiment)  # an unknown store scheme or a missing sqlite directory: exit 2 now
    if force and not resume:
        raise UsageError("--force without --resume", fix="--force only relaxes the checks of --resume JOB_ID")
    # Which job: a new one, or (checked now, before anything starts) the one --resume names; a
    # Slurm requeue of a batch script continues its job by itself.
    spec = resume or slurm_requeue_spec(loaded.recipe)
    if spec:
        from hvdkit.tracking._resume import job_of_run, replay_earlier_spools

        plan = resolve_resume(spec, loaded.recipe, np=np_, force=force, run_lookup=None if no_track else job_of_run)
        job = plan.folder
        np_ = np_ if np_ is not None else plan.np or default_np
        _check_layout(loaded, np_, elastic)
        if not no_track:
            replay_earlier_spools(job.job_id)  # the runs to reopen must be in the store first
        click.echo(f"hvdkit: resuming job {job.job_id} (resume {int(job.manifest.get('resumes') or 0) + 1})", err=True)
    else:
        np_ = np_ if np_ is not None else default_np
        _check_layout(loaded, np_, elastic)
        if launcher == "srun":
            S.layout(alloc, np_)  # -np larger than the allocation: refused before a job id is taken
        job = JobFolder.for_recipe(loaded.recipe.checkpoint.dir, new_job_id(loaded.recipe.checkpoint.dir))
    opts = _launch_options_from(options, np=np_, track=not no_track)
    L.set_elastic(opts, **elastic)
    if launcher == "srun":
        S.check_srun_options(opts)
        placed = S.layout(alloc, np_)
        L.check_options(opts)
        L.check_framework_built(loaded.recipe.framework)
        S.check_mpi_built()
    else:
        host_slots = L.resolve_hosts(opts)
        L.check_framework_built(loaded.recipe.framework)
        L.check_ssh(host_slots, opts)  # an unreachable host or refused key: one line, exit 2, nothing started
    train_args = []
    if no_track:
        train_args.append("--no-track")
    if log_every:
        train_args += ["--log-every", str(log_every)]
    if experiment:
        train_args += ["--experiment", experiment]
    if baseline:
        train_args += ["--baseline", baseline]
    if spec:
        train_args += ["--resume", job.job_id, *(["--force"] if force else [])]
    if summary_json:
        train_args += ["--summary-json", os.path.abspath(summary_json)]  # the ranks may start elsewhere
    from hvdkit.launch.job import check_baseline, launch_job

    if baseline and not no_track:
        check_baseline(baseline, loaded.recipe.name)  # a typo costs one line and exit 2, not a job start
    if launcher == "srun":
        cmd = S.srun_command(loaded, alloc, placed, train_args, list(overrides))
        env = S.srun_env(opts, placed)
    else:
        cmd = L.horovodrun_command(loaded, opts, train_args, list(overrides))
        env = L.worker_env(opts)
    t0 = time.perf_counter()
    # launch_job, not L.launch: it also settles the runs' status by job id when the job did not
    # succeed (rank 0 cannot tell a peer's failure from an interrupt: both reach it as SIGTERM).
    out = launch_job(cmd, env, track=not no_track, experiment=experiment, job=job)
    if out.status == "KILLED":
        click.echo(f"hvdkit: job interrupted ({signal.Signals(out.signal).name}) after {time.perf_counter() - t0:.1f}s", err=True)
        sys.exit(130)
    if out.rc != 0:
        click.echo(f"hvdkit: {launcher} exited with {out.rc} after {time.perf_counter() - t0:.1f}s", err=True)
    sys.exit(out.rc)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("recipe")
@click.option("-N", "--nodes", type=int, required=True, help="nodes to allocate")
@click.option("--ntasks-per-node", type=int, required=True, help="ranks per node")
@click.option("--partition", default=None)
@click.option("--time", "time_limit", default=None, help="time limit, e.g. 1:00:00")
@click.option("--job-name", default=None, help="[default: hvdkit-<recipe name>]")
@click.option("--output", default=None, help="Slurm's output file (%j: the job id) [default: slurm-%j.out here]")
@click.option("--requeue", is_flag=True, help="let Slurm requeue the job; it continues the same runs from its last checkpoint")
@click.option("--script", "script_path", default=None, help="where to write the script [default: ./hvdkit-<recipe stem>.sbatch]")
@click.option("--submit", is_flag=True, help="submit it with sbatch and print the job id")
@click.option("--framework", type=click.Choice(["torch", "tensorflow"]), default=None, help="override the recipe's framework")
@click.option("--experiment", default=None, help="MLflow experiment (default: hvdkit)")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def sbatch(recipe, nodes, ntasks_per_node, partition, time_limit, job_name, output, requeue, script_path, submit,
           framework, experiment, extra) -> None:
    """Write (and with --submit, submit) a Slurm batch script that runs RECIPE with hvdkit run.
    EXTRA: other sbatch options (--mem=4G, --account=A...), written as #SBATCH lines, and key=value
    recipe overrides."""
    from pathlib import Path

    from hvdkit.launch import slurm as S
    from hvdkit.recipe import load_recipe

    options, overrides = S.split_extra(extra)
    loaded = load_recipe(recipe, overrides, framework=framework)  # a recipe error: one line, exit 2, nothing written
    script = S.batch_script(recipe, loaded, nodes=nodes, ntasks_per_node=ntasks_per_node, partition=partition,
                            time_limit=time_limit, job_name=job_name, output=output, requeue=requeue,
                            sbatch_options=options, framework=framework, experiment=experiment, overrides=overrides)
    path = Path(script_path or f"hvdkit-{Path(recipe.split(':')[0]).stem}.sbatch").resolve()
    S.write_script(path, script.text)
    # Submit before saying anything else: a refusal by sbatch is then the one line on stderr.
    job_id = S.submit(str(path)) if submit else None
    click.echo(script.text, nl=False)
    for note in script.notes:
        click.echo(f"hvdkit: {note}", err=True)
    click.echo(f"hvdkit: wrote {path}", err=True)
    if job_id is not None:
        click.echo(f"Submitted batch job {job_id}")


@main.command()
@click.argument("spool_dir", type=click.Path(file_okay=False))
@click.option("--tracking-uri", default=None, help="store to replay into (default: the one the job was writing to)")
def sync(spool_dir, tracking_uri) -> None:
    """Replay a job's spool (left when the MLflow store was unreachable) into the store."""
    from hvdkit.tracking import sync_spool

    from hvdkit.tracking._credentials import mask_uri

    rep = sync_spool(spool_dir, tracking_uri)
    click.echo(f"hvdkit: {rep.applied} events applied, {rep.skipped} skipped (already applied)"
               f"{f', {rep.dropped} rejected by the store' if rep.dropped else ''} -> {mask_uri(rep.tracking_uri)}")
    parent = rep.runs.get("parent")
    if parent:
        click.echo(f"hvdkit: parent run {parent}, {sum(1 for r in rep.runs if r.startswith('rank'))} rank run(s)")


@main.command()
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
@click.option("--experiment", default="hvdkit", show_default=True, help="experiment whose runs page is opened")
@click.option("--no-browser", is_flag=True, help="print the URL only")
def ui(port, tracking_uri, experiment, no_browser) -> None:
    """Start the MLflow UI on hvdkit's store (127.0.0.1) and print the experiment's runs page."""
    from hvdkit.ui import serve

    sys.exit(serve(port=port, tracking_uri=tracking_uri, experiment=experiment, open_browser=not no_browser,
                   echo=lambda m: click.echo(m)))


def _sweep_options(f):
    # hvdkit run's launch options, except the rank count, which is a list here (--np 1,2,4).
    f = _launch_options(f)
    f.__click_params__ = [p for p in f.__click_params__ if p.name != "np_"]
    return f


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("recipe")
@click.option("--np", "-np", "np_list", required=True, help="rank counts to run, e.g. 1,2,4")
@_sweep_options
@click.option("--log-every", type=int, default=None, help="steps between metric gathers (default: the recipe's)")
@click.option("--experiment", default=None, help="MLflow experiment (default: hvdkit)")
@click.option("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
@click.option("--baseline", default=None, help="np=1 run id to divide by when 1 is not in --np")
@click.argument("overrides", nargs=-1)
def scale(recipe, np_list, framework, log_every, experiment, tracking_uri, baseline, overrides, **options) -> None:
    """Scaling sweep: train RECIPE at each rank count, log scaling efficiency on a sweep run."""
    from hvdkit.recipe import load_recipe
    from hvdkit.scale import parse_np_list, print_table, run_sweep

    nps = parse_np_list(np_list)
    loaded = load_recipe(recipe, list(overrides), framework=framework)
    opts = _launch_options_from(options)
    res = run_sweep(loaded, opts, nps, list(overrides), log_every=log_every, experiment=experiment,
                    tracking_uri=tracking_uri, baseline=baseline, echo=lambda m: click.echo(m))
    print_table(res.rows, f"hvdkit scale · {loaded.recipe.name} · {loaded.recipe.framework} · sweep {res.sweep_run_id}")
    if res.status != "FINISHED":
        click.echo(f"hvdkit: sweep {res.status}: {res.message}", err=True)
        sys.exit(130 if res.status == "KILLED" else 1)


@main.command()
@click.argument("sweep_run_id")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="also keep the report's files here (report.html, PNGs, CSVs)")
@click.option("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
def report(sweep_run_id, out_dir, tracking_uri) -> None:
    """Rebuild a sweep's scalability report from its stored runs and attach it to the sweep run (report/)."""
    from mlflow import MlflowClient

    from hvdkit.report import build
    from hvdkit.tracking._uri import absolute_uri, resolve_tracking_uri

    client = MlflowClient(tracking_uri=absolute_uri(resolve_tracking_uri(tracking_uri)))
    rep = build(client, sweep_run_id, out_dir, echo=lambda m: click.echo(m))
    click.echo(f"hvdkit: report of sweep {sweep_run_id}: {len(rep.jobs)} job(s), N = "
               f"{', '.join(str(j.np) for j in rep.jobs)}; logged under report/ on the sweep run")


@main.command()
@click.argument("run_id")
@click.option("--network", "networks", default="10gbit,25gbit,100gbit,local", show_default=True,
              help="comma list of 1gbit, 10gbit, 25gbit, 40gbit, 100gbit, 200gbit, 400gbit, local (the probe's bandwidth)")
@click.option("--np", "-np", "np_list", default="1,2,4,8,16,32,64,128,256,512", show_default=True,
              help="rank counts to predict")
@click.option("--ranks-per-host", type=int, default=1, show_default=True,
              help="ranks on each host of a named network (they share its cores)")
@click.option("--cores", type=int, default=None, help="cores per host [default: this host's]")
@click.option("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
def plan(run_id, networks, np_list, ranks_per_host, cores, tracking_uri) -> None:
    """Predict step time and E(N) of a tracked job at other sizes and networks (ring-allreduce model,
    fed by the job's own metrics and an allreduce probe of its controller); logged under plan/."""
    from mlflow import MlflowClient

    from hvdkit import plan as P
    from hvdkit.scale import parse_np_list
    from hvdkit.tracking._uri import absolute_uri, resolve_tracking_uri

    nets = P.parse_networks(networks)
    nps = parse_np_list(np_list)
    if cores is not None and cores < 1:
        from hvdkit.errors import UsageError

        raise UsageError(f"--cores {cores} < 1", fix="pass 1 or more")
    client = MlflowClient(tracking_uri=absolute_uri(resolve_tracking_uri(tracking_uri)))
    profile, _probe, preds, notes = P.make_plan(client, run_id, nets, nps, cores=cores, ranks_per_host=ranks_per_host,
                                                echo=lambda m: click.echo(m))
    P.print_table(preds, f"hvdkit plan · run {profile.run_id}", notes)
    click.echo(f"hvdkit: plan logged under plan/ on run {profile.run_id}")


_BENCHES = ("all", "tracking", "scaling", "ddp", "writer", "launch", "parallelism", "outage", "system_metrics")


@main.command("bench")
@click.argument("name", type=click.Choice(_BENCHES))
@click.option("--quick", is_flag=True, help="smoke test: tiny sizes, one round (behaviour, not timings)")
@click.option("--reps", type=int, default=None, help="rounds per ratio (default: each bench's own)")
@click.option("--full", is_flag=True, help="also the long variants (writer: MLflow server with all 512 child runs)")
def bench_cmd(name, quick, reps, full) -> None:
    """Run a benchmark of the source checkout's bench/ (tracking overhead, scaling, Horovod vs
    DDP, tracking writer throughput, launch overhead, a tracking-server outage; ``all`` is every
    one but the outage): JSON lines on stdout, then a table.
    Same as ``python -m bench NAME``; docs/benchmarks.md has the latest numbers."""
    import subprocess
    from pathlib import Path

    from hvdkit.errors import UsageError

    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "__main__.py").is_file():
        raise UsageError(f"no bench/ next to {root / 'hvdkit'} (an installed hvdkit ships without it)",
                         fix="run hvdkit bench from a source checkout (pip install -e .)")
    if reps is not None and reps < 1:
        raise UsageError(f"--reps {reps} must be at least 1", fix="pass --reps 1 or more")
    cmd = [sys.executable, "-m", "bench", name, *(["--quick"] if quick else []), *(["--reps", str(reps)] if reps else []),
           *(["--full"] if full else [])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p))
    sys.exit(subprocess.call(cmd, cwd=root, env=env))


# `hvdkit data shard|info`: shard folders. _data_cmd imports only click at import time, like this module.
from hvdkit._data_cmd import data as _data_group  # noqa: E402

main.add_command(_data_group)


if __name__ == "__main__":
    main()
