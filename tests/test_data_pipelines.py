"""A Python recipe's own pipeline (a torch Dataset, a tf.data.Dataset) sharded by hvdkit in real
np=2 jobs: every sample seen exactly once per epoch across the ranks (counted by the pipeline
itself), a length that does not divide evenly ends without a hang (drop or pad), the wrong
framework's pipeline is one line and exit 2."""

from __future__ import annotations

import collections
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import explain, hvdkit, worker_env

# Items carry their own index in x[0, 0]; the pipeline appends every index it serves to
# $SEEN_DIR/<rank>-<pid>.txt (DataLoader workers and tf.data threads included).
RECIPE = textwrap.dedent('''
    import os
    import numpy as np
    from hvdkit.core.data import DataSplits
    from hvdkit.recipe import PythonRecipe

    N, VAL = {n}, 40

    def _record(i):
        if int(i) >= 10_000:
            return
        path = os.path.join(os.environ["SEEN_DIR"], f"{{os.environ.get('HOROVOD_RANK', '0')}}-{{os.getpid()}}.txt")
        with open(path, "a") as f:
            f.write(f"{{int(i)}}\\n")

    def _sample(i):
        rng = np.random.default_rng(int(i))
        x = rng.standard_normal((1, 4, 4)).astype(np.float32)
        x[0, 0, 0] = float(i)  # the index, read back nowhere: counting happens in _record
        return x, int(i) % 3

    class Pipeline(PythonRecipe):
        config = {{"name": "pipeline-{framework}", "model": {{"name": "mlp", "hidden": [8]}},
                   "data": {{"name": "custom", "uneven": "{uneven}", "workers": {workers}}},
                   "batch_size": 8, "epochs": {epochs}, "optimizer": {{"lr": 0.01}}}}

        def build_data(self, seed):
            if "{pipeline}" == "torch":
                import torch

                class Indexed(torch.utils.data.Dataset):
                    def __init__(self, n, record):
                        self.n, self.record = n, record
                    def __len__(self):
                        return self.n
                    def __getitem__(self, i):
                        if self.record:
                            _record(i)
                        x, y = _sample(i)
                        return torch.from_numpy(x), y

                # input_shape given: no probe of item 0 (it would count as a read)
                return DataSplits(Indexed(N, True), Indexed(VAL, False), num_classes=3, input_shape=(1, 4, 4))
            import tensorflow as tf

            if "{pipeline}" == "keras":
                import keras

                class Batches(keras.utils.PyDataset):  # items are whole batches of 8 (batch_size)
                    def __init__(self, n, offset=0):
                        super().__init__()
                        self.n, self.offset, self.training = n, offset, False
                    def __len__(self):
                        return -(-self.n // 8)
                    def on_epoch_begin(self):
                        self.training = True  # reads before this are shape probes, not training
                    def __getitem__(self, b):
                        ids = range(self.offset + 8 * b, self.offset + min(self.n, 8 * (b + 1)))
                        for i in ids if self.training else ():
                            _record(i)
                        xs, ys = zip(*(_sample(i) for i in ids))
                        return np.stack(xs), np.array(ys, np.int64)

                return DataSplits(Batches(N), Batches(VAL, offset=10_000), num_classes=3)

            def decode(i):  # hvdkit maps it after sharding: each rank reads only its own samples
                def read(j):
                    _record(j)
                    x, y = _sample(j)
                    return x, np.int64(y)
                x, y = tf.numpy_function(read, [i], [tf.float32, tf.int64])
                return tf.ensure_shape(x, (1, 4, 4)), tf.ensure_shape(y, ())

            # validation indices start at 10,000: not counted as training reads
            return DataSplits(tf.data.Dataset.range(N), tf.data.Dataset.range(10_000, 10_000 + VAL), num_classes=3,
                              decode=decode)
''')


def _write(tmp_path: Path, **kw) -> Path:
    path = tmp_path / "pipeline.py"
    path.write_text(RECIPE.format(**kw))
    return path


def _seen(seen_dir: Path) -> dict[str, collections.Counter]:
    """Indices served, per rank (files of all a rank's processes together)."""
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for f in seen_dir.glob("*.txt"):
        out[f.name.split("-")[0]].update(int(line) for line in f.read_text().split())
    return out


