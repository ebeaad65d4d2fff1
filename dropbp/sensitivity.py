"""Leave-one-out sensitivity of each DropBP branch (the paper's Alg. 1), sharing one forward pass.

Dropping branch i removes exactly the part of the gradient that flows back through the branch's
output h_i; the forward pass, and so every other path, is unchanged. Because backpropagation is linear
in the incoming gradient, the gradient with branch i dropped is

    G_i = G_0 - D_i,   D_i = backprop of dL/dh_i from h_i down to the parameters,

so one forward pass (with its graph retained) serves every branch:

* metric "grad" (gradient variance, sum ||G_0 - G_i||^2) needs only ||D_i||^2: a partial backward from
  h_i downwards per branch, each touching only the layers below it. No full gradient set is stored.
* metric "gradnorm" (per-tensor norm variance, sum_t (||G_0,t|| - ||G_i,t||)^2) needs ||G_i,t||: one
  backward per branch seeded with (1 at the loss, -dL/dh_i at h_i), which yields G_i directly. Only
  per-tensor norms are kept, so memory stays at one transient gradient set, as the paper intends for
  full fine-tuning.

Both cost one forward pass instead of the naive 2L+1 forward and backward passes.

When dropping only skips a branch's own weight gradients (`weights_only`, the "weights" drop mode), G_i is G_0
with branch i's own tensors zeroed, so both metrics reduce to the sum of ||G_0,t||^2 over those tensors: one
full backward serves every branch. Gradients go through
`torch.autograd.grad`, so the accumulated `.grad` buffers, the optimizer and every RNG are untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from dropbp.layer import DropBP

Metric = Literal["grad", "gradnorm"]


@dataclass
class SensitivityResult:
    sensitivities: list[float]
    metric: str
    seconds: float
    forward_passes: int
    backward_passes: int  # calls into autograd; "grad" ones stop at the branch, so most are partial

    def summary(self) -> str:
        return (f"sensitivity ({self.metric}) of {len(self.sensitivities)} branches: {self.seconds:.2f} s, "
                f"{self.forward_passes} forward + {self.backward_passes} backward passes")


def measure_sensitivity(layers: Sequence[DropBP], loss_fn: Callable[[], torch.Tensor],
                        params: Sequence[torch.nn.Parameter], metric: Metric = "grad",
                        weights_only: bool = False) -> SensitivityResult:
    """Sensitivity of every layer in `layers` for the batch that `loss_fn` evaluates.

    `loss_fn` runs the forward pass and returns the scalar loss; it must not call `backward()`.
    `params` are the trainable parameters whose gradients are compared. `weights_only`: dropping a branch only
    removes its own weights' gradients (the same value for both metrics, see the module's docstring).
    """
    if metric not in ("grad", "gradnorm"):
        raise ValueError(f"unknown sensitivity metric {metric!r}: choose grad or gradnorm")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: nothing to measure")
    start = time.perf_counter()
    saved = [(layer.dropped, layer.grad_scale) for layer in layers]
    devices = [p.device for p in params if p.device.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices})):
            for layer in layers:  # full backprop, unscaled (the unbiased mode's scales are for training)
                layer.dropped, layer.grad_scale, layer.capture = False, 1.0, []
            loss = loss_fn()
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise TypeError("loss_fn must return the scalar loss tensor (and must not call backward itself)")
            outputs = [_captured_output(layer) for layer in layers]
            if weights_only:
                sensitivities, backward_passes = _own_gradient_variance(loss, layers, params)
            elif metric == "grad":
                sensitivities, backward_passes = _gradient_variance(loss, outputs, params)
            else:
                sensitivities, backward_passes = _gradnorm_variance(loss, outputs, params)
    finally:
        for layer, (dropped, grad_scale) in zip(layers, saved):
            layer.dropped, layer.grad_scale, layer.capture = dropped, grad_scale, None
    return SensitivityResult(sensitivities, metric, time.perf_counter() - start, 1, backward_passes)


def _captured_output(layer: DropBP) -> torch.Tensor | None:
    if len(layer.capture) > 1:
        raise RuntimeError("a DropBP layer ran more than once in one forward pass; sensitivity needs one call each")
    output = layer.capture[0] if layer.capture else None
    return output if output is not None and output.requires_grad else None


def _output_gradients(loss, outputs):
    """dL/dh_i for every branch output that is part of the graph."""
    live = [h for h in outputs if h is not None]
    grads = iter(torch.autograd.grad(loss, live, retain_graph=True, allow_unused=True))
    return [None if h is None else next(grads) for h in outputs]


def _gradient_variance(loss, outputs, params) -> tuple[list[float], int]:
    output_grads = _output_gradients(loss, outputs)
    sensitivities = []
    for h, g in zip(outputs, output_grads):
        if h is None or g is None:
            sensitivities.append(0.0)
            continue
        diffs = torch.autograd.grad(h, params, grad_outputs=g, retain_graph=True, allow_unused=True)
        sensitivities.append(sum(float(d.double().pow(2).sum()) for d in diffs if d is not None))
    return sensitivities, 1 + sum(h is not None for h in outputs)


def _gradnorm_variance(loss, outputs, params) -> tuple[list[float], int]:
    full = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    full_norms = [_norm(g) for g in full]
    del full
    output_grads = _output_gradients(loss, outputs)
    sensitivities = []
    for h, g in zip(outputs, output_grads):
        if h is None or g is None:
            sensitivities.append(0.0)
            continue
        dropped = torch.autograd.grad((loss, h), params, grad_outputs=(torch.ones_like(loss), -g),
                                      retain_graph=True, allow_unused=True)
        sensitivities.append(sum((n0 - _norm(gi)) ** 2 for n0, gi in zip(full_norms, dropped)))
    return sensitivities, 2 + sum(h is not None for h in outputs)


def _own_gradient_variance(loss, layers, params) -> tuple[list[float], int]:
    full = torch.autograd.grad(loss, params, allow_unused=True)
    squares = {id(p): 0.0 if g is None else float(g.double().pow(2).sum()) for p, g in zip(params, full)}
    return [sum(squares.get(id(p), 0.0) for p in layer.branch_parameters()) for layer in layers], 1


def _norm(g: torch.Tensor | None) -> float:
    return 0.0 if g is None else float(g.double().norm())
