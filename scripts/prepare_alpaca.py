"""Prepare the Alpaca-cleaned instruction data set (52k records) for fine-tuning."""

from __future__ import annotations

from pathlib import Path

from lit_gpt.data import download, load_records, prepare_instruction_data
from lit_gpt.utils import run_cli

DATA_URL = "https://raw.githubusercontent.com/gururise/AlpacaDataCleaned/main/alpaca_data_cleaned.json"


def prepare(
    checkpoint_dir: Path,
    destination_path: Path = Path("data/alpaca"),
    data_file: Path | None = None,
    test_size: int | float = 2000,
    seed: int = 42,
    mask_inputs: bool = False,
    max_seq_length: int | None = None,
    prompt_style: str = "alpaca",
) -> None:
    """Download (or read) Alpaca-cleaned, tokenize it in a prompt style (Alpaca by default), write train.pt, test.pt.

    Args:
        checkpoint_dir: the model folder whose tokenizer (tokenizer.model or tokenizer.json) and
            lit_config.json to use; lit_model.pth is not needed.
        destination_path: where train.pt, test.pt, prepare.yaml and the download go.
        data_file: a local copy of alpaca_data_cleaned.json (JSON array or JSONL) instead of the download.
        test_size: records held out for testing: a count (2000, as Lit-GPT) or a fraction (0.1).
        seed: seed of the shuffle before the split.
        mask_inputs: leave the prompt out of the loss (labels = IGNORE_INDEX there).
        max_seq_length: cut samples to this many tokens; default: the model's block_size.
        prompt_style: alpaca (default), chatml, llama2, plain, or auto (the tokenizer's chat template if it
            has one); recorded in prepare.yaml, and used by fine-tuning, generate.py and chat.py.
    """
    prepare_instruction_data(
        lambda: load_records(data_file or download(DATA_URL, Path(destination_path) / "alpaca_data_cleaned.json")),
        checkpoint_dir, destination_path, source=str(data_file or DATA_URL),
        test_size=test_size, seed=seed, mask_inputs=mask_inputs, max_seq_length=max_seq_length,
        prompt_style=prompt_style,
    )


if __name__ == "__main__":
    run_cli(prepare)
