"""``hvdkit.autolog()``: hvdkit's tracking for an existing, unmodified Horovod script.

One line after ``hvd.init()``::

    import horovod.torch as hvd          # or horovod.tensorflow
    hvd.init()
    hvdkit.autolog(batch_size=32)

gives the job the same MLflow layout as ``hvdkit run``: a parent run and one child run per rank
with ``step_time_s``, ``data_time_s`` (PyTorch), ``comm_wait_s``, ``rss_mb`` and, when the batch
size is given, ``samples_per_sec`` (per rank on the children, summed on the parent). The loss is
not seen by Horovod's optimizer, so it is not logged (nothing is logged as a made-up zero).

How a step is recognised (the framework code lives in the framework layers, ``hvdkit.torch._autolog``
and ``hvdkit.tensorflow._autolog``: plugins of the ``hvdkit.autolog`` entry-point group, see
:func:`adapter_plugins`; the one whose Horovod module the script imported and initialised is used):

* PyTorch: ``hvd.DistributedOptimizer`` is patched so the optimizer it returns reports every
  ``step()`` (one training step), the time inside ``synchronize()`` (comm wait), and the first
  ``zero_grad()`` after a step (the batch is in hand: the time before it is data time);
* TensorFlow / Keras 3: ``hvd.grouped_allreduce`` calls made eagerly are steps and their duration
  the comm wait (``hvd.allreduce`` calls count instead while the script has made no grouped one).

Every rank must call ``autolog()`` (it starts the runs with a broadcast) and every rank makes the
same number of steps (the metrics are gathered every ``log_every`` steps with an allgather), which
Horovod's own gradient averaging already requires. The runs end when the script exits: FINISHED,
FAILED if it raised, KILLED on Ctrl-C or SIGTERM. Under a plain ``horovodrun``, a rank stopped by
horovodrun because *another* rank failed may record KILLED; ``hvdkit run`` settles that, a plain
script has no launcher that knows.
"""

from __future__ import annotations

import atexit
import logging
import signal
import sys
import threading
import time
from importlib.metadata import EntryPoint, distribution, entry_points
from pathlib import Path
from typing import Any, Protocol

from hvdkit._ids import experiment_name
from hvdkit._rank import rank_zero
from hvdkit.errors import FrameworkMissingError, HvdkitError, UsageError
from hvdkit.tracking import keys
from hvdkit.tracking._rank import stagger_peer_exit

log = logging.getLogger("hvdkit.tracking")

# Framework adapters are plugins (like MLflow's ``mlflow.run_context_provider``): the tracking
# layer imports no framework, it loads what this entry-point group names (pyproject.toml).
ENTRY_POINT_GROUP = "hvdkit.autolog"
# hvdkit's own plugins, for an install that predates them (an editable install made before the
# group was declared): used with a one-line warning that says to reinstall.
_OWN_PLUGINS = {
    "torch": "hvdkit.torch._autolog:adapter",
    "tensorflow": "hvdkit.tensorflow._autolog:adapter",
}
_REINSTALL = "reinstall hvdkit (pip install -e . in a checkout, else pip install --force-reinstall hvdkit)"


class Adapter(Protocol):
    """What a framework layer's autolog adapter gives the session (built with the Horovod module)."""

    framework: str
    rank: int
    size: int
    unmeasured: frozenset[str]  # per-rank keys it cannot measure (logged nowhere)
    accelerator: str | None  # the GPU's name, None on the CPU

    def gather(self, vector: Any) -> Any: ...
    def broadcast_object(self, obj: Any) -> Any: ...
    def versions(self) -> dict[str, str]: ...
    def install(self, session: "AutologSession") -> None: ...
    def uninstall(self) -> None: ...


class AdapterPlugin(Protocol):
    """What an ``hvdkit.autolog`` entry point names: a factory of :class:`Adapter` (a class, say)."""

    framework: str
    horovod_module: str  # the Horovod module a script it serves imports, e.g. "horovod.torch"
    priority: int  # lower first, when a script imported (and initialised) several

    def __call__(self, hvd: Any) -> Adapter: ...


_active: "AutologSession | None" = None
_lock = threading.Lock()


