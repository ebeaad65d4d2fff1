"""bench.gradient_bias: exact where nothing is dropped, and the branch structure shows in which adapters stay exact."""

from __future__ import annotations

import pytest
import torch

from bench import gradient_bias
from bench.common import detached_handler, training_model
from conftest import tiny_config
from lit_gpt.utils import UserError

N_LAYER = 3


@pytest.fixture(scope="module")
def setup(one_thread):
    """A tiny LoRA model with non-zero B, two micro-batches, the exact gradient and the branches' FLOPs."""
    config = tiny_config(n_layer=N_LAYER, vocab_size=101, padded_vocab_size=101, block_size=32)
    model = training_model(config, "lora", seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.05)
    model.train()
    generator = torch.Generator().manual_seed(0)
    batches = [(ids, ids.clone()) for ids in (torch.randint(0, 101, (2, 12), generator=generator) for _ in range(2))]
    groups = gradient_bias.trainable_groups(model)
    handler = detached_handler(model, seed=0)
    kinds = [layer.kind for layer in handler.layers]
    exact = gradient_bias.step_gradient(model, handler, batches, 0, groups)
    handler.remove()
    flops = [1.0 + (k == "mlp") for k in kinds]  # MLP twice attention: a quarter of the MLP rate per unit of target
    return dict(model=model, batches=batches, groups=groups, kinds=kinds, exact=exact, flops=flops)


def diagnose(setup, rates, draws, unbiased=False):
    config = gradient_bias.Configuration("test", 0.0, rates, unbiased=unbiased)
    return gradient_bias.diagnose(setup["model"], config, setup["batches"], setup["exact"], setup["groups"],
                                  setup["flops"], draws, seed=0)


def test_groups_are_named_from_the_parameters(setup):
    keys = {key for key in setup["groups"] if key is not None}
    assert keys == {(layer, kind) for layer in range(N_LAYER) for kind in ("attention", "mlp")}
    assert gradient_bias.parameter_group("transformer.h.12.attn.proj.lora_A") == (12, "attention")
    assert gradient_bias.parameter_group("transformer.h.3.mlp.fc_2.lora_B") == (3, "mlp")
    assert gradient_bias.parameter_group("lm_head.lora_A") is None


def test_without_dropping_the_gradient_is_exact_and_has_no_variance(setup):
    result = diagnose(setup, [0.0] * len(setup["kinds"]), draws=3)
    for stats in [result["whole"], result["lower"], result["upper"], *result["groups"]]:
        assert stats["bias_cosine"] == pytest.approx(1.0, abs=1e-9)
        assert stats["norm_ratio"] == pytest.approx(1.0, abs=1e-9)
        assert stats["draw_cosine"] == pytest.approx(1.0, abs=1e-9)
        assert stats["relative_variance"] == pytest.approx(0.0, abs=1e-12)


