"""Shard folders in real jobs: the data-parallel formula still holds (np=2 × b ≡ np=1 × 2b) on the
loop and Keras fit, a folder 4× larger than a set RSS budget trains with every rank's peak RSS
under it (read back from MLflow), and a bad folder fails `hvdkit run` before launch, naming the file.
The example recipes (recipes/digits_files_*.py) reach their stated accuracy, tracked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO, explain, hvdkit, sqlite_store
from test_recipes_run import PLAIN_SGD, _only_checkpoint, _weights

pytestmark = pytest.mark.job  # tests/_suite.py: starts processes


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "digits"
    res = hvdkit(["data", "shard", "digits", str(out), "--rows-per-shard", "100", "--seed", "42"])
    assert res.returncode == 0, explain(res)
    return out


@pytest.mark.horovod
@pytest.mark.parametrize("path", ["torch", "keras_fit"])
def test_data_parallel_formula_on_a_shard_folder(tmp_path, digits_folder, path):
    """5 plain-SGD steps at np=2, batch 16 == np=1, batch 32: the shard-major order is the same at any np.
    (The TensorFlow loop reads the same per-epoch tf.data pipeline as Keras fit: one of the two here.)"""
    framework = "torch" if path == "torch" else "tensorflow"
    common = ["recipes/digits.yaml", "--framework", framework, "--no-track", *PLAIN_SGD, "data.name=files",
              f"data.path={digits_folder}", f"keras_fit={'true' if path == 'keras_fit' else 'false'}"]
    r1 = hvdkit(["run", *common[:1], "-np", "1", *common[1:], "batch_size=32", f"checkpoint.dir={tmp_path / 'np1'}"])
    assert r1.returncode == 0, explain(r1)
    r2 = hvdkit(["run", *common[:1], "-np", "2", *common[1:], "batch_size=16", f"checkpoint.dir={tmp_path / 'np2'}"])
    assert r2.returncode == 0, explain(r2)
    w1, w2 = _weights(_only_checkpoint(tmp_path / "np1")), _weights(_only_checkpoint(tmp_path / "np2"))
    assert len(w1) == len(w2) > 0
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    if path != "torch":
        return
    # and the folder is not read as the in-memory digits are: a different order, different weights
    r0 = hvdkit(["run", "recipes/digits.yaml", "-np", "1", "--framework", framework, "--no-track", *PLAIN_SGD,
                 "batch_size=32", f"checkpoint.dir={tmp_path / 'mem'}"])
    assert r0.returncode == 0, explain(r0)
    w0 = _weights(_only_checkpoint(tmp_path / "mem"))
    assert any(not np.allclose(a, b, rtol=1e-4) for a, b in zip(w0, w1))


@pytest.mark.horovod
def test_a_folder_four_times_the_rss_budget_trains_under_it(tmp_path):
    """70,000 generated 64x64x3 images (3.4 GB on disk) against an 800 MiB budget per rank:
    every shard is read (one epoch, then evaluation over the whole val split), each rank's peak
    RSS (ru_maxrss, logged as peak_rss_mb) stays under the budget."""
    budget_mib = 800
    folder = tmp_path / "big"
    res = hvdkit(["data", "shard", "synthetic", str(folder), "--num-samples", "70000", "--image-size", "64",
                  "--channels", "3", "--rows-per-shard", "256"], timeout=600)
    assert res.returncode == 0, explain(res)
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size >= 4 * budget_mib * 2**20, size
    uri = sqlite_store(tmp_path)
    from conftest import worker_env

    res = hvdkit(["run", "recipes/digits.yaml", "-np", "2", "--framework", "torch", "data.name=files",
                  f"data.path={folder}", "epochs=1", "model.hidden=[32]", "batch_size=64", "log.progress=false",
                  "--experiment", "rss", "--summary-json", str(tmp_path / "s.json")],
                 env=worker_env(MLFLOW_TRACKING_URI=uri), timeout=900)
    assert res.returncode == 0, explain(res)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["steps"] == 56000 // 128, summary  # the whole training split, once
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("rss").experiment_id])
    ranks = [r for r in runs if r.data.tags.get("hvdkit.role") == "rank"]
    assert len(ranks) == 2
    peaks = [max(m.value for m in client.get_metric_history(r.info.run_id, "peak_rss_mb")) for r in ranks]
    print(f"dataset {size / 2**20:.0f} MiB, budget {budget_mib} MiB, peak RSS per rank {peaks} MiB")
    assert all(0 < p < budget_mib for p in peaks), peaks


@pytest.mark.parametrize("damage, needle", [
    ("shape", "train-00001.npz"),
    ("corrupt", "train-00002.npz"),
    ("missing", "train-00000.npz"),
    ("no-index", "index.json"),
], ids=["mismatched-shape", "corrupt-file", "missing-shard", "not-a-folder"])
def test_a_bad_shard_folder_fails_before_launch(tmp_path, damage, needle):
    folder = tmp_path / "d"
    res = hvdkit(["data", "shard", "digits", str(folder), "--rows-per-shard", "256"])
    assert res.returncode == 0, explain(res)
    if damage == "shape":
        np.savez(folder / "train-00001.npz", x=np.zeros((256, 4, 4, 1), np.float32), y=np.zeros(256, np.int64))
    elif damage == "corrupt":
        (folder / "train-00002.npz").write_bytes(b"not a zip file at all")
    elif damage == "missing":
        (folder / "train-00000.npz").unlink()
    else:
        (folder / "index.json").unlink()
    res = hvdkit(["run", str(REPO / "recipes/digits.yaml"), "-np", "2", "--no-track", "data.name=files",
                  f"data.path={folder}"], cwd=tmp_path, timeout=120)
    assert res.returncode == 2, explain(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "fix:" in lines[0], res.stderr
    assert "horovodrun" not in res.stderr and not (tmp_path / "checkpoints").exists()  # nothing launched


@pytest.mark.horovod
@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_example_recipe_trains_from_files(tmp_path, framework):
    """recipes/digits_files_{torch,tf}.py: the framework's own pipeline over a shard folder, with
    bf16, clipping, a cosine schedule, label smoothing and early stopping: val_accuracy >= 0.95."""
    uri = sqlite_store(tmp_path)
    from conftest import worker_env

    res = hvdkit(["run", str(REPO / f"recipes/digits_files_{framework}.py"), "-np", "2", "log.progress=false",
                  "--experiment", "example", "--summary-json", str(tmp_path / "s.json")],
                 cwd=tmp_path, env=worker_env(MLFLOW_TRACKING_URI=uri, HVDKIT_CACHE_DIR=str(tmp_path / "cache")), timeout=600)
    assert res.returncode == 0, explain(res)
    assert (tmp_path / "cache/data/digits-npz-seed42/index.json").is_file()  # the folder it wrote and read
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["val_metrics"]["val_accuracy"] >= 0.95, summary
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("example").experiment_id])
    parent = [r for r in runs if r.data.tags.get("hvdkit.role") == "parent"]
    assert parent and parent[0].info.status == "FINISHED" and parent[0].data.metrics["val_accuracy"] >= 0.95
    ranks = [r for r in runs if r.data.tags.get("hvdkit.role") == "rank"]
    share = []
    for r in ranks:
        data = [m.value for m in client.get_metric_history(r.info.run_id, "data_time_s")]
        step = [m.value for m in client.get_metric_history(r.info.run_id, "step_time_s")]
        assert data and step and all(v >= 0 for v in data)
        share.append(sum(data) / (sum(data) + sum(step)))
    print(f"{framework}: val_accuracy {summary['val_metrics']['val_accuracy']:.4f}, epochs {summary['epochs']}, "
          f"samples/s {summary['samples_per_sec']:.0f}, data_time_s share of the step per rank {share}")


def test_files_without_a_path_is_one_line(tmp_path):
    res = hvdkit(["run", str(REPO / "recipes/digits.yaml"), "-np", "2", "data.name=files"], cwd=tmp_path, timeout=120)
    assert res.returncode == 2, explain(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "data.path" in lines[0] and lines[0].count("fix:") == 1, res.stderr
