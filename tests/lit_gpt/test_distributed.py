"""Two processes on CPU (gloo), under DDP and under FSDP: ranks agree on every drop decision and on the weights,
match one process, resume exactly, calibrate alike, and never hang when every trainable branch is dropped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from conftest import ROOT, logged_runs, logged_steps, save_random_checkpoint, tiny_shape
from lit_gpt import Config
from lit_gpt.data import IGNORE_INDEX, micro_batches
from lit_gpt.loss import next_token_loss
from lit_gpt.model import GPT
from lit_gpt.stream import MicroBatchStream
from lit_gpt.training import TRAINING_STATE_FILE

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

WORKER = ROOT / "tests" / "helpers" / "distributed_worker.py"
TINY = tiny_shape(n_embd=32, intermediate_size=64, vocab_size=128, block_size=32)


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
    return run_jobs(setup_dir, [(name, kind, list(flags), crash_after_step)], devices, expect_code)[0]


def run_jobs(setup_dir: dict, jobs: list[tuple[str, str, list[str], int | None]], devices: int = 2,
             expect_code: int = 0, timeout: float = 300) -> list[Path]:
    """Run the jobs (name, kind, flags, crash_after_step) one after the other in one launch of `devices` processes.

    Each job records into `root/<name>` and writes its run into `root/out-<name before any ':'>`. On timeout every
    process of the launch (Lightning starts the other ranks itself) is killed, and the test fails.
    """
    command = [sys.executable, str(WORKER)]
    for number, (name, kind, flags, crash_after_step) in enumerate(jobs):
        crash = ["--crash_after_step", str(crash_after_step)] if crash_after_step is not None else []
        command += ["--then"] if number else []
        command += [str(setup_dir["root"] / name), kind, *crash, "--",
                    "--checkpoint_dir", str(setup_dir["checkpoint_dir"]), "--data_dir", str(setup_dir["data_dir"]),
                    "--out_dir", str(setup_dir["root"] / f"out-{name.split(':')[0]}"), "--devices", str(devices),
                    "--train.max_steps", "8", "--train.warmup_steps", "2", "--train.learning_rate", "3e-3",
                    "--train.global_batch_size", "8", "--train.sample_tokens", "0", "--train.eval_interval", "8",
                    "--train.length_grouped", "false", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # rank 0 and the ranks it started
        _, stderr = process.communicate()
        pytest.fail(f"the {devices}-process run hung for {timeout} s:\n{stderr[-4000:]}")
    assert process.returncode == expect_code, stderr[-4000:]
    return [setup_dir["root"] / name for name, *_ in jobs]


def records(record_dir: Path, world_size: int = 2) -> list[tuple[dict, dict]]:
    return [(json.loads((record_dir / f"rank{r}.json").read_text()),
             torch.load(record_dir / f"rank{r}.pth", weights_only=True)) for r in range(world_size)]


def assert_same_weights(a: dict, b: dict, exact: bool = True, atol: float | None = None) -> None:
    """Bit-identical; or, with `exact=False`, to Adam-amplified rounding (about 5e-6 here); or within `atol`."""
    assert a.keys() == b.keys()
    for key in a:
        if atol is not None:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)
        elif exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_same_gradients(a: dict, b: dict) -> None:
    """The same tensors got gradients, and they agree to float32 rounding (not a factor of the world size)."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)


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
    print(f"DDP vs one process: max weight difference {max_difference(weights, ddp_weights):.2e}")
    assert_same_weights(weights, ddp_weights, exact=False)
    # The first step's gradients, averaged over the ranks: Adam would hide a sum in place of the mean.
    grads, ddp_grads, ddp_grads1 = (torch.load(path, weights_only=True) for path in (
        single / "rank0_grads.pth", ddp_full / "rank0_grads.pth", ddp_full / "rank1_grads.pth"))
    assert grads and "lm_head.weight" in grads
    print(f"DDP vs one process: max first-step gradient difference {max_difference(grads, ddp_grads):.2e}")
    assert_same_weights(ddp_grads, ddp_grads1)
    assert_same_gradients(ddp_grads, grads)


def test_ddp_resume_is_exact(setup_dir, ddp_full):
    flags = ["--drop_rate", "0.875", "--sensitivity", "none", "--train.micro_batch_size", "2",
             "--train.save_interval", "4"]
    run(setup_dir, "resumed:crash", "full", *flags, crash_after_step=4, expect_code=3)
    out_dir = setup_dir["root"] / "out-resumed"
    assert [p.name for p in sorted(out_dir.glob("step-*"))] == ["step-000004"]
    resumed = run(setup_dir, "resumed", "full", *flags, "--resume", "auto")
    (_, straight), _ = records(ddp_full)
    (record, weights), (_, weights1) = records(resumed)
    assert len(record["decisions"]) == 4 * 2  # only the last four steps ran
    assert_same_weights(weights, straight)
    assert_same_weights(weights1, straight)


