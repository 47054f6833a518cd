"""Shared test factories: small synthetic batches with two box-shaped instances per image."""

from __future__ import annotations

import torch

from dynaseg.structures import Batch, Instances
from dynaseg.structures.panoptic import IGNORE_LABEL


def make_batch(
    sizes: tuple[tuple[int, int], ...] = ((96, 128), (90, 117)),
    *,
    divisibility: int = 32,
    with_targets: bool = True,
    empty: bool = False,
    panoptic: bool = False,
    mask_inset: int = 0,
    odd_original: bool = False,
) -> Batch:
    """Random images (seed 1) padded to ``divisibility``; per image two boxes, [10, 8, 60, 50] and
    [40, 30, w−1, h−1], labels 0 and 1, masks filling each box (``mask_inset`` pixels left out on its
    left side, so masks and boxes differ). ``panoptic`` adds a semantic map: stuff 0 on the top half,
    stuff 1 below, instance pixels ignored. Original sizes are twice the input (plus one row with
    ``odd_original``)."""
    torch.manual_seed(1)
    hp = -(-max(h for h, _ in sizes) // divisibility) * divisibility
    wp = -(-max(w for _, w in sizes) // divisibility) * divisibility
    images = torch.zeros(len(sizes), 3, hp, wp)
    targets, sem = [], torch.full((len(sizes), hp, wp), IGNORE_LABEL)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.rand(3, h, w) * 255
        boxes = (
            torch.zeros(0, 4)
            if empty
            else torch.tensor([[10.0, 8.0, 60.0, 50.0], [40.0, 30.0, w - 1.0, h - 1.0]])
        )
        masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            m[y0:y1, x0 + mask_inset : x1] = True
        targets.append(
            Instances(
                image_size=(h, w), boxes=boxes, labels=torch.arange(len(boxes)) % 7, masks=masks
            )
        )
        sem[i, : h // 2, :w] = 0
        sem[i, h // 2 : h, :w] = 1
        if len(masks):
            sem[i, :h, :w][masks.any(0)] = IGNORE_LABEL
    return Batch(
        images=images,
        image_sizes=list(sizes),
        original_sizes=[(2 * h + int(odd_original), 2 * w) for h, w in sizes],
        image_ids=list(range(len(sizes))),
        targets=targets if with_targets else None,
        sem_seg=sem if panoptic else None,
    )
