"""The training objective: next-token cross-entropy, and one micro-batch's forward and backward through it.

Training computes the head and the loss together, a chunk of tokens at a time (`chunked_next_token_loss`), so the
(B, T, vocab) logits, the log-probabilities the loss keeps and the logits' gradient never exist whole: at a 49k
vocabulary each is 192 KiB per token in fp32. Evaluation and generation use the full logits
(`next_token_loss(model(x), labels)`), which the chunked loss equals.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt.data import IGNORE_INDEX
from lit_gpt.lora import LoRALinear

CHUNK_ELEMENTS = 2**23  # logits per chunk: chunk tokens x vocab, 32 MiB in fp32 (170 tokens at a 49k vocabulary)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting token t+1 from position t, ignoring IGNORE_INDEX labels."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def chunked_next_token_loss(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                            chunk_size: int | None = None, recompute: bool = False) -> torch.Tensor:
    """`next_token_loss(model(x), labels)` from the final hidden states `hidden = model(x, return_hidden=True)`.

    The head and the cross-entropy run `chunk_size` tokens at a time (default: `CHUNK_ELEMENTS` logits per chunk),
    and each chunk's gradient is taken at once (see `_LinearCrossEntropy`), so no (tokens x vocab) tensor is kept.
    With `recompute`, the chunks' gradients are computed again by every backward instead
    (`_RecomputedLinearCrossEntropy`), so that the graph can be backpropagated several times (`retain_graph`), as
    DropBP's sensitivity calibration does. Heads it cannot split (a 4-bit base under QLoRA, LoRA with dropout on the
    head) get the full logits.
    """
    gpt = getattr(model, "module", model)  # the GPT inside Fabric's wrapper
    head = _head(gpt)
    if head is None:  # Fabric hands back fp32 hidden states under bf16-true: the head runs in the model's dtype
        return next_token_loss(gpt.lm_head(hidden.to(gpt.transformer.wte.weight.dtype)), labels)
    weight, lora_a, lora_b, scale = head
    # Every position, the last one with no target: the FLOPs stay those of the full head (lit_gpt/flops.py).
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    x = hidden.to(weight.dtype).reshape(-1, hidden.size(-1))
    chunk_size = chunk_size or max(1, CHUNK_ELEMENTS // weight.size(0))
    function = _RecomputedLinearCrossEntropy if recompute else _LinearCrossEntropy
    total = function.apply(x, weight, lora_a, lora_b, targets, scale, chunk_size)
    return total / (targets != IGNORE_INDEX).sum()


def chunk_tokens(model: nn.Module) -> int | None:
    """Tokens per chunk of `chunked_next_token_loss` on `model`, or None when its head gets the full logits."""
    head = _head(getattr(model, "module", model))
    return None if head is None else max(1, CHUNK_ELEMENTS // head[0].size(0))


def _head(gpt: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float] | None:
    """(weight, lora_A, lora_B, scale) of the model's head; the embedding table for tied models."""
    head = gpt.lm_head
    if head is None:
        return gpt.transformer.wte.weight, None, None, 0.0
    if type(head) is nn.Linear and head.bias is None:
        return head.weight, None, None, 0.0
    if isinstance(head, LoRALinear) and type(head.linear) is nn.Linear and head.linear.bias is None:
        if head.merged:
            return head.linear.weight, None, None, 0.0
        if isinstance(head.dropout, nn.Identity):
            return head.linear.weight, head.lora_A, head.lora_B, head.scale
    return None


