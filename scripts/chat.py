"""Chat with a checkpoint in the terminal: tokens stream as they are generated, with the KV cache.

    python scripts/chat.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Type a message and press Enter. `/reset` starts a new conversation, `/quit` (or Ctrl-D) ends. With a chat
template (the tokenizer's, or the chatml/llama2 prompt style) the whole conversation is the prompt of each turn,
the oldest turns dropped when it outgrows the model's block_size; in the alpaca style each message is answered on
its own. The style is the one the checkpoint was fine-tuned with unless `--prompt_style` says otherwise. The
checkpoint may be converted, fully fine-tuned, or a LoRA folder from finetune/*.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import torch

from lit_gpt.checkpoint import HYPERPARAMETERS_FILE, LORA_METHODS, load_finetuned, load_hyperparameters, load_model
from lit_gpt.generate import generate_tokens
from lit_gpt.model import GPT
from lit_gpt.prompts import check_prompt_style, recorded_prompt_style, render_messages, resolve_prompt_style
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import UserError, check_checkpoint_dir, parse_dtype, run_cli

COMMANDS = "/reset starts a new conversation, /quit ends"


def render(tokenizer: Tokenizer, messages: list[dict], style: str) -> str:
    """The prompt of the conversation so far in `style` (alpaca answers the last message alone)."""
    return render_messages(style, messages, tokenizer, add_generation_prompt=True)


def stream_reply(model: GPT, tokenizer: Tokenizer, prompt: torch.Tensor, out: TextIO, max_new_tokens: int,
                 temperature: float, top_k: int | None, generator: torch.Generator | None) -> str:
    """Write the reply to `out` token by token as it is generated; returns its text."""
    ids: list[int] = []
    printed = ""
    tokens = generate_tokens(model, prompt, max_new_tokens, temperature, top_k, tokenizer.stop_ids, generator)
    try:
        for token in tokens:
            if token in tokenizer.stop_ids:
                break
            ids.append(token)
            text = tokenizer.decode(ids)
            # Hold back a partial UTF-8 character, or text a later token respells (SentencePiece's spaces).
            if text.startswith(printed) and not text.endswith("\ufffd"):
                out.write(text[len(printed):])
                out.flush()
                printed = text
    finally:
        tokens.close()  # frees the KV cache
    text = tokenizer.decode(ids)
    out.write((text[len(printed):] if text.startswith(printed) else "\n" + text) + "\n")
    out.flush()
    return text


def chat_loop(model: GPT, tokenizer: Tokenizer, lines: Iterable[str], out: TextIO, style: str,
              max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = 50,
              generator: torch.Generator | None = None, prompt_marker: str = "") -> list[str]:
    """Answer each line of `lines` until `/quit`; returns the replies. `prompt_marker` is written before each read."""
    device = next(model.parameters()).device
    messages: list[dict] = []
    replies: list[str] = []
    block_size = model.config.block_size
    for line in _with_marker(lines, out, prompt_marker):
        message = line.strip()
        if not message:
            continue
        if message in ("/quit", "/exit"):
            break
        if message == "/reset":
            messages = []
            print("(new conversation)", file=sys.stderr)
            continue
        if message.startswith("/"):
            print(f"unknown command {message}: {COMMANDS}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": message})
        encoded = tokenizer.encode(render(tokenizer, messages, style), device=device)
        while encoded.numel() + 1 > block_size and len(messages) > 2:  # drop the oldest exchange
            messages = messages[2:]
            encoded = tokenizer.encode(render(tokenizer, messages, style), device=device)
        if encoded.numel() + 1 > block_size:
            messages.pop()
            print(f"that message takes {encoded.numel()} tokens, more than the model's block_size {block_size} "
                  "allows: send a shorter one", file=sys.stderr)
            continue
        reply = stream_reply(model, tokenizer, encoded, out, max_new_tokens, temperature, top_k, generator)
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def _with_marker(lines: Iterable[str], out: TextIO, marker: str) -> Iterable[str]:
    """The lines, each read after writing `marker` (the interactive prompt)."""
    iterator = iter(lines)
    while True:
        if marker:
            out.write(marker)
            out.flush()
        try:
            yield next(iterator)
        except StopIteration:
            return


def load_for_chat(checkpoint_dir: Path, device: str, dtype: torch.dtype | None) -> tuple[GPT, Tokenizer]:
    """A converted or fine-tuned checkpoint (LoRA adapters merged into their base) and its tokenizer."""
    folder = Path(checkpoint_dir)
    hyperparameters = load_hyperparameters(folder) if (folder / HYPERPARAMETERS_FILE).is_file() else {}
    if hyperparameters.get("finetuning") in LORA_METHODS:
        model = load_finetuned(folder, device=device, dtype=dtype)
        has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
        tokenizer = Tokenizer(folder if has_tokenizer else hyperparameters["checkpoint_dir"])
        return model, tokenizer
    check_checkpoint_dir(folder)
    return load_model(folder, device=device, dtype=dtype), Tokenizer(folder)


def setup(
    checkpoint_dir: Path,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 1234,
    chat_template: bool | None = None,
    prompt_style: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
) -> None:
    """Chat with a model in the terminal; replies stream as they are generated.

    Args:
        checkpoint_dir: a converted checkpoint, a full fine-tune's folder, or a LoRA folder from finetune/*.py.
        max_new_tokens: the most tokens of one reply.
        temperature: sampling temperature; 0 picks the most likely token every time.
        top_k: sample only among the k most likely tokens.
        seed: seed of the sampling generator.
        chat_template: use the tokenizer's chat template (whole conversations), or not (the Alpaca prompt, each
            message answered alone); default: the prompt style.
        prompt_style: alpaca, chatml, llama2, plain or auto (the chat template if the tokenizer has one, else
            alpaca); default: the style the checkpoint was fine-tuned with, else auto.
        device: cpu, cuda, or auto (cuda when available).
        dtype: float32, bfloat16 or float16; default: the checkpoint's dtype.
    """
    if max_new_tokens < 1:
        raise UserError("--max_new_tokens must be at least 1")
    if temperature < 0:
        raise UserError("--temperature must be 0 (greedy) or positive")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_for_chat(Path(checkpoint_dir), device, parse_dtype(dtype))
    if chat_template and tokenizer.chat_template is None:
        raise UserError(f"{checkpoint_dir} has no chat template: leave --chat_template unset to use the Alpaca prompt")
    if chat_template is not None:
        style = "auto" if chat_template else "alpaca"
    else:
        style = check_prompt_style(prompt_style or recorded_prompt_style(checkpoint_dir) or "auto")
    style = resolve_prompt_style(style, tokenizer)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {model.config.name or checkpoint_dir}: {COMMANDS}", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(seed)
    chat_loop(model, tokenizer, sys.stdin, sys.stdout, style, max_new_tokens, temperature, top_k, generator,
              prompt_marker=">> " if interactive else "")


if __name__ == "__main__":
    run_cli(setup)
