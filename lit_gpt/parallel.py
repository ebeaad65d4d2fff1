"""Data-parallel plumbing over Lightning Fabric: strategy, sharding, gradient averaging, whole-tensor state.

DDP keeps the whole model on every device; FSDP (`--strategy fsdp`) is PyTorch's FSDP2 (`fully_shard`) through
Fabric's `ModelParallelStrategy`, which, unlike Fabric's `FSDPStrategy`, also runs on CPU (gloo). Every rank is
one data-parallel shard. Checkpoints always hold whole tensors, in the format one process writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn as nn


def build_fabric(accelerator: str, devices: int, num_nodes: int, strategy: str, precision: str, loggers: list,
                 seed: int):
    """A launched Fabric: FSDP for `strategy="fsdp"`, DDP for "ddp" or several devices, else one device."""
    import lightning as L
    from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy

    world_size = devices * num_nodes
    if strategy == "fsdp":
        chosen: Any = ModelParallelStrategy(shard_model, data_parallel_size=world_size, tensor_parallel_size=1)
    elif strategy == "ddp" or world_size > 1:
        chosen = DDPStrategy()
    else:
        chosen = "auto"
    fabric = L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=chosen,
                      precision=precision, loggers=loggers)
    fabric.launch()
    fabric.seed_everything(seed)  # LoRA's initialisation; DropBP and PLD keep their own generators
    return fabric


def fabric_module(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric's wrapper."""
    return getattr(model, "module", model)


def is_sharded(fabric) -> bool:
    """True under FSDP: each rank holds a shard of every weight, gathered block by block as it runs."""
    from lightning.fabric.strategies import ModelParallelStrategy

    return isinstance(fabric.strategy, ModelParallelStrategy)


def averages_gradients_itself(fabric) -> bool:
    """Under DDP, gradients are averaged once per optimizer step by `average_gradients`, not by DDP's hooks.

    DDP's hooks sync during the backward of the last micro-batch, so a step whose last micro-batch skips
    `backward()` (every trainable branch dropped) would never sync. The drop decisions are identical on
    every rank, so every rank holds gradients for the same tensors and one explicit all-reduce is safe.

    FSDP needs neither: every micro-batch that runs `backward()` reduce-scatters (averages) its gradients
    into the shards, where they accumulate, so a step ends averaged whichever micro-batches skipped it.
    """
    from lightning.fabric.strategies import DDPStrategy

    return isinstance(fabric.strategy, DDPStrategy) and fabric.world_size > 1


def no_backward_sync(fabric, model: nn.Module, is_accumulating: bool):
    """The context one micro-batch's backward runs in: DDP's hooks only ever sync when we don't average ourselves."""
    if is_sharded(fabric):  # FSDP syncs in every backward, by design (see `averages_gradients_itself`)
        from contextlib import nullcontext

        return nullcontext()
    return fabric.no_backward_sync(model, enabled=is_accumulating or averages_gradients_itself(fabric))


def average_gradients(fabric, model: nn.Module, bucket_elements: int = 2**25) -> None:
    """All-reduce (mean) every gradient in place, in flat buckets of about `bucket_elements`."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bucket: list[torch.Tensor] = []
    for i, grad in enumerate(grads):
        bucket.append(grad)
        if sum(g.numel() for g in bucket) >= bucket_elements or i == len(grads) - 1:
            flat = fabric.all_reduce(torch.cat([g.reshape(-1) for g in bucket]), reduce_op="mean")
            for g, averaged in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(averaged.view_as(g))
            bucket = []


def shard_model(model: nn.Module, device_mesh) -> nn.Module:
    """FSDP2 (`fully_shard`): each transformer block is one unit, the root (embeddings, final norm, head) another.

    A unit's weights are gathered for its forward and again for its backward, and its gradients reduce-scattered
    (averaged) after its backward. Frozen and trainable weights may share a unit: only those with a gradient are
    reduce-scattered, and the optimizer only ever sees the trainable ones, so the frozen base of a LoRA model is
    sharded (a 1/W share per rank) but has no optimizer state. A branch that DropBP drops runs under `no_grad`
    (or, in the weights drop mode, with its weights frozen for that forward), so its weights get no gradient and are
    left out of the reduce-scatter on every rank alike.
    """
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def checkpoint_activations(model: nn.Module) -> nn.Module:
    """Keep only each block's input in forward and recompute the block in backward (`--activation_checkpointing`).

    The block's own `forward` is wrapped, so parameter names, FSDP units and hooks stay as they are. A dropped
    branch is dropped in the recomputation too (its flag is not redrawn until the next micro-batch).
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.transformer.h:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    return model


