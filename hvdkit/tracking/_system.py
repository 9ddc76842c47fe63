"""One host's system metrics (CPU, memory, network, disk, and NVIDIA GPUs through NVML), sampled
by a daemon thread in one rank per host, off the training thread.

Why not ``mlflow.system_metrics``: its monitor logs from every process that starts it, straight
to the store, one client per host. Here the newest sample rides in the tracker's existing gather
(``keys.SYSTEM_VECTOR`` columns of the rank vector), so rank 0 stays the store's only client and
no collective is added. The keys and their meaning are MLflow's own, so the UI draws them.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading

import numpy as np

from hvdkit.tracking import keys

log = logging.getLogger("hvdkit.tracking")

_NSYS = len(keys.SYSTEM_VECTOR)
_HOST_COLS = sum(1 for k in keys.SYSTEM_VECTOR if not k.startswith(keys.SYSTEM_PREFIX + "gpu_"))
_GPU_COLS = 3  # per GPU, in keys._GPU_SYSTEM order: utilisation %, memory MB, memory %
_MB = 1e6  # MLflow's "megabytes"
GPU_FIX = "pip install nvidia-ml-py"
_warned_no_nvml = False


def gpu_present() -> bool:
    """An NVIDIA GPU is visible to this host (its device node or its driver's tool)."""
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def _import_pynvml():
    import pynvml  # nvidia-ml-py; optional

    return pynvml


class _Nvml:
    """NVML handles of this host's GPUs (at most keys.MAX_GPUS), or None when there is no GPU or
    no pynvml; a GPU without pynvml is warned about once per process."""

    def __init__(self, nvml, handles: list) -> None:
        self.nvml = nvml
        self.handles = handles

    @classmethod
    def open(cls) -> "_Nvml | None":
        global _warned_no_nvml
        try:
            nvml = _import_pynvml()
        except ImportError:
            if gpu_present() and not _warned_no_nvml:
                _warned_no_nvml = True
                log.warning("hvdkit: warning: this host has an NVIDIA GPU but nvidia-ml-py is not installed: GPU "
                            "utilisation and memory are not logged — fix: %s", GPU_FIX)
            return None
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:  # noqa: BLE001 - NVMLError, or no driver: no GPU to sample
            if gpu_present():
                log.warning("hvdkit: warning: NVML did not start (%s): GPU metrics are not logged", exc)
            return None
        if count > keys.MAX_GPUS:
            log.warning("hvdkit: warning: this host has %d GPUs; system metrics cover the first %d", count, keys.MAX_GPUS)
        return cls(nvml, [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(min(count, keys.MAX_GPUS))])

    def fill(self, out: np.ndarray) -> None:
        nvml = self.nvml
        for i, handle in enumerate(self.handles):
            base = i * _GPU_COLS
            try:  # each query on its own: a GPU that reports no utilisation still reports memory
                out[base] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception:  # noqa: BLE001 - NVMLError_NotSupported and friends: left NaN
                pass
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                out[base + 1] = mem.used / _MB
                out[base + 2] = mem.used / mem.total * 100.0 if mem.total else math.nan
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - closing: nothing to report
            pass


class HostSampler:
    """Samples this host every ``interval_s`` seconds on a daemon thread and keeps only the
    newest sample (bounded: one array), for the tracker to pick up at its next gather.

    ``latest()`` returns the newest sample once (None when there is none since the last call),
    so a slow sampler never repeats a point and a fast one never queues.
    """

    def __init__(self, interval_s: float, root: str = os.sep, gpus: bool = True) -> None:
        import psutil

        if not interval_s > 0:
            raise ValueError(f"interval_s={interval_s!r} must be > 0")
        self.interval_s = float(interval_s)
        self._psutil = psutil
        self._root = root
        net = psutil.net_io_counters()
        self._net0 = (net.bytes_recv, net.bytes_sent) if net is not None else (0, 0)
        self._nvml = _Nvml.open() if gpus else None
        self._lock = threading.Lock()
        self._latest: np.ndarray | None = None
        self.samples = 0  # taken so far (tests, diagnostics)
        self._stop = threading.Event()
        self._wake = threading.Event()  # fresh(): sample now rather than at the interval's end
        self._taken = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="hvdkit-system-metrics", daemon=True)
        self._thread.start()

    @property
    def gpus(self) -> int:
        return len(self._nvml.handles) if self._nvml is not None else 0

    def sample(self) -> np.ndarray:
        """One reading, in keys.SYSTEM_VECTOR order (NaN for what this host does not have)."""
        ps = self._psutil
        out = np.full(_NSYS, math.nan)
        out[0] = ps.cpu_percent(interval=None)
        mem = ps.virtual_memory()
        out[1] = mem.used / _MB
        out[2] = mem.used / mem.total * 100.0
        net = ps.net_io_counters()
        if net is not None:
            out[3] = (net.bytes_recv - self._net0[0]) / _MB
            out[4] = (net.bytes_sent - self._net0[1]) / _MB
        disk = ps.disk_usage(self._root)
        out[5] = disk.percent
        out[6] = disk.used / _MB
        out[7] = disk.free / _MB
        if self._nvml is not None:
            self._nvml.fill(out[_HOST_COLS:])
        return out

    def _run(self) -> None:
        # psutil keeps cpu_percent's "since the last call" per thread: primed here, on the thread
        # that samples, so the first sample covers the first interval (not 0.0).
        self._psutil.cpu_percent(interval=None)
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                reading = self.sample()
            except Exception as exc:  # noqa: BLE001 - a sampler must never take the job down
                log.warning("hvdkit: warning: system metrics sampling stopped (%s)", exc)
                return
            with self._taken:
                self._latest = reading
                self.samples += 1
                self._taken.notify_all()

    def fresh(self, timeout: float = 1.0) -> np.ndarray | None:
        """A reading taken now by the sampling thread (the CPU share since its last one), or
        None when it does not come within ``timeout`` seconds."""
        if not self._thread.is_alive():
            return None
        with self._taken:
            before = self.samples
            self._wake.set()
            self._taken.wait_for(lambda: self.samples > before, timeout)
            reading, self._latest = self._latest, None
        return reading

    def latest(self) -> np.ndarray | None:
        """The newest sample not handed out yet, or None."""
        with self._lock:
            reading, self._latest = self._latest, None
        return reading

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for it (a sample in progress takes milliseconds). Idempotent."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None


def sampler_ranks(hostnames: list[str], children: list[int]) -> set[int]:
    """The rank that samples each host: its lowest rank with a child run, i.e. its local rank 0
    unless only every k-th rank has a run; a host without any child run has nowhere to log, so
    it is not sampled."""
    with_run: dict[str, int] = {}
    for r in sorted(children):
        if r < len(hostnames):
            with_run.setdefault(hostnames[r], r)
    return set(with_run.values())


__all__ = ["GPU_FIX", "HostSampler", "gpu_present", "sampler_ranks"]
