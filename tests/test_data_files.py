"""Shard folders (hvdkit.core.files, `hvdkit data`): real files in tmp dirs, the real CLI."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import hvdkit
from hvdkit.core.data import digits
from hvdkit.core.files import FORMAT, ShardFolder, ShardedSplit, synthetic_splits, write_shards
from hvdkit.errors import RecipeError

pytestmark = pytest.mark.job  # tests/_suite.py: starts processes


@pytest.fixture(scope="module")
def digits_folders(tmp_path_factory) -> dict[str, Path]:
    """digits as a shard folder in both formats, written once by the real CLI."""
    root = tmp_path_factory.mktemp("shards")
    out = {}
    for fmt in ("npz", "parquet"):
        res = hvdkit(["data", "shard", "digits", str(root / fmt), "--format", fmt])
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("wrote 1438 train rows in 6 shards and 359 val rows in 2 shards") and fmt in res.stdout
        out[fmt] = root / fmt
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _bad(args: list[str]) -> str:
    """Run the CLI expecting bad input: exit 2 and exactly one line on stderr, which is returned."""
    res = hvdkit(args)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, (res.returncode, res.stderr)
    assert lines[0].startswith(f"hvdkit data {args[1]}: error: ")
    return lines[0]


@pytest.mark.parametrize("fmt", ["npz", "parquet"])
def test_digits_folder_holds_the_builtin_split(digits_folders, fmt):
    ref = digits(0.2, 0)
    sf = ShardFolder.open(digits_folders[fmt])
    assert sf.num_classes == 10 and sf.input_shape == (8, 8, 1) and sf.val is not None
    assert all(f.suffix == f".{fmt}" for f in sf.train.files)
    for split, x_ref, y_ref in ((sf.train, ref.x_train, ref.y_train), (sf.val, ref.x_val, ref.y_val)):
        x, y = split.take(np.arange(len(split)))
        assert x.dtype == np.float32 and y.dtype == np.int64
        np.testing.assert_array_equal(x, x_ref)
        np.testing.assert_array_equal(y, y_ref)
    info = hvdkit(["data", "info", str(digits_folders[fmt])])
    assert info.returncode == 0 and "train: 1438 rows in 6 shards" in info.stdout and "10 classes" in info.stdout


def test_epoch_order_is_a_shard_major_permutation(digits_folders):
    split = ShardFolder.open(digits_folders["npz"]).train
    order = split.epoch_order(seed=3, epoch=0)
    assert order.dtype == np.int64
    np.testing.assert_array_equal(np.sort(order), np.arange(len(split)))
    # shard-major: the shard of consecutive rows changes exactly n_shards - 1 times
    shard_of = np.searchsorted(split.offsets, order, side="right") - 1
    assert np.count_nonzero(np.diff(shard_of)) == len(split.files) - 1
    np.testing.assert_array_equal(order, split.epoch_order(3, 0))
    assert not np.array_equal(order, split.epoch_order(3, 1))
    assert not np.array_equal(order, split.epoch_order(4, 0))
    # the documented rule, so another process can rebuild it
    first = int(np.random.default_rng((3, 0)).permutation(len(split.files))[0])
    np.testing.assert_array_equal(order[:split.rows[first]],
                                  split.offsets[first] + np.random.default_rng((3, 0, first)).permutation(split.rows[first]))


def test_take_bounds_the_cache_and_keeps_the_order(digits_folders):
    sf = ShardFolder.open(digits_folders["npz"])
    split, ref = sf.train, digits(0.2, 0)
    order = split.epoch_order(0, 0)
    for lo in range(0, len(order), 64):
        idx = order[lo:lo + 64]
        x, y = split.take(idx)
        np.testing.assert_array_equal(x, ref.x_train[idx])
        np.testing.assert_array_equal(y, ref.y_train[idx])
        assert len(split.loaded_shards) <= 2
    assert split.loads == len(split.files)  # shard-major: each shard read once per epoch
    # an arbitrary order touching every shard: still at most 2 loaded, rows in the order given
    idx = np.array([1400, 3, 700, 3, 256, 1437, 0])
    x, y = split.take(idx)
    np.testing.assert_array_equal(y, ref.y_train[idx])
    np.testing.assert_array_equal(x, ref.x_train[idx])
    assert len(split.loaded_shards) <= 2 and len(split._cache) <= 2
    with pytest.raises(IndexError):
        split.take(np.array([len(split)]))


def test_chunks_cover_a_range_exactly(digits_folders):
    split = ShardFolder.open(digits_folders["parquet"]).val
    ref = digits(0.2, 0)
    pieces = list(split.chunks(10, 350, 100))
    assert [len(y) for _, y in pieces] == [100, 100, 100, 40]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in pieces]), ref.x_val[10:350])
    np.testing.assert_array_equal(np.concatenate([y for _, y in pieces]), ref.y_val[10:350])
    assert len(split.loaded_shards) <= 2


def test_synthetic_is_streamed_and_deterministic(tmp_path):
    args = ["--num-samples", "1500", "--image-size", "4", "--channels", "2", "--num-classes", "5",
            "--rows-per-shard", "250", "--val-fraction", "0.2", "--seed", "7"]
    for name in ("a", "b"):
        res = hvdkit(["data", "shard", "synthetic", str(tmp_path / name), *args])
        assert res.returncode == 0, res.stderr
        assert "1200 train rows in 5 shards and 300 val rows in 2 shards" in res.stdout
    a, b = ShardFolder.open(tmp_path / "a"), ShardFolder.open(tmp_path / "b")
    assert a.input_shape == (4, 4, 2) and a.num_classes == 5
    assert len(a.train.files) + len(a.val.files) == 7 and a.train.rows == [250] * 4 + [200]
    for sa, sb in ((a.train, b.train), (a.val, b.val)):
        for fa, fb in zip(sa.files, sb.files):
            with np.load(fa) as za, np.load(fb) as zb:
                np.testing.assert_array_equal(za["x"], zb["x"])
                np.testing.assert_array_equal(za["y"], zb["y"])
    # the documented generator: piece 0 of train is rng((seed, 0, 0))
    rng = np.random.default_rng((7, 0, 0))
    x0 = rng.standard_normal((256, 4, 4, 2), dtype=np.float32)
    np.testing.assert_array_equal(a.train.take(np.arange(250))[0], x0[:250])
    y = a.train.take(np.arange(len(a.train)))[1]
    assert y.min() >= 0 and y.max() < 5


def test_synthetic_pieces_never_hold_the_whole_set():
    # 40,000 64x64x3 images would be 2 GB; the generator yields 256-row pieces (12.6 MB) lazily
    splits = synthetic_splits(40_000, 64, 3, 10, 0.1, 0)
    x, y = next(iter(splits["train"]))
    assert x.shape == (256, 64, 64, 3) and x.dtype == np.float32 and y.shape == (256,)


def test_write_shards_from_odd_pieces(tmp_path):
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((1000, 3, 3)).astype(np.float64)  # cast to float32 on the way
    ys = rng.integers(0, 4, 1000)
    pieces = [(xs[a:b], ys[a:b]) for a, b in ((0, 7), (7, 300), (300, 301), (301, 1000))]
    summary = write_shards(tmp_path / "o", {"train": iter(pieces), "val": iter([])}, num_classes=4, rows_per_shard=128)
    assert summary["splits"] == {"train": {"rows": 1000, "shards": 8}} and summary["bytes"] > 0
    sf = ShardFolder.open(tmp_path / "o")
    assert sf.val is None and sf.train.rows == [128] * 7 + [104]
    x, y = sf.train.take(np.arange(1000))
    np.testing.assert_array_equal(x, xs.astype(np.float32))
    np.testing.assert_array_equal(y, ys)
    assert json.loads((tmp_path / "o" / "index.json").read_text())["format"] == FORMAT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_write_shards_leaves_nothing_when_the_source_fails(tmp_path):
    def pieces():
        for i in range(5):
            yield np.zeros((100, 2, 2, 1), np.float32), np.zeros(100, np.int64)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_shards(tmp_path / "o", {"train": pieces()}, num_classes=2, rows_per_shard=64)
    assert list(tmp_path.iterdir()) == []
    # --force replaces a folder only once the new one is complete: a failure keeps the old one
    write_shards(tmp_path / "o", {"train": [(np.zeros((3, 2)), np.zeros(3, np.int64))]}, num_classes=1, rows_per_shard=2)
    with pytest.raises(RuntimeError):
        write_shards(tmp_path / "o", {"train": pieces()}, num_classes=2, rows_per_shard=64, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"] and len(ShardFolder.open(tmp_path / "o").train) == 3


def test_npz_source_with_x_y(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "src.npz", x=rng.integers(0, 255, (50, 5, 5)).astype(np.uint8), y=rng.integers(0, 3, 50))
    res = hvdkit(["data", "shard", str(tmp_path / "src.npz"), str(tmp_path / "o"), "--rows-per-shard", "16"])
    assert res.returncode == 0, res.stderr
    sf = ShardFolder.open(tmp_path / "o")
    assert sf.input_shape == (5, 5, 1) and len(sf.train) == 40 and len(sf.val) == 10 and sf.num_classes <= 3


# ------------------------------------------------------------------ bad input: one line, the file, exit 2


def test_mismatched_shard_shape(digits_folders, tmp_path):
    d = _copy(digits_folders["npz"], tmp_path / "d")
    np.savez(d / "train-00002.npz", x=np.zeros((256, 8, 9, 1), np.float32), y=np.zeros(256, np.int64))
    line = _bad(["data", "info", str(d)])
    assert "train-00002.npz" in line and "mismatched shapes" in line and "(256, 8, 9, 1)" in line and "(256, 8, 8, 1)" in line
    with pytest.raises(RecipeError, match="train-00002.npz"):
        ShardFolder.open(d)
    # right shapes, wrong dtypes: float64 images, float labels
    np.savez(d / "train-00002.npz", x=np.zeros((256, 8, 8, 1)), y=np.zeros(256, np.int64))
    with pytest.raises(RecipeError, match=r"train-00002.npz has x of dtype float64, expected float32"):
        ShardFolder.open(d)
    np.savez(d / "train-00002.npz", x=np.zeros((256, 8, 8, 1), np.float32), y=np.zeros(256))
    with pytest.raises(RecipeError, match=r"train-00002.npz has y of dtype float64"):
        ShardFolder.open(d)


def test_mismatched_parquet_shard(digits_folders, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = _copy(digits_folders["parquet"], tmp_path / "d")
    x = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(359 * 63, np.float32)), 63)
    pq.write_table(pa.table({"x": x, "y": pa.array(np.zeros(359, np.int64))}), d / "val-00001.parquet")
    line = _bad(["data", "info", str(d)])
    assert "val-00001.parquet" in line and "mismatched shapes" in line


@pytest.mark.parametrize("how", ["truncate", "overwrite-start", "overwrite-member"])
def test_corrupt_shard(digits_folders, tmp_path, how):
    d = _copy(digits_folders["npz"], tmp_path / "d")
    f = d / "train-00004.npz"
    data = bytearray(f.read_bytes())
    if how == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif how == "overwrite-start":
        data[:64] = b"\0" * 64
        f.write_bytes(data)
    else:  # a member whose .npy header is garbage
        with zipfile.ZipFile(f) as z:
            off = z.getinfo("x.npy").header_offset
        # the member's data starts after the 30-byte local header, its name and its extra field
        start = off + 30 + int.from_bytes(data[off + 26:off + 28], "little") + int.from_bytes(data[off + 28:off + 30], "little")
        data[start:start + 16] = b"garbagegarbage!!"
        f.write_bytes(data)
    line = _bad(["data", "info", str(d)])
    assert str(f) in line


def test_corrupt_parquet_shard(digits_folders, tmp_path):
    d = _copy(digits_folders["parquet"], tmp_path / "d")
    f = d / "train-00001.parquet"
    f.write_bytes(f.read_bytes()[:-20])
    line = _bad(["data", "info", str(d)])
    assert str(f) in line and "not a valid Parquet file" in line


def test_damage_after_open_names_the_file(digits_folders, tmp_path):
    d = _copy(digits_folders["npz"], tmp_path / "d")
    split = ShardFolder.open(d).train
    f = split.files[1]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside x's data: only the CRC at read time sees it
    f.write_bytes(data)
    with pytest.raises(RecipeError, match="train-00001.npz"):
        split.take(np.array([300]))


def test_missing_shard_and_index(digits_folders, tmp_path):
    d = _copy(digits_folders["npz"], tmp_path / "d")
    (d / "val-00001.npz").unlink()
    line = _bad(["data", "info", str(d)])
    assert str(d / "val-00001.npz") in line and "missing" in line
    (d / "index.json").unlink()
    line = _bad(["data", "info", str(d)])
    assert str(d) in line and "no index.json" in line and "hvdkit data shard" in line
    line = _bad(["data", "info", str(tmp_path / "nowhere")])
    assert "nowhere" in line


def test_bad_index(digits_folders, tmp_path):
    d = _copy(digits_folders["npz"], tmp_path / "d")
    (d / "index.json").write_text("{not json")
    assert str(d / "index.json") in _bad(["data", "info", str(d)])
    meta = json.loads((digits_folders["npz"] / "index.json").read_text())
    (d / "index.json").write_text(json.dumps({**meta, "format": "hvdkit-shards/9"}))
    line = _bad(["data", "info", str(d)])
    assert str(d / "index.json") in line and "hvdkit-shards/9" in line
    (d / "index.json").write_text(json.dumps({**meta, "splits": {"train": [{"file": "../x.npz", "rows": 3}]}}))
    assert "../x.npz" in _bad(["data", "info", str(d)])


def test_existing_out_dir_needs_force(digits_folders, tmp_path):
    d = _copy(digits_folders["npz"], tmp_path / "d")
    line = _bad(["data", "shard", "digits", str(d)])
    assert str(d) in line and "--force" in line
    res = hvdkit(["data", "shard", "synthetic", str(d), "--force", "--format", "parquet", "--rows-per-shard", "1000",
                  "--num-samples", "2500", "--image-size", "2", "--val-fraction", "0.1"])
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in d.iterdir()) == ["index.json", "train-00000.parquet", "train-00001.parquet",
                                                   "train-00002.parquet", "val-00000.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_bad_sources(tmp_path):
    assert "nope.npz" in _bad(["data", "shard", str(tmp_path / "nope.npz"), str(tmp_path / "o")])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert "junk.npz" in _bad(["data", "shard", str(tmp_path / "junk.npz"), str(tmp_path / "o")])
    np.savez(tmp_path / "w.npz", a=np.zeros(3))
    assert "x_train" in _bad(["data", "shard", str(tmp_path / "w.npz"), str(tmp_path / "o")])
    assert "--val-fraction" in _bad(["data", "shard", "digits", str(tmp_path / "o"), "--val-fraction", "1.5"])
    assert not (tmp_path / "o").exists()


def test_sharded_split_direct():
    # the class is usable on its own (the loop builds one per split); bad cache sizes are refused
    with pytest.raises(ValueError):
        ShardedSplit(Path("."), [], [], (1,), cache_shards=0)
