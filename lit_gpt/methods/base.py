"""What the training loop asks of a method, and the narrow view of the run that a method gets in return."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lit_gpt.utils import UserError


@dataclass
class RunContext:
    """What a method may see of the run and do with it; the loop fills it in and keeps `step` current.

    Attributes:
        model: the user's module (unwrapped); under FSDP its weights are shards, see `whole_model`.
        optimizer: the run's optimizer.
        step: optimizer steps done so far; the step about to run is `step` (0-based).
        max_steps, accumulation, micro_batches_per_epoch: the run's length and shape, in this rank's micro-batches.
        seed: the run's seed, for generators that must draw alike on every rank.
        mean_seq_length: the mean training length in tokens, which costs are priced at.
        out_dir: where the run writes; only `is_main` (global rank 0) writes files.
        learning_rate: the schedule, a pure function of the step.
        run_micro_batches: forward and backward over the step's micro-batches, gradients accumulated and
            averaged over ranks exactly as a training step does; no optimizer step.
        calibration_batch: `(size, seed) -> (input_ids, labels)`, this rank's share of `size` random samples.
        whole_model: a context yielding the unwrapped model with whole weights and rank-averaged gradients.
        all_reduce_mean: averages a tensor over the ranks.
        check_loss: raises the run's "loss became NaN/inf" error for a non-finite loss.
        print: prints on rank 0 only.
        chunked_loss: whether the head and the loss run a chunk of tokens at a time (`--train.chunked_loss`).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    max_steps: int
    accumulation: int
    micro_batches_per_epoch: int
    seed: int
    mean_seq_length: int
    out_dir: Path
    is_main: bool
    learning_rate: Callable[[int], float]
    run_micro_batches: Callable[[], None]
    calibration_batch: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    whole_model: Callable[[], AbstractContextManager[nn.Module]]
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor]
    check_loss: Callable[[torch.Tensor], None]
    print: Callable[[str], None]
    chunked_loss: bool = True
    step: int = 0


class TrainingMethod:
    """Plain training (`--method none`, or `--method dropbp` at `--drop_rate 0`), and the base of every method.

    The loop calls, in order: `param_groups` once when it builds the optimizer; `start` once before the first
    step (after any resume); then every optimizer step `before_step`, `set_learning_rate`, and for every
    micro-batch `skip_backward` (before its backward) and `after_micro_batch`; `metrics` once per step.
    `state_dict` holds whatever an exact resume needs.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def param_groups(self, params: list[nn.Parameter]) -> list[dict]:
        return [{"params": params}]

    def set_learning_rate(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr

    def start(self, run: RunContext) -> None:
        """Called once before the first step of this process (fresh or resumed)."""

    def before_step(self, run: RunContext) -> None:
        """Called before optimizer step `run.step` (0-based) runs its micro-batches."""

    def skip_backward(self) -> bool:
        """True when this micro-batch's backward can reach no trainable parameter."""
        return False

    def after_micro_batch(self) -> None:
        """Called after each micro-batch's forward and backward."""

    def metrics(self) -> dict[str, float]:
        """This step's numbers for the logs (called once per step, after its micro-batches)."""
        return {}

    def progress(self) -> dict[str, str]:
        """A few of them for the progress bar."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["name"] != self.name:
            raise UserError(f"the checkpoint was trained with --method {state['name']}: resume with the same --method")
        if set(state) - set(self.state_dict()):
            raise UserError(f"the checkpoint holds --method {self.name} state that this run does not have (e.g. a "
                            "different --drop_rate setting): resume with the same flags")
