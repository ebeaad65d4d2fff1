"""Progressive Layer Dropping (Zhang & He, NeurIPS 2020), as DeepSpeed's `progressive_layer_drop` runs it.

Every optimizer step t sets a global keep probability θ(t) = (1 - θ̄)·exp(-γ·t) + θ̄, which falls from 1
towards θ̄. Block l of L (l = 1..L) is kept with probability 1 - (l/L)(1 - θ(t)), so deeper blocks are
dropped more often. A dropped block is the identity in forward and backward and is not computed at all; a
kept block's branch outputs are scaled by 1 / keep_prob so that the expected output is unchanged. Only
training forwards drop: evaluation runs every block, unscaled.

Decisions are drawn once per micro-batch from a generator seeded with (seed, micro-batch count), the same
discipline as DropBP: identical on every data-parallel rank, reproducible after a resume, and the global RNG
is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from dropbp.sampling import decision_generator
from lit_gpt.methods.base import RunContext, TrainingMethod


def pld_theta(step: int, theta_bar: float = 0.5, gamma: float = 0.001) -> float:
    """θ(t) = (1 - θ̄)·exp(-γ·t) + θ̄ at optimizer step t."""
    return (1.0 - theta_bar) * math.exp(-gamma * step) + theta_bar


def keep_probabilities(theta: float, n_layer: int) -> list[float]:
    """1 - (l/L)(1 - θ) for l = 1..L: the first block is nearly always kept, the last with probability θ."""
    return [1.0 - (l / n_layer) * (1.0 - theta) for l in range(1, n_layer + 1)]


def draw_keep(keep_probs: Sequence[float], generator: torch.Generator) -> list[bool]:
    """One independent Bernoulli draw per block, as DeepSpeed's PLD does."""
    u = torch.rand(len(keep_probs), generator=generator, dtype=torch.float64)
    return (u < torch.tensor(keep_probs, dtype=torch.float64)).tolist()


class ProgressiveLayerDrop(TrainingMethod):
    """Sets `keep` and `branch_scale` on the blocks of a `lit_gpt.GPT` before every forward.

    A forward pre-hook draws the decisions for training forwards and restores every block (kept, scale 1)
    for evaluation forwards, so `model.eval()` alone gives the full model.

    Args:
        model: a `lit_gpt.GPT` (its blocks have `keep` and `branch_scale`).
        theta_bar: θ̄, the keep probability the schedule decays to.
        gamma: γ, the decay rate per optimizer step.
        seed: seed of the decision generator; use the same value on every rank.
    """

    def __init__(self, model: nn.Module, theta_bar: float = 0.5, gamma: float = 0.001, seed: int = 0) -> None:
        super().__init__("pld")
        if not 0.0 < theta_bar <= 1.0:
            raise ValueError(f"θ̄ must lie in (0, 1], got {theta_bar}")
        self.blocks = list(model.transformer.h)
        self.theta_bar, self.gamma, self.seed = theta_bar, gamma, seed
        self.theta = 1.0
        self.draws = 0  # training forwards so far: the step of the decision generator
        self._kept_sum = 0.0
        self._hook = model.register_forward_pre_hook(self._before_forward)

    def set_step(self, step: int) -> None:
        self.theta = pld_theta(step, self.theta_bar, self.gamma)

    def before_step(self, run: RunContext) -> None:
        self.set_step(run.step)

    @property
    def keep_probs(self) -> list[float]:
        return keep_probabilities(self.theta, len(self.blocks))

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if module.training:
            self.draw()
        else:
            for block in self.blocks:
                block.keep, block.branch_scale = True, 1.0

    def set_theta(self, theta: float) -> None:
        """Hold the global keep probability at `theta` (e.g. θ̄, the end of the schedule) until the next `set_step`."""
        self.theta = theta

    def draw(self, step: int | None = None) -> list[bool]:
        """Decide which blocks the next micro-batch runs. Called automatically before training forwards.

        `step` replays the decision of that training forward (benchmarks repeat one draw); the next draw follows it.
        """
        if step is not None:
            self.draws = step
        probs = self.keep_probs
        keep = draw_keep(probs, decision_generator(self.seed, self.draws))
        for block, kept, p in zip(self.blocks, keep, probs):
            block.keep, block.branch_scale = kept, 1.0 / p
        self.draws += 1
        self._kept_sum += sum(keep) / len(keep)
        return keep

    def metrics(self) -> dict[str, float]:
        kept = [b.keep for b in self.blocks]
        return {"pld_theta": self.theta, "pld_kept_fraction": sum(kept) / len(kept),
                "pld_mean_kept_fraction": self._kept_sum / max(1, self.draws)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seed": self.seed, "draws": self.draws, "theta": self.theta,
                "kept_sum": self._kept_sum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seed, self.draws, self.theta = state["seed"], state["draws"], state["theta"]
        self._kept_sum = state["kept_sum"]

    def remove(self) -> None:
        """Detach the hook and restore every block: the model then never drops again."""
        self._hook.remove()
        for block in self.blocks:
            block.keep, block.branch_scale = True, 1.0
