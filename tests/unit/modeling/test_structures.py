"""Instances and Batch: indexing keeps fields aligned, validation, concatenation."""

import pytest
import torch

from dynaseg.structures import Batch, Instances


def make(n=3, size=(4, 5)):
    return Instances(
        image_size=size,
        boxes=torch.arange(n * 4, dtype=torch.float32).view(n, 4),
        labels=torch.arange(n),
        scores=torch.linspace(0.9, 0.1, n),
        masks=torch.zeros(n, *size, dtype=torch.bool),
    )


def test_indexing_applies_to_every_field():
    inst = make()
    kept = inst[inst.scores > 0.4]
    assert len(kept) == 2 and kept.labels.tolist() == [0, 1] and kept.masks.shape == (2, 4, 5)
    assert inst[-1].labels.tolist() == [2] and inst[0].boxes.shape == (1, 4)
    assert inst[torch.tensor([2, 0])].labels.tolist() == [2, 0]


def test_length_mismatch_is_rejected():
    with pytest.raises(ValueError, match="labels has length 2"):
        Instances(
            image_size=(4, 4), boxes=torch.zeros(3, 4), labels=torch.zeros(2, dtype=torch.long)
        )
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        Instances(
            image_size=(4, 4), boxes=torch.zeros(3, 5), labels=torch.zeros(3, dtype=torch.long)
        )


def test_cat_and_empty():
    both = Instances.cat([make(2), make(3)])
    assert len(both) == 5 and both.masks.shape == (5, 4, 5)
    empty = Instances.empty((7, 8), with_scores=True, with_masks=True)
    assert len(empty) == 0 and empty.masks.shape == (0, 7, 8)
    with pytest.raises(ValueError, match="image sizes differ"):
        Instances.cat([make(1, (4, 5)), make(1, (5, 5))])


def test_batch_to_keeps_targets_and_memory_format():
    batch = Batch(
        images=torch.zeros(1, 3, 8, 8),
        image_sizes=[(8, 8)],
        original_sizes=[(16, 16)],
        image_ids=[1],
        targets=[make(1, (8, 8))],
    )
    moved = batch.to("cpu", memory_format=torch.channels_last)
    assert (
        moved.images.is_contiguous(memory_format=torch.channels_last) and len(moved.targets[0]) == 1
    )
