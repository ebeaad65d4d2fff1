"""Convert a llama.cpp GGUF file into a lit_gpt checkpoint folder (weights, config and tokenizer)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from lit_gpt.utils import UserError, parse_dtype, run_cli


def setup(gguf_path: Path, checkpoint_dir: Path, dtype: str | None = None) -> None:
    """Dequantize a llama GGUF file into `lit_model.pth`, `lit_config.json` and HF tokenizer files.

    Args:
        gguf_path: the `.gguf` file (any quantization the `gguf` package can dequantize).
        checkpoint_dir: the folder to write; its name becomes the model's name (use a preset's name,
            e.g. SmolLM2-135M-Instruct, so that scripts recognise it).
        dtype: float32, bfloat16 or float16; default: float32 for quantized files, the file's own type
            for F16/BF16 files.
    """
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading GGUF files needs the gguf package: pip install gguf")
    from lit_gpt.gguf import convert_gguf_checkpoint

    start = time.perf_counter()
    config = convert_gguf_checkpoint(Path(gguf_path), Path(checkpoint_dir), parse_dtype(dtype))
    print(f"wrote {Path(checkpoint_dir) / 'lit_model.pth'} ({config.name}, {config.n_layer} layers, "
          f"vocab {config.vocab_size}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_cli(setup)
