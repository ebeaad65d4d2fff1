"""`--method {dropbp,pld,greentrainer,none}` end to end in finetune/full.py, lora.py and qlora.py on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_resumed_from, crash_after_checkpoint, losses, metrics, run_finetune
from lit_gpt.methods.pld import pld_theta
from lit_gpt.training import TRAINING_STATE_FILE, cli

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["none", "dropbp", "pld", "greentrainer"]
SCRIPT_RUNS = {("full", "pld"), ("lora", "greentrainer"), ("qlora", "dropbp")}  # one subprocess per script is enough


def method_flags(tiny: dict, out_dir, kind: str, method: str, *extra: str, steps: int = 4, batch: int = 2) -> list[str]:
    return ["--checkpoint_dir", str(tiny["checkpoint_dir"]), "--data_dir", str(tiny["data_dir"]),
            "--out_dir", str(out_dir),
            "--method", method, "--drop_rate", "0.5" if method == "dropbp" else "0",
            # The tiny model's 32k-token head is most of its FLOPs: GreenTrainer needs a large budget to train anything.
            "--gt_rho", "0.8", "--pld_gamma", "0.5",  # θ(t) reaches θ̄ = 0.5 within a few steps, so blocks drop
            "--train.global_batch_size", str(batch), "--train.micro_batch_size", "2", "--train.max_steps", str(steps),
            "--train.warmup_steps", "2", "--train.eval_interval", str(steps), "--train.sample_tokens", "0",
            "--train.save_interval", "0", "--train.learning_rate", "3e-3" if kind == "full" else "2e-2", *extra]


@pytest.mark.parametrize("kind", ["full", "lora", "qlora"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_in_every_script_and_reports_its_flops(tiny, tmp_path, capsys, monkeypatch, kind, method):
    if kind == "qlora":
        pytest.importorskip("bitsandbytes")
    out_dir = tmp_path / "out"
    argv = method_flags(tiny, out_dir, kind, method)
    if (kind, method) in SCRIPT_RUNS:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # twice as fast for a tiny model on a busy 2-core machine
        result = run_finetune(kind, *argv)
        assert result.returncode == 0, result.stderr[-3000:]
        output = result.stdout
    else:
        cli(kind, argv=argv)
        output = capsys.readouterr().out
    rows = metrics(out_dir)
    val_loss = losses(rows, "val_loss")
    assert len(val_loss) == 2 and val_loss[1] < val_loss[0] - 0.1, val_loss

    # One micro-batch of the last step is counted with FlopCounterMode and priced by the cost model.
    (measured,), (theory,) = losses(rows, "flops_per_step_measured"), losses(rows, "flops_per_step_theory")
    assert 0.9 < measured / theory <= 1.0, (measured, theory)
    (summary,) = [line for line in output.splitlines() if line.startswith("summary: ")]
    assert f"method {method}," in summary and f"measured {measured:.4g}" in summary and "ms/step" in summary
    assert f"final val loss {val_loss[-1]:.4f}" in summary
    step_flops = losses(rows, "flops_theory")  # every step priced by the cost model, for the decisions it took
    assert len(step_flops) == 4 and f"mean theory over 4 steps {sum(step_flops) / 4:.4g}" in summary

    if method == "dropbp":
        assert max(losses(rows, "realised_drop_rate")) > 0
    else:  # only DropBP logs a drop rate
        assert all("realised_drop_rate" not in row for row in rows)
    if method == "pld":
        assert losses(rows, "pld_theta") == pytest.approx([pld_theta(t, 0.5, 0.5) for t in range(4)])
        assert min(losses(rows, "pld_kept_fraction")) < 1  # some block was skipped
    if method == "greentrainer":
        assert "GreenTrainer trains" in output
        selected, fraction = losses(rows, "gt_selected_tensors"), losses(rows, "gt_backward_fraction")
        assert min(selected) >= 1 and 0 < max(fraction) < 1
        if kind == "full":  # only the selected tensors moved (one selection: the run stays in epoch 0)
            base = torch.load(tiny["checkpoint_dir"] / "lit_model.pth", weights_only=True)
            final = torch.load(out_dir / "final" / "lit_model.pth", weights_only=True)
            assert sum(not torch.equal(base[k], final[k]) for k in base) == selected[-1] < len(base)
    assert f"method:\n  name: {method}" in (out_dir / "hyperparameters.yaml").read_text()


def test_pld_at_theta_one_reproduces_method_none_exactly(tiny, tmp_path):
    cli("full", argv=method_flags(tiny, tmp_path / "none", "full", "none", steps=3))
    cli("full", argv=method_flags(tiny, tmp_path / "pld", "full", "pld", "--pld_theta", "1.0", steps=3))
    plain = torch.load(tmp_path / "none" / "final" / "lit_model.pth", weights_only=True)
    pld = torch.load(tmp_path / "pld" / "final" / "lit_model.pth", weights_only=True)
    assert plain.keys() == pld.keys() and all(torch.equal(plain[k], pld[k]) for k in plain)


@pytest.mark.parametrize("kind, method", [("full", "pld"), ("lora", "greentrainer")])
def test_resumed_run_is_bit_identical_for_the_baselines(tiny, tmp_path, monkeypatch, capsys, kind, method):
    # 10 optimizer steps per epoch: GreenTrainer selects at step 0, its state carries the choice over the
    # resume at step 5, and it selects again at step 10 (epoch 1). PLD's θ and decision counter carry over.
    def flags(name: str, *more: str) -> list[str]:
        return method_flags(tiny, tmp_path / name, kind, method, "--train.save_interval", "5", *more, steps=12, batch=4)

    cli(kind, argv=flags("straight"))

    with monkeypatch.context() as patch:
        crash_after_checkpoint(patch, step=5)
        with pytest.raises(KeyboardInterrupt):
            cli(kind, argv=flags("resumed"))
    state = torch.load(tmp_path / "resumed" / "step-000005" / TRAINING_STATE_FILE, weights_only=False)["method"]
    assert state["name"] == method
    capsys.readouterr()
    cli(kind, argv=flags("resumed", "--resume", "auto"))
    assert_resumed_from(tmp_path / "resumed", capsys.readouterr().out, step=5, max_steps=12)

    straight = torch.load(tmp_path / "straight" / "final" / "lit_model.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "final" / "lit_model.pth", weights_only=True)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    if method == "greentrainer":
        assert state["selected_epoch"] == 0 and any(state["selected"])
        rows = metrics(tmp_path / "straight")
        assert len(losses(rows, "gt_selected_tensors")) == 12
    else:
        assert state["draws"] == 5 * 2 and state["theta"] == pytest.approx(pld_theta(4, 0.5, 0.5))
        assert math.isclose(losses(metrics(tmp_path / "straight"), "pld_theta")[-1], pld_theta(11, 0.5, 0.5))


def test_method_mistakes_are_one_line_errors(tiny, tmp_path, capsys):
    cases = [
        (["--method", "pld", "--drop_rate", "0.5"], "which is --method dropbp"),
        (["--method", "greentrainer", "--gt_rho", "0.2"], "the forward pass alone"),
        (["--method", "pld", "--pld_theta", "0"], "--pld_theta must be in (0, 1]"),
        (["--method", "greentrainer", "--gt_interval", "0"], "--gt_interval"),
    ]
    for extra, fragment in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli("lora", argv=method_flags(tiny, tmp_path / "out", "lora", "none") + extra)
        assert exit_info.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and fragment in lines[0], (extra, lines)


def test_greentrainer_at_half_budget_trains_nothing_on_the_tiny_shape_and_says_so(tiny, tmp_path, capsys):
    # The 32k-token head is most of the tiny model's FLOPs: at --gt_rho 0.5 no tensor's backward fits the budget.
    capsys.readouterr()
    cli("full", argv=method_flags(tiny, tmp_path / "out", "full", "greentrainer", "--gt_rho", "0.5", steps=2))
    output = capsys.readouterr().out
    assert "GreenTrainer trains 0 of" in output and "this epoch trains nothing" in output, output[-3000:]
    assert losses(metrics(tmp_path / "out"), "gt_selected_tensors") == [0, 0]
    base = torch.load(tiny["checkpoint_dir"] / "lit_model.pth", weights_only=True)
    final = torch.load(tmp_path / "out" / "final" / "lit_model.pth", weights_only=True)
    assert base.keys() == final.keys() and all(torch.equal(base[k], final[k]) for k in base)
