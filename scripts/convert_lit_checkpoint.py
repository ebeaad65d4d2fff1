"""Convert a lit_gpt checkpoint back to an HF LLaMA folder that `from_pretrained` loads as it is.

The folder holds safetensors shards with their index (`model.safetensors` alone when one shard holds the
weights), `config.json`, `generation_config.json` and the checkpoint's tokenizer files.
"""

from __future__ import annotations

import time
from pathlib import Path

from lit_gpt.convert import convert_lit_checkpoint
from lit_gpt.utils import run_cli


def setup(checkpoint_dir: Path, output_dir: Path, checkpoint_file: Path | None = None,
          max_shard_size: str = "5GB") -> None:
    """Convert a lit_gpt checkpoint back to HF format.

    Args:
        checkpoint_dir: the folder with `lit_config.json` (and `lit_model.pth`) and the tokenizer files.
        output_dir: the HF folder to write (a new or empty folder, or an earlier export, which is replaced).
        checkpoint_file: weights to convert instead of `checkpoint_dir/lit_model.pth` (e.g. a fine-tuned one).
        max_shard_size: the largest safetensors shard, e.g. 5GB, 500MB (one tensor larger than it gets its own).
    """
    start = time.perf_counter()
    folder = convert_lit_checkpoint(checkpoint_dir, output_dir, checkpoint_file, max_shard_size).parent
    shards = len(list(folder.glob("*.safetensors")))
    print(f"wrote {folder} ({shards} shard{'s' if shards > 1 else ''}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_cli(setup)
