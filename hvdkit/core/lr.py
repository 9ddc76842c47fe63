"""Learning-rate rule for data parallelism: scale with the world size, reached by a linear warm-up,
then optionally decayed.

With p workers the global batch is p times larger, so the rate is scaled (linear: base·p, per
Goyal et al. 2017; sqrt: base·√p) and approached linearly from ``base`` over the warm-up, which
keeps the first, noisy steps stable. After the warm-up the scaled rate is held (``none``) or
decayed over the remaining optimizer steps: ``cosine`` (Loshchilov & Hutter's half cosine) and
``linear`` down to ``final_fraction`` of it, ``step`` multiplied by ``gamma`` every ``step_every``
steps. Every training path (the loop, the elastic loop, Keras ``fit``) builds it with
:meth:`LRSchedule.for_recipe`, so one recipe means one curve.
"""

from __future__ import annotations

import math

DECAYS = ("none", "cosine", "linear", "step")


class LRSchedule:
    def __init__(self, base_lr: float, size: int, rule: str = "linear", warmup_steps: int = 0, *,
                 decay: str = "none", total_steps: int | None = None, final_fraction: float = 0.0,
                 step_every: int | None = None, gamma: float = 0.1) -> None:
        factor = {"linear": float(size), "sqrt": math.sqrt(size), "none": 1.0}[rule]
        if decay not in DECAYS:
            raise ValueError(f"decay {decay!r}: expected one of {', '.join(DECAYS)}")
        self.base_lr = base_lr
        self.target_lr = base_lr * factor
        self.warmup_steps = max(0, int(warmup_steps))
        self.decay = decay
        self.final_lr = self.target_lr * final_fraction
        # Steps the decay spans: from the end of the warm-up to the last step (at least one).
        self.decay_steps = max(1, int(total_steps or 1) - self.warmup_steps)
        self.step_every = max(1, int(step_every or self.decay_steps))
        self.gamma = gamma

    @classmethod
    def for_recipe(cls, recipe, size: int, steps_per_epoch: int, total_steps: int) -> "LRSchedule":
        """The recipe's schedule for ``size`` data-parallel copies (the rate scales with them) and
        ``steps_per_epoch`` optimizer steps an epoch at that size."""
        spec = recipe.lr_schedule
        return cls(recipe.optimizer.lr, size, spec.scale, round(spec.warmup_epochs * steps_per_epoch),
                   decay=spec.decay, total_steps=total_steps, final_fraction=spec.final_lr_fraction,
                   step_every=round(spec.step_every_epochs * steps_per_epoch), gamma=spec.step_gamma)

    def at(self, step: int) -> float:
        """Rate for optimizer step ``step`` (0-based)."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.base_lr + (self.target_lr - self.base_lr) * (step + 1) / self.warmup_steps
        t = step - self.warmup_steps  # steps since the warm-up ended
        if self.decay == "cosine":
            done = min(t, self.decay_steps) / self.decay_steps
            return self.final_lr + (self.target_lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * done))
        if self.decay == "linear":
            done = min(t, self.decay_steps) / self.decay_steps
            return self.target_lr - (self.target_lr - self.final_lr) * done
        if self.decay == "step":
            return self.target_lr * self.gamma ** (t // self.step_every)
        return self.target_lr
