"""Streamed file datasets: a folder of shards read lazily, so a dataset larger than memory trains
with bounded resident memory.

A shard folder (format ``hvdkit-shards/1``) holds ``index.json`` and one file per shard::

    index.json        {"format": "hvdkit-shards/1", "num_classes": 10, "input_shape": [8, 8, 1],
                       "x_dtype": "float32", "splits": {"train": [{"file": "train-00000.npz", "rows": 256}, ...],
                                                        "val": [...]}}
    train-00000.npz   np.savez (uncompressed): x (rows, *input_shape) float32 channel-last, y (rows,) int64
    train-00000.parquet   columns x: fixed_size_list<float32>[prod(input_shape)] (row-major), y: int64

Framework-free: numpy and the standard library; pyarrow is imported only when a Parquet shard is
read or written. :meth:`ShardFolder.open` validates the whole folder cheaply (index, files, the
arrays' headers, never their data) so a bad folder fails at job start with one line naming the file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hvdkit._files import atomic_write_json
from hvdkit.errors import RecipeError

FORMAT = "hvdkit-shards/1"
INDEX = "index.json"
FORMATS = ("npz", "parquet")
_WRITE_FIX = "write one with `hvdkit data shard SOURCE DIR`"
_REWRITE_FIX = "rewrite the folder with `hvdkit data shard SOURCE DIR --force`"


def _pyarrow():
    """``(pyarrow, pyarrow.parquet)``, imported on first use: only Parquet shards need them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise RecipeError(f"Parquet shards need pyarrow, which is not importable ({exc})", fix="pip install pyarrow") from exc
    return pa, pq


