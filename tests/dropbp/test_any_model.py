"""The `dropbp` library on a model that is not a LLaMA: a small residual MLP regressor with LayerNorm branches.

It backs the claim that the library works on any PyTorch model whose residual branches run through `DropBP`.
"""

import torch
import torch.nn as nn

from conftest import SavedBytes
from dropbp import DropBP, DropBPHandler


class ResidualRegressor(nn.Module):
    """x -> Linear -> [h + branch_i(h)] * depth -> Linear; each branch is LayerNorm + Linear + GELU."""

    def __init__(self, width: int = 16, depth: int = 4, wrap: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.branches = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
                                      for _ in range(depth))
        self.drops = nn.ModuleList(DropBP(b) for b in self.branches) if wrap else None
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for i, branch in enumerate(self.branches):
            h = h + (self.drops[i](h) if self.drops is not None else branch(h))
        return self.out(h).squeeze(-1)


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g), torch.randn(32, generator=g)


def models() -> tuple[ResidualRegressor, ResidualRegressor]:
    torch.manual_seed(0)
    wrapped = ResidualRegressor()
    plain = ResidualRegressor(wrap=False)
    plain.load_state_dict(wrapped.state_dict())  # DropBP adds no parameters and renames none
    return wrapped, plain


def gradients(model: nn.Module) -> dict[str, torch.Tensor | None]:
    x, y = data()
    model.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_at_drop_rate_zero_gradients_are_bit_identical_to_the_plain_model():
    wrapped, plain = models()
    DropBPHandler(wrapped, seed=1).set_initial_drop_rate(0.0)
    ours, reference = gradients(wrapped.train()), gradients(plain.train())
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[n], reference[n]) for n in ours)


def test_a_dropped_branch_gets_no_gradient_and_keeps_no_activations_while_the_rest_learns():
    wrapped, _ = models()
    handler = DropBPHandler(wrapped, seed=1)
    handler.set_drop_rates([0.0, 1.0, 0.0, 1.0])
    counter = SavedBytes(wrapped, list(wrapped.branches))
    x, y = data()
    loss = counter.run(lambda: nn.functional.mse_loss(wrapped.train()(x), y))
    saved = counter.per_module()
    assert handler.dropped == [False, True, False, True]
    assert saved[0] > 0 and saved[2] > 0 and saved[1] == 0 and saved[3] == 0
    loss.backward()
    grads = {n: p.grad for n, p in wrapped.named_parameters()}
    assert all(grads[n] is None for n in grads if n.startswith(("branches.1.", "branches.3.")))
    assert all(grads[n] is not None and grads[n].abs().sum() > 0
               for n in grads if n.startswith(("inp.", "out.", "branches.0.", "branches.2.")))


def test_eval_mode_never_drops_and_the_forward_is_unchanged():
    wrapped, plain = models()
    handler = DropBPHandler(wrapped, seed=1)
    handler.set_initial_drop_rate(1.0)
    x, _ = data()
    with torch.no_grad():
        assert torch.equal(wrapped.train()(x), plain(x))  # dropping changes the backward only
        assert torch.equal(wrapped.eval()(x), plain(x))


def test_skip_backward_only_when_nothing_trainable_is_reachable():
    wrapped, _ = models()
    handler = DropBPHandler(wrapped, seed=1)
    handler.set_initial_drop_rate(1.0)
    wrapped.train()(data()[0])
    assert not handler.detect_non_grad()  # the input and output layers still learn through the residual path
    for p in [*wrapped.inp.parameters(), *wrapped.out.parameters()]:
        p.requires_grad_(False)
    assert handler.detect_non_grad()


def test_calibration_measures_every_branch_and_meets_the_target():
    wrapped, _ = models()
    handler = DropBPHandler(wrapped, seed=1)
    handler.set_initial_drop_rate(0.5)
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    x, y = data()
    result = handler.sensitivity_based_drop_bp(lambda: nn.functional.mse_loss(wrapped.train()(x), y), 0.5,
                                               allocator="flops")
    assert len(result.sensitivities) == 4 and min(result.sensitivities) > 0
    assert abs(sum(handler.drop_rates) / 4 - 0.5) < 1e-6  # equal FLOPs per branch: the mean rate is the target
    assert all(p.grad is None for p in wrapped.parameters())  # training state untouched
    assert all(torch.equal(p, before[n]) for n, p in wrapped.named_parameters())
