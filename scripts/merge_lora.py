"""Fold trained LoRA adapters into their base model and write a plain checkpoint folder.

The LoRA settings (r, alpha, which projections) and the base model's folder come from the
`hyperparameters.yaml` that fine-tuning saved next to the adapters: nothing is repeated by hand.
The output loads like any converted checkpoint (scripts/generate.py, eval/lm_eval_harness.py).
"""

from __future__ import annotations

from pathlib import Path

from lit_gpt.checkpoint import LORA_METHODS, finetuned_folder, load_finetuned, load_hyperparameters
from lit_gpt.lora import fold_lora
from lit_gpt.prompts import save_prompt_style
from lit_gpt.tokenizer import copy_tokenizer_files
from lit_gpt.utils import UserError, atomic_save, check_checkpoint_dir, parse_dtype, run_cli


def merge(lora_path: Path, out_dir: Path, checkpoint_dir: Path | None = None, dtype: str | None = None) -> Path:
    """Merge the adapters in `lora_path` into their base model.

    Args:
        lora_path: a checkpoint folder written by finetune/lora.py or qlora.py (e.g. out/lora/NAME/final).
        out_dir: where to write lit_model.pth, lit_config.json and the base model's tokenizer files.
        checkpoint_dir: the base model folder, if it moved since training (default: the one recorded).
        dtype: float32, bfloat16 or float16 for the merged weights (default: the base checkpoint's).
    """
    folder = finetuned_folder(lora_path)
    hyperparameters = load_hyperparameters(folder)
    if hyperparameters["finetuning"] not in LORA_METHODS:
        raise UserError(f"{folder} holds a full fine-tune, not LoRA adapters: it is a complete checkpoint already")
    base_dir = check_checkpoint_dir(Path(checkpoint_dir or hyperparameters["checkpoint_dir"]))
    model = fold_lora(load_finetuned(folder, checkpoint_dir=base_dir, dtype=parse_dtype(dtype), merge=True))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save(model.state_dict(), out_dir / "lit_model.pth")
    model.config.save(out_dir)
    copy_tokenizer_files(base_dir, out_dir)
    if hyperparameters.get("prompt_style"):  # generate.py and chat.py prompt the merged model as it was trained
        save_prompt_style(hyperparameters["prompt_style"], out_dir)
    print(f"merged {folder} into {base_dir} and wrote {out_dir}")
    return out_dir


if __name__ == "__main__":
    run_cli(merge)