def _shape_str(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


# ---------------------------------------------------------------------------------------------
# Cheap checks of one shard file: headers and metadata only, never the arrays' data.


def _npy_header(z: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and the member size the header implies, of ``name`` in an npz, reading only its header."""
    info = z.getinfo(name)
    with z.open(info) as m:
        version = np.lib.format.read_magic(m)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(m)
        elif version == (2, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(m)
        else:  # 3.0 is only written for structured dtypes with non-latin names: never a shard's
            raise ValueError(f"unsupported .npy format version {version}")
        header_len = m.tell()
    if dtype.hasobject:
        raise ValueError(f"{name} holds Python objects")
    # An uncompressed member's size is header + data: a shorter one was cut (caught here, cheaply,
    # rather than at the first epoch that reaches this shard).
    expected = header_len + math.prod(shape) * dtype.itemsize
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != expected:
        raise ValueError(f"{name} is {info.file_size} bytes, its header says {expected}")
    return tuple(int(d) for d in shape), dtype, info.file_size


def _check_npz(f: Path, rows: int, input_shape: tuple[int, ...]) -> None:
    try:
        with zipfile.ZipFile(f) as z:
            x_shape, x_dtype, _ = _npy_header(z, "x.npy")
            y_shape, y_dtype, _ = _npy_header(z, "y.npy")
    except KeyError as exc:
        raise RecipeError(f"shard {f} has no array {exc.args[0].removesuffix('.npy')!r} (expected x and y)",
                          fix=_REWRITE_FIX) from exc
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise RecipeError(f"shard {f} is not a valid .npz file ({exc})", fix=_REWRITE_FIX) from exc
    _check_arrays(f, rows, input_shape, x_shape, x_dtype, y_shape, y_dtype)


def _check_arrays(f: Path, rows: int, input_shape: tuple[int, ...], x_shape: tuple[int, ...], x_dtype: np.dtype,
                  y_shape: tuple[int, ...], y_dtype: np.dtype) -> None:
    want_x, want_y = (rows, *input_shape), (rows,)
    if x_shape != want_x or y_shape != want_y:
        raise RecipeError(f"shard {f} has mismatched shapes: x {_shape_str(x_shape)}, y {_shape_str(y_shape)}; "
                          f"the index expects x {_shape_str(want_x)}, y {_shape_str(want_y)}", fix=_REWRITE_FIX)
    if x_dtype != np.float32:
        raise RecipeError(f"shard {f} has x of dtype {x_dtype}, expected float32", fix=_REWRITE_FIX)
    if y_dtype.kind not in "iu":
        raise RecipeError(f"shard {f} has y of dtype {y_dtype}, expected an integer (int64)", fix=_REWRITE_FIX)


def _check_parquet(f: Path, rows: int, input_shape: tuple[int, ...]) -> None:
    pa, pq = _pyarrow()
    try:
        meta = pq.read_metadata(f)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise RecipeError(f"shard {f} is not a valid Parquet file ({exc})", fix=_REWRITE_FIX) from exc
    if "x" not in schema.names or "y" not in schema.names:
        raise RecipeError(f"shard {f} has columns {schema.names}, expected x and y", fix=_REWRITE_FIX)
    xt, yt = schema.field("x").type, schema.field("y").type
    width = math.prod(input_shape)
    if not pa.types.is_fixed_size_list(xt) or xt.value_type != pa.float32():
        raise RecipeError(f"shard {f} has column x of type {xt}, expected fixed_size_list<float>[{width}]",
                          fix=_REWRITE_FIX)
    if not pa.types.is_integer(yt):
        raise RecipeError(f"shard {f} has column y of type {yt}, expected int64", fix=_REWRITE_FIX)
    if meta.num_rows != rows or xt.list_size != width:
        raise RecipeError(f"shard {f} has mismatched shapes: {meta.num_rows} rows of {xt.list_size} x values; "
                          f"the index expects {rows} rows of {width} (input_shape {_shape_str(input_shape)})",
                          fix=_REWRITE_FIX)


def _check_shard(f: Path, rows: int, input_shape: tuple[int, ...]) -> None:
    if not f.is_file():
        raise RecipeError(f"shard {f} listed in {f.parent / INDEX} is missing", fix=_REWRITE_FIX)
    if f.suffix == ".parquet":
        _check_parquet(f, rows, input_shape)
    else:
        _check_npz(f, rows, input_shape)


# ---------------------------------------------------------------------------------------------
# Reading


def _load_shard(f: Path, rows: int, input_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One whole shard as (x float32, y int64); a file damaged since open() is still one RecipeError."""
    try:
        if f.suffix == ".parquet":
            _, pq = _pyarrow()
            table = pq.read_table(f, columns=["x", "y"])
            # flatten() honours chunk offsets; the values are row-major, prod(input_shape) per row
            x = table.column("x").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            x = x.reshape(table.num_rows, *input_shape)
            y = table.column("y").to_numpy()
        else:
            with np.load(f, allow_pickle=False) as z:
                x, y = z["x"], z["y"]
    except RecipeError:
        raise
    except Exception as exc:  # zipfile's CRC error, pyarrow's errors, a short read...: all name the file
        raise RecipeError(f"shard {f} could not be read ({type(exc).__name__}: {exc})", fix=_REWRITE_FIX) from exc
    if x.shape != (rows, *input_shape) or y.shape != (rows,):
        raise RecipeError(f"shard {f} has mismatched shapes: x {_shape_str(x.shape)}, y {_shape_str(y.shape)}; "
                          f"the index expects x {_shape_str((rows, *input_shape))}, y ({rows},)", fix=_REWRITE_FIX)
    return np.ascontiguousarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


class ShardedSplit:
    """One split (train or val) of a shard folder, read lazily.

    Whole shards are loaded on demand and at most ``cache_shards`` of them stay loaded (least
    recently used goes first), so resident memory is bounded by a couple of shards whatever the
    size of the dataset. :meth:`take` is thread-safe: a prefetch thread may call it.
    """

    def __init__(self, path: Path, files: list[Path], rows: list[int], input_shape: tuple[int, ...],
                 cache_shards: int = 2) -> None:
        if cache_shards < 1:
            raise ValueError(f"cache_shards={cache_shards} must be at least 1")
        self.path = Path(path)
        self.files = list(files)
        self.rows = [int(r) for r in rows]
        self.input_shape = tuple(int(d) for d in input_shape)
        self.cache_shards = cache_shards
        # offsets[s] is the global index of shard s's first row; offsets[-1] the total
        self.offsets = np.concatenate([[0], np.cumsum(self.rows, dtype=np.int64)]).astype(np.int64)
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # shards read from disk so far (tests and benchmarks look at it)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"ShardedSplit({self.path}, {len(self)} rows in {len(self.files)} shards)"

    @property
    def loaded_shards(self) -> list[int]:
        """The shard numbers loaded now, least recently used first."""
        with self._lock:
            return list(self._cache)

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """int64 global row indices, a permutation of range(len(self)), shard-major: the shard
        order is ``default_rng((seed, epoch)).permutation(n_shards)``; within shard s the rows are
        ``offset[s] + default_rng((seed, epoch, s)).permutation(rows[s])``. The same on every
        process for the same (seed, epoch); consecutive batches come from one shard at a time,
        so a cache of two shards is enough."""
        order = np.random.default_rng((seed, epoch)).permutation(len(self.files))
        parts = [self.offsets[s] + np.random.default_rng((seed, epoch, int(s))).permutation(self.rows[s])
                 for s in order]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def _shard(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard s from the cache, else from disk; the lock is held by the caller."""
        hit = self._cache.get(s)
        if hit is not None:
            self._cache.move_to_end(s)
            return hit
        # Evict before loading, not after: at no moment are more than cache_shards shards held.
        while len(self._cache) >= self.cache_shards:
            self._cache.popitem(last=False)
        data = _load_shard(self.files[s], self.rows[s], self.input_shape)
        self.loads += 1
        self._cache[s] = data
        return data

    def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x float32 (n, *input_shape) and y int64 (n,) of those global row indices, in the order given."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n_total = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n_total):
            bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
            raise IndexError(f"row {bad} out of range for {self!r}")
        x = np.empty((idx.size, *self.input_shape), np.float32)
        y = np.empty(idx.size, np.int64)
        if not idx.size:
            return x, y
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        with self._lock:
            # Shards already loaded first, then the others: each shard is loaded at most once per call.
            wanted = [int(s) for s in np.unique(shard_of)]
            wanted.sort(key=lambda s: s not in self._cache)
            for s in wanted:
                where = np.flatnonzero(shard_of == s)
                xs, ys = self._shard(s)
                local = idx[where] - self.offsets[s]
                if where[-1] - where[0] + 1 == where.size:
                    # a contiguous run of the output (the usual case: batches of a shard-major order,
                    # evaluation chunks): gather straight into it, no temporary copy of the rows
                    lo, hi = int(where[0]), int(where[-1]) + 1
                    np.take(xs, local, axis=0, out=x[lo:hi])
                    np.take(ys, local, axis=0, out=y[lo:hi])
                else:
                    x[where] = xs[local]
                    y[where] = ys[local]
        return x, y

    def chunks(self, start: int, stop: int, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Rows start..stop-1 in storage order, in pieces of at most ``size`` rows (evaluation);
        a piece spans at most two shards, so no more than the cache's shards are ever held."""
        if size < 1:
            raise ValueError(f"size={size} must be at least 1")
        start, stop = max(0, int(start)), min(len(self), int(stop))
        for lo in range(start, stop, size):
            yield self.take(np.arange(lo, min(lo + size, stop), dtype=np.int64))


class ShardFolder:
    """A validated shard folder: its train split, its val split (or None), classes and input shape."""

    def __init__(self, path: Path, train: ShardedSplit, val: ShardedSplit | None, num_classes: int,
                 input_shape: tuple[int, ...]) -> None:
        self.path = path
        self.train = train
        self.val = val
        self.num_classes = num_classes
        self.input_shape = input_shape

    def __repr__(self) -> str:
        return f"ShardFolder({self.path}, train={len(self.train)}, val={len(self.val) if self.val else None})"

    @classmethod
    def open(cls, path: str | Path, *, cache_shards: int = 2) -> ShardFolder:
        """Open and validate ``path``: index, every listed file, every shard's headers (not its data).
        Any problem is one RecipeError naming the file and the bad value."""
        path = Path(path).expanduser().resolve()
        index = path / INDEX
        if not index.is_file():
            raise RecipeError(f"{path} is not a shard folder (no {INDEX})", fix=_WRITE_FIX)
        try:
            meta = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RecipeError(f"{index} is not readable JSON ({exc})", fix=_REWRITE_FIX) from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise RecipeError(f"{index} has format {got!r}, expected {FORMAT!r}", fix=_REWRITE_FIX)
        num_classes = meta.get("num_classes")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise RecipeError(f"{index} has num_classes={num_classes!r}, expected a positive integer", fix=_REWRITE_FIX)
        shape = meta.get("input_shape")
        if (not isinstance(shape, list) or not shape
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
            raise RecipeError(f"{index} has input_shape={shape!r}, expected a list of positive integers", fix=_REWRITE_FIX)
        input_shape = tuple(shape)
        if meta.get("x_dtype", "float32") != "float32":
            raise RecipeError(f"{index} has x_dtype={meta.get('x_dtype')!r}, expected 'float32'", fix=_REWRITE_FIX)
        splits = meta.get("splits")
        if not isinstance(splits, dict) or not splits.get("train"):
            raise RecipeError(f"{index} has no train split (splits={_short(splits)})", fix=_REWRITE_FIX)
        opened = {name: cls._split(path, index, name, entries, input_shape, cache_shards)
                  for name, entries in splits.items() if name in ("train", "val")}
        return cls(path, opened["train"], opened.get("val"), num_classes, input_shape)

    @staticmethod
    def _split(path: Path, index: Path, name: str, entries: Any, input_shape: tuple[int, ...],
               cache_shards: int) -> ShardedSplit:
        if not isinstance(entries, list) or not entries:
            raise RecipeError(f"{index} has splits.{name}={_short(entries)}, expected a non-empty list of "
                              '{"file": ..., "rows": ...}', fix=_REWRITE_FIX)
        files, rows = [], []
        for i, e in enumerate(entries):
            ok = (isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("rows"), int)
                  and not isinstance(e.get("rows"), bool) and e["rows"] > 0)
            # a plain file name: an index must not reach outside its own folder
            if not ok or Path(e["file"]).name != e["file"] or e["file"] in ("", ".", ".."):
                raise RecipeError(f"{index} has splits.{name}[{i}]={_short(e)}, expected "
                                  '{"file": "<name in the folder>", "rows": <positive int>}', fix=_REWRITE_FIX)
            f = path / e["file"]
            _check_shard(f, e["rows"], input_shape)
            files.append(f)
            rows.append(e["rows"])
        return ShardedSplit(path, files, rows, input_shape, cache_shards=cache_shards)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Writing


def _write_npz(f: Path, x: np.ndarray, y: np.ndarray) -> None:
    np.savez(f, x=x, y=y)  # uncompressed: the members' sizes are then checkable from their headers


def _write_parquet(f: Path, x: np.ndarray, y: np.ndarray) -> None:
    pa, pq = _pyarrow()
    width = math.prod(x.shape[1:])
    xs = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), type=pa.float32()), width)
    pq.write_table(pa.table({"x": xs, "y": pa.array(y, type=pa.int64())}), f)


