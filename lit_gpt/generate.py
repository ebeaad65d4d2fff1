"""Autoregressive sampling with the KV cache."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from lit_gpt.model import GPT


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of `logits` (B, vocab); temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_tokens(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    stop_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield new token ids for the 1-D `prompt`, stopping after a stop id (which is yielded) or the limit.

    The prompt is processed in one forward pass; each new token then costs one cached step.
    """
    prompt_length = prompt.size(0)
    total_length = min(prompt_length + max_new_tokens, model.config.block_size)
    if prompt_length >= total_length:
        raise ValueError(f"the prompt has {prompt_length} tokens; the model's block_size is {model.config.block_size}")
    stop_ids = set(stop_ids)
    was_training = model.training
    model.eval()
    model.set_kv_cache(batch_size=1, max_seq_length=total_length, device=prompt.device)
    try:
        input_pos = torch.arange(prompt_length, device=prompt.device)
        logits = model(prompt.unsqueeze(0), input_pos)[:, -1]
        for position in range(prompt_length, total_length):
            token = sample(logits, temperature, top_k, generator)
            yield int(token)
            if int(token) in stop_ids or position + 1 == total_length:
                return
            logits = model(token.view(1, 1), input_pos=torch.tensor([position], device=prompt.device))[:, -1]
    finally:
        model.clear_kv_cache()
        model.train(was_training)
