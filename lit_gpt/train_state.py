"""Step checkpoints of a fine-tuning run, written atomically, and the resume from them.

`out_dir/step-NNNNNN/` holds what `final/` holds (the weights, adapters only for LoRA; the config; the
hyperparameters) plus `training_state.pth`: the step, the optimizer, the method's state (DropBP's handler and
drop-rate history, PLD's draws, GreenTrainer's selection), the run's progress and the RNG states. Every tensor is
whole, in the format one process writes, so a checkpoint written under FSDP resumes on one process and back.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lit_gpt.checkpoint import finetuned_folder, save_finetuned
from lit_gpt.parallel import (
    fabric_module,
    gathered_optimizer_state,
    gathered_state_dict,
    load_optimizer_state,
    load_weights,
)
from lit_gpt.utils import UserError, load_state_dict, load_torch_file

TRAINING_STATE_FILE = "training_state.pth"


def step_checkpoints(out_dir: Path) -> list[Path]:
    """Complete step checkpoints in `out_dir`, oldest first (partial ones have another name)."""
    return sorted(p for p in Path(out_dir).glob("step-*") if (p / TRAINING_STATE_FILE).is_file())


def resume_folder(resume: bool | str | Path, out_dir: Path) -> Path | None:
    """The checkpoint `--resume` names: the newest in `out_dir` for True/"auto" (None if there is none yet)."""
    if resume is True or resume == "auto":
        found = step_checkpoints(out_dir)
        return found[-1] if found else None
    folder = finetuned_folder(resume)
    if not (folder / TRAINING_STATE_FILE).is_file():
        raise UserError(f"{folder} has no {TRAINING_STATE_FILE}: resume from a step-NNNNNN folder")
    return folder


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(fabric, model: nn.Module, folder: Path, hyperparameters: dict, adapters_only: bool) -> None:
    """`final/`-style folder: under FSDP every rank takes part in gathering the shards; rank 0 writes."""
    weights = gathered_state_dict(fabric, model, adapters_only)
    if fabric.global_rank == 0:
        save_finetuned(fabric_module(model), folder, hyperparameters, state_dict=weights)


def save_checkpoint(fabric, model: nn.Module, optimizer, folder: Path, hyperparameters: dict, adapters_only: bool,
                    state: dict[str, Any]) -> Path:
    """Write `folder` atomically: build it under a temporary name, then rename it.

    `state` is the rest of `training_state.pth`; the optimizer's (whole-tensor) state is added here.
    """
    partial = folder.parent / f".{folder.name}.partial"
    weights = gathered_state_dict(fabric, model, adapters_only)  # under FSDP, every rank takes part in gathering
    optimizer_state = gathered_optimizer_state(fabric, optimizer)
    if fabric.global_rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        save_finetuned(fabric_module(model), partial, hyperparameters, state_dict=weights)
        full_state = {**state, "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state}
        torch.save(full_state, partial / TRAINING_STATE_FILE)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    fabric.barrier()
    return folder


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and training state of a step checkpoint, both read whole before anything is applied.

    A missing, empty, truncated or corrupt file raises `UserError`: nothing of the run has changed then.
    """
    weights = load_state_dict(folder / "lit_model.pth", mmap=False)
    state = load_torch_file(folder / TRAINING_STATE_FILE, "resume from an earlier step-NNNNNN folder",
                            weights_only=False)
    if not isinstance(state, dict) or not {"optimizer", "step"} <= state.keys():
        raise UserError(f"{folder / TRAINING_STATE_FILE} is not a training state written by finetune/*.py: resume "
                        "from an earlier step-NNNNNN folder")
    return weights, state


def read_resume_checkpoint(resume: bool | str | Path, out_dir: Path,
                           warn: Callable[[str], None]) -> tuple[Path, dict, dict] | None:
    """The checkpoint `--resume` names, read: (folder, weights, training state), or None when there is none yet.

    With `--resume auto` (or true) a damaged newest checkpoint (a truncated file, say) is skipped with a warning
    naming it, and the newest complete one before it is used; a folder named explicitly must be readable.
    """
    if not (resume is True or resume == "auto"):
        folder = resume_folder(resume, out_dir)
        return (folder, *read_checkpoint(folder))
    candidates = step_checkpoints(out_dir)[::-1]  # newest first
    for i, folder in enumerate(candidates):
        try:
            return (folder, *read_checkpoint(folder))
        except UserError as e:
            if i + 1 == len(candidates):
                raise UserError(f"no complete checkpoint in {out_dir}: {e}; delete the damaged step-NNNNNN "
                                "folders to start from scratch") from None
            warn(f"warning: skipping the damaged checkpoint {folder} ({e}); trying {candidates[i + 1].name}")
    return None


def load_checkpoint(fabric, model: nn.Module, optimizer, folder: Path, adapters_only: bool,
                    read: tuple[dict, dict] | None = None) -> dict[str, Any]:
    """Load the weights and optimizer state of `folder` into the run; returns the rest of its training state.

    `read` is `read_checkpoint(folder)` when the caller has read it already.
    """
    weights, state = read or read_checkpoint(folder)
    missing, unexpected = load_weights(fabric, model, weights)
    if adapters_only:
        if unexpected or any("lora_" in k for k in missing):
            raise UserError(f"{folder} does not hold this run's LoRA adapters: check --lora.* against its "
                            "hyperparameters.yaml")
    elif missing or unexpected:
        raise UserError(f"{folder / 'lit_model.pth'} does not match this model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}): resume with the same --checkpoint_dir")
    load_optimizer_state(fabric, optimizer, state.pop("optimizer"))
    if state.get("dropbp") is not None:  # written before DropBP was a method like the others: its state was apart
        state["method"] = {**state["method"], "handler": state["dropbp"], "history": state["drop_rate_history"]}
    return state
