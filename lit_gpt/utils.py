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
    state = load_torch_file(path, "convert or download it again", mmap=mmap)
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of weights: convert or download "
                        "it again")
    return state


def _damage(path: Path) -> str:
    """What is wrong with an unreadable file, in words."""
    try:
        return "is empty" if Path(path).stat().st_size == 0 else "is truncated, corrupt or not the right kind of file"
    except OSError:
        return "could not be opened"


def load_torch_file(path: str | Path, next_step: str, mmap: bool = False, weights_only: bool = True) -> Any:
    """`torch.load` on CPU; a missing, empty, truncated or non-torch file raises a one-line `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: {next_step}")
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=weights_only)
    except Exception as e:  # zip, pickle, mmap and storage errors: torch raises many kinds for a damaged file
        raise UserError(f"could not read {path}: the file {_damage(path)} ({_first_line(e)}); {next_step}") from None


def read_text_file(path: str | Path, next_step: str) -> str:
    """A UTF-8 text file, or a one-line `UserError` when it is missing, unreadable or not text."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: {next_step}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"could not read {path} as UTF-8 text ({_first_line(e)}): {next_step}") from None


def read_json_object(path: str | Path, next_step: str) -> dict:
    """A JSON file holding one object; empty, truncated or other JSON raises a one-line `UserError`."""
    import json

    path = Path(path)
    text = read_text_file(path, next_step)
    if not text.strip():
        raise UserError(f"{path} is empty: {next_step}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise UserError(f"{path} is not valid JSON ({e.msg} at {where}): {next_step}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object: {next_step}")
    return data


def read_yaml_mapping(path: str | Path, next_step: str) -> dict:
    """A YAML file holding one mapping; empty, malformed or other YAML raises a one-line `UserError`."""
    import yaml

    path = Path(path)
    text = read_text_file(path, next_step)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"{path} is not valid YAML{at}: {next_step}") from None
    if not isinstance(data, dict):
        what = "is empty" if data is None else f"holds a YAML {type(data).__name__}, not a mapping"
        raise UserError(f"{path} {what}: {next_step}")
    return data


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


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a new empty folder next to `path`; it becomes `path` only when the block succeeds.

    An existing `path` is replaced whole (the caller decides whether it may be); when the block fails, nothing
    of the new folder is left and `path` is as it was.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's folders are private; the result should look like any other folder
    old = tmp.with_suffix(".old")
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists():
                os.replace(old, path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


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