class _LinearCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of logits `x W^T (+ scale x A^T B^T)` (LoRA) against `targets`, chunk by chunk.

    Each chunk's logits, in `x`'s dtype as the head computes them, go to fp32 for the log-sum-exp, as
    `next_token_loss` does; their gradient `softmax - onehot` is taken right away and multiplied into the
    gradients of `x`, `W`, `A` and `B`, which are kept (one (tokens x dim) tensor and weight-sized ones) until
    backward scales them by the incoming gradient. The matmuls are those of the full head's forward and backward,
    so measured FLOPs do not change; only gradients that some input needs are computed.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, targets, scale, chunk_size):
        grads = _empty_gradients(ctx.needs_input_grad, x, weight, lora_a, lora_b)
        total = torch.zeros((), device=x.device, dtype=torch.float32)
        for start in range(0, x.size(0), chunk_size):
            rows = slice(start, start + chunk_size)
            x_c, t_c = x[rows], targets[rows]
            logits, x_a = _chunk_logits(x_c, weight, lora_a, lora_b, scale)
            valid = t_c != IGNORE_INDEX
            t_c = t_c.clamp(min=0)[:, None]
            target_logits = logits.gather(1, t_c)
            lse = _softmax_in_place(logits)
            total += ((lse - target_logits).squeeze(1) * valid).sum()
            if not any(g is not None for g in grads):
                continue
            grad = _logits_gradient(logits, t_c, valid[:, None], x.dtype)
            _add_chunk_gradients(grad, x_c, x_a, rows, weight, lora_a, lora_b, scale, grads)
            del logits, grad  # before the next chunk's logits exist: one chunk at a time, not two
        ctx.grads = grads
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("the chunked loss's backward runs once (no retain_graph): use next_token_loss instead")
        grads, ctx.grads = ctx.grads, None  # ours alone, so scaled in place and handed over without a copy
        grads = [g.mul_(grad_total.to(g.dtype)) if g is not None else None for g in grads]
        return (*grads, None, None, None)


class _RecomputedLinearCrossEntropy(torch.autograd.Function):
    """`_LinearCrossEntropy` whose backward recomputes each chunk's logits and gradient and keeps nothing of its own.

    The forward keeps only each token's log-sum-exp, so the graph can be backpropagated any number of times
    (`retain_graph`), each backward taking only the gradients its inputs need. This costs the head's forward matmuls
    once more per backward: it is for sensitivity calibration, which backpropagates one forward many times; training
    takes the gradients during the forward (`_LinearCrossEntropy`).
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, targets, scale, chunk_size):
        total = torch.zeros((), device=x.device, dtype=torch.float32)
        lse = torch.empty((x.size(0), 1), device=x.device, dtype=torch.float32)
        for start in range(0, x.size(0), chunk_size):
            rows = slice(start, start + chunk_size)
            logits, _ = _chunk_logits(x[rows], weight, lora_a, lora_b, scale)
            t_c = targets[rows]
            valid = t_c != IGNORE_INDEX
            target_logits = logits.gather(1, t_c.clamp(min=0)[:, None])
            lse[rows] = _softmax_in_place(logits)
            total += ((lse[rows] - target_logits).squeeze(1) * valid).sum()
            del logits  # one chunk at a time
        ctx.save_for_backward(x, weight, lora_a, lora_b, targets, lse)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        x, weight, lora_a, lora_b, targets, lse = ctx.saved_tensors
        grads = _empty_gradients(ctx.needs_input_grad, x, weight, lora_a, lora_b)
        for start in range(0, x.size(0), ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            x_c, t_c = x[rows], targets[rows]
            logits, x_a = _chunk_logits(x_c, weight, lora_a, lora_b, ctx.scale)
            # The incoming gradient scales the mask, so every gradient comes out scaled.
            mask = (t_c != IGNORE_INDEX)[:, None] * grad_total.float()
            softmax = logits.sub_(lse[rows]).exp_()  # in place of the logits
            grad = _logits_gradient(softmax, t_c.clamp(min=0)[:, None], mask, x.dtype)
            _add_chunk_gradients(grad, x_c, x_a, rows, weight, lora_a, lora_b, ctx.scale, grads)
            del logits, softmax, grad  # one chunk at a time, as in the forward
        return (*grads, None, None, None)


def _empty_gradients(needs_input_grad, x, weight, lora_a, lora_b) -> list[torch.Tensor | None]:
    """The buffers the chunks' gradients are summed into, for the inputs that need one: x, W, A, B."""
    need_x, need_w, need_a, need_b = needs_input_grad[:4]
    return [torch.empty_like(x) if need_x else None, torch.zeros_like(weight) if need_w else None,
            torch.zeros_like(lora_a) if need_a else None, torch.zeros_like(lora_b) if need_b else None]


