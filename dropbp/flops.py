"""FLOPs per residual branch and per training step, for LLaMA-shaped configs.

Counts are per sequence of `seq_len` tokens, 2 FLOPs per multiply-add. A linear layer's backward
costs its forward again for the input gradient, and once more for the weight gradient when the
weight is trained. So full fine-tuning pays 2x the forward in the backward pass, while LoRA and
QLoRA (frozen base weights) pay 1x. The attention core (QK^T and AV) has no weights, but its
backward needs gradients for q, k and v: about 2x its forward in every method.

The config only needs the attributes n_embd, n_head, n_query_groups, head_size, intermediate_size,
n_layer and padded_vocab_size (a `lit_gpt.Config` has them all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Method = Literal["full", "lora", "qlora"]


@dataclass(frozen=True)
class BranchFlops:
    forward: float
    backward: float


def _linear_backward_factor(method: Method) -> int:
    """Backward cost of a linear layer in units of its forward: input grad, plus weight grad if trained."""
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"unknown fine-tuning method {method!r}: choose full, lora or qlora")
    return 2 if method == "full" else 1


def attention_flops(config, seq_len: int, method: Method) -> BranchFlops:
    qkv_rows = (config.n_head + 2 * config.n_query_groups) * config.head_size
    linear = 2 * seq_len * config.n_embd * (qkv_rows + config.n_head * config.head_size)
    core = 2 * seq_len**2 * config.n_head * config.head_size  # causal: half of the 4*T^2*d of QK^T and AV
    return BranchFlops(forward=linear + core, backward=linear * _linear_backward_factor(method) + 2 * core)


def mlp_flops(config, seq_len: int, method: Method) -> BranchFlops:
    linear = 2 * 3 * seq_len * config.n_embd * config.intermediate_size
    return BranchFlops(forward=linear, backward=linear * _linear_backward_factor(method))


def outside_blocks_flops(config, seq_len: int, method: Method) -> BranchFlops:
    """Embedding lookup, the head, and the softmax cross-entropy: never dropped."""
    head = 2 * seq_len * config.n_embd * config.padded_vocab_size
    loss = 4 * seq_len * config.padded_vocab_size  # max, exp, sum and log-softmax, roughly
    embedding_backward = seq_len * config.n_embd if method == "full" else 0  # scatter-add into the table
    # The head's input gradient is always needed to reach the blocks; its weight gradient only in full FT.
    return BranchFlops(forward=head + loss, backward=head * _linear_backward_factor(method) + loss + embedding_backward)


def branch_flops(config, seq_len: int, method: Method = "full") -> list[BranchFlops]:
    """FLOPs of every branch in model order: attention and MLP of block 0, then of block 1, ..."""
    return [f for _ in range(config.n_layer) for f in (attention_flops(config, seq_len, method), mlp_flops(config, seq_len, method))]


def step_flops(config, seq_len: int, method: Method = "full", drop_rates: list[float] | None = None) -> float:
    """Expected forward + backward FLOPs of one sequence when branch i skips its backward with rate p_i."""
    branches = branch_flops(config, seq_len, method)
    drop_rates = drop_rates if drop_rates is not None else [0.0] * len(branches)
    if len(drop_rates) != len(branches):
        raise ValueError(f"expected {len(branches)} drop rates, got {len(drop_rates)}")
    outside = outside_blocks_flops(config, seq_len, method)
    kept_backward = sum((1 - p) * b.backward for p, b in zip(drop_rates, branches))
    return outside.forward + outside.backward + sum(b.forward for b in branches) + kept_backward


def theoretical_saving(config, seq_len: int, method: Method, drop_rates: list[float] | float) -> float:
    """Fraction of the step's FLOPs that DropBP saves, embedding, head and loss included.

    For blocks alone this tends to the paper's 2p/3 (full) and p/2 (LoRA); the head, the loss and the
    attention core pull the real figure below that.
    """
    if isinstance(drop_rates, (int, float)):
        drop_rates = [float(drop_rates)] * (2 * config.n_layer)
    return 1 - step_flops(config, seq_len, method, drop_rates) / step_flops(config, seq_len, method)
