"""DropBP as a training method: the handler, its calibration schedule, LR compensation, history and state.

Every micro-batch the handler draws which residual branches skip their backward pass (see `dropbp/`). At
`sensitivity_at` of the optimizer steps (and every `recalibrate_every` steps after, if set) the method measures
every branch's sensitivity on a calibration batch and reallocates the drop rates. Each allocation is recorded in
`drop_rates.json`, and the latest is drawn in `drop_rates.png`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from dropbp import DropBPHandler
from dropbp.allocation import ALLOCATORS, UnreachableTarget
from lit_gpt.flops import CostModel
from lit_gpt.loss import chunked_next_token_loss, next_token_loss
from lit_gpt.methods.base import RunContext, TrainingMethod
from lit_gpt.schedule import drop_rate_scale
from lit_gpt.utils import UserError


@dataclass
class DropBPArgs:
    """How backward passes are dropped (see dropbp/). `drop_rate` 0 trains normally."""

    drop_rate: float = 0.0
    """target fraction of residual branches whose backward pass is dropped; 0 trains normally"""
    sensitivity: Literal["auto", "none", "grad", "gradnorm"] = "auto"
    """metric that allocates per-branch drop rates; auto: gradnorm for full, grad for LoRA; none: uniform"""
    sensitivity_at: float = 0.1
    """calibrate after this fraction of the optimizer steps"""
    recalibrate_every: int | None = None
    """optimizer steps between later recalibrations; null: calibrate once"""
    allocator: Literal["greedy", "flops", "depth"] = "greedy"
    """greedy: the paper's steps of 0.1 to the least sensitive branch; flops: the convex, FLOPs-aware program;
    depth (experimental): rates falling linearly with depth from the start, no sensitivity, no calibration"""
    calibration_batch_size: int | None = None
    """samples in the calibration batch; default: micro_batch_size"""
    drop_branches: Literal["all", "attention", "mlp"] = "all"
    """experimental: only these branches drop, absorbing the whole --drop_rate (still a share of all branches'
    backward FLOPs)"""
    lr_compensation: bool = False
    """each branch's learning rate times 1 / (1 - p_i), as the paper's library does"""
    unbiased: bool = False
    """experimental: a kept branch's backward times 1 / (1 - p_i), with independent draws, so the expected
    gradient is the full one; not with --lr_compensation"""
    drop_mode: Literal["branch", "weights"] = "branch"
    """branch: a dropped branch skips its whole backward (the paper); weights (experimental, for full fine-tuning):
    it still passes the gradient down and skips only its own weight gradients, so the layers below get the exact
    gradient and the saving is about half the branch's backward; the rates are allocated over those savings"""
    drop_schedule: Literal["constant", "decay", "ramp"] = "constant"
    """experimental: the rates over training; decay: the allocated rates at the first step, falling linearly to 0
    at the last; ramp: 0 rising to them. Either drops half as much as constant over a run"""


def check_dropbp_args(args: DropBPArgs) -> None:
    """Fail on user mistakes before anything heavy is loaded."""
    if not 0.0 <= args.drop_rate < 1.0:
        raise UserError(f"--drop_rate must be in [0, 1), got {args.drop_rate}: 0 trains normally, 0.875 drops 7 of 8 "
                        "backward passes, and 1 would never train the blocks")
    if not 0.0 <= args.sensitivity_at < 1.0:
        raise UserError(f"--sensitivity_at is a fraction of the optimizer steps in [0, 1), got {args.sensitivity_at}")
    if args.allocator == "depth" and args.sensitivity not in ("auto", "none"):
        raise UserError(f"--allocator depth ignores sensitivities, so --sensitivity {args.sensitivity} would measure "
                        "for nothing: pass --sensitivity none (or auto)")
    if args.unbiased and args.lr_compensation:
        raise UserError("--unbiased true and --lr_compensation true both compensate for the dropped gradients: "
                        "pass only one")
    if args.unbiased and args.drop_mode == "weights":
        raise UserError("--unbiased true scales a kept branch's whole backward, which would bias the layers below "
                        "that --drop_mode weights keeps exact: pass only one")


