"""The model a fine-tuning run trains, built the same way for the training loop and for the benchmarks."""

from __future__ import annotations

import torch

from lit_gpt.checkpoint import LORA_METHODS
from lit_gpt.config import Config
from lit_gpt.lora import LoRAConfig, add_lora
from lit_gpt.model import GPT
from lit_gpt.parallel import checkpoint_activations


def random_model(config: Config, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> GPT:
    """A randomly initialised model (HF's LLaMA init), for benchmarks and tests that need no real weights."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT(config)
    model.reset_parameters()
    return model.to(dtype)


def prepare_for_finetuning(model: GPT, finetuning: str, lora: LoRAConfig | None = None, quantize: str = "bnb.nf4",
                           compute_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                           activation_checkpointing: bool = False) -> GPT:
    """Turn a float model into what `finetuning` trains: every weight (full), LoRA adapters over a frozen base
    (lora), or adapters over a 4-bit base that bitsandbytes quantizes on `device` (qlora)."""
    if finetuning == "qlora":
        from lit_gpt.quantize import quantize_linears

        quantize_linears(model, quantize, compute_dtype, device)
    if finetuning in LORA_METHODS:
        add_lora(model, lora or LoRAConfig())
    elif model.lm_head is None:
        # Tied full fine-tuning: the embedding's share of the shared weight's gradient comes as the few rows its
        # tokens touch, added in place to the head's (vocab x dim) share, instead of a third (vocab x dim) tensor.
        # Untied, the embedding's gradient would become the weight's own and stay sparse, which AdamW refuses.
        model.transformer.wte.sparse = True
    if activation_checkpointing:
        checkpoint_activations(model)
    return model