def step_gradients(checkpoint_dir: Path, streams: list[MicroBatchStream], accumulation: int) -> dict[str, Tensor]:
    """The first optimizer step's gradients of full fine-tuning with no drops, computed in this process: each
    stream plays one rank, its micro-batch losses are token means over its own micro-batch, accumulated and
    averaged over the ranks, exactly as the documented rule says."""
    model = GPT(Config.from_checkpoint(checkpoint_dir))
    model.load_state_dict(torch.load(checkpoint_dir / "lit_model.pth", weights_only=True))
    for stream in streams:
        for micro in range(accumulation):
            input_ids, labels = stream[micro]
            (next_token_loss(model(input_ids), labels) / (accumulation * len(streams))).backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def variable_length_runs(setup_dir) -> tuple[dict, dict[str, Path]]:
    """Two-process DDP runs on samples of 6 to 24 tokens: under the defaults (length grouping on) and without
    length grouping. No drops, so that only the data and the loss's normalisation are compared."""
    data_dir = setup_dir["root"] / "variable-data"
    data_dir.mkdir()
    generator = torch.Generator().manual_seed(2)
    for split, count in (("train", 64), ("test", 8)):
        lengths = torch.randint(6, 25, (count,), generator=generator).tolist()
        rows = [torch.randint(1, 128, (n,), generator=generator) for n in lengths]
        torch.save([{"input_ids": row, "labels": row.clone()} for row in rows], data_dir / f"{split}.pt")
    setup = {**setup_dir, "data_dir": data_dir}
    flags = ["--drop_rate", "0", "--train.micro_batch_size", "2", "--train.max_steps", "1"]
    jobs = [("grouped", "full", [*flags, "--train.length_grouped", "true"], None),
            ("ungrouped", "full", flags, None)]
    return setup, dict(zip([name for name, *_ in jobs], run_jobs(setup, jobs)))


@pytest.mark.parametrize("length_grouped", [True, False])
def test_ddp_under_the_defaults_follows_the_documented_rule_not_one_process(variable_length_runs, length_grouped):
    # With samples of different lengths, each rank's loss is a token mean over its own micro-batches; with length
    # grouping, the ranks' micro-batches are not those of one process either. The run must be exactly that rule
    # (so the tutorial's statement holds), and the rule must differ measurably from one process (so it is tested).
    setup, runs = variable_length_runs
    ddp_grads = torch.load(runs["grouped" if length_grouped else "ungrouped"] / "rank0_grads.pth", weights_only=True)
    train_set = torch.load(setup["data_dir"] / "train.pt", weights_only=True)
    ranks = [MicroBatchStream(train_set, 2, 32, 1337, length_grouped, rank, 2) for rank in range(2)]
    one_process = MicroBatchStream(train_set, 4, 32, 1337, length_grouped)
    accumulation = 8 // (2 * 2)
    rank_tokens = [sum(int((r[m][1][:, 1:] != IGNORE_INDEX).sum()) for m in range(accumulation)) for r in ranks]
    assert rank_tokens[0] != rank_tokens[1]  # otherwise per-rank and global token means would coincide
    lengths = [len(sample["input_ids"]) for sample in train_set]
    rank_batches = micro_batches(lengths, 2, 1337, 0, length_grouped)[: accumulation * 2]
    one_batches = micro_batches(lengths, 4, 1337, 0, length_grouped)[:accumulation]
    same_samples = sorted(i for batch in rank_batches for i in batch) == sorted(i for b in one_batches for i in b)
    assert same_samples is not length_grouped  # grouping changes which samples a step sees

    documented = step_gradients(setup["checkpoint_dir"], ranks, accumulation)
    single = step_gradients(setup["checkpoint_dir"], [one_process], accumulation)
    print(f"length_grouped={length_grouped}: DDP vs the rule {max_difference(ddp_grads, documented):.2e}, "
          f"vs one process {max_difference(ddp_grads, single):.2e}")
    assert_same_gradients(ddp_grads, documented)
    assert max_difference(ddp_grads, single) > 100 * max_difference(ddp_grads, documented)


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


# ---------------------------------------------------------------------- FSDP
# Full fine-tuning, calibrated by gradient norms at step 1 on 4 samples (2 per rank under FSDP).
CALIBRATED = ["--drop_rate", "0.875", "--sensitivity", "gradnorm", "--sensitivity_at", "0.125",
              "--calibration_batch_size", "4"]
