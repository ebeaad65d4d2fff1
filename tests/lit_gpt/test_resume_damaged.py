"""`--resume auto` skips a damaged newest checkpoint, with a warning naming it, and resumes from the one before."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import assert_resumed_from
from lit_gpt.train_state import TRAINING_STATE_FILE, step_checkpoints
from lit_gpt.training import cli


def flags(tiny: dict, out_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["--checkpoint_dir", str(tiny["checkpoint_dir"]), "--data_dir", str(tiny["data_dir"]),
            "--out_dir", str(out_dir), "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
            "--train.max_steps", str(steps), "--train.warmup_steps", "1", "--train.eval_interval", "100",
            "--train.eval_iters", "1", "--train.sample_tokens", "0", "--train.save_interval", "1", *extra]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_auto_skips_a_damaged_newest_checkpoint(tiny, tmp_path, capsys, one_thread):
    out_dir = tmp_path / "out"
    cli("lora", argv=flags(tiny, out_dir, 3))
    assert [p.name for p in step_checkpoints(out_dir)] == ["step-000001", "step-000002", "step-000003"]
    truncate(out_dir / "step-000003" / "lit_model.pth")  # the newest checkpoint, damaged
    capsys.readouterr()

    cli("lora", argv=flags(tiny, out_dir, 4, "--resume", "auto"))
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, captured.err
    assert "step-000003" in warnings[0] and "lit_model.pth" in warnings[0] and "trying step-000002" in warnings[0]
    assert_resumed_from(out_dir, captured.out, step=2, max_steps=4)
    assert (out_dir / "final" / "lit_model.pth").is_file()


def test_resume_auto_with_every_checkpoint_damaged_is_one_error_line(tiny, tmp_path, capsys, one_thread):
    out_dir = tmp_path / "out"
    cli("lora", argv=flags(tiny, out_dir, 2))
    truncate(out_dir / "step-000002" / TRAINING_STATE_FILE)
    (out_dir / "step-000001" / TRAINING_STATE_FILE).write_bytes(b"not a torch file")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli("lora", argv=flags(tiny, out_dir, 3, "--resume", "auto"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no complete checkpoint" in errors[0] and "step-000001" in errors[0], err
    assert "skipping the damaged checkpoint" in err and "step-000002" in err


def test_an_explicitly_named_damaged_checkpoint_is_one_error_line(tiny, tmp_path, capsys, one_thread):
    out_dir = tmp_path / "out"
    cli("lora", argv=flags(tiny, out_dir, 1))
    (out_dir / "step-000001" / TRAINING_STATE_FILE).write_bytes(b"")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli("lora", argv=flags(tiny, out_dir, 2, "--resume", str(out_dir / "step-000001")))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and TRAINING_STATE_FILE in errors[0] and "is empty" in errors[0], errors
