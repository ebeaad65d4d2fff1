"""Write trained LoRA adapters in PEFT format: `adapter_config.json` + `adapter_model.safetensors`.

The result loads with `peft.PeftModel.from_pretrained(hf_base_model, out_dir)` on the Hugging Face version of the
base model (scripts/convert_lit_checkpoint.py writes it). Names map as the checkpoint conversion does:
`attn.proj` -> `o_proj`, `mlp.fc_1` -> `gate_proj`, `mlp.fc_2` -> `up_proj`, `mlp.proj` -> `down_proj`.
The fused query/key/value adapter splits exactly: its output rows are grouped per query group (the q heads of
group 0, k0, v0, the q heads of group 1, ...), so `lora_B` splits by rows like the base weight, and `lora_A`,
shared by the three, is copied to q_proj, k_proj and v_proj (B_q A, B_k A, B_v A are the fused update's blocks).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lit_gpt.checkpoint import LORA_METHODS, finetuned_folder, load_hyperparameters
from lit_gpt.config import Config
from lit_gpt.convert import split_qkv
from lit_gpt.utils import UserError, load_state_dict, run_cli

_LIT_TO_HF = {"attn.proj": "self_attn.o_proj", "mlp.fc_1": "mlp.gate_proj", "mlp.fc_2": "mlp.up_proj",
              "mlp.proj": "mlp.down_proj"}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_PREFIX = "base_model.model."


def peft_state_dict(adapters: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Lit LoRA tensors (`transformer.h.0.attn.attn.lora_A`, ...) as PEFT ones (`...q_proj.lora_A.weight`)."""
    out: dict[str, torch.Tensor] = {}
    for name, value in adapters.items():
        prefix, _, kind = name.rpartition(".")
        if kind not in ("lora_A", "lora_B"):
            raise UserError(f"unexpected tensor {name!r} in the LoRA checkpoint")
        if prefix == "lm_head":
            out[f"{_PREFIX}lm_head.{kind}.weight"] = value[: config.vocab_size] if kind == "lora_B" else value
            continue
        layer = re.match(r"transformer\.h\.(\d+)\.(.+)$", prefix)
        if layer is None:
            raise UserError(f"unexpected tensor {name!r} in the LoRA checkpoint")
        index, module = int(layer.group(1)), layer.group(2)
        base = f"{_PREFIX}model.layers.{index}."
        if module == "attn.attn":
            parts = split_qkv(value, config) if kind == "lora_B" else (value, value, value)
            for hf_module, part in zip(_QKV, parts):
                out[f"{base}{hf_module}.{kind}.weight"] = part
        elif module in _LIT_TO_HF:
            out[f"{base}{_LIT_TO_HF[module]}.{kind}.weight"] = value
        else:
            raise UserError(f"LoRA on {module!r} has no PEFT counterpart")
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def peft_config(hyperparameters: dict, state_dict: dict[str, torch.Tensor], base: str) -> dict:
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
    state_dict = peft_state_dict(adapters, config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    base = base_model or str(hyperparameters.get("checkpoint_dir", ""))
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_config(hyperparameters, state_dict, base), indent=2))
    print(f"wrote the PEFT adapters of {folder} to {out_dir}")
    return out_dir


if __name__ == "__main__":
    run_cli(export)
