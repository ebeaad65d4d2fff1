"""What the training loop asks of a method: hooks, metrics and resumable state."""

from __future__ import annotations

from typing import Any


class TrainingMethod:
    """Plain training (`--method none`), and DropBP (`--method dropbp`), whose handler the Trainer owns.

    A method is told before every optimizer step (`before_step`), adds its own numbers to the step's
    metrics, and keeps whatever it needs for an exact resume in `state_dict`.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def before_step(self, trainer) -> None:
        """Called before optimizer step `trainer.step` (0-based) runs its micro-batches."""

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["name"] != self.name:
            from lit_gpt.utils import UserError

            raise UserError(f"the checkpoint was trained with --method {state['name']}: resume with the same --method")
