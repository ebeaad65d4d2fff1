"""The learning-rate schedule: a pure function of the optimizer step, which is what makes a resume exact."""

from __future__ import annotations

import math


def cosine_lr(step: int, learning_rate: float, warmup_steps: int, max_steps: int, min_learning_rate: float = 0.0
              ) -> float:
    """Linear warmup for `warmup_steps`, then cosine decay to `min_learning_rate` at `max_steps`."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_learning_rate + 0.5 * (learning_rate - min_learning_rate) * (1 + math.cos(math.pi * progress))
