"""DropBP variants: the unbiased estimator, restricting which branches drop, and depth-shaped allocation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import tiny_shape
from dropbp import DropBP, DropBPHandler
from dropbp.allocation import (
    UnreachableTarget,
    depth_allocation,
    dropped_fraction,
    flops_aware_allocation,
    greedy_allocation,
)
from lit_gpt.config import Config
from lit_gpt.methods.base import RunContext
from lit_gpt.methods.dropbp import DropBP as DropBPMethod
from lit_gpt.methods.dropbp import DropBPArgs, check_dropbp_args
from lit_gpt.model import GPT
from lit_gpt.utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


class TinyResidual(nn.Module):
    """x -> Linear -> [h + tanh(Linear(h))] * depth -> Linear, in float64: small enough to average 1000s of draws."""

    def __init__(self, depth: int = 4, width: int = 6, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(3, width).double()
        self.branches = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()).double()
                                      for _ in range(depth))
        self.drops = nn.ModuleList(DropBP(b) for b in self.branches)
        self.out = nn.Linear(width, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for drop in self.drops:
            h = h + drop(h)
        return self.out(h).squeeze(-1)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)


def flat_gradient(model: nn.Module) -> torch.Tensor:
    """One training step's gradient of every parameter, flattened (missing gradients count as zeros)."""
    x, y = batch()
    model.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def branch_gradient(model: TinyResidual, i: int) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.branches[i].parameters()])


def exact_gradient(model: nn.Module) -> torch.Tensor:
    model.eval()  # eval mode never drops and never scales: full backprop
    try:
        return flat_gradient(model)
    finally:
        model.train()


def draw_until(handler: DropBPHandler, kept: int) -> None:
    """Find a micro-batch whose draw keeps branch `kept`, and make the next training forward draw it."""
    for step in range(1000):
        if not handler.draw(step)[kept]:
            handler.step = step  # the forward's own draw replays this step
            return
    raise AssertionError("branch never kept")


# ---------------------------------------------------------------------------------------------- 1. unbiased
@pytest.mark.parametrize("p", [0.5, 0.75])
def test_a_kept_branch_gets_exactly_one_over_keep_rate_times_its_plain_gradient(p):
    plain = TinyResidual()
    plain.train()
    flat_gradient(plain)
    top = len(plain.drops) - 1
    for unbiased, factor in [(False, 1.0), (True, 1 / (1 - p))]:
        model = TinyResidual().train()
        handler = DropBPHandler(model, seed=3, unbiased=unbiased)
        handler.set_drop_rates([0.0] * top + [p])  # only the top branch may drop
        draw_until(handler, top)
        assert model.drops[top].grad_scale == factor
        flat_gradient(model)
        # 1/(1-p) is a power of two here, so scaling commutes with every rounding: exact equality holds
        assert torch.equal(branch_gradient(model, top), factor * branch_gradient(plain, top))
        assert torch.equal(model.out.weight.grad, plain.out.weight.grad)  # above the branch: untouched
        if unbiased:  # below it, the residual path is unchanged and the branch path is scaled: a different sum
            assert not torch.equal(branch_gradient(model, 0), branch_gradient(plain, 0))
        with torch.no_grad():  # the forward output is unchanged
            assert torch.equal(model(batch()[0]), plain(batch()[0]))


def test_unbiased_at_drop_rate_zero_gives_bit_identical_gradients_to_full_backprop():
    torch.manual_seed(0)
    model = GPT(Config(**tiny_shape(n_embd=32, intermediate_size=64, vocab_size=50, block_size=16)))
    model.reset_parameters()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))

    def grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1)).backward()
        return [p.grad.clone() for p in model.parameters()]

    model.train()
    reference = grads()
    handler = DropBPHandler(model, seed=0, unbiased=True)
    handler.set_initial_drop_rate(0.0)
    assert handler.unbiased and handler.sampling == "independent"
    ours = grads()
    assert all(layer.grad_scale == 1.0 and not layer.dropped for layer in handler.layers)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))