class _ShardWriter:
    """Fills one shard buffer of ``rows_per_shard`` rows from pieces of any size and writes it when full."""

    def __init__(self, folder: Path, split: str, fmt: str, rows_per_shard: int, num_classes: int) -> None:
        self.folder, self.split, self.fmt = folder, split, fmt
        self.rows_per_shard, self.num_classes = rows_per_shard, num_classes
        self.entries: list[dict[str, Any]] = []
        self.rows = 0
        self.bytes = 0
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None
        self._fill = 0

    def add(self, x: np.ndarray, y: np.ndarray, input_shape: tuple[int, ...]) -> None:
        if self._x is None:  # one buffer for the whole split, reused: ~one shard in memory
            self._x = np.empty((self.rows_per_shard, *input_shape), np.float32)
            self._y = np.empty(self.rows_per_shard, np.int64)
        pos = 0
        while pos < len(x):
            take = min(len(x) - pos, self.rows_per_shard - self._fill)
            self._x[self._fill:self._fill + take] = x[pos:pos + take]
            self._y[self._fill:self._fill + take] = y[pos:pos + take]
            self._fill += take
            pos += take
            if self._fill == self.rows_per_shard:
                self.flush()

    def flush(self) -> None:
        if not self._fill:
            return
        name = f"{self.split}-{len(self.entries):05d}.{self.fmt}"
        f = self.folder / name
        (_write_parquet if self.fmt == "parquet" else _write_npz)(f, self._x[:self._fill], self._y[:self._fill])
        self.entries.append({"file": name, "rows": self._fill})
        self.rows += self._fill
        self.bytes += f.stat().st_size
        self._fill = 0


