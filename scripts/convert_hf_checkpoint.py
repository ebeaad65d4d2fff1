"""Convert an HF LLaMA checkpoint folder into lit_gpt's `lit_model.pth` + `lit_config.json`."""

from __future__ import annotations

import time
from pathlib import Path

from lit_gpt.convert import convert_hf_checkpoint
from lit_gpt.utils import run_cli


def setup(checkpoint_dir: Path, model_name: str | None = None, dtype: str | None = None) -> None:
    """Convert an HF LLaMA checkpoint folder into lit_gpt's format, in place.

    Args:
        checkpoint_dir: folder with the HF `*.safetensors` (or `pytorch_model*.bin`) shards.
        model_name: a preset name (see `lit_gpt/config.py`); default: the folder's name or its config.json.
        dtype: float32, bfloat16 or float16; default: keep the checkpoint's dtype.
    """
    start = time.perf_counter()
    config = convert_hf_checkpoint(checkpoint_dir, model_name, dtype)
    print(f"wrote {Path(checkpoint_dir) / 'lit_model.pth'} ({config.name}, {config.n_layer} layers) "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_cli(setup)
