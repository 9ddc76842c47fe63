"""Issue 13 end to end: `hvdkit run ... parallel.model=M` trains the built-in MLP split over M ranks
(tensor parallelism) x np/M model copies (data parallelism), under real horovodrun (Gloo).

Checkpoints of a split job hold the unsplit model and optimizer: they load into the plain MLP and a
split job resumes from them; bad layouts are refused before any worker starts.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time

import psutil
import pytest

from conftest import BIN, REPO, explain, hvdkit, sqlite_store, worker_env

pytestmark = [pytest.mark.horovod]

DIGITS = str(REPO / "recipes/digits.yaml")
FAST = ["--framework", "torch", "log.progress=false", "threads=1"]


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri):
    client = _client(uri)
    exp = client.get_experiment_by_name("hvdkit")
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


def _checkpoints(ck):
    return sorted(ck.glob("*/ckpt-e*.pt"))


def _plain_accuracy(path) -> float:
    """The split job's checkpoint in hvdkit's plain (unsplit) torch MLP, evaluated in this process."""
    import numpy as np
    import torch

    from hvdkit.core.data import digits
    from hvdkit.torch._models import mlp

    state = torch.load(path, map_location="cpu", weights_only=False)
    data = digits(0.2, 42)
    model = mlp((1, 8, 8), data.num_classes, [256, 128])
    model.load_state_dict(state["model"])  # strict: the keys and shapes of the plain model
    x = torch.from_numpy(np.ascontiguousarray(data.x_val.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    # the optimizer state is the plain model's too: one entry per parameter, shaped like it
    opt = state["optimizer"]["state"]
    params = list(model.parameters())
    assert sorted(opt) == list(range(len(params)))
    for i, p in enumerate(params):
        assert tuple(opt[i]["momentum_buffer"].shape) == tuple(p.shape)
    return float((pred == data.y_val).mean())


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """The 2x2 hybrid: np=4, parallel.model=2, tracked in a sqlite store."""
    tmp = tmp_path_factory.mktemp("hybrid")
    uri = sqlite_store(tmp)
    t0 = time.monotonic()
    res = hvdkit(["run", DIGITS, "-np", "4", *FAST, "parallel.model=2", "epochs=8", f"checkpoint.dir={tmp / 'ck'}",
                  "--summary-json", str(tmp / "summary.json")], cwd=tmp, env=worker_env(MLFLOW_TRACKING_URI=uri))
    return {"res": res, "tmp": tmp, "uri": uri, "seconds": time.monotonic() - t0}


def test_hybrid_2x2_reaches_95_percent(hybrid):
    res = hybrid["res"]
    assert res.returncode == 0, explain(res)
    summary = json.loads((hybrid["tmp"] / "summary.json").read_text())
    print(f"2x2 hybrid: val_accuracy {summary['val_metrics']['val_accuracy']:.4f}, {summary['steps']} steps, "
          f"train {summary['seconds']:.1f}s, job {hybrid['seconds']:.1f}s")
    assert summary["size"] == 4
    # 1437 samples over 2 model copies of batch 32: 22 steps an epoch (the members of a copy share batches)
    assert summary["steps"] == 8 * 22
    assert summary["val_metrics"]["val_accuracy"] >= 0.95
    runs = _runs(hybrid["uri"])
    assert runs and {r.info.status for r in runs} == {"FINISHED"}
    parent = [r for r in runs if r.data.tags.get("hvdkit.role") == "parent"]
    assert parent and parent[0].data.metrics["val_accuracy"] >= 0.95
    assert parent[0].data.params["parallel.model"] == "2" and parent[0].data.params["parallel.data"] == "2"
    children = sorted((r for r in runs if r.data.tags.get("hvdkit.role") == "rank"), key=lambda r: int(r.data.tags["hvdkit.rank"]))
    assert [(c.data.tags["hvdkit.model_rank"], c.data.tags["hvdkit.data_rank"]) for c in children] == [
        ("0", "0"), ("1", "0"), ("0", "1"), ("1", "1")]  # consecutive ranks share a model copy
    assert all(c.data.metrics["layer_comm_s"] > 0 for c in children), [c.data.metrics for c in children]
    # the job's samples/s counts each sample once: the 2 ranks of a copy both process it
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=hybrid["uri"])
    hist = lambda run: {m.step: m.value for m in client.get_metric_history(run.info.run_id, "samples_per_sec")}  # noqa: E731
    job, ranks = hist(parent[0]), [hist(c) for c in children]
    assert job and all(math.isclose(v, sum(r[s] for r in ranks) / 2, rel_tol=1e-12) for s, v in job.items()), (job, ranks)
    # the built-in MLP [256, 128] split in 2: 64*128+128 (column) + 128*128+128 (row, bias whole) + 128*10+10
    assert {c.data.metrics["parameters"] for c in children} == {64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10}
    # sparse: its last point is within 1 MiB of the true peak, which is at least the last RSS, give
    # or take the kernel's per-thread RSS counters (/proc and getrusage fold them in at different
    # times: seen 0.05 MiB over, in a full run)
    assert all(c.data.metrics["peak_rss_mb"] >= c.data.metrics["rss_mb"] - 1.5 > 0 for c in children), [c.data.metrics for c in children]
    # counted: each rank averages its 4-byte parameters with the other copy's same slice every step
    assert summary["comm_bytes"]["gradient_per_step"] == 4 * (64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10)
    assert summary["comm_bytes"]["layer_total"] > 0


def test_hybrid_checkpoint_loads_into_the_plain_mlp(hybrid):
    assert hybrid["res"].returncode == 0, explain(hybrid["res"])
    (last, *_) = _checkpoints(hybrid["tmp"] / "ck")[::-1]
    state_meta = json.loads((last.parent / "job.json").read_text())
    assert last.name in state_meta["checkpoints"]  # the manifest knows the gathered file
    acc = _plain_accuracy(last)
    summary = json.loads((hybrid["tmp"] / "summary.json").read_text())
    # the same model, evaluated whole: the same accuracy the split job measured
    assert abs(acc - summary["val_metrics"]["val_accuracy"]) < 1e-9, acc


def test_np2_model2_runs(tmp_path):
    res = hvdkit(["run", DIGITS, "-np", "2", *FAST, "--no-track", "parallel.model=2", "epochs=2",
                  f"checkpoint.dir={tmp_path / 'ck'}", "--summary-json", str(tmp_path / "s.json")], cwd=tmp_path)
    assert res.returncode == 0, explain(res)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["steps"] == 2 * 44  # one model copy: every batch of 32, on both ranks
    # the only copy: no gradient averaging at all, only the layers' collectives
    assert summary["comm_bytes"]["gradient_per_step"] == 0 and summary["comm_bytes"]["layer_total"] > 0
    assert summary["val_metrics"]["val_accuracy"] > 0.8
    _plain_accuracy(_checkpoints(tmp_path / "ck")[-1])


def _rank_process(root_pid: int, rank: int):
    try:
        procs = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for p in procs:
        try:
            if "hvdkit.train" in p.cmdline() and p.environ().get("HOROVOD_RANK") == str(rank):
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return None


def test_split_job_resumes_from_its_gathered_checkpoint(tmp_path):
    """np=2 model=2 killed after its second checkpoint; --resume continues split from it."""
    uri = sqlite_store(tmp_path)
    ck = tmp_path / "ck"
    job = [DIGITS, "-np", "2", *FAST, "parallel.model=2", "epochs=4", "checkpoint.every_epochs=1", f"checkpoint.dir={ck}"]
    env = worker_env(MLFLOW_TRACKING_URI=uri)
    proc = subprocess.Popen([str(BIN / "hvdkit"), "run", *job], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(ck.glob("*/ckpt-e0002.pt")):
            assert proc.poll() is None, explain(subprocess.CompletedProcess(proc.args, proc.returncode, *proc.communicate()))
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        victim = _rank_process(proc.pid, 1)
        assert victim is not None, "rank 1 not found"
        victim.send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    (folder,) = ck.iterdir()
    done = json.loads((folder / "job.json").read_text())["checkpoints"]
    resumed_step = max(v["step"] for v in done.values())
    assert resumed_step >= 2 * 44
    res = hvdkit(["run", *job, "--resume", folder.name, "--summary-json", str(tmp_path / "s.json")], cwd=tmp_path, env=env)
    assert res.returncode == 0, explain(res)
    assert "resumed from" in res.stdout
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["steps"] == 4 * 44 > resumed_step  # it trained after the resume, up to the end
    assert summary["val_metrics"]["val_accuracy"] >= 0.9
    assert _plain_accuracy(folder / "ckpt-e0004.pt") >= 0.9
    assert {r.info.status for r in _runs(uri)} == {"FINISHED"}


@pytest.mark.parametrize("args, expected", [
    (["-np", "3", "parallel.model=2"], "parallel.model=2 does not divide np=3"),
    (["-np", "2", "parallel.model=2", "model.hidden=[255,128]"], "model.hidden[0]"),
    (["-np", "4", "parallel.model=4", "model.hidden=[2,128]"], "larger than model.hidden[0]"),
], ids=["np3-model2", "width-not-divisible", "model-wider-than-layer"])
def test_bad_layout_is_refused_before_launch(tmp_path, args, expected):
    uri = sqlite_store(tmp_path)
    t0 = time.monotonic()
    res = hvdkit(["run", DIGITS, *FAST, *args, f"checkpoint.dir={tmp_path / 'ck'}"], cwd=tmp_path,
                 env=worker_env(MLFLOW_TRACKING_URI=uri), timeout=120)
    assert res.returncode == 2, explain(res)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and expected in lines[0] and "fix:" in lines[0], res.stderr
    assert "every rank's full output" not in res.stderr  # no worker started (a launch names its log)
    assert not [r for r in _runs(uri) if r.info.status == "RUNNING"]
    assert time.monotonic() - t0 < 60


def test_elastic_split_job_is_refused(tmp_path):
    res = hvdkit(["run", DIGITS, *FAST, "-np", "2", "--min-np", "2", "--max-np", "4", "parallel.model=2",
                  "--host-discovery-script", "/bin/true", "--no-track"], cwd=tmp_path, timeout=120)
    assert res.returncode == 2, explain(res)
    assert "elastic" in res.stderr and "fix:" in res.stderr


# -- a Python recipe's own model, split by its build_model(..., parallel=ctx) ---------------------
SPLIT_RECIPE = '''
from hvdkit.recipe import PythonRecipe


class SplitGated(PythonRecipe):
    config = {"name": "split-gated", "model": {"name": "custom"}, "data": {"name": "digits"}, "batch_size": 32,
              "epochs": 3, "optimizer": {"name": "adam", "lr": 0.002}, "lr_schedule": {"scale": "sqrt", "warmup_epochs": 1}}

    def build_model(self, framework, input_shape, num_classes, parallel=None):
        import torch
        from torch import nn

        width = 1
        for d in input_shape:
            width *= d

        class Gated(nn.Module):
            def __init__(self):
                super().__init__()
                if parallel is None:  # the unsplit model: what its checkpoints load into
                    self.value, self.gate = nn.Linear(width, 128), nn.Linear(width, 128)
                    self.out = nn.Linear(128, num_classes)
                else:
                    from hvdkit.torch._tensor_parallel import ColumnParallelLinear, RowParallelLinear

                    ms = parallel.model_set
                    self.value = ColumnParallelLinear(width, 128, ms, gather_output=False)
                    self.gate = ColumnParallelLinear(width, 128, ms, gather_output=False)
                    self.out = RowParallelLinear(128, num_classes, ms, input_is_split=True)

            def forward(self, x):
                x = x.flatten(1)
                return self.out(torch.tanh(self.value(x)) * torch.sigmoid(self.gate(x)))

        return Gated()
'''


def test_python_recipe_splits_its_own_model(tmp_path):
    import numpy as np
    import torch

    from hvdkit.core.data import digits
    from hvdkit.recipe import load_recipe

    path = tmp_path / "split_gated.py"
    path.write_text(SPLIT_RECIPE)
    res = hvdkit(["run", str(path), "-np", "2", *FAST, "--no-track", "parallel.model=2", f"checkpoint.dir={tmp_path / 'ck'}",
                  "--summary-json", str(tmp_path / "s.json")], cwd=tmp_path)
    assert res.returncode == 0, explain(res)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["val_metrics"]["val_accuracy"] >= 0.9
    # its checkpoint (Adam state included) is the unsplit model's: build_model(parallel=None) loads it
    state = torch.load(_checkpoints(tmp_path / "ck")[-1], map_location="cpu", weights_only=False)
    data = digits(0.2, 42)
    model = load_recipe(path).python.build_model("torch", data.input_shape, data.num_classes)
    model.load_state_dict(state["model"])
    x = torch.from_numpy(np.ascontiguousarray(data.x_val.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        acc = float((model(x).argmax(1).numpy() == data.y_val).mean())
    assert abs(acc - summary["val_metrics"]["val_accuracy"]) < 1e-9
    params = list(model.parameters())
    for i, p in enumerate(params):
        assert tuple(state["optimizer"]["state"][i]["exp_avg"].shape) == tuple(p.shape)


def test_python_recipe_without_parallel_is_refused(tmp_path):
    res = hvdkit(["run", str(REPO / "recipes/custom_model.py"), "-np", "2", *FAST, "--no-track", "parallel.model=2"],
                 cwd=tmp_path, timeout=120)
    assert res.returncode == 2, explain(res)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "build_model" in lines[0] and "parallel=None" in lines[0], res.stderr
