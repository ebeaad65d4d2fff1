"""DropBP on Hugging Face causal LMs, without forking `transformers`.

`apply_dropbp(model, drop_rate)` wraps the attention branch (`self_attn`) and the MLP branch (`mlp`) of every
decoder layer in a `DropBP` layer and returns a `DropBPHandler`. The residual adds stay where `transformers` has
them, inside the decoder layer's forward; only the branch modules' forwards are routed through DropBP:

* each branch module keeps its class, its attribute name and its parameters, so `state_dict()` names are
  unchanged (`save_pretrained`/`from_pretrained` and PEFT see the same model);
* the `DropBP` layer is registered as a parameter-free child named `dropbp` of the branch module, so the
  handler finds it and the state dict gains nothing;
* the norm before a branch (`input_layernorm`, `post_attention_layernorm`) stays outside it. When a branch is
  dropped it runs under `no_grad`, so the norm's output gets no gradient through that path either: the norm
  only learns through the branches that run with gradients, which is exactly the backward DropBP keeps.

PEFT LoRA adapters inside the branches work in either order: `apply_dropbp` before or after `get_peft_model`
(the branch's parameters are looked up when needed, not at wrapping time).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from dropbp.handler import DropBPHandler
from dropbp.layer import DropBP

__all__ = ["apply_dropbp", "branch_backward_flops", "find_decoder_layers"]


def find_decoder_layers(model: nn.Module, layers: str | None = None, attention: str = "self_attn",
                        mlp: str = "mlp") -> list[nn.Module]:
    """The decoder layers of `model`: the `nn.ModuleList` (at the dotted path `layers`, or the first one found)
    whose every element has an `attention` and an `mlp` submodule."""
    if layers is not None:
        found = model.get_submodule(layers)
        candidates = [found]
    else:
        candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    for candidate in candidates:
        items = list(candidate)
        if items and all(isinstance(getattr(x, attention, None), nn.Module)
                         and isinstance(getattr(x, mlp, None), nn.Module) for x in items):
            return items
    raise ValueError(
        f"apply_dropbp: no decoder layers with `{attention}` and `{mlp}` submodules found in "
        f"{type(model).__name__}. Pass `layers=` (dotted path of the nn.ModuleList of decoder layers, e.g. "
        f"'model.layers'), `attention=` and `mlp=` (the attribute names of the two residual branches in each layer)"
    )


def _wrap_branch(module: nn.Module, flops: float, kind: str) -> DropBP:
    """Route `module`'s forward through a DropBP layer registered as its child `dropbp`."""
    if isinstance(getattr(module, "dropbp", None), DropBP):
        raise ValueError(f"{type(module).__name__} already has a DropBP layer: apply_dropbp was called twice")
    original = module.forward  # the bound class method (or an earlier instance-level patch)
    extras: list[Any] = [None]

    def branch(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = original(*args, **kwargs)
        if isinstance(out, tuple):  # attention returns (output, weights): DropBP measures the output
            extras[0] = out[1:]
            return out[0]
        extras[0] = None
        return out

    layer = DropBP(branch, modules=(module,), flops=flops, kind=kind)  # kind: which FLOPs formula applies
    module.add_module("dropbp", layer)

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = layer(*args, **kwargs)
        rest, extras[0] = extras[0], None
        return out if rest is None else (out, *rest)

    module.forward = forward
    return layer


def _config_of(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):  # a PeftModel
        config = getattr(model.get_base_model(), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def branch_backward_flops(config: Any, seq_len: int, train_base: bool = True) -> tuple[float, float]:
    """Backward FLOPs per sequence of one attention branch and one MLP branch, from a HF config.

    Forward: attention 2·T·d·(q + 2kv) + 2·T·q·d (projections) + 2·T²·q (causal QKᵀ and AV); MLP 2·3·T·d·I.
    Backward: the input gradients (≈ the forward; twice the forward for the weight-free attention core), plus
    the weight gradients of the projections when the base weights train (not for LoRA, whose are negligible).
    """
    d = config.hidden_size
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // n_head
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    q, kv, T = n_head * head_dim, n_kv * head_dim, seq_len
    weight_grads = 2.0 if train_base else 1.0
    attn_linear = 2 * T * d * (q + 2 * kv) + 2 * T * q * d
    attn_core = 2 * T * T * q
    mlp_linear = 2 * 3 * T * d * config.intermediate_size
    return float(attn_linear * weight_grads + 2 * attn_core), float(mlp_linear * weight_grads)


def apply_dropbp(model: nn.Module, drop_rate: float = 0.5, seed: int = 0, lr_compensation: bool = False,
                 seq_len: int | None = None, train_base: bool | None = None, layers: str | None = None,
                 attention: str = "self_attn", mlp: str = "mlp", unbiased: bool = False) -> DropBPHandler:
    """Wrap every decoder layer's attention and MLP branch of a HF causal LM in DropBP; return the handler.

    Args:
        model: a `transformers` model (LLaMA, Mistral, Qwen2, ... any whose decoder layers have `self_attn` and
            `mlp`), or a PEFT model around one.
        drop_rate: the uniform starting drop rate of every branch (the target of later calibrations).
        seed: seed of the decision generator; use the same value on every rank.
        lr_compensation, unbiased: see `DropBPHandler`.
        seq_len: sequence length for the branch FLOPs; defaults to min(max_position_embeddings, 2048).
            `DropBPTrainer` updates them from the real batches at calibration time.
        train_base: whether the base weights train (weight gradients count in the FLOPs); default: whether any
            branch parameter outside LoRA adapters requires grad.
        layers, attention, mlp: for other architectures, the dotted path of the decoder-layer list and the
            attribute names of the two branches.
    """
    config = _config_of(model)
    decoder_layers = find_decoder_layers(model, layers, attention, mlp)
    if train_base is None:
        train_base = any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    flops = (1.0, 1.0)
    if config is not None and hasattr(config, "intermediate_size"):
        seq_len = seq_len or min(getattr(config, "max_position_embeddings", 2048) or 2048, 2048)
        flops = branch_backward_flops(config, seq_len, train_base)
    for layer in decoder_layers:
        _wrap_branch(getattr(layer, attention), flops[0], "attention")
        _wrap_branch(getattr(layer, mlp), flops[1], "mlp")
    handler = DropBPHandler(model, seed=seed, lr_compensation=lr_compensation, unbiased=unbiased)
    handler.set_initial_drop_rate(drop_rate)
    handler.target_drop_rate = drop_rate
    handler.hf_config = config
    return handler


def set_branch_flops_for(handler: DropBPHandler, seq_len: int, train_base: bool) -> None:
    """Recompute the per-branch FLOPs at `seq_len` (attention's share grows with T)."""
    config = getattr(handler, "hf_config", None)
    if config is None or not hasattr(config, "intermediate_size"):
        return
    attn, mlp = branch_backward_flops(config, seq_len, train_base)
    handler.set_branch_flops([attn if getattr(layer, "kind", "") == "attention" else mlp for layer in handler.layers])


def decoder_branch_modules(handler: DropBPHandler) -> Sequence[nn.Module]:
    """The wrapped branch modules, in the handler's order."""
    return [layer.branch_modules[0] for layer in handler.layers]
