"""bench.drop_rates end to end on a tiny random checkpoint, and its table on made-up runs.

The benchmark's numbers are not asserted (they belong to the real run); what is: the sensitivity runs are
calibrated at 10 % of the steps to non-uniform rates whose FLOPs-weighted mean meets the target, the uniform
runs keep the target everywhere, the two runs of a learning rate start alike, and every output is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import drop_rates
from conftest import add_sentencepiece_tokenizer, assert_plot, save_random_checkpoint
from lit_gpt import Config
from lit_gpt.utils import UserError

TINY = dict(name="tiny", n_layer=4, n_head=4, n_query_groups=2, n_embd=64, intermediate_size=128, vocab_size=32000,
            block_size=96)
TARGET = 0.875


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, one_thread):
    if not Path("/usr/share/wordnet/data.noun").is_file():
        pytest.skip("WordNet is not installed: apt-get install wordnet-base")
    root = tmp_path_factory.mktemp("drop_rates")
    checkpoint_dir = save_random_checkpoint(add_sentencepiece_tokenizer(root / "checkpoints" / "tiny"), Config(**TINY))
    out = root / "results"
    runs = drop_rates.main(checkpoint_dir=checkpoint_dir, learning_rates=[1e-2, 3e-2], drop_rate=TARGET, steps=10,
                           global_batch_size=2, micro_batch_size=2, max_seq_length=48, samples=40, test_size=6,
                           eval_interval=5, threads=1, work_dir=root / "work", out=out)
    return runs, out


def test_runs_pair_uniform_and_sensitivity_per_learning_rate(bench_run):
    runs, _ = bench_run
    assert [(r["learning_rate"], r["allocation"]) for r in runs] == [
        (1e-2, "uniform"), (1e-2, "sensitivity"), (3e-2, "uniform"), (3e-2, "sensitivity")]
    for _lr, uniform, sensitivity in drop_rates.pairs(runs):
        # Same seed, data and schedule: identical until the calibration (step 1), different after it.
        assert uniform["val_history"][0] == sensitivity["val_history"][0]
        assert [h["step"] for h in uniform["val_history"]] == [0, 5, 10]
        assert uniform["final_val_loss"] != sensitivity["final_val_loss"]


def test_uniform_runs_keep_the_target_everywhere(bench_run):
    for r in bench_run[0]:
        if r["allocation"] == "uniform":
            assert r["calibration_step"] is None and r["sensitivities"] is None
            assert r["drop_rates"] == [TARGET] * 8
            assert r["allocated_drop_rate"] == pytest.approx(TARGET)


def test_sensitivity_runs_are_calibrated_to_non_uniform_rates_meeting_the_target(bench_run):
    for r in bench_run[0]:
        if r["allocation"] != "sensitivity":
            continue
        rates, flops = r["drop_rates"], r["backward_flops"]
        assert r["calibration_step"] == 1 and r["metric"] == "grad"  # 10 % of 10 steps; LoRA's default metric
        assert len(set(rates)) > 1 and all(0 <= p <= 0.9 + 1e-9 for p in rates)
        assert len(r["sensitivities"]) == 8 and all(s >= 0 for s in r["sensitivities"])
        # The greedy raises one branch by 0.1 at a time until the budget holds: it overshoots by at most one step.
        assert TARGET - 1e-9 <= r["allocated_drop_rate"] <= TARGET + 0.1 * max(flops) / sum(flops) + 1e-9
        assert r["allocated_drop_rate"] == pytest.approx(sum(p * f for p, f in zip(rates, flops)) / sum(flops))


def test_outputs_are_written(bench_run):
    runs, out = bench_run
    report = (out / "drop_rates.md").read_text()
    assert "Machine:" in report and "Command: `python -m bench.drop_rates" in report
    assert drop_rates.table4(runs) in report
    saved = json.loads((out / "drop_rates.json").read_text())
    assert [r["final_val_loss"] for r in saved["runs"]] == [r["final_val_loss"] for r in runs]
    for png in ("drop_rates_lr0.01.png", "drop_rates_lr0.03.png"):  # one per calibrated run: rates and sensitivities
        assert_plot(out / png, 6.0, 2 * 3.2, dpi=120)  # 4 layers: the minimum width
    assert_plot(out / "val_loss.png", 2 * 5.2, 4.0, dpi=110)  # a panel per learning rate


def test_table4_reports_the_difference_with_its_sign():
    def run(lr, allocation, loss):
        return dict(learning_rate=lr, allocation=allocation, final_val_loss=loss)

    table = drop_rates.table4([run(1e-4, "uniform", 2.5), run(1e-4, "sensitivity", 2.25),
                               run(3e-4, "uniform", 2.0), run(3e-4, "sensitivity", 2.125)])
    lines = table.splitlines()
    assert lines[0] == "| final val loss (lower is better) | lr 0.0001 | lr 0.0003 |"
    assert lines[2] == "| DropBP uniform | 2.5000 | 2.0000 |"
    assert lines[3] == "| DropBP sensitivity | 2.2500 | 2.1250 |"
    assert lines[4] == "| sensitivity − uniform | -0.2500 | +0.1250 |"


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="learning_rates"):
        drop_rates.main(learning_rates=[], work_dir=tmp_path, out=tmp_path)
    with pytest.raises(UserError, match="drop_rate"):
        drop_rates.main(drop_rate=0.0, work_dir=tmp_path, out=tmp_path)
    with pytest.raises(UserError, match="only SmolLM2-135M-Instruct is available offline"):
        drop_rates.main(model_name="Llama-2-7b-hf", work_dir=tmp_path, out=tmp_path)
