"""The settings of one fine-tuning run, the checks of user input, and the command line of finetune/*.py."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lit_gpt.checkpoint import LORA_METHODS
from lit_gpt.lora import LoRAConfig
from lit_gpt.methods import DropBPArgs, MethodArgs, MethodName, check_method_args
from lit_gpt.utils import UserError, check_checkpoint_dir

Finetuning = Literal["full", "lora", "qlora"]


@dataclass
class TrainArgs:
    """Optimisation settings. Steps are optimizer steps (one global batch each), never micro-batches."""

    global_batch_size: int = 128
    """samples per optimizer step, over all devices (micro-batches accumulate to it)"""
    micro_batch_size: int = 2
    """samples per forward/backward pass on one device"""
    learning_rate: float = 3e-4
    """peak learning rate, reached after the warmup"""
    min_learning_rate: float = 0.0
    """the cosine schedule ends here"""
    warmup_steps: int = 100
    """optimizer steps of linear warmup from 0 to the learning rate"""
    max_steps: int | None = None
    """optimizer steps to train; default: `epochs` passes over the training set"""
    epochs: int = 1
    """passes over the training set when max_steps is not set"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    grad_clip: float | None = 1.0
    """max gradient norm; null turns clipping off"""
    max_seq_length: int | None = None
    """longer samples are truncated; default: the model's block_size"""
    length_grouped: bool = True
    """batch samples of similar length together, so micro-batches pad less"""
    chunked_loss: bool = True
    """compute the head and the cross-entropy in chunks of tokens, never holding the full logits (same loss and
    gradients); false: the full logits, as evaluation uses"""
    eval_interval: int = 100
    """optimizer steps between validations"""
    eval_iters: int | None = 100
    """validation micro-batches per evaluation; null: the whole test set"""
    save_interval: int | None = 1000
    """optimizer steps between checkpoints; null: only the final checkpoint"""
    log_interval: int = 1
    """optimizer steps between logged metrics"""
    sample_instruction: str = "Recommend a movie for me to watch during the weekend and explain the reason."
    """the instruction answered in a sample at each evaluation"""
    sample_tokens: int = 64
    """length of the sample generated at each evaluation; 0 turns it off"""


@dataclass
class RunArgs:
    """Everything one fine-tuning run needs; the CLI fills it from flags or a `--config` YAML."""

    finetuning: Finetuning
    checkpoint_dir: Path
    """the base model's folder (lit_model.pth, lit_config.json, tokenizer)"""
    data_dir: Path = Path("data/alpaca")
    """the prepared data: train.pt and test.pt from scripts/prepare_*.py"""
    out_dir: Path | None = None
    """where checkpoints and logs go; default: out/<finetuning>/<model name>"""
    precision: str | None = None
    """e.g. 32-true, bf16-true, bf16-mixed, 16-mixed; default: 32-true on CPU, bf16-true on CUDA"""
    accelerator: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when torch sees a GPU"""
    devices: int = 1
    """devices per node"""
    num_nodes: int = 1
    """machines in a multi-node run"""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """auto: ddp on several devices; fsdp shards the weights"""
    activation_checkpointing: bool = False
    """recompute each block's activations in backward instead of keeping them"""
    seed: int = 1337
    """seed of the weights' init, data order and drop decisions"""
    logger: str = "csv,tensorboard"
    """where metrics go, comma-separated: csv, tensorboard, wandb (pip install wandb; WANDB_MODE=offline works)"""
    resume: bool | Literal["auto"] | Path = False
    """true/auto: the latest checkpoint in out_dir; or a checkpoint folder; false starts fresh"""
    init_adapters: Path | None = None
    """LoRA/QLoRA: start from the adapters of this LoRA folder (a run's final/ or step-*/, or scripts/import_peft.py's
    output) instead of fresh ones; the optimizer, schedule and step start anew (--resume continues a run instead)"""
    train: TrainArgs = field(default_factory=TrainArgs)
    dropbp: DropBPArgs = field(default_factory=DropBPArgs)
    method: MethodArgs = field(default_factory=MethodArgs)  # --method and the baselines' flags
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    quantize: str | None = None
    """QLoRA: bnb.nf4, bnb.nf4-dq, bnb.fp4 or bnb.fp4-dq"""

    def hyperparameters(self) -> dict[str, Any]:
        values = asdict(self)
        if self.finetuning not in LORA_METHODS:
            values.pop("lora")
            values.pop("init_adapters")
        if self.finetuning != "qlora":
            values.pop("quantize")
        return json.loads(json.dumps(values, default=str))  # paths as strings, plain YAML

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def validate(args: RunArgs) -> None:
    """Fail on user mistakes before anything heavy is loaded."""
    t = args.train
    check_method_args(args.method, args.dropbp)
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise UserError("--train.micro_batch_size and --train.global_batch_size must be at least 1")
    if args.accelerator == "cuda" and not torch.cuda.is_available():
        raise UserError("--accelerator cuda was asked for, but torch sees no CUDA GPU: use --accelerator cpu")
    if args.devices < 1 or args.num_nodes < 1:
        raise UserError("--devices and --num_nodes must be at least 1")
    if t.global_batch_size % (t.micro_batch_size * args.world_size):
        raise UserError(f"--train.global_batch_size {t.global_batch_size} must be a multiple of micro_batch_size x "
                        f"devices x num_nodes = {t.micro_batch_size * args.world_size}")
    _check_strategy(args)
    if t.learning_rate <= 0 or t.warmup_steps < 0:
        raise UserError("--train.learning_rate must be positive and --train.warmup_steps non-negative")
    if args.finetuning == "qlora":
        from lit_gpt.quantize import check_quantize_mode

        check_quantize_mode(args.quantize or "")
    elif args.quantize:
        raise UserError("--quantize is for finetune/qlora.py; use that script to train over a 4-bit base")
    if args.init_adapters is not None and args.finetuning not in LORA_METHODS:
        raise UserError("--init_adapters starts LoRA or QLoRA from existing adapters; to fully fine-tune from them, "
                        "merge them first with scripts/merge_lora.py and pass the result as --checkpoint_dir")
    logger_names(args.logger)
    check_checkpoint_dir(args.checkpoint_dir)


