"""Two-process DDP on CPU (gloo): ranks agree on every drop decision and on the weights, match one process, resume
exactly, calibrate alike, and never hang when every trainable branch is dropped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, save_random_checkpoint
from lit_gpt import Config

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

WORKER = ROOT / "tests" / "helpers" / "distributed_worker.py"
TINY = dict(name="tiny", n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=64, vocab_size=128,
            block_size=32)


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory) -> dict[str, Path]:
    """A tiny random checkpoint and data whose samples all have 24 tokens, so that a mean over one big
    micro-batch equals the mean over the ranks' halves of it."""
    root = tmp_path_factory.mktemp("distributed")
    checkpoint_dir = save_random_checkpoint(root / "tiny", Config(**TINY))
    data_dir = root / "data"
    data_dir.mkdir()
    generator = torch.Generator().manual_seed(1)
    for split, count in (("train", 64), ("test", 8)):
        ids = torch.randint(1, 128, (count, 24), generator=generator)
        ids[:, 12:] = ids[:, :12]  # a repeated half: learnable, so the loss falls
        torch.save([{"input_ids": row, "labels": row.clone()} for row in ids], data_dir / f"{split}.pt")
    return {"root": root, "checkpoint_dir": checkpoint_dir, "data_dir": data_dir}


def run(setup_dir: dict, name: str, kind: str, *flags: str, devices: int = 2, crash_after_step: int | None = None,
        expect_code: int = 0) -> Path:
    record_dir = setup_dir["root"] / name
    crash = ["--crash_after_step", str(crash_after_step)] if crash_after_step is not None else []
    command = [sys.executable, str(WORKER), str(record_dir), kind, *crash, "--",
               "--checkpoint_dir", str(setup_dir["checkpoint_dir"]), "--data_dir", str(setup_dir["data_dir"]),
               "--out_dir", str(setup_dir["root"] / f"out-{name.split(':')[0]}"), "--devices", str(devices),
               "--train.max_steps", "8", "--train.warmup_steps", "2", "--train.learning_rate", "3e-3",
               "--train.global_batch_size", "8", "--train.sample_tokens", "0", "--train.eval_interval", "8",
               "--train.length_grouped", "false", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == expect_code, result.stderr[-4000:]
    return record_dir


def records(record_dir: Path, world_size: int = 2) -> list[tuple[dict, dict]]:
    return [(json.loads((record_dir / f"rank{r}.json").read_text()),
             torch.load(record_dir / f"rank{r}.pth", weights_only=True)) for r in range(world_size)]


def assert_same_weights(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def ddp_full(setup_dir) -> Path:
    return run(setup_dir, "ddp", "full", "--drop_rate", "0.875", "--sensitivity", "none",
               "--train.micro_batch_size", "2", "--train.save_interval", "4")


def test_ranks_drop_the_same_branches_and_end_with_the_same_weights(ddp_full):
    (rank0, weights0), (rank1, weights1) = records(ddp_full)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert len(rank0["decisions"]) == 8 * 2  # two micro-batches of 2 per rank per optimizer step
    assert rank0["decisions"] == rank1["decisions"]
    assert len({tuple(d) for d in rank0["decisions"]}) > 1  # the pattern does change from step to step
    assert_same_weights(weights0, weights1)


def test_ddp_matches_one_process_with_the_same_global_batch(setup_dir, ddp_full):
    # Two ranks x micro-batches of 2 = one process x micro-batches of 4: the same samples meet the same decisions.
    single = run(setup_dir, "single", "full", "--drop_rate", "0.875", "--sensitivity", "none",
                 "--train.micro_batch_size", "4", devices=1)
    ((record, weights),) = records(single, world_size=1)
    (ddp_record, ddp_weights), _ = records(ddp_full)
    assert record["decisions"] == ddp_record["decisions"]
    initial = torch.load(setup_dir["checkpoint_dir"] / "lit_model.pth", weights_only=True)
    assert not torch.equal(weights["lm_head.weight"], initial["lm_head.weight"])  # it trained
    assert_same_weights(weights, ddp_weights, exact=False)


def test_ddp_resume_is_exact(setup_dir, ddp_full):
    flags = ["--drop_rate", "0.875", "--sensitivity", "none", "--train.micro_batch_size", "2", "--train.save_interval", "4"]
    run(setup_dir, "resumed:crash", "full", *flags, crash_after_step=4, expect_code=3)
    out_dir = setup_dir["root"] / "out-resumed"
    assert [p.name for p in sorted(out_dir.glob("step-*"))] == ["step-000004"]
    resumed = run(setup_dir, "resumed", "full", *flags, "--resume", "auto")
    (_, straight), _ = records(ddp_full)
    (record, weights), (_, weights1) = records(resumed)
    assert len(record["decisions"]) == 4 * 2  # only the last four steps ran
    assert_same_weights(weights, straight)
    assert_same_weights(weights1, straight)


def test_lora_calibration_and_skipped_backwards_agree_across_ranks(setup_dir):
    # No adapter on the head: whenever all four branches are dropped, no trainable weight can get a gradient,
    # so both ranks skip backward() together. Calibration at step 1 must give both ranks the same rates.
    record_dir = run(setup_dir, "lora", "lora", "--drop_rate", "0.875", "--lora.head", "false", "--lora.r", "4",
                     "--sensitivity", "grad", "--sensitivity_at", "0.125", "--train.micro_batch_size", "2")
    (rank0, weights0), (rank1, weights1) = records(record_dir)
    assert rank0["decisions"] == rank1["decisions"]
    assert any(all(d) for d in rank0["decisions"]), "no micro-batch dropped every branch: nothing was tested"
    assert rank0["sensitivities"] is not None and rank0["sensitivities"] == rank1["sensitivities"]
    assert rank0["drop_rates"] == rank1["drop_rates"] and rank0["drop_rates"] != [0.875] * 4
    assert_same_weights(weights0, weights1)