class AutologSession:
    """One process's autolog: the tracker, the step clock the adapter drives, the exit hooks."""

    def __init__(self, tracker: Any, adapter: "Adapter", batch_size: int | None) -> None:
        self.tracker = tracker
        self.adapter = adapter
        self.batch_size = batch_size
        self.step = 0
        self.status: str | None = None  # set by the exit hooks: FAILED / KILLED
        self._comm = 0.0
        self._data_mark: float | None = None
        self._last_end = time.perf_counter()
        self._finished = False
        self._prev_excepthook = None
        self._prev_sigterm = None
        self._exiting = False  # the script is over (an exception escaped, or atexit): a stop signal is ignored

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    @property
    def job_id(self) -> str | None:
        return self.tracker.job_id

    # -- driven by the adapter, on the training thread --------------------------------------
    def add_comm(self, seconds: float) -> None:
        self._comm += seconds

    def optimizer_ready(self) -> None:
        """The first step starts no earlier than its optimizer exists (model building and the
        like are not training time)."""
        if self.step == 0:
            self._last_end = time.perf_counter()

    def batch_ready(self) -> None:
        """The script holds its next batch (torch: the first ``zero_grad()`` after a step)."""
        if self._data_mark is None:
            self._data_mark = time.perf_counter()

    def end_step(self) -> None:
        if self._finished:
            return
        now = time.perf_counter()
        mark = self._data_mark if self._data_mark is not None else self._last_end
        self.step += 1
        self.tracker.record_step(
            self.step,
            samples=self.batch_size or 0,
            step_time_s=now - mark,
            data_time_s=mark - self._last_end,
            comm_wait_s=self._comm,
            loss=0.0,  # skipped (see skip_keys): Horovod never sees the loss
        )
        self._comm = 0.0
        self._data_mark = None
        # After record_step: a gather's time is tracking's, not the next step's.
        self._last_end = time.perf_counter()

    # -- end of the script ------------------------------------------------------------------
    def finish(self, status: str | None = None) -> None:
        """End the runs (FINISHED unless an exit hook saw an exception or a signal). Idempotent."""
        if self._finished:
            return
        self._finished = True
        status = status or self.status or "FINISHED"
        # A signal now (horovodrun's SIGTERM right after a peer failed, a second Ctrl-C) would cut
        # the flush short and leave the runs RUNNING: ignore it while the runs are ended.
        ignored = {}
        if threading.current_thread() is threading.main_thread():
            ignored = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.adapter.uninstall()
            self.tracker.finish(status)
        finally:
            for s, handler in ignored.items():
                if handler == self._on_sigterm:  # ours: give back what was there before autolog()
                    handler = self._prev_sigterm
                signal.signal(s, handler)

    def _excepthook(self, exc_type, exc, tb) -> None:
        self._exiting = True
        self.status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        (self._prev_excepthook or sys.__excepthook__)(exc_type, exc, tb)

    def _on_sigterm(self, signum, _frame) -> None:
        if self._exiting:
            # The script is already ending with its status (horovodrun SIGTERMs the ranks left
            # after one failed): raising now would only cut the exit hook short, runs RUNNING.
            return
        # Python's default for SIGTERM is to die without running atexit: exit instead, so the
        # runs end KILLED rather than stay RUNNING.
        self.status = "KILLED"
        stagger_peer_exit(self.adapter.rank)
        raise SystemExit(128 + signum)

    def _atexit(self) -> None:
        self._exiting = True
        try:
            self.finish()
        except HvdkitError as exc:
            print(f"hvdkit.autolog: {exc.one_line()}", file=sys.stderr, flush=True)
        except BaseException as exc:  # noqa: BLE001 - a peer gone at exit: say so, exit anyway
            print(f"hvdkit.autolog: could not end the runs cleanly ({type(exc).__name__}: {exc})",
                  file=sys.stderr, flush=True)

    def install_exit_hooks(self) -> None:
        self._prev_excepthook = sys.excepthook
        sys.excepthook = self._excepthook
        # Only over the default action: a script with its own SIGTERM handler keeps it.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._prev_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        # Registered after hvd.init()'s own atexit(shutdown), so it runs before Horovod shuts down
        # (atexit is LIFO) and the final gather still has its collectives.
        atexit.register(self._atexit)


def _metadata_path() -> str:
    """Where hvdkit's installed metadata was found (the first on sys.path wins, e.g. a stale
    ``hvdkit.egg-info`` in a checkout on ``PYTHONPATH``)."""
    try:
        dist = distribution("hvdkit")
        return str(getattr(dist, "_path", None) or dist.locate_file(""))
    except Exception:  # noqa: BLE001 - not installed at all
        return "no installed hvdkit"