LOGGERS = ("csv", "tensorboard", "wandb")


def logger_names(logger: str) -> list[str]:
    """`--logger csv,wandb` as ["csv", "wandb"]; an unknown name, or wandb not installed, is a `UserError`."""
    names = [n.strip() for n in str(logger).split(",") if n.strip()]
    unknown = [n for n in names if n not in LOGGERS]
    if unknown or not names:
        raise UserError(f"--logger {logger!r}: choose one or more of {', '.join(LOGGERS)}, comma-separated "
                        "(e.g. --logger csv,wandb)")
    if "wandb" in names:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError("--logger wandb needs the wandb package: pip install 'dropbp-gpt[wandb]' (or pip install "
                            "wandb), or pick --logger csv,tensorboard")
    return list(dict.fromkeys(names))


def _check_strategy(args: RunArgs) -> None:
    if args.finetuning == "qlora" and args.world_size > 1:
        raise UserError("QLoRA runs on one device: bitsandbytes' 4-bit weights cannot be sharded or replicated by "
                        "Lightning's DDP/FSDP here. Use --devices 1, or finetune/lora.py for several devices")
    if args.strategy == "fsdp" and args.finetuning == "qlora":
        raise UserError("QLoRA cannot run under --strategy fsdp: bitsandbytes' 4-bit weights cannot be sharded. "
                        "Use finetune/lora.py with --strategy fsdp, or QLoRA on one device")
    if args.strategy == "fsdp" and args.method.name == "greentrainer":
        raise UserError("--method greentrainer does not run under --strategy fsdp: its importance step copies and "
                        "compares whole weights and optimizer states. Use --strategy ddp or one device")


def resolve_max_seq_length(requested: int | None, block_size: int) -> int:
    if requested is None:
        return block_size
    if not 1 < requested <= block_size:
        raise UserError(f"--train.max_seq_length {requested} is above the model's block_size {block_size}: "
                        f"pass at most {block_size}")
    return requested


# ---------------------------------------------------------------------- command line
def build_parser(finetuning: Finetuning, **defaults: Any):
    """The flags of a finetune/*.py script, from the dataclasses above, plus `--config FILE.yaml`.

    DropBP flags sit at the top level (`--drop_rate 0.875`), as do `--method` and the baselines' flags
    (`--pld_theta`, `--gt_rho`, ...); optimisation under `--train.*`, LoRA under `--lora.*`.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # each field's """doc""" is its flag's help
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
        parser.add_argument("--quantize", type=str, default="bnb.nf4",
                            help="bnb.nf4, bnb.nf4-dq, bnb.fp4 or bnb.fp4-dq")
    parser.set_defaults(defaults)
    return parser


def parse_args(finetuning: Finetuning, argv: list[str] | None = None, **defaults: Any) -> RunArgs:
    values = build_parser(finetuning, **defaults).parse_args(argv).as_dict()
    values.pop("config", None)
    train = TrainArgs(**values.pop("train"))
    lora = LoRAConfig(**values.pop("lora")) if "lora" in values else LoRAConfig()
    dropbp = DropBPArgs(**{name: values.pop(name) for name in DropBPArgs.__dataclass_fields__})
    method_flags = {k: values.pop(k) for k in MethodArgs.__dataclass_fields__ if k != "name"}
    method = MethodArgs(values.pop("method"), **method_flags)
    paths = {k: Path(values[k]) for k in ("checkpoint_dir", "data_dir", "out_dir") if values[k] is not None}
    return RunArgs(finetuning=finetuning, train=train, dropbp=dropbp, method=method, lora=lora, **{**values, **paths})