def check_out_dir(out_dir: str | Path, force: bool) -> Path:
    """``out_dir`` resolved; an existing one is refused unless ``force``."""
    out = Path(out_dir).expanduser().resolve()
    if (out.exists() or out.is_symlink()) and not force:
        raise RecipeError(f"{out} already exists", fix="choose another OUT_DIR, or pass --force to replace it")
    return out


def write_shards(out_dir: str | Path, splits: dict[str, Iterable[tuple[np.ndarray, np.ndarray]]], *,
                 num_classes: int, rows_per_shard: int, fmt: str = "npz", force: bool = False) -> dict[str, Any]:
    """Write a shard folder from each split's iterable of (x, y) pieces (any piece sizes).

    Shards hold exactly ``rows_per_shard`` rows (a split's last one fewer); at most about one
    shard plus one piece is in memory. Everything goes to a temporary sibling folder that is
    renamed to ``out_dir`` at the end, so an error or Ctrl-C leaves no half-written folder. An
    existing ``out_dir`` is refused unless ``force`` (then replaced). A split that yields no rows
    is left out of the index (train may not be empty). Returns a summary: rows and shards per
    split, bytes, input shape, format.
    """
    if fmt not in FORMATS:
        raise RecipeError(f"format {fmt!r} is not a shard format", fix=f"use one of {', '.join(FORMATS)}")
    if rows_per_shard < 1:
        raise RecipeError(f"rows_per_shard={rows_per_shard} must be at least 1", fix="pass --rows-per-shard 1 or more")
    if num_classes < 1:
        raise RecipeError(f"num_classes={num_classes} must be at least 1", fix="pass a positive number of classes")
    if fmt == "parquet":
        _pyarrow()  # missing pyarrow: say so before any work
    out = check_out_dir(out_dir, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier killed run with this pid
    tmp.mkdir()
    try:
        input_shape: tuple[int, ...] | None = None
        writers: dict[str, _ShardWriter] = {}
        for split, pieces in splits.items():
            w = writers[split] = _ShardWriter(tmp, split, fmt, rows_per_shard, num_classes)
            for x, y in pieces:
                x, y = np.asarray(x), np.asarray(y)
                if input_shape is None:
                    input_shape = tuple(int(d) for d in x.shape[1:])
                _check_piece(split, x, y, input_shape, num_classes)
                w.add(x, y, input_shape)
            w.flush()
        if input_shape is None or not writers.get("train") or not writers["train"].rows:
            raise RecipeError(f"no train rows to write to {out}", fix="give the source at least one training sample")
        index = {"format": FORMAT, "num_classes": int(num_classes), "input_shape": list(input_shape),
                 "x_dtype": "float32", "splits": {s: w.entries for s, w in writers.items() if w.entries}}
        atomic_write_json(tmp / INDEX, index)  # last: a folder with an index is a complete one
        if out.exists() or out.is_symlink():  # force (checked above); swap, then drop the old one
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:  # KeyboardInterrupt too: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(out), "format": fmt, "num_classes": int(num_classes), "input_shape": list(input_shape),
            "splits": {s: {"rows": w.rows, "shards": len(w.entries)} for s, w in writers.items() if w.entries},
            "bytes": sum(w.bytes for w in writers.values())}


