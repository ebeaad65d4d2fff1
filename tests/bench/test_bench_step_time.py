"""bench.step_time: its settings switch methods on and off cleanly, and its efficiency arithmetic is right.

Timings themselves are not asserted (they belong to the benchmark, not to tests on a shared machine).
"""

from __future__ import annotations

import pytest
import torch

from bench import step_time
from bench.common import detached_handler, training_model
from lit_gpt.config import Config
from lit_gpt.utils import UserError

TINY = Config(name="tiny", n_layer=4, n_head=4, n_query_groups=2, n_embd=64, intermediate_size=128, vocab_size=101,
              padded_vocab_size=101, block_size=32, tie_embeddings=True)  # tied like SmolLM2: LoRA keeps head frozen
ARGS = dict(drop_rates=[0.5, 0.875, 1.0], weights_drop_rates=[0.5], pld_theta=0.5, gt_rho=0.7, seq_len=16,
            micro_batch_size=2, steps=1, warmup=0, seed=3)


def tiny_settings(kind: str):
    model = training_model(TINY, kind, torch.device("cpu"), torch.float32, seed=0)
    handler = detached_handler(model, seed=0)
    ids = torch.randint(0, TINY.vocab_size, (2, ARGS["seq_len"] + 1), generator=torch.Generator().manual_seed(0))
    return model, handler, ids, step_time.settings_for(model, handler, kind, ids, ARGS)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_settings_leave_the_model_as_they_found_it(kind, one_thread):
    model, handler, ids, settings = tiny_settings(kind)
    trainable = [p.requires_grad for p in model.parameters()]
    labels = [s.label for s in settings]
    expected = ["baseline", "DropBP 0.5", "DropBP 0.875", "DropBP 1"]
    expected += ["DropBP 1− (head BW kept)"] if kind == "lora" else []  # a frozen head: p = 1 skips its backward
    assert labels == expected[:4] + ["weight grads only 0.5"] + expected[4:] + ["PLD θ̄=0.5", "GreenTrainer ρ=0.7"]
    for setting in settings:
        setting.enter()
        step_time.timed_step(model, handler, ids, torch.device("cpu"), setting.keep_head_backward)
        setting.leave()
        assert handler.drop_rates == [0.0] * len(handler.layers) and not any(handler.dropped)
        assert handler.drop_mode == "branch" and not any(layer.weights_only for layer in handler.layers)
        assert all(block.keep and block.branch_scale == 1.0 for block in model.transformer.h)
        assert [p.requires_grad for p in model.parameters()] == trainable


def test_each_setting_runs_its_chosen_decisions(one_thread):
    model, handler, ids, settings = tiny_settings("full")
    by_label = {s.label: s for s in settings}
    flops = [by_label[label].flops for label in ("baseline", "DropBP 0.5", "DropBP 0.875", "DropBP 1")]
    assert flops == sorted(flops, reverse=True) and flops[0] > flops[-1]
    # The representative draw at 0.875 of 8 branches drops floor or ceil of 7 (systematic sampling).
    assert by_label["DropBP 0.875"].note == "7/8 branches dropped"
    # Repeating a setting repeats its decisions, so the fastest of N steps is not the luckiest draw.
    setting = by_label["DropBP 0.5"]
    seen = []
    for _ in range(3):
        setting.enter()
        step_time.timed_step(model, handler, ids, torch.device("cpu"), False)
        seen.append(handler.dropped)
        setting.leave()
    assert seen[0] == seen[1] == seen[2] and sum(seen[0]) == 4
    assert not any(handler.dropped)  # PLD and GreenTrainer were priced without stale DropBP decisions
    # PLD keeps the whole backward of the blocks it runs; DropBP at p = 1 keeps none of the blocks' backward.
    assert by_label["DropBP 1"].flops < by_label["PLD θ̄=0.5"].flops < by_label["baseline"].flops
    # Skipping only the weight gradients of half the branches saves less than skipping their whole backward.
    assert by_label["DropBP 0.5"].flops < by_label["weight grads only 0.5"].flops < by_label["baseline"].flops
    gt = by_label["GreenTrainer ρ=0.7"]
    assert gt.flops < by_label["baseline"].flops and "tensors trained" in gt.note


def test_efficiencies_follow_their_definitions():
    def row(setting, p, total, flops, head_kept=False):
        return dict(kind="lora", setting=setting, drop_rate=p, head_backward_kept=head_kept, forward_ms=0.0,
                    backward_ms=total, total_ms=total, flops=flops, note="")

    rows = [row("baseline", 0.0, 100.0, 10.0), row("DropBP 0.5", 0.5, 70.0, 8.0), row("DropBP 1", 1.0, 30.0, 6.0),
            row("DropBP 1− (head BW kept)", 1.0, 40.0, None, head_kept=True), row("PLD", 0.0, 80.0, 9.0)]
    step_time.add_efficiencies(rows)
    half = rows[1]
    assert half["reduction"] == pytest.approx(0.3)
    assert half["straight_line_efficiency"] == pytest.approx(30 / (0.5 * 60))  # to the head-kept limit
    assert half["line_to_1_efficiency"] == pytest.approx(30 / (0.5 * 70))
    assert half["flops_efficiency"] == pytest.approx(0.3 / 0.2)
    assert rows[4]["flops_efficiency"] == pytest.approx(0.2 / 0.1) and "straight_line_efficiency" not in rows[4]
    assert "flops_saving" not in rows[3]
    table = step_time.render_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| lora | DropBP 0.5 |" in table


def test_bad_flags_fail_clearly():
    with pytest.raises(UserError, match="choose from full, lora, qlora"):
        step_time.main(methods=["adapter"])
    with pytest.raises(UserError, match="--drop_rates and --weights_drop_rates must lie in"):
        step_time.main(drop_rates=[0.0, 0.5])
