"""Learning-rate rule for data parallelism: scale with the world size, reached by a linear warm-up.

With p workers the global batch is p times larger, so the rate is scaled (linear: base·p, per
Goyal et al. 2017; sqrt: base·√p) and approached linearly from ``base`` over the warm-up, which
keeps the first, noisy steps stable.
"""

from __future__ import annotations

import math


class LRSchedule:
    def __init__(self, base_lr: float, size: int, rule: str = "linear", warmup_steps: int = 0) -> None:
        factor = {"linear": float(size), "sqrt": math.sqrt(size), "none": 1.0}[rule]
        self.base_lr = base_lr
        self.target_lr = base_lr * factor
        self.warmup_steps = max(0, int(warmup_steps))

    def at(self, step: int) -> float:
        """Rate for optimizer step ``step`` (0-based)."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.base_lr + (self.target_lr - self.base_lr) * (step + 1) / self.warmup_steps
        return self.target_lr
