"""bench.time_to_quality: configuration names, the run queue, and the summary arithmetic on hand-made curves.

The runs themselves are the real-model LoRA fine-tuning that tests/lit_gpt/test_finetune.py already covers; here
the runner's own logic runs on run records written by hand.
"""

from __future__ import annotations

import json

import pytest

from bench import time_to_quality as ttq
from lit_gpt.utils import UserError

SETTING = "a hand-made setting"


def record(config: str, lr: float, seed: int, points: list[tuple[float, float]], ms: float = 100.0) -> dict:
    """A run file's content: (train_seconds, val_loss) per validation; FLOPs are 3 per second."""
    history = [{"step": 10 * i, "train_seconds": s, "train_flops": 3.0 * s, "val_loss": loss}
               for i, (s, loss) in enumerate(points)]
    return {"config": config, "learning_rate": lr, "seed": seed, "setting": SETTING, "history": history,
            "ms_per_step": ms}


def write(out, *records: dict) -> None:
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for r in records:
        (out / "runs" / f"{ttq.run_key(r['config'], r['learning_rate'], r['seed'])}.json").write_text(json.dumps(r))


def test_configuration_names_become_method_flags():
    assert ttq.config_flags("baseline") == ["--method", "none"]
    assert ttq.config_flags("dropbp-0.5+unbiased+mlp") == ["--method", "dropbp", "--drop_rate", "0.5", "--unbiased",
                                                           "true", "--drop_branches", "mlp"]
    assert ttq.config_flags("dropbp-0.75+depth") == ["--method", "dropbp", "--drop_rate", "0.75", "--allocator",
                                                     "depth"]


@pytest.mark.parametrize(("config", "message"), [
    ("dropbp-1.0", "must lie in"), ("dropbp-half", "must be a number"), ("dropbp-0.5+sparkly", "unknown option"),
    ("baseline+mlp", "takes no options"), ("pld", "`baseline` or `dropbp-<p>"),
])
def test_bad_configuration_names_fail_clearly(config, message):
    with pytest.raises(UserError, match=message):
        ttq.config_flags(config)


def test_seeds_run_only_after_the_grid_and_at_its_best_learning_rate():
    rates, seeds = [1e-3, 2e-3], [1, 2, 3]
    grid = [("baseline", 1e-3, 1), ("baseline", 2e-3, 1), ("dropbp-0.5", 1e-3, 1), ("dropbp-0.5", 2e-3, 1)]
    assert ttq.planned_runs(["baseline", "dropbp-0.5"], ["baseline", "dropbp-0.5"], rates, seeds, []) == grid
    # The baseline's grid is done (2e-3 ends lower); dropbp's is not, so only the baseline's seeds are planned.
    runs = [record("baseline", 1e-3, 1, [(0, 4.0), (10, 3.0)]), record("baseline", 2e-3, 1, [(0, 4.0), (10, 2.5)]),
            record("dropbp-0.5", 1e-3, 1, [(0, 4.0), (10, 3.2)])]
    plan = ttq.planned_runs(["baseline", "dropbp-0.5"], ["baseline", "dropbp-0.5"], rates, seeds, runs)
    assert plan == grid + [("baseline", 2e-3, 2), ("baseline", 2e-3, 3)]
    # A configuration left out of the headline never gets seed runs.
    assert ttq.planned_runs(["baseline"], [], rates, seeds, runs) == grid[:2]


def test_targets_times_and_speedups_over_seeds(tmp_path):
    write(tmp_path,
          # The baseline: lr 1e-3 is its best (final 2.0 and 2.04 over two seeds: target 2.02, loose 2.0402).
          record("baseline", 1e-3, 1, [(0, 4.0), (10, 3.0), (20, 2.0)]),
          record("baseline", 1e-3, 2, [(0, 4.0), (10, 3.0), (20, 2.04)]),
          record("baseline", 3e-3, 1, [(0, 4.0), (10, 3.5), (20, 2.8)]),
          # A method twice as fast in time on both seeds, at its best rate 3e-3.
          record("fast", 3e-3, 1, [(0, 4.0), (5, 3.0), (10, 2.0)], ms=50.0),
          record("fast", 3e-3, 2, [(0, 4.0), (5, 3.0), (10, 2.0)], ms=50.0),
          record("fast", 1e-3, 1, [(0, 4.0), (5, 3.5), (10, 3.0)], ms=50.0))
    summary = ttq.report(tmp_path, [1e-3, 3e-3], [1, 2], "a machine")
    assert summary["targets"]["best"] == pytest.approx(2.02)
    assert summary["targets"]["within_1pct"] == pytest.approx(2.0402)
    baseline, fast = summary["configs"]["baseline"], summary["configs"]["fast"]
    assert baseline["best_learning_rate"] == 1e-3 and fast["best_learning_rate"] == 3e-3
    assert baseline["grid"] == {1e-3: 2.0, 3e-3: 2.8}
    # Seed 1 crosses 2.02 at 0.98 of the way from 3.0 (10 s) to 2.0 (20 s); seed 2 (final 2.04) never does.
    assert baseline["train_seconds_to_best"] == [pytest.approx(19.8), None]
    assert fast["train_seconds_to_best"] == [pytest.approx(9.9), pytest.approx(9.9)]
    assert fast["train_flops_to_best"] == [pytest.approx(29.7), pytest.approx(29.7)]
    assert fast["train_seconds_speedup_best"] == pytest.approx(2.0)
    # The looser target 2.0402: both baseline seeds reach it, seed 2 only just (0.9598 of its 0.96 drop).
    loose_seconds = [10 + 10 * 0.9598, 10 + 10 * 0.9598 / 0.96]
    assert baseline["train_seconds_to_within_1pct"] == [pytest.approx(s) for s in loose_seconds]
    assert fast["train_seconds_speedup_within_1pct"] == pytest.approx(sum(loose_seconds) / 2 / (5 + 5 * 0.9598))
    table = (tmp_path / "time_to_quality.md").read_text()
    assert "| fast | 0.003 | 2 | 2.0000 ± 0.0000 | 50 |" in table
    assert "20 ± 0 (1/2 seeds)" in table  # the baseline's time to its own mean: only one seed got there
    assert "Setting: a hand-made setting" in table


