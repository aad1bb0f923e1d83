"""A shuffling sampler that shards over ranks and can start part-way into an epoch (for resume)."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Order = f(seed, epoch), like DistributedSampler (padded so every rank gets as many
    samples); ``set_epoch(epoch, skip)`` drops this rank's first ``skip`` samples."""

    def __init__(self, length: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if length < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.length, self.shuffle, self.seed, self.rank, self.world = length, shuffle, seed, rank, world_size
        self.per_rank = math.ceil(length / world_size)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.world
        order = (order * math.ceil(total / self.length))[:total]
        return iter(order[self.rank::self.world][self.skip:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.skip)
