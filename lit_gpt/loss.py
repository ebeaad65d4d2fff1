"""The training objective: next-token cross-entropy, and one micro-batch's forward and backward through it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt.data import IGNORE_INDEX


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting token t+1 from position t, ignoring IGNORE_INDEX labels."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def forward_backward(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, accumulation: int = 1,
                     backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                     skip_backward: Callable[[], bool] = lambda: False) -> torch.Tensor:
    """One training micro-batch: forward, loss, and `backward(loss / accumulation)`; returns the detached loss.

    The backward is skipped when the loss has no graph (nothing trainable was reached) or when `skip_backward()`
    says no trainable parameter can get a gradient (DropBP dropped every branch that holds one). The training
    loop and the benchmarks both run their micro-batches through here, so they time and count the same work.
    """
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
