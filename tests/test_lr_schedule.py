"""The learning-rate schedule (hvdkit/core/lr.py): scaled, warmed up, then held or decayed; one
curve for every training path (the loop, the elastic loop and Keras fit build it from the recipe)."""

from __future__ import annotations

import math

import pytest

from conftest import REPO
from hvdkit.core.lr import LRSchedule
from hvdkit.recipe import load_recipe


def _recipe(*overrides: str):
    return load_recipe(str(REPO / "recipes/digits.yaml"), list(overrides)).recipe


def test_warmup_then_held_is_unchanged():
    s = LRSchedule(0.1, 4, "linear", 10)
    assert s.at(0) == pytest.approx(0.1 + 0.3 / 10) and s.at(9) == pytest.approx(0.4)
    assert s.at(10) == s.at(10_000) == pytest.approx(0.4)


def test_cosine_after_warmup_reaches_the_final_fraction():
    s = LRSchedule(0.1, 2, "linear", 10, decay="cosine", total_steps=110, final_fraction=0.1)
    assert s.at(9) == pytest.approx(0.2)  # the warm-up ends at the scaled rate
    assert s.at(10) == pytest.approx(0.2)  # the decay starts from it
    assert s.at(60) == pytest.approx((0.2 + 0.02) / 2)  # half way: the mean of both ends
    assert s.at(110) == pytest.approx(0.02) and s.at(500) == pytest.approx(0.02)  # then held
    rates = [s.at(k) for k in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # never rises


def test_linear_and_step_decay():
    lin = LRSchedule(1.0, 1, "none", 0, decay="linear", total_steps=100)
    assert lin.at(0) == 1.0 and lin.at(25) == pytest.approx(0.75) and lin.at(100) == pytest.approx(0.0)
    step = LRSchedule(1.0, 1, "none", 5, decay="step", total_steps=100, step_every=20, gamma=0.5)
    assert [step.at(k) for k in (5, 24, 25, 44, 45, 65)] == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.125])


def test_for_recipe_counts_in_epochs_and_scales_with_the_copies():
    r = _recipe("optimizer.lr=0.05", "lr_schedule.warmup_epochs=1", "lr_schedule.decay=step",
                "lr_schedule.step_every_epochs=2", "lr_schedule.step_gamma=0.1")
    s = LRSchedule.for_recipe(r, size=2, steps_per_epoch=22, total_steps=220)
    assert s.warmup_steps == 22 and s.step_every == 44 and s.target_lr == pytest.approx(0.1)
    assert s.at(22) == pytest.approx(0.1) and s.at(22 + 44) == pytest.approx(0.01)
    cos = LRSchedule.for_recipe(_recipe("optimizer.lr=0.05", "lr_schedule.decay=cosine", "lr_schedule.scale=sqrt",
                                        "lr_schedule.warmup_epochs=0"), 4, 10, 100)
    assert cos.target_lr == pytest.approx(0.1) and cos.at(0) == pytest.approx(0.1)  # 0.05 x sqrt(4)
    assert cos.at(100) == pytest.approx(0.0) and math.isclose(cos.at(50), 0.05)


def test_the_default_recipe_keeps_the_old_curve():
    """No decay unless asked: a recipe of before gets the same rates (resumes stay comparable)."""
    r = _recipe("lr_schedule.warmup_epochs=2")
    new = LRSchedule.for_recipe(r, 2, 22, 330)
    old = LRSchedule(r.optimizer.lr, 2, r.lr_schedule.scale, 44)
    assert [new.at(k) for k in range(0, 330, 7)] == [old.at(k) for k in range(0, 330, 7)]


@pytest.mark.horovod
@pytest.mark.parametrize("path", ["torch", "tensorflow", "keras_fit"])
def test_every_training_path_steps_with_the_decayed_rate(tmp_path, path):
    """Real jobs: 5 plain-SGD steps whose rate a step decay cuts to ~0 after the first step end
    with the weights of a 1-step job, on the loop (torch, TensorFlow) and on Keras fit."""
    import numpy as np

    from conftest import explain, hvdkit
    from test_recipes_run import PLAIN_SGD, _only_checkpoint, _weights

    framework = "torch" if path == "torch" else "tensorflow"
    common = ["run", "recipes/digits.yaml", "-np", "1", "--framework", framework, "--no-track", *PLAIN_SGD,
              "batch_size=32", f"keras_fit={'true' if path == 'keras_fit' else 'false'}"]
    # digits at np=1, batch 32: 44 steps an epoch, so 1/44 epoch is one step
    decayed = hvdkit([*common, "steps=5", "lr_schedule.decay=step", f"lr_schedule.step_every_epochs={1 / 44}",
                      "lr_schedule.step_gamma=1e-12", f"checkpoint.dir={tmp_path / 'decayed'}"], cwd=REPO)
    assert decayed.returncode == 0, explain(decayed)
    one = hvdkit([*common, "steps=1", f"checkpoint.dir={tmp_path / 'one'}"], cwd=REPO)
    assert one.returncode == 0, explain(one)
    held = hvdkit([*common, "steps=5", f"checkpoint.dir={tmp_path / 'held'}"], cwd=REPO)
    assert held.returncode == 0, explain(held)
    w_decayed, w_one, w_held = (_weights(_only_checkpoint(tmp_path / d)) for d in ("decayed", "one", "held"))
    for a, b in zip(w_decayed, w_one):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(a, b, rtol=1e-4) for a, b in zip(w_held, w_one))  # without the decay they differ