def mean_and_standard_error(model: nn.Module, draws: int) -> tuple[torch.Tensor, float]:
    """The mean DropBP gradient over `draws` training steps, and the standard error of that mean (its norm)."""
    x, y = batch()
    params = list(model.parameters())

    def gradient() -> torch.Tensor:
        grads = torch.autograd.grad(nn.functional.mse_loss(model(x), y), params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])

    samples = torch.stack([gradient() for _ in range(draws)])
    return samples.mean(0), math.sqrt(float(samples.var(0).sum()) / draws)


def distance_in_standard_errors(p: float, unbiased: bool, sampling: str | None = None, draws: int = 400) -> float:
    """|| mean DropBP gradient - exact gradient ||, in standard errors of the mean over `draws` draws.

    For an unbiased estimator, ||mean - exact||^2 has expectation trace(Cov) / draws = standard_error^2, and,
    a sum over ~200 coordinates, concentrates near it: 4 is far outside its spread. A bias b adds ||b||^2, so
    the distance grows like sqrt(draws) * ||b|| / std; these thresholds hold with a wide margin at 400 draws.
    """
    exact = exact_gradient(TinyResidual())
    model = TinyResidual().train()
    handler = DropBPHandler(model, seed=5, unbiased=unbiased, sampling=sampling)
    handler.set_initial_drop_rate(p)
    mean, standard_error = mean_and_standard_error(model, draws)
    assert handler.step == draws  # every gradient came from its own draw
    return float((mean - exact).norm()) / standard_error


def test_the_mean_gradient_over_many_draws_is_the_exact_gradient_only_when_unbiased():
    assert distance_in_standard_errors(0.5, unbiased=True) < 4
    assert distance_in_standard_errors(0.5, unbiased=False) > 10


def test_unbiased_scaling_with_systematic_sampling_stays_biased():
    # At p = 0.75 systematic sampling keeps exactly one of the four branches: no path through two kept branches
    assert distance_in_standard_errors(0.75, unbiased=True, sampling="systematic") > 5


def test_unbiased_is_saved_and_old_states_load_as_biased():
    handler = DropBPHandler(TinyResidual(), unbiased=True)
    state = handler.state_dict()
    assert state["unbiased"] is True
    fresh = DropBPHandler(TinyResidual())
    fresh.load_state_dict(state)
    assert fresh.unbiased and fresh.sampling == "independent"
    old = {k: v for k, v in state.items() if k not in ("unbiased", "sampling")}  # written before the option
    again = DropBPHandler(TinyResidual(), unbiased=True)
    again.load_state_dict(old)
    assert not again.unbiased and again.sampling == "systematic"


def test_unbiased_and_lr_compensation_are_refused_together():
    with pytest.raises(ValueError, match="choose one"):
        DropBPHandler(TinyResidual(), lr_compensation=True, unbiased=True)
    check_dropbp_args(DropBPArgs(drop_rate=0.5, unbiased=True))
    with pytest.raises(UserError, match="--unbiased true and --lr_compensation true") as error:
        check_dropbp_args(DropBPArgs(drop_rate=0.5, unbiased=True, lr_compensation=True))
    assert "\n" not in str(error.value)


def test_calibration_measures_unscaled_gradients_and_restores_the_scales():
    model = TinyResidual().train()
    handler = DropBPHandler(model, unbiased=True)
    handler.set_initial_drop_rate(0.5)
    x, y = batch()
    handler.draw(0)
    scales = [layer.grad_scale for layer in handler.layers]
    assert set(scales) == {1.0, 2.0}

    def loss_fn() -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    measured = handler.sensitivity_based_drop_bp(loss_fn, 0.5, metric="grad").sensitivities
    assert [layer.grad_scale for layer in handler.layers] == scales
    plain = DropBPHandler(TinyResidual().train())  # the same weights, never scaled
    assert measured == plain.sensitivity_based_drop_bp(lambda: nn.functional.mse_loss(plain.model(x), y), 0.5,
                                                       metric="grad").sensitivities


