"""Prepare Databricks' Dolly-15k instruction data set for fine-tuning."""

from __future__ import annotations

from pathlib import Path

from lit_gpt.data import download, load_records, prepare_instruction_data
from lit_gpt.utils import run_cli

DATA_URL = "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl"
DOLLY_FIELDS = {"context": "input", "response": "output"}


def prepare(
    checkpoint_dir: Path,
    destination_path: Path = Path("data/dolly"),
    data_file: Path | None = None,
    test_size: int | float = 0.1,
    seed: int = 42,
    mask_inputs: bool = False,
    max_seq_length: int | None = None,
    prompt_style: str = "alpaca",
) -> None:
    """Download (or read) Dolly-15k, tokenize it in a prompt style (Alpaca by default), and write train.pt and test.pt.

    Dolly's context and response fields become the prompt's input and the output.

    Args:
        checkpoint_dir: the model folder whose tokenizer (tokenizer.model or tokenizer.json) and
            lit_config.json to use; lit_model.pth is not needed.
        destination_path: where train.pt, test.pt, prepare.yaml and the download go.
        data_file: a local copy of databricks-dolly-15k.jsonl instead of the download.
        test_size: records held out for testing: a fraction (0.1, as Lit-GPT) or a count (1500).
        seed: seed of the shuffle before the split.
        mask_inputs: leave the prompt out of the loss (labels = IGNORE_INDEX there).
        max_seq_length: cut samples to this many tokens; default: the model's block_size.
        prompt_style: alpaca (default), chatml, llama2, plain, or auto (the tokenizer's chat template if it
            has one); recorded in prepare.yaml, and used by fine-tuning, generate.py and chat.py.
    """
    prepare_instruction_data(
        lambda: load_records(
            data_file or download(DATA_URL, Path(destination_path) / "databricks-dolly-15k.jsonl"),
            rename=DOLLY_FIELDS,
        ),
        checkpoint_dir, destination_path, source=str(data_file or DATA_URL),
        test_size=test_size, seed=seed, mask_inputs=mask_inputs, max_seq_length=max_seq_length,
        prompt_style=prompt_style,
    )


if __name__ == "__main__":
    run_cli(prepare)
