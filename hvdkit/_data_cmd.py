"""``hvdkit data``: write a shard folder (``shard``) and check one (``info``).

Imports only click and hvdkit's errors at module import, like ``hvdkit.cli``: numpy and the
shard code are imported when a command runs, so ``hvdkit --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from hvdkit.errors import HvdkitError, RecipeError

_SOURCES = "digits, synthetic, or a path to an .npz file"


class _DataGroup(click.Group):
    """Reports hvdkit's errors as one line prefixed by the command (``hvdkit data shard: error:``)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HvdkitError as exc:
            name = f"hvdkit data {ctx.invoked_subcommand}" if ctx.invoked_subcommand else "hvdkit data"
            click.echo(f"{name}: error: {exc.one_line()}", err=True)
            sys.exit(exc.exit_code)


@click.group("data", cls=_DataGroup)
def data() -> None:
    """Shard folders: datasets streamed from files (.npz or Parquet), larger than memory."""


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


@data.command("shard")
@click.argument("source")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--rows-per-shard", type=int, default=256, show_default=True, help="rows in each shard file")
@click.option("--format", "fmt", type=click.Choice(["npz", "parquet"]), default="npz", show_default=True)
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="share of rows held out for validation (digits, synthetic, an .npz of x and y)")
@click.option("--seed", type=int, default=0, show_default=True, help="split (and synthetic data) seed")
@click.option("--force", is_flag=True, help="replace OUT_DIR if it exists")
@click.option("--num-samples", type=int, default=2048, show_default=True, help="synthetic: rows in all")
@click.option("--image-size", type=int, default=32, show_default=True, help="synthetic: height and width")
@click.option("--channels", type=int, default=3, show_default=True, help="synthetic: channels")
@click.option("--num-classes", type=int, default=10, show_default=True, help="synthetic: classes")
def shard_cmd(source: str, out_dir: str, rows_per_shard: int, fmt: str, val_fraction: float, seed: int, force: bool,
              num_samples: int, image_size: int, channels: int, num_classes: int) -> None:
    """Write SOURCE as a shard folder OUT_DIR. SOURCE: digits (the built-in split for this --seed and
    --val-fraction), synthetic (generated piece by piece, never all in memory), or an .npz file with
    x_train, y_train, x_val, y_val (kept as is) or x, y (split by --val-fraction and --seed)."""
    from hvdkit.core.files import check_out_dir, synthetic_splits, write_shards

    if not 0.0 <= val_fraction < 1.0:
        raise RecipeError(f"--val-fraction {val_fraction} is outside [0, 1)", fix="pass e.g. --val-fraction 0.2")
    if seed < 0:
        raise RecipeError(f"--seed {seed} is negative", fix="pass a seed of 0 or more")
    if rows_per_shard < 1:
        raise RecipeError(f"--rows-per-shard {rows_per_shard} must be at least 1", fix="pass e.g. --rows-per-shard 256")
    check_out_dir(out_dir, force)  # before reading the source: a refusal should cost nothing
    if source == "synthetic":
        for opt, v in (("--num-samples", num_samples), ("--image-size", image_size), ("--channels", channels),
                       ("--num-classes", num_classes)):
            if v < 1:
                raise RecipeError(f"{opt} {v} must be at least 1", fix=f"pass {opt} 1 or more")
        splits = synthetic_splits(num_samples, image_size, channels, num_classes, val_fraction, seed)
    elif source == "digits":
        from hvdkit.core.data import digits

        ds = digits(val_fraction, seed)
        num_classes = ds.num_classes
        splits = {"train": [(ds.x_train, ds.y_train)], "val": [(ds.x_val, ds.y_val)]}
    else:
        splits, num_classes = _npz_source(Path(source), val_fraction, seed)
    summary = write_shards(out_dir, splits, num_classes=num_classes, rows_per_shard=rows_per_shard, fmt=fmt,
                           force=force)
    parts = [f"{s['rows']} {name} rows in {s['shards']} shard{'s' if s['shards'] != 1 else ''}"
             for name, s in summary["splits"].items()]
    click.echo(f"wrote {' and '.join(parts)} ({_mb(summary['bytes'])}, {fmt}) to {summary['path']}")


