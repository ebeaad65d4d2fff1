"""Drop-rate allocation from per-branch sensitivities under a backward-FLOPs budget (the paper's Prob. 6).

The printed objective min sum (1 - p_i) S_i would be minimised by dropping everything. What is meant is
to spend the budget sum (1 - p_i) F_i <= (1 - p_avg) sum F_i where dropping hurts least. Two allocators:

* `greedy_allocation`: the paper's procedure. All rates start at 0 and grow in steps of 0.1 (capped),
  each step going to the branch with the smallest expected sensitivity S_i * p_i, until the budget holds.
* `flops_aware_allocation`: the convex program

      minimise  sum_i S_i * p_i / (1 - p_i)
      s.t.      sum_i (1 - p_i) F_i <= (1 - p_avg) sum_i F_i,   0 <= p_i <= cap.

  S_i p_i / (1 - p_i) is the variance that dropping adds to branch i's gradient once the surviving
  gradient is rescaled by 1 / (1 - p_i) (what learning-rate compensation does). It is convex in p_i,
  and its KKT conditions give the keep rate k_i = 1 - p_i = sqrt(S_i / (lambda F_i)), clipped to
  [1 - cap, 1], with the multiplier lambda found by bisection so that the budget is met exactly.
  Branches that matter little per FLOP are dropped most.
* `depth_allocation`: ignores the sensitivities and shapes the rates by depth alone (see its docstring).

Every allocator takes an optional `droppable` mask: the branches outside it keep p = 0, and the target stays
the FLOPs-weighted mean over ALL branches, so the droppable ones absorb it (a target above
cap * their FLOPs share raises `UnreachableTarget`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


class UnreachableTarget(ValueError):
    """The target drop rate cannot be met; `reachable` is the largest one that can."""

    def __init__(self, message: str, reachable: float) -> None:
        super().__init__(message)
        self.reachable = reachable


def droppable_mask(droppable: Sequence[bool] | None, branches: int) -> list[bool]:
    if droppable is None:
        return [True] * branches
    if len(droppable) != branches:
        raise ValueError(f"expected {branches} droppable flags, got {len(droppable)}")
    return [bool(d) for d in droppable]


def reachable_drop_rate(flops: Sequence[float], droppable: Sequence[bool] | None = None, cap: float = 1.0) -> float:
    """The largest FLOPs-weighted drop rate: every droppable branch at `cap`, the others at 0."""
    mask = droppable_mask(droppable, len(flops))
    return cap * sum(f for f, d in zip(flops, mask) if d) / sum(flops)


def _check_target(flops: Sequence[float], target: float, cap: float, droppable: Sequence[bool] | None) -> None:
    reachable = reachable_drop_rate(flops, droppable, cap)
    if not 0.0 <= target <= reachable + 1e-12:
        where = "" if droppable is None or all(droppable) else " on the droppable branches only"
        raise UnreachableTarget(f"target drop rate {target} is unreachable: with a cap of {cap} per branch{where} "
                                f"the reachable range is [0, {reachable:.6g}]", reachable)


def _check(sensitivities: Sequence[float], flops: Sequence[float], target: float, cap: float,
           droppable: Sequence[bool] | None = None) -> None:
    if len(sensitivities) != len(flops) or not flops:
        raise ValueError("need one sensitivity and one FLOPs value per branch")
    if any(s < 0 or not math.isfinite(s) for s in sensitivities):
        raise ValueError("sensitivities must be finite and non-negative")
    if any(f <= 0 for f in flops):
        raise ValueError("branch FLOPs must be positive")
    if not 0.0 <= cap <= 1.0:
        raise ValueError(f"cap must lie in [0, 1], got {cap}")
    _check_target(flops, target, cap, droppable)


def dropped_fraction(drop_rates: Sequence[float], flops: Sequence[float]) -> float:
    """The FLOPs-weighted average drop rate."""
    return sum(p * f for p, f in zip(drop_rates, flops)) / sum(flops)


def greedy_allocation(sensitivities: Sequence[float], flops: Sequence[float], target: float,
                      step: float = 0.1, cap: float = 0.9, droppable: Sequence[bool] | None = None) -> list[float]:
    """The paper's greedy: raise rates by `step`, lowest S_i * p_i first, until the budget is met."""
    _check(sensitivities, flops, target, cap, droppable)
    mask = droppable_mask(droppable, len(flops))
    levels = int(round(cap / step))
    counts = [0] * len(flops)  # rates are counts * step, kept as integers to avoid drift
    while dropped_fraction([c * step for c in counts], flops) < target - 1e-12:
        candidates = [i for i, c in enumerate(counts) if c < levels and mask[i]]
        if not candidates:  # only possible when cap is not a multiple of step
            raise ValueError(f"target drop rate {target} is unreachable with steps of {step} up to {cap}")
        best = min(candidates, key=lambda i: (sensitivities[i] * counts[i] * step, sensitivities[i], i))
        counts[best] += 1
    return [round(c * step, 10) for c in counts]


