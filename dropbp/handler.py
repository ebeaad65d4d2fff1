"""DropBPHandler: drop rates, per-micro-batch decisions, calibration, LR compensation and state."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from dropbp.allocation import ALLOCATORS, droppable_mask, dropped_fraction, uniform_allocation
from dropbp.layer import DropBP
from dropbp.sampling import SAMPLERS, decision_generator
from dropbp.sensitivity import Metric, SensitivityResult, measure_sensitivity

DROP_MODES = ("branch", "weights")  # what a dropped branch skips: its whole backward, or its weight gradients only


class DropBPHandler:
    """Finds the DropBP layers of `model` and decides, before every training-mode forward, which to drop.

    Decisions come from a generator seeded with (seed, step), where `step` counts training forwards
    (micro-batches). They are therefore identical on every data-parallel rank, reproducible after a
    resume (the step is in `state_dict`), and never touch the global RNG.

    Args:
        model: any module containing DropBP layers.
        seed: seed of the decision generator; use the same value on every rank.
        lr_compensation: scale each branch's learning rate by 1 / (1 - p_i) in `set_lr`.
        unbiased: scale the backward of every kept branch by 1 / (1 - p_i), so that the expected gradient is
            the full-backprop one (below). Not with `lr_compensation`, which compensates the same drops again.
        drop_mode: "branch" (the paper): a dropped branch skips its whole backward; "weights": it still passes the
            gradient to its input and skips only its own weight gradients, so every layer below gets the exact
            gradient and the saving is the branch's weight gradients. Not with `unbiased`.
        sampling: "systematic" (`dropbp.sampling.systematic_sample`, within each `kind` of branch) or
            "independent" coin flips per branch; default: independent when `unbiased`, systematic otherwise.

    Unbiasedness. Dropping changes no forward value, so every Jacobian is the same as in full backprop. With
    m_i the keep indicator of branch i and s_i = m_i / (1 - p_i) its backward scale, every parameter gradient
    is a sum over backward paths, each a mask-free product of Jacobians times prod_{j in S} s_j, where S is the
    set of branch outputs the path passes through (each at most once). So the estimator is unbiased for every
    parameter exactly when E[prod_{j in S} s_j] = 1 for every set S, which independent draws with
    P(m_i) = 1 - p_i < 1 give. Systematic sampling has the right marginals, so E[s_j] = 1 and the paths
    through one branch (a branch's own weights straight through the residual stream) are unbiased, but it
    correlates the masks to fix their count: two branches at p = 0.5 are never kept together, so every path
    through both has expectation 0 instead of its full-backprop value. Hence the independent default. Branches
    at p_i = 1 never get a gradient; the scale makes the variance grow as p_i approaches 1.
    """

    def __init__(self, model: nn.Module, seed: int = 0, lr_compensation: bool = False, unbiased: bool = False,
                 *, drop_mode: str = "branch", sampling: str | None = None) -> None:
        if unbiased and lr_compensation:
            raise ValueError("unbiased and lr_compensation both compensate for the dropped gradient: choose one")
        if sampling is not None and sampling not in SAMPLERS:
            raise ValueError(f"unknown sampling {sampling!r}: choose {' or '.join(SAMPLERS)}")
        self.layers: list[DropBP] = [m for m in model.modules() if isinstance(m, DropBP)]
        if not self.layers:
            raise ValueError("the model has no DropBP layers: wrap its residual branches with dropbp.DropBP")
        # An integer per branch, one per distinct `kind` label: systematic sampling fixes each kind's count.
        kinds: dict[str | None, int] = {}
        self._kind_groups = torch.tensor([kinds.setdefault(layer.kind, len(kinds)) for layer in self.layers])
        self.model = model
        self.seed = seed
        self.step = 0
        self.lr_compensation = lr_compensation
        self.unbiased = unbiased
        self.set_drop_mode(drop_mode)
        self._sampling = sampling
        self.droppable: list[bool] | None = None  # None: every branch may drop
        self.rate_scale = 1.0  # a factor on every drop rate, for schedules over training; 1: the rates as allocated
        self.sensitivities: list[float] | None = None
        self.last_calibration: SensitivityResult | None = None
        self._dropped_flops_sum = 0.0  # for the mean realised drop rate
        self._calibrating = False
        self._hook = model.register_forward_pre_hook(self._before_forward)

    # ------------------------------------------------------------------ rates
    @property
    def drop_rates(self) -> list[float]:
        return [layer.drop_rate for layer in self.layers]

    @property
    def scheduled_drop_rates(self) -> list[float]:
        """The rates the draws use: each allocated rate times `rate_scale`."""
        return [layer.drop_rate * self.rate_scale for layer in self.layers]

    def set_rate_scale(self, scale: float) -> None:
        """Scale every drop rate by `scale` in [0, 1] from the next draw on (the allocation itself is kept)."""
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"the rate scale must lie in [0, 1], got {scale}")
        self.rate_scale = float(scale)

    @property
    def branch_flops(self) -> list[float]:
        return [layer.flops for layer in self.layers]

    def set_initial_drop_rate(self, drop_rate: float, droppable: Sequence[bool] | None = None) -> None:
        """The same rate for every branch; 1.0 always drops (for ablations).

        With a `droppable` mask (one flag per branch, in `layers` order), only those branches drop, at the one
        rate that makes the FLOPs-weighted mean over all branches `drop_rate` (`UnreachableTarget`, a
        ValueError, when it would exceed 1). Later calibrations keep the restriction.
        """
        mask = None if droppable is None else droppable_mask(droppable, len(self.layers))
        self.set_drop_rates(uniform_allocation(self.branch_flops, drop_rate, mask))
        self.droppable = mask

    def allocate(self, target_drop_rate: float, allocator: str = "greedy",
                 sensitivities: Sequence[float] | None = None, **allocator_kwargs: Any) -> list[float]:
        """Set the drop rates from an allocator of `dropbp.allocation.ALLOCATORS`, within `droppable`.

        `sensitivities` default to the last calibration's, else to ones (for allocators that ignore them).
        """
        if allocator not in ALLOCATORS:
            raise ValueError(f"unknown allocator {allocator!r}: choose {' or '.join(ALLOCATORS)}")
        if sensitivities is None:
            sensitivities = self.sensitivities or [1.0] * len(self.layers)
        if self.droppable is not None:
            allocator_kwargs.setdefault("droppable", self.droppable)
        rates = ALLOCATORS[allocator](list(sensitivities), self.branch_flops, target_drop_rate, **allocator_kwargs)
        self.set_drop_rates(rates)
        return rates

    def set_drop_rates(self, drop_rates: Sequence[float]) -> None:
        if len(drop_rates) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} drop rates, got {len(drop_rates)}")
        for p in drop_rates:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"drop rates must lie in [0, 1], got {p}")
        for layer, p in zip(self.layers, drop_rates):
            layer.drop_rate = float(p)

    def set_branch_flops(self, flops: Sequence[float]) -> None:
        """Per-branch backward FLOPs for allocation, e.g. from a cost model at the real sequence length."""
        if len(flops) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} FLOPs values, got {len(flops)}")
        for layer, f in zip(self.layers, flops):
            layer.flops = float(f)

    def set_drop_mode(self, drop_mode: str) -> None:
        """What a dropped branch skips from the next forward on: "branch" (its backward) or "weights" (see above)."""
        if drop_mode not in DROP_MODES:
            raise ValueError(f"unknown drop_mode {drop_mode!r}: choose {' or '.join(DROP_MODES)}")
        if self.unbiased and drop_mode == "weights":
            raise ValueError("unbiased scales a kept branch's whole backward, which would bias the layers below in "
                             "the weights drop mode: choose one")
        self.drop_mode = drop_mode
        for layer in self.layers:
            layer.weights_only = drop_mode == "weights"

    # ------------------------------------------------------------------ decisions
    @property
    def sampling(self) -> str:
        """How `draw` samples the masks: the `sampling` argument, else independent exactly when unbiased."""
        return self._sampling or ("independent" if self.unbiased else "systematic")

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if module.training and not self._calibrating:
            self.draw()

    def draw(self, step: int | None = None) -> torch.Tensor:
        """Decide which branches the next micro-batch drops. Called automatically before training forwards.

        `step` replays the decision of that micro-batch (benchmarks repeat one draw); the next draw follows it.
        """
        if step is not None:
            self.step = step
        sample = SAMPLERS[self.sampling]
        rates = self.scheduled_drop_rates
        mask = sample(torch.tensor(rates), decision_generator(self.seed, self.step), self._kind_groups)
        for layer, rate, dropped in zip(self.layers, rates, mask.tolist()):
            layer.dropped = dropped
            layer.grad_scale = self._grad_scale(rate, dropped)
        self.step += 1
        self._dropped_flops_sum += self.realised_drop_rate
        return mask

    def _grad_scale(self, drop_rate: float, dropped: bool) -> float:
        if not self.unbiased or dropped or drop_rate >= 1.0:
            return 1.0
        return 1.0 / (1.0 - drop_rate)

    @property
    def dropped(self) -> list[bool]:
        return [layer.dropped for layer in self.layers]

    @property
    def realised_drop_rate(self) -> float:
        """Share of the branches' backward FLOPs that the current micro-batch drops."""
        return dropped_fraction([float(d) for d in self.dropped], self.branch_flops)

    @property
    def mean_realised_drop_rate(self) -> float:
        return self._dropped_flops_sum / self.step if self.step else 0.0

    def detect_non_grad(self) -> bool:
        """True when no trainable parameter can receive a gradient this micro-batch: skip `backward()`.

        Parameters outside every branch (head, final norm, embeddings) always learn through the residual
        path, so this only happens when they are frozen and every branch holding trainable weights is dropped.
        """
        # Looked up now, not at construction: adapters (LoRA) may have been added after the handler.
        branch_ids = {id(p) for layer in self.layers for p in layer.branch_parameters()}
        if any(p.requires_grad for p in self.model.parameters() if id(p) not in branch_ids):
            return False
        for layer in self.layers:
            active = not (layer.training and layer.dropped)
            if active and any(p.requires_grad for p in layer.branch_parameters()):
                return False
        return True

    # ------------------------------------------------------------------ calibration
    def sensitivity_based_drop_bp(
        self, loss_fn: Callable[[], torch.Tensor], target_drop_rate: float, metric: Metric = "grad",
        allocator: str = "greedy", reduce: Callable[[list[float]], list[float]] | None = None,
        **allocator_kwargs: Any,
    ) -> SensitivityResult:
        """Measure each branch's sensitivity on one batch and reallocate the drop rates (Prob. 6).

        `loss_fn` runs the forward pass on the calibration batch and returns the loss, without calling
        `backward()` (the paper's snippet passes a full backprop closure; this one measures all branches
        from a single forward pass). Training state is left exactly as it was.

        Under data parallelism each rank measures its own share of the calibration batch; `reduce` (e.g. an
        all-reduce mean) combines the sensitivities so that every rank allocates the same rates.
        Branches outside `droppable` (see `set_initial_drop_rate`) keep p = 0.
        """
        if allocator not in ALLOCATORS:
            raise ValueError(f"unknown allocator {allocator!r}: choose {' or '.join(ALLOCATORS)}")
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._calibrating = True
        try:
            result = measure_sensitivity(self.layers, loss_fn, params, metric,
                                         weights_only=self.drop_mode == "weights")
        finally:
            self._calibrating = False
        if reduce is not None:
            result.sensitivities = [float(s) for s in reduce(result.sensitivities)]
        self.allocate(target_drop_rate, allocator, result.sensitivities, **allocator_kwargs)
        self.sensitivities = result.sensitivities
        self.last_calibration = result
        return result

    # ------------------------------------------------------------------ learning-rate compensation
    def split_param_groups(self, groups: Sequence[dict]) -> list[dict]:
        """Split optimizer param groups by branch, keeping each group's options, so rates can differ per branch.

        Each returned group carries `dropbp_branch`: the branch index, or -1 for parameters outside branches.
        """
        branch_of = {id(p): i for i, layer in enumerate(self.layers) for p in layer.branch_parameters()}
        split: list[dict] = []
        for group in groups:
            by_branch: dict[int, list] = {}
            for p in group["params"]:
                by_branch.setdefault(branch_of.get(id(p), -1), []).append(p)
            split += [{**group, "params": ps, "dropbp_branch": i} for i, ps in sorted(by_branch.items())]
        return split

    def lr_multiplier(self, branch: int) -> float:
        if not self.lr_compensation or branch < 0:
            return 1.0
        p = self.layers[branch].drop_rate * self.rate_scale
        return 1.0 / (1.0 - p) if p < 1.0 else 1.0  # a branch that never trains needs no compensation

    def set_lr(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        """Set the scheduled learning rate, times 1 / (1 - p_i) for branch groups when compensation is on."""
        for group in optimizer.param_groups:
            group["lr"] = lr * self.lr_multiplier(group.get("dropbp_branch", -1))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "step": self.step,
            "drop_rates": self.drop_rates,
            "branch_flops": self.branch_flops,
            "sensitivities": self.sensitivities,
            "lr_compensation": self.lr_compensation,
            "unbiased": self.unbiased,
            "drop_mode": self.drop_mode,
            "droppable": self.droppable,
            "rate_scale": self.rate_scale,
            "sampling": self._sampling,
            "dropped_flops_sum": self._dropped_flops_sum,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.step = state["seed"], state["step"]
        self.set_drop_rates(state["drop_rates"])
        self.set_branch_flops(state["branch_flops"])
        self.sensitivities = state["sensitivities"]
        self.lr_compensation = state["lr_compensation"]
        self.unbiased = state.get("unbiased", False)  # absent in checkpoints written before the option existed
        self._sampling = state.get("sampling")
        self.set_drop_mode(state.get("drop_mode", "branch"))
        self.droppable = state.get("droppable")
        self.rate_scale = state.get("rate_scale", 1.0)
        self._dropped_flops_sum = state["dropped_flops_sum"]

    def remove(self) -> None:
        """Detach the forward hook; the model then never drops again."""
        self._hook.remove()
        self.set_drop_mode("branch")
        for layer in self.layers:
            layer.dropped, layer.grad_scale = False, 1.0