# ---------------------------------------------------------------------- whole tensors in and out of shards
def _full(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _whole(value: Any) -> Any:
    """A CPU copy of the whole tensor (gathered from its shards), or `value` itself when it is no tensor."""
    value = _full(value)
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


def gathered_state_dict(fabric, model: nn.Module, adapters_only: bool, everywhere: bool = False) -> dict | None:
    """Under FSDP, the whole weights gathered from the shards, on the CPU of rank 0; None otherwise.

    Every rank must call it under FSDP (each tensor is one all-gather); the other ranks get `{}`, or the same
    dict with `everywhere`. `adapters_only` gathers only the LoRA adapters, as LoRA checkpoints hold, so the
    frozen base is never gathered to be thrown away.
    """
    if not is_sharded(fabric):
        return None
    keep = everywhere or fabric.global_rank == 0
    gathered = {}
    for name, tensor in fabric_module(model).state_dict().items():
        if adapters_only and "lora_" not in name:
            continue
        tensor = _full(tensor)  # an all-gather every rank takes part in
        if keep:
            gathered[name] = tensor.detach().to("cpu", copy=True)
    return gathered


def gathered_optimizer_state(fabric, optimizer) -> dict | None:
    """Under FSDP, the optimizer's state dict with whole tensors, in the format one process writes; else None.

    Keyed by parameter index like `Optimizer.state_dict()`, so a checkpoint reads the same whether FSDP, DDP
    or one process wrote it. Every rank must call it under FSDP; ranks other than 0 get `{}`.
    """
    if not is_sharded(fabric):
        return None
    state = optimizer.optimizer.state_dict()
    # The same parameters have state on every rank (they got gradients at the same steps), in the same order.
    gathered = {index: {key: _whole(value) for key, value in values.items()}
                for index, values in state["state"].items()}
    if fabric.global_rank != 0:
        return {}
    return {"state": gathered, "param_groups": state["param_groups"]}


def _shard_like(value: Any, target: Any) -> Any:
    """`value` (a whole tensor every rank read) cut to this rank's shard of `target`, if `target` is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor) and isinstance(value, torch.Tensor) and value.shape == target.shape:
        # every rank holds the whole tensor, so each slices out its shard: no communication
        return distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements,
                                 src_data_rank=None)
    return value


def load_optimizer_state(fabric, optimizer, state: dict) -> None:
    """Load a whole-tensor optimizer state dict; under FSDP each rank keeps its own shard.

    `Optimizer.load_state_dict` does the rest, as on one process, so a parameter without state in the
    checkpoint (no gradient yet: its branches were always dropped) still has none. The resume stays exact;
    `torch.distributed.checkpoint`'s `set_optimizer_state_dict` would first give every parameter a state by
    taking a zero step, and AdamW's step count would then differ.
    """
    if not is_sharded(fabric):
        optimizer.load_state_dict(state)
        return
    inner = optimizer.optimizer
    params = [p for group in inner.param_groups for p in group["params"]]
    sharded = {index: {key: _shard_like(value, params[index]) for key, value in values.items()}
               for index, values in state["state"].items()}
    inner.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})


def load_weights(fabric, model: nn.Module, weights: dict[str, torch.Tensor]):
    """`load_state_dict(strict=False)` of whole tensors, slicing out this rank's shards under FSDP."""
    module = fabric_module(model)
    if is_sharded(fabric):
        current = module.state_dict()
        weights = {name: _shard_like(value, current.get(name)) for name, value in weights.items()}
    return module.load_state_dict(weights, strict=False)


# ---------------------------------------------------------------------- whole-model measurements
@contextmanager
def unsharded(fabric, model: nn.Module) -> Iterator[None]:
    """Under FSDP, hold every weight whole on every rank for the duration (no-op otherwise).

    A measurement that differentiates the loss with `torch.autograd.grad` many times over one retained graph needs
    the gathered weights to stay gathered and the gradients not to be reduce-scattered: every FSDP unit is
    unsharded, with resharding and gradient sync off, and put back afterwards. `parameters()` then yields the
    whole weights, and the measurement sees full tensors, never shards.
    """
    if not is_sharded(fabric):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    root = fabric_module(model)
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.set_reshard_after_backward(False, recurse=False)
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        for unit in units:
            unit.unshard()
        yield
    finally:
        for unit in units:
            if unit is not root:  # FSDP keeps the root gathered from forward to backward by design
                unit.set_reshard_after_forward(True, recurse=False)
            unit.set_reshard_after_backward(True, recurse=False)
            unit.set_requires_gradient_sync(True, recurse=False)
            unit.reshard()


@contextmanager
def gradients_averaged_over_ranks(fabric, model: nn.Module) -> Iterator[None]:
    """Average over the ranks every gradient that autograd computes for a trainable parameter, meanwhile.

    Tensor hooks fire inside `torch.autograd.grad` too, in the same order on every rank (the graphs are
    identical: same model, same drop decisions), so each all-reduce meets its partners.
    """
    world_size = fabric.world_size
    if world_size == 1:
        yield
        return

    def average(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad.div_(world_size)

    hooks = [p.register_hook(average) for p in fabric_module(model).parameters() if p.requires_grad]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def whole_model(fabric, model: nn.Module) -> Iterator[nn.Module]:
    """The unwrapped model with whole weights and rank-averaged gradients: what one process would measure."""
    with unsharded(fabric, model), gradients_averaged_over_ranks(fabric, model):
        yield fabric_module(model)
