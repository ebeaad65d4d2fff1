"""Writing a Hugging Face model folder that `from_pretrained` loads as it is.

Safetensors shards with their index (`huggingface_hub.save_torch_state_dict`; one `model.safetensors` when the
weights fit one shard), `config.json`, `generation_config.json` and the tokenizer files of the source folder. The
folder is built under a temporary name next to the destination and renamed into place, so a failure leaves
nothing half-written behind.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lit_gpt.tokenizer import TOKENIZER_FILES, Tokenizer, copy_tokenizer_files
from lit_gpt.utils import UserError, atomic_dir

_SHARD_NAME = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # huggingface_hub's decimal units


def parse_shard_size(size: str | int) -> int:
    """`5GB`, `500MB`, `20KB` or a number of bytes, as bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", str(size), flags=re.IGNORECASE)
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").upper()] if match else 0
    if value < 1:
        raise UserError(f"--max_shard_size {size!r} is not a size: write it like 5GB, 500MB, 20KB or a number of bytes")
    return int(value)


def check_output_dir(output_dir: Path, source_dir: Path) -> None:
    """Replace only an earlier export: never the source folder, nor a folder holding anything else."""
    output_dir = Path(output_dir)
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise UserError(f"output_dir {str(output_dir)!r} is a file: pass a folder")
    ours = {"config.json", *TOKENIZER_FILES}
    others = sorted(p.name for p in output_dir.iterdir() if p.name not in ours and not _SHARD_NAME.fullmatch(p.name))
    if others or output_dir.resolve() == Path(source_dir).resolve():
        detail = f" ({', '.join(others[:3])})" if others else ""
        raise UserError(f"output_dir {str(output_dir)!r} already holds other files{detail}: pass a new or empty "
                        "folder, or an earlier export to replace")


def special_token_ids(tokenizer_dir: Path) -> dict[str, int | list[int]]:
    """`bos_token_id` and `eos_token_id` as the lit tokenizer reads them from the tokenizer files (none without)."""
    tokenizer_dir = Path(tokenizer_dir)
    if not ((tokenizer_dir / "tokenizer.json").is_file() or (tokenizer_dir / "tokenizer.model").is_file()):
        return {}
    tokenizer = Tokenizer(tokenizer_dir)
    ids: dict[str, int | list[int]] = {}
    if tokenizer.bos_id is not None:
        ids["bos_token_id"] = tokenizer.bos_id
    if tokenizer.stop_ids:
        ids["eos_token_id"] = tokenizer.stop_ids[0] if len(tokenizer.stop_ids) == 1 else list(tokenizer.stop_ids)
    return ids


def write_hf_folder(state_dict: dict[str, torch.Tensor], hf_config: dict, output_dir: Path, source_dir: Path,
                    max_shard_size: str | int = "5GB") -> Path:
    """Write `state_dict` (HF names) as shards, `hf_config` as config.json and `source_dir`'s tokenizer files."""
    from huggingface_hub import save_torch_state_dict

    output_dir = Path(output_dir)
    check_output_dir(output_dir, source_dir)
    shard_size = parse_shard_size(max_shard_size)
    special_ids = special_token_ids(source_dir)
    with atomic_dir(output_dir) as tmp:
        save_torch_state_dict(state_dict, tmp, max_shard_size=shard_size, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps({**hf_config, **special_ids}, indent=2))
        copied = copy_tokenizer_files(source_dir, tmp)
        if "generation_config.json" not in copied and special_ids:
            (tmp / "generation_config.json").write_text(json.dumps(special_ids, indent=2))
    return output_dir
