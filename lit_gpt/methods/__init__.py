"""The seeds' methods on one training loop: `--method {dropbp,pld,greentrainer,none}`.

- `dropbp`: drop backward passes of residual branches (`--drop_rate`, see dropbp/); the Trainer owns its handler.
- `pld`: Progressive Layer Dropping (`pld.py`), whole blocks skipped in forward and backward.
- `greentrainer`: GreenTrainer (`greentrainer.py`), only the tensors worth their backward FLOPs train.
- `none`: plain fine-tuning.

Every method's FLOPs are accounted the same way (`flops.py`): one micro-batch is counted with
`torch.utils.flop_counter.FlopCounterMode` and priced by the cost model, side by side.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Literal

from lit_gpt.methods.base import TrainingMethod
from lit_gpt.utils import UserError

MethodName = Literal["dropbp", "pld", "greentrainer", "none"]


@dataclass
class MethodArgs:
    """Which method trains (`--method`), and the baselines' settings (flags `--pld_theta`, `--gt_rho`, ...)."""

    name: MethodName = "dropbp"
    pld_theta: float = 0.5  # PLD: θ̄, the keep probability the schedule decays to (DeepSpeed's default)
    pld_gamma: float = 0.001  # PLD: γ, decay per optimizer step of θ(t) = (1 - θ̄)·exp(-γ·t) + θ̄
    gt_rho: float = 0.5  # GreenTrainer: FLOPs of a step, as a fraction of full fine-tuning's (the paper's GT-0.5)
    gt_interval: int = 1  # GreenTrainer: epochs between tensor selections


def check_method_args(method: MethodArgs, drop_rate: float) -> None:
    """Fail on user mistakes before anything heavy is loaded."""
    if method.name != "dropbp" and drop_rate > 0:
        raise UserError(f"--drop_rate {drop_rate} drops backward passes, which is --method dropbp: pass --drop_rate 0 "
                        f"with --method {method.name}")
    if not 0.0 < method.pld_theta <= 1.0 or method.pld_gamma < 0:
        raise UserError(f"--pld_theta must be in (0, 1] and --pld_gamma non-negative, got {method.pld_theta} and "
                        f"{method.pld_gamma}: 1 keeps every block, 0.5 keeps the last block half of the time")
    if not 0.0 < method.gt_rho <= 1.0:
        raise UserError(f"--gt_rho is a fraction of full fine-tuning's FLOPs in (0, 1], got {method.gt_rho}")
    if method.gt_interval < 1:
        raise UserError(f"--gt_interval counts epochs between selections and must be at least 1, got {method.gt_interval}")


def build_method(trainer) -> TrainingMethod:
    """The method object for a Trainer whose model and optimizer are set up."""
    from lit_gpt.training import fabric_module

    args, model = trainer.args.method, fabric_module(trainer.model)
    if args.name == "pld":
        from lit_gpt.methods.pld import ProgressiveLayerDrop

        return ProgressiveLayerDrop(model, args.pld_theta, args.pld_gamma, seed=trainer.args.seed)
    if args.name == "greentrainer":
        from lit_gpt.methods.greentrainer import GreenTrainer

        lengths = trainer.stream.lengths
        try:
            return GreenTrainer(model, args.gt_rho, args.gt_interval, seq_len=max(1, round(sum(lengths) / len(lengths))))
        except ValueError as e:
            raise UserError(f"--gt_rho: {e}") from None
    return TrainingMethod(args.name)


def summary_line(name: str, flops: dict[str, float], step_ms: list[float], step_flops: list[float],
                 val_loss: float | None) -> str:
    """One line for the end of a run: FLOPs per optimizer step measured and in theory, time, validation loss.

    `flops`: one counted micro-batch (FlopCounterMode) and the cost model's price for it, per step;
    `step_flops`: every step's price by the cost model, whose mean is what a stochastic method costs.
    """
    measured, theory = flops.get("flops_per_step_measured"), flops.get("flops_per_step_theory")
    parts = [f"method {name}"]
    if measured is not None and theory:
        parts.append(f"FLOPs/step measured {measured:.4g}, theory {theory:.4g} (measured/theory {measured / theory:.3f})")
    if step_flops:
        parts.append(f"mean theory over {len(step_flops)} steps {statistics.fmean(step_flops):.4g}")
    if step_ms:
        parts.append(f"{statistics.median(step_ms):.1f} ms/step (median of {len(step_ms)})")
    if val_loss is not None:
        parts.append(f"final val loss {val_loss:.4f}")
    return "summary: " + ", ".join(parts)


__all__ = ["MethodArgs", "MethodName", "TrainingMethod", "build_method", "check_method_args", "summary_line"]
