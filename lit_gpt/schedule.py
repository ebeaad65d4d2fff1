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


DROP_SCHEDULES = ("constant", "decay", "ramp")


def drop_rate_scale(schedule: str, step: int, max_steps: int) -> float:
    """The factor on every allocated DropBP rate at optimizer `step` (0-based) of `max_steps`.

    constant: 1 throughout. decay: 1 at the first step, falling linearly to 0 at the last one, so that the last
    steps backpropagate fully and the bias of dropping fades where the loss settles. ramp: the reverse, 0 to 1.
    Either schedule spends half the constant schedule's drops, so a run costs about the constant run at half the rate.
    """
    if schedule not in DROP_SCHEDULES:
        raise ValueError(f"unknown drop schedule {schedule!r}: choose {', '.join(DROP_SCHEDULES)}")
    if schedule == "constant" or max_steps < 2:
        return 1.0
    progress = min(1.0, max(0.0, step / (max_steps - 1)))
    return 1.0 - progress if schedule == "decay" else progress