LORA = ["--drop_rate", "0.875", "--lora.head", "false", "--lora.r", "4", "--sensitivity", "grad",
        "--sensitivity_at", "0.125"]
FSDP = ["--strategy", "fsdp", "--train.micro_batch_size", "2"]


@pytest.fixture(scope="module")
def fsdp_runs(setup_dir) -> dict[str, Path]:
    """Five FSDP runs in one launch of two processes (starting them costs more than these tiny runs)."""
    jobs = [
        ("fsdp", "full", [*CALIBRATED, *FSDP, "--train.save_interval", "4"], None),
        ("fsdp-resumed:crash", "full", [*CALIBRATED, *FSDP, "--train.save_interval", "4"], 4),
        ("fsdp-resumed", "full", [*CALIBRATED, *FSDP, "--train.save_interval", "4", "--resume", "auto"], None),
        ("fsdp-lora", "lora", [*LORA, *FSDP], None),
        ("fsdp-checkpointed", "full", [*CALIBRATED, *FSDP, "--activation_checkpointing", "true"], None),
    ]
    return dict(zip([name for name, *_ in jobs], run_jobs(setup_dir, jobs, timeout=240)))


@pytest.fixture(scope="module")
def single_runs(setup_dir, fsdp_runs) -> dict[str, Path]:
    """The same runs on one process with micro-batches twice as large, plus a resume from an FSDP checkpoint."""
    fsdp_checkpoint = setup_dir["root"] / "out-fsdp" / "step-000004"
    jobs = [
        ("single-calibrated", "full", [*CALIBRATED, "--train.micro_batch_size", "4"], None),
        ("single-lora", "lora", [*LORA, "--train.micro_batch_size", "4"], None),
        ("single-from-fsdp", "full", [*CALIBRATED, "--train.micro_batch_size", "4", "--resume", str(fsdp_checkpoint)],
         None),
    ]
    return dict(zip([name for name, *_ in jobs], run_jobs(setup_dir, jobs, devices=1, timeout=240)))


def test_fsdp_shards_drops_alike_and_matches_one_process(setup_dir, fsdp_runs, single_runs):
    (rank0, weights0), (rank1, weights1) = records(fsdp_runs["fsdp"])
    ((single, single_weights),) = records(single_runs["single-calibrated"], world_size=1)
    assert rank0["sharded"] and rank1["sharded"] and not single["sharded"]
    for rank in (rank0, rank1):  # each rank holds half of every weight (each of these splits evenly)
        assert 2 * rank["local_numel"] == rank["full_numel"]
    assert len(rank0["decisions"]) == 8 * 2
    assert rank0["decisions"] == rank1["decisions"] == single["decisions"]
    assert len({tuple(d) for d in rank0["decisions"]}) > 1
    assert_same_weights(weights0, weights1)  # whole weights, gathered from both ranks' shards
    initial = torch.load(setup_dir["checkpoint_dir"] / "lit_model.pth", weights_only=True)
    assert not torch.equal(single_weights["lm_head.weight"], initial["lm_head.weight"])  # it trained
    print(f"FSDP vs one process: max weight difference {max_difference(weights0, single_weights):.2e}")
    assert_same_weights(weights0, single_weights, exact=False)
    # The first step's gradients, reduce-scattered (averaged) into the shards, match one process's.
    assert_same_gradients(*(torch.load(path, weights_only=True) for path in (
        fsdp_runs["fsdp"] / "rank0_grads.pth", single_runs["single-calibrated"] / "rank0_grads.pth")))


def test_fsdp_calibration_measures_whole_gradients_and_allocates_alike(fsdp_runs, single_runs):
    (rank0, _), (rank1, _) = records(fsdp_runs["fsdp"])
    ((single, _),) = records(single_runs["single-calibrated"], world_size=1)
    assert rank0["sensitivities"] is not None and rank0["sensitivities"] == rank1["sensitivities"]
    # Each rank saw 2 of the 4 calibration samples; with the gradients averaged over the ranks before any norm,
    # the sensitivities are those of the whole batch's full gradients, as one process measures them.
    torch.testing.assert_close(torch.tensor(rank0["sensitivities"]), torch.tensor(single["sensitivities"]),
                               rtol=1e-6, atol=0)
    assert rank0["drop_rates"] == rank1["drop_rates"] == single["drop_rates"] != [0.875] * 4


