"""A shuffling sampler that shards over ranks and can start part-way into an epoch (for resume)."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Order = f(seed, epoch), like DistributedSampler (padded so every rank gets as many
    samples); ``set_epoch(epoch, skip)`` drops this rank's first ``skip`` samples.

    ``repeats`` > 1 is DeiT's repeated augmentation (``RASampler``): every index of the shuffled
    order appears ``repeats`` times in a row, consecutive copies go to consecutive ranks (each copy
    gets its own random augmentation), and an epoch still has ``ceil(length / world_size)`` samples
    per rank, i.e. about 1/repeats of the distinct images. Copy ``k`` of index ``i`` is yielded as
    ``i + k * length``: the dataset must map it back (``index % length``), and can use it to give
    each copy its own augmentation (as :class:`piip.data.ImageClassification` does)."""

    def __init__(self, length: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 repeats: int = 1) -> None:
        if length < 1:
            raise ValueError("cannot sample from an empty dataset")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.repeats = repeats
        self.length, self.shuffle, self.seed, self.rank, self.world = length, shuffle, seed, rank, world_size
        self.per_rank = math.ceil(length / world_size)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def global_order(self) -> list[int]:
        """This epoch's order over all ranks before padding and sharding (subclasses may group it)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        if self.repeats > 1:
            order = [i + k * self.length for i in order for k in range(self.repeats)]
        return order

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        total = self.per_rank * self.world
        order = (order * math.ceil(total / len(order)))[:total]
        return iter(order[self.rank::self.world][self.skip:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.skip)
