"""Deterministic, resumable, rank-sharded samplers and the train / test DataLoader builders.

Index encoding: :class:`TrainingSampler` yields ``epoch * size + i`` rather than ``i``, and
:class:`~dynaseg.data.dataset.InstanceDataset` decodes it with ``divmod``. The augmentation seed
therefore travels with the index into any worker process, with no shared state and no
``set_epoch`` calls, and a resumed run reproduces the uninterrupted run batch for batch.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from dynaseg.data.collate import BatchCollator
from dynaseg.data.dataset import derive_seed

__all__ = [
    "repeat_factors",
    "TrainingSampler",
    "GroupedBatchSampler",
    "InferenceSampler",
    "build_train_loader",
    "build_test_loader",
]


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def repeat_factors(
    categories_per_image: Sequence[Iterable[Hashable]], threshold: float
) -> list[float]:
    """Repeat-factor sampling (Gupta et al. 2019, LVIS §4.1): image ``i`` is repeated
    ``r_i = max over its categories c of max(1, sqrt(threshold / f_c))`` times per epoch, where
    ``f_c`` is the fraction of images containing ``c``; images without objects get 1.

    Args:
        categories_per_image: the (non-crowd) categories of each image.
        threshold: ``t``; categories in fewer than this fraction of the images are oversampled.
    """
    sets = [set(c) for c in categories_per_image]
    images_with: dict[Hashable, int] = {}
    for cats in sets:
        for c in cats:
            images_with[c] = images_with.get(c, 0) + 1
    per_category = {
        c: max(1.0, math.sqrt(threshold / (n / len(sets)))) for c, n in images_with.items()
    }
    return [max((per_category[c] for c in cats), default=1.0) for cats in sets]


class TrainingSampler(Sampler[int]):
    """Infinite stream of epoch-encoded indices ``epoch * size + i`` for one rank.

    Epoch ``e`` is a permutation of ``range(size)`` from a ``torch.Generator`` seeded with
    ``derive_seed(seed, e)`` (identical on every rank), padded by wrapping around to a multiple of
    ``world_size``; rank ``r`` takes ``perm[r::world_size]``, so ranks are disjoint within an epoch
    (up to the padding) and all get the same number of indices per epoch.

    With ``repeat`` (see :func:`repeat_factors`), epoch ``e`` first repeats image ``i``
    ``floor(r_i)`` times plus once more with probability ``r_i - floor(r_i)`` (same generator), so
    an epoch holds ``sum(r_i)`` indices on average.

    Args:
        size: dataset length.
        seed: shared by all ranks.
        rank, world_size: this process's shard.
        skip: indices of this rank's stream to skip (resume: ``start_iter * batch_size``).
        shuffle: False gives ``range(size)`` every epoch (no repeats).
        repeat: per-image repeat factors ``r_i >= 1``, or None.
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        skip: int = 0,
        shuffle: bool = True,
        repeat: Sequence[float] | None = None,
    ) -> None:
        if size <= 0:
            raise ValueError(f"TrainingSampler needs a non-empty dataset, got size={size}")
        _check_rank(rank, world_size)
        if repeat is not None and (len(repeat) != size or min(repeat) < 1):
            raise ValueError(f"repeat needs {size} factors >= 1")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.skip, self.shuffle = skip, shuffle
        self.repeat = None if repeat is None else torch.tensor(repeat, dtype=torch.float64)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's dataset indices (not encoded) for ``epoch``."""
        if not self.shuffle:
            perm = torch.arange(self.size)
        else:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            if self.repeat is None:
                perm = torch.randperm(self.size, generator=g)
            else:
                whole = self.repeat.floor()
                extra = (
                    torch.rand(self.size, generator=g, dtype=torch.float64) < self.repeat - whole
                )
                counts = (whole + extra).long()
                images = torch.repeat_interleave(torch.arange(self.size), counts)
                perm = images[torch.randperm(len(images), generator=g)]
        total = math.ceil(len(perm) / self.world_size) * self.world_size
        if total > len(perm):  # wrap around so every rank gets the same count
            perm = perm.repeat(math.ceil(total / len(perm)))[:total]
        return perm[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        epoch, offset = 0, self.skip
        indices = self.epoch_indices(epoch)
        while offset >= len(indices):  # resume: skip whole epochs (their lengths may differ)
            offset -= len(indices)
            epoch += 1
            indices = self.epoch_indices(epoch)
        while True:
            base = epoch * self.size
            for i in indices[offset:]:
                yield base + i
            epoch, offset = epoch + 1, 0
            indices = self.epoch_indices(epoch)


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices whose images share an aspect-ratio group.

    Indices from ``sampler`` go to the bucket ``group_ids[index % len(group_ids)]`` (the modulo
    undoes the epoch encoding); a full bucket is yielded as a batch. ``group_ids=None`` puts all in
    one bucket (plain chunking). Incomplete buckets left when a finite sampler ends are dropped.

    Args:
        sampler: index stream (usually an infinite :class:`TrainingSampler`).
        group_ids: group of each dataset image, e.g. 0 for w >= h and 1 for w < h.
        batch_size: per-rank batch size.
        skip_batches: batches to generate and discard first (resume with grouping: bucket state
            depends on the whole stream, so it is replayed; this reads indices only, no images).
    """

    def __init__(
        self,
        sampler: Iterable[int],
        group_ids: Sequence[int] | None,
        batch_size: int,
        *,
        skip_batches: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = None if group_ids is None else list(group_ids)
        self.batch_size = batch_size
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[list[int]]:
        buckets: dict[int, list[int]] = {}
        produced = 0
        n = len(self.group_ids) if self.group_ids is not None else 1
        for index in self.sampler:
            group = self.group_ids[index % n] if self.group_ids is not None else 0
            bucket = buckets.setdefault(group, [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                buckets[group] = []
                if produced >= self.skip_batches:
                    yield bucket
                produced += 1


class InferenceSampler(Sampler[int]):
    """Contiguous shard of ``range(size)`` for ``rank``, in order, no padding (shard sizes differ
    by at most one; concatenating the shards of ranks 0..world_size-1 gives ``range(size)``)."""

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1) -> None:
        _check_rank(rank, world_size)
        base, extra = divmod(size, world_size)
        self.start = rank * base + min(rank, extra)
        self.stop = self.start + base + (rank < extra)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def build_train_loader(
    dataset: Dataset,
    *,
    batch_size_per_rank: int,
    num_workers: int,
    aspect_ratio_grouping: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_iter: int = 0,
    size_divisibility: int = 32,
    repeat: Sequence[float] | None = None,
) -> DataLoader:
    """Infinite loader of :class:`~dynaseg.structures.Batch` for one rank.

    ``dataset`` must decode epoch-encoded indices (``InstanceDataset`` does) and, for grouping,
    provide ``aspect_ratios()``. With ``start_iter=k`` the first batch equals batch ``k`` of an
    uninterrupted run (same order, same augmentation). ``repeat``: per-image repeat factors
    (:func:`repeat_factors`).
    """
    size = len(dataset)  # type: ignore[arg-type]
    if aspect_ratio_grouping:
        group_ids = [0 if ar >= 1.0 else 1 for ar in dataset.aspect_ratios()]  # type: ignore[attr-defined]
        sampler = TrainingSampler(size, seed=seed, rank=rank, world_size=world_size, repeat=repeat)
        batches = GroupedBatchSampler(
            sampler, group_ids, batch_size_per_rank, skip_batches=start_iter
        )
    else:  # plain chunking: the sampler skips whole epochs, no batches replayed
        sampler = TrainingSampler(
            size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            skip=start_iter * batch_size_per_rank,
            repeat=repeat,
        )
        batches = GroupedBatchSampler(sampler, None, batch_size_per_rank)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=BatchCollator(size_divisibility),
        persistent_workers=num_workers > 0,
    )


def build_test_loader(
    dataset: Dataset,
    *,
    batch_size: int = 1,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    size_divisibility: int = 32,
) -> DataLoader:
    """Finite, ordered loader over this rank's contiguous shard of ``dataset``."""
    sampler = InferenceSampler(len(dataset), rank=rank, world_size=world_size)  # type: ignore[arg-type]
    batches = BatchSampler(sampler, batch_size, drop_last=False)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=BatchCollator(size_divisibility),
        persistent_workers=num_workers > 0,
    )
