"""The DropBP layer: runs one residual branch, skipping its backward pass when the branch is dropped."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn


class _ScaleGradient(torch.autograd.Function):
    """Identity in the forward; multiplies the incoming gradient by `scale` in the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)  # a new tensor object, so autograd records this node

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class DropBP(nn.Module):
    """Wrap one residual branch (e.g. norm + attention) so that its backward pass can be dropped.

    Call it with the branch's own arguments. When the handler has marked the branch as dropped for the
    current micro-batch and the layer is in training mode, the branch runs under `torch.no_grad()`: the
    output is the same, but no autograd graph is built, so no activations are kept and no backward work
    happens. Eval mode never drops.

    With `weights_only` (the handler's "weights" drop mode) a dropped branch still builds its graph and passes the
    gradient on to its input; only its own parameters get no gradient this micro-batch. The layers below then get
    the exact gradient, and the step saves the branch's weight gradients (about half its backward in full
    fine-tuning, little with LoRA) instead of its whole backward.

    When the branch is kept and `grad_scale` is not 1 (the handler's unbiased mode sets 1 / (1 - p) at each
    draw), the gradient flowing into the branch output is multiplied by `grad_scale` in the backward: the
    branch's own weight gradients and the gradient it sends to its input are both scaled, the forward is not.

    Args:
        branch: the callable computing the branch output, typically a bound method of the host module.
        modules: the modules whose parameters the branch uses; defaults to `branch` itself when it is a module.
        flops: backward FLOPs of the branch, used to allocate drop rates (relative values are enough).
        kind: an optional label of the branch ("attention", "mlp"), to restrict dropping to one kind.
    """

    def __init__(self, branch: Callable[..., torch.Tensor], modules: Sequence[nn.Module] | None = None,
                 flops: float = 1.0, kind: str | None = None) -> None:
        super().__init__()
        if modules is None:
            if not isinstance(branch, nn.Module):
                raise TypeError("pass `modules=` when the branch is not an nn.Module")
            modules = (branch,)
        # Not registered as submodules: the host module owns these weights, so state-dict names stay the same.
        self.__dict__["branch"] = branch
        self.__dict__["branch_modules"] = tuple(modules)
        self.flops = float(flops)
        self.kind = kind
        self.drop_rate = 0.0
        self.dropped = False  # decided per micro-batch by DropBPHandler
        self.weights_only = False  # dropping skips only the branch's weight gradients (set by DropBPHandler)
        self.grad_scale = 1.0  # set per micro-batch by DropBPHandler; 1 leaves the backward untouched
        self.capture: list[torch.Tensor] | None = None  # set during sensitivity calibration

    def branch_parameters(self) -> Iterator[nn.Parameter]:
        seen: set[int] = set()
        for module in self.branch_modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.training and self.dropped:
            if self.weights_only:
                return self._without_weight_gradients(*args, **kwargs)
            with torch.no_grad():
                return self.branch(*args, **kwargs)
        output = self.branch(*args, **kwargs)
        if self.training and self.grad_scale != 1.0 and output.requires_grad:
            output = _ScaleGradient.apply(output, self.grad_scale)
        if self.capture is not None:
            self.capture.append(output)
        return output

    def _without_weight_gradients(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Autograd decides what to record when each op runs, so freezing the weights for the call alone is enough:
        # the graph reaches the input, and nothing is saved for weight gradients.
        trainable = [p for p in self.branch_parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        try:
            return self.branch(*args, **kwargs)
        finally:
            for p in trainable:
                p.requires_grad_(True)

    def extra_repr(self) -> str:
        kind = f", kind={self.kind}" if self.kind else ""
        weights = ", weights_only=True" if self.weights_only else ""
        return f"drop_rate={self.drop_rate:.3f}, flops={self.flops:.3g}{kind}{weights}"
