"""The seeds' methods on one training loop: `--method {dropbp,pld,greentrainer,none}`.

- `dropbp`: drop backward passes of residual branches (`--drop_rate`, `dropbp.py` over the `dropbp/` library).
- `pld`: Progressive Layer Dropping (`pld.py`), whole blocks skipped in forward and backward.
- `greentrainer`: GreenTrainer (`greentrainer.py`), only the tensors worth their backward FLOPs train.
- `none`: plain fine-tuning.

Each is a `TrainingMethod` (`base.py`): the loop calls its hooks and gives it a narrow `RunContext`, never
itself. Every method's FLOPs are accounted the same way (`lit_gpt/flops.py`): one micro-batch is counted with
`torch.utils.flop_counter.FlopCounterMode` and priced by the cost model, side by side.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from lit_gpt.methods.base import RunContext, TrainingMethod
from lit_gpt.methods.dropbp import DropBPArgs, check_dropbp_args
from lit_gpt.utils import UserError

MethodName = Literal["dropbp", "pld", "greentrainer", "none"]


@dataclass
class MethodArgs:
    """Which method trains (`--method`), and the baselines' settings (flags `--pld_theta`, `--gt_rho`, ...)."""

    name: MethodName = "dropbp"
    """dropbp (with --drop_rate), pld (Progressive Layer Dropping), greentrainer, or none"""
    pld_theta: float = 0.5
    """PLD: the keep probability the schedule decays to (DeepSpeed's default 0.5)"""
    pld_gamma: float = 0.001
    """PLD: decay per optimizer step of theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar"""
    gt_rho: float = 0.5
    """GreenTrainer: FLOPs of a step, as a fraction of full fine-tuning's (the paper's GT-0.5)"""
    gt_interval: int = 1
    """GreenTrainer: epochs between tensor selections"""


def check_method_args(method: MethodArgs, dropbp: DropBPArgs) -> None:
    """Fail on user mistakes before anything heavy is loaded."""
    check_dropbp_args(dropbp)
    if method.name != "dropbp" and dropbp.drop_rate > 0:
        raise UserError(f"--drop_rate {dropbp.drop_rate} drops backward passes, which is --method dropbp: pass "
                        f"--drop_rate 0 with --method {method.name}")
    if not 0.0 < method.pld_theta <= 1.0 or method.pld_gamma < 0:
        raise UserError(f"--pld_theta must be in (0, 1] and --pld_gamma non-negative, got {method.pld_theta} and "
                        f"{method.pld_gamma}: 1 keeps every block, 0.5 keeps the last block half of the time")
    if not 0.0 < method.gt_rho <= 1.0:
        raise UserError(f"--gt_rho is a fraction of full fine-tuning's FLOPs in (0, 1], got {method.gt_rho}")
    if method.gt_interval < 1:
        raise UserError(f"--gt_interval counts epochs between selections and must be at least 1, "
                        f"got {method.gt_interval}")


def build_method(method: MethodArgs, dropbp: DropBPArgs, model: nn.Module, full_finetuning: bool,
                 micro_batch_size: int, mean_seq_length: int, seed: int) -> TrainingMethod:
    """The method object for `model` (unwrapped, with its trainable parameters set), before the optimizer exists."""
    if method.name == "dropbp" and dropbp.drop_rate > 0:
        from lit_gpt.methods.dropbp import DropBP

        return DropBP(model, dropbp, full_finetuning, calibration_batch_size=micro_batch_size, seed=seed)
    if method.name == "pld":
        from lit_gpt.methods.pld import ProgressiveLayerDrop

        return ProgressiveLayerDrop(model, method.pld_theta, method.pld_gamma, seed=seed)
    if method.name == "greentrainer":
        from lit_gpt.methods.greentrainer import GreenTrainer

        try:
            return GreenTrainer(model, method.gt_rho, method.gt_interval, seq_len=mean_seq_length)
        except ValueError as e:
            raise UserError(f"--gt_rho: {e}") from None
    return TrainingMethod(method.name)


def summary_line(name: str, flops: dict[str, float], step_ms: list[float], step_flops: list[float],
                 val_loss: float | None) -> str:
    """One line for the end of a run: FLOPs per optimizer step measured and in theory, time, validation loss.

    `flops`: one counted micro-batch (FlopCounterMode) and the cost model's price for it, per step;
    `step_flops`: every step's price by the cost model, whose mean is what a stochastic method costs.
    """
    measured, theory = flops.get("flops_per_step_measured"), flops.get("flops_per_step_theory")
    parts = [f"method {name}"]
    if measured is not None and theory:
        parts.append(f"FLOPs/step measured {measured:.4g}, theory {theory:.4g} "
                     f"(measured/theory {measured / theory:.3f})")
    if step_flops:
        parts.append(f"mean theory over {len(step_flops)} steps {statistics.fmean(step_flops):.4g}")
    if step_ms:
        parts.append(f"{statistics.median(step_ms):.1f} ms/step (median of {len(step_ms)})")
    if val_loss is not None:
        parts.append(f"final val loss {val_loss:.4f}")
    return "summary: " + ", ".join(parts)


__all__ = ["DropBPArgs", "MethodArgs", "MethodName", "RunContext", "TrainingMethod", "build_method",
           "check_method_args",
           "summary_line"]
