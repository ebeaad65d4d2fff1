"""Write trained LoRA adapters in PEFT format: `adapter_config.json` + `adapter_model.safetensors`.

The result loads with `peft.PeftModel.from_pretrained(hf_base_model, out_dir)` on the Hugging Face version of the
base model (scripts/convert_lit_checkpoint.py writes it); scripts/import_peft.py reads it back. Names map
through `lit_gpt.peft_format.LORA_MODULES`: `attn.proj` -> `o_proj`, `mlp.fc_1` -> `gate_proj`, `mlp.fc_2` ->
`up_proj`, `mlp.proj` -> `down_proj`. The fused query/key/value adapter splits exactly: its output rows are
grouped per query group (the q heads of group 0, k0, v0, the q heads of group 1, ...), so `lora_B` splits by rows
like the base weight, and `lora_A`, shared by the three, is copied to q_proj, k_proj and v_proj.
"""

from __future__ import annotations

import json
from pathlib import Path

from lit_gpt.checkpoint import LORA_METHODS, finetuned_folder, load_hyperparameters
from lit_gpt.config import Config
from lit_gpt.peft_format import to_peft
from lit_gpt.utils import UserError, load_state_dict, run_cli


def peft_config(hyperparameters: dict, state_dict: dict, base: str) -> dict:
    lora = hyperparameters["lora"]
    targets = sorted({k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in state_dict})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": int(lora["r"]), "lora_alpha": float(lora["alpha"]), "lora_dropout": float(lora.get("dropout", 0.0)),
            "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "use_rslora": False, "use_dora": False}


def export(lora_path: Path, out_dir: Path, base_model: str | None = None) -> Path:
    """Export the adapters in `lora_path` (a LoRA fine-tuning checkpoint folder, e.g. out/lora/NAME/final).

    Args:
        lora_path: the folder written by finetune/lora.py (lit_model.pth + hyperparameters.yaml).
        out_dir: where to write adapter_config.json and adapter_model.safetensors.
        base_model: `base_model_name_or_path` recorded in adapter_config.json (default: the base checkpoint dir).
    """
    from safetensors.torch import save_file

    folder = finetuned_folder(lora_path)
    hyperparameters = load_hyperparameters(folder)
    if hyperparameters["finetuning"] not in LORA_METHODS:
        raise UserError(f"{folder} holds a full fine-tune, not LoRA adapters")
    config = Config.from_file(folder / "lit_config.json")
    adapters = load_state_dict(folder / "lit_model.pth", mmap=False)
    state_dict = to_peft(adapters, config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    base = base_model or str(hyperparameters.get("checkpoint_dir", ""))
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_config(hyperparameters, state_dict, base), indent=2))
    print(f"wrote the PEFT adapters of {folder} to {out_dir}")
    return out_dir


if __name__ == "__main__":
    run_cli(export)
