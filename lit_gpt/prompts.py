"""Prompt styles: how an instruction, or a conversation, becomes the text a model continues.

`--prompt_style` of the prepare scripts picks one; `prepare.yaml` records it, fine-tuning copies it into
`hyperparameters.yaml` of every checkpoint (and `merge_lora.py` into `prompt_style.yaml`), and
`scripts/generate.py` and `scripts/chat.py` use the recorded style unless told otherwise.

- `alpaca`: the Alpaca prompt (`### Instruction:` ... `### Response:`), the default; one turn only.
- `chatml`: `<|im_start|>user ... <|im_end|>` turns, then `<|im_start|>assistant`.
- `llama2`: `[INST] ... [/INST]` turns (a system message in `<<SYS>>`).
- `plain`: the text as it is; turns joined by newlines.
- `auto`: the tokenizer's chat template when it has one, else `alpaca`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lit_gpt.utils import UserError

if TYPE_CHECKING:
    from lit_gpt.tokenizer import Tokenizer

PROMPT_STYLES = ("alpaca", "chatml", "llama2", "plain", "auto")
PROMPT_STYLE_FILE = "prompt_style.yaml"


def alpaca_prompt(example: dict) -> str:
    """The Alpaca prompt for an instruction record; the response is what follows it."""
    if example.get("input"):
        return (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{example['instruction']}\n\n### Input:\n{example['input']}\n\n### Response:\n"
        )
    return (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        f"### Instruction:\n{example['instruction']}\n\n### Response:\n"
    )


def check_prompt_style(style: str) -> str:
    if style not in PROMPT_STYLES:
        raise UserError(f"--prompt_style {style!r}: choose one of {', '.join(PROMPT_STYLES)}")
    return style


def resolve_prompt_style(style: str, tokenizer: Tokenizer) -> str:
    """`auto` becomes `alpaca` for a tokenizer without a chat template; other styles stay."""
    check_prompt_style(style)
    return "alpaca" if style == "auto" and tokenizer.chat_template is None else style


def render_messages(style: str, messages: list[dict], tokenizer: Tokenizer | None = None,
                    add_generation_prompt: bool = True) -> str:
    """A conversation (`{"role", "content"}` dicts: system, user, assistant) as one prompt string.

    With `add_generation_prompt` the text ends where the assistant's next reply starts.
    """
    if style == "auto" and tokenizer is not None and tokenizer.chat_template is not None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    if style in ("alpaca", "auto"):  # one turn: the last user message, after it the response if given
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise UserError("the alpaca prompt style needs a user message")
        text = alpaca_prompt({"instruction": messages[users[-1]]["content"], "input": ""})
        return text + "".join(m["content"] for m in messages[users[-1] + 1:] if m["role"] == "assistant")
    if style == "chatml":
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
    if style == "llama2":
        system = "".join(f"<<SYS>>\n{m['content']}\n<</SYS>>\n\n" for m in messages if m["role"] == "system")
        text = ""
        for m in (m for m in messages if m["role"] != "system"):
            if m["role"] == "user":
                text += f"[INST] {system}{m['content']} [/INST]"
                system = ""
            else:
                text += f" {m['content']} "
        return text
    if style == "plain":
        return "\n".join(m["content"] for m in messages)
    raise UserError(f"--prompt_style {style!r}: choose one of {', '.join(PROMPT_STYLES)}")


def render_instruction(style: str, example: dict, tokenizer: Tokenizer | None = None) -> str:
    """The prompt for an instruction record (`instruction`, optional `input`) in `style`."""
    if style == "alpaca" or (style == "auto" and (tokenizer is None or tokenizer.chat_template is None)):
        return alpaca_prompt(example)
    content = example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")
    return render_messages(style, [{"role": "user", "content": content}], tokenizer)


def recorded_prompt_style(folder: str | Path) -> str | None:
    """The style a checkpoint folder was fine-tuned with (hyperparameters.yaml or prompt_style.yaml), if any."""
    from lit_gpt.utils import read_yaml_mapping

    folder = Path(folder)
    for name, key in (("hyperparameters.yaml", "prompt_style"), (PROMPT_STYLE_FILE, "name")):
        if (folder / name).is_file():
            style = read_yaml_mapping(folder / name, "pass --prompt_style").get(key)
            if style is not None:
                return check_prompt_style(str(style))
    return None


def save_prompt_style(style: str, folder: str | Path) -> Path:
    from lit_gpt.utils import atomic_write_text

    return atomic_write_text(Path(folder) / PROMPT_STYLE_FILE, f"name: {check_prompt_style(style)}\n")