def _run(tmp_path, framework, pipeline, n, uneven="drop", workers=0, epochs=1, extra=()):
    recipe = _write(tmp_path, framework=framework, pipeline=pipeline, n=n, uneven=uneven, workers=workers, epochs=epochs)
    seen_dir = tmp_path / "seen"
    seen_dir.mkdir()
    env = worker_env(SEEN_DIR=str(seen_dir))
    res = hvdkit(["run", str(recipe), "-np", "2", "--framework", framework, "--no-track", "log.progress=false",
                  "--summary-json", str(tmp_path / "s.json"), *extra], cwd=tmp_path, env=env, timeout=300)
    return res, _seen(seen_dir), (json.loads((tmp_path / "s.json").read_text()) if res.returncode == 0 else None)


@pytest.mark.horovod
@pytest.mark.parametrize("framework, pipeline, workers", [("torch", "torch", 0), ("torch", "torch", 2),
                                                         ("tensorflow", "tf", 0), ("tensorflow", "keras", 0)],
                         ids=["torch", "torch-2-workers", "tf.data", "keras-PyDataset"])
def test_one_epoch_sees_every_sample_once_across_ranks(tmp_path, framework, pipeline, workers):
    # 64 samples, batch 8 × 2 ranks: 4 steps; every index served once, by exactly one rank.
    res, seen, summary = _run(tmp_path, framework, pipeline, 64, workers=workers)
    assert res.returncode == 0, explain(res)
    assert summary["steps"] == 4 and summary["epochs"] == 1, summary
    assert set(seen) == {"0", "1"}, seen
    both = seen["0"] + seen["1"]
    assert sorted(both) == list(range(64)) and max(both.values()) == 1, both
    assert len(seen["0"]) == len(seen["1"]) == 32
    assert not set(seen["0"]) & set(seen["1"])  # disjoint shards


@pytest.mark.horovod
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_epochs_reshuffle_and_uneven_lengths_end_without_a_hang(tmp_path, framework):
    # 70 samples, global batch 16: drop → 4 steps per epoch (64 samples), pad → 5 (80, 10 twice).
    res, seen, summary = _run(tmp_path, framework, "torch" if framework == "torch" else "tf", 70, uneven="pad", epochs=2)
    assert res.returncode == 0, explain(res)
    assert summary["steps"] == 10, summary
    both = seen["0"] + seen["1"]
    assert set(both) == set(range(70)) and sum(both.values()) == 2 * 80, both  # every sample each epoch, 10 padded
    (tmp_path / "s.json").unlink()
    drop = tmp_path / "drop"
    drop.mkdir()
    res, seen, summary = _run(drop, framework, "torch" if framework == "torch" else "tf", 70, uneven="drop")
    assert res.returncode == 0, explain(res)
    assert summary["steps"] == 4, summary
    assert sum((seen["0"] + seen["1"]).values()) == 64


@pytest.mark.job
@pytest.mark.parametrize("framework, pipeline", [("torch", "tf"), ("tensorflow", "torch")])
def test_a_pipeline_of_the_other_framework_is_refused(tmp_path, framework, pipeline):
    res, _, _ = _run(tmp_path, framework, pipeline, 64)
    assert res.returncode == 2, explain(res)
    lines = [ln for ln in res.stderr.splitlines() if "hvdkit: error" in ln]
    assert lines and "runs on " + framework in lines[0] and "fix:" in lines[0], res.stderr


def test_sharding_contract_in_one_process():
    """ShardedBatches: disjoint per rank, reshuffled per epoch, equal steps; pad wraps the epoch's head."""
    from hvdkit.core.sharding import ShardedBatches

    for n, pad in ((64, False), (70, False), (70, True), (5, True)):
        parts = [ShardedBatches(n, 4, r, 2, seed=1, pad=pad) for r in range(2)]
        steps = parts[0].steps_per_epoch
        assert all(p.steps_per_epoch == steps for p in parts)
        e0 = [np.concatenate(list(p.epoch(0))) for p in parts]
        assert len(e0[0]) == len(e0[1]) == steps * 4
        if not pad:
            assert not set(e0[0]) & set(e0[1])
        else:
            assert set(np.concatenate(e0)) == set(range(n))
        e1 = np.concatenate(list(parts[0].epoch(1)))
        assert not np.array_equal(e0[0], e1)