def test_attention_only_dropping_leaves_the_top_mlp_exact_in_every_draw(setup):
    rates, _ = gradient_bias.single_kind_rates("attention", setup["kinds"], setup["flops"], 0.25)
    assert rates == [0.75, 0.0] * N_LAYER
    groups = {(g["layer"], g["kind"]): g for g in diagnose(setup, rates, draws=8)["groups"]}
    top = groups[(N_LAYER - 1, "mlp")]  # never dropped, and nothing above it but the head
    assert top["bias_cosine"] == pytest.approx(1.0, abs=1e-9) and top["norm_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert top["relative_variance"] == pytest.approx(0.0, abs=1e-12)
    lower = groups[(0, "mlp")]  # never dropped either, but the dropped attention branches above it bias it
    assert lower["bias_cosine"] < 0.9999 and lower["relative_variance"] > 1e-6


def test_mlp_only_dropping_keeps_the_top_attention_exact_exactly_when_the_top_mlp_is_kept(setup):
    """The top attention's output still passes through the top MLP: dropping that MLP is what changes it."""
    rates, _ = gradient_bias.single_kind_rates("mlp", setup["kinds"], setup["flops"], 1 / 3)
    assert rates == pytest.approx([0.0, 0.5] * N_LAYER)
    handler = detached_handler(setup["model"], seed=0)
    handler.set_drop_rates(rates)
    exact = setup["exact"][(N_LAYER - 1, "attention")]
    outcomes = set()
    for draw in range(12):
        gradient = gradient_bias.step_gradient(setup["model"], handler, setup["batches"], draw, setup["groups"])
        top_mlp_kept = [not handler.layers[-1].dropped]
        handler.draw(step=draw * 2)  # the first micro-batch's decision, replayed
        top_mlp_kept.insert(0, not handler.layers[-1].dropped)
        exact_here = torch.allclose(gradient[(N_LAYER - 1, "attention")], exact, rtol=1e-5, atol=1e-9)
        assert exact_here == all(top_mlp_kept)
        outcomes.add(exact_here)
    handler.remove()
    assert outcomes == {True, False}  # both cases happened


def test_the_unbiased_estimator_averages_to_the_exact_gradient_and_the_plain_one_does_not(setup):
    """E's distance to g against the noise of a mean of N draws, sqrt(V / N) (V: relative variance)."""
    def distance_and_noise(result):  # |E - g| / |g| from the cosine and the norm ratio
        whole = result["whole"]
        distance = (whole["norm_ratio"] ** 2 - 2 * whole["norm_ratio"] * whole["bias_cosine"] + 1) ** 0.5
        return distance, whole["norm_ratio"] * (whole["relative_variance"] / draws) ** 0.5

    rates, draws = [0.5] * len(setup["kinds"]), 32
    plain, plain_noise = distance_and_noise(diagnose(setup, rates, draws))
    unbiased, unbiased_noise = distance_and_noise(diagnose(setup, rates, draws, unbiased=True))
    assert plain > 0.3 and plain > 4 * plain_noise  # far more than sampling noise: a bias
    assert unbiased < 1.5 * unbiased_noise  # no more than sampling noise
    assert unbiased < plain / 2


def test_summary_statistics_match_their_definitions():
    exact = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    draws = torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # E = (1, 1, 0)
    stats = gradient_bias.statistics_of(gradient_bias.group_sums(exact, draws))
    assert stats["bias_cosine"] == pytest.approx(2 ** -0.5)
    assert stats["norm_ratio"] == pytest.approx(2 ** 0.5)
    assert stats["draw_cosine"] == pytest.approx(0.5)  # cosine 1, and 0 for the zero draw
    assert stats["relative_variance"] == pytest.approx(1.0)  # |g_k - E|^2 = 2 for both, |E|^2 = 2
    assert stats["ceiling"] == pytest.approx(2 ** -0.5)


def test_single_kind_rates_meet_the_target_or_are_infeasible():
    kinds, flops = ["attention", "mlp"] * 2, [1.0, 3.0] * 2
    rates, note = gradient_bias.single_kind_rates("mlp", kinds, flops, 0.6)
    assert rates == pytest.approx([0.0, 0.8] * 2) and "0.800" in note
    rates, note = gradient_bias.single_kind_rates("attention", kinds, flops, 0.5)
    assert rates is None and "infeasible" in note and "p=2.00" in note


def test_bad_flags_fail_clearly(tmp_path):
    with pytest.raises(UserError, match="--targets must lie in"):
        gradient_bias.main(targets=[1.0], work_dir=tmp_path)
    with pytest.raises(UserError, match="--draws"):
        gradient_bias.main(draws=1, work_dir=tmp_path)


def test_run_screens_every_configuration_and_reports_after_each(setup, tmp_path):
    reported = []
    rows = gradient_bias.run(setup["model"], setup["batches"], setup["batches"][0], [0.5], draws=2, seed=0,
                             mean_seq_length=12, report=lambda rows, calibrated, planned: reported.append(len(rows)))
    names = [r["name"] for r in rows]
    assert names == ["uniform", "uniform, unbiased", "greedy", "depth", "flops", "attention only", "mlp only",
                     "flops, unbiased"]
    assert reported == list(range(1, len(rows) + 1))
    for r in rows:  # every feasible configuration meets the FLOPs-weighted target (greedy: in steps of 0.1)
        if r["name"] == "greedy":
            assert 0.5 - 1e-9 <= r["allocated"] < 0.6
        elif r["rates"] is not None:
            assert r["allocated"] == pytest.approx(0.5, abs=1e-6)
    attention_only = rows[names.index("attention only")]  # attention is well under half of a block's backward
    assert attention_only["rates"] is None and "infeasible" in attention_only["note"]
    assert "infeasible" in gradient_bias.results_table(rows)
    gradient_bias.plot(rows, tmp_path / "bias.png", "test")
    assert (tmp_path / "bias.png").read_bytes()[:4] == b"\x89PNG"