def _chunk_logits(x_c, weight, lora_a, lora_b, scale) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk's logits in fp32 (computed in `x_c`'s dtype, as the head does), and `x_c A^T` under LoRA."""
    logits = F.linear(x_c, weight)
    x_a = None
    if lora_a is not None:
        x_a = x_c.to(lora_a.dtype) @ lora_a.T
        logits = logits + ((x_a @ lora_b.T) * scale).to(logits.dtype)
    return logits.float(), x_a


def _softmax_in_place(logits: torch.Tensor) -> torch.Tensor:
    """Each row's log-sum-exp, the fp32 `logits` turned into their softmax in place.

    `torch.logsumexp` would hold a second logits-sized buffer inside its kernel (the exponentials), a chunk of
    fp32 logits more at the peak, and one that no count of tensors sees: here every step is an in-place op.
    """
    shift = logits.amax(dim=-1, keepdim=True)
    sums = logits.sub_(shift).exp_().sum(dim=-1, keepdim=True)
    logits.div_(sums)
    return sums.log_().add_(shift)


def _logits_gradient(softmax, t_c, mask, dtype) -> torch.Tensor:
    """(softmax - onehot(t_c)) * mask in `dtype`, computed in place of the fp32 softmax."""
    grad = softmax.scatter_add_(1, t_c, torch.full_like(t_c, -1.0, dtype=softmax.dtype)).mul_(mask)
    return grad.to(dtype)


def _add_chunk_gradients(grad, x_c, x_a, rows, weight, lora_a, lora_b, scale, grads) -> None:
    """Multiply a chunk's logits gradient into the gradients of x (its rows), W, A and B, those that are wanted."""
    grad_x, grad_w, grad_a, grad_b = grads
    if grad_x is not None:
        torch.matmul(grad, weight, out=grad_x[rows])
    if grad_w is not None:  # addmm with out=, not addmm_: FlopCounterMode counts the former only
        torch.addmm(grad_w, grad.T, x_c, out=grad_w)
    if lora_a is not None:
        grad_low = (grad.to(lora_b.dtype) @ lora_b) * scale  # the gradient of x A^T
        if grad_x is not None:
            grad_x[rows] += (grad_low @ lora_a).to(grad_x.dtype)
        if grad_a is not None:
            torch.addmm(grad_a, grad_low.T, x_c.to(lora_a.dtype), out=grad_a)
        if grad_b is not None:
            torch.addmm(grad_b, grad.T.to(lora_b.dtype), x_a, alpha=scale, out=grad_b)


def forward_backward(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, accumulation: int = 1,
                     backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                     skip_backward: Callable[[], bool] = lambda: False, chunked_loss: bool = True) -> torch.Tensor:
    """One training micro-batch: forward, loss, and `backward(loss / accumulation)`; returns the detached loss.

    With `chunked_loss` (the default) the head and the loss run a chunk of tokens at a time
    (`chunked_next_token_loss`); without it the model returns the full logits.

    The backward is skipped when the loss has no graph (nothing trainable was reached) or when `skip_backward()`
    says no trainable parameter can get a gradient (DropBP dropped every branch that holds one). The training
    loop and the benchmarks both run their micro-batches through here, so they time and count the same work.
    """
    if chunked_loss:
        loss = chunked_next_token_loss(model, model(input_ids, return_hidden=True), labels)
    else:
        loss = next_token_loss(model(input_ids), labels)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(loss.item())
    if loss.requires_grad and not skip_backward():
        backward(loss / accumulation)
    return loss.detach()


class NonFiniteLoss(ArithmeticError):
    """The loss became NaN or infinite; the loop turns it into a message naming the last good checkpoint."""

    def __init__(self, value: float) -> None:
        super().__init__(f"the training loss became {value}")
        self.value = value
