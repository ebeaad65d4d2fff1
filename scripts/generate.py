"""Generate a completion for one prompt from a converted checkpoint."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from lit_gpt.checkpoint import load_model
from lit_gpt.generate import generate_tokens
from lit_gpt.prompts import check_prompt_style, recorded_prompt_style, render_instruction
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import UserError, check_checkpoint_dir, parse_dtype, run_cli


def format_prompt(tokenizer: Tokenizer, prompt: str, model_name: str, chat_template: bool | None) -> str:
    """Wrap the prompt in the tokenizer's chat template for instruct/chat models (or when forced)."""
    if chat_template is None:
        looks_like_chat_model = any(tag in model_name.lower() for tag in ("instruct", "chat"))
        chat_template = looks_like_chat_model and tokenizer.chat_template is not None
    if not chat_template:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)


def setup(
    checkpoint_dir: Path,
    prompt: str = "What food do llamas eat?",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 1234,
    chat_template: bool | None = None,
    prompt_style: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
) -> str:
    """Generate text from a converted checkpoint and print it.

    Args:
        checkpoint_dir: folder with lit_model.pth, lit_config.json and the tokenizer files.
        prompt: the text to continue (or the user message, for chat models).
        max_new_tokens: the most tokens to generate.
        temperature: sampling temperature; 0 picks the most likely token every time.
        top_k: sample only among the k most likely tokens.
        seed: seed of the sampling generator.
        chat_template: apply the tokenizer's chat template (true) or not (false); default: the prompt style.
        prompt_style: alpaca, chatml, llama2, plain or auto (the chat template); default: the style the checkpoint
            was fine-tuned with, else the chat template for instruct/chat models and the prompt as it is otherwise.
        device: cpu, cuda, or auto (cuda when available).
        dtype: float32, bfloat16 or float16; default: the checkpoint's dtype (bfloat16 on CPU is slow).
    """
    if max_new_tokens < 1:
        raise UserError("--max_new_tokens must be at least 1")
    if temperature < 0:
        raise UserError("--temperature must be 0 (greedy) or positive")
    check_checkpoint_dir(Path(checkpoint_dir))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = Tokenizer(checkpoint_dir)
    model = load_model(checkpoint_dir, device=device, dtype=parse_dtype(dtype))
    style = prompt_style or (recorded_prompt_style(checkpoint_dir) if chat_template is None else None)
    if style is not None:
        text = render_instruction(check_prompt_style(style), {"instruction": prompt}, tokenizer)
    else:
        text = format_prompt(tokenizer, prompt, model.config.name, chat_template)
    encoded = tokenizer.encode(text, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    stop_ids = tokenizer.stop_ids

    start = time.perf_counter()
    new_tokens = list(generate_tokens(model, encoded, max_new_tokens, temperature, top_k, stop_ids, generator))
    seconds = time.perf_counter() - start
    completion = tokenizer.decode([t for t in new_tokens if t not in stop_ids])
    print(completion)
    print(f"{len(new_tokens)} tokens in {seconds:.2f} s ({len(new_tokens) / seconds:.1f} tokens/s)", file=sys.stderr)
    return completion


if __name__ == "__main__":
    run_cli(setup)
