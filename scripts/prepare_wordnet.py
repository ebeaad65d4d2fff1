"""Prepare a "define this word" instruction set from WordNet 3.0 (Debian's wordnet-base), offline."""

from __future__ import annotations

from pathlib import Path

from lit_gpt.data import prepare_instruction_data, sample_wordnet
from lit_gpt.utils import UserError, run_cli


def prepare(
    checkpoint_dir: Path,
    destination_path: Path = Path("data/wordnet"),
    wordnet_dir: Path = Path("/usr/share/wordnet"),
    max_samples: int | None = 2000,
    test_size: int | float = 0.1,
    seed: int = 42,
    mask_inputs: bool = False,
    max_seq_length: int | None = None,
    prompt_style: str = "alpaca",
) -> None:
    """Turn WordNet synsets into records like 'Define the word "dog" (noun).' -> its definition.

    Args:
        checkpoint_dir: the model folder whose tokenizer (tokenizer.model or tokenizer.json) and
            lit_config.json to use; lit_model.pth is not needed.
        destination_path: where train.pt, test.pt and prepare.yaml go.
        wordnet_dir: the folder with WordNet's data.noun, data.verb, data.adj and data.adv files.
        max_samples: keep a seeded random sample of this many synsets (of about 117k); None keeps all.
        test_size: records held out for testing: a fraction (0.1) or a count (200).
        seed: seed of the sample and of the shuffle before the split.
        mask_inputs: leave the prompt out of the loss (labels = IGNORE_INDEX there).
        max_seq_length: cut samples to this many tokens; default: the model's block_size.
        prompt_style: alpaca (default), chatml, llama2, plain, or auto (the tokenizer's chat template if it
            has one); recorded in prepare.yaml, and used by fine-tuning, generate.py and chat.py.
    """
    if max_samples is not None and max_samples < 2:
        raise UserError(f"--max_samples must be at least 2 (one train and one test record), got {max_samples}")

    prepare_instruction_data(
        lambda: sample_wordnet(wordnet_dir, max_samples, seed), checkpoint_dir, destination_path,
        source=f"wordnet:{wordnet_dir}", test_size=test_size, seed=seed, mask_inputs=mask_inputs,
        max_seq_length=max_seq_length, prompt_style=prompt_style,
    )


if __name__ == "__main__":
    run_cli(prepare)
