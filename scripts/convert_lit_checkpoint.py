"""Convert a lit_gpt checkpoint back to an HF LLaMA folder (`model.safetensors` + `config.json`)."""

from __future__ import annotations

import time
from pathlib import Path

from lit_gpt.convert import convert_lit_checkpoint
from lit_gpt.utils import run_cli


def setup(checkpoint_dir: Path, output_dir: Path, checkpoint_file: Path | None = None) -> None:
    """Convert a lit_gpt checkpoint back to HF format.

    Args:
        checkpoint_dir: the folder with `lit_config.json` (and `lit_model.pth`).
        output_dir: where to write `model.safetensors` and `config.json`; copy the tokenizer files there yourself.
        checkpoint_file: weights to convert instead of `checkpoint_dir/lit_model.pth` (e.g. a fine-tuned one).
    """
    start = time.perf_counter()
    path = convert_lit_checkpoint(checkpoint_dir, output_dir, checkpoint_file)
    print(f"wrote {path} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_cli(setup)