# ---------------------------------------------------------------------------------------------- 2. which branches
RANDOM = torch.Generator().manual_seed(7)
FLOPS = (torch.rand(10, generator=RANDOM, dtype=torch.float64) + 0.2).tolist()
SENSITIVITIES = torch.rand(10, generator=RANDOM, dtype=torch.float64).tolist()
EVERY_OTHER = [i % 2 == 0 for i in range(10)]  # "attention" branches, as a GPT orders them


def share(flops, droppable) -> float:
    return sum(f for f, d in zip(flops, droppable) if d) / sum(flops)


@pytest.mark.parametrize("allocate, cap", [(greedy_allocation, 0.9), (flops_aware_allocation, 0.95),
                                           (depth_allocation, 1.0)])
def test_allocators_drop_only_droppable_branches_and_still_meet_the_target_over_all(allocate, cap):
    target = 0.8 * cap * share(FLOPS, EVERY_OTHER)
    rates = allocate(SENSITIVITIES, FLOPS, target, droppable=EVERY_OTHER)
    assert all(r == 0.0 for r, d in zip(rates, EVERY_OTHER) if not d)
    assert all(0.0 < r <= cap + 1e-12 for r, d in zip(rates, EVERY_OTHER) if d)
    if allocate is greedy_allocation:  # steps of 0.1: the smallest total at or above the target
        assert target <= dropped_fraction(rates, FLOPS) < target + 0.1
    else:
        assert dropped_fraction(rates, FLOPS) == pytest.approx(target, rel=1e-9)
    unrestricted = allocate(SENSITIVITIES, FLOPS, target)
    assert any(r > 0 for r, d in zip(unrestricted, EVERY_OTHER) if not d)  # the mask is what spared them

    reachable = cap * share(FLOPS, EVERY_OTHER)
    with pytest.raises(UnreachableTarget, match="droppable branches only") as error:
        allocate(SENSITIVITIES, FLOPS, reachable + 0.01, droppable=EVERY_OTHER)
    assert error.value.reachable == pytest.approx(reachable)
    at_edge = allocate(SENSITIVITIES, FLOPS, reachable, droppable=EVERY_OTHER)
    assert at_edge == pytest.approx([cap if d else 0.0 for d in EVERY_OTHER])


def test_the_initial_rate_is_uniform_over_droppable_branches_and_calibration_keeps_the_rest_at_zero():
    model = TinyResidual(depth=4).train()
    handler = DropBPHandler(model)
    handler.set_branch_flops([1.0, 3.0, 1.0, 3.0])
    droppable = [False, True, False, True]
    handler.set_initial_drop_rate(0.3, droppable)
    assert handler.drop_rates == pytest.approx([0.0, 0.4, 0.0, 0.4])  # 0.3 * 8 / 6
    assert dropped_fraction(handler.drop_rates, handler.branch_flops) == pytest.approx(0.3)
    for _ in range(200):
        handler.draw()
        assert not handler.dropped[0] and not handler.dropped[2]
    x, y = batch()
    handler.sensitivity_based_drop_bp(lambda: nn.functional.mse_loss(model(x), y), 0.3, allocator="flops")
    assert handler.drop_rates[0] == handler.drop_rates[2] == 0.0
    assert dropped_fraction(handler.drop_rates, handler.branch_flops) == pytest.approx(0.3, rel=1e-9)
    with pytest.raises(UnreachableTarget, match=r"reachable range is \[0, 0\.75\]"):
        handler.set_initial_drop_rate(0.8, droppable)
    assert handler.droppable == droppable  # a failed call changes nothing
    handler.set_initial_drop_rate(0.3)
    assert handler.drop_rates == [0.3] * 4 and handler.droppable is None

    state = handler.state_dict()
    handler.set_initial_drop_rate(0.3, droppable)
    state_restricted = handler.state_dict()
    resumed = DropBPHandler(TinyResidual())
    resumed.load_state_dict(state_restricted)
    assert resumed.droppable == droppable and resumed.drop_rates == handler.drop_rates
    resumed.load_state_dict({k: v for k, v in state.items() if k != "droppable"})  # written before the option
    assert resumed.droppable is None


