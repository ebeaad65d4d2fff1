"""`transformers.Trainer` (and TRL `SFTTrainer`) with DropBP.

A callback cannot skip `backward()`, so `DropBPTrainerMixin` overrides `training_step`:

* the handler's forward pre-hook draws the drop decisions of every micro-batch (training forwards only);
* `backward()` is skipped when no trainable parameter can get a gradient (`handler.detect_non_grad()`), e.g.
  LoRA with every adapter-holding branch dropped;
* at `sensitivity_at` of the optimizer steps (10 % by default; `None` disables) the drop rates are reallocated
  from each branch's sensitivity, measured on that step's first micro-batch, with the branch FLOPs at its
  sequence length;
* the DropBP state (handler, calibrations done, history) is written as `dropbp_state.pt` into every checkpoint
  folder and restored by `train(resume_from_checkpoint=...)`, so a resumed run draws the same decisions.

    from dropbp.integrations.transformers import apply_dropbp
    from dropbp.integrations.trainer import DropBPTrainer
    handler = apply_dropbp(model, drop_rate=0.5)
    trainer = DropBPTrainer(model=model, args=args, train_dataset=ds, dropbp_handler=handler)
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers

from dropbp.handler import DropBPHandler
from dropbp.integrations.transformers import set_branch_flops_for

__all__ = ["DropBPTrainerMixin", "DropBPTrainer", "STATE_NAME"]  # and DropBPSFTTrainer, built lazily

STATE_NAME = "dropbp_state.pt"


class DropBPTrainerMixin:
    """Mix in before a `transformers.Trainer` subclass: `class T(DropBPTrainerMixin, SomeTrainer)`.

    Args:
        dropbp_handler: the handler `apply_dropbp` returned.
        target_drop_rate: the drop rate calibrations allocate; default: the handler's starting rate.
        sensitivity_at: fraction of the optimizer steps at which to calibrate; `None` keeps uniform rates.
        sensitivity_metric: "grad", "gradnorm" or "auto" (gradnorm when base weights train, grad for adapters).
        allocator: "greedy" or another of `dropbp.allocation.ALLOCATORS`.
    """

    def __init__(self, *args: Any, dropbp_handler: DropBPHandler, target_drop_rate: float | None = None,
                 sensitivity_at: float | None = 0.1, sensitivity_metric: str = "auto", allocator: str = "greedy",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if sensitivity_at is not None and not 0.0 <= sensitivity_at < 1.0:
            raise ValueError(f"sensitivity_at is a fraction of the optimizer steps in [0, 1), got {sensitivity_at}")
        if dropbp_handler.drop_mode != "branch":  # calibration prices the branches' whole backward (see apply_dropbp)
            raise ValueError(f"DropBPTrainer supports drop_mode 'branch' only, got {dropbp_handler.drop_mode!r}")
        self.dropbp_handler = dropbp_handler
        self.dropbp_target = (target_drop_rate if target_drop_rate is not None
                              else getattr(dropbp_handler, "target_drop_rate", max(dropbp_handler.drop_rates)))
        self.dropbp_sensitivity_at = sensitivity_at
        self.dropbp_metric = sensitivity_metric
        self.dropbp_allocator = allocator
        self.dropbp_calibrated: list[int] = []  # optimizer steps calibrated at
        self.dropbp_history: list[dict] = []
        self.dropbp_skipped_backwards = 0
        self.dropbp_decisions: list[list[bool]] = []  # per micro-batch, this process's run (for inspection)

    # ------------------------------------------------------------------ training
    def _train_base(self) -> bool:
        return any(p.requires_grad for n, p in self.model.named_parameters() if "lora_" not in n)

    def _dropbp_calibration_step(self) -> int | None:
        if self.dropbp_sensitivity_at is None or not self.state.max_steps:
            return None
        return int(self.dropbp_sensitivity_at * self.state.max_steps)

    def _dropbp_calibrate(self, model: torch.nn.Module, inputs: dict[str, Any]) -> None:
        handler = self.dropbp_handler
        train_base = self._train_base()
        if "input_ids" in inputs:
            set_branch_flops_for(handler, int(inputs["input_ids"].shape[-1]), train_base)
        metric = self.dropbp_metric if self.dropbp_metric != "auto" else ("gradnorm" if train_base else "grad")

        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module  # autograd.grad without DDP's gradient reducer, which expects a backward()

        def loss_fn() -> torch.Tensor:
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs)

        def mean_over_ranks(sensitivities: list[float]) -> list[float]:
            # Every rank measures its own micro-batch; all must allocate the same rates to draw the same decisions.
            if self.accelerator.num_processes == 1:
                return sensitivities
            values = torch.tensor(sensitivities, dtype=torch.float64, device=self.args.device)
            return self.accelerator.reduce(values, reduction="mean").tolist()

        result = handler.sensitivity_based_drop_bp(loss_fn, self.dropbp_target, metric=metric,
                                                   allocator=self.dropbp_allocator, reduce=mean_over_ranks)
        self.dropbp_calibrated.append(self.state.global_step)
        self.dropbp_history.append({"step": self.state.global_step, "drop_rates": handler.drop_rates,
                                    "sensitivities": handler.sensitivities, "backward_flops": handler.branch_flops,
                                    "metric": result.metric, "seconds": result.seconds})

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        calibration_step = self._dropbp_calibration_step()
        if calibration_step is not None and self.state.global_step == calibration_step \
                and calibration_step not in self.dropbp_calibrated:
            model.train()
            self._dropbp_calibrate(model, self._prepare_inputs(inputs))
        handler = self.dropbp_handler
        accelerator = self.accelerator
        skipped = [False]
        original_backward = accelerator.backward

        def backward(loss: torch.Tensor, **kwargs: Any) -> None:
            # Called after the forward, so the decisions of this micro-batch are drawn.
            if handler.detect_non_grad():
                skipped[0] = True
                return
            original_backward(loss, **kwargs)

        accelerator.backward = backward
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            del accelerator.backward  # back to the class method
        self.dropbp_decisions.append(handler.dropped)
        self.dropbp_skipped_backwards += skipped[0]
        return loss

    # ------------------------------------------------------------------ state
    def dropbp_state_dict(self) -> dict[str, Any]:
        return {"handler": self.dropbp_handler.state_dict(), "calibrated": list(self.dropbp_calibrated),
                "history": list(self.dropbp_history), "target_drop_rate": self.dropbp_target}

    def dropbp_load_state_dict(self, state: dict[str, Any]) -> None:
        self.dropbp_handler.load_state_dict(state["handler"])
        self.dropbp_calibrated = list(state["calibrated"])
        self.dropbp_history = list(state["history"])
        self.dropbp_target = state["target_drop_rate"]

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(folder):
            torch.save(self.dropbp_state_dict(), os.path.join(folder, STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # Called on every resume path (plain, DeepSpeed, FSDP), after the model is loaded.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{checkpoint} has no {STATE_NAME}: it was not saved by a DropBP trainer")
        self.dropbp_load_state_dict(torch.load(path, weights_only=False))


class DropBPTrainer(DropBPTrainerMixin, transformers.Trainer):
    """`transformers.Trainer` with DropBP; see `DropBPTrainerMixin`."""


def __getattr__(name: str) -> Any:
    if name == "DropBPSFTTrainer":  # built on first use: trl is optional
        from trl import SFTTrainer

        cls = type("DropBPSFTTrainer", (DropBPTrainerMixin, SFTTrainer),
                   {"__doc__": "TRL `SFTTrainer` with DropBP; see `DropBPTrainerMixin`.", "__module__": __name__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