def _npz_source(path: Path, val_fraction: float, seed: int) -> tuple[dict[str, list], int]:
    """The splits and class count of a user's .npz (x_train/y_train/x_val/y_val, or x/y to split)."""
    import numpy as np

    if not path.is_file():
        raise RecipeError(f"SOURCE {path} is not {_SOURCES}", fix="pass digits, synthetic, or an existing .npz file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # not a zip, a pickled object array, a bad member: all one line
        raise RecipeError(f"{path} is not a readable .npz file ({type(exc).__name__}: {exc})",
                          fix="write it with numpy.savez(path, x=..., y=...)") from exc
    keys = set(arrays)
    if {"x_train", "y_train", "x_val", "y_val"} <= keys:
        pairs = {"train": (arrays["x_train"], arrays["y_train"]), "val": (arrays["x_val"], arrays["y_val"])}
    elif {"x", "y"} <= keys:
        pairs = {"all": (arrays["x"], arrays["y"])}
    else:
        raise RecipeError(f"{path} holds arrays {sorted(keys)}, expected x_train, y_train, x_val, y_val or x, y",
                          fix="save the arrays under those names")
    for name, (x, y) in pairs.items():
        if x.ndim not in (3, 4) or y.ndim != 1 or len(x) != len(y):
            raise RecipeError(f"{path}: {name} has x {x.shape} and y {y.shape}; expected x (N, H, W) or (N, H, W, C) "
                              "and y (N,)", fix="save channel-last images and one label per image")
        if x.dtype.kind not in "fiub" or y.dtype.kind not in "iu":
            raise RecipeError(f"{path}: {name} has x of dtype {x.dtype} and y of dtype {y.dtype}; expected numeric "
                              "images and integer labels", fix="save float images and integer class ids")
        if len(y) and y.min() < 0:
            raise RecipeError(f"{path}: {name} has a negative label {int(y.min())}", fix="use class ids 0..C-1")
    prepared = {}
    for name, (x, y) in pairs.items():
        x = x[..., None] if x.ndim == 3 else x  # (N, H, W): one channel, channel-last
        prepared[name] = (x.astype(np.float32, copy=False), y.astype(np.int64, copy=False))
    if "all" in prepared:
        x, y = prepared.pop("all")
        # A seeded permutation, the same rule as hvdkit's built-in datasets
        perm = np.random.default_rng(seed).permutation(len(x))
        n_val = int(round(len(x) * val_fraction))
        prepared = {"train": (x[perm[n_val:]], y[perm[n_val:]]), "val": (x[perm[:n_val]], y[perm[:n_val]])}
    num_classes = max((int(y.max()) + 1 for _, y in prepared.values() if len(y)), default=0)
    if num_classes < 1:
        raise RecipeError(f"{path} holds no samples", fix="save at least one image and label")
    return {name: [xy] for name, xy in prepared.items()}, num_classes


@data.command("info")
@click.argument("folder", type=click.Path())
def info_cmd(folder: str) -> None:
    """Open FOLDER (validating it) and print its splits, rows, shards, input shape, classes and size."""
    from hvdkit.core.files import ShardFolder, folder_bytes

    sf = ShardFolder.open(folder)
    click.echo(f"{sf.path}: {sf.num_classes} classes, input shape {'x'.join(map(str, sf.input_shape))} float32")
    total = 0
    for name, split in (("train", sf.train), ("val", sf.val)):
        if split is None:
            click.echo(f"  {name}: none")
            continue
        size = folder_bytes(split)
        total += size
        kinds = sorted({f.suffix.lstrip('.') for f in split.files})
        click.echo(f"  {name}: {len(split)} rows in {len(split.files)} shards ({_mb(size)}, {', '.join(kinds)})")
    click.echo(f"  total: {_mb(total)}")
