"""The one training loop behind `finetune/full.py`, `finetune/lora.py` and `finetune/qlora.py`.

The scripts differ only in what is trainable (every weight, LoRA adapters, LoRA over a 4-bit base) and in their
defaults. The loop reads like Lit-GPT's: schedule, micro-batches with gradient accumulation, optimizer step,
validation, checkpoints. Everything else is a component it calls: the loss (`loss.py`), the schedule
(`schedule.py`), the micro-batch stream (`stream.py`), data-parallel plumbing (`parallel.py`), checkpoints and
resume (`train_state.py`), the cost model (`flops.py`), and the method (`methods/`: DropBP, PLD, GreenTrainer).

A run writes into `out_dir`:
    hyperparameters.yaml        every setting of the run
    step-000100/                a checkpoint every `save_interval` optimizer steps (see `train_state.py`)
    final/                      the trained weights, config and hyperparameters
    drop_rates.json / .png      DropBP's per-branch drop rates (and sensitivities once calibrated)
    logs/csv, logs/tensorboard  metrics from Lightning's loggers (`--logger`; logs/wandb for wandb)
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from lit_gpt.args import Finetuning, RunArgs, logger_names, parse_args, resolve_max_seq_length, validate
from lit_gpt.build import prepare_for_finetuning
from lit_gpt.checkpoint import LORA_METHODS, load_initial_adapters, load_model, save_hyperparameters
from lit_gpt.config import Config
from lit_gpt.data import IGNORE_INDEX, collate, load_split, micro_batches, recorded_data_prompt_style
from lit_gpt.flops import CostModel, flop_counter
from lit_gpt.loss import NonFiniteLoss, forward_backward, next_token_loss
from lit_gpt.methods import RunContext, build_method, summary_line
from lit_gpt.parallel import (
    average_gradients,
    averages_gradients_itself,
    build_fabric,
    fabric_module,
    is_sharded,
    no_backward_sync,
    whole_model,
)
from lit_gpt.prompts import render_instruction
from lit_gpt.schedule import cosine_lr
from lit_gpt.stream import MicroBatchStream, truncate
from lit_gpt.train_state import (
    TRAINING_STATE_FILE,
    load_checkpoint,
    read_resume_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
    save_weights,
    step_checkpoints,
)
from lit_gpt.utils import UserError, num_parameters

__all__ = ["TRAINING_STATE_FILE", "RunArgs", "Trainer", "cli", "fabric_module", "finetune", "parse_args", "validate"]


class Trainer:
    """Holds the state of one run; `fit()` trains, validates, logs and checkpoints."""

    def __init__(self, args: RunArgs) -> None:
        validate(args)
        self.args, t = args, args.train
        self.out_dir = Path(args.out_dir or Path("out") / args.finetuning / Path(args.checkpoint_dir).name)
        block_size = Config.from_checkpoint(args.checkpoint_dir).block_size
        self.max_seq_length = resolve_max_seq_length(t.max_seq_length, block_size)
        self.train_set, self.test_set = load_split(args.data_dir, "train"), load_split(args.data_dir, "test")
        self.prompt_style = recorded_data_prompt_style(args.data_dir)  # the checkpoints carry it to generate/chat
        self.fabric = self._fabric()
        self.sharded = is_sharded(self.fabric)
        world_size, rank = self.fabric.world_size, self.fabric.global_rank
        self.stream = MicroBatchStream(self.train_set, t.micro_batch_size, self.max_seq_length, args.seed,
                                       t.length_grouped, rank, world_size)
        self.accumulation = t.global_batch_size // (t.micro_batch_size * world_size)
        self.max_steps = t.max_steps or max(1, t.epochs * self.stream.per_epoch // self.accumulation)
        model = self._model()
        self.method = build_method(args.method, args.dropbp, model, args.finetuning == "full", t.micro_batch_size,
                                   self.stream.mean_length, args.seed)
        if self.sharded:  # FSDP replaces the parameters by their shards: the optimizer must be built afterwards
            self.model = self.fabric.setup_module(model)
            self.optimizer = self.fabric.setup_optimizers(self._optimizer())
        else:
            self.optimizer = self._optimizer(model)
            self.model, self.optimizer = self.fabric.setup(model, self.optimizer)
        self.cost_model = CostModel(fabric_module(self.model))  # after sharding: it keys units by the parameters
        self.tokenizer = None
        if t.sample_tokens:  # for the samples printed at each validation only
            from lit_gpt.tokenizer import Tokenizer

            self.tokenizer = Tokenizer(args.checkpoint_dir)
        self.step = 0  # optimizer steps done
        self.flops: dict[str, float] = {}  # one micro-batch's FLOPs, measured and in theory, for the summary
        self.step_ms: list[float] = []
        self.step_flops: list[float] = []  # every step's FLOPs by the cost model, for the decisions it took
        self.val_loss: float | None = None
        self.train_seconds = 0.0  # training work so far (steps, calibration, method hooks), not validation or saving
        self.val_history: list[dict] = []  # one entry per validation: step, loss, train_seconds, train_flops
        self.run = self._run_context()

    # -------------------------------------------------------------- construction
    def _fabric(self):
        accelerator = self.args.accelerator
        if accelerator == "auto":
            accelerator = "cuda" if torch.cuda.is_available() else "cpu"
        # bf16 on a CPU runs far slower than fp32 (about 26x on this project's machines), so CPU runs default to fp32.
        self.precision = self.args.precision or ("bf16-true" if accelerator == "cuda" else "32-true")
        loggers = build_loggers(logger_names(self.args.logger), self.out_dir / "logs", self.out_dir.name)
        return build_fabric(accelerator, self.args.devices, self.args.num_nodes, self.args.strategy, self.precision,
                            loggers, self.args.seed)

    def _model(self):
        args = self.args
        model = load_model(args.checkpoint_dir)
        compute_dtype = torch.bfloat16 if "bf16" in self.precision else torch.float32
        prepare_for_finetuning(model, args.finetuning, args.lora, args.quantize or "bnb.nf4", compute_dtype,
                               self.fabric.device, args.activation_checkpointing)
        if args.init_adapters is not None:
            folder = load_initial_adapters(model, args.init_adapters, args.lora)
            self.fabric.print(f"adapters initialised from {folder}")
        self.fabric.print(f"{num_parameters(model, requires_grad=True):,} trainable and "
                          f"{num_parameters(model, requires_grad=False):,} frozen parameters")
        return model

    def _optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        t = self.args.train
        model = model if model is not None else self.model
        groups = self.method.param_groups([p for p in model.parameters() if p.requires_grad])
        if self.args.finetuning == "qlora":
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay)
        return torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay)

    def _run_context(self) -> RunContext:
        """The narrow view of this run that the method gets (see `RunContext`)."""
        fabric, t = self.fabric, self.args.train

        def calibration_batch(size: int, seed: int):
            input_ids, labels = self.stream.random_batch(size, seed)
            return input_ids.to(fabric.device), labels.to(fabric.device)

        def check_loss(loss: torch.Tensor) -> None:
            if not torch.isfinite(loss):
                raise UserError(self._non_finite_loss_message(loss.item()))

        return RunContext(
            model=fabric_module(self.model), optimizer=self.optimizer, max_steps=self.max_steps,
            accumulation=self.accumulation, micro_batches_per_epoch=self.stream.per_epoch, seed=self.args.seed,
            mean_seq_length=self.stream.mean_length, out_dir=self.out_dir, is_main=fabric.global_rank == 0,
            learning_rate=lambda step: cosine_lr(step, t.learning_rate, t.warmup_steps, self.max_steps,
                                                 t.min_learning_rate),
            run_micro_batches=lambda: self.micro_batches(), calibration_batch=calibration_batch,
            whole_model=lambda: whole_model(fabric, self.model),
            all_reduce_mean=lambda x: fabric.all_reduce(x.to(fabric.device), reduce_op="mean"),
            check_loss=check_loss, print=fabric.print, chunked_loss=t.chunked_loss,
        )

    # -------------------------------------------------------------- training
    def fit(self) -> Path:
        args, fabric = self.args, self.fabric
        if args.resume:
            self.resume()
        elif fabric.global_rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if fabric.global_rank == 0:
            save_hyperparameters(self.hyperparameters(), self.out_dir)
            for logger in fabric.loggers:
                if type(logger).__name__ == "WandbLogger":  # the run's settings beside its curves in W&B
                    logger.log_hyperparams(self.hyperparameters())
        self.run.step = self.step
        self.method.start(self.run)
        fabric.print(f"training for {self.max_steps} optimizer steps of {args.train.global_batch_size} samples "
                     f"({self.accumulation} micro-batches of {args.train.micro_batch_size} per device)")
        from tqdm import tqdm

        progress = tqdm(total=self.max_steps, initial=self.step, desc="fine-tuning", unit="step",
                        disable=fabric.global_rank != 0, dynamic_ncols=True)
        if self.step == 0:
            self.evaluate()  # the starting point of the validation curve
        saved_at = self.step if self.step else None
        try:
            while self.step < self.max_steps:
                start = time.perf_counter()
                self.run.step = self.step
                self.method.before_step(self.run)
                metrics = self.train_step()
                self.train_seconds += time.perf_counter() - start
                self.step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['train_loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                     **self.method.progress())
                if self.step % args.train.log_interval == 0:
                    fabric.log_dict(metrics, step=self.step)
                if self.step % args.train.eval_interval == 0 or self.step == self.max_steps:
                    self.evaluate()
                if args.train.save_interval and self.step % args.train.save_interval == 0:
                    self.save_checkpoint()
                    saved_at = self.step
        finally:
            progress.close()  # before any error message, so it starts on a line of its own
        for logger in fabric.loggers:
            logger.finalize("success")
        fabric.print(summary_line(args.method.name, self.flops, self.step_ms, self.step_flops, self.val_loss))
        if saved_at != self.step:
            self.save_checkpoint()
        final = self.out_dir / "final"
        save_weights(fabric, self.model, final, self.hyperparameters(), self.adapters_only)
        fabric.print(f"saved the trained weights to {final}")
        return final

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `accumulation` micro-batches; the method decides per micro-batch what drops."""
        start = time.perf_counter()
        lr = self.run.learning_rate(self.step)
        self.method.set_learning_rate(self.optimizer, lr)
        count_flops = self.step == self.max_steps - 1  # one sample micro-batch of the last step, for the summary
        loss_sum, tokens, step_flops = self.micro_batches(count_flops)
        if self.args.train.grad_clip is not None and any(p.grad is not None for p in self.model.parameters()):
            self.fabric.clip_gradients(self.model, self.optimizer, max_norm=self.args.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        if not count_flops:  # the counted step runs slower
            self.step_ms.append(1000 * seconds)
        self.step_flops.append(step_flops)
        return {"train_loss": loss_sum / self.accumulation, "learning_rate": lr, "tokens_per_s": tokens / seconds,
                "step_seconds": seconds, "flops_theory": step_flops, **self.method.metrics(),
                **(self.flops if count_flops else {})}

    def micro_batches(self, count_flops: bool = False) -> tuple[float, int, float]:
        """Forward and backward over this step's micro-batches, gradients accumulated and averaged over ranks.

        Returns the summed loss, the tokens seen and the FLOPs the cost model prices the step's decisions at.
        """
        loss_sum, tokens, step_flops = 0.0, 0, 0.0
        for micro in range(self.accumulation):
            input_ids, labels = self.stream[self.step * self.accumulation + micro]
            input_ids, labels = input_ids.to(self.fabric.device), labels.to(self.fabric.device)
            counted = count_flops and micro == 0
            with no_backward_sync(self.fabric, self.model, is_accumulating=micro < self.accumulation - 1):
                with flop_counter() if counted else nullcontext() as counter:
                    loss = self._forward_backward(input_ids, labels)
            forward, backward = self.cost_model.current(input_ids.size(1))
            step_flops += (forward + backward) * input_ids.size(0)
            if counted:
                self.flops = {"flops_per_step_measured": float(counter.get_total_flops() * self.accumulation),
                              "flops_per_step_theory": (forward + backward) * input_ids.size(0) * self.accumulation}
            self.method.after_micro_batch()
            loss_sum += float(loss)
            tokens += input_ids.numel()
        if averages_gradients_itself(self.fabric):
            average_gradients(self.fabric, fabric_module(self.model))
        return loss_sum, tokens, step_flops

    def _forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        try:
            return forward_backward(self.model, input_ids, labels, self.accumulation, self.fabric.backward,
                                    self.method.skip_backward, self.args.train.chunked_loss)
        except NonFiniteLoss as e:
            raise UserError(self._non_finite_loss_message(e.value)) from None

    def _non_finite_loss_message(self, loss: float) -> str:
        checkpoints = step_checkpoints(self.out_dir)
        kept = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was saved yet"
        return (f"the training loss became {loss} at optimizer step {self.step + 1}; {kept}. Lower "
                f"--train.learning_rate or check the data, then resume with --resume auto")

    # -------------------------------------------------------------- validation
    @torch.no_grad()
    def evaluate(self) -> float:
        model, fabric = self.model, self.fabric
        model.eval()
        loss_sum = torch.zeros((), device=fabric.device, dtype=torch.float64)
        count = torch.zeros((), device=fabric.device, dtype=torch.float64)
        batches = micro_batches([len(s["input_ids"]) for s in self.test_set], self.args.train.micro_batch_size,
                                seed=0, epoch=0, length_grouped=True)
        limit = self.args.train.eval_iters
        mine = batches[fabric.global_rank::fabric.world_size][:limit]
        # Under FSDP every forward gathers weights with the other ranks, so every rank runs as many forwards as
        # rank 0, which has the most; a rank with fewer batches repeats its first one and discards the result.
        forwards = len(batches[::fabric.world_size][:limit]) if self.sharded else len(mine)
        for n in range(forwards):
            indices = mine[n] if n < len(mine) else batches[0]
            input_ids, labels = collate([truncate(self.test_set[i], self.max_seq_length) for i in indices])
            labels = labels.to(fabric.device)
            losses = next_token_loss(model(input_ids.to(fabric.device)), labels, reduction="sum")
            if n < len(mine):
                loss_sum += losses
                count += (labels[:, 1:] != IGNORE_INDEX).sum()
        loss_sum, count = fabric.all_reduce(loss_sum, reduce_op="sum"), fabric.all_reduce(count, reduce_op="sum")
        val_loss = self.val_loss = float(loss_sum / count.clamp(min=1))
        metrics = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)), "train_seconds": self.train_seconds,
                   "train_flops": math.fsum(self.step_flops)}
        fabric.log_dict(metrics, step=self.step)
        self.val_history.append({"step": self.step, **metrics})
        sample = self.sample_text()
        fabric.print(f"\nstep {self.step}: val loss {val_loss:.4f}" + (f"\n{sample}" if sample else ""))
        model.train()
        return val_loss

    def hyperparameters(self) -> dict:
        """What every checkpoint's hyperparameters.yaml holds: the run's settings and the data's prompt style."""
        return {**self.args.hyperparameters(), "prompt_style": self.prompt_style}

    def sample_text(self) -> str:
        if not self.args.train.sample_tokens:
            return ""
        from lit_gpt.generate import generate_tokens

        prompt = render_instruction(self.prompt_style, {"instruction": self.args.train.sample_instruction},
                                    self.tokenizer)
        ids = self.tokenizer.encode(prompt, device=self.fabric.device)
        if len(ids) >= self.max_seq_length:
            return ""
        stop_ids = self.tokenizer.stop_ids
        tokens = list(generate_tokens(fabric_module(self.model), ids, self.args.train.sample_tokens, stop_ids=stop_ids))
        return self.tokenizer.decode([t for t in tokens if t not in stop_ids])

    # -------------------------------------------------------------- checkpoints
    @property
    def adapters_only(self) -> bool:
        return self.args.finetuning in LORA_METHODS

    def save_checkpoint(self) -> Path:
        """`out_dir/step-NNNNNN/`, written atomically (see `train_state.py`)."""
        state = {"step": self.step, "method": self.method.state_dict(), "rng": rng_state(),
                 "progress": {"train_seconds": self.train_seconds, "val_history": self.val_history,
                              "step_flops": self.step_flops}}
        return save_checkpoint(self.fabric, self.model, self.optimizer, self.out_dir / f"step-{self.step:06d}",
                               self.hyperparameters(), self.adapters_only, state)

    def resume(self) -> None:
        found = read_resume_checkpoint(self.args.resume, self.out_dir,
                                       warn=lambda line: self.fabric.print(line, file=sys.stderr))
        if found is None:
            self.fabric.print(f"--resume: no checkpoint in {self.out_dir} yet, starting from scratch")
            return
        folder, weights, state = found
        state = load_checkpoint(self.fabric, self.model, self.optimizer, folder, self.adapters_only,
                                read=(weights, state))
        self.method.load_state_dict(state["method"])
        progress = state.get("progress", {})  # absent in checkpoints written before it was kept
        self.train_seconds = progress.get("train_seconds", 0.0)
        self.val_history = progress.get("val_history", [])
        self.step_flops = progress.get("step_flops", [])
        restore_rng(state["rng"])
        self.step = state["step"]
        self.fabric.print(f"resumed from {folder} at optimizer step {self.step}")


def build_loggers(names: list[str], logs: Path, run_name: str) -> list:
    """Lightning's loggers for `--logger`: CSV in logs/csv, TensorBoard in logs/tensorboard, W&B in logs/wandb.

    W&B runs offline (nothing leaves the machine; `wandb sync` uploads later) when WANDB_MODE=offline is set.
    """
    loggers = []
    for name in names:
        if name == "csv":
            from lightning.fabric.loggers import CSVLogger

            loggers.append(CSVLogger(logs, name="csv"))
        elif name == "tensorboard":
            from lightning.fabric.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(logs, name="tensorboard"))
        elif name == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            logs.mkdir(parents=True, exist_ok=True)
            loggers.append(WandbLogger(project="dropbp-gpt", name=run_name, save_dir=str(logs)))
    return loggers


def finetune(args: RunArgs) -> Path:
    return Trainer(args).fit()


def cli(finetuning: Finetuning, argv: list[str] | None = None, **defaults: Any) -> None:
    """Parse the command line and train; a mistake the user can fix ends with one `error: ...` line."""
    try:
        finetune(parse_args(finetuning, argv, **defaults))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
