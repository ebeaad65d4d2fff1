"""DropBP variants: the unbiased estimator, restricting which branches drop, and depth-shaped allocation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from conftest import tiny_shape
from dropbp import DropBP, DropBPHandler
from lit_gpt.config import Config
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
