"""The data x model layout (hvdkit.core._layout): who holds which slice, who talks to whom, bad input."""

from __future__ import annotations

import dataclasses

import pytest

from hvdkit.core._layout import ParallelLayout, check_divides, make_process_sets
from hvdkit.errors import LaunchError, ParallelError, RecipeError


def test_2x2_groups():
    lay = ParallelLayout(4, 2)
    assert lay.data == 2
    assert [lay.model_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert [lay.data_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert [lay.model_group(r) for r in range(4)] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [lay.data_group(r) for r in range(4)] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert lay.model_groups() == [[0, 1], [2, 3]]
    assert lay.data_groups() == [[0, 2], [1, 3]]


@pytest.mark.parametrize("size,model", [(1, 1), (2, 1), (2, 2), (4, 2), (6, 3), (8, 2), (8, 4), (8, 8)])
def test_groups_partition_the_ranks(size, model):
    lay = ParallelLayout(size, model)
    for groups, n, width in ((lay.model_groups(), lay.data, model), (lay.data_groups(), model, lay.data)):
        assert len(groups) == n and all(len(g) == width for g in groups)
        assert sorted(r for g in groups for r in g) == list(range(size))  # every rank exactly once
    for r in range(size):
        assert lay.model_group(r)[lay.model_rank(r)] == r and lay.data_group(r)[lay.data_rank(r)] == r
        assert set(lay.model_group(r)) & set(lay.data_group(r)) == {r}  # the two groups cross at r only
        assert lay.model_group(r) == list(range(lay.model_group(r)[0], lay.model_group(r)[0] + model))  # consecutive


def test_process_set_groups():
    assert ParallelLayout(4, 2).process_set_groups() == [[0, 1], [2, 3], [0, 2], [1, 3]]
    # the whole job is Horovod's global set (registering it again is refused): np=2 model 2
    assert ParallelLayout(2, 2).process_set_groups() == [[0], [1]]
    assert ParallelLayout(4, 1).process_set_groups() == []  # no model parallelism, nothing to register
    assert ParallelLayout(1, 1).process_set_groups() == []


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ParallelLayout(4, 2).model = 4  # type: ignore[misc]


def _one_line(exc: ParallelError) -> str:
    text = str(exc)
    assert "\n" not in text and " — fix: " in text and exc.exit_code == 2
    return text


def test_model_not_dividing_np():
    with pytest.raises(ParallelError) as e:
        ParallelLayout(6, 4)
    assert isinstance(e.value, RecipeError)  # the CLI's bad-input path: exit 2, one line
    text = _one_line(e.value)
    assert "parallel.model=4 does not divide np=6" in text and "1, 2, 3, 6" in text and "multiple of 4" in text


@pytest.mark.parametrize("model", [0, -2])
def test_model_below_one(model):
    with pytest.raises(ParallelError) as e:
        ParallelLayout(4, model)
    assert f"parallel.model={model}" in _one_line(e.value)


def test_bad_rank():
    with pytest.raises(ValueError):
        ParallelLayout(4, 2).model_group(4)


def test_check_divides():
    check_divides(8, 2, "hidden layer 1")
    check_divides(8, 8, "hidden layer 1")
    with pytest.raises(ParallelError) as e:
        check_divides(10, 4, "hidden layer 1 of the MLP")
    text = _one_line(e.value)
    assert "hidden layer 1 of the MLP (10 features)" in text and "parallel.model=4" in text and "1, 2, 5, 10" in text
    with pytest.raises(ParallelError) as e:
        check_divides(2, 4, "the output layer")
    assert "larger than the output layer (2 features)" in _one_line(e.value)
    with pytest.raises(ParallelError):
        check_divides(8, 0, "hidden layer 1")


class FakeHorovod:
    """Just enough of horovod.torch / horovod.tensorflow for make_process_sets' bookkeeping."""

    __name__ = "fake_hvd"

    class ProcessSet:
        def __init__(self, ranks):
            self.ranks = list(ranks)

    def __init__(self, size, rank, initialized=False):
        self._size, self._rank, self._init = size, rank, initialized
        self.global_process_set = self.ProcessSet(range(size))
        self.init_sets = self.added = None

    def is_initialized(self):
        return self._init

    def init(self, process_sets=None):
        self._init, self.init_sets = True, process_sets

    def add_process_set(self, ranks):
        self.added = (self.added or []) + [list(ranks)]
        return self.ProcessSet(ranks)

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    from hvdkit.core import _layout

    monkeypatch.setattr(_layout, "_REGISTERED", {})


def test_make_process_sets_before_init_is_static():
    hvd = FakeHorovod(4, 3)
    model_set, data_set = make_process_sets(hvd, ParallelLayout(4, 2))
    assert [s.ranks for s in hvd.init_sets] == [[0, 1], [2, 3], [0, 2], [1, 3]] and hvd.added is None
    assert model_set.ranks == [2, 3] and data_set.ranks == [1, 3]
    assert make_process_sets(hvd, ParallelLayout(4, 2)) == (model_set, data_set)  # once per process


def test_make_process_sets_whole_job_is_the_global_set():
    hvd = FakeHorovod(2, 1)
    model_set, data_set = make_process_sets(hvd, ParallelLayout(2, 2))
    assert model_set is hvd.global_process_set and data_set.ranks == [1]
    hvd = FakeHorovod(2, 1)
    assert make_process_sets(hvd, ParallelLayout(2, 1)) == (None, hvd.global_process_set)


def test_make_process_sets_after_init_needs_dynamic_sets(monkeypatch):
    monkeypatch.delenv("HOROVOD_DYNAMIC_PROCESS_SETS", raising=False)
    with pytest.raises(LaunchError) as e:
        make_process_sets(FakeHorovod(4, 0, initialized=True), ParallelLayout(4, 2))
    assert "HOROVOD_DYNAMIC_PROCESS_SETS=1" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
    hvd = FakeHorovod(4, 0, initialized=True)
    model_set, data_set = make_process_sets(hvd, ParallelLayout(4, 2))
    assert hvd.added == [[0, 1], [2, 3], [0, 2], [1, 3]] and model_set.ranks == [0, 1] and data_set.ranks == [0, 2]


def test_make_process_sets_wrong_size():
    with pytest.raises(LaunchError, match="made for np=4 but Horovod runs 2 ranks"):
        make_process_sets(FakeHorovod(2, 0), ParallelLayout(4, 2))


# -- check_recipe_layout: what `hvdkit run` / `hvdkit scale` refuse before any worker starts ----------
def _recipe(**over):
    from hvdkit.recipe._load import validate

    raw = {"name": "t", "framework": "torch", "model": {"name": "mlp", "hidden": [256, 128]}, "data": {"name": "digits"}}
    for k, v in over.items():
        raw[k] = v
    return validate(raw)


def test_recipe_layout_accepts_the_2x2_hybrid_and_model_1():
    from hvdkit.core._layout import check_recipe_layout

    assert check_recipe_layout(_recipe(parallel={"model": 2}), 4) == ParallelLayout(4, 2)
    assert check_recipe_layout(_recipe(parallel={"model": 2}), 2) == ParallelLayout(2, 2)
    assert check_recipe_layout(_recipe(), 3) is None  # model 1: nothing split, nothing checked
    # only the column-parallel widths (hidden[0], hidden[2], ...) must divide: hidden[1] is a row layer's output
    assert check_recipe_layout(_recipe(parallel={"model": 4}, model={"name": "mlp", "hidden": [256, 10, 64]}), 8).data == 2


@pytest.mark.parametrize("over, np, kw, expected", [
    ({"parallel": {"model": 2}}, 3, {}, "parallel.model=2 does not divide np=3"),
    ({"parallel": {"model": 2}, "model": {"name": "mlp", "hidden": [255, 128]}}, 2, {}, "model.hidden[0]"),
    ({"parallel": {"model": 4}, "model": {"name": "mlp", "hidden": [2]}}, 4, {}, "larger than model.hidden[0]"),
    ({"parallel": {"model": 2}, "model": {"name": "mlp", "hidden": [64, 32, 31]}}, 2, {}, "model.hidden[2]"),
    ({"parallel": {"model": 2}}, 2, {"elastic": True}, "elastic"),
    ({"parallel": {"model": 2}}, 2, {"custom_model": True}, "build_model"),
], ids=["np", "width", "model-wider", "third-width", "elastic", "custom"])
def test_recipe_layout_refusals_name_the_value_and_the_fix(over, np, kw, expected):
    from hvdkit.core._layout import check_recipe_layout

    with pytest.raises(ParallelError) as err:
        check_recipe_layout(_recipe(**over), np, **kw)
    line = str(err.value)
    assert expected in line and "fix:" in line and "\n" not in line
    assert err.value.exit_code == 2
