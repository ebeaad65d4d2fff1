"""bench.convergence: the time-to-target arithmetic behind its speed-ups, and its flag checks.

The runs themselves are the real-model fine-tuning that `tests/lit_gpt/test_finetune.py` already covers.
"""

from __future__ import annotations

import pytest

from bench import convergence
from lit_gpt.utils import UserError


def history(points: list[tuple[float, float]]) -> list[dict]:
    """(train_seconds, val_loss) pairs; FLOPs run at 10 per second."""
    return [{"step": i, "train_seconds": s, "calibrated_seconds": s, "train_flops": 10 * s, "val_loss": loss}
            for i, (s, loss) in enumerate(points)]


def test_time_to_reach_interpolates_between_validations():
    curve = history([(0, 4.0), (10, 3.0), (20, 2.0)])
    assert convergence.time_to_reach(curve, 2.5, "train_seconds") == pytest.approx(15.0)
    assert convergence.time_to_reach(curve, 3.0, "train_seconds") == pytest.approx(10.0)
    assert convergence.time_to_reach(curve, 2.5, "train_flops") == pytest.approx(150.0)
    assert convergence.time_to_reach(curve, 1.9, "train_seconds") is None
    # A curve that dips below the target and comes back counts from the first crossing.
    dipping = history([(0, 4.0), (5, 1.0), (9, 3.0)])
    assert convergence.time_to_reach(dipping, 2.0, "train_seconds") == pytest.approx(10 / 3)


def test_speedups_are_against_the_baselines_final_loss():
    results = [
        {"label": "baseline", "history": history([(0, 4.0), (10, 3.0), (20, 2.0)])},
        {"label": "fast", "history": history([(0, 4.0), (5, 3.0), (10, 2.0), (15, 1.5)])},
        {"label": "never", "history": history([(0, 4.0), (5, 3.5)])},
    ]
    convergence.add_time_without_calibration(results[1]["history"], [{"step": 1, "seconds": 2.0}])
    assert [h["calibrated_seconds"] for h in results[1]["history"]] == [0, 5, 8, 13]  # from the point after step 1
    convergence.summarise(results)
    assert results[0]["time_speedup"] == pytest.approx(1.0)
    assert results[1]["time_speedup"] == pytest.approx(2.0) and results[1]["flops_speedup"] == pytest.approx(2.0)
    assert results[1]["time_without_calibration_speedup"] == pytest.approx(20 / 8)
    assert results[2]["time_speedup"] is None
    for r, ms in zip(results, (1.0, 2.0, 3.0)):
        r.update(ms_per_step=ms, note="")
    table = convergence.render_table(results)
    assert "| never | 3.5000 |" in table and "not reached" in table and "| fast | 1.5000 |" in table


def test_bad_flags_fail_clearly(tmp_path):
    with pytest.raises(UserError, match="only SmolLM2-135M-Instruct"):
        convergence.main(model_name="Llama-2-7b-hf", work_dir=tmp_path)
    with pytest.raises(UserError, match="--drop_rates must lie in"):
        convergence.main(drop_rates=[1.0], work_dir=tmp_path)


def test_runs_put_the_baseline_first_and_override_only_their_own_flags():
    chosen = convergence.runs([0.5], [False, True], pld_gamma=None, gt_rho=0.7, baseline_learning_rates=[6e-4])
    assert [label for label, _ in chosen] == ["baseline", "baseline lr 0.0006", "DropBP 0.5",
                                              "DropBP 0.5 + lr compensation", "GreenTrainer ρ=0.7"]
    assert chosen[1][1][-2:] == ["--train.learning_rate", "0.0006"]  # appended after the shared flags: it wins
    assert chosen[2][1][-2:] == ["--lr_compensation", "false"] and chosen[3][1][-2:] == ["--lr_compensation", "true"]