def tiny_gpt(n_layer: int = 4) -> GPT:
    torch.manual_seed(0)
    model = GPT(Config(**tiny_shape(n_embd=32, intermediate_size=64, vocab_size=50, block_size=16, n_layer=n_layer)))
    model.reset_parameters()
    return model


def started(args: DropBPArgs, tmp_path, n_layer: int = 4, max_steps: int = 10) -> DropBPMethod:
    """The DropBP method after the loop's `start`, on a tiny GPT (no training, no files written)."""
    model = tiny_gpt(n_layer)
    method = DropBPMethod(model, args, full_finetuning=True, calibration_batch_size=2, seed=0)

    def unused(*_args, **_kwargs):
        raise AssertionError("start must not train or calibrate")

    run = RunContext(model=model, optimizer=None, max_steps=max_steps, accumulation=1, micro_batches_per_epoch=10,
                     seed=0, mean_seq_length=16, out_dir=tmp_path, is_main=False, learning_rate=unused,
                     run_micro_batches=unused, calibration_batch=unused, whole_model=unused, all_reduce_mean=unused,
                     check_loss=unused, print=unused)
    method.start(run)
    return method


@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_drop_branches_restricts_dropping_to_one_kind_of_branch(tmp_path, kind):
    method = started(DropBPArgs(drop_rate=0.2, drop_branches=kind), tmp_path)
    handler = method.handler
    kinds = [layer.kind for layer in handler.layers]
    assert kinds == ["attention", "mlp"] * 4  # lit_gpt labels its branches
    rates = handler.drop_rates
    assert all(r == 0.0 for r, k in zip(rates, kinds) if k != kind)
    assert len({r for r, k in zip(rates, kinds) if k == kind}) == 1 and max(rates) > 0.2
    assert dropped_fraction(rates, handler.branch_flops) == pytest.approx(0.2)
    assert method.history[0]["drop_branches"] == kind and method.history[0]["allocator"] == "uniform"


def test_an_unreachable_target_for_the_selected_branches_names_the_largest_reachable_one(tmp_path):
    attention = DropBPHandler(tiny_gpt())  # what the method will see: the cost model's FLOPs
    flops = started(DropBPArgs(drop_rate=0.1), tmp_path).handler.branch_flops
    reachable = 0.9 * share(flops, [layer.kind == "attention" for layer in attention.layers])  # greedy's cap
    assert 0.05 < reachable < 0.6
    with pytest.raises(UserError, match="largest reachable target is") as error:
        started(DropBPArgs(drop_rate=round(reachable + 0.02, 2), drop_branches="attention"), tmp_path)
    message = str(error.value)
    assert "\n" not in message and "--drop_branches attention" in message
    largest = float(message.rsplit(" ", 1)[1])
    assert reachable - 1e-4 <= largest <= reachable
    started(DropBPArgs(drop_rate=largest, drop_branches="attention"), tmp_path)  # the named target works
    # with no calibration to come (sensitivity none), the uniform start's bound is the share itself, cap 1
    started(DropBPArgs(drop_rate=round(reachable + 0.02, 2), drop_branches="attention", sensitivity="none"), tmp_path)


