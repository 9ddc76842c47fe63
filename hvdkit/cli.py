"""The ``hvdkit`` command line (click, like MLflow's own CLI)."""

from __future__ import annotations

import sys
import time

import click

from hvdkit.errors import HvdkitError


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
        click.option("-np", "--num-proc", "np_", type=int, default=1, show_default=True, help="number of ranks"),
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


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("recipe")
@_launch_options
@click.option("--no-track", is_flag=True, help="run without MLflow tracking")
@click.option("--log-every", type=int, default=None, help="steps between metric gathers (default: the recipe's log.every_steps)")
@click.option("--experiment", default=None, help="MLflow experiment (default: hvdkit)")
@click.option("--baseline", default=None, help="np=1 run id for scaling efficiency")
@click.argument("overrides", nargs=-1)
def run(recipe, np_, framework, hosts, hostfile, controller, timeline, autotune, autotune_log,
        fusion_threshold_mb, cycle_time_ms, ssh_port, ssh_identity_file, no_track, log_every, experiment, baseline, overrides) -> None:
    """Train RECIPE on NP ranks under horovodrun. OVERRIDES are key=value (e.g. optimizer.lr=0.1)."""
    from hvdkit import launch as L
    from hvdkit.recipe import load_recipe

    loaded = load_recipe(recipe, list(overrides), framework=framework)
    opts = L.LaunchOptions(np=np_, hosts=hosts, hostfile=hostfile, controller=controller, timeline=timeline,
                           autotune=autotune, autotune_log=autotune_log, fusion_threshold_mb=fusion_threshold_mb,
                           cycle_time_ms=cycle_time_ms, ssh_port=ssh_port, ssh_identity_file=ssh_identity_file)
    L.resolve_hosts(opts)
    L.check_framework_built(loaded.recipe.framework)
    train_args = []
    if no_track:
        train_args.append("--no-track")
    if log_every:
        train_args += ["--log-every", str(log_every)]
    if experiment:
        train_args += ["--experiment", experiment]
    if baseline:
        train_args += ["--baseline", baseline]
    cmd = L.horovodrun_command(loaded, opts, train_args, list(overrides))
    t0 = time.perf_counter()
    rc = L.launch(cmd, L.worker_env(opts))
    if rc != 0:
        click.echo(f"hvdkit: horovodrun exited with {rc} after {time.perf_counter() - t0:.1f}s", err=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
