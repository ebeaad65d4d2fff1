"""Peak training memory and the longest trainable sequence against the DropBP drop rate (the paper's Tables 2 and 3).

For full, LoRA and QLoRA fine-tuning at each drop rate p, one training micro-batch (forward, loss as in
`lit_gpt.training`, backward) is accounted in the steady state of gradient accumulation: weights, gradients
and AdamW states are all allocated, and the tensors the step creates come and go on top of them.

* On CUDA (`--device cuda`, bf16) it is measured: `torch.cuda.max_memory_allocated` over the micro-batch, and
  the longest sequence is found by running real steps until `torch.cuda.OutOfMemoryError` (bisection), with
  `--memory_budget_gib` enforced through `torch.cuda.set_per_process_memory_fraction`.
* On the CPU it is counted, byte for byte for the tensors PyTorch allocates, with a model of the memory:
    - weights: every parameter and buffer storage once (QLoRA: the 4-bit base as bitsandbytes stores it,
      packed nibbles plus quantization constants), gradients of the trainable parameters, and AdamW's two
      states per trainable parameter (the parameter's dtype for `torch.optim.AdamW`, fp32 for QLoRA's
      bitsandbytes 32-bit optimizer);
    - saved activations: the bytes autograd saves for backward, seen through
      `torch.autograd.graph.saved_tensors_hooks`, each storage once (views are not counted twice; a view keeps
      its whole storage alive, so the whole storage is what counts), parameters excluded;
    - the peak: every aten op's output storages are tracked by a `TorchDispatchMode` from allocation until
      the storage is freed, over forward and backward. Its maximum is what an exact allocator without caching
      would need; above the saved activations it holds the backward's transients (the loss's logits-sized
      gradients and, with a tied head, the embedding's weight gradients, above all).
  The count runs on fake tensors (`FakeTensorMode` with the CPU device): no memory and no arithmetic, so long
  sequences and even LLaMA-2-7B shapes are cheap. CPU kernels are chosen as in a real run (the meta device is
  not used: there SDPA takes its math path and saves more than the CPU's flash kernel). Checked at every run:
  the fake count equals a real CPU run's count on the same configuration (`cross-check` lines), and the
  counting model is compared with the measured peak RSS of a training step in a fresh process
  (`validation` lines, measured ÷ counted), and the step peak with PyTorch's own tensor-memory tracker,
  `torch.distributed._tools.mem_tracker.MemTracker`, on the same fake micro-batch (`MemTracker` lines).
  The counted bytes of one step are affine in the sequence length T for every op (checked), so the longest
  sequence under the budget is solved from two counts per draw, then confirmed by a third count at the answer T*
  (it must equal the prediction and fit; otherwise the search falls back to bisection over counts).

DropBP is stochastic: systematic sampling fixes how many branches of each kind (attention, MLP) are dropped, but
not which, and what is alive at the peak depends a little on where the kept branches sit. Every configuration is
counted over `--draws` draws and the peak over them is reported; the longest sequence is the one that fits for every
draw.

The model comes from the training loop's factory (`lit_gpt.build`; on fake tensors only its construction differs),
and the loss is the loop's (`lit_gpt.loss`). What the numbers show, and how they were validated, is in
bench/README.md; memory.md holds the tables and the numbers of the checks.

    python -m bench.memory                                       # CPU count, SmolLM2-135M, fp32, + LLaMA-2-7B estimate
    python -m bench.memory --estimates '[Llama-2-70b-hf:qlora]'  # the paper's 70B QLoRA row (count-model estimate)
    python -m bench.memory --device cuda --model_name Llama-2-7b-hf --methods '[full]' --memory_budget_gib 80
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from bench.common import (
    command_line,
    default_dtype,
    detached_handler,
    machine_description,
    markdown_table,
    resolve_device,
    training_model,
)
from dropbp import DropBPHandler
from lit_gpt.build import prepare_for_finetuning
from lit_gpt.config import Config
from lit_gpt.lora import LoRAConfig, LoRALinear
from lit_gpt.loss import chunk_tokens, chunked_next_token_loss, forward_backward, next_token_loss
from lit_gpt.methods.pld import ProgressiveLayerDrop
from lit_gpt.model import GPT
from lit_gpt.utils import UserError, parse_dtype, run_cli

METHODS = ("full", "lora", "qlora")
GIB, MIB = 2**30, 2**20
# The paper's Table 3 (LLaMA2-7B full fine-tuning and LLaMA2-70B QLoRA on an A100 80 GB): longest trainable
# sequence at p = 0, 0.5, 0.75, 0.875.
PAPER_LONGEST = {("Llama-2-7b-hf", "full"): [1.5e3, 2.6e3, 5.1e3, 10.6e3],
                 ("Llama-2-70b-hf", "qlora"): [0.6e3, 1.2e3, 2.0e3, 3.7e3]}
PAPER_RATES = [0.0, 0.5, 0.75, 0.875]


# ---------------------------------------------------------------------------------------------- models
def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def cast_adapters(model: nn.Module, dtype: torch.dtype) -> None:
    """LoRA weights in the training dtype (Fabric's `*-true` precision converts every parameter)."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_A.data, m.lora_B.data = m.lora_A.data.to(dtype), m.lora_B.data.to(dtype)


def four_bit_bytes(numel: int, quantize: str) -> int:
    """Bytes bitsandbytes stores for one 4-bit weight: packed nibbles, per-64 absmax and the 16-value code.

    With double quantization ("-dq") the absmax is itself 8-bit, with fp32 constants per 256 blocks.
    Checked against the stored bytes of a real quantized model in `cross_check`.
    """
    blocks = -(-numel // 64)
    stored = (numel + 1) // 2 + 16 * 4
    if quantize.endswith("-dq"):
        return stored + blocks + -(-blocks // 256) * 4 + 256 * 4 + 4
    return stored + blocks * 4


def build_model(config: Config, method: str, dtype: torch.dtype, device: torch.device, seed: int,
                quantize: str, fake_mode=None, zero_grads: bool = True) -> GPT:
    """The model a fine-tuning of `method` trains, in training mode, with zero gradients (accumulation's state).

    Real models come from the training loop's factory (`bench.common.training_model`). Under `fake_mode` the
    model has fake tensors, which `lit_gpt.build.random_model` cannot make (its `.to(dtype)` cannot swap fake
    parameters, so they are built in `dtype`), and QLoRA is built as its LoRA graph with a float base: the 4-bit
    weights are then accounted by `four_bit_bytes` (bitsandbytes cannot quantize fake tensors).
    """
    config = replace(config)  # the count sets block_size per length
    if fake_mode is None:
        model = training_model(config, method, device, dtype, seed, quantize)
    else:
        with fake_mode:
            torch.manual_seed(seed)
            default = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                model = GPT(config)
            finally:
                torch.set_default_dtype(default)
            prepare_for_finetuning(model, "lora" if method == "qlora" else method, LoRAConfig(), quantize, dtype,
                                   device)
            model.train()
    with fake_mode or nullcontext():
        cast_adapters(model, dtype)
        for p in model.parameters():
            if p.requires_grad and zero_grads:
                p.grad = torch.zeros_like(p)
    return model


def make_handler(model: GPT, seed: int) -> DropBPHandler:
    """A handler whose decisions are drawn by `draw(handler, p, i)`, not by its forward hook.

    The hook is removed so that the draw happens outside a fake-tensor context (it needs real numbers) and
    so that draw i is the same decision in every count of every configuration.
    """
    return detached_handler(model, seed)


def draw(handler: DropBPHandler, p: float, index: int) -> None:
    handler.set_initial_drop_rate(p)
    handler.draw(step=index)


def make_pld(model: GPT, theta: float, seed: int) -> ProgressiveLayerDrop:
    """PLD held at keep level `theta` (θ̄, the end of its schedule), without its hook: `decide` draws."""
    pld = ProgressiveLayerDrop(model, theta_bar=theta, gamma=0.0, seed=seed)
    pld.remove()
    pld.set_theta(theta)
    return pld


def decide(handler: DropBPHandler, pld: ProgressiveLayerDrop | None, p: float | None, index: int) -> None:
    """Decision `index` of DropBP at rate p, or, with `pld` (and p None), of PLD at its held keep level."""
    draw(handler, 0.0 if pld is not None else p, index)
    if pld is not None:
        pld.draw(step=index)


def training_loss(model: GPT, ids: torch.Tensor, chunked_loss: bool) -> torch.Tensor:
    """The loop's loss (`lit_gpt.loss.forward_backward`): the chunked head + loss, or the full logits."""
    if chunked_loss:
        return chunked_next_token_loss(model, model(ids, return_hidden=True), ids)
    return next_token_loss(model(ids), ids)


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and bitsandbytes' 4-bit quantization constants."""
    tensors = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            tensors += [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
            state = getattr(state, "state2", None)
    return tensors


def static_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What exists before a micro-batch: weights and gradients."""
    return weight_tensors(model) + [p.grad for p in model.parameters() if p.grad is not None]


def static_bytes(model: GPT, method: str, quantize: str) -> dict[str, int]:
    """weights / grads / optimizer bytes, each storage once.

    A fake QLoRA model (a LoRA graph over a float base) has its base linears counted as 4-bit; a real one is
    counted as stored.
    """
    fake_qlora = method == "qlora" and not any(hasattr(p, "quant_state") for p in model.parameters())
    four_bit = {id(m.weight) for m in model.modules() if type(m) is nn.Linear} if fake_qlora else set()
    seen, weights = set(), 0
    for t in weight_tensors(model):
        key = storage_key(t)
        if key not in seen:
            seen.add(key)
            weights += four_bit_bytes(t.numel(), quantize) if id(t) in four_bit else t.untyped_storage().nbytes()
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    # torch.optim.AdamW keeps exp_avg and exp_avg_sq like the parameter; QLoRA trains with bitsandbytes'
    # 32-bit PagedAdamW, whose states are fp32.
    optimizer = sum(2 * p.numel() * (4 if method == "qlora" else p.element_size()) for p in trainable)
    return dict(weights=weights, grads=grads, optimizer=optimizer)


# ---------------------------------------------------------------------------------------------- counting
class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the tensor storages alive, after every aten op, among those created inside the mode.

    A storage is added when an op first returns it and removed when it is freed (a finalizer on the storage
    object, which PyTorch keeps alive exactly as long as the storage). `static` storages are never counted.
    """

    def __init__(self, static: set[int]) -> None:
        super().__init__()
        self.static, self.live, self.bytes = static, set(), 0
        self.timeline: list[int] = []
        self.ops: list[str] = []

    def _free(self, key: int, nbytes: int) -> None:
        self.live.discard(key)
        self.bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if tensors:
            # A sparse tensor (the tied embedding's gradient in full fine-tuning) lives in its indices and values.
            tensors = [part for t in tensors for part in ([t._indices(), t._values()] if t.is_sparse else [t])]
            for t in tensors:
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.static and key not in self.live:
                    nbytes = storage.nbytes()
                    self.live.add(key)
                    self.bytes += nbytes
                    weakref.finalize(storage, self._free, key, nbytes)
            self.timeline.append(self.bytes)
            self.ops.append(str(func))
        return out


@dataclass
class StepCount:
    seq_len: int
    saved: int  # bytes saved for backward, each storage once, weights excluded
    peak: int  # peak bytes of the tensors the micro-batch creates (over static)
    timeline: list[int]
    ops: list[str]


def micro_batch(model: GPT, handler: DropBPHandler, ids: torch.Tensor, chunked_loss: bool = True) -> None:
    """One training micro-batch, the loop's own (`lit_gpt.loss.forward_backward`); the loss is not kept."""
    forward_backward(model, ids, ids, skip_backward=handler.detect_non_grad, chunked_loss=chunked_loss)


def count_step(model: GPT, handler: DropBPHandler, p: float | None, draw_index: int, seq_len: int, batch: int,
               fake_mode=None, chunked_loss: bool = True, pld: ProgressiveLayerDrop | None = None) -> StepCount:
    """Count one micro-batch of `seq_len` tokens at drop rate p (or PLD's held keep level) with decision `draw_index`.

    The micro-batch is `lit_gpt.loss.forward_backward`'s, spelled out: its loss (`training_loss`), then the
    backward unless `detect_non_grad` says nothing can learn. It cannot be called itself here: its finiteness
    check reads the loss's value, which a fake tensor does not have, and the saved bytes are read between the
    forward and the backward. The chunked loss keeps its gradients on its autograd node, not as saved tensors:
    they are in the step peak, not in `saved`.
    """
    decide(handler, pld, p, draw_index)  # outside the fake-tensor context: sampling needs real numbers
    model.config.block_size = seq_len  # the RoPE table is built in the step for this length and counted there
    model._rope = None
    device = model.transformer.wte.weight.device
    with fake_mode or nullcontext():
        ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
        static = {storage_key(t) for t in static_tensors(model)} | {storage_key(ids)}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = storage_key(t)
            if key not in static and key not in saved:
                saved[key] = t.untyped_storage().nbytes()
            return t

        counter = LiveBytes(static)
        with counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = training_loss(model, ids, chunked_loss)
            saved_bytes = sum(saved.values())
            if not handler.detect_non_grad():
                loss.backward()
            del loss
    model._rope = None
    if pld is not None:
        pld.remove()  # every block runs again
    return StepCount(seq_len, saved_bytes, max(counter.timeline), counter.timeline, counter.ops)


def affine_longest(a: StepCount, b: StepCount, available: int) -> tuple[int, bool]:
    """Largest T whose counted peak fits in `available` bytes, from counts at two lengths.

    Every op's live bytes are affine in T when the two counts ran the same ops (checked): c + d·T. Returns
    (T*, True), or (0, False) when the counts do not allow the solve.
    """
    lines = affine_lines(a, b)
    if lines is None:
        return 0, False
    best = None
    for offset, slope in lines:
        if slope == 0:
            if offset > available:
                return 0, True
            continue
        limit = (available - offset) // slope
        best = limit if best is None else min(best, limit)
    if best is None:
        return 0, False  # nothing grows with T: no longest sequence
    return max(0, best), True


def affine_lines(a: StepCount, b: StepCount) -> list[tuple[int, int]] | None:
    """(offset, slope) in whole bytes of every op's live bytes, or None when they are not affine in T."""
    if a.ops != b.ops or a.seq_len == b.seq_len:
        return None
    span, lines = b.seq_len - a.seq_len, []
    for la, lb in zip(a.timeline, b.timeline):
        if (lb - la) % span or lb < la:
            return None
        slope = (lb - la) // span
        lines.append((la - slope * a.seq_len, slope))
    return lines


def affine_peak(a: StepCount, b: StepCount, seq_len: int) -> int | None:
    lines = affine_lines(a, b)
    return None if lines is None else max(offset + slope * seq_len for offset, slope in lines)


def bisect_longest(fits: Callable[[int], bool], start: int, limit: int = 1 << 22, granularity: int = 1) -> int:
    """Largest T ≥ 2 with fits(T), assuming fits is monotone; 0 when even T = 2 does not fit.

    With `granularity` g the search stops at g tokens: T fits, and some length at most T + g does not.
    """
    if not fits(2):
        return 0
    lo, hi = 2, max(3, start)
    while fits(hi):  # grow until a length fails
        lo, hi = hi, hi * 2
        if hi > limit:
            return lo
    while hi - lo > granularity:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class Counter:
    """Counts one method's model on fake tensors: peaks per (p, draw) at any length, and the longest sequence."""

    def __init__(self, config: Config, method: str, dtype: torch.dtype, seed: int, quantize: str, batch: int,
                 chunked_loss: bool = True):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.method, self.batch, self.seed, self.chunked_loss = method, batch, seed, chunked_loss
        self.fake_mode = FakeTensorMode()
        self.model = build_model(config, method, dtype, torch.device("cpu"), seed, quantize, self.fake_mode)
        self.handler = make_handler(self.model, seed)
        self.static = static_bytes(self.model, method, quantize)
        # The chunked loss runs one more chunk every `chunk` tokens: the ops, and so the affine solve, change there.
        self.chunk = chunk_tokens(self.model) if chunked_loss else None
        self._pld: dict[float, ProgressiveLayerDrop] = {}
        self._cache: dict[tuple[float | None, float | None, int, int], StepCount] = {}

    def pld(self, theta: float | None) -> ProgressiveLayerDrop | None:
        if theta is not None and theta not in self._pld:
            self._pld[theta] = make_pld(self.model, theta, self.seed)
        return None if theta is None else self._pld[theta]

    def count(self, p: float | None, draw_index: int, seq_len: int, pld_theta: float | None = None) -> StepCount:
        """The count at DropBP rate p, or with `pld_theta` (and p None) of PLD held at that keep level."""
        key = (p, pld_theta, draw_index, seq_len)
        if key not in self._cache:
            self._cache[key] = count_step(self.model, self.handler, p, draw_index, seq_len, self.batch, self.fake_mode,
                                          self.chunked_loss, self.pld(pld_theta))
        return self._cache[key]

    def segment(self, seq_len: int) -> tuple[int, int]:
        """The lengths that run the same ops as `seq_len`: all of them with the full logits, those with the same
        number of loss chunks with the chunked loss (the last chunk's size is then affine in T too)."""
        if self.chunk is None:
            return 2, 1 << 30
        n = -(-self.batch * seq_len // self.chunk)
        return max(2, (n - 1) * self.chunk // self.batch + 1), n * self.chunk // self.batch

    def longest(self, p: float | None, draws: list[int], static: int, budget: int, seq_len: int,
                pld_theta: float | None = None) -> dict:
        """Longest T (tokens per sequence) whose peak fits `budget` bytes for every draw, on top of `static`.

        Every op's bytes are affine in T over a run of lengths with the same ops (`segment`): with the full
        logits, every length, solved from counts at seq_len and 2·seq_len; with the chunked loss, the lengths
        with the same number of chunks, solved from counts at the segment's ends, moving to the neighbouring
        segment until the answer lies inside one (the peak grows with T). The answer is confirmed by counting the
        binding draw at T*: it must fit and match the affine prediction, and T* + 1 must not fit (predicted within
        T*'s segment, counted when it starts the next). If anything disagrees, falls back to bisection over counts.
        """
        available = budget - static

        def count(d: int, n: int) -> StepCount:
            return self.count(p, d, n, pld_theta)

        solved = []
        for d in draws:
            # Draws differ little: each starts from the previous one's answer (with the chunked loss, its segment).
            start = min(solved)[0] if solved and min(solved)[0] >= 2 else seq_len
            found = self._solve(lambda n, d=d: count(d, n), available, seq_len, start)
            if found is None:
                break
            solved.append((found[0], d, found[1]))
        if len(solved) == len(draws):
            t, binding, lines = min(solved)
            if t < 2:
                return dict(longest=0, binding_draw=binding, solved="affine")
            at = count(binding, t).peak
            # T* + 1 is predicted inside T*'s segment, and counted when it starts the next one
            after = count(binding, t + 1).peak if self.segment(t)[1] == t else max(c + s * (t + 1) for c, s in lines)
            if at == max(c + s * t for c, s in lines) and at <= available < after:
                return dict(longest=t, binding_draw=binding, solved="affine, confirmed at T*")
        t = bisect_longest(lambda n: all(count(d, n).peak <= available for d in draws), seq_len)
        return dict(longest=t, binding_draw=None, solved="bisection over counts")

    def _solve(self, count: Callable[[int], StepCount], available: int, seq_len: int,
               start: int) -> tuple[int, list[tuple[int, int]]] | None:
        """(T*, the affine lines of T*'s segment) for one draw, or None when the counts do not allow the solve.

        With the chunked loss the walk starts at `start`'s segment."""
        if self.chunk is None:
            lines = affine_lines(count(seq_len), count(2 * seq_len))
            t, ok = affine_longest(count(seq_len), count(2 * seq_len), available)
            return (t, lines) if ok else None
        too_long = set()  # first lengths of segments that do not fit
        for _ in range(64):
            lo, hi = self.segment(start)
            if hi <= lo:
                return None  # fewer tokens per chunk than sequences: a segment has one length
            if count(lo).peak > available:
                if lo == 2:
                    return 0, []
                too_long.add(lo)
                start = lo - 1
                continue
            lines = affine_lines(count(lo), count(hi))
            t, ok = affine_longest(count(lo), count(hi), available)
            if not ok or t < lo:
                return None
            if t < hi or hi + 1 in too_long:
                return min(t, hi), lines
            start = max(hi + 1, t)  # the answer lies further on: jump to the segment of the extrapolated T*
            if self.segment(start)[0] in too_long:  # ... but not past a segment that is known not to fit
                start = hi + 1
        return None


# ---------------------------------------------------------------------------------------------- checks
def real_cpu_count(config: Config, method: str, dtype: torch.dtype, seed: int, quantize: str, batch: int,
                   checks: list[tuple[float, int]], seq_len: int,
                   chunked_loss: bool = True) -> tuple[dict[str, int], list[StepCount]]:
    """The same counts on a real CPU model (real 4-bit weights for QLoRA): static bytes and one count per check."""
    model = build_model(config, method, dtype, torch.device("cpu"), seed, quantize)
    handler = make_handler(model, seed)
    static = static_bytes(model, method, quantize)
    counts = [count_step(model, handler, p, d, seq_len, batch, chunked_loss=chunked_loss) for p, d in checks]
    del model, handler
    gc.collect()
    return static, counts


def rss_probe(spec: str) -> None:
    """Run in a fresh process by `validate`: measure a training micro-batch's peak RSS and print it as JSON.

    Two micro-batches with a real AdamW: the first allocates gradients and optimizer states (kept, as during
    gradient accumulation), the second is the one counted. VmHWM is reset between them (/proc/self/clear_refs).
    """
    args = json.loads(spec)
    torch.set_num_threads(args["threads"])

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    config = Config(**args["config"])
    dtype = parse_dtype(args["dtype"])
    model = build_model(config, args["method"], dtype, torch.device("cpu"), args["seed"], args["quantize"],
                        zero_grads=False)  # the first micro-batch creates them
    handler = make_handler(model, args["seed"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (args["batch"], args["seq_len"]),
                        generator=torch.Generator().manual_seed(args["seed"]))
    model.config.block_size = args["seq_len"]
    with torch.no_grad():  # loads what the first call loads (kernels, bitsandbytes' library) before the baseline
        model(ids[:, : min(8, args["seq_len"])])
    model._rope = None
    gc.collect()
    after_build = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (building a QLoRA model peaks above it)
    draw(handler, args["p"], args["draw"])
    micro_batch(model, handler, ids, args["chunked_loss"])
    optimizer.step()
    gc.collect()
    before = status("VmRSS")
    first_peak = status("VmHWM")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    draw(handler, args["p"], args["draw"])
    micro_batch(model, handler, ids, args["chunked_loss"])
    rope = sum(t.untyped_storage().nbytes() for t in model._rope)
    print(json.dumps(dict(after_build=after_build, before=before, first_peak=first_peak, peak=status("VmHWM"),
                          rope=rope)))


def validate(config: Config, method: str, p: float, draw_index: int, dtype: torch.dtype, seed: int,
             quantize: str, batch: int, seq_len: int, static: dict[str, int], count: StepCount,
             chunked_loss: bool = True) -> dict:
    """Compare the counting model with the peak RSS of a real training step in a fresh process.

    glibc would keep freed activations in its heap (RSS then shows fragmentation, not live bytes), so the probe
    runs with MALLOC_MMAP_THRESHOLD_=65536: every block of 64 KiB or more is mapped on allocation and unmapped
    when freed, and RSS follows the live tensors.
    """
    spec = json.dumps(dict(config=config.__dict__, method=method, p=p, draw=draw_index,
                           dtype=str(dtype).removeprefix("torch."), seed=seed, quantize=quantize, batch=batch,
                           seq_len=seq_len, threads=torch.get_num_threads(), chunked_loss=chunked_loss))
    code = f"from bench.memory import rss_probe; rss_probe({spec!r})"  # run from the repository root
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                            cwd=Path(__file__).resolve().parent.parent)
    if result.returncode != 0:
        raise RuntimeError(f"the RSS probe failed:\n{result.stderr[-3000:]}")
    m = json.loads(result.stdout.strip().splitlines()[-1])
    counted = static["grads"] + static["optimizer"] + count.peak
    measured = max(m["first_peak"], m["peak"]) - m["after_build"]
    step_counted = count.peak - m["rope"]  # the RoPE table was built by the first micro-batch
    return dict(method=method, drop_rate=p, draw=draw_index, seq_len=seq_len,
                measured_bytes=measured, counted_bytes=counted, ratio=measured / counted,
                states_measured=m["before"] - m["after_build"], states_counted=static["grads"] + static["optimizer"],
                step_measured=m["peak"] - m["before"], step_counted=step_counted,
                step_ratio=(m["peak"] - m["before"]) / step_counted)


def memtracker_peak(model: GPT, handler: DropBPHandler, p: float, draw_index: int, seq_len: int, batch: int,
                    fake_mode=None, chunked_loss: bool = True) -> int | None:
    """The step peak of `count_step`'s micro-batch as PyTorch's MemTracker sees it: its peak tensor bytes less
    what it tracked before the micro-batch (weights, gradients and the token ids, which it counts as the model's
    input). None where MemTracker cannot run (torch 2.13): on a model with frozen parameters (LoRA, QLoRA), because
    it hooks every parameter's gradient and that hook cannot be registered on a frozen one; and on a tied model in
    full fine-tuning, whose embedding gradient is sparse, a tensor whose storage MemTracker cannot read."""
    from torch.distributed._tools.mem_tracker import MemTracker

    if not all(p.requires_grad for p in model.parameters()) or model.transformer.wte.sparse:
        return None

    draw(handler, p, draw_index)
    model.config.block_size = seq_len
    model._rope = None
    device = model.transformer.wte.weight.device
    with fake_mode or nullcontext():
        ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
        tracker = MemTracker()
        tracker.track_external(model, ids, *[p.grad for p in model.parameters() if p.grad is not None])
        before = sum(snap["Total"] for snap in tracker.get_tracker_snapshot("current").values())
        with tracker:
            loss = training_loss(model, ids, chunked_loss)
            if not handler.detect_non_grad():
                loss.backward()
            del loss
    model._rope = None
    peak = sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
    return peak - before


# ---------------------------------------------------------------------------------------------- CUDA
def cuda_measure(config: Config, method: str, drop_rates: list[float], draws: int, dtype: torch.dtype,
                 device: torch.device, seed: int, quantize: str, batch: int, seq_len: int, budget: int,
                 chunked_loss: bool = True, pld_theta: float | None = None, granularity: int = 1) -> list[dict]:
    """Measured peaks at `seq_len` and the longest sequence by out-of-memory search, on one CUDA device.

    The search runs real training micro-batches (the loop's `forward_backward`) at growing, then bisected lengths
    until `torch.cuda.OutOfMemoryError`, to within `granularity` tokens; every draw must fit.
    """
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    model = build_model(config, method, dtype, device, seed, quantize, zero_grads=False)
    handler = make_handler(model, seed)
    static = static_bytes(model, method, quantize)
    # torch's AdamW for every method (bitsandbytes' paged states live outside torch's allocator).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pld = make_pld(model, pld_theta, seed) if pld_theta is not None else None

    def step(p: float | None, d: int, length: int) -> tuple[int, int, int]:
        decide(handler, pld if p is None else None, p, d)
        ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
        model.config.block_size, model._rope = length, None
        saved: dict[int, int] = {}

        def pack(t):
            saved.setdefault(storage_key(t), t.untyped_storage().nbytes())
            return t

        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        weights = {storage_key(t) for t in static_tensors(model)}
        saved_bytes = 0

        def backward(loss: torch.Tensor) -> None:
            nonlocal saved_bytes
            saved_bytes = sum(n for k, n in saved.items() if k not in weights)  # what the forward saved
            loss.backward()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # backward saves nothing itself
            forward_backward(model, ids, ids, backward=backward, skip_backward=handler.detect_non_grad,
                             chunked_loss=chunked_loss)
        if pld is not None:
            pld.remove()  # every block runs again
        if not saved_bytes:  # the backward was skipped
            saved_bytes = sum(n for k, n in saved.items() if k not in weights)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), base, saved_bytes

    step(0.0, 0, min(seq_len, 16))  # allocates gradients; the optimizer step then allocates its states
    optimizer.step()

    def indices(p: float | None) -> range:
        return range(draws if p is None or 0 < p < 1 else 1)  # p = 0 and p = 1 decide the same every time

    def fits(p: float | None, length: int) -> bool:
        out_of_memory = False
        try:
            for d in indices(p):
                step(p, d, length)
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
        if out_of_memory:  # outside the except block, so that the traceback's tensors can be freed
            gc.collect()
            torch.cuda.empty_cache()
        return not out_of_memory

    rows = []
    for p in [*drop_rates, *([None] if pld is not None else [])]:  # None: PLD held at θ̄
        results = [step(p, d, seq_len) for d in indices(p)]
        peak, base, saved = max(results)
        longest = bisect_longest(lambda n, p=p: fits(p, n), seq_len, granularity=granularity)
        # weights/grads/optimizer are counted; peak is measured (it includes the allocator's view of all three)
        rows.append(dict(method=method, drop_rate=p, pld_theta=pld_theta if p is None else None, **static,
                         saved=saved, step_peak=peak - base, peak=peak, measured_before_step=base, longest=longest,
                         longest_solved=f"out-of-memory bisection to {granularity} tokens"))
    return rows


# ---------------------------------------------------------------------------------------------- output
def setting_label(row: dict) -> str:
    """A row's drop rate, or PLD's held keep level."""
    theta = row.get("pld_theta")
    return f"PLD θ̄={theta:g}" if theta is not None else f"{row['drop_rate']:g}"


def add_ratios(rows: list[dict]) -> None:
    base = {r["method"]: r for r in rows if r["drop_rate"] == 0.0}
    for r in rows:
        b = base.get(r["method"])
        if b is not None:
            r["peak_ratio"] = r["peak"] / b["peak"]
            r["longest_ratio"] = r["longest"] / b["longest"] if b["longest"] else float("nan")


def render_table(rows: list[dict], budget_gib: float) -> str:
    headers = ["method", "drop rate", "weights MiB", "grads MiB", "AdamW MiB", "saved act. MiB", "step peak MiB",
               "peak MiB", "peak ÷ p=0", f"longest seq @ {budget_gib:g} GiB", "longest ÷ p=0"]

    def mib(x):
        return f"{x / MIB:,.1f}"

    body = [[r["method"], setting_label(r), mib(r["weights"]), mib(r["grads"]), mib(r["optimizer"]), mib(r["saved"]),
             mib(r["step_peak"]), mib(r["peak"]), f"{r.get('peak_ratio', float('nan')):.3f}",
             f"{r['longest']:,}", f"{r.get('longest_ratio', float('nan')):.2f}×"] for r in rows]
    return markdown_table(headers, body)


def render_estimates(rows: list[dict], budget_gib: float) -> str:
    headers = ["model", "method", "drop rate", "weights+grads+AdamW GiB", f"longest seq @ {budget_gib:g} GiB",
               "longest ÷ p=0", "paper longest", "paper ÷ p=0"]
    body = []
    for r in rows:
        paper = PAPER_LONGEST.get((r["model"], r["method"]))
        i = PAPER_RATES.index(r["drop_rate"]) if paper and r.get("pld_theta") is None \
            and r["drop_rate"] in PAPER_RATES else None
        body.append([r["model"], r["method"], setting_label(r), f"{r['static'] / GIB:.1f}", f"{r['longest']:,}",
                     f"{r.get('longest_ratio', float('nan')):.2f}×", f"{paper[i] / 1e3:.1f}K" if i is not None else "–",
                     f"{paper[i] / paper[0]:.2f}×" if i is not None else "–"])
    return markdown_table(headers, body)


def plot_breakdown(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [("weights", "weights", "#4c72b0"), ("grads", "gradients", "#55a868"),
             ("optimizer", "AdamW states", "#c44e52"), ("saved", "saved activations", "#8172b2"),
             ("transient", "other live tensors at the peak", "#ccb974")]
    labels = [f"{r['method']}\n" + (setting_label(r) if r.get("pld_theta") is not None else f"p={r['drop_rate']:g}")
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.62 * len(rows) + 1.5), 4.6))
    bottom = [0.0] * len(rows)
    for key, label, color in parts:
        values = [(r["step_peak"] - r["saved"] if key == "transient" else r[key]) / GIB for r in rows]
        ax.bar(range(len(rows)), values, bottom=bottom, color=color, label=label, width=0.75)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, r in enumerate(rows):
        ax.text(i, bottom[i], f"{r['peak'] / GIB:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("GiB at the peak of a micro-batch")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_longest(rows: list[dict], estimates: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = {"full": "o", "lora": "^", "qlora": "v"}
    lines = {"full": "-", "lora": "-", "qlora": "-."}  # lora and qlora can coincide: distinct lines show both
    for group, estimate in ((rows, False), (estimates, True)):
        group = [r for r in group if r.get("pld_theta") is None]  # PLD drops whole blocks: no point on this axis
        for name in dict.fromkeys((r.get("model"), r["method"]) for r in group):
            style = markers[name[1]] + ("--" if estimate else lines[name[1]])
            points = sorted((r["drop_rate"], r.get("longest_ratio")) for r in group
                            if (r.get("model"), r["method"]) == name)
            points = [(p, v) for p, v in points if v is not None and not math.isnan(v)]
            label = f"{name[0]} {name[1]} (count estimate)" if name[0] else f"{name[1]}"
            ax.plot([p for p, _ in points], [v for _, v in points], style, label=label)
    for ((model, method), values), marker in zip(PAPER_LONGEST.items(), "x+"):
        ax.plot(PAPER_RATES, [v / values[0] for v in values], marker + ":", color="dimgray", markersize=8,
                label=f"paper (A100): {model.removesuffix('-hf')} {method}")
    ideal = [p / 100 for p in range(0, 90, 2)]
    ax.plot(ideal, [1 / (1 - p) for p in ideal], color="black", alpha=0.25, label="1/(1−p)")
    ax.set_xlabel("drop rate p")
    ax.set_ylabel("longest trainable sequence ÷ baseline (p = 0)")
    ax.set_yscale("log", base=2)
    ax.set_yticks([1, 1.5, 2, 3, 4, 6, 8], ["1", "1.5", "2", "3", "4", "6", "8"])
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def parse_pairs(values: list[str], sep: str, what: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        left, found, right = value.rpartition(sep)
        if not found or not left or not right:
            example = "full@0.875" if sep == "@" else "Llama-2-7b-hf:full"
            raise UserError(f"{what} entries look like {example}, got {value!r}")
        pairs.append((left, right))
    return pairs


def count_rows(config: Config, methods: list[str], drop_rates: list[float], draws: int, dtype: torch.dtype, seed: int,
               quantize: str, batch: int, seq_len: int, budget: int, log=print, chunked_loss: bool = True,
               pld_theta: float | None = None) -> tuple[list[dict], dict[str, Counter]]:
    """Count every configuration on fake tensors: peak at seq_len (max over draws) and the longest sequence.

    Returns the rows and each method's `Counter` (LoRA and QLoRA share one where their losses agree).
    """
    graphs: dict[tuple[str, bool], Counter] = {}
    counters: dict[str, Counter] = {}
    rows = []
    for method in methods:
        graph = "lora" if method == "qlora" else method  # a fake QLoRA is the LoRA graph with 4-bit weight bytes
        # An untied QLoRA head is 4-bit, and gets the full logits even with the chunked loss; the fake graph's
        # float head must too.
        chunked = chunked_loss and not (method == "qlora" and not config.tie_embeddings)
        if (graph, chunked) not in graphs:
            graphs[graph, chunked] = Counter(config, graph, dtype, seed, quantize, batch, chunked)
        counter = counters[method] = graphs[graph, chunked]
        static = counter.static if method == graph else static_bytes(counter.model, "qlora", quantize)
        for p, theta in [(p, None) for p in drop_rates] + ([(None, pld_theta)] if pld_theta is not None else []):
            # p = 0 and p = 1 decide the same every time
            indices = list(range(draws)) if theta is not None or 0 < p < 1 else [0]
            counts = [counter.count(p, d, seq_len, theta) for d in indices]
            worst = max(range(len(counts)), key=lambda i: counts[i].peak)
            longest = counter.longest(p, indices, sum(static.values()), budget, seq_len, theta)
            rows.append(dict(method=method, drop_rate=p, pld_theta=theta, **static, saved=max(c.saved for c in counts),
                             step_peak=counts[worst].peak, peak=sum(static.values()) + counts[worst].peak,
                             worst_draw=indices[worst], draws=len(indices),
                             best_draw_step_peak=min(c.peak for c in counts),
                             longest=longest["longest"],
                             longest_binding_draw=longest["binding_draw"], longest_solved=longest["solved"]))
            log(f"  {method} {setting_label(rows[-1])}: peak {rows[-1]['peak'] / MIB:,.1f} MiB, "
                f"longest {longest['longest']:,} ({longest['solved']})")
    return rows, counters


def main(
    model_name: str = "SmolLM2-135M",
    methods: list[str] = ["full", "lora", "qlora"],
    drop_rates: list[float] = [0.0, 0.5, 0.75, 0.875],
    seq_len: int = 256,
    micro_batch_size: int = 1,
    memory_budget_gib: float = 4.0,
    draws: int = 4,
    device: str = "auto",
    dtype: str | None = None,
    quantize: str = "bnb.nf4",
    validate_on: list[str] = ["full@0.0", "lora@0.875"],
    estimates: list[str] = ["Llama-2-7b-hf:full"],
    estimate_budget_gib: float = 80.0,
    estimate_seq_len: int = 512,
    chunked_loss: bool = True,
    pld_theta: float | None = 0.5,
    search_granularity: int = 1,
    seed: int = 1234,
    out: Path = Path("bench/results/memory"),
) -> dict:
    """Peak training memory per configuration and the longest trainable sequence under a memory budget.

    Args:
        model_name: a lit_gpt preset; its shape is used with random weights.
        methods: any of full, lora, qlora.
        drop_rates: uniform DropBP rates in [0, 1]; include 0, the baseline the ratios divide by.
        seq_len: tokens per sequence for the peak-memory columns.
        micro_batch_size: sequences per micro-batch.
        memory_budget_gib: memory the longest sequence must fit in (GiB); on CUDA, the cap put on the allocator.
        draws: DropBP decisions counted per configuration; the peak over them is reported.
        device: cpu (count model), cuda (measured) or auto.
        dtype: float32, bfloat16 or float16; default fp32 on CPU, bf16 on CUDA.
        quantize: QLoRA's 4-bit format: bnb.nf4, bnb.nf4-dq, bnb.fp4 or bnb.fp4-dq.
        validate_on: method@p configurations whose counted memory is compared with a fresh process's peak RSS
            (CPU only; empty to skip).
        estimates: model:method count-model estimates of the longest sequence at paper scale, in bf16 with
            micro-batch 1 (CPU only; empty to skip), e.g. Llama-2-7b-hf:full or Llama-2-70b-hf:qlora.
        estimate_budget_gib: memory budget of the estimates (the paper's A100 has 80 GB).
        estimate_seq_len: the first of the two lengths the estimates are counted at.
        chunked_loss: the head and the loss a chunk of tokens at a time, as training runs them by default
            (`--train.chunked_loss`); false: the full (tokens x vocab) logits.
        pld_theta: also count Progressive Layer Dropping held at this final keep level θ̄ (the end of its schedule,
            its least memory; its schedule starts with every block); null leaves PLD out.
        search_granularity: on CUDA, the out-of-memory search for the longest sequence stops at this many tokens.
        seed: seed of the weights and the drop decisions.
        out: folder for memory.md, memory.json, memory_breakdown.png and memory_longest.png.
    """
    started = time.perf_counter()
    for method in methods:
        if method not in METHODS:
            raise UserError(f"unknown method {method!r}: choose full, lora or qlora")
    if not methods or not drop_rates:
        raise UserError("--methods and --drop_rates need at least one value each")
    if any(not 0 <= p <= 1 for p in drop_rates):
        raise UserError("drop rates must lie in [0, 1]")
    if 0.0 not in drop_rates:
        raise UserError("--drop_rates must include 0: the baseline every ratio is taken against")
    if seq_len < 2 or micro_batch_size < 1 or draws < 1:
        raise UserError("--seq_len must be at least 2, --micro_batch_size and --draws at least 1")
    if memory_budget_gib <= 0 or estimate_budget_gib <= 0:
        raise UserError("memory budgets must be positive (GiB)")
    if pld_theta is not None and not 0 < pld_theta <= 1:
        raise UserError(f"--pld_theta must lie in (0, 1], got {pld_theta}")
    if search_granularity < 1:
        raise UserError(f"--search_granularity must be at least 1 token, got {search_granularity}")
    from lit_gpt.quantize import check_quantize_mode

    check_quantize_mode(quantize)
    torch_device = resolve_device(device)
    # Validation and estimates belong to the CPU count; a CUDA run measures, and leaves them out.
    counting = torch_device.type == "cpu"
    validations = [(m, float(p)) for m, p in parse_pairs(validate_on, "@", "--validate_on")] \
        if validate_on and counting else []
    for m, p in validations:
        if m not in methods or p not in drop_rates:
            raise UserError(f"--validate_on {m}@{p:g} is not among the configurations (--methods, --drop_rates)")
    estimate_pairs = parse_pairs(estimates, ":", "--estimates") if estimates and counting else []
    for name, m in estimate_pairs:
        Config.from_name(name)
        if m not in METHODS:
            raise UserError(f"unknown method {m!r} in --estimates: choose full, lora or qlora")
    drop_rates = sorted({float(p) for p in drop_rates})
    torch_dtype = parse_dtype(dtype) or default_dtype(torch_device)
    config = Config.from_name(model_name, block_size=seq_len)
    budget = int(memory_budget_gib * GIB)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    notes: list[str] = []
    checks: list[dict] = []
    validation: list[dict] = []
    estimate_rows: list[dict] = []

    if torch_device.type == "cuda":
        if "qlora" in methods and not has_bitsandbytes():
            raise UserError("qlora needs bitsandbytes: pip install bitsandbytes (the `quant` extra), "
                            "or leave qlora out")
        rows = []
        for method in methods:
            rows += cuda_measure(config, method, drop_rates, draws, torch_dtype, torch_device, seed, quantize,
                                 micro_batch_size, seq_len, budget, chunked_loss, pld_theta, search_granularity)
            gc.collect()  # the model and optimizer of `method` are gone: give their memory back before the next
            torch.cuda.empty_cache()
        kind = "measured"
    else:
        print(f"counting {model_name} ({dtype_name}, seq {seq_len}, micro-batch {micro_batch_size}) on fake tensors")
        rows, counters = count_rows(config, methods, drop_rates, draws, torch_dtype, seed, quantize, micro_batch_size,
                                    seq_len, budget, chunked_loss=chunked_loss, pld_theta=pld_theta)
        kind = "counted"
        # Cross-check: real CPU runs give exactly the fake count (p = 0 and the highest rate, first draw).
        print("cross-checking the fake-tensor count against real CPU runs")
        picks = sorted({0.0, max(drop_rates)})
        for method in methods:
            if method == "qlora" and not has_bitsandbytes():
                notes.append("bitsandbytes is not installed: QLoRA not cross-checked against a real 4-bit model")
                continue
            graph = counters[method]
            real_static, real_counts = real_cpu_count(config, method, torch_dtype, seed, quantize, micro_batch_size,
                                                      [(p, 0) for p in picks], seq_len, graph.chunked_loss)
            fake_static = graph.static if method != "qlora" else static_bytes(graph.model, "qlora", quantize)
            for p, real in zip(picks, real_counts):
                fake = graph.count(p, 0, seq_len)
                checks.append(dict(method=method, drop_rate=p, draw=0, real_saved=real.saved, fake_saved=fake.saved,
                                   real_peak=real.peak, fake_peak=fake.peak, real_weights=real_static["weights"],
                                   fake_weights=fake_static["weights"],
                                   equal=real.saved == fake.saved and real.peak == fake.peak
                                   and real_static == fake_static))
                c = checks[-1]
                c["memtracker_peak"] = memtracker_peak(graph.model, graph.handler, p, 0, seq_len, micro_batch_size,
                                                       graph.fake_mode, graph.chunked_loss)
                tracked = "–" if c["memtracker_peak"] is None else f"{c['memtracker_peak']:,}"
                print(f"  {method} p={p:g}: saved real {real.saved:,} / fake {fake.saved:,} B, "
                      f"peak real {real.peak:,} / "
                      f"fake {fake.peak:,} B / MemTracker {tracked} B, weights real "
                      f"{c['real_weights']:,} / fake {c['fake_weights']:,} B -> "
                      f"{'equal' if c['equal'] else 'DIFFERENT'}")
        for m, p in validations:
            row = next(r for r in rows if r["method"] == m and r["drop_rate"] == p)
            graph = counters[m]
            if m == "qlora" and not has_bitsandbytes():
                continue
            static = {k: row[k] for k in ("weights", "grads", "optimizer")}
            print(f"validating the count against a real training step's peak RSS: {m} p={p:g} draw {row['worst_draw']}")
            validation.append(validate(config, m, p, row["worst_draw"], torch_dtype, seed, quantize, micro_batch_size,
                                       seq_len, static, graph.count(p, row["worst_draw"], seq_len), graph.chunked_loss))
            v = validation[-1]
            print(f"  measured {v['measured_bytes'] / MIB:,.1f} MiB / counted {v['counted_bytes'] / MIB:,.1f} MiB = "
                  f"{v['ratio']:.3f} (micro-batch alone {v['step_ratio']:.3f})")
        for name, m in estimate_pairs:
            print(f"estimating {name} {m} (bf16, micro-batch 1, budget {estimate_budget_gib:g} GiB) on fake tensors")
            est_config = Config.from_name(name, block_size=estimate_seq_len)
            est, _ = count_rows(est_config, [m], drop_rates, draws, torch.bfloat16, seed, quantize, 1,
                                estimate_seq_len, int(estimate_budget_gib * GIB), chunked_loss=chunked_loss)
            for r in est:
                r.update(model=name, static=r["weights"] + r["grads"] + r["optimizer"])
            add_ratios(est)
            estimate_rows += est

    add_ratios(rows)
    machine = machine_description(torch_device)
    loss = "chunked head + loss" if chunked_loss else "full logits"
    setting = (f"{model_name} shape, random weights, {dtype_name}, seq {seq_len}, micro-batch {micro_batch_size}, "
               f"budget {memory_budget_gib:g} GiB, {loss}, peak over {draws} DropBP (and PLD) draws, {kind}")
    table = render_table(rows, memory_budget_gib)
    sections = [f"Machine: {machine}", f"Setting: {setting}", f"Command: `{command_line('memory')}`", table]
    if checks:
        tracked = [c for c in checks if c["memtracker_peak"] is not None]
        sections.append(f"Cross-check, fake-tensor count vs a real CPU run (same draw): "
                        f"{sum(c['equal'] for c in checks)} "
                        f"of {len(checks)} equal; step peak vs MemTracker's on the fake micro-batch: "
                        f"{sum(c['fake_peak'] == c['memtracker_peak'] for c in tracked)} of {len(tracked)} equal." +
                        "".join(f"\n- {c['method']} p={c['drop_rate']:g}: saved {c['real_saved']:,} vs "
                                f"{c['fake_saved']:,} B, step peak {c['real_peak']:,} vs {c['fake_peak']:,} B "
                                f"(MemTracker "
                                f"{'–' if c['memtracker_peak'] is None else format(c['memtracker_peak'], ',')}"
                                f" B), weights {c['real_weights']:,} vs {c['fake_weights']:,} B" for c in checks))
    if validation:
        sections.append("Validation, measured ÷ counted (peak RSS of a real training step in a fresh process, "
                        "MALLOC_MMAP_THRESHOLD_=65536):" +
                        "".join(f"\n- {v['method']} p={v['drop_rate']:g} (draw {v['draw']}): measured "
                                f"{v['measured_bytes'] / MIB:,.1f} MiB / counted {v['counted_bytes'] / MIB:,.1f} MiB "
                                f"= **{v['ratio']:.3f}**; gradients + AdamW {v['states_measured'] / MIB:,.1f} / "
                                f"{v['states_counted'] / MIB:,.1f} MiB; the counted micro-batch alone "
                                f"{v['step_measured'] / MIB:,.1f} / {v['step_counted'] / MIB:,.1f} MiB = "
                                f"{v['step_ratio']:.3f}" for v in validation))
    if estimate_rows:
        sections.append(f"Count-model estimate (bf16, micro-batch 1, budget {estimate_budget_gib:g} GiB, peak over "
                        f"{draws} draws); paper: A100 80 GB.\n\n"
                        + render_estimates(estimate_rows, estimate_budget_gib))
    if notes:
        sections.append("Notes:\n" + "\n".join(f"- {n}" for n in notes))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.md").write_text("\n\n".join(sections) + "\n")
    strip = [dict(r) for r in rows]
    result = dict(machine=machine, setting=setting, kind=kind, budget_gib=memory_budget_gib, rows=strip,
                  cross_checks=checks, validation=validation, estimates=estimate_rows, notes=notes)
    (out / "memory.json").write_text(json.dumps(result, indent=2))
    plot_breakdown(rows, out / "memory_breakdown.png",
                   f"{model_name} shape, {dtype_name}, seq {seq_len}, micro-batch {micro_batch_size}: {kind} peak "
                   f"over {draws} DropBP draws\n{machine}")
    plot_longest(rows, estimate_rows, out / "memory_longest.png",
                 f"{model_name}: budget {memory_budget_gib:g} GiB, {kind}" +
                 (f"; estimates: {estimate_budget_gib:g} GiB, bf16" if estimate_rows else ""))
    print(f"\nMachine: {machine}\nSetting: {setting}\n\n{table}\n")
    for section in sections[4:]:
        print(section + "\n")
    print(f"wrote {out}/memory.md, .json, memory_breakdown.png, memory_longest.png "
          f"({time.perf_counter() - started:.0f} s)")
    return result


if __name__ == "__main__":
    run_cli(main)
