"""The Horovod build layer's pure logic: cache keys, the wheel cache, patch application."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

import pytest

from hvdkit.build import PATCHES, BuildKey, WheelCache, apply_patches
from hvdkit.build._patches import SourcePatch
from hvdkit.errors import CacheError, PatchError

KEY = dict(horovod="0.28.1", torch="2.13.0+cpu", tensorflow="2.21.0", gpu=False, mpi=True, patches="abcdef123456")


def test_cache_key_names_every_field():
    slug = BuildKey.for_python(**KEY).slug()
    assert slug.startswith("horovod0.28.1-cp3")
    for part in ("torch2.13.0_cpu", "tf2.21.0", "cpu", "-mpi", "pabcdef12"):
        assert part in slug


@pytest.mark.parametrize("field,value", [("torch", "2.12.0"), ("tensorflow", None), ("gpu", True), ("mpi", False),
                                         ("horovod", "0.28.0"), ("patches", "ffff")])
def test_cache_key_changes_with_each_field(field, value):
    assert BuildKey.for_python(**KEY).slug() != BuildKey.for_python(**{**KEY, field: value}).slug()


def _fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("horovod/__init__.py", "__version__ = '0.28.1'\n")
    return path


def test_cache_store_and_lookup_roundtrip(tmp_path):
    cache = WheelCache(tmp_path / "cache")
    key = BuildKey.for_python(**KEY)
    assert cache.lookup(key) is None
    stored = cache.store(key, _fake_wheel(tmp_path / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl"))
    again = cache.lookup(key)
    assert again is not None and again.wheel == stored.wheel and again.sha256 == stored.sha256
    # nothing but the finished entry: no staging leftovers
    assert [p.name for p in (tmp_path / "cache" / "wheels").iterdir()] == [key.slug()]


def test_corrupted_cached_wheel_is_reported_and_removed(tmp_path):
    cache = WheelCache(tmp_path / "cache")
    key = BuildKey.for_python(**KEY)
    stored = cache.store(key, _fake_wheel(tmp_path / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl"))
    data = bytearray(stored.wheel.read_bytes())
    data[10] ^= 0xFF
    stored.wheel.write_bytes(bytes(data))
    with pytest.raises(CacheError) as exc:
        cache.lookup(key)
    assert "corrupted" in str(exc.value) and "hvdkit build-horovod" in str(exc.value)
    assert not cache.entry_dir(key).exists()  # consistent: the bad entry is gone, not half there
    assert cache.lookup(key) is None


def test_patches_apply_to_the_real_sdist_once(tmp_path):
    from hvdkit.build import cache_root

    sdist = cache_root() / "sdists" / "horovod-0.28.1.tar.gz"
    if not sdist.is_file():
        pytest.skip("no cached sdist yet (hvdkit build-horovod downloads it)")
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp_path, filter="data")
    root = tmp_path / "horovod-0.28.1"
    assert apply_patches(root) == [p.name for p in PATCHES]
    assert apply_patches(root) == []  # idempotent
    assert "set(CMAKE_CXX_STANDARD 17)" in (root / "horovod/torch/CMakeLists.txt").read_text()
    assert "HVDKIT_BUILD_XLA_OPS" in (root / "horovod/tensorflow/CMakeLists.txt").read_text()


def test_patch_that_no_longer_applies_names_the_file(tmp_path):
    (tmp_path / "horovod/torch").mkdir(parents=True)
    (tmp_path / "horovod/torch/CMakeLists.txt").write_text("set(CMAKE_CXX_STANDARD 20)\n")
    patch = next(p for p in PATCHES if p.name == "torch-cxx17")
    with pytest.raises(PatchError) as exc:
        patch.apply(tmp_path)
    assert "horovod/torch/CMakeLists.txt" in str(exc.value) and "torch-cxx17" in str(exc.value)
    assert (tmp_path / "horovod/torch/CMakeLists.txt").read_text() == "set(CMAKE_CXX_STANDARD 20)\n"


def test_patch_on_missing_file_names_the_file(tmp_path):
    with pytest.raises(PatchError, match="CMakeLists.txt"):
        SourcePatch("x", "CMakeLists.txt", "a", "b", "why").apply(tmp_path)