class DropBP(TrainingMethod):
    """`--method dropbp` at a positive `--drop_rate`.

    Args:
        model: a model whose residual branches run through `dropbp.DropBP` layers (every `lit_gpt.GPT`).
        args: the DropBP flags.
        full_finetuning: picks the `auto` sensitivity metric: gradient norms, the cheap one, for full
            fine-tuning; whole gradients for LoRA and QLoRA, as in the paper.
        calibration_batch_size: samples in the calibration batch when `args` does not say.
        seed: seed of the decision generator and of the calibration batches; the same on every rank.
    """

    def __init__(self, model: nn.Module, args: DropBPArgs, full_finetuning: bool, calibration_batch_size: int,
                 seed: int) -> None:
        super().__init__("dropbp")
        self.args, self.seed = args, seed
        self.metric = args.sensitivity if args.sensitivity != "auto" else ("gradnorm" if full_finetuning else "grad")
        if args.allocator == "depth":  # its rates depend on depth and FLOPs alone: fixed at the start
            self.metric = "none"
        self.calibration_batch_size = args.calibration_batch_size or calibration_batch_size
        self.handler = DropBPHandler(model, seed=seed, lr_compensation=args.lr_compensation,
                                     unbiased=args.unbiased, drop_mode=args.drop_mode)
        self.handler.set_initial_drop_rate(args.drop_rate)  # replaced in `start`, once the FLOPs are known
        self.history: list[dict] = []  # every allocation: the uniform start, then each calibration
        self._realised: list[float] = []  # this step's micro-batches
        self._calibration_steps: set[int] = set()

    # -------------------------------------------------------------- optimizer and schedule
    def param_groups(self, params: list[nn.Parameter]) -> list[dict]:
        return self.handler.split_param_groups([{"params": params}])  # one group per branch, for compensation

    def set_learning_rate(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        self.handler.set_lr(optimizer, lr)

    def calibration_steps(self, max_steps: int) -> set[int]:
        """The optimizer steps before which the drop rates are recalibrated from sensitivity."""
        if self.metric == "none":
            return set()
        first, every = int(self.args.sensitivity_at * max_steps), self.args.recalibrate_every
        return set(range(first, max_steps, every)) if every else {first}

    # -------------------------------------------------------------- loop hooks
    def start(self, run: RunContext) -> None:
        # Allocation weighs branches by the backward FLOPs dropping them saves, at the mean training length. A branch
        # whose backward costs nothing (no adapter in it, nothing trainable below it) keeps 1 FLOP: allocators divide.
        costs = CostModel(run.model)
        flops = (costs.branch_weight_grad_flops if self.args.drop_mode == "weights"
                 else costs.branch_backward_flops)(run.mean_seq_length)
        self.handler.set_branch_flops([max(1.0, f) for f in flops])
        self._calibration_steps = self.calibration_steps(run.max_steps)
        if not self.history:  # a resumed run keeps its checkpointed rates
            self.allocate_start()
            self.record(run, calibration=None)

    def droppable(self) -> list[bool] | None:
        """Which branches `--drop_branches` lets drop (by the layers' `kind` labels); None: all."""
        if self.args.drop_branches == "all":
            return None
        return [layer.kind == self.args.drop_branches for layer in self.handler.layers]

    def allocate_start(self) -> None:
        """The starting rates: uniform over the droppable branches, or depth-shaped with `--allocator depth`.

        An unreachable target fails here, before training, also for the calibrations to come (their allocators
        cap each rate below 1).
        """
        args, droppable = self.args, self.droppable()
        try:
            self.handler.set_initial_drop_rate(args.drop_rate, droppable)
            if args.allocator == "depth":
                self.handler.allocate(args.drop_rate, "depth")
            elif self._calibration_steps:
                ones = [1.0] * len(self.handler.layers)
                ALLOCATORS[args.allocator](ones, self.handler.branch_flops, args.drop_rate, droppable=droppable)
        except UnreachableTarget as e:
            largest = math.floor(e.reachable * 1e4) / 1e4  # rounded down, so that it is reachable
            raise UserError(f"--drop_rate {args.drop_rate} is unreachable with --drop_branches {args.drop_branches} "
                            f"and --allocator {args.allocator}: the largest reachable target is {largest}") from None

    def before_step(self, run: RunContext) -> None:
        if run.step in self._calibration_steps:
            self.calibrate(run)
        self.handler.set_rate_scale(drop_rate_scale(self.args.drop_schedule, run.step, run.max_steps))

    def skip_backward(self) -> bool:
        return self.handler.detect_non_grad()

    def after_micro_batch(self) -> None:
        self._realised.append(self.handler.realised_drop_rate)

    def metrics(self) -> dict[str, float]:
        realised, self._realised = self._realised, []
        return {"realised_drop_rate": sum(realised) / max(1, len(realised))}

    def progress(self) -> dict[str, str]:
        return {"drop": f"{self.handler.realised_drop_rate:.2f}"}

    # -------------------------------------------------------------- calibration
    def calibrate(self, run: RunContext) -> None:
        """Measure every branch's sensitivity on the calibration batch and reallocate the drop rates.

        On several ranks, each rank runs its share of the batch and every parameter gradient the measurement
        takes is averaged over the ranks (`run.whole_model`): the norms are those of the whole batch's full
        gradients, as one process would measure them, and every rank allocates the same rates.

        The loss is the training loss: with `--train.chunked_loss` the head and the loss run a chunk at a time, in
        the variant that recomputes the chunks in every backward, because the measurement backpropagates the one
        forward many times.
        """
        input_ids, labels = run.calibration_batch(self.calibration_batch_size, self.seed + run.step)

        def average_over_ranks(sensitivities: list[float]) -> list[float]:
            return run.all_reduce_mean(torch.tensor(sensitivities, dtype=torch.float64)).tolist()

        with run.whole_model() as model:
            def calibration_loss() -> torch.Tensor:
                if run.chunked_loss:
                    hidden = model(input_ids, return_hidden=True)
                    loss = chunked_next_token_loss(model, hidden, labels, recompute=True)
                else:
                    loss = next_token_loss(model(input_ids), labels)
                run.check_loss(loss)
                return loss

            result = self.handler.sensitivity_based_drop_bp(
                calibration_loss, self.args.drop_rate, metric=self.metric, allocator=self.args.allocator,
                reduce=average_over_ranks,
            )
        run.print(f"step {run.step}: {result.summary()}")
        self.record(run, calibration=result)

    def record(self, run: RunContext, calibration) -> None:
        """Append the current allocation to the history, and write `drop_rates.json` and `drop_rates.png`."""
        entry = {"step": run.step, "target_drop_rate": self.args.drop_rate,
                 "allocator": self.args.allocator if calibration or self.args.allocator == "depth" else "uniform",
                 "drop_branches": self.args.drop_branches, "unbiased": self.args.unbiased,
                 "drop_mode": self.args.drop_mode, "drop_schedule": self.args.drop_schedule,
                 "metric": calibration.metric if calibration else None,
                 "seconds": calibration.seconds if calibration else None,
                 "drop_rates": self.handler.drop_rates, "sensitivities": self.handler.sensitivities,
                 "backward_flops": self.handler.branch_flops}
        self.history.append(entry)
        if run.is_main:
            from lit_gpt.plots import plot_drop_rates
            from lit_gpt.utils import atomic_write_text

            atomic_write_text(run.out_dir / "drop_rates.json", json.dumps(self.history, indent=2))
            plot_drop_rates(entry, run.out_dir / "drop_rates.png")

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "handler": self.handler.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["name"] == self.name and "handler" not in state:
            raise UserError("the checkpoint was saved with --drop_rate 0: resume with the same flags")
        saved_mode = state["handler"].get("drop_mode", "branch")
        if saved_mode != self.args.drop_mode:  # the branch costs were priced for the flag's mode in `start`
            raise UserError(f"the checkpoint was trained with --drop_mode {saved_mode}: resume with the same flag")
        super().load_state_dict(state)
        self.handler.load_state_dict(state["handler"])
        self.history = state["history"]