# ---------------------------------------------------------------------------------------------- 3. depth
def test_depth_allocation_hand_worked():
    assert depth_allocation([1.0] * 4, [1.0] * 4, 0.5) == pytest.approx([0.8, 0.6, 0.4, 0.2])  # weights 1 .. 1/4
    # at 0.75 the bottom branch clips at 1 and the rest absorb its excess: 1 + 1 + 2/3 + 1/3 = 3 = 0.75 * 4
    assert depth_allocation([1.0] * 4, [1.0] * 4, 0.75) == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3])
    assert depth_allocation([1.0] * 4, [1.0] * 4, 0.75, cap=0.9) == pytest.approx([0.9, 0.9, 0.8, 0.4])
    assert depth_allocation([1.0] * 4, [1.0] * 4, 0.0) == [0.0] * 4
    assert depth_allocation([5.0, 0.0, 1.0, 2.0], [1.0] * 4, 0.5) == depth_allocation([1.0] * 4, [1.0] * 4, 0.5)


@pytest.mark.parametrize("droppable", [None, EVERY_OTHER])
@pytest.mark.parametrize("cap", [1.0, 0.9])
def test_depth_allocation_meets_the_target_falls_with_depth_and_stays_in_bounds(droppable, cap):
    mask = droppable or [True] * 10
    for fraction in (0.05, 0.3, 0.6, 0.9, 0.99, 1.0):
        target = fraction * cap * share(FLOPS, mask)
        rates = depth_allocation(SENSITIVITIES, FLOPS, target, cap=cap, droppable=droppable)
        assert dropped_fraction(rates, FLOPS) == pytest.approx(target, rel=1e-9, abs=1e-12)
        assert all(0.0 <= r <= cap for r in rates)
        assert all(r == 0.0 for r, d in zip(rates, mask) if not d)
        shaped = [r for r, d in zip(rates, mask) if d]
        assert all(a >= b for a, b in zip(shaped, shaped[1:])), shaped
        if fraction < 1:  # falling, and the top branch still drops (at the maximum, all sit at the cap)
            assert shaped[0] > shaped[-1] > 0


def test_allocator_depth_shapes_the_start_and_never_calibrates(tmp_path):
    method = started(DropBPArgs(drop_rate=0.4, allocator="depth"), tmp_path)  # sensitivity auto
    handler = method.handler
    assert method.metric == "none" and method._calibration_steps == set()
    assert handler.drop_rates == depth_allocation([1.0] * 8, handler.branch_flops, 0.4)
    assert handler.drop_rates[0] > handler.drop_rates[-1]
    assert method.history[0]["allocator"] == "depth"
    mlp_only = started(DropBPArgs(drop_rate=0.3, allocator="depth", drop_branches="mlp", sensitivity="none"),
                       tmp_path).handler.drop_rates
    assert mlp_only[0::2] == [0.0] * 4 and mlp_only[1] > mlp_only[3] > mlp_only[5] > mlp_only[7] > 0
    with pytest.raises(UserError, match="--allocator depth ignores sensitivities"):
        check_dropbp_args(DropBPArgs(drop_rate=0.4, allocator="depth", sensitivity="grad"))


def test_the_variant_flags_parse_and_default_off(tmp_path):
    from lit_gpt.args import parse_args

    base = ["--checkpoint_dir", str(tmp_path)]
    assert parse_args("lora", base).dropbp == DropBPArgs()
    args = parse_args("lora", [*base, "--drop_rate", "0.3", "--unbiased", "true", "--drop_branches", "mlp",
                               "--allocator", "depth", "--drop_schedule", "decay"]).dropbp
    assert (args.unbiased, args.drop_branches, args.allocator, args.drop_schedule) == (True, "mlp", "depth", "decay")
    with pytest.raises(SystemExit):
        parse_args("lora", [*base, "--drop_branches", "norm"])