def flops_aware_allocation(sensitivities: Sequence[float], flops: Sequence[float], target: float,
                           cap: float = 0.95, droppable: Sequence[bool] | None = None) -> list[float]:
    """Exact minimiser of sum S_i p_i / (1 - p_i) under the FLOPs budget (see the module docstring)."""
    _check(sensitivities, flops, target, cap, droppable)
    mask = droppable_mask(droppable, len(flops))
    if cap >= 1.0:
        raise ValueError("the convex allocator needs cap < 1 (its objective is infinite at p = 1)")
    budget = (1 - target) * sum(flops)  # kept FLOPs allowed
    min_keep = 1 - cap
    tiny = 1e-12 * max(max(sensitivities), 1e-30)  # zero-sensitivity branches go to the cap

    def keep_rates(lam: float) -> list[float]:
        return [min(1.0, max(min_keep, math.sqrt(max(s, tiny) / (lam * f)))) if d else 1.0
                for s, f, d in zip(sensitivities, flops, mask)]

    def kept(lam: float) -> float:
        return sum(k * f for k, f in zip(keep_rates(lam), flops))

    low, high = 1e-30, 1.0
    while kept(high) > budget:  # kept FLOPs fall as lambda grows; find an upper bracket
        high *= 4.0
        if high > 1e300:
            break
    for _ in range(200):  # bisection on log(lambda)
        mid = math.sqrt(low * high)
        low, high = (mid, high) if kept(mid) > budget else (low, mid)
    return [1 - k for k in keep_rates(high)]


def uniform_allocation(flops: Sequence[float], target: float, droppable: Sequence[bool] | None = None) -> list[float]:
    """One rate for every droppable branch, 0 for the others, with the FLOPs-weighted mean equal to `target`."""
    mask = droppable_mask(droppable, len(flops))
    if all(mask):
        return [float(target)] * len(flops)  # exactly the target, whatever the FLOPs
    _check_target(flops, target, 1.0, mask)
    share = reachable_drop_rate(flops, mask)
    rate = min(1.0, target / share) if share > 0 else 0.0
    return [rate if d else 0.0 for d in mask]


def depth_allocation(sensitivities: Sequence[float], flops: Sequence[float], target: float, cap: float = 1.0,
                     droppable: Sequence[bool] | None = None) -> list[float]:
    """Rates falling linearly from the bottom branch to the top one; the sensitivities are ignored.

    Dropping branch i (0 = nearest the input) biases the gradients of every branch below it, so the damage
    grows with i. Of n branches, branch i gets the weight w_i = (n - i) / n (1 at the bottom, 1/n at the top,
    counted over all branches, droppable or not), and

        p_i = min(cap, c * w_i) on droppable branches, 0 on the others,

    with the single scale c chosen so that the FLOPs-weighted mean over all branches equals `target`. Clipping
    at the cap hands the excess of the bottom branches to the others through a larger c (water-filling):
    sum_i F_i p_i is continuous and increasing in c, and c is solved for exactly, not by search.
    """
    _check(sensitivities, flops, target, cap, droppable)
    mask = droppable_mask(droppable, len(flops))
    n = len(flops)
    order = [i for i in range(n) if mask[i]]  # bottom first: the largest weights, clipped first
    weight = [(n - i) / n for i in range(n)]
    budget = target * sum(flops)  # dropped FLOPs wanted
    scale = 0.0
    for clipped in range(len(order) + 1):  # the first `clipped` droppable branches sit at the cap
        free = order[clipped:]
        if not free:
            return [cap if d else 0.0 for d in mask]  # the target is the reachable maximum
        at_cap = cap * sum(flops[i] for i in order[:clipped])
        scale = (budget - at_cap) / sum(flops[i] * weight[i] for i in free)
        if scale * weight[free[0]] <= cap:
            break
    return [min(cap, scale * weight[i]) if mask[i] else 0.0 for i in range(n)]


def expected_variance(sensitivities: Sequence[float], drop_rates: Sequence[float]) -> float:
    """The convex allocator's objective, sum S_i p_i / (1 - p_i)."""
    return sum(s * p / (1 - p) if p < 1 else (math.inf if s > 0 else 0.0) for s, p in zip(sensitivities, drop_rates))


ALLOCATORS = {"greedy": greedy_allocation, "flops": flops_aware_allocation, "depth": depth_allocation}
