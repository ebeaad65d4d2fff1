"""The fine-tuning scripts end to end on a tiny model: outputs, DropBP calibration, resume, merge, bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import (
    ROOT,
    assert_one_line_error,
    assert_plot,
    assert_resumed_from,
    crash_after_checkpoint,
    logged_runs,
    logged_steps,
    losses,
    metrics,
    run_finetune,
    run_script,
    script_main,
)
from lit_gpt import Config
from lit_gpt.checkpoint import load_finetuned, load_model
from lit_gpt.lora import LoRALinear
from lit_gpt.train_state import step_checkpoints
from lit_gpt.training import TRAINING_STATE_FILE, Trainer, cli


def flags(tiny: dict, out_dir: Path, *extra: str, steps: int = 10) -> list[str]:
    return ["--checkpoint_dir", str(tiny["checkpoint_dir"]), "--data_dir", str(tiny["data_dir"]),
            "--out_dir", str(out_dir), "--drop_rate", "0.875", "--train.global_batch_size", "4",
            "--train.micro_batch_size", "2", "--train.max_steps", str(steps), "--train.warmup_steps", "2",
            "--train.eval_interval", str(steps // 2), "--train.sample_tokens", "4", *extra]


def assert_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Failed with exactly one `error: ...` line and no traceback (the progress bar may also be on stderr)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("kind, lr", [("full", "3e-3"), ("lora", "2e-2"), ("qlora", "2e-2")])
def test_each_script_trains_at_drop_rate_0875_and_writes_its_outputs(tiny, kind, lr):
    if kind == "qlora":
        pytest.importorskip("bitsandbytes")
    out_dir = tiny["root"] / f"out-{kind}"
    result = run_finetune(kind, *flags(tiny, out_dir, "--train.learning_rate", lr))
    assert result.returncode == 0, result.stderr[-3000:]

    rows = metrics(out_dir)
    train_loss, val_loss = losses(rows, "train_loss"), losses(rows, "val_loss")
    assert len(train_loss) == 10 and len(val_loss) == 3  # before training, at step 5 and at step 10
    assert sum(train_loss[-3:]) / 3 < 0.9 * sum(train_loss[:3]) / 3, train_loss
    assert val_loss[-1] < val_loss[0], val_loss
    realised = losses(rows, "realised_drop_rate")
    assert all(0.5 <= r <= 1.0 for r in realised), realised  # 3 or 4 of the 4 branches, weighted by FLOPs

    final = out_dir / "final"
    for name in ("lit_model.pth", "lit_config.json", "hyperparameters.yaml"):
        assert (final / name).is_file(), name
    assert (out_dir / "hyperparameters.yaml").is_file()
    assert list((out_dir / "logs" / "tensorboard").glob("version_*/events.out.tfevents.*"))
    assert_plot(out_dir / "drop_rates.png", 6.0, 2 * 3.2, dpi=120)  # the rates and the sensitivities, drawn
    history = json.loads((out_dir / "drop_rates.json").read_text())
    # Calibrated exactly once, at 10 % of the 10 optimizer steps, which moved the rates off the uniform 0.875.
    assert [entry["step"] for entry in history] == [0, 1]
    assert history[0]["drop_rates"] == [0.875] * 4 and history[0]["allocator"] == "uniform"
    assert history[1]["drop_rates"] != [0.875] * 4
    assert history[1]["metric"] == ("gradnorm" if kind == "full" else "grad")
    # Every branch has a positive sensitivity: all zeros would still move the rates (greedy ties break by index).
    assert len(history[1]["sensitivities"]) == 4 and all(s > 0 for s in history[1]["sensitivities"])

    weights = torch.load(final / "lit_model.pth", weights_only=True)
    if kind == "full":
        assert set(weights) == set(load_model(tiny["checkpoint_dir"]).state_dict())
    else:  # adapters only
        assert weights and all("lora_" in k for k in weights)


def test_qlora_base_linears_are_4bit(tiny, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from lit_gpt.training import RunArgs

    trainer = Trainer(RunArgs(finetuning="qlora", checkpoint_dir=tiny["checkpoint_dir"], data_dir=tiny["data_dir"],
                              out_dir=tmp_path, quantize="bnb.nf4-dq"))
    lora_layers = [m for m in trainer.model.modules() if isinstance(m, LoRALinear)]
    assert len(lora_layers) == 2 * 5 + 1  # qkv, proj, fc_1, fc_2, proj per block, and the head
    assert all(isinstance(m.linear, bnb.nn.Linear4bit) for m in lora_layers)
    assert all(m.linear.weight.bnb_quantized and not m.linear.weight.requires_grad for m in lora_layers)


def test_sensitivity_none_keeps_the_rates_uniform(tiny, tmp_path):
    cli("lora", argv=flags(tiny, tmp_path, "--sensitivity", "none", "--train.save_interval", "10"))
    history = json.loads((tmp_path / "drop_rates.json").read_text())
    assert [entry["allocator"] for entry in history] == ["uniform"]
    state = torch.load(tmp_path / "step-000010" / TRAINING_STATE_FILE, weights_only=False)
    assert state["method"]["handler"]["drop_rates"] == [0.875] * 4
    assert state["method"]["handler"]["step"] == 10 * 2  # one decision per micro-batch


@pytest.mark.parametrize("kind, variant", [("lora", []), ("full", []),
                                           ("full", ["--drop_mode", "weights", "--drop_schedule", "decay"])],
                         ids=["lora", "full", "full-weights-decay"])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tiny, tmp_path, monkeypatch, capsys, kind, variant):
    # LoRA dropout uses the global RNG, so an exact match also proves the RNG state is restored;
    # calibration at step 4 happens right after the resume.
    extra = ["--train.save_interval", "4", "--sensitivity_at", "0.5", "--train.learning_rate", "1e-2", *variant]
    if kind == "lora":
        extra += ["--lora.dropout", "0.1"]
    cli(kind, argv=flags(tiny, tmp_path / "straight", *extra, steps=8))

    with monkeypatch.context() as patch:
        crash_after_checkpoint(patch, step=4)  # the process dies right after its first checkpoint
        with pytest.raises(KeyboardInterrupt):
            cli(kind, argv=flags(tiny, tmp_path / "resumed", *extra, steps=8))
    assert not (tmp_path / "resumed" / "final").exists()
    capsys.readouterr()
    cli(kind, argv=flags(tiny, tmp_path / "resumed", *extra, "--resume", "auto", steps=8))
    # It really continued from step 4: a restart would also end with the same weights.
    assert_resumed_from(tmp_path / "resumed", capsys.readouterr().out, step=4, max_steps=8)

    straight = torch.load(tmp_path / "straight" / "final" / "lit_model.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "final" / "lit_model.pth", weights_only=True)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert_trained(tiny, kind, straight)
    history = json.loads((tmp_path / "resumed" / "drop_rates.json").read_text())
    assert [entry["step"] for entry in history] == [0, 4]


def assert_trained(tiny: dict, kind: str, weights: dict[str, torch.Tensor]) -> None:
    """The weights moved from where they started: the base checkpoint's, or LoRA's zero-initialised B."""
    if kind == "full":
        base = load_model(tiny["checkpoint_dir"]).state_dict()
        moved = [k for k in weights if not torch.equal(weights[k], base[k])]
        assert "lm_head.weight" in moved and any(k.startswith("transformer.h.") for k in moved), moved
    else:  # lora_B starts at zero, so a non-zero one was trained: the head's always, a block's when not dropped
        moved = [k for k, v in weights.items() if k.endswith("lora_B") and v.abs().sum() > 0]
        assert "lm_head.lora_B" in moved and any(k.startswith("transformer.h.") for k in moved), moved


def test_merged_lora_model_gives_the_same_logits(tiny, tmp_path):
    cli("lora", argv=flags(tiny, tmp_path / "run", "--train.learning_rate", "2e-2"))
    result = run_script("merge_lora.py", "--lora_path", str(tmp_path / "run" / "final"),
                        "--out_dir", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    merged = load_model(tmp_path / "merged").eval()
    unmerged = load_finetuned(tmp_path / "run" / "final", merge=False).eval()
    assert any(isinstance(m, LoRALinear) and m.lora_B.abs().sum() > 0 for m in unmerged.modules())
    ids = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), unmerged(ids), rtol=1e-5, atol=1e-5)



def test_lora_starts_a_fresh_run_from_a_peft_adapter(tiny, tmp_path, capsys):
    # A run's adapters go out to PEFT format and come back through scripts/import_peft.py; a new run started from
    # them begins where the first one ended (same validation loss at its step 0) and trains on from there.
    train = ["--train.learning_rate", "2e-2"]
    cli("lora", argv=flags(tiny, tmp_path / "first", *train))
    exported = run_script("export_peft.py", "--lora_path", str(tmp_path / "first" / "final"),
                          "--out_dir", str(tmp_path / "peft"))
    assert exported.returncode == 0, exported.stderr
    imported = run_script("import_peft.py", "--adapter_dir", str(tmp_path / "peft"),
                          "--checkpoint_dir", str(tiny["checkpoint_dir"]), "--out_dir", str(tmp_path / "imported"))
    assert imported.returncode == 0, imported.stderr
    capsys.readouterr()
    # A run that goes on from trained adapters takes a smaller peak rate: restarting the schedule at 2e-2 overshoots.
    cli("lora", argv=flags(tiny, tmp_path / "second", "--train.learning_rate", "5e-3", "--init_adapters",
                           str(tmp_path / "imported"), steps=4))
    assert f"adapters initialised from {tmp_path / 'imported'}" in capsys.readouterr().out
    first, second = (losses(metrics(tmp_path / run), "val_loss") for run in ("first", "second"))
    assert second[0] == pytest.approx(first[-1], rel=1e-6) and second[0] < 0.9 * first[0], (first, second)
    assert second[-1] < second[0], second
    imported = torch.load(tmp_path / "imported" / "lit_model.pth", weights_only=True)
    trained = torch.load(tmp_path / "second" / "final" / "lit_model.pth", weights_only=True)
    assert not torch.equal(imported["lm_head.lora_B"], trained["lm_head.lora_B"])


def test_init_adapters_refuses_what_it_cannot_start_from(tiny, tmp_path):
    run = tmp_path / "run"
    cli("lora", argv=flags(tiny, run, "--lora.r", "4", steps=2))
    result = run_finetune("lora", *flags(tiny, tmp_path / "other", "--init_adapters", str(run / "final"), steps=2))
    assert_error_line(result, "other LoRA settings", "--lora.r 4")
    result = run_finetune("full", *flags(tiny, tmp_path / "full", "--init_adapters", str(run / "final"), steps=2))
    assert_error_line(result, "--init_adapters", "merge_lora.py")
    result = run_finetune("lora", *flags(tiny, tmp_path / "none", "--init_adapters", str(tmp_path / "nowhere")))
    assert_error_line(result, "nowhere", "lit_model.pth")


def test_qlora_fp4_trains_and_its_merge_matches_the_4bit_model_with_adapters(tiny, tmp_path):
    pytest.importorskip("bitsandbytes")
    from lit_gpt.build import prepare_for_finetuning
    from lit_gpt.checkpoint import load_hyperparameters
    from lit_gpt.lora import LoRAConfig
    from lit_gpt.utils import run_cli

    run = tmp_path / "run"
    cli("qlora", argv=flags(tiny, run, "--quantize", "bnb.fp4", "--train.learning_rate", "2e-2",
                            "--train.sample_tokens", "0", steps=4))
    train_loss = losses(metrics(run), "train_loss")
    assert len(train_loss) == 4 and all(0 < loss < 20 for loss in train_loss), train_loss  # finite, sane
    hyperparameters = load_hyperparameters(run / "final")
    assert hyperparameters["quantize"] == "bnb.fp4"
    adapters = torch.load(run / "final" / "lit_model.pth", weights_only=True)
    assert_trained(tiny, "qlora", adapters)  # lora_B starts at zero: the head's and some block's moved

    merge = script_main("merge_lora").merge  # in this process: the scripts run the installed lit_gpt
    run_cli(merge, args=["--lora_path", str(run / "final"), "--out_dir", str(tmp_path / "merged")])
    merged = load_model(tmp_path / "merged").eval()

    def fp4_model(with_adapters: bool):
        """The model as QLoRA trained it: the base quantized to fp4, with (or without) the trained adapters."""
        model = prepare_for_finetuning(load_model(tiny["checkpoint_dir"]), "qlora",
                                       LoRAConfig(**hyperparameters["lora"]), "bnb.fp4")
        if with_adapters:
            assert not [k for k in model.load_state_dict(adapters, strict=False).missing_keys if "lora_" in k]
        return model.eval()

    ids = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_logits, trained, base_4bit = merged(ids), fp4_model(True)(ids), fp4_model(False)(ids)
        base_float = load_model(tiny["checkpoint_dir"]).eval()(ids)
        unmerged = load_finetuned(run / "final", merge=False).eval()(ids)  # float base, adapters beside it
    # merge_lora.py folds the adapters into the float base (a 4-bit weight cannot take them): exactly, up to
    # float32 rounding...
    torch.testing.assert_close(merged_logits, unmerged, rtol=1e-5, atol=1e-5)
    # ...so the merged model differs from the trained 4-bit one by the base's fp4 rounding error, passed on through
    # the adapters: measured 1.6x the bases' own difference; 2x is allowed.
    quantization_error = (base_float - base_4bit).abs().max().item()
    adapters_effect = (trained - base_4bit).abs().max().item()
    merge_error = (merged_logits - trained).abs().max().item()
    print(f"fp4 error {quantization_error:.3g}, adapters' effect {adapters_effect:.3g}, merge error {merge_error:.3g}")
    assert 0 < quantization_error and merge_error <= 2 * quantization_error
    assert adapters_effect > 2 * merge_error  # the merged model carries what the adapters learned


# ---------------------------------------------------------------------- bad input
def test_drop_rate_outside_0_1_is_a_one_line_error(tiny, tmp_path):
    for rate in ("1.0", "-0.1"):
        result = run_finetune("lora", *flags(tiny, tmp_path), "--drop_rate", rate)
        assert_one_line_error(result, "--drop_rate must be in [0, 1)", rate)


def test_bad_flags_fail_in_process_with_one_line(tiny, tmp_path, capsys):
    cases = [
        (["--train.max_seq_length", "4096"], "above the model's block_size 96"),
        (["--data_dir", str(tmp_path / "nowhere")], "prepare_alpaca.py"),
        (["--checkpoint_dir", str(tmp_path / "missing")], "does not exist"),
        (["--train.global_batch_size", "3"], "multiple of micro_batch_size"),
        (["--strategy", "fsdp", "--quantize", "bnb.nf4"], "QLoRA cannot run under --strategy fsdp"),
        (["--devices", "2", "--quantize", "bnb.nf4"], "QLoRA runs on one device"),
    ]
    for extra, fragment in cases:
        kind = "qlora" if "--quantize" in extra else "lora"
        with pytest.raises(SystemExit) as exit_info:
            cli(kind, argv=flags(tiny, tmp_path / "out") + extra)
        assert exit_info.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and fragment in lines[0], (extra, lines)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    # An absurd learning rate overflows the float32 weights after the first update, so step 2's loss is NaN.
    out_dir = tmp_path / "out"
    result = run_finetune("full", *flags(tiny, out_dir, "--train.learning_rate", "1e30", "--train.warmup_steps", "0",
                                         "--train.save_interval", "1"))
    assert_error_line(result, "at optimizer step 2", "step-000001", "--resume auto")
    assert [p.name for p in step_checkpoints(out_dir)] == ["step-000001"]
    assert not (out_dir / "final").exists()
    assert not list(out_dir.glob(".*partial"))



def make_loss_infinite(monkeypatch, module, name: str, from_call: int) -> None:
    """From its `from_call`-th call on, `module.name` returns the true loss times +inf: infinite, not NaN."""
    true_loss, calls = getattr(module, name), []

    def infinite_loss(*args, **kwargs):
        calls.append(1)
        loss = true_loss(*args, **kwargs)
        return loss * float("inf") if len(calls) >= from_call else loss

    monkeypatch.setattr(module, name, infinite_loss)


@pytest.mark.parametrize("where", ["training", "calibration"])
def test_infinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch, capsys,
                                                                              where):
    # A check for NaN alone (`loss != loss`) would let +inf through: Adam would then turn the weights into NaN.
    import lit_gpt.loss
    import lit_gpt.methods.dropbp

    if where == "training":  # two micro-batches per step: the third call is step 2's first micro-batch
        make_loss_infinite(monkeypatch, lit_gpt.loss, "chunked_next_token_loss", from_call=3)
    else:  # calibration runs at step 1 of 10 (10 %), before that step's micro-batches, on the training loss
        make_loss_infinite(monkeypatch, lit_gpt.methods.dropbp, "chunked_next_token_loss", from_call=1)
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli("lora", argv=flags(tiny, out_dir, "--train.save_interval", "1", "--train.sample_tokens", "0"))
    assert exit_info.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: the training loss became inf at optimizer step 2; "), line
    assert f"the last good checkpoint is {out_dir / 'step-000001'}" in line and "--resume auto" in line, line
    assert [p.name for p in step_checkpoints(out_dir)] == ["step-000001"]
    assert not (out_dir / "final").exists()


# ---------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_lora_on_real_smollm2_and_wordnet_lowers_the_validation_loss(smollm2_dir, tmp_path):
    if not Path("/usr/share/wordnet/data.noun").is_file():
        pytest.skip("WordNet is not installed: apt-get install --no-install-recommends wordnet-base")
    data_dir = tmp_path / "wordnet"
    result = run_script("prepare_wordnet.py", "--checkpoint_dir", str(smollm2_dir), "--destination_path", str(data_dir),
                        "--max_samples", "400", "--test_size", "24", "--max_seq_length", "64")
    assert result.returncode == 0, result.stderr
    out_dir = tmp_path / "out"
    result = run_finetune("lora", "--checkpoint_dir", str(smollm2_dir), "--data_dir", str(data_dir), "--out_dir",
                          str(out_dir), "--drop_rate", "0.875", "--train.global_batch_size", "4",
                          "--train.micro_batch_size", "2", "--train.max_steps", "24", "--train.warmup_steps", "2",
                          "--train.learning_rate", "2e-3", "--train.eval_interval", "24", "--train.sample_tokens", "0",
                          timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    val_loss = losses(metrics(out_dir), "val_loss")
    assert len(val_loss) == 2 and val_loss[1] < val_loss[0] - 0.1, val_loss
    history = json.loads((out_dir / "drop_rates.json").read_text())
    assert [entry["step"] for entry in history] == [0, 2] and len(history[1]["drop_rates"]) == 60


@pytest.mark.parametrize("config_file", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_parses_into_the_paper_settings(config_file):
    from lit_gpt.training import parse_args

    kind = next(k for k in ("qlora", "lora", "full") if f"-{k}-" in config_file.name)
    args = parse_args(kind, ["--config", str(config_file)])
    assert args.finetuning == kind and 0 < args.dropbp.drop_rate < 1
    assert Config.from_name(args.checkpoint_dir.name)  # names a known preset
    if "wordnet" not in config_file.name:  # the paper's Table 7: batch 128, LoRA r 8 and alpha 16
        assert args.train.global_batch_size == 128 and args.train.micro_batch_size in (1, 2)
        assert args.lora.r == 8 and args.lora.alpha == 16


# ---------------------------------------------------------------------- training-loop flags
def run_in_process(capsys, kind: str, argv: list[str]) -> str:
    capsys.readouterr()
    cli(kind, argv=argv)
    return capsys.readouterr().out


def test_recalibrate_every_calibrates_again_inside_the_loop(tiny, tmp_path):
    # 6 steps: first calibration at int(0.2 * 6) = 1, then every 2 steps: 1, 3, 5.
    cli("lora", argv=flags(tiny, tmp_path, "--sensitivity_at", "0.2", "--recalibrate_every", "2", steps=6))
    history = json.loads((tmp_path / "drop_rates.json").read_text())
    assert [entry["step"] for entry in history] == [0, 1, 3, 5]
    assert all(entry["allocator"] == "greedy" and entry["metric"] == "grad" for entry in history[1:])
    assert all(len(entry["sensitivities"]) == 4 and min(entry["sensitivities"]) > 0 for entry in history[1:])


def test_drop_schedule_decay_falls_to_full_backprop_at_the_last_step(tiny, tmp_path):
    cli("lora", argv=flags(tiny, tmp_path, "--sensitivity", "none", "--drop_schedule", "decay", steps=6))
    (rows,) = logged_runs(tmp_path)
    realised = losses(rows, "realised_drop_rate")
    assert len(realised) == 6 and realised[0] > 0.3 and realised[-1] == 0.0, realised
    assert sum(realised[:3]) > sum(realised[3:]), realised  # expected 0.875 * (1, 0.8, ..., 0)
    history = json.loads((tmp_path / "drop_rates.json").read_text())
    assert history[0]["drop_schedule"] == "decay" and history[0]["drop_rates"] == [0.875] * 4  # allocation kept


def test_full_finetuning_in_the_weights_drop_mode_calibrates_and_trains(tiny, tmp_path):
    cli("full", argv=flags(tiny, tmp_path, "--drop_mode", "weights", "--drop_rate", "0.5", "--sensitivity_at", "0.25",
                           "--train.learning_rate", "3e-3", steps=4))
    history = json.loads((tmp_path / "drop_rates.json").read_text())
    assert [entry["step"] for entry in history] == [0, 1] and history[1]["drop_mode"] == "weights"
    assert min(history[1]["sensitivities"]) > 0  # each branch's own weight gradient
    val_loss = losses(metrics(tmp_path), "val_loss")
    assert val_loss[-1] < val_loss[0], val_loss


def test_train_epochs_sets_the_run_length(tiny, tmp_path, capsys):
    # 40 training samples in micro-batches of 2 and optimizer steps of 20: 2 steps per epoch, 3 epochs.
    argv = flags(tiny, tmp_path, "--train.global_batch_size", "20", "--train.epochs", "3", "--train.max_steps", "null",
                 "--train.eval_interval", "100", "--train.sample_tokens", "0")
    output = run_in_process(capsys, "lora", argv)
    assert "training for 6 optimizer steps of 20 samples (10 micro-batches of 2 per device)" in output
    (rows,) = logged_runs(tmp_path)
    assert logged_steps(rows) == [1, 2, 3, 4, 5, 6]


def test_flops_allocator_meets_the_flops_budget_exactly(tiny, tmp_path):
    from dropbp.allocation import dropped_fraction

    cli("lora", argv=flags(tiny, tmp_path, "--allocator", "flops", steps=4))
    history = json.loads((tmp_path / "drop_rates.json").read_text())
    assert [entry["step"] for entry in history] == [0, 0]
    rates, branch_flops = history[1]["drop_rates"], history[1]["backward_flops"]
    assert history[1]["allocator"] == "flops" and rates != [0.875] * 4
    # It minimises the added variance on the budget's boundary, not on greedy's 0.1 grid.
    assert dropped_fraction(rates, branch_flops) == pytest.approx(0.875, abs=1e-6)
    assert any(abs(10 * r - round(10 * r)) > 1e-6 for r in rates), rates


@pytest.mark.parametrize("compensation", [True, False])
def test_lr_compensation_scales_each_branch_learning_rate(tiny, tmp_path, compensation):
    # Uniform rates of 0.875: a compensated branch trains at 1 / (1 - 0.875) = 8 times the scheduled rate.
    cli("lora", argv=flags(tiny, tmp_path, "--sensitivity", "none", "--lr_compensation", str(compensation).lower(),
                           "--train.save_interval", "4", steps=4))
    (rows,) = logged_runs(tmp_path)
    scheduled = float(rows_at(rows, 4)["learning_rate"])
    groups = torch.load(tmp_path / "step-000004" / TRAINING_STATE_FILE, weights_only=False)["optimizer"]["param_groups"]
    branch_lrs = [g["lr"] for g in groups if g.get("dropbp_branch", -1) >= 0]
    other_lrs = [g["lr"] for g in groups if g.get("dropbp_branch", -1) < 0]
    assert len(branch_lrs) == 4 and other_lrs  # the head's adapters belong to no branch
    assert branch_lrs == pytest.approx([scheduled * (8 if compensation else 1)] * 4, rel=1e-9)
    assert other_lrs == pytest.approx([scheduled] * len(other_lrs), rel=1e-9)


def rows_at(rows: list[dict], step: int, key: str = "learning_rate") -> dict:
    (row,) = [r for r in rows if r.get(key) and int(r["step"]) == step]
    return row
