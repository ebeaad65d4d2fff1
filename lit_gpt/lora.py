"""LoRA: low-rank adapters on the linear layers of a frozen model (Hu et al. 2022).

`add_lora(model, LoRAConfig(...))` swaps the chosen linears for `LoRALinear`, which keeps the frozen base
layer (an `nn.Linear`, or a bitsandbytes 4-bit linear for QLoRA) and adds `scale * B(A(x))`, with B
zero-initialised so the model starts out unchanged. A base checkpoint still loads, because the base
weight's old name (`attn.attn.weight`) is mapped to its new one (`attn.attn.linear.weight`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class LoRAConfig:
    """Low-rank adapters: where they go and their size (`--lora.*`)."""

    r: int = 8
    """rank of the adapters"""
    alpha: float = 16.0
    """scale of the adapters' output is alpha / r"""
    dropout: float = 0.0
    """dropout on the adapters' input"""
    qkv: bool = True
    """adapters on the fused query/key/value projection"""
    projection: bool = True
    """adapters on the attention output projection"""
    mlp: bool = True
    """adapters on the MLP's fc_1, fc_2 and proj"""
    head: bool = True
    """an adapter on lm_head (untied models only)"""

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Module):
    def __init__(self, linear: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {r}")
        self.linear = linear
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = next(linear.parameters()).device
        self.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False
        self._register_load_state_dict_pre_hook(_base_weight_names)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.merged:
            return out
        low_rank = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T
        return out + (low_rank * self.scale).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (for inference or export); `unmerge` undoes it."""
        if not self.merged:
            _require_float_weight(self.linear).add_(self.delta_weight().to(self.linear.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            _require_float_weight(self.linear).sub_(self.delta_weight().to(self.linear.weight.dtype))
            self.merged = False


def _require_float_weight(linear: nn.Module) -> torch.Tensor:
    if not isinstance(linear, nn.Linear) or type(linear) is not nn.Linear:
        raise TypeError("merging needs a plain nn.Linear base; dequantize a 4-bit model before merging")
    return linear.weight


def _base_weight_names(state_dict, prefix, *args) -> None:
    """Accept base checkpoints: `x.weight` / `x.bias` load into `x.linear.weight` / `x.linear.bias`."""
    for kind in ("weight", "bias"):
        if prefix + kind in state_dict:
            state_dict[prefix + "linear." + kind] = state_dict.pop(prefix + kind)


def lora_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the linears that `config` switches on, in a `lit_gpt.GPT`."""
    suffixes = [s for s, on in (("attn.attn", config.qkv), ("attn.proj", config.projection)) if on]
    if config.mlp:
        suffixes += ["mlp.fc_1", "mlp.fc_2", "mlp.proj", "mlp.fc"]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(tuple(suffixes))]
    if config.head and isinstance(getattr(model, "lm_head", None), nn.Linear):
        names.append("lm_head")
    return names


def add_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Replace the targeted linears with LoRALinear in place, then train only the adapters."""
    for name in lora_targets(model, config):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), config.r, config.alpha, config.dropout))
    mark_only_lora_as_trainable(model)
    return model


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights: what a LoRA checkpoint needs to hold."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def merge_lora(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()


def fold_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put the plain linear back: a model without LoRA."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, m.linear)
    return model
