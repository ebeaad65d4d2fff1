"""The one training loop behind `finetune/full.py`, `finetune/lora.py` and `finetune/qlora.py`.

The scripts differ only in what is trainable (every weight, LoRA adapters, LoRA over a 4-bit base) and
in their defaults; everything else lives here: data, DropBP, the schedule, validation, logging,
checkpoints and resume.

A run writes into `out_dir`:
    hyperparameters.yaml        every setting of the run
    step-000100/                a checkpoint every `save_interval` optimizer steps (see `save_checkpoint`)
    final/                      the trained weights, config and hyperparameters
    drop_rates.json / .png      the per-branch drop rates (and sensitivities once calibrated)
    logs/csv, logs/tensorboard  metrics from Lightning's loggers
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from dropbp import DropBPHandler
from dropbp.flops import branch_flops
from lit_gpt.config import Config
from lit_gpt.checkpoint import LORA_METHODS, finetuned_folder, load_model, save_finetuned, save_hyperparameters
from lit_gpt.data import IGNORE_INDEX, collate, generate_prompt, load_split, micro_batches
from lit_gpt.lora import LoRAConfig, add_lora
from lit_gpt.methods import MethodArgs, MethodName, build_method, check_method_args, summary_line
from lit_gpt.methods.flops import current_training_flops, flop_counter
from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import UserError, check_checkpoint_dir, load_state_dict, num_parameters

Finetuning = Literal["full", "lora", "qlora"]
TRAINING_STATE_FILE = "training_state.pth"


@dataclass
class TrainArgs:
    """Optimisation settings. Steps are optimizer steps (one global batch each), never micro-batches."""

    global_batch_size: int = 128
    micro_batch_size: int = 2
    learning_rate: float = 3e-4
    min_learning_rate: float = 0.0  # the cosine schedule ends here
    warmup_steps: int = 100
    max_steps: int | None = None  # default: `epochs` passes over the training set
    epochs: int = 1
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max gradient norm; None turns clipping off
    max_seq_length: int | None = None  # longer samples are truncated; default: the model's block_size
    length_grouped: bool = True  # batch samples of similar length together, so micro-batches pad less
    eval_interval: int = 100
    eval_iters: int | None = 100  # validation micro-batches per evaluation; None: the whole test set
    save_interval: int | None = 1000  # None: only the final checkpoint
    log_interval: int = 1
    sample_instruction: str = "Recommend a movie for me to watch during the weekend and explain the reason."
    sample_tokens: int = 64  # length of the sample generated at each evaluation; 0 turns it off


@dataclass
class DropBPArgs:
    """How backward passes are dropped (see dropbp/). `drop_rate` 0 trains normally."""

    drop_rate: float = 0.0
    sensitivity: Literal["auto", "none", "grad", "gradnorm"] = "auto"  # auto: gradnorm for full, grad for LoRA
    sensitivity_at: float = 0.1  # calibrate after this fraction of the optimizer steps
    recalibrate_every: int | None = None  # optimizer steps between later recalibrations
    allocator: Literal["greedy", "flops"] = "greedy"
    calibration_batch_size: int | None = None  # samples in the calibration batch; default: micro_batch_size
    lr_compensation: bool = False  # each branch's learning rate times 1 / (1 - p_i), as the paper's library does


@dataclass
class RunArgs:
    """Everything one fine-tuning run needs; the CLI fills it from flags or a `--config` YAML."""

    finetuning: Finetuning
    checkpoint_dir: Path
    data_dir: Path = Path("data/alpaca")
    out_dir: Path | None = None  # default: out/<finetuning>/<model name>
    precision: str | None = None  # default: 32-true on CPU, bf16-true on CUDA
    accelerator: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when torch sees a GPU
    devices: int = 1  # per node
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"  # auto: ddp on several devices; fsdp shards the weights
    activation_checkpointing: bool = False  # recompute each block's activations in backward instead of keeping them
    seed: int = 1337
    resume: bool | Literal["auto"] | Path = False  # True/"auto": the latest checkpoint in out_dir
    train: TrainArgs = field(default_factory=TrainArgs)
    dropbp: DropBPArgs = field(default_factory=DropBPArgs)
    method: MethodArgs = field(default_factory=MethodArgs)  # --method and the baselines' flags
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    quantize: str | None = None  # QLoRA: bnb.nf4, bnb.nf4-dq, bnb.fp4 or bnb.fp4-dq

    def hyperparameters(self) -> dict[str, Any]:
        values = asdict(self)
        if self.finetuning not in LORA_METHODS:
            values.pop("lora")
        if self.finetuning != "qlora":
            values.pop("quantize")
        return json.loads(json.dumps(values, default=str))  # paths as strings, plain YAML


# ---------------------------------------------------------------------- checks of user input
def validate(args: RunArgs) -> None:
    """Fail on user mistakes before anything heavy is loaded."""
    t, d = args.train, args.dropbp
    if not 0.0 <= d.drop_rate < 1.0:
        raise UserError(f"--drop_rate must be in [0, 1), got {d.drop_rate}: 0 trains normally, 0.875 drops 7 of 8 "
                        "backward passes, and 1 would never train the blocks")
    check_method_args(args.method, d.drop_rate)
    if not 0.0 <= d.sensitivity_at < 1.0:
        raise UserError(f"--sensitivity_at is a fraction of the optimizer steps in [0, 1), got {d.sensitivity_at}")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise UserError("--train.micro_batch_size and --train.global_batch_size must be at least 1")
    if args.accelerator == "cuda" and not torch.cuda.is_available():
        raise UserError("--accelerator cuda was asked for, but torch sees no CUDA GPU: use --accelerator cpu")
    world_size = args.devices * args.num_nodes
    if args.devices < 1 or args.num_nodes < 1:
        raise UserError("--devices and --num_nodes must be at least 1")
    if t.global_batch_size % (t.micro_batch_size * world_size):
        raise UserError(f"--train.global_batch_size {t.global_batch_size} must be a multiple of micro_batch_size x "
                        f"devices x num_nodes = {t.micro_batch_size * world_size}")
    if args.finetuning == "qlora" and world_size > 1:
        raise UserError("QLoRA runs on one device: bitsandbytes' 4-bit weights cannot be sharded or replicated by "
                        "Lightning's DDP/FSDP here. Use --devices 1, or finetune/lora.py for several devices")
    if args.strategy == "fsdp" and args.finetuning == "qlora":
        raise UserError("QLoRA cannot run under --strategy fsdp: bitsandbytes' 4-bit weights cannot be sharded. "
                        "Use finetune/lora.py with --strategy fsdp, or QLoRA on one device")
    if args.strategy == "fsdp" and args.method.name == "greentrainer":
        raise UserError("--method greentrainer does not run under --strategy fsdp: its importance step copies and "
                        "compares whole weights and optimizer states. Use --strategy ddp or one device")
    if t.learning_rate <= 0 or t.warmup_steps < 0:
        raise UserError("--train.learning_rate must be positive and --train.warmup_steps non-negative")
    if args.finetuning == "qlora":
        from lit_gpt.quantize import check_quantize_mode

        check_quantize_mode(args.quantize or "")
    elif args.quantize:
        raise UserError("--quantize is for finetune/qlora.py; use that script to train over a 4-bit base")
    check_checkpoint_dir(args.checkpoint_dir)


def resolve_max_seq_length(requested: int | None, block_size: int) -> int:
    if requested is None:
        return block_size
    if not 1 < requested <= block_size:
        raise UserError(f"--train.max_seq_length {requested} is above the model's block_size {block_size}: "
                        f"pass at most {block_size}")
    return requested


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting token t+1 from position t, ignoring IGNORE_INDEX labels."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def cosine_lr(step: int, args: TrainArgs, max_steps: int) -> float:
    """Linear warmup for `warmup_steps`, then cosine decay to `min_learning_rate` at `max_steps`."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps))
    return args.min_learning_rate + 0.5 * (args.learning_rate - args.min_learning_rate) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------- data
