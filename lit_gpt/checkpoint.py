"""Loading converted checkpoint folders (`lit_model.pth` + `lit_config.json`)."""

from __future__ import annotations

from pathlib import Path

import torch

from lit_gpt.config import Config
from lit_gpt.model import GPT
from lit_gpt.utils import UserError, check_checkpoint_dir, load_state_dict


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Build the model on the meta device and assign the memory-mapped weights: no second copy in RAM."""
    checkpoint_dir = check_checkpoint_dir(Path(checkpoint_dir))
    config = Config.from_checkpoint(checkpoint_dir)
    state_dict = load_state_dict(checkpoint_dir / "lit_model.pth")
    with torch.device("meta"):
        model = GPT(config)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(
            f"{checkpoint_dir / 'lit_model.pth'} does not match lit_config.json ({str(e).splitlines()[0]}); "
            "convert it again"
        ) from None
    return model.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------- fine-tuned checkpoints
# A fine-tuning checkpoint is a folder holding
#   lit_model.pth           the trained weights: the whole model (method "full") or only the LoRA
#                           adapters (methods "lora" and "qlora")
#   lit_config.json         the model config, so a full fine-tune loads like any converted checkpoint
#   hyperparameters.yaml    every setting of the run, including `finetuning` (full, lora or qlora),
#                           `checkpoint_dir` (the base model) and, for LoRA, `lora` (r, alpha, ...): nobody has
#                           to repeat them
#   tokenizer files         copied from `checkpoint_dir`, so every script reads the folder directly
HYPERPARAMETERS_FILE = "hyperparameters.yaml"
LORA_METHODS = ("lora", "qlora")


def save_hyperparameters(hyperparameters: dict, folder: str | Path) -> Path:
    import yaml

    from lit_gpt.utils import atomic_write_text

    return atomic_write_text(Path(folder) / HYPERPARAMETERS_FILE, yaml.safe_dump(hyperparameters, sort_keys=False))


def load_hyperparameters(folder: str | Path) -> dict:
    from lit_gpt.utils import read_yaml_mapping

    path = Path(folder) / HYPERPARAMETERS_FILE
    if not path.is_file():
        raise UserError(f"{str(folder)!r} has no {HYPERPARAMETERS_FILE}: pass a folder written by finetune/*.py")
    hint = "pass a folder written by finetune/*.py, or restore the file from the run's out_dir"
    values = read_yaml_mapping(path, hint)
    if values.get("finetuning") not in ("full", *LORA_METHODS):
        raise UserError(f"{path} names no finetuning method (full, lora or qlora): {hint}")
    if values["finetuning"] in LORA_METHODS and not isinstance(values.get("lora"), dict):
        raise UserError(f"{path} lacks the LoRA run's `lora` settings (r, alpha, ...): {hint}")
    return values


def save_finetuned(model: GPT, folder: str | Path, hyperparameters: dict, state_dict: dict | None = None) -> Path:
    """Write weights (adapters only for LoRA methods), config, hyperparameters and the base model's tokenizer files.

    `state_dict` replaces `model.state_dict()` where this process does not hold the whole weights (FSDP
    gathers them first); LoRA methods keep only its adapters, as always.
    """
    from lit_gpt.utils import atomic_save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lora = hyperparameters["finetuning"] in LORA_METHODS
    weights = model.state_dict() if state_dict is None else state_dict
    atomic_save({k: v for k, v in weights.items() if "lora_" in k} if lora else weights, folder / "lit_model.pth")
    model.config.save(folder)
    save_hyperparameters(hyperparameters, folder)
    base_dir = hyperparameters.get("checkpoint_dir")
    if base_dir and Path(base_dir).is_dir():
        from lit_gpt.tokenizer import copy_tokenizer_files

        copy_tokenizer_files(base_dir, folder)
    return folder


def finetuned_folder(path: str | Path) -> Path:
    """Accept a checkpoint folder or the `lit_model.pth` inside it."""
    path = Path(path)
    folder = path.parent if path.name.endswith(".pth") else path
    if not (folder / "lit_model.pth").is_file():
        raise UserError(f"{str(folder)!r} has no lit_model.pth: pass a checkpoint folder written by finetune/*.py")
    return folder


def load_finetuned(path: str | Path, checkpoint_dir: str | Path | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, merge: bool = True) -> GPT:
    """Load the output of finetune/*.py: a full model, or the base model plus its LoRA adapters.

    `checkpoint_dir` overrides the base model folder recorded in the hyperparameters (for LoRA runs whose
    base moved). LoRA adapters are merged into the base weights unless `merge=False`.
    """
    from lit_gpt.lora import LoRAConfig, add_lora, merge_lora

    folder = finetuned_folder(path)
    hyperparameters = load_hyperparameters(folder)
    if hyperparameters["finetuning"] not in LORA_METHODS:
        return load_model(folder, device=device, dtype=dtype)
    model = load_model(checkpoint_dir or hyperparameters["checkpoint_dir"], device=device, dtype=dtype)
    add_lora(model, LoRAConfig(**hyperparameters["lora"]))
    _copy_adapters(model, folder)
    if merge:
        merge_lora(model)
    return model.to(device=device, dtype=dtype)


# The LoRA settings that decide the adapters' shapes and their update; dropout only matters while training.
_ADAPTER_SHAPE = ("r", "alpha", "qkv", "projection", "mlp", "head")


def load_initial_adapters(model: GPT, path: str | Path, lora) -> Path:
    """Copy the adapters of a LoRA folder (a finished run, a step checkpoint, or `scripts/import_peft.py`'s output)
    into `model`, which already has adapters of the run's LoRA settings `lora`: a fresh run that starts from them.

    The folder's base model and LoRA settings must be the run's, or it ends with one `error:` line that names the
    flags to pass. Returns the folder.
    """
    folder = finetuned_folder(path)
    hyperparameters = load_hyperparameters(folder)
    if hyperparameters["finetuning"] not in LORA_METHODS:
        raise UserError(f"--init_adapters {str(folder)!r} holds a full fine-tuning run, not adapters: pass it as "
                        f"--checkpoint_dir instead")
    saved = hyperparameters["lora"]
    differing = [name for name in _ADAPTER_SHAPE if saved.get(name) != getattr(lora, name)]
    if differing:
        flags = " ".join(f"--lora.{name} {str(saved.get(name)).lower()}" for name in differing)
        raise UserError(f"the adapters in {str(folder)!r} were made with other LoRA settings than this run's: "
                        f"pass {flags}")
    if Config.from_checkpoint(folder) != model.config:
        raise UserError(f"the adapters in {str(folder)!r} belong to another base model than --checkpoint_dir: pass "
                        f"--checkpoint_dir {hyperparameters.get('checkpoint_dir')}")
    _copy_adapters(model, folder)
    return folder


def _copy_adapters(model: GPT, folder: Path) -> None:
    adapters = load_state_dict(folder / "lit_model.pth", mmap=False)
    missing, unexpected = model.load_state_dict(adapters, strict=False)
    missing_adapters = [k for k in missing if "lora_" in k]
    if missing_adapters or unexpected:
        raise UserError(f"{folder / 'lit_model.pth'} does not match the LoRA settings in {HYPERPARAMETERS_FILE} "
                        f"(missing {missing_adapters[:3]}, unexpected {unexpected[:3]})")