def adapter_plugins(group: str = ENTRY_POINT_GROUP) -> list[AdapterPlugin]:
    """The adapter plugins of ``group``, lowest ``priority`` first. Loading a plugin imports no
    framework. A plugin that fails to load, or is no adapter factory, is skipped with a warning;
    hvdkit's own, when not registered (a stale install), are used with a warning to reinstall."""
    found = list(entry_points(group=group))
    missing = sorted(set(_OWN_PLUGINS) - {ep.name for ep in found})
    if missing:
        log.warning("hvdkit.autolog: entry point(s) %s of group %r not registered in %s (stale metadata); "
                    "using hvdkit's own: %s", ", ".join(missing), group, _metadata_path(), _REINSTALL)
        found += [EntryPoint(name, _OWN_PLUGINS[name], group) for name in missing]
    plugins: list[AdapterPlugin] = []
    for ep in found:
        try:
            plugin = ep.load()
            if not callable(plugin) or not isinstance(getattr(plugin, "horovod_module", None), str):
                raise TypeError("not an adapter factory (callable with a horovod_module name)")
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the script
            log.warning("hvdkit.autolog: skipping the %r adapter plugin (%s): %s: %s",
                        ep.name, ep.value, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            continue
        plugins.append(plugin)
    return sorted(plugins, key=lambda p: getattr(p, "priority", 100))


def _pick_adapter(framework: str | None = None) -> Adapter:
    plugins = [p for p in adapter_plugins() if p.horovod_module in sys.modules
               and (framework is None or getattr(p, "framework", None) == framework)]
    if not plugins:
        raise FrameworkMissingError(
            "hvdkit.autolog() found no Horovod framework module imported (horovod.torch or horovod.tensorflow)",
            fix="import horovod.torch (or horovod.tensorflow) as hvd and call hvd.init() before hvdkit.autolog()",
        )
    initialized = [p for p in plugins if sys.modules[p.horovod_module].is_initialized()]
    if not initialized:
        raise UsageError(
            f"hvdkit.autolog() was called before {plugins[0].horovod_module}.init()",
            fix="call hvdkit.autolog() right after hvd.init()",
        )
    for plugin in initialized[:-1]:
        try:
            return plugin(sys.modules[plugin.horovod_module])
        except Exception as exc:  # noqa: BLE001 - a broken plugin: the next one for this script
            log.warning("hvdkit.autolog: skipping the adapter %r for %s: %s: %s", getattr(plugin, "__name__", plugin),
                        plugin.horovod_module, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    last = initialized[-1]  # the last candidate's error is the script's
    return last(sys.modules[last.horovod_module])


def _script_name() -> str:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv and sys.argv[0] else "")
    return Path(path).stem or "python"


def autolog(
    batch_size: int | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    log_every: int = 10,
) -> AutologSession:
    """Track this Horovod job in MLflow: call once, on every rank, right after ``hvd.init()``.

    ``batch_size``: samples per optimizer step on each rank (for ``samples_per_sec``; without it
    throughput and scaling efficiency are not logged). ``tracking_uri``: default
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``. ``experiment``: default
    ``$MLFLOW_EXPERIMENT_NAME``, else ``hvdkit`` (as for ``hvdkit run``: :func:`hvdkit._ids.experiment_name`).
    ``log_every``: steps between gathers.
    Returns the session (``run_id``, ``job_id``, ``finish()``); a second call returns the same one.
    """
    global _active
    with _lock:
        if _active is not None:
            log.warning("hvdkit.autolog() called again; the first call's runs are kept")
            return _active
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
            raise UsageError(f"hvdkit.autolog(batch_size={batch_size!r}) must be a positive int", fix="e.g. batch_size=32")
        from hvdkit.tracking import TrackingConfig, World, open_job_tracker

        adapter = _pick_adapter()
        skip = {keys.LOSS} | adapter.unmeasured
        if batch_size is None:
            skip.add(keys.SAMPLES_PER_SEC)
        script = _script_name()
        experiment = experiment_name(experiment)
        config = TrackingConfig(
            tracking_uri=tracking_uri,
            experiment=experiment,
            log_every=log_every,
            run_name=f"{script}-np{adapter.size}",
            skip_keys=frozenset(skip),
            # Efficiency needs the same script at np=1; the lookup costs a store round trip at exit.
            log_efficiency=batch_size is not None,
            # The GPU's name (None on the CPU): part of the host-type tag the tracker sets, so the
            # efficiency baseline is an np=1 run on the same kind of device.
            accelerator=getattr(adapter, "accelerator", None),
        )
        world = World.from_horovod_env(adapter.rank, adapter.size, adapter.gather)  # a collective
        tracker = open_job_tracker(config, world, gather=adapter.gather, broadcast_object=adapter.broadcast_object)
        tags = {keys.TAG_RECIPE: script, keys.TAG_FRAMEWORK: adapter.framework}
        if batch_size is not None:
            tags[keys.TAG_BATCH_SIZE] = str(batch_size)
        params: dict[str, Any] = {"script": script, "argv": " ".join(sys.argv[1:]) or "-", "log_every": log_every,
                                  "autolog": True}
        if batch_size is not None:
            params["batch_size"] = batch_size
        params.update({f"version.{k}": v for k, v in adapter.versions().items()})
        tracker.start(params=params, tags=tags)  # a collective: every rank is here
        session = AutologSession(tracker, adapter, batch_size)
        adapter.install(session)
        session.install_exit_hooks()
        _active = session
        if tracker.run_id:
            rank_zero(adapter.rank, print, f"hvdkit.autolog: run {tracker.run_id} (experiment {experiment!r}, "
                      f"job {tracker.job_id})", file=sys.stderr, flush=True)
        return session


def active() -> AutologSession | None:
    """The session of this process, if autolog() was called."""
    return _active


__all__ = ["ENTRY_POINT_GROUP", "Adapter", "AdapterPlugin", "AutologSession", "active", "adapter_plugins", "autolog"]