def _check_piece(split: str, x: np.ndarray, y: np.ndarray, input_shape: tuple[int, ...], num_classes: int) -> None:
    """One piece against the first one's shape and the classes; bad source data never reaches a shard."""
    if tuple(x.shape[1:]) != input_shape or y.shape != (len(x),):
        raise RecipeError(f"{split} piece has x {_shape_str(x.shape)} and y {_shape_str(y.shape)}; expected x "
                          f"(n, {', '.join(map(str, input_shape))}) and y (n,)", fix="give every sample the same shape")
    if x.dtype.kind not in "fiub":
        raise RecipeError(f"{split} piece has x of dtype {x.dtype}, expected numbers", fix="give numeric images")
    if y.dtype.kind not in "iu" and not (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
        raise RecipeError(f"{split} piece has labels of dtype {y.dtype}, expected integers", fix="give integer class ids")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise RecipeError(f"{split} labels span {int(y.min())}..{int(y.max())}, outside 0..{num_classes - 1}",
                          fix="give class ids in 0..num_classes-1")


def synthetic_splits(num_samples: int, image_size: int, channels: int, num_classes: int, val_fraction: float,
                     seed: int, piece_rows: int = 256) -> dict[str, Iterator[tuple[np.ndarray, np.ndarray]]]:
    """Generated images, streamed: piece i of train from ``default_rng((seed, 0, i))``, of val from
    ``(seed, 1, i)``, each ``piece_rows`` rows (standard-normal float32 x, y in [0, num_classes)).
    val has round(num_samples * val_fraction) rows, train the rest. Nothing holds the whole set,
    and the data does not depend on the shard size or format."""
    n_val = int(round(num_samples * val_fraction))
    shape = (image_size, image_size, channels)

    def pieces(stream: int, total: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i, lo in enumerate(range(0, total, piece_rows)):
            n = min(piece_rows, total - lo)
            rng = np.random.default_rng((seed, stream, i))
            yield rng.standard_normal((n, *shape), dtype=np.float32), rng.integers(0, num_classes, n, dtype=np.int64)

    return {"train": pieces(0, num_samples - n_val), "val": pieces(1, n_val)}


def folder_bytes(split: ShardedSplit) -> int:
    """Bytes on disk of a split's shard files."""
    return sum(f.stat().st_size for f in split.files)


__all__ = ["FORMAT", "check_out_dir", "ShardFolder", "ShardedSplit", "folder_bytes", "synthetic_splits", "write_shards"]


def digits_shards(path: str | Path | None = None, *, seed: int = 42, rows_per_shard: int = 256,
                  fmt: str = "npz") -> Path:
    """The bundled digits as a shard folder, written once (``hvdkit data shard digits`` with this
    seed) and reused: the example recipes read it with their framework's own pipeline. Several
    processes may ask at once (every rank of a plain horovodrun line): a file lock lets one write."""
    import fcntl

    from hvdkit.build._cache import cache_root
    from hvdkit.core.data import digits

    out = Path(path or cache_root() / "data" / f"digits-{fmt}-seed{seed}").expanduser()
    if (out / INDEX).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (out / INDEX).is_file():
            d = digits(0.2, seed)  # the built-in digits split of this seed
            write_shards(out, {"train": [(d.x_train, d.y_train)], "val": [(d.x_val, d.y_val)]},
                         num_classes=d.num_classes, rows_per_shard=rows_per_shard, fmt=fmt)
    return out