class MicroBatchStream:
    """The i-th micro-batch of this rank, for any i: a pure function of (seed, i), so resume is exact.

    Every epoch is reshuffled from (seed, epoch); rank r takes micro-batches r, r + W, r + 2W, ... of it.
    """

    def __init__(self, dataset: list[dict], micro_batch_size: int, max_seq_length: int, seed: int,
                 length_grouped: bool, rank: int = 0, world_size: int = 1) -> None:
        self.dataset, self.micro_batch_size, self.max_seq_length = dataset, micro_batch_size, max_seq_length
        self.seed, self.length_grouped, self.rank, self.world_size = seed, length_grouped, rank, world_size
        self.lengths = [min(len(s["input_ids"]), max_seq_length) for s in dataset]
        self.per_epoch = math.ceil(len(dataset) / micro_batch_size) // world_size
        if self.per_epoch == 0:
            raise UserError(f"the training set has {len(dataset)} samples: too few for micro-batches of "
                            f"{micro_batch_size} on {world_size} devices")
        self._epoch, self._batches = -1, []

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = micro_batches(self.lengths, self.micro_batch_size, self.seed, epoch, self.length_grouped)
        indices = self._batches[position * self.world_size + self.rank]
        return collate([truncate(self.dataset[i], self.max_seq_length) for i in indices])