def test_runs_of_different_settings_are_not_mixed(tmp_path):
    other = record("baseline", 2e-3, 1, [(0, 4.0), (10, 3.0)]) | {"setting": "another setting"}
    write(tmp_path, record("baseline", 1e-3, 1, [(0, 4.0), (10, 3.0)]), other)
    with pytest.raises(UserError, match="mixes runs of different settings"):
        ttq.report(tmp_path, [1e-3, 2e-3], [1], "a machine")


def test_a_report_needs_runs(tmp_path):
    with pytest.raises(UserError, match="no runs in"):
        ttq.main(report_only=True, out=tmp_path)


def test_clean_step_times_turn_steps_into_seconds(tmp_path):
    """With `step_time.json`, a run's time is its steps at the clean step cost plus the calibrations made so far."""
    fast = record("fast", 1e-3, 1, [(0, 4.0), (99, 3.0), (199, 2.0)])  # measured seconds on a loaded machine
    fast["drop_rate_history"] = [{"step": 0, "seconds": None}, {"step": 10, "seconds": 9.0}]
    write(tmp_path, record("baseline", 1e-3, 1, [(0, 4.0), (10, 3.0), (20, 2.0)]), fast)
    clean = {"baseline": {"step_ms": 1000.0, "calibration_s": 0.0}, "fast": {"step_ms": 250.0, "calibration_s": 2.0}}
    (tmp_path / ttq.STEP_TIME_FILE).write_text(json.dumps(clean))
    summary = ttq.report(tmp_path, [1e-3], [1], "a machine")
    # Validations at steps 0, 10, 20: the baseline at 0, 10, 20 s; fast at 0, 2.5 and 5 + 2 (its calibration at
    # step 10 counts from the next validation on). Target 2.0 is the baseline's final loss, reached at step 20.
    assert summary["configs"]["baseline"]["clean_seconds_to_best"] == [pytest.approx(20.0)]
    assert summary["configs"]["fast"]["clean_seconds_to_best"] == [pytest.approx(7.0)]
    assert summary["configs"]["fast"]["clean_seconds_speedup_best"] == pytest.approx(20 / 7)
    assert summary["configs"]["fast"]["train_seconds_speedup_best"] == pytest.approx(20 / 199)
    assert "| fast | 0.001 | 1 | 2.0000 ± 0.0000 | 100 | 250 | 2.0 |" in (tmp_path / "time_to_quality.md").read_text()


def test_a_scheduled_configuration_is_priced_step_by_step_between_the_baseline_and_its_constant_form(tmp_path):
    def five_steps(config: str) -> dict:  # validations at steps 0, 2 and 5
        run = record(config, 1e-3, 1, [(0, 4.0), (2, 3.0), (5, 2.0)])
        for point, step in zip(run["history"], (0, 2, 5)):
            point["step"] = step
        return run

    write(tmp_path, five_steps("baseline"), five_steps("dropbp-0.5+decay"), five_steps("dropbp-0.5+ramp"))
    clean = {"baseline": {"step_ms": 1000.0, "calibration_s": 0.0},
             "dropbp-0.5": {"step_ms": 600.0, "calibration_s": 0.0}}
    (tmp_path / ttq.STEP_TIME_FILE).write_text(json.dumps(clean))
    configs = ttq.report(tmp_path, [1e-3], [1], "a machine")["configs"]
    # 5 steps, scale 1, .75, .5, .25, 0 (decay): each step costs 1000 - 400 * scale ms
    assert configs["dropbp-0.5+decay"]["clean_seconds_to_best"] == [pytest.approx((600 + 700 + 800 + 900 + 1000) / 1e3)]
    assert configs["dropbp-0.5+ramp"]["clean_seconds_to_best"] == [pytest.approx((1000 + 900 + 800 + 700 + 600) / 1e3)]
    points = configs["dropbp-0.5+decay"]["runs"][0]["history"]
    assert [p["clean_seconds"] for p in points] == pytest.approx([0.0, 1.3, 4.0])


def test_clean_time_columns_say_not_measured_rather_than_not_reached(tmp_path):
    write(tmp_path, record("baseline", 1e-3, 1, [(0, 4.0), (10, 3.0)]))
    summary = ttq.report(tmp_path, [1e-3], [1], "a machine")
    assert summary["configs"]["baseline"]["clean_seconds_to_best"] is None
    assert summary["configs"]["baseline"]["train_seconds_to_best"] == [pytest.approx(10.0)]
    assert "| baseline | 10 ± 0 | 1.00 | - | - |" in (tmp_path / "time_to_quality.md").read_text()


@pytest.mark.parametrize("shard", ["1", "a/2", "2/2", "0/0", "-1/2"])
def test_a_bad_shard_fails_clearly(shard):
    with pytest.raises(UserError, match="--shard must be i/n"):
        ttq.parse_shard(shard)
    assert ttq.parse_shard("1/2") == (1, 2)
