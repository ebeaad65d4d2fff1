"""Progressive Layer Dropping and GreenTrainer: schedules, sampling, DP exactness, gradients and FLOPs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_shape
from dropbp import DropBPHandler
from lit_gpt import GPT, Config
from lit_gpt.flops import cost_profile, current_training_flops, training_flops, units
from lit_gpt.lora import LoRAConfig, LoRALinear, add_lora
from lit_gpt.methods.greentrainer import (
    GreenTrainer,
    backward_budget,
    normalise,
    quantize_costs,
    select_tensors,
    selection_cost,
    tensor_flops,
    tensor_importance,
)
from lit_gpt.methods.pld import ProgressiveLayerDrop, keep_probabilities, pld_theta

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = tiny_shape(name="small", n_layer=4, vocab_size=512, block_size=64)


def small_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(Config(**{**SMALL, **overrides}))
    model.reset_parameters()
    return model


def batch(seed: int = 0, size: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 512, (size, length), generator=torch.Generator().manual_seed(seed))


def lm_loss(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------------- PLD: schedule and sampling
def test_theta_schedule_and_depth_scaling_follow_the_formulas():
    assert pld_theta(0, 0.5, 0.001) == 1.0
    assert pld_theta(1000, 0.5, 0.001) == pytest.approx(0.5 * math.exp(-1) + 0.5)
    assert pld_theta(10**6, 0.5, 0.001) == pytest.approx(0.5)
    assert keep_probabilities(0.5, 4) == [0.875, 0.75, 0.625, 0.5]  # 1 - (l/L)(1 - θ), l = 1..L
    assert keep_probabilities(1.0, 4) == [1.0] * 4


def test_keep_rate_of_each_layer_over_10000_draws_is_within_1_percent_and_the_global_rng_is_untouched():
    model = small_model()
    pld = ProgressiveLayerDrop(model, theta_bar=0.5, gamma=1.0, seed=7)
    pld.set_step(100)  # θ = θ̄ = 0.5: keep probabilities 0.875, 0.75, 0.625, 0.5
    rng = torch.get_rng_state()
    draws = torch.tensor([pld.draw() for _ in range(10_000)], dtype=torch.float64)
    assert torch.equal(torch.get_rng_state(), rng)
    rates = draws.mean(0)
    expected = torch.tensor(keep_probabilities(0.5, 4), dtype=torch.float64)
    assert (rates - expected).abs().max() < 0.01, rates
    # Decisions are a function of (seed, micro-batch count) alone.
    again = ProgressiveLayerDrop(small_model(), theta_bar=0.5, gamma=1.0, seed=7)
    again.set_step(100)
    assert [again.draw() for _ in range(5)] == draws[:5].bool().tolist()


def _forward_by_hand(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """The PLD forward written out: skipped blocks are the identity, kept branches are scaled by 1/keep_prob."""
    cos, sin = model.rope_cache(ids.device)
    cos, sin = cos[: ids.size(1)], sin[: ids.size(1)]
    x = model.transformer.wte(ids)
    for block in model.transformer.h:
        if block.keep:
            x = x + block.branch_scale * block.attention_branch(x, cos, sin)
            x = x + block.branch_scale * block.mlp_branch(x)
    return model.lm_head(model.transformer.ln_f(x))


def test_dropped_blocks_get_no_gradient_cost_no_forward_flops_and_kept_ones_are_rescaled():
    model = small_model()
    pld = ProgressiveLayerDrop(model, theta_bar=0.3, gamma=1.0, seed=0)
    pld.set_step(100)
    ids = batch()
    rope = [t[:16] for t in model.rope_cache(ids.device)]
    per_block = counted_flops(lambda: model.transformer.h[0](model.transformer.wte(ids), *rope))
    model.eval()
    full_forward = counted_flops(lambda: model(ids))
    model.train()
    for _ in range(20):  # find a micro-batch that drops some blocks and keeps others
        with FlopCounterMode(display=False) as counter:
            logits = model(ids)
        kept = [b.keep for b in model.transformer.h]
        if 0 < sum(kept) < len(kept):
            break
    assert 0 < sum(kept) < len(kept), kept
    dropped = len(kept) - sum(kept)
    assert counter.get_total_flops() == full_forward - dropped * per_block
    torch.testing.assert_close(logits, _forward_by_hand(model, ids), rtol=0, atol=1e-6)
    logits.float().mean().backward()
    for block, k in zip(model.transformer.h, kept):
        grads = [p.grad for p in block.parameters()]
        assert all(g is not None for g in grads) if k else all(g is None for g in grads)
    probs = pld.keep_probs
    assert [b.branch_scale for b in model.transformer.h] == [1 / p for p in probs]


def test_eval_mode_runs_every_block_unscaled_and_deterministically():
    model, reference = small_model(), small_model()
    pld = ProgressiveLayerDrop(model, theta_bar=0.2, gamma=1.0, seed=0)
    pld.set_step(100)
    ids = batch()
    model(ids)  # a training forward leaves blocks dropped and scaled
    assert any(b.branch_scale != 1 for b in model.transformer.h)
    model.eval()
    reference.eval()
    with torch.no_grad():
        first, second, plain = model(ids), model(ids), reference(ids)
    assert torch.equal(first, second) and torch.equal(first, plain)
    assert all(b.keep and b.branch_scale == 1.0 for b in model.transformer.h)


def test_theta_one_trains_exactly_like_the_plain_model():
    model, reference = small_model(), small_model()
    ProgressiveLayerDrop(model, theta_bar=1.0, gamma=0.001)
    ids = batch()
    lm_loss(model, ids).backward()
    lm_loss(reference, ids).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_pld_state_resumes_the_same_decisions():
    pld = ProgressiveLayerDrop(small_model(), theta_bar=0.5, gamma=0.1, seed=3)
    pld.set_step(20)
    [pld.draw() for _ in range(5)]
    state = pld.state_dict()
    ahead = [pld.draw() for _ in range(5)]
    other = ProgressiveLayerDrop(small_model(), theta_bar=0.5, gamma=0.1, seed=0)
    other.load_state_dict(state)
    assert [other.draw() for _ in range(5)] == ahead


# ---------------------------------------------------------------------- shared cost model
def test_dropping_branches_saves_exactly_their_shares_of_the_backward_in_full_finetuning():
    from lit_gpt.flops import CostModel

    model = small_model()
    ops, shares = cost_profile(model, 32), CostModel(model).branch_backward_flops(32)
    dropped = [0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # branch order: attn 0, mlp 0, attn 1, ...
    no_backward = [(i // 2, ("attn", "mlp")[i % 2]) for i, d in enumerate(dropped) if d]
    forward, backward = training_flops(ops)
    saved = sum(d * f for d, f in zip(dropped, shares))
    assert training_flops(ops, no_backward=no_backward) == (forward, backward - saved)


def test_skipping_only_weight_gradients_saves_the_units_own_gradients_in_full_finetuning():
    from lit_gpt.flops import CostModel

    model = small_model()
    ops, costs = cost_profile(model, 32), CostModel(model)
    saved = costs.branch_weight_grad_flops(32)
    own = [sum(u.weight_grad + u.reach for op in ops if (op.block, op.branch) == (i // 2, ("attn", "mlp")[i % 2])
               for u in op.units) for i in range(len(saved))]
    assert saved == pytest.approx(own, rel=1e-12)  # everything trains, so input gradients are always needed
    whole = costs.branch_backward_flops(32)
    assert all(0.3 < s / w < 0.7 for s, w in zip(saved, whole)), [s / w for s, w in zip(saved, whole)]
    _, backward = training_flops(ops)
    both = [(0, "mlp"), (1, "attn")]
    assert training_flops(ops, no_weight_grad=both)[1] == pytest.approx(backward - saved[1] - saved[2], rel=1e-12)


@pytest.mark.parametrize("method", ["none", "dropbp", "dropbp-weights", "pld", "greentrainer", "lora"])
def test_measured_flops_of_a_step_are_within_10_percent_of_the_cost_model(method):
    model, ids = small_model(), batch(length=16)
    if method.startswith("dropbp"):
        drop_mode = "weights" if method == "dropbp-weights" else "branch"
        DropBPHandler(model, seed=1, drop_mode=drop_mode).set_initial_drop_rate(0.5)
    elif method == "pld":
        ProgressiveLayerDrop(model, theta_bar=0.3, gamma=1.0, seed=1).set_step(100)
    elif method == "greentrainer":
        GreenTrainer(model, rho=0.6, seq_len=16).apply(np.arange(len(units(cost_profile(model, 16)))) % 3 != 1)
    elif method == "lora":
        add_lora(model, LoRAConfig(r=8))
    measured = counted_flops(lambda: lm_loss(model, ids).backward())
    forward, backward = current_training_flops(model, ids.size(1) - 1)
    ratio = measured / (ids.size(0) * (forward + backward))
    assert 0.9 < ratio <= 1.0, ratio  # FlopCounterMode counts matrix products only (no loss, norms, CPU attention)


# ---------------------------------------------------------------------- GreenTrainer: DP
def brute_force(t_dy, t_dw, importance, budget) -> float:
    best = 0.0
    for bits in itertools.product([False, True], repeat=len(t_dy)):
        if selection_cost(t_dy, t_dw, bits) <= budget:
            best = max(best, float(np.dot(bits, importance)))
    return best


def test_dp_equals_brute_force_and_never_exceeds_its_budget_on_200_random_cases():
    rng = np.random.default_rng(0)
    for case in range(200):
        n = int(rng.integers(1, 11))
        t_dy, t_dw = rng.integers(0, 20, n), rng.integers(0, 20, n)
        t_dy[rng.random(n) < 0.2] = 0  # weightless gaps and free tensors happen (norms floor to 0 levels)
        importance = rng.normal(0.3, 1.0, n)  # some updates raise the loss
        budget = int(rng.integers(0, t_dy.sum() + t_dw.sum() + 2))
        value, mask = select_tensors(t_dy, t_dw, importance, budget)
        assert selection_cost(t_dy, t_dw, mask) <= budget, case
        assert value == pytest.approx(importance[mask].sum(), abs=1e-12)
        assert value == pytest.approx(brute_force(t_dy, t_dw, importance, budget), abs=1e-9), case


def test_dp_reaches_the_deepest_tensor_when_the_whole_chain_fits():
    # The reference's depth cap stops one tensor short when every t_dy fits, losing the best tensor here.
    value, mask = select_tensors([1, 1, 1], [1, 1, 1], [0.1, 0.1, 1.0], budget=6)
    assert mask.tolist() == [True, True, True] and value == pytest.approx(1.2)
    # ...and a tensor whose reach alone exceeds the budget is never chosen.
    value, mask = select_tensors([1, 1, 5], [1, 1, 0], [0.1, 0.1, 1.0], budget=6)
    assert mask.tolist() == [True, True, False]


def test_objective_is_monotone_in_rho_and_rho_one_trains_everything_worth_it():
    model = small_model()
    importance = np.random.default_rng(1).normal(0.2, 1.0, len(units(cost_profile(model, 32))))
    objectives = []
    for rho in np.linspace(0.4, 1.0, 13):
        gt = GreenTrainer(model, rho=float(rho), seq_len=32)
        mask = gt.choose(importance)
        assert selection_cost(gt.dy_levels, gt.dw_levels, mask) <= gt.budget
        objectives.append(gt.objective)
    assert all(a <= b + 1e-12 for a, b in zip(objectives, objectives[1:])), objectives
    assert objectives[0] < objectives[-1] == pytest.approx(importance[importance > 0].sum())


def test_budget_conversion_and_cost_levels():
    gt = GreenTrainer(small_model(), rho=0.6, seq_len=32)
    # forward + selected backward <= rho x (forward + full backward)
    assert gt.forward_flops + gt.rho_bp * gt.full_backward_flops == pytest.approx(
        0.6 * (gt.forward_flops + gt.full_backward_flops))
    levels = gt.dy_levels.sum() + gt.dw_levels.sum()
    assert 1000 - len(gt.units) < levels <= 1000 and gt.budget == int(gt.rho_bp * levels)
    # The head's gradient is paid by every tensor below it, the attention core by qkv.
    names = [u.name for u in gt.units]
    assert names[0] == "lm_head.weight" and names[1] == "transformer.ln_f.weight"
    ops = cost_profile(small_model(), 32)
    head = next(op for op in ops if op.name == "lm_head")
    core = next(op for op in ops if op.name == "transformer.h.3.attn.core")
    proj = next(op for op in ops if op.name == "transformer.h.3.attn.proj")
    t_dy, _ = tensor_flops(ops)
    assert t_dy[1] == head.input_grad
    assert t_dy[names.index("transformer.h.3.attn.attn.weight")] == proj.input_grad + core.input_grad
    with pytest.raises(ValueError, match="forward pass alone"):
        backward_budget(0.2, forward_flops=1.0, backward_flops=2.0)  # forward is a third of the step
    assert quantize_costs(np.array([0.4, 1.0]), np.array([0.6, 2.0]), 10)[0].tolist() == [1, 2]


# ---------------------------------------------------------------------- GreenTrainer: applying a selection
def test_only_selected_tensors_get_gradients_and_backprop_stops_below_the_deepest():
    model = small_model()
    gt = GreenTrainer(model, rho=0.6, seq_len=16)
    names = [u.name for u in gt.units]
    chosen = {"lm_head.weight", "transformer.h.3.mlp.fc_1.weight", "transformer.h.2.attn.proj.weight"}
    gt.apply([n in chosen for n in names])
    fired = []
    model.transformer.h[1].register_full_backward_hook(lambda *a: fired.append(1))  # below the deepest (block 2)
    model.transformer.h[3].register_full_backward_hook(lambda *a: fired.append(3))
    lm_loss(model, batch()).backward()
    assert fired == [3]
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == chosen


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_selected_step_flops_match_the_selection_cost(kind):
    model, ids = small_model(), batch(length=17)
    if kind == "lora":
        add_lora(model, LoRAConfig(r=8))
    gt = GreenTrainer(model, rho=0.7, seq_len=16)
    if kind == "lora":
        assert all(u.name.endswith(".lora") for u in gt.units)
        assert len(gt.units) == sum(isinstance(m, LoRALinear) for m in model.modules())
    mask = gt.choose(np.linspace(1.0, 0.1, len(gt.units)))
    gt.apply(mask)
    assert 0 < mask.sum() < len(mask)
    measured = counted_flops(lambda: lm_loss(model, ids).backward())
    model_flops = ids.size(0) * (gt.forward_flops + selection_cost(gt.t_dy, gt.t_dw, mask))
    assert 0.9 < measured / model_flops <= 1.0, measured / model_flops


def test_importance_sums_to_the_loss_drop_of_a_small_sgd_step_and_restores_everything():
    model, ids = small_model(), batch(size=4, length=24)
    params = [p for p in model.parameters()]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    lm_loss(model, batch(seed=5)).backward()  # some optimizer state and gradients to preserve
    optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in params]
    grads = [p.grad.clone() for p in params]
    model.transformer.h[0].norm_1.weight.requires_grad_(False)

    with torch.no_grad():
        loss_before = lm_loss(model, ids).item()
    importance = tensor_importance([[p] for p in params], lambda: lm_loss(model, ids).backward(), optimizer)

    # Restored: weights, optimizer state, gradients, requires_grad.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(optimizer.state[p]["momentum_buffer"], m) for p, m in zip(params, momentum))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert not model.transformer.h[0].norm_1.weight.requires_grad

    # The actual drop of that same step, taken by hand.
    reference = small_model()
    reference.load_state_dict(before)
    ref_params = list(reference.parameters())
    ref_opt = torch.optim.SGD(ref_params, lr=1e-3, momentum=0.9)
    ref_opt.load_state_dict(optimizer.state_dict())
    lm_loss(reference, ids).backward()
    ref_opt.step()
    with torch.no_grad():
        drop = loss_before - lm_loss(reference, ids).item()
    assert drop > 0
    assert importance.sum().item() == pytest.approx(drop, rel=0.05)
    assert normalise(importance).abs().max() == 1.0