def truncate(sample: dict, max_seq_length: int) -> dict:
    return {k: v[:max_seq_length] for k, v in sample.items()}


# ---------------------------------------------------------------------- the run
class Trainer:
    """Holds the state of one run; `fit()` trains, validates, logs and checkpoints."""

    def __init__(self, args: RunArgs) -> None:
        validate(args)
        self.args = args
        self.out_dir = Path(args.out_dir or Path("out") / args.finetuning / Path(args.checkpoint_dir).name)
        block_size = Config.from_checkpoint(args.checkpoint_dir).block_size
        self.max_seq_length = resolve_max_seq_length(args.train.max_seq_length, block_size)
        self.train_set = load_split(args.data_dir, "train")
        self.test_set = load_split(args.data_dir, "test")
        self.fabric = self._fabric()
        self.model, self.handler = self._model()
        self.tokenizer = Tokenizer(args.checkpoint_dir) if args.train.sample_tokens else None  # for samples only
        world_size = self.fabric.world_size
        self.stream = MicroBatchStream(self.train_set, args.train.micro_batch_size, self.max_seq_length, args.seed,
                                       args.train.length_grouped, self.fabric.global_rank, world_size)
        self.accumulation = args.train.global_batch_size // (args.train.micro_batch_size * world_size)
        self.max_steps = args.train.max_steps or max(1, args.train.epochs * self.stream.per_epoch // self.accumulation)
        if self.sharded:  # FSDP replaces the parameters by their shards: the optimizer must be built afterwards
            self.model = self.fabric.setup_module(self.model)
            self.optimizer = self.fabric.setup_optimizers(self._optimizer())
        else:
            self.optimizer = self._optimizer()
            self.model, self.optimizer = self.fabric.setup(self.model, self.optimizer)
        self.step = 0  # optimizer steps done
        self.calibration_steps = self._calibration_steps()
        self.drop_rate_history: list[dict] = []
        self.method = build_method(self)  # --method: its hooks before each step, metrics and state
        self.flops: dict[str, float] = {}  # one micro-batch's FLOPs, measured and in theory, for the summary
        self.step_ms: list[float] = []
        self.step_flops: list[float] = []  # every step's FLOPs by the cost model, for the decisions it took
        self.val_loss: float | None = None
        self.train_seconds = 0.0  # training work so far (steps, calibration, method hooks), not validation or saving
        self.val_history: list[dict] = []  # one entry per validation: step, loss, train_seconds, train_flops

    # -------------------------------------------------------------- construction
    def _fabric(self):
        import lightning as L
        from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

        accelerator = self.args.accelerator
        if accelerator == "auto":
            accelerator = "cuda" if torch.cuda.is_available() else "cpu"
        # bf16 on a CPU runs far slower than fp32 (about 26x on this project's machines), so CPU runs default to fp32.
        self.precision = self.args.precision or ("bf16-true" if accelerator == "cuda" else "32-true")
        loggers = [CSVLogger(self.out_dir / "logs", name="csv"), TensorBoardLogger(self.out_dir / "logs", name="tensorboard")]
        fabric = L.Fabric(accelerator=accelerator, devices=self.args.devices,
                          num_nodes=self.args.num_nodes, strategy=self._strategy(), precision=self.precision,
                          loggers=loggers)
        fabric.launch()
        fabric.seed_everything(self.args.seed)  # LoRA's initialisation; DropBP keeps its own generator
        return fabric

    def _strategy(self):
        """FSDP for `--strategy fsdp`; Lightning's DDP for `--strategy ddp` or several devices; else one device.

        FSDP is PyTorch's FSDP2 (`fully_shard`) through Fabric's `ModelParallelStrategy`, which, unlike Fabric's
        `FSDPStrategy`, also runs on CPU (gloo). Every rank is one data-parallel shard (see `shard_model`).
        """
        from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy

        world_size = self.args.devices * self.args.num_nodes
        if self.args.strategy == "fsdp":
            return ModelParallelStrategy(shard_model, data_parallel_size=world_size, tensor_parallel_size=1)
        if self.args.strategy == "ddp" or world_size > 1:
            return DDPStrategy()
        return "auto"

    @property
    def sharded(self) -> bool:
        """True under FSDP: each rank holds a shard of every weight, gathered block by block as it runs."""
        from lightning.fabric.strategies import ModelParallelStrategy

        return isinstance(self.fabric.strategy, ModelParallelStrategy)

    @property
    def averages_gradients_itself(self) -> bool:
        """Under DDP, gradients are averaged once per optimizer step by `average_gradients`, not by DDP's hooks.

        DDP's hooks sync during the backward of the last micro-batch, so a step whose last micro-batch skips
        `backward()` (every trainable branch dropped) would never sync. The drop decisions are identical on
        every rank, so every rank holds gradients for the same tensors and one explicit all-reduce is safe.

        FSDP needs neither: every micro-batch that runs `backward()` reduce-scatters (averages) its gradients
        into the shards, where they accumulate, so a step ends averaged whichever micro-batches skipped it.
        """
        from lightning.fabric.strategies import DDPStrategy

        return isinstance(self.fabric.strategy, DDPStrategy) and self.fabric.world_size > 1

    def average_gradients(self, bucket_elements: int = 2**25) -> None:
        grads = [p.grad for p in fabric_module(self.model).parameters() if p.grad is not None]
        bucket: list[torch.Tensor] = []
        for i, grad in enumerate(grads):
            bucket.append(grad)
            if sum(g.numel() for g in bucket) >= bucket_elements or i == len(grads) - 1:
                flat = torch.cat([g.reshape(-1) for g in bucket])
                flat = self.fabric.all_reduce(flat, reduce_op="mean")
                for g, averaged in zip(bucket, flat.split([g.numel() for g in bucket])):
                    g.copy_(averaged.view_as(g))
                bucket = []

    def _model(self) -> tuple[GPT, DropBPHandler | None]:
        args = self.args
        model = load_model(args.checkpoint_dir)
        if args.finetuning == "qlora":
            from lit_gpt.quantize import quantize_linears

            compute_dtype = torch.bfloat16 if "bf16" in self.precision else torch.float32
            quantize_linears(model, args.quantize, compute_dtype, self.fabric.device)
        if args.finetuning in LORA_METHODS:
            add_lora(model, args.lora)
        if args.activation_checkpointing:
            checkpoint_activations(model)
        handler = None
        if args.dropbp.drop_rate > 0:
            handler = DropBPHandler(model, seed=args.seed, lr_compensation=args.dropbp.lr_compensation)
            handler.set_initial_drop_rate(args.dropbp.drop_rate)
        self.fabric.print(f"{num_parameters(model, requires_grad=True):,} trainable and "
                          f"{num_parameters(model, requires_grad=False):,} frozen parameters")
        return model, handler

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.args.train
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        if self.handler is not None:
            groups = self.handler.split_param_groups(groups)
        if self.args.finetuning == "qlora":
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay)
        return torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay)

    def _calibration_steps(self) -> set[int]:
        """The optimizer steps before which drop rates are recalibrated from sensitivity."""
        if self.handler is None or self.sensitivity_metric == "none":
            return set()
        first = int(self.args.dropbp.sensitivity_at * self.max_steps)
        every = self.args.dropbp.recalibrate_every
        return set(range(first, self.max_steps, every)) if every else {first}

    @property
    def sensitivity_metric(self) -> str:
        metric = self.args.dropbp.sensitivity
        if metric == "auto":  # as in the paper: gradient norms are the cheap metric for full fine-tuning
            return "gradnorm" if self.args.finetuning == "full" else "grad"
        return metric

    # -------------------------------------------------------------- training
    def fit(self) -> Path:
        args, fabric = self.args, self.fabric
        if args.resume:
            self.resume()
        elif fabric.global_rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if fabric.global_rank == 0:
            save_hyperparameters(args.hyperparameters(), self.out_dir)
        if self.handler is not None:
            self._set_branch_flops()
            if not self.drop_rate_history:
                self._record_drop_rates(calibration=None)
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
                self.method.before_step(self)
                if self.step in self.calibration_steps:
                    self.calibrate()
                metrics = self.train_step()
                self.train_seconds += time.perf_counter() - start
                self.step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['train_loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                     drop=f"{metrics['realised_drop_rate']:.2f}")
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
        weights = self.gathered_state_dict()  # under FSDP every rank takes part in gathering the shards
        if fabric.global_rank == 0:
            save_finetuned(fabric_module(self.model), final, args.hyperparameters(), state_dict=weights)
        fabric.print(f"saved the trained weights to {final}")
        return final

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `accumulation` micro-batches; each draws its own DropBP decisions."""
        start = time.perf_counter()
        lr = cosine_lr(self.step, self.args.train, self.max_steps)
        if self.handler is not None:
            self.handler.set_lr(self.optimizer, lr)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        loss_sum, tokens, dropped, flops, step_flops = 0.0, 0, 0.0, {}, 0.0
        for micro in range(self.accumulation):
            input_ids, labels = self.stream[self.step * self.accumulation + micro]
            input_ids, labels = input_ids.to(self.fabric.device), labels.to(self.fabric.device)
            is_accumulating = micro < self.accumulation - 1
            count_flops = micro == 0 and self.step == self.max_steps - 1  # one sample micro-batch for the summary
            # FSDP syncs in every backward (see `averages_gradients_itself`); DDP once per step, by itself.
            no_sync = nullcontext() if self.sharded else self.fabric.no_backward_sync(
                self.model, enabled=is_accumulating or self.averages_gradients_itself)
            with no_sync, flop_counter() if count_flops else nullcontext() as counter:
                loss = next_token_loss(self.model(input_ids), labels)
                if not torch.isfinite(loss):
                    raise UserError(self._non_finite_loss_message(loss.item()))
                if loss.requires_grad and (self.handler is None or not self.handler.detect_non_grad()):
                    self.fabric.backward(loss / self.accumulation)
            theory = self._theory_flops(input_ids)
            step_flops += theory
            if count_flops:
                flops = self.flops = {"flops_per_step_measured": float(counter.get_total_flops() * self.accumulation),
                                      "flops_per_step_theory": theory * self.accumulation}
            loss_sum += float(loss.detach())
            tokens += input_ids.numel()
            dropped += self.handler.realised_drop_rate if self.handler is not None else 0.0
        if self.averages_gradients_itself:
            self.average_gradients()
        if self.args.train.grad_clip is not None and any(p.grad is not None for p in self.model.parameters()):
            self.fabric.clip_gradients(self.model, self.optimizer, max_norm=self.args.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        if not flops:  # the counted step runs slower
            self.step_ms.append(1000 * seconds)
        self.step_flops.append(step_flops)
        return {"train_loss": loss_sum / self.accumulation, "learning_rate": lr, "tokens_per_s": tokens / seconds,
                "realised_drop_rate": dropped / self.accumulation, "step_seconds": seconds, "flops_theory": step_flops,
                **self.method.metrics(), **flops}

    def _theory_flops(self, input_ids: torch.Tensor) -> float:
        """FLOPs (per device) of the micro-batch that just ran, by the cost model, for the decisions it took."""
        forward, backward = current_training_flops(fabric_module(self.model), input_ids.size(1))
        return (forward + backward) * input_ids.size(0)

    def _non_finite_loss_message(self, loss: float) -> str:
        checkpoints = self.checkpoints(self.out_dir)
        kept = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was saved yet"
        return (f"the training loss became {loss} at optimizer step {self.step + 1}; {kept}. Lower "
                f"--train.learning_rate or check the data, then resume with --resume auto")

    # -------------------------------------------------------------- DropBP calibration
    def _set_branch_flops(self) -> None:
        """Allocation weighs branches by their real backward FLOPs at the mean training length."""
        mean_length = max(1, round(sum(self.stream.lengths) / len(self.stream.lengths)))
        method = "full" if self.args.finetuning == "full" else "lora"
        self.handler.set_branch_flops([b.backward for b in branch_flops(self.model.config, mean_length, method)])

    def calibration_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the calibration samples, which every rank draws alike from (seed, step)."""
        world_size, rank = self.fabric.world_size, self.fabric.global_rank
        size = max(self.args.dropbp.calibration_batch_size or self.args.train.micro_batch_size, world_size)
        generator = torch.Generator().manual_seed(self.args.seed + self.step)  # never the global RNG
        indices = torch.randperm(len(self.train_set), generator=generator)[:size].tolist()[rank::world_size]
        input_ids, labels = collate([truncate(self.train_set[i], self.max_seq_length) for i in indices])
        return input_ids.to(self.fabric.device), labels.to(self.fabric.device)

    def calibrate(self) -> None:
        """Measure every branch's sensitivity on the calibration batch and reallocate the drop rates.

        On several ranks, each rank runs its share of the batch and every parameter gradient the measurement
        takes is averaged over the ranks (`_gradients_averaged_over_ranks`): the norms are those of the whole
        batch's full gradients, as one process would measure them, and every rank allocates the same rates.
        """
        input_ids, labels = self.calibration_batch()
        model = fabric_module(self.model)  # past DDP's wrapper: calibration takes no backward() for it to sync

        def calibration_loss() -> torch.Tensor:
            loss = next_token_loss(model(input_ids), labels)
            if not torch.isfinite(loss):
                raise UserError(self._non_finite_loss_message(loss.item()))
            return loss

        def average_over_ranks(sensitivities: list[float]) -> list[float]:
            total = torch.tensor(sensitivities, dtype=torch.float64, device=self.fabric.device)
            return self.fabric.all_reduce(total, reduce_op="mean").tolist()

        with self._unsharded(), self._gradients_averaged_over_ranks():
            result = self.handler.sensitivity_based_drop_bp(
                calibration_loss, self.args.dropbp.drop_rate, metric=self.sensitivity_metric,
                allocator=self.args.dropbp.allocator, reduce=average_over_ranks,
            )
        self.fabric.print(f"step {self.step}: {result.summary()}")
        self._record_drop_rates(calibration=result)

    @contextmanager
    def _unsharded(self):
        """Under FSDP, hold every weight whole on every rank for the duration (no-op otherwise).

        Calibration differentiates the loss with `torch.autograd.grad` many times over one retained graph, so the
        gathered weights must stay gathered and the gradients must not be reduce-scattered: every FSDP unit is
        unsharded, with resharding and gradient sync off, and put back afterwards. `parameters()` then yields
        the whole weights, and the measurement sees full tensors, never shards.
        """
        if not self.sharded:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        root = fabric_module(self.model)
        units = [m for m in root.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.set_reshard_after_backward(False, recurse=False)
            unit.set_requires_gradient_sync(False, recurse=False)
        try:
            for unit in units:
                unit.unshard()
            yield
        finally:
            for unit in units:
                if unit is not root:  # FSDP keeps the root gathered from forward to backward by design
                    unit.set_reshard_after_forward(True, recurse=False)
                unit.set_reshard_after_backward(True, recurse=False)
                unit.set_requires_gradient_sync(True, recurse=False)
                unit.reshard()

    @contextmanager
    def _gradients_averaged_over_ranks(self):
        """Average over the ranks every gradient that autograd computes for a trainable parameter, meanwhile.

        Tensor hooks fire inside `torch.autograd.grad` too, in the same order on every rank (the graphs are
        identical: same model, same drop decisions), so each all-reduce meets its partners.
        """
        world_size = self.fabric.world_size
        if world_size == 1:
            yield
            return

        def average(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            torch.distributed.all_reduce(grad)
            return grad.div_(world_size)

        params = [p for p in fabric_module(self.model).parameters() if p.requires_grad]
        hooks = [p.register_hook(average) for p in params]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _record_drop_rates(self, calibration) -> None:
        entry = {"step": self.step, "target_drop_rate": self.args.dropbp.drop_rate,
                 "allocator": self.args.dropbp.allocator if calibration else "uniform",
                 "metric": calibration.metric if calibration else None,
                 "seconds": calibration.seconds if calibration else None,
                 "drop_rates": self.handler.drop_rates, "sensitivities": self.handler.sensitivities,
                 "backward_flops": self.handler.branch_flops}
        self.drop_rate_history.append(entry)
        if self.fabric.global_rank == 0:
            from lit_gpt.plots import plot_drop_rates
            from lit_gpt.utils import atomic_write_text

            atomic_write_text(self.out_dir / "drop_rates.json", json.dumps(self.drop_rate_history, indent=2))
            plot_drop_rates(entry, self.out_dir / "drop_rates.png")

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

    def sample_text(self) -> str:
        if not self.args.train.sample_tokens:
            return ""
        from lit_gpt.generate import generate_tokens

        prompt = generate_prompt({"instruction": self.args.train.sample_instruction, "input": ""})
        ids = self.tokenizer.encode(prompt, device=self.fabric.device)
        if len(ids) >= self.max_seq_length:
            return ""
        stop_ids = self.tokenizer.stop_ids
        tokens = list(generate_tokens(fabric_module(self.model), ids, self.args.train.sample_tokens, stop_ids=stop_ids))
        return self.tokenizer.decode([t for t in tokens if t not in stop_ids])

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write `out_dir/step-NNNNNN/` atomically: build it under a temporary name, then rename it.

        It holds the weights (adapters only for LoRA), config and hyperparameters, as in `final/`, plus
        `training_state.pth` with the optimizer, the DropBP handler, the step and the RNG states.
        """
        folder = self.out_dir / f"step-{self.step:06d}"
        partial = self.out_dir / f".{folder.name}.partial"
        weights = self.gathered_state_dict()  # under FSDP, the shards are gathered (on every rank) first
        optimizer_state = self.gathered_optimizer_state()
        if self.fabric.global_rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            save_finetuned(fabric_module(self.model), partial, self.args.hyperparameters(), state_dict=weights)
            torch.save(self.training_state(optimizer_state), partial / TRAINING_STATE_FILE)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(partial, folder)
        self.fabric.barrier()
        return folder

    def training_state(self, optimizer_state: dict | None = None) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "dropbp": self.handler.state_dict() if self.handler is not None else None,
            "drop_rate_history": self.drop_rate_history,
            "progress": {"train_seconds": self.train_seconds, "val_history": self.val_history,
                         "step_flops": self.step_flops},
            "method": self.method.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def gathered_state_dict(self, adapters_only: bool | None = None, everywhere: bool = False) -> dict | None:
        """Under FSDP, the whole weights gathered from the shards, on the CPU of rank 0; None otherwise.

        Every rank must call it under FSDP (each tensor is one all-gather); the other ranks get `{}`, or the same
        dict with `everywhere`. `adapters_only` (default: for LoRA runs) gathers only the adapters, as the
        checkpoints hold, so the frozen base is never gathered to be thrown away.
        """
        if not self.sharded:
            return None
        from torch.distributed.tensor import DTensor

        if adapters_only is None:
            adapters_only = self.args.finetuning in LORA_METHODS
        keep = everywhere or self.fabric.global_rank == 0
        gathered = {}
        for name, tensor in fabric_module(self.model).state_dict().items():
            if adapters_only and "lora_" not in name:
                continue
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            if keep:
                gathered[name] = tensor.detach().to("cpu", copy=True)
        return gathered

    def gathered_optimizer_state(self) -> dict | None:
        """Under FSDP, the optimizer's state dict with whole tensors, in the format one process writes; else None.

        Keyed by parameter index like `Optimizer.state_dict()`, so a checkpoint reads the same whether FSDP, DDP
        or one process wrote it. Every rank must call it under FSDP; ranks other than 0 get `{}`.
        """
        if not self.sharded:
            return None
        from torch.distributed.tensor import DTensor

        state = self.optimizer.optimizer.state_dict()
        gathered: dict[int, dict] = {}
        # The same parameters have state on every rank (they got gradients at the same steps), in the same order.
        for index, values in state["state"].items():
            entry = {}
            for key, value in values.items():
                if isinstance(value, DTensor):
                    value = value.full_tensor()
                entry[key] = value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
            gathered[index] = entry
        if self.fabric.global_rank != 0:
            return {}
        return {"state": gathered, "param_groups": state["param_groups"]}

    def _load_sharded_optimizer_state(self, state: dict) -> None:
        """Load a whole-tensor optimizer state dict into the sharded optimizer: each rank keeps its own shard.

        `Optimizer.load_state_dict` does the rest, as on one process, so a parameter without state in the
        checkpoint (no gradient yet: its branches were always dropped) still has none. The resume stays exact;
        `torch.distributed.checkpoint`'s `set_optimizer_state_dict` would first give every parameter a state by
        taking a zero step, and AdamW's step count would then differ.
        """
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for group in self.optimizer.optimizer.param_groups for p in group["params"]]
        sharded: dict[int, dict] = {}
        for index, values in state["state"].items():
            param = params[index]
            entry = {}
            for key, value in values.items():
                if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
                    # every rank read the whole tensor, so each slices out its shard: no communication
                    value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                              src_data_rank=None)
                entry[key] = value
            sharded[index] = entry
        self.optimizer.optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})

    def _load_weights(self, weights: dict[str, torch.Tensor]):
        """`load_state_dict(strict=False)` of whole tensors, slicing out this rank's shards under FSDP."""
        model = fabric_module(self.model)
        if self.sharded:
            from torch.distributed.tensor import DTensor, distribute_tensor

            current = model.state_dict()
            for name, value in weights.items():
                target = current.get(name)
                if isinstance(target, DTensor) and value.shape == target.shape:
                    weights[name] = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh,
                                                      target.placements, src_data_rank=None)
        return model.load_state_dict(weights, strict=False)

    @staticmethod
    def checkpoints(out_dir: Path) -> list[Path]:
        """Complete step checkpoints in `out_dir`, oldest first (partial ones have another name)."""
        return sorted(p for p in Path(out_dir).glob("step-*") if (p / TRAINING_STATE_FILE).is_file())

    def resume(self) -> None:
        resume = self.args.resume
        if resume is True or resume == "auto":
            found = self.checkpoints(self.out_dir)
            if not found:
                self.fabric.print(f"--resume: no checkpoint in {self.out_dir} yet, starting from scratch")
                return
            folder = found[-1]
        else:
            folder = finetuned_folder(resume)
            if not (folder / TRAINING_STATE_FILE).is_file():
                raise UserError(f"{folder} has no {TRAINING_STATE_FILE}: resume from a step-NNNNNN folder")
        weights = load_state_dict(folder / "lit_model.pth", mmap=False)
        missing, unexpected = self._load_weights(weights)
        if self.args.finetuning in LORA_METHODS:
            if unexpected or any("lora_" in k for k in missing):
                raise UserError(f"{folder} does not hold this run's LoRA adapters: check --lora.* against its "
                                "hyperparameters.yaml")
        elif missing or unexpected:
            raise UserError(f"{folder / 'lit_model.pth'} does not match this model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}): resume with the same --checkpoint_dir")
        state = torch.load(folder / TRAINING_STATE_FILE, map_location="cpu", weights_only=False)
        if self.sharded:
            self._load_sharded_optimizer_state(state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if (state["dropbp"] is None) != (self.handler is None):
            raise UserError(f"{folder} was saved with a different --drop_rate setting: resume with the same flags")
        if self.handler is not None:
            self.handler.load_state_dict(state["dropbp"])
        self.drop_rate_history = state["drop_rate_history"]
        progress = state.get("progress", {})  # absent in checkpoints written before it was kept
        self.train_seconds = progress.get("train_seconds", 0.0)
        self.val_history = progress.get("val_history", [])
        self.step_flops = progress.get("step_flops", [])
        if state.get("method") is not None:
            self.method.load_state_dict(state["method"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = state["step"]
        self.fabric.print(f"resumed from {folder} at optimizer step {self.step}")


def fabric_module(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside Fabric's wrapper."""
    return getattr(model, "module", model)


def shard_model(model: GPT, device_mesh) -> GPT:
    """FSDP2 (`fully_shard`): each `Block` is one unit, the root (embeddings, final norm, head) another.

    A unit's weights are gathered for its forward and again for its backward, and its gradients reduce-scattered
    (averaged) after its backward. Frozen and trainable weights may share a unit: only those with a gradient are
    reduce-scattered, and the optimizer only ever sees the trainable ones, so the frozen base of a LoRA model is
    sharded (a 1/W share per rank) but has no optimizer state. A branch that DropBP drops runs under `no_grad`,
    so its weights get no gradient and are left out of the reduce-scatter on every rank alike.
    """
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def checkpoint_activations(model: GPT) -> GPT:
    """Keep only each block's input in forward and recompute the block in backward (`--activation_checkpointing`).

    The block's own `forward` is wrapped, so parameter names, FSDP units and hooks stay as they are. A dropped
    branch runs under `no_grad` in the recomputation too: its flag is not redrawn until the next micro-batch.
    """
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    for block in model.transformer.h:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    return model


def finetune(args: RunArgs) -> Path:
    return Trainer(args).fit()


# ---------------------------------------------------------------------- CLI
def build_parser(finetuning: Finetuning, **defaults: Any):
    """The flags of a finetune/*.py script, from the dataclasses above, plus `--config FILE.yaml`.

    DropBP flags sit at the top level (`--drop_rate 0.875`), as do `--method` and the baselines' flags
    (`--pld_theta`, `--gt_rho`, ...); optimisation under `--train.*`, LoRA under `--lora.*`.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(description=f"{finetuning} fine-tuning with DropBP")
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of flags, e.g. configs/*.yaml")
    parser.add_class_arguments(RunArgs, skip={"finetuning", "train", "dropbp", "method", "lora", "quantize"})
    parser.add_class_arguments(DropBPArgs, nested_key=None)
    parser.add_argument("--method", type=MethodName, default="dropbp",
                        help="dropbp (with --drop_rate), pld (Progressive Layer Dropping), greentrainer, or none")
    parser.add_class_arguments(MethodArgs, nested_key=None, skip={"name"})
    parser.add_class_arguments(TrainArgs, nested_key="train")
    if finetuning in LORA_METHODS:
        parser.add_class_arguments(LoRAConfig, nested_key="lora")
    if finetuning == "qlora":
        parser.add_argument("--quantize", type=str, default="bnb.nf4", help="bnb.nf4, bnb.nf4-dq, bnb.fp4 or bnb.fp4-dq")
    parser.set_defaults(defaults)
    return parser


def parse_args(finetuning: Finetuning, argv: list[str] | None = None, **defaults: Any) -> RunArgs:
    values = build_parser(finetuning, **defaults).parse_args(argv).as_dict()
    values.pop("config", None)
    train = TrainArgs(**values.pop("train"))
    lora = LoRAConfig(**values.pop("lora")) if "lora" in values else LoRAConfig()
    dropbp = DropBPArgs(**{name: values.pop(name) for name in DropBPArgs.__dataclass_fields__})
    method = MethodArgs(values.pop("method"), **{k: values.pop(k) for k in MethodArgs.__dataclass_fields__ if k != "name"})
    paths = {k: Path(values[k]) for k in ("checkpoint_dir", "data_dir", "out_dir") if values[k] is not None}
    return RunArgs(finetuning=finetuning, train=train, dropbp=dropbp, method=method, lora=lora, **{**values, **paths})


def cli(finetuning: Finetuning, argv: list[str] | None = None, **defaults: Any) -> None:
    """Parse the command line and train; a mistake the user can fix ends with one `error: ...` line."""
    try:
        finetune(parse_args(finetuning, argv, **defaults))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