def test_fsdp_resume_is_exact_and_checkpoints_read_like_one_process(setup_dir, fsdp_runs, single_runs):
    from lit_gpt.checkpoint import load_finetuned

    out_dir = setup_dir["root"] / "out-fsdp-resumed"
    assert [p.name for p in sorted(out_dir.glob("step-*"))] == ["step-000004", "step-000008"]
    (_, straight), _ = records(fsdp_runs["fsdp"])
    (record, weights), (_, weights1) = records(fsdp_runs["fsdp-resumed"])
    assert len(record["decisions"]) == 4 * 2  # only the last four steps ran
    assert_same_weights(weights, straight)
    assert_same_weights(weights1, straight)
    # final/ loads like a one-process run's, and the optimizer state is whole tensors keyed by parameter index
    assert_same_weights(load_finetuned(setup_dir["root"] / "out-fsdp" / "final").state_dict(), straight)
    # the optimizer state holds whole tensors in one process's format: the same entries as one process writes
    fsdp_state, single_state = (torch.load(setup_dir["root"] / f"out-{name}" / "step-000008" / TRAINING_STATE_FILE,
                                           weights_only=False)["optimizer"] for name in ("fsdp", "single-calibrated"))
    assert fsdp_state["param_groups"] == single_state["param_groups"]
    assert fsdp_state["state"].keys() == single_state["state"].keys() and fsdp_state["state"]
    for index, values in fsdp_state["state"].items():
        expected_shape = single_state["state"][index]["exp_avg"].shape
        assert type(values["exp_avg"]) is torch.Tensor and values["exp_avg"].shape == expected_shape
    # one process resumes the FSDP checkpoint at step 4 (it draws and logs only the last four steps) and ends
    # where one process alone does
    ((from_fsdp_record, from_fsdp),) = records(single_runs["single-from-fsdp"], world_size=1)
    ((_, single),) = records(single_runs["single-calibrated"], world_size=1)
    assert len(from_fsdp_record["decisions"]) == 4 * 2
    (rows,) = logged_runs(setup_dir["root"] / "out-single-from-fsdp")
    assert logged_steps(rows) == [5, 6, 7, 8]
    saved = torch.load(setup_dir["root"] / "out-single-from-fsdp" / "step-000008" / TRAINING_STATE_FILE,
                       weights_only=False)
    # decisions drawn, the FSDP run's included
    assert saved["step"] == 8 and saved["method"]["handler"]["step"] == 8 * 2
    print(f"one process resumed from FSDP: max weight difference {max_difference(from_fsdp, single):.2e}")
    assert_same_weights(from_fsdp, single, exact=False)


def test_fsdp_lora_skips_backward_together_and_keeps_the_frozen_base_out_of_the_optimizer(fsdp_runs, single_runs):
    # No adapter on the head: whenever all four branches are dropped nothing trainable can get a gradient, so
    # both ranks skip backward(); the launch's timeout catches a hang.
    (rank0, weights0), (rank1, weights1) = records(fsdp_runs["fsdp-lora"])
    ((single, single_weights),) = records(single_runs["single-lora"], world_size=1)
    assert rank0["decisions"] == rank1["decisions"] == single["decisions"]
    steps = [(all(rank0["decisions"][2 * s]), all(rank0["decisions"][2 * s + 1])) for s in range(8)]
    assert (False, True) in steps, "no step skipped only its last backward(): nothing was tested"
    skipped = sum(all(d) for d in rank0["decisions"])
    assert skipped and rank0["backward_calls"] == rank1["backward_calls"] == 16 - skipped
    assert rank0["optimizer_params"] == rank0["trainable_params"]
    assert rank0["optimizer_params"] and all("lora_" in name for name in rank0["optimizer_params"])
    assert rank0["sensitivities"] == rank1["sensitivities"] and rank0["drop_rates"] == rank1["drop_rates"]
    assert_same_weights(weights0, weights1)
    print(f"FSDP LoRA vs one process: max weight difference {max_difference(weights0, single_weights):.2e}")
    # The gradients agree to rounding (below); the weights to Adam-amplified rounding: an adapter whose gradient is
    # near zero takes a step of about the learning rate whatever its sign (3.4e-7 measured).
    assert_same_weights(weights0, single_weights, exact=False)
    grads, single_grads = (torch.load(path, weights_only=True) for path in (
        fsdp_runs["fsdp-lora"] / "rank0_grads.pth", single_runs["single-lora"] / "rank0_grads.pth"))
    assert grads and all("lora_" in name for name in grads)
    assert_same_gradients(grads, single_grads)


