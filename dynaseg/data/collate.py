"""Collate :class:`~dynaseg.data.dataset.Sample` lists into a padded :class:`~dynaseg.structures.Batch`."""

from __future__ import annotations

import torch

from dynaseg.data.dataset import Sample
from dynaseg.structures.batch import Batch
from dynaseg.structures.panoptic import IGNORE_LABEL

__all__ = ["BatchCollator"]


class BatchCollator:
    """``collate_fn``: images -> (B, 3, Hp, Wp) float32 in [0, 255], zero-padded at bottom/right.

    Targets stay at each image's own (h, w) (masks are not padded); ``image_sizes`` are the
    transformed sizes, ``original_sizes`` the on-disk ones. Semantic maps (``Sample.sem_seg``, panoptic
    data) are padded like the images, with ``IGNORE_LABEL`` (255), into ``Batch.sem_seg``
    (B, Hp, Wp) int64; it is None when the samples carry none. File names are not carried: map
    results back through ``image_ids``.
    """

    def __init__(self, size_divisibility: int = 32) -> None:
        self.size_divisibility = size_divisibility

    def __call__(self, samples: list[Sample]) -> Batch:
        if not samples:
            raise ValueError("BatchCollator got an empty list of samples")
        batch = Batch.from_images(
            [s.image for s in samples],
            size_divisibility=self.size_divisibility,
            original_sizes=[tuple(s.original_size) for s in samples],
            image_ids=[s.image_id for s in samples],
            targets=[s.target for s in samples],
        )
        batch.sem_seg = _pad_sem_seg(samples, batch.image_sizes, tuple(batch.images.shape[-2:]))
        return batch


def _pad_sem_seg(
    samples: list[Sample], sizes: list[tuple[int, int]], padded: tuple[int, int]
) -> torch.Tensor | None:
    """Each sample's (h, w) ``sem_seg`` into a (B, Hp, Wp) int64 map filled with IGNORE_LABEL; None
    when no sample has one."""
    present = [s.sem_seg is not None for s in samples]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(
            f"BatchCollator: {sum(present)} of {len(samples)} samples carry a sem_seg; "
            f"mixing panoptic and instance-only samples in a batch is not supported"
        )
    out = torch.full((len(samples), *padded), IGNORE_LABEL, dtype=torch.int64)
    for k, (s, (h, w)) in enumerate(zip(samples, sizes)):
        if tuple(s.sem_seg.shape) != (h, w):
            raise ValueError(
                f"BatchCollator: sem_seg of image id {s.image_id} is {tuple(s.sem_seg.shape)}, "
                f"its image is {(h, w)}"
            )
        out[k, :h, :w].copy_(s.sem_seg)
    return out
