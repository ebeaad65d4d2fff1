"""`--logger csv|tensorboard|wandb`: the default keeps CSV and TensorBoard; one logger alone; W&B offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import metrics
from lit_gpt.args import logger_names, parse_args
from lit_gpt.training import cli
from lit_gpt.utils import UserError


def flags(tiny: dict, out_dir: Path, *extra: str) -> list[str]:
    return ["--checkpoint_dir", str(tiny["checkpoint_dir"]), "--data_dir", str(tiny["data_dir"]),
            "--out_dir", str(out_dir), "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
            "--train.max_steps", "2", "--train.warmup_steps", "1", "--train.eval_interval", "100",
            "--train.eval_iters", "1", "--train.sample_tokens", "0", "--train.save_interval", "null", *extra]


def test_logger_flag_parses_and_rejects_unknown_names(tiny):
    args = parse_args("lora", flags(tiny, Path("out")))
    assert logger_names(args.logger) == ["csv", "tensorboard"]  # today's behaviour is the default
    assert logger_names(" wandb, csv ,") == ["wandb", "csv"]
    with pytest.raises(UserError, match="choose one or more of csv, tensorboard, wandb"):
        logger_names("mlflow")


def test_csv_only_writes_no_tensorboard_logs(tiny, tmp_path, one_thread):
    out_dir = tmp_path / "out"
    cli("lora", argv=flags(tiny, out_dir, "--logger", "csv"))
    assert [float(r["train_loss"]) for r in metrics(out_dir) if r.get("train_loss")]
    assert not (out_dir / "logs" / "tensorboard").exists()


def test_wandb_offline_logs_without_network(tiny, tmp_path, monkeypatch, one_thread):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out_dir = tmp_path / "out"
    cli("lora", argv=flags(tiny, out_dir, "--logger", "wandb"))
    runs = list((out_dir / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out_dir / "logs").rglob("*"))[:20]
    assert list(runs[0].glob("*.wandb")) and (out_dir / "final" / "lit_model.pth").is_file()
    assert not (out_dir / "logs" / "csv").exists()
