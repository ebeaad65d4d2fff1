"""GreenTrainer (Huang et al., ICLR 2024): train only the tensors worth their backpropagation FLOPs.

At the start of every `interval` epochs:
1. **Cost model.** Each trainable tensor i, in backward order (the head first), has an input-gradient cost
   t_dy_i and a weight-gradient cost t_dw_i (`tensor_flops`). Training a set S whose deepest tensor is k
   costs Σ_{i≤k} t_dy_i + Σ_{i∈S} t_dw_i: the gradient has to reach k, and each trained tensor pays its own
   weight gradient. As in the paper's profiler, t_dy_i is the cost of getting the gradient *to* tensor i, so
   the attention core's backward belongs to the qkv tensor, and the head's input gradient is paid by every
   tensor below the head.
2. **Importance** (`tensor_importance`). Take one real optimizer step Δw on one batch, then the gradient g1
   at w + Δw. Tensor i's importance is -Σ(g1_i · Δw_i), the first-order loss drop its update buys; the
   vector is normalised by its largest magnitude. Weights and optimizer state are then restored.
3. **Selection** (`select_tensors`). Maximise the summed importance within the budget: `rho` of a full
   training step's FLOPs, minus the forward pass, as a backward budget (`backward_budget`), with costs
   floored to 1000 levels (`quantize_costs`). Exact dynamic programming: for every possible deepest
   tensor k, a 0/1 knapsack over the tensors above k.
4. **Applying it** through `requires_grad` alone: unselected tensors get no gradient, and autograd stops
   below the deepest selected one.

For LoRA and QLoRA the selectable tensors are the adapters (A and B of one linear together).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lit_gpt.flops import Op, cost_profile, training_flops, units
from lit_gpt.methods.base import RunContext, TrainingMethod
from lit_gpt.utils import UserError

LEVELS = 1000  # the paper's cost resolution (its reference code's Tq)


# ---------------------------------------------------------------------- cost model
def tensor_flops(ops: list[Op]) -> tuple[np.ndarray, np.ndarray]:
    """(t_dy, t_dw) of every unit of a cost profile, in backward order (index 0 nearest the loss).

    t_dy_i: the FLOPs that carry the gradient from the previous tensor down to tensor i (the loss and
    the head's input gradient land on the first tensor below them, the attention core on qkv);
    t_dw_i: the FLOPs of tensor i's own gradient.
    """
    t_dy, t_dw, pending = [], [], 0.0
    for op in ops:
        for unit in op.units:
            t_dy.append(pending + unit.reach)
            t_dw.append(unit.weight_grad)
            pending = 0.0
        pending += op.input_grad
    return np.array(t_dy, dtype=np.float64), np.array(t_dw, dtype=np.float64)


def selection_cost(t_dy: Sequence[float], t_dw: Sequence[float], mask: Sequence[bool]) -> float:
    """Backward FLOPs of training the tensors in `mask`: Σ_{i≤deepest} t_dy_i + Σ_{selected} t_dw_i."""
    chosen = np.flatnonzero(np.asarray(mask, dtype=bool))
    if chosen.size == 0:
        return 0.0
    return float(np.sum(np.asarray(t_dy)[: chosen[-1] + 1]) + np.sum(np.asarray(t_dw)[chosen]))


def quantize_costs(t_dy: np.ndarray, t_dw: np.ndarray, levels: int = LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """Integer costs on a scale where the full backward pass is `levels`, floored as in the paper."""
    scale = levels / float(np.sum(t_dy) + np.sum(t_dw))
    return np.floor(t_dy * scale).astype(np.int64), np.floor(t_dw * scale).astype(np.int64)


def backward_budget(rho: float, forward_flops: float, backward_flops: float) -> float:
    """The fraction of the full backward pass that fits in `rho` of a full training step.

    Forward + selected backward ≤ rho · (forward + full backward), and the forward pass is always paid.
    """
    rho_bp = (rho * (forward_flops + backward_flops) - forward_flops) / backward_flops
    if rho_bp <= 0:
        floor = forward_flops / (forward_flops + backward_flops)
        raise ValueError(f"rho {rho} cannot be met: the forward pass alone is {floor:.3f} of a training step's "
                         f"FLOPs; choose rho above {floor:.3f}")
    return min(1.0, rho_bp)


# ---------------------------------------------------------------------- selection
def select_tensors(t_dy: Sequence[int], t_dw: Sequence[int], importance: Sequence[float], budget: int
                   ) -> tuple[float, np.ndarray]:
    """The subset of tensors with the largest summed importance whose backward cost fits in `budget`.

    Tensors are in backward order; costs are non-negative integers. Returns (objective, boolean mask).

    For each candidate deepest tensor k, the reach Σ_{i≤k} t_dy_i and t_dw_k are fixed, and the rest is a
    0/1 knapsack over the tensors above k, whose table grows by one tensor per k. That is exact, in
    O(n · budget). The paper's reference DP is not: it only explores a limited depth (its `N_limit` stops one
    tensor short when the whole chain fits) and chains only through states where selecting was locally
    best, which loses the optimum in a few percent of small cases.
    """
    t_dy, t_dw = np.asarray(t_dy, dtype=np.int64), np.asarray(t_dw, dtype=np.int64)
    importance = np.asarray(importance, dtype=np.float64)
    n, budget = len(t_dy), int(budget)
    if budget < 0 or (t_dy < 0).any() or (t_dw < 0).any():
        raise ValueError("costs and the budget must be non-negative")
    knapsack = np.zeros(budget + 1)  # best importance of tensors above k within capacity c ("at most c")
    took = np.zeros((n, budget + 1), dtype=bool)
    best, deepest, capacity_left, reach = 0.0, -1, 0, 0
    for k in range(n):
        reach += t_dy[k]
        capacity = budget - reach - t_dw[k]
        if capacity >= 0 and importance[k] + knapsack[capacity] > best:
            best, deepest, capacity_left = importance[k] + knapsack[capacity], k, capacity
        w = t_dw[k]
        if importance[k] > 0 and w <= budget:  # tensor k becomes available to deeper choices
            with_k = knapsack[: budget + 1 - w] + importance[k]
            took[k, w:] = with_k > knapsack[w:]
            knapsack[w:] = np.maximum(knapsack[w:], with_k)
    mask = np.zeros(n, dtype=bool)
    if deepest >= 0:
        mask[deepest] = True
        c = capacity_left
        for j in range(deepest - 1, -1, -1):
            if took[j, c]:
                mask[j] = True
                c -= t_dw[j]
    return best, mask


# ---------------------------------------------------------------------- importance
def tensor_importance(groups: Sequence[Sequence[nn.Parameter]], backward: Callable[[], Any],
                      optimizer: torch.optim.Optimizer, offload: bool = True) -> torch.Tensor:
    """-Σ(g1 · Δw) per group of parameters (unnormalised), from one real optimizer step; nothing is left changed.

    `backward()` runs forward and backward on the batch, accumulating into `.grad`. The optimizer takes one
    step from w, giving Δw; `backward()` runs again at w + Δw, giving g1. Weights, optimizer state, gradients
    and `requires_grad` are restored afterwards. `offload` keeps the weight copies in CPU memory, as the paper's
    code does.
    """
    params = [p for group in groups for p in group]
    flags, grads = [p.requires_grad for p in params], [p.grad for p in params]
    weights = [p.detach().to("cpu" if offload else p.device, copy=True) for p in params]
    state = {p: {k: v.to("cpu" if offload else v.device, copy=True) if torch.is_tensor(v) else v
                 for k, v in optimizer.state[p].items()} for p in params if p in optimizer.state}
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        backward()
        optimizer.step()
        for p in params:
            p.grad = None
        backward()
        importance, i = [], 0
        with torch.no_grad():
            for group in groups:
                total = torch.zeros((), dtype=torch.float64)
                for p in group:
                    if p.grad is not None:
                        delta = p.detach().double() - weights[i].to(p.device).double()
                        total -= (p.grad.double() * delta).sum().cpu()
                    i += 1
                importance.append(total)
    finally:
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        for p in params:
            if p not in state:
                optimizer.state.pop(p, None)
                continue
            current = optimizer.state[p]
            for k, v in state[p].items():  # in place where possible, so device and paging stay as they were
                if torch.is_tensor(v) and torch.is_tensor(current.get(k)) and current[k].shape == v.shape:
                    current[k].copy_(v)
                else:
                    current[k] = v
            for k in set(current) - set(state[p]):
                del current[k]
        for p, flag, g in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = g
    return torch.stack(importance)


def normalise(importance: torch.Tensor) -> torch.Tensor:
    """Divide by the largest magnitude, as the paper does (all zeros stay zeros)."""
    top = importance.abs().max() if importance.numel() else torch.zeros(())
    return importance / top if top > 0 else importance.clone()


# ---------------------------------------------------------------------- the method
class GreenTrainer(TrainingMethod):
    """Re-selects the trainable tensors every `interval` epochs and applies the choice through `requires_grad`.

    Args:
        model: a `lit_gpt.GPT`; every tensor that requires a gradient now is a candidate (the adapters, for LoRA).
        rho: FLOPs budget as a fraction of a full training step (forward + full backward).
        interval: epochs between selections.
        seq_len: sequence length the costs are computed for (the attention core grows with its square).
    """

    def __init__(self, model: nn.Module, rho: float = 0.5, interval: int = 1, seq_len: int = 512,
                 levels: int = LEVELS) -> None:
        super().__init__("greentrainer")
        if interval < 1:
            raise ValueError(f"the selection interval must be at least 1 epoch, got {interval}")
        self.model, self.rho, self.interval = model, rho, interval
        self.ops = cost_profile(model, seq_len)
        self.units = units(self.ops)
        if not self.units:
            raise ValueError("the model has no trainable tensor to select from")
        self.t_dy, self.t_dw = tensor_flops(self.ops)
        self.forward_flops, self.full_backward_flops = training_flops(self.ops)
        self.rho_bp = backward_budget(rho, self.forward_flops, self.full_backward_flops)
        self.dy_levels, self.dw_levels = quantize_costs(self.t_dy, self.t_dw, levels)
        self.budget = int(self.rho_bp * (self.dy_levels.sum() + self.dw_levels.sum()))
        self.selected = np.ones(len(self.units), dtype=bool)
        self.importance: list[float] | None = None
        self.selected_epoch: int | None = None
        self.objective = 0.0

    # -------------------------------------------------------------- selection
    def choose(self, importance: Sequence[float]) -> np.ndarray:
        self.objective, mask = select_tensors(self.dy_levels, self.dw_levels, importance, self.budget)
        return mask

    def apply(self, mask: Sequence[bool]) -> None:
        self.selected = np.asarray(mask, dtype=bool)
        for unit, on in zip(self.units, self.selected):
            for p in unit.params:
                p.requires_grad_(bool(on))

    @property
    def backward_fraction(self) -> float:
        """Backward FLOPs of the current selection, as a fraction of the full backward pass (unquantised)."""
        return selection_cost(self.t_dy, self.t_dw, self.selected) / self.full_backward_flops

    def before_step(self, run: RunContext) -> None:
        epoch = run.step * run.accumulation // run.micro_batches_per_epoch
        due = epoch // self.interval * self.interval
        if self.selected_epoch != due:
            self.select(run)
            self.selected_epoch = due

    def select(self, run: RunContext) -> None:
        """Importance from one real step on this optimizer step's batch, then the DP; applied at once."""
        start = time.perf_counter()
        self.set_learning_rate(run.optimizer, run.learning_rate(run.step))
        raw = tensor_importance([u.params for u in self.units], run.run_micro_batches, run.optimizer)
        self.importance = normalise(raw).tolist()
        self.apply(self.choose(self.importance))
        run.print(
            f"step {run.step}: GreenTrainer trains {int(self.selected.sum())} of {len(self.units)} tensors, "
            f"{self.backward_fraction:.3f} of the backward FLOPs (budget {self.rho_bp:.3f}), "
            f"importance kept {self.objective:.3f} ({time.perf_counter() - start:.1f} s)"
            + ("" if self.selected.any()
               else f"; nothing fits --gt_rho {self.rho} or helps: this epoch trains nothing"))

    # -------------------------------------------------------------- loop hooks and state
    def metrics(self) -> dict[str, float]:
        return {"gt_selected_tensors": float(self.selected.sum()), "gt_backward_fraction": self.backward_fraction}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "units": [u.name for u in self.units], "selected": self.selected.tolist(),
                "importance": self.importance, "selected_epoch": self.selected_epoch, "objective": self.objective}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state["units"] != [u.name for u in self.units]:
            raise UserError("the checkpoint's GreenTrainer tensors differ from this model's: resume with the same "
                            "--lora.* flags")
        self.importance, self.objective = state["importance"], state["objective"]
        self.selected_epoch = state["selected_epoch"]
        self.apply(state["selected"])
