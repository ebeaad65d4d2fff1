"""Small shared helpers: user-facing errors, atomic writes, checkpoint loading, dtype names."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


class UserError(Exception):
    """A mistake the user can fix. Scripts print its message on one line, without a traceback."""


def run_cli(fn: Callable[..., Any], **cli_kwargs: Any) -> Any:
    """Run `fn` through jsonargparse's CLI; a `UserError` becomes `error: <message>` and exit code 2."""
    from jsonargparse import CLI

    try:
        return CLI(fn, as_positional=False, **cli_kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def check_checkpoint_dir(checkpoint_dir: Path, needs: tuple[str, ...] = ("lit_model.pth", "lit_config.json")) -> Path:
    """Fail with an actionable message when a converted checkpoint folder is missing or incomplete."""
    checkpoint_dir = Path(checkpoint_dir)
    convert_hint = f"run `python scripts/convert_hf_checkpoint.py --checkpoint_dir {checkpoint_dir}`"
    if not checkpoint_dir.is_dir():
        raise UserError(
            f"checkpoint_dir {str(checkpoint_dir)!r} does not exist: download a model with "
            f"`python scripts/download.py --repo_id ORG/NAME` or pass the folder that holds lit_model.pth"
        )
    for name in needs:
        if not (checkpoint_dir / name).is_file():
            raise UserError(f"checkpoint_dir {str(checkpoint_dir)!r} has no {name}: {convert_hint}")
    return checkpoint_dir


def load_state_dict(path: Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Load a `.pth` state dict lazily (memory-mapped); a truncated or corrupt file raises `UserError`."""
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(
            f"could not read {path}: the file is truncated or corrupt ({_first_line(e)}); "
            f"convert or download it again"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; it replaces `path` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """`torch.save` that never leaves a half-written file behind."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def num_parameters(module: torch.nn.Module, requires_grad: bool | None = None) -> int:
    """Count parameters once each (tied weights are shared), optionally only (non-)trainable ones."""
    unique = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in unique if requires_grad is None or p.requires_grad == requires_grad)