FORMULA_RECIPE = textwrap.dedent('''
    from hvdkit.core.data import DataSplits, digits
    from hvdkit.recipe import PythonRecipe

    class DigitsPipeline(PythonRecipe):
        config = {"name": "digits-pipeline", "model": {"name": "mlp"}, "data": {"name": "custom"}}

        def build_data(self, seed):
            d = digits(0.2, seed)
            if "{framework}" in ("torch", "torch-stream"):
                import numpy as np
                import torch
                from torch.utils.data import IterableDataset, TensorDataset

                class Stream(IterableDataset):
                    """Items in an order of its own, reshuffled by set_epoch (as a stream over files would)."""
                    def __init__(self, x, y):
                        self.x, self.y, self.epoch = x, y, 0
                    def set_epoch(self, epoch):
                        self.epoch = epoch
                    def __len__(self):
                        return len(self.y)
                    def __iter__(self):
                        for i in np.random.default_rng((7, self.epoch)).permutation(len(self.y)):
                            yield torch.from_numpy(self.x[i].transpose(2, 0, 1).copy()), int(self.y[i])

                def wrap(x, y):  # channel-first items, as the built-in arrays are fed
                    if "{framework}" == "torch-stream":
                        return Stream(x, y)
                    return TensorDataset(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y))

                return DataSplits(wrap(d.x_train, d.y_train), wrap(d.x_val, d.y_val), num_classes=10)
            import tensorflow as tf

            return DataSplits(tf.data.Dataset.from_tensor_slices((d.x_train, d.y_train)),
                              tf.data.Dataset.from_tensor_slices((d.x_val, d.y_val)), num_classes=10)
''')


@pytest.mark.horovod
# (a map-style torch Dataset goes through the DataLoader path that the IterableDataset's test and
# the shard folder's formula test cover between them: kept out to save CI time)
@pytest.mark.parametrize("pipeline", ["torch-stream", "tensorflow"])
def test_data_parallel_formula_with_a_pipeline(tmp_path, pipeline):
    """5 plain-SGD steps through a torch Dataset, a torch IterableDataset (np=2 with 2 DataLoader
    workers: their batches come back in order) or a tf.data pipeline: np=2 × 16 == np=1 × 32."""
    from test_recipes_run import PLAIN_SGD, _only_checkpoint, _weights

    framework = "tensorflow" if pipeline == "tensorflow" else "torch"
    recipe = tmp_path / "pipe.py"
    recipe.write_text(FORMULA_RECIPE.replace("{framework}", pipeline))
    for np_, b in ((1, 32), (2, 16)):
        workers = 2 if np_ == 2 and pipeline == "torch-stream" else 0
        res = hvdkit(["run", str(recipe), "-np", str(np_), "--framework", framework, "--no-track", *PLAIN_SGD,
                      f"batch_size={b}", f"data.workers={workers}", f"checkpoint.dir={tmp_path / f'np{np_}'}"],
                     cwd=tmp_path)
        assert res.returncode == 0, explain(res)
    w1, w2 = _weights(_only_checkpoint(tmp_path / "np1")), _weights(_only_checkpoint(tmp_path / "np2"))
    assert len(w1) == len(w2) > 0
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_read_ahead_raises_the_producers_error_and_stops_when_the_consumer_does():
    import threading
    import time

    from hvdkit.core.feed import read_ahead

    def failing():
        yield 1
        raise ValueError("shard 3 is corrupt")

    it = read_ahead(failing(), 2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="shard 3"):
        next(it)
    produced = []

    def endless():
        for i in range(10_000):
            produced.append(i)
            yield i

    it = read_ahead(endless(), 2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # the consumer stops early (a step budget): the thread must end on its own
    deadline = time.monotonic() + 5
    while any(t.name == "hvdkit-read-ahead" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "hvdkit-read-ahead" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 2  # bounded by the queue's depth
