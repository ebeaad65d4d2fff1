"""Prepare any JSON or JSONL file of instruction/input/output records for fine-tuning."""

from __future__ import annotations

from pathlib import Path

from lit_gpt.data import load_records, prepare_instruction_data
from lit_gpt.utils import run_cli


def prepare(
    data_file: Path,
    checkpoint_dir: Path,
    destination_path: Path = Path("data/json"),
    test_size: int | float = 0.1,
    seed: int = 42,
    mask_inputs: bool = False,
    max_seq_length: int | None = None,
    prompt_style: str = "alpaca",
) -> None:
    """Tokenize a JSON array or JSONL file in a prompt style (Alpaca by default), and write train.pt and test.pt.

    Every record needs "instruction" and "output" strings ("input" is optional), or is a chat: "messages", a
    list of {"role": "system"|"user"|"assistant", "content": ...}; with --mask_inputs only the assistant's turns
    are learnt.

    Args:
        data_file: the JSON array (.json) or JSON lines (.jsonl) file.
        checkpoint_dir: the model folder whose tokenizer (tokenizer.model or tokenizer.json) and
            lit_config.json to use; lit_model.pth is not needed.
        destination_path: where train.pt, test.pt and prepare.yaml go.
        test_size: records held out for testing: a fraction (0.1) or a count (500).
        seed: seed of the shuffle before the split.
        mask_inputs: leave the prompt out of the loss (labels = IGNORE_INDEX there).
        max_seq_length: cut samples to this many tokens; default: the model's block_size.
        prompt_style: alpaca (default), chatml, llama2, plain, or auto (the tokenizer's chat template if it
            has one); recorded in prepare.yaml, and used by fine-tuning, generate.py and chat.py.
    """
    prepare_instruction_data(
        lambda: load_records(data_file), checkpoint_dir, destination_path, source=str(data_file),
        test_size=test_size, seed=seed, mask_inputs=mask_inputs, max_seq_length=max_seq_length,
        prompt_style=prompt_style,
    )


if __name__ == "__main__":
    run_cli(prepare)
