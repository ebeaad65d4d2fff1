"""The one cost model: training FLOPs of a `lit_gpt.GPT`, op by op.

It prices every step the loop runs, whatever the method; DropBP allocates its drop rates with the per-branch FLOPs
it gives (`CostModel.branch_backward_flops`), and GreenTrainer selects tensors with its per-tensor costs.

`cost_profile(model, seq_len)` lists the model's ops in backward order (loss first, embedding last). Each op
has its forward FLOPs, the FLOPs that pass the gradient from its output to its input (`input_grad`), and its
trainable tensors ("units": a weight, a bias, or a LoRA adapter's A and B together) with the FLOPs of their
own gradient. `training_flops` then prices one sequence's forward and backward for any choice of trainable
units, dropped branches (DropBP) and skipped blocks (PLD):

    backward = sum of input_grad over the ops above the deepest trained unit + sum of trained units' weight_grad

which is exactly what autograd computes: an op's input gradient is only needed when something below it
trains. Counts are 2 FLOPs per multiply-add; the attention core is causal (half of QK^T and AV, and twice that
in backward for the gradients of q, k and v); the loss is 4 FLOPs per logit (max, exp, sum and log-softmax,
roughly); norms count one FLOP per element for each pass, as GreenTrainer's profiler does.
`torch.utils.flop_counter.FlopCounterMode` counts matrix products only, and on CPU it does not see the
attention core at all (the CPU flash kernel has no formula), so measured/theory sits slightly below 1.
`flop_counter()` teaches it bitsandbytes' 4-bit matmul, QLoRA's forward.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from lit_gpt.lora import LoRALinear


@dataclass
class Unit:
    """One trainable tensor (or a LoRA adapter's pair) and the FLOPs of its own gradient."""

    name: str
    params: tuple[nn.Parameter, ...]
    weight_grad: float
    reach: float = 0.0  # gradient FLOPs between the op's output and this unit (a LoRA adapter's B, on the way to A)


@dataclass
class Op:
    name: str
    forward: float
    input_grad: float
    units: list[Unit] = field(default_factory=list)
    block: int | None = None  # transformer block index, None outside the blocks
    branch: str | None = None  # "attn" or "mlp" inside a block


def cost_profile(model: nn.Module, seq_len: int, trainable: set[int] | None = None) -> list[Op]:
    """The ops of a `lit_gpt.GPT` in backward order, priced for one sequence of `seq_len` tokens.

    `trainable`: ids of the parameters that may train, which become units; default `trainable_parameters`.
    """
    trainable = trainable_parameters(model) if trainable is None else trainable
    unit = _Units(model, trainable)
    c, T = model.config, seq_len
    V, D = c.padded_vocab_size, c.n_embd
    ops = [Op("loss", forward=4 * T * V, input_grad=4 * T * V)]
    if model.lm_head is None:  # tied: the head multiplies by the embedding table, whose unit sits at the bottom
        ops.append(Op("head (tied)", forward=2 * T * D * V, input_grad=2 * T * D * V))
    else:
        ops.append(_linear("lm_head", model.lm_head, T, unit))
    ops.append(_norm("transformer.ln_f", model.transformer.ln_f, T, unit))
    for i in reversed(range(len(model.transformer.h))):
        block, prefix = model.transformer.h[i], f"transformer.h.{i}."
        mlp = block.mlp
        inputs = [(n, getattr(mlp, n)) for n in ("fc_2", "fc_1", "fc") if hasattr(mlp, n)]
        parts = [_linear(prefix + "mlp." + n, m, T, unit) for n, m in inputs]
        core = 2 * T * T * c.n_head * c.head_size  # causal: half of QK^T and AV
        branches = {
            "mlp": [_linear(prefix + "mlp.proj", mlp.proj, T, unit),
                    # the up and gate projections read the same input: one op, its units side by side
                    Op(prefix + "mlp." + "+".join(n for n, _ in inputs), forward=sum(p.forward for p in parts),
                       input_grad=sum(p.input_grad for p in parts), units=[u for p in parts for u in p.units]),
                    _norm(prefix + "norm_2", block.norm_2, T, unit)],
            "attn": [_linear(prefix + "attn.proj", block.attn.proj, T, unit),
                     Op(prefix + "attn.core", forward=core, input_grad=2 * core),  # weightless: paid on the way to qkv
                     _linear(prefix + "attn.attn", block.attn.attn, T, unit),
                     _norm(prefix + "norm_1", block.norm_1, T, unit)],
        }
        for branch, branch_ops in branches.items():
            for op in branch_ops:
                op.block, op.branch = i, branch
            ops += branch_ops
    embedding_grad = T * D + (2 * T * D * V if model.lm_head is None else 0)  # scatter-add (+ the tied head)
    ops.append(Op("transformer.wte", forward=0, input_grad=0, units=unit(model.transformer.wte, weight=embedding_grad)))
    return ops


def trainable_parameters(model: nn.Module) -> set[int]:
    """Ids of the parameters a method may train: the LoRA adapters when there are any, else every float tensor."""
    lora = any(isinstance(m, LoRALinear) for m in model.modules())
    return {id(p) for n, p in model.named_parameters() if ("lora_" in n if lora else p.is_floating_point())}


class _Units:
    """Makes a module's units: its parameters that may train, each with the FLOPs of its own gradient."""

    def __init__(self, model: nn.Module, trainable: set[int]) -> None:
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.trainable = trainable

    def __call__(self, module: nn.Module, **grads: float) -> list[Unit]:
        found = [(getattr(module, attr, None), flops) for attr, flops in grads.items()]
        return [Unit(self.names[id(p)], (p,), flops) for p, flops in found
                if isinstance(p, nn.Parameter) and id(p) in self.trainable]


def _linear(name: str, module: nn.Module, T: int, unit: _Units) -> Op:
    """nn.Linear, a bitsandbytes 4-bit linear, or a LoRALinear over either."""
    base = module.linear if isinstance(module, LoRALinear) else module
    n_in, n_out = base.in_features, base.out_features
    dense = 2 * T * n_in * n_out
    op = Op(name, forward=dense, input_grad=dense, units=unit(base, bias=T * n_out, weight=dense))
    if isinstance(module, LoRALinear):
        r = module.lora_A.size(0)
        a, b = 2 * T * n_in * r, 2 * T * r * n_out  # x @ A^T, then @ B^T; each costs the same again per gradient
        op.forward += a + b
        op.input_grad += a  # through A to x; the step through B is the adapter's `reach`
        if id(module.lora_A) in unit.trainable:
            op.units.insert(0, Unit(f"{name}.lora", (module.lora_A, module.lora_B), weight_grad=a + b, reach=b))
        else:
            op.input_grad += b
    return op


def _norm(name: str, module: nn.Module, T: int, unit: _Units) -> Op:
    D = module.weight.numel()
    return Op(name, forward=T * D, input_grad=T * D, units=unit(module, bias=T * D, weight=T * D))


def units(ops: Iterable[Op]) -> list[Unit]:
    return [u for op in ops for u in op.units]


def training_flops(ops: list[Op], trained: set[int] | None = None, skipped_blocks: Iterable[int] = (),
                   no_backward: Iterable[tuple[int, str]] = (), no_weight_grad: Iterable[tuple[int, str]] = ()
                   ) -> tuple[float, float]:
    """(forward, backward) FLOPs of one sequence.

    Args:
        trained: ids of the units that receive a gradient; None: every unit in the profile.
        skipped_blocks: blocks that are not computed at all (Progressive Layer Dropping).
        no_backward: (block, branch) pairs whose backward is dropped (DropBP); their forward still runs.
        no_weight_grad: (block, branch) pairs whose units get no gradient but still pass it on (DropBP's weights
            drop mode).
    """
    skipped, frozen, weights_frozen = set(skipped_blocks), set(no_backward), set(no_weight_grad)
    forward = backward = pending = 0.0
    for op in ops:
        if op.block in skipped:
            continue
        forward += op.forward
        if (op.block, op.branch) in frozen:
            continue  # the gradient bypasses the branch through the residual
        units_train = (op.block, op.branch) not in weights_frozen
        for unit in op.units:
            pending += unit.reach
            if units_train and (trained is None or id(unit) in trained):
                backward += pending + unit.weight_grad
                pending = 0.0
        pending += op.input_grad  # paid only if a unit below trains
    return forward, backward


def current_training_flops(model: nn.Module, seq_len: int, ops: list[Op] | None = None) -> tuple[float, float]:
    """(forward, backward) FLOPs of one sequence with the decisions the model holds right now.

    Reads which tensors require a gradient (GreenTrainer's selection, a frozen base), which blocks are skipped
    (PLD's `keep`) and which branches drop their backward (DropBP's `dropped`), so it prices the micro-batch
    that just ran, whatever the method. `ops`: the model's profile at `seq_len`, if already built.
    """
    ops = cost_profile(model, seq_len) if ops is None else ops
    trained = _trained(ops)
    blocks = model.transformer.h
    skipped = [i for i, b in enumerate(blocks) if b.training and not b.keep]
    dropped = [((i, name), layer.weights_only) for i, b in enumerate(blocks)
               for name, layer in (("attn", b.dropbp_attn), ("mlp", b.dropbp_mlp))
               if layer.training and layer.dropped]
    return training_flops(ops, trained, skipped, no_backward=[key for key, weights in dropped if not weights],
                          no_weight_grad=[key for key, weights in dropped if weights])


def backward_by_branch(ops: list[Op], trained: set[int] | None = None) -> dict[tuple[int | None, str | None], float]:
    """The backward FLOPs of `training_flops`, attributed to the (block, branch) of the op that spends them.

    Ops outside the blocks are keyed (None, None). An op's input gradient is only spent, and attributed to it,
    when a trained unit lies below: so the lowest branch of a LoRA model over a frozen embedding costs less.
    """
    shares: dict[tuple[int | None, str | None], float] = {}
    pending: list[tuple[tuple[int | None, str | None], float]] = []
    for op in ops:
        key = (op.block, op.branch)
        for unit in op.units:
            pending.append((key, unit.reach))
            if trained is None or id(unit) in trained:
                for owner, flops in pending + [(key, unit.weight_grad)]:
                    shares[owner] = shares.get(owner, 0.0) + flops
                pending = []
        pending.append((key, op.input_grad))
    return shares


def _trained(ops: list[Op]) -> set[int]:
    return {id(u) for u in units(ops) if all(p.requires_grad for p in u.params)}


BRANCHES = ("attn", "mlp")  # a block's residual branches, in the order its DropBP layers run


class CostModel:
    """The cost profile of one model, built once per sequence length and reused for every price.

    Build it once the model has its final parameters (after LoRA, quantization and any sharding): units are keyed
    by the parameter objects.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._profiles: dict[int, list[Op]] = {}

    def profile(self, seq_len: int) -> list[Op]:
        if seq_len not in self._profiles:
            self._profiles[seq_len] = cost_profile(self.model, seq_len)
        return self._profiles[seq_len]

    def current(self, seq_len: int) -> tuple[float, float]:
        """(forward, backward) FLOPs of one sequence with the model's current decisions (`current_training_flops`)."""
        return current_training_flops(self.model, seq_len, self.profile(seq_len))

    def branch_backward_flops(self, seq_len: int) -> list[float]:
        """Each branch's share of the full backward pass, in model order (attention 0, MLP 0, attention 1, ...).

        This is the F_i that DropBP's allocation spends its budget with: the same prices as the steps it saves.
        The shares add up to the blocks' backward FLOPs (`backward_by_branch`).
        """
        shares = backward_by_branch(self.profile(seq_len), _trained(self.profile(seq_len)))
        blocks = range(len(self.model.transformer.h))
        return [shares.get((block, branch), 0.0) for block in blocks for branch in BRANCHES]

    def branch_weight_grad_flops(self, seq_len: int) -> list[float]:
        """What skipping only each branch's weight gradients saves (DropBP's weights drop mode), in model order.

        Each is the full backward minus the backward with that branch's units frozen: its weight gradients, plus
        any input gradient below that only it needed (the lowest branches of a model with nothing else training).
        """
        ops = self.profile(seq_len)
        trained = _trained(ops)
        _, full = training_flops(ops, trained)
        keys = [(block, branch) for block in range(len(self.model.transformer.h)) for branch in BRANCHES]
        return [full - training_flops(ops, trained, no_weight_grad=[key])[1] for key in keys]

    def theoretical_saving(self, seq_len: int, drop_rates: Sequence[float] | float) -> float:
        """Expected share of a step's FLOPs that DropBP saves at these rates, embedding, head and loss included.

        For blocks alone this tends to the paper's 2p/3 (full fine-tuning) and p/2 (LoRA, QLoRA); the head, the loss
        and the attention core pull the real figure below that.
        """
        savings = self.branch_backward_flops(seq_len)
        if isinstance(drop_rates, (int, float)):
            drop_rates = [float(drop_rates)] * len(savings)
        if len(drop_rates) != len(savings):
            raise ValueError(f"expected {len(savings)} drop rates, got {len(drop_rates)}")
        forward, backward = training_flops(self.profile(seq_len), _trained(self.profile(seq_len)))
        return sum(p * s for p, s in zip(drop_rates, savings)) / (forward + backward)


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts bitsandbytes' 4-bit matrix products (QLoRA's forward pass).

    Their backward dequantizes and uses `aten.mm`, which FlopCounterMode already counts.
    """
    def matmul_4bit(a_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(a_shape) * out_shape[-1]

    mapping = {}
    if "bitsandbytes" in sys.modules:  # imported by QLoRA runs only
        for name in ("gemm_4bit", "gemv_4bit"):
            op = getattr(torch.ops.bitsandbytes, name, None)  # FlopCounterMode looks up overload packets
            if op is not None:
                mapping[op] = matmul_4bit
    return FlopCounterMode(display=False, custom_mapping=mapping)