def test_fsdp_activation_checkpointing_changes_nothing(fsdp_runs):
    (record, weights), _ = records(fsdp_runs["fsdp-checkpointed"])
    (straight_record, straight), _ = records(fsdp_runs["fsdp"])
    assert record["decisions"] == straight_record["decisions"]
    # It is on: a block with a branch that was not dropped runs its forward again in backward.
    recomputed = record["block_forwards"] - straight_record["block_forwards"]
    kept = sum(not all(d) for d in record["decisions"])  # micro-batches in which some block kept a branch
    assert kept and recomputed >= kept, (recomputed, kept)
    assert record["sensitivities"] == pytest.approx(straight_record["sensitivities"], rel=1e-6)
    assert_same_weights(weights, straight, exact=False)


def test_fsdp_refuses_what_it_cannot_shard(setup_dir):
    from lit_gpt.training import parse_args, validate
    from lit_gpt.utils import UserError

    base = ["--checkpoint_dir", str(setup_dir["checkpoint_dir"]), "--data_dir", str(setup_dir["data_dir"])]
    cases = [("qlora", ["--strategy", "fsdp"], "bitsandbytes' 4-bit weights cannot be sharded"),
             ("qlora", ["--strategy", "fsdp", "--devices", "2"], "QLoRA runs on one device"),
             ("full", ["--strategy", "fsdp", "--method", "greentrainer", "--drop_rate", "0"], "greentrainer")]
    for kind, flags, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            validate(parse_args(kind, base + flags))


def test_fsdp_on_one_device_trains_like_auto_and_writes_a_checkpoint_that_loads(setup_dir):
    # One process, nothing to shard: FSDP's code path (fully_shard on a one-rank mesh, DTensor parameters,
    # reduce-scatter over one rank, gathered checkpoints) must train the same model as no wrapper at all.
    from lit_gpt.checkpoint import load_finetuned

    flags = ["--drop_rate", "0.875", "--sensitivity", "gradnorm", "--sensitivity_at", "0.125",
             "--train.micro_batch_size", "4"]
    jobs = [("one-fsdp", "full", [*flags, "--strategy", "fsdp"], None), ("one-auto", "full", flags, None)]
    fsdp_dir, auto_dir = run_jobs(setup_dir, jobs, devices=1, timeout=240)
    ((fsdp, fsdp_weights),) = records(fsdp_dir, world_size=1)
    ((auto, auto_weights),) = records(auto_dir, world_size=1)
    assert fsdp["sharded"] and not auto["sharded"]  # the strategies really differ
    assert fsdp["decisions"] == auto["decisions"] and len({tuple(d) for d in auto["decisions"]}) > 1
    assert fsdp["drop_rates"] == auto["drop_rates"] != [0.875] * 4
    initial = torch.load(setup_dir["checkpoint_dir"] / "lit_model.pth", weights_only=True)
    assert not torch.equal(auto_weights["lm_head.weight"], initial["lm_head.weight"])  # it trained
    # Bit-identical (measured): with one rank the reduce-scatter averages over one and the same CPU kernels run
    # on the same numbers, so any difference is a bug (a gradient scaled by a wrong world size, say).
    print(f"FSDP vs auto on one device: max weight difference {max_difference(fsdp_weights, auto_weights):.2e}")
    assert_same_weights(fsdp_weights, auto_weights)
    assert_same_weights(*(torch.load(path / "rank0_grads.pth", weights_only=True) for path in (fsdp_dir, auto_dir)))
    # final/ loads like any one-process run's, with the weights the run ended with
    assert_same_weights(load_finetuned(setup_dir["root"] / "out-one-fsdp" / "final").state_dict(), fsdp_weights)


def test_fsdp_in_the_weights_drop_mode_matches_one_process(setup_dir):
    # The dropped branches' weights are frozen only for their forward; FSDP gathers and reduce-scatters around that.
    weights_mode = [*CALIBRATED, "--drop_mode", "weights"]
    (fsdp_dir,) = run_jobs(setup_dir, [("fsdp-weights", "full", [*weights_mode, *FSDP], None)], timeout=240)
    (single_dir,) = run_jobs(setup_dir, [("single-weights", "full", [*weights_mode, "--train.micro_batch_size", "4"],
                                          None)], devices=1, timeout=240)
    (rank0, weights0), (rank1, weights1) = records(fsdp_dir)
    ((single, single_weights),) = records(single_dir, world_size=1)
    assert rank0["decisions"] == rank1["decisions"] == single["decisions"]
    assert rank0["sensitivities"] is not None and rank0["drop_rates"] == single["drop_rates"]
    assert_same_weights(weights0, weights1)
    assert_same_weights(weights0, single_weights, exact=False)
    assert_same_gradients(torch.load(fsdp_dir / "rank0_grads.pth", weights_only=True),
                          torch.load(single_dir / "rank0_grads.pth", weights_only=True))