# ---------------------------------------------------------------------------------------------- 4. schedule
def test_drop_rate_scale_hand_worked():
    from lit_gpt.schedule import drop_rate_scale

    assert [drop_rate_scale("constant", s, 5) for s in range(5)] == [1.0] * 5
    assert [drop_rate_scale("decay", s, 5) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [drop_rate_scale("ramp", s, 5) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert drop_rate_scale("decay", 0, 1) == 1.0  # a one-step run keeps the rates
    with pytest.raises(ValueError, match="unknown drop schedule"):
        drop_rate_scale("cosine", 0, 5)


def test_the_rate_scale_multiplies_every_draw_and_the_unbiased_scale_but_keeps_the_allocation():
    model = TinyResidual(depth=4)
    handler = DropBPHandler(model, unbiased=True)  # independent draws, so each branch drops at its own rate
    handler.set_drop_rates([0.8] * 4)
    handler.set_rate_scale(0.5)
    dropped = torch.stack([handler.draw(step) for step in range(4000)]).double()
    assert dropped.mean().item() == pytest.approx(0.4, abs=0.02)
    assert handler.drop_rates == [0.8] * 4 and handler.scheduled_drop_rates == [0.4] * 4
    kept = next(layer for layer in handler.layers if not layer.dropped)
    assert kept.grad_scale == pytest.approx(1 / 0.6)
    handler.set_rate_scale(0.0)
    assert not any(handler.draw(step).any() for step in range(50))
    compensated = DropBPHandler(model, lr_compensation=True)
    compensated.set_drop_rates([0.8] * 4)
    compensated.set_rate_scale(0.5)
    assert compensated.lr_multiplier(0) == pytest.approx(1 / 0.6)
    with pytest.raises(ValueError, match=r"rate scale must lie in \[0, 1\]"):
        handler.set_rate_scale(1.5)


def test_the_rate_scale_is_saved_and_old_states_load_unscaled():
    handler = DropBPHandler(TinyResidual())
    handler.set_rate_scale(0.25)
    state = handler.state_dict()
    restored = DropBPHandler(TinyResidual())
    restored.load_state_dict(state)
    assert restored.rate_scale == 0.25
    restored.load_state_dict({k: v for k, v in state.items() if k != "rate_scale"})
    assert restored.rate_scale == 1.0


def test_the_method_sets_the_schedule_before_every_step(tmp_path):
    method = started(DropBPArgs(drop_rate=0.5, drop_schedule="ramp", sensitivity="none"), tmp_path, max_steps=5)
    run = SimpleNamespace(step=2, max_steps=5)
    method.before_step(run)
    assert method.handler.rate_scale == 0.5 and method.history[0]["drop_schedule"] == "ramp"
    assert method.handler.scheduled_drop_rates == [0.25] * 8


# ---------------------------------------------------------------------------------------------- 5. weights mode
def branch_parameter_ids(model: TinyResidual, i: int) -> set[int]:
    return {id(p) for p in model.branches[i].parameters()}


def gradient_by_parameter(model: nn.Module) -> dict[int, torch.Tensor | None]:
    x, y = batch()
    model.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    return {id(p): p.grad for p in model.parameters()}


@pytest.mark.parametrize("drop_mode", ["branch", "weights"])
def test_the_weights_mode_keeps_every_other_gradient_exact_and_only_zeroes_the_dropped_branchs_own(drop_mode):
    model = TinyResidual(depth=4)
    model.eval()
    exact = gradient_by_parameter(model)
    model.train()
    handler = DropBPHandler(model, drop_mode=drop_mode)
    handler.set_drop_rates([0.0, 0.0, 1.0, 0.0])  # branch 2 always drops
    grads = gradient_by_parameter(model)
    assert all(p.requires_grad for p in model.parameters())  # the weights were frozen for the call only
    dropped = branch_parameter_ids(model, 2)
    assert all(grads[i] is None for i in dropped)
    below = [id(p) for p in [*model.inp.parameters(), *model.branches[0].parameters(), *model.branches[1].parameters()]]
    above = [id(p) for p in [*model.branches[3].parameters(), *model.out.parameters()]]
    assert all(torch.equal(grads[i], exact[i]) for i in above)  # above the branch nothing changes in either mode
    if drop_mode == "weights":
        assert all(torch.equal(grads[i], exact[i]) for i in below)
    else:  # the whole backward is skipped: the layers below miss the gradient that came through the branch
        assert not any(torch.allclose(grads[i], exact[i]) for i in below)


def test_the_weights_mode_restores_requires_grad_when_the_branch_raises():
    def failing(x):
        raise RuntimeError("boom")

    linear = nn.Linear(2, 2)
    layer = DropBP(failing, modules=(linear,))
    layer.dropped, layer.weights_only = True, True
    with pytest.raises(RuntimeError, match="boom"):
        layer(torch.ones(2, requires_grad=True))
    assert all(p.requires_grad for p in linear.parameters())


def test_weights_only_sensitivity_is_the_gradient_each_drop_removes():
    from dropbp.sensitivity import measure_sensitivity

    model = TinyResidual(depth=4)
    handler = DropBPHandler(model, drop_mode="weights")
    x, y = batch()
    params = list(model.parameters())
    for metric in ("grad", "gradnorm"):
        handler.set_drop_rates([0.0] * 4)  # the measurement's forward draws too (the handler's own call prevents it)
        result = measure_sensitivity(handler.layers, lambda: nn.functional.mse_loss(model(x), y), params, metric,
                                     weights_only=True)
        exact = flat_gradient(model.eval())
        model.train()
        expected = []
        for i in range(4):
            handler.set_drop_rates([1.0 if j == i else 0.0 for j in range(4)])
            expected.append(float((exact - flat_gradient(model)).pow(2).sum()))
        assert result.sensitivities == pytest.approx(expected, rel=1e-9)
        assert result.backward_passes == 1


def test_the_drop_mode_is_saved_and_refused_with_unbiased(tmp_path):
    state = DropBPHandler(TinyResidual(), drop_mode="weights").state_dict()
    restored = DropBPHandler(TinyResidual())
    restored.load_state_dict(state)
    assert restored.drop_mode == "weights" and all(layer.weights_only for layer in restored.layers)
    with pytest.raises(ValueError, match="choose one"):
        DropBPHandler(TinyResidual(), unbiased=True, drop_mode="weights")
    with pytest.raises(UserError, match="--drop_mode weights"):
        check_dropbp_args(DropBPArgs(drop_rate=0.5, unbiased=True, drop_mode="weights"))


def test_the_weights_mode_allocates_over_the_weight_gradient_savings(tmp_path):
    from lit_gpt.flops import CostModel

    method = started(DropBPArgs(drop_rate=0.5, drop_mode="weights"), tmp_path)
    model = method.handler.model
    assert method.handler.branch_flops == pytest.approx(CostModel(model).branch_weight_grad_flops(16))
    assert all(layer.weights_only for layer in method.handler.layers)
    assert method.history[0]["drop_mode"] == "weights"


def test_the_weights_mode_keeps_fewer_activations_than_a_kept_branch_but_more_than_a_dropped_one():
    model = tiny_gpt(n_layer=2)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    weight_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_activation_bytes(drop_mode: str, p: float) -> int:
        handler = DropBPHandler(model, drop_mode=drop_mode)
        handler.set_initial_drop_rate(p)
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if t.untyped_storage().data_ptr() not in weight_storages:  # weights are kept anyway
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids)
        handler.remove()
        return total

    kept, weights_dropped, dropped = (saved_activation_bytes("branch", 0.0), saved_activation_bytes("weights", 1.0),
                                      saved_activation_bytes("branch", 1.0))
    # The linears' inputs are no longer kept, but what the input gradient needs (activations, attention) is.
    assert dropped < weights_dropped < 0.9 * kept, (dropped, weights_dropped, kept)


def test_resuming_with_another_drop_mode_is_refused(tmp_path):
    state = started(DropBPArgs(drop_rate=0.5, drop_mode="weights"), tmp_path).state_dict()
    with pytest.raises(UserError, match="--drop_mode weights: resume with the same flag"):
        started(DropBPArgs(drop_rate=0.5), tmp_path).load_state_dict(state)
