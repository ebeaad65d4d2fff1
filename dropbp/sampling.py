"""Drop decisions: exact per-branch marginals with little spread in the FLOPs dropped per step."""

from __future__ import annotations

import torch

_GOLDEN = 0x9E3779B97F4A7C15  # spreads consecutive (seed, step) pairs over the seed space


def decision_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator determined by (seed, step) alone: identical on every rank and after a resume."""
    return torch.Generator().manual_seed((seed * _GOLDEN + step) % (2**63 - 1))


def systematic_sample(drop_rates: torch.Tensor, generator: torch.Generator,
                      groups: torch.Tensor | None = None) -> torch.Tensor:
    """Draw a boolean drop mask with P(mask[i]) == drop_rates[i] exactly.

    Randomised systematic sampling: lay the rates end to end on a line in a random order and pick every
    branch whose segment contains one of the points u, u+1, u+2, ... for a single uniform u. Each segment
    of length p_i contains a point with probability p_i, and the number of dropped branches is always
    floor or ceil of sum(p_i), so the dropped work varies far less than with independent coin flips.
    The random order keeps the joint pattern from repeating (a fixed order at p = 0.5 would only ever
    drop all even or all odd branches).

    `groups` (an integer label per branch) lays each group's branches next to each other, in a random order
    within the group: then each group also drops floor or ceil of its own sum(p_i). With attention and MLP
    branches as the groups, no draw keeps mostly the larger MLP branches, so a step's memory and time vary
    less (the worst draw sets the longest sequence that fits).
    """
    rates = drop_rates.detach().to(torch.float64).cpu()
    if rates.numel() and (rates.min() < 0 or rates.max() > 1):
        raise ValueError("drop rates must lie in [0, 1]")
    order = torch.randperm(rates.numel(), generator=generator)
    if groups is not None:  # a stable sort keeps the random order inside each group
        order = order[torch.sort(groups.cpu()[order], stable=True).indices]
    offset = torch.rand((), generator=generator, dtype=torch.float64)
    upper = torch.cumsum(rates[order], dim=0) - offset
    lower = upper - rates[order]
    picked = torch.ceil(upper) > torch.ceil(lower)  # an integer lies in [lower, upper)
    mask = torch.zeros_like(picked)
    mask[order] = picked
    return mask


def independent_sample(drop_rates: torch.Tensor, generator: torch.Generator,
                       groups: torch.Tensor | None = None) -> torch.Tensor:
    """Draw a boolean drop mask with one independent coin flip per branch, P(mask[i]) == drop_rates[i].

    `groups` is accepted for the samplers' common signature and ignored: independent flips fix no count.

    The number of dropped branches varies more than with `systematic_sample`, but the masks of different
    branches are independent: E[prod_{i in S} m_i] == prod_{i in S} E[m_i] for every set S of branches, which
    the unbiased gradient estimator needs (see `DropBPHandler`).
    """
    rates = drop_rates.detach().to(torch.float64).cpu()
    if rates.numel() and (rates.min() < 0 or rates.max() > 1):
        raise ValueError("drop rates must lie in [0, 1]")
    return torch.rand(rates.shape, generator=generator, dtype=torch.float64) < rates


SAMPLERS = {"systematic": systematic_sample, "independent": independent_sample}
