"""Which samples each micro-batch holds: a pure function of (seed, index), so a resumed run sees the same data."""

from __future__ import annotations

import math

import torch

from lit_gpt.data import collate, micro_batches
from lit_gpt.utils import UserError


class MicroBatchStream:
    """The i-th micro-batch of this rank, for any i.

    Every epoch is reshuffled from (seed, epoch); rank r takes micro-batches r, r + W, r + 2W, ... of it.
    """

    def __init__(self, dataset: list[dict], micro_batch_size: int, max_seq_length: int, seed: int,
                 length_grouped: bool, rank: int = 0, world_size: int = 1) -> None:
        self.dataset, self.micro_batch_size, self.max_seq_length = dataset, micro_batch_size, max_seq_length
        self.seed, self.length_grouped, self.rank, self.world_size = seed, length_grouped, rank, world_size
        self.lengths = [min(len(s["input_ids"]), max_seq_length) for s in dataset]
        self.per_epoch = math.ceil(len(dataset) / micro_batch_size) // world_size
        if self.per_epoch == 0:
            raise UserError(f"the training set has {len(dataset)} samples: too few for micro-batches of "
                            f"{micro_batch_size} on {world_size} devices")
        self._epoch, self._batches = -1, []

    @property
    def mean_length(self) -> int:
        """The mean training length in tokens, which the cost model prices a typical micro-batch at."""
        return max(1, round(sum(self.lengths) / len(self.lengths)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = micro_batches(self.lengths, self.micro_batch_size, self.seed, epoch, self.length_grouped)
        return self.collate(self._batches[position * self.world_size + self.rank])

    def random_batch(self, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of `size` samples drawn from (seed) alike on every rank, never from the global RNG."""
        size = max(size, self.world_size)
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(self.dataset), generator=generator)[:size].tolist()
        return self.collate(indices[self.rank::self.world_size])

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return collate([truncate(self.dataset[i], self.max_seq_length) for i in indices])


def truncate(sample: dict, max_seq_length: int) -> dict:
    return {k: v[:max_seq_length] for k, v in sample.items()}
