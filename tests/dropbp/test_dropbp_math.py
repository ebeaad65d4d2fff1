"""DropBP's maths: systematic sampling, sensitivity against brute-force leave-one-out, and allocation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_shape
from dropbp import DropBP, DropBPHandler
from dropbp.allocation import dropped_fraction, expected_variance, flops_aware_allocation, greedy_allocation
from dropbp.sampling import decision_generator, systematic_sample
from dropbp.sensitivity import measure_sensitivity
from lit_gpt.config import Config
from lit_gpt.lora import LoRAConfig, LoRALinear, add_lora
from lit_gpt.model import GPT

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


TINY = tiny_shape(n_embd=32, intermediate_size=64, vocab_size=50, block_size=16)
PARALLEL = dict(parallel_residual=True, norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", bias=True)


# ---------------------------------------------------------------------------------------------- 5. sampling
def draw_many(rates: torch.Tensor, draws: int, seed: int = 0) -> torch.Tensor:
    return torch.stack([systematic_sample(rates, decision_generator(seed, step)) for step in range(draws)])


def test_systematic_sampling_has_exact_marginals_and_fixed_counts():
    g = torch.Generator().manual_seed(0)
    rates = torch.rand(12, generator=g, dtype=torch.float64)
    rates[0], rates[1] = 0.0, 1.0  # the edges: never and always
    flops = torch.rand(12, generator=g, dtype=torch.float64) + 0.5
    # Each draw is an independent Bernoulli(p_i) per branch, so the realised rate has a standard error of up to
    # 0.005 after 10,000 draws: a 0.01 bound would be only 2 sigma, which a correct sampler misses for some
    # of 12 branches about half the time. 40,000 draws make 0.01 a 4-sigma bound.
    draws = 40_000
    masks = draw_many(rates, draws)

    realised = masks.double().mean(0)
    assert (realised - rates).abs().max() <= 0.01, (realised - rates).abs().max()
    sigma = (rates * (1 - rates) / draws).sqrt().clamp_min(1e-12)
    assert ((realised - rates).abs() / sigma).max() < 4.5
    assert realised[0] == 0 and realised[1] == 1

    counts = masks.sum(1)
    total = float(rates.sum())
    assert set(counts.tolist()) <= {math.floor(total), math.ceil(total)}

    dropped_flops = (masks.double() * flops).sum(1)
    bernoulli_variance = float((flops**2 * rates * (1 - rates)).sum())  # independent coin flips
    assert dropped_flops.mean() == pytest.approx(float((rates * flops).sum()), rel=0.01)
    assert dropped_flops.var() < 0.5 * bernoulli_variance


def test_systematic_sampling_at_uniform_rates_is_unbiased():
    # the reference forces a minimum count and realises 0.525 for p = 0.5; here it is exact in every draw
    masks = draw_many(torch.full((8,), 0.5), 2_000, seed=3)
    assert torch.all(masks.sum(1) == 4)
    assert (masks.double().mean(0) - 0.5).abs().max() <= 0.04
    # the random order keeps the patterns from repeating (not just "even" / "odd" branches)
    assert len({tuple(m.tolist()) for m in masks}) > 60


def test_grouped_systematic_sampling_fixes_each_groups_count_and_keeps_the_marginals():
    g = torch.Generator().manual_seed(1)
    rates = torch.rand(10, generator=g, dtype=torch.float64)
    groups = torch.tensor([0, 1] * 5)  # attention, MLP, attention, ... as the blocks order them
    draws = 40_000
    masks = torch.stack([systematic_sample(rates, decision_generator(0, step), groups) for step in range(draws)])
    realised = masks.double().mean(0)
    sigma = (rates * (1 - rates) / draws).sqrt().clamp_min(1e-12)
    assert ((realised - rates).abs() / sigma).max() < 4.5
    for kind in (0, 1):
        total = float(rates[groups == kind].sum())
        assert set(masks[:, groups == kind].sum(1).tolist()) <= {math.floor(total), math.ceil(total)}
    total = float(rates.sum())
    assert set(masks.sum(1).tolist()) <= {math.floor(total), math.ceil(total)}
    # Without the groups only the total is fixed: a group's count then spreads (the test's premise).
    ungrouped = draw_many(rates, 2_000)
    assert len(set(ungrouped[:, groups == 0].sum(1).tolist())) > 2


def test_grouped_systematic_sampling_at_uniform_rates_varies_which_branches_drop():
    groups = torch.tensor([0, 1] * 8)
    masks = torch.stack([systematic_sample(torch.full((16,), 0.875), decision_generator(2, step), groups)
                         for step in range(500)])
    assert torch.all(masks[:, groups == 0].sum(1) == 7) and torch.all(masks[:, groups == 1].sum(1) == 7)
    assert len({tuple(m.tolist()) for m in masks}) > 40  # each group's kept branch is still random


def test_systematic_sampling_rejects_bad_rates():
    with pytest.raises(ValueError):
        systematic_sample(torch.tensor([0.5, 1.5]), decision_generator(0, 0))
    with pytest.raises(ValueError):
        systematic_sample(torch.tensor([-0.1, 0.5]), decision_generator(0, 0))


def test_decision_generator_is_a_function_of_seed_and_step():
    a = decision_generator(5, 17)
    b = decision_generator(5, 17)
    assert torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))
    firsts = {float(torch.rand((), generator=decision_generator(s, t))) for s in range(4) for t in range(50)}
    assert len(firsts) == 200  # neighbouring (seed, step) pairs do not collide


# ---------------------------------------------------------------------------------------------- 8. sensitivity
def double_model(n_layer: int, lora: bool = False, **overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(Config(**{**TINY, "n_layer": n_layer, **overrides}))
    model.reset_parameters(std=0.2)  # large enough that every branch matters
    if lora:
        add_lora(model, LoRAConfig(r=2, head=False))
        for m in model.modules():
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_B, std=0.1)
    return model.double().train()


def brute_force(model: GPT, loss_fn, metric: str) -> list[float]:
    """Alg. 1 literally: a full forward and backward with only branch i dropped, against one with none."""
    layers = [m for m in model.modules() if isinstance(m, DropBP)]
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(dropped: int | None) -> list[torch.Tensor]:
        for i, layer in enumerate(layers):
            layer.dropped = i == dropped
        gs = torch.autograd.grad(loss_fn(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]

    full = grads(None)
    result = []
    for i in range(len(layers)):
        dropped = grads(i)
        if metric == "grad":
            result.append(sum(float((g - d).pow(2).sum()) for g, d in zip(full, dropped)))
        else:
            result.append(sum((float(g.norm()) - float(d.norm())) ** 2 for g, d in zip(full, dropped)))
    for layer in layers:
        layer.dropped = False
    return result


@pytest.mark.parametrize("metric", ["grad", "gradnorm"])
@pytest.mark.parametrize(
    "arch", [{}, PARALLEL, {"lora": True}, {"tie_embeddings": True}], ids=["sequential", "parallel", "lora", "tied"]
)
def test_sensitivity_matches_brute_force_leave_one_out(metric, arch):
    model = double_model(3, **arch)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (2, 13), generator=g)

    def loss_fn():
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))

    expected = brute_force(model, loss_fn, metric)
    layers = [m for m in model.modules() if isinstance(m, DropBP)]
    params = [p for p in model.parameters() if p.requires_grad]
    result = measure_sensitivity(layers, loss_fn, params, metric)

    assert result.forward_passes == 1
    assert result.backward_passes <= len(layers) + 2
    assert all(s > 0 for s in expected)
    assert len(set(expected)) == len(expected)
    np.testing.assert_allclose(result.sensitivities, expected, rtol=1e-6, atol=0)  # measured: <= 3e-8
    assert not any(layer.dropped or layer.capture is not None for layer in layers)


def test_handler_calibration_reports_the_same_sensitivities():
    model = double_model(2)
    handler = DropBPHandler(model, seed=0)
    handler.set_initial_drop_rate(0.5)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))

    def loss_fn():
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))

    result = handler.sensitivity_based_drop_bp(loss_fn, 0.5, metric="grad")
    assert result.forward_passes == 1 and 0 < result.seconds < 60 and "1 forward" in result.summary()
    assert handler.last_calibration is result and handler.sensitivities == result.sensitivities
    handler.remove()  # brute force sets the decisions by hand
    np.testing.assert_allclose(result.sensitivities, brute_force(model, loss_fn, "grad"), rtol=1e-4)
    with pytest.raises(ValueError, match="metric"):
        handler.sensitivity_based_drop_bp(loss_fn, 0.5, metric="hessian")
    with pytest.raises(ValueError, match="allocator"):
        handler.sensitivity_based_drop_bp(loss_fn, 0.5, allocator="random")


# ---------------------------------------------------------------------------------------------- 10. allocation
def test_greedy_allocation_hand_worked():
    # S = [1, 2.5, 7], F = [2, 1, 1], target 0.25. Each round adds 0.1 to the smallest S_i * p_i
    # (ties, all at zero in round one, go to the smaller sensitivity):
    #   S*p before the round        pick   rates after        FLOPs-weighted drop
    #   0,    0,    0                b0     .1 0  0            .2/4  = .05
    #   .1,   0,    0                b1     .1 .1 0            .3/4  = .075
    #   .1,   .25,  0                b2     .1 .1 .1           .4/4  = .1
    #   .1,   .25,  .7               b0     .2 .1 .1           .6/4  = .15
    #   .2,   .25,  .7               b0     .3 .1 .1           .8/4  = .2
    #   .3,   .25,  .7               b1     .3 .2 .1           .9/4  = .225
    #   .3,   .5,   .7               b0     .4 .2 .1           1.1/4 = .275 >= .25: stop
    rates = greedy_allocation([1.0, 2.5, 7.0], [2.0, 1.0, 1.0], 0.25)
    assert rates == pytest.approx([0.4, 0.2, 0.1], abs=1e-12)
    assert dropped_fraction(rates, [2.0, 1.0, 1.0]) >= 0.25

    # the cap: a nearly insensitive branch stops at 0.9 and the rest of the budget goes elsewhere
    rates = greedy_allocation([0.001, 1.0], [1.0, 1.0], 0.6)
    assert rates == pytest.approx([0.9, 0.3], abs=1e-12)

    # nothing to drop
    assert greedy_allocation([1.0, 2.0], [1.0, 1.0], 0.0) == [0.0, 0.0]


def test_greedy_allocation_properties_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(2, 9))
        s, f = rng.random(n) + 0.01, rng.random(n) + 0.1
        target = float(rng.uniform(0, 0.9))
        rates = greedy_allocation(s.tolist(), f.tolist(), target)
        achieved = dropped_fraction(rates, f.tolist())
        assert all(0 <= p <= 0.9 + 1e-12 and abs(p * 10 - round(p * 10)) < 1e-9 for p in rates)
        assert achieved >= target - 1e-12
        assert achieved < target + 0.1 * f.max() / f.sum()  # stops as soon as the budget is met


def test_flops_aware_allocation_meets_the_budget_exactly():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(2, 12))
        s, f = rng.random(n) * 10, rng.random(n) + 0.1
        target = float(rng.uniform(0, 0.9))
        rates = flops_aware_allocation(s.tolist(), f.tolist(), target, cap=0.9)
        kept = sum((1 - p) * fi for p, fi in zip(rates, f))
        assert kept == pytest.approx((1 - target) * f.sum(), abs=1e-6)
        assert all(-1e-12 <= p <= 0.9 + 1e-12 for p in rates)


def grid_optimum(s: np.ndarray, f: np.ndarray, target: float, cap: float, step: float = 0.01) -> float:
    """Smallest sum S_i p_i / (1 - p_i) over the grid p_i in {0, step, ..., cap} meeting the budget."""
    axis = np.round(np.arange(0, cap + step / 2, step), 10)
    grids = np.meshgrid(*([axis] * len(s)), indexing="ij")
    objective = sum(si * g / (1 - g) for si, g in zip(s, grids))
    dropped = sum(fi * g for fi, g in zip(f, grids))
    feasible = dropped >= target * f.sum() - 1e-12
    return float(objective[feasible].min())


@pytest.mark.parametrize("n", [2, 3])
def test_flops_aware_allocation_is_optimal_against_brute_force(n):
    rng = np.random.default_rng(n)
    gaps = []
    for _ in range(6):
        s, f = rng.random(n) * 5 + 0.05, rng.random(n) + 0.2
        target = float(rng.uniform(0.1, 0.8))
        rates = flops_aware_allocation(s.tolist(), f.tolist(), target, cap=0.9)
        ours = expected_variance(s.tolist(), rates)
        best = grid_optimum(s, f, target, cap=0.9)
        assert ours <= best + 1e-9 * max(1.0, best), (s, f, target, ours, best)
        gaps.append((best - ours) / best)
        # and the greedy procedure is never better on this objective
        assert ours <= expected_variance(s.tolist(), greedy_allocation(s.tolist(), f.tolist(), target)) + 1e-9
    assert max(gaps) < 0.05  # the grid is fine enough to come close: the comparison is meaningful


def test_flops_aware_allocation_drops_cheap_insensitive_branches_first():
    rates = flops_aware_allocation([1.0, 1.0, 0.0], [1.0, 1.0, 1.0], 0.3, cap=0.9)
    assert rates[2] == pytest.approx(0.9)
    assert rates[0] == pytest.approx(rates[1])
    # equal FLOPs: keep rates are proportional to sqrt(S_i) where no bound binds
    rates = flops_aware_allocation([1.0, 4.0], [1.0, 1.0], 0.5, cap=0.95)
    assert (1 - rates[1]) / (1 - rates[0]) == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("allocate", [greedy_allocation, flops_aware_allocation])
def test_unreachable_target_raises_with_the_reachable_range(allocate):
    with pytest.raises(ValueError, match=r"reachable range is \[0, 0\.9\]"):
        allocate([1.0, 2.0], [1.0, 1.0], 0.95, cap=0.9)
    with pytest.raises(ValueError, match="unreachable"):
        allocate([1.0, 2.0], [1.0, 1.0], -0.1, cap=0.9)
    # the edge of the range is reachable
    rates = allocate([1.0, 2.0], [1.0, 3.0], 0.9, cap=0.9)
    assert rates == pytest.approx([0.9, 0.9])
