"""Read a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) into a LoRA checkpoint folder.

The reverse of scripts/export_peft.py. The folder holds what finetune/lora.py's `final/` holds (the adapters in
`lit_model.pth`, `lit_config.json`, `hyperparameters.yaml` naming the base model and the LoRA settings, the base
model's tokenizer files), so `eval/lm_eval_harness.py --lora_path`, `scripts/merge_lora.py`, `generate.py` and
`chat.py` take it as they take a trained run. Names map through `lit_gpt.peft_format.LORA_MODULES`; q, k and v fuse
into lit_gpt's query/key/value adapter with the same update (see `lit_gpt/peft_format.py`). What lit_gpt's LoRA
cannot hold (LoRA on the embedding, per-module ranks, DoRA, trained biases, ...) ends with one `error:` line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lit_gpt.checkpoint import HYPERPARAMETERS_FILE, LORA_METHODS, load_hyperparameters, save_finetuned
from lit_gpt.config import Config
from lit_gpt.model import GPT
from lit_gpt.peft_format import from_peft, lora_hyperparameters
from lit_gpt.utils import (
    UserError,
    atomic_dir,
    check_checkpoint_dir,
    load_state_dict,
    load_torch_file,
    read_json_object,
    run_cli,
)

_HINT = "pass a folder written by PEFT's save_pretrained or scripts/export_peft.py"


def import_adapter(adapter_dir: Path, checkpoint_dir: Path, out_dir: Path) -> Path:
    """Write the PEFT adapter in `adapter_dir` as a LoRA checkpoint folder for `checkpoint_dir`.

    Args:
        adapter_dir: a PEFT adapter folder: adapter_config.json and adapter_model.safetensors (or .bin).
        checkpoint_dir: the converted base model the adapter was trained on (lit_model.pth + lit_config.json).
        out_dir: the LoRA folder to write (lit_model.pth, lit_config.json, hyperparameters.yaml, tokenizer files);
            an earlier LoRA folder there is replaced.
    """
    checkpoint_dir = check_checkpoint_dir(Path(checkpoint_dir))
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    _check_replaceable(out_dir, checkpoint_dir)
    config = Config.from_checkpoint(checkpoint_dir)
    adapter_config = read_json_object(adapter_dir / "adapter_config.json", _HINT)
    base_state = load_state_dict(checkpoint_dir / "lit_model.pth")  # memory-mapped: only what is compared is read
    adapters, lora = from_peft(read_adapter_weights(adapter_dir), adapter_config, config, base_state)
    with torch.device("meta"):
        model = GPT(config)  # save_finetuned reads only its config
    with atomic_dir(out_dir) as tmp:
        save_finetuned(model, tmp, lora_hyperparameters(lora, str(checkpoint_dir)), state_dict=adapters)
    print(f"wrote the PEFT adapter in {adapter_dir} as a LoRA folder (r {lora.r}, alpha {lora.alpha:g}) to {out_dir}")
    return out_dir


def read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    safetensors_file, bin_file = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if not safetensors_file.is_file() and bin_file.is_file():
        state = load_torch_file(bin_file, _HINT)
        if not isinstance(state, dict):
            raise UserError(f"{bin_file} holds no state dict: {_HINT}")
        return state
    if not safetensors_file.is_file():
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors: {_HINT}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(safetensors_file))
    except (SafetensorError, OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not read {safetensors_file}: it is truncated or corrupt ({reason}); {_HINT}") from None


def _check_replaceable(out_dir: Path, checkpoint_dir: Path) -> None:
    """Replace only an earlier LoRA folder: never the base checkpoint or a folder holding anything else."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    is_lora = (out_dir / HYPERPARAMETERS_FILE).is_file() and \
        load_hyperparameters(out_dir)["finetuning"] in LORA_METHODS
    if out_dir.resolve() == checkpoint_dir.resolve() or not is_lora:
        raise UserError(f"out_dir {str(out_dir)!r} already holds something other than a LoRA folder: pass a new "
                        "or empty folder")


if __name__ == "__main__":
    run_cli(import_adapter)
