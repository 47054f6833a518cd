"""Data pipeline, serving samples: dataset, collation, samplers and loaders, build_dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from coco_cases import write_coco

from dynaseg.data.coco import DatasetError, load_coco_instances
from dynaseg.data.collate import BatchCollator
from dynaseg.data.dataset import InstanceDataset, rasterize_masks
from dynaseg.data.image_io import ImageReadError
from dynaseg.data.samplers import (
    GroupedBatchSampler,
    InferenceSampler,
    TrainingSampler,
    build_test_loader,
    build_train_loader,
)
from dynaseg.data.transforms import (
    build_test_transforms,
    build_train_transforms,
    resized_shape,
)


def _mask_box(mask: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


# ----------------------------------------------------------------------------- dataset


def test_dataset_sample_and_masks(coco):
    ds = InstanceDataset(load_coco_instances(*coco), None, train=True)
    s = ds[1]  # 64x48 portrait, polygon + RLE, no transforms
    assert s.image.shape == (3, 64, 48) and s.image.dtype == torch.uint8
    assert s.original_size == (64, 48) and s.image_id == 101 and s.file_name.endswith("101.png")
    t = s.target
    assert (
        t.image_size == (64, 48) and t.labels.tolist() == [1, 0] and t.boxes.dtype == torch.float32
    )
    assert t.masks.shape == (2, 64, 48) and t.masks.dtype == torch.bool
    for m, b in zip(t.masks, t.boxes):
        assert (torch.tensor(_mask_box(m), dtype=torch.float32) - b).abs().max() <= 1
    assert (s.image[0][t.masks.any(0)] == 255).float().mean() > 0.9
    assert len(ds[0].target) == 2  # crowd annotation excluded
    empty = ds[4]
    assert len(empty.target) == 0 and empty.target.masks.shape == (0, 50, 50)
    assert empty.target.boxes.shape == (0, 4)


def test_dataset_empty_image_after_transforms(coco):
    ds = InstanceDataset(
        load_coco_instances(*coco), build_train_transforms((32, 40), 90, 0.5), train=True
    )
    s = ds[4]
    h, w = s.image.shape[-2:]
    assert s.target.masks.shape == (0, h, w) and s.target.image_size == (h, w)


def test_dataset_max_instances_keeps_largest(coco):
    ds = InstanceDataset(load_coco_instances(*coco), None, train=True, max_instances=1)
    t = ds[0].target  # 48x64: first rect 28x18=504, second 24x20=480
    assert len(t) == 1 and t.boxes[0].tolist() == [4.0, 6.0, 32.0, 24.0]
    assert (
        len(
            InstanceDataset(load_coco_instances(*coco), None, train=False, max_instances=1)[
                0
            ].target
        )
        == 2
    )


def test_dataset_reproducible_augmentation(coco):
    inst = load_coco_instances(*coco)
    tf = build_train_transforms((24, 32, 40, 48, 56), 200, 0.5)
    a, b = (
        InstanceDataset(inst, tf, train=True, seed=3),
        InstanceDataset(inst, tf, train=True, seed=3),
    )
    torch.manual_seed(123)  # global RNG state must not matter ...
    first = [a[i].image for i in range(12)]
    rng_after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), rng_after)  # ... and must not be consumed
    second = [b[i].image for i in reversed(range(12))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    # epoch encoding == set_epoch; different epochs augment differently
    b.set_epoch(1)
    assert torch.equal(a[len(a) + 2].image, b[2].image)
    assert any(not (x.shape == y.shape and torch.equal(x, y)) for x, y in zip(first[:6], first[6:]))


def test_dataset_image_cache(coco, monkeypatch: pytest.MonkeyPatch):
    """Cached images are decoded once, up to the byte limit, and augment as decoded ones do."""
    import dynaseg.data.dataset as dataset_module

    inst = load_coco_instances(*coco)
    tf = build_train_transforms((24, 40, 56), 200, 0.5)
    reads: list[str] = []
    read = dataset_module.read_image
    monkeypatch.setattr(
        dataset_module, "read_image", lambda path, size: reads.append(path) or read(path, size)
    )
    records = inst.records
    room = sum(3 * r.height * r.width for r in records[:2])  # the first two, not the third
    plain = InstanceDataset(inst, tf, train=True, seed=3)
    cached = InstanceDataset(inst, tf, train=True, seed=3, image_cache_bytes=room)
    n = len(records)
    expected = [plain[k] for k in range(3 * n)]  # three epochs
    reads.clear()
    got = [cached[k] for k in range(3 * n)]
    for x, y in zip(expected, got):  # an in-place transform would change epochs 2 and 3
        assert torch.equal(x.image, y.image)
        assert torch.equal(x.target.masks, y.target.masks)
    names = [r.file_name for r in records]
    assert reads == names + names[2:] + names[2:]
    with pytest.raises(ValueError, match="image_cache_bytes must be >= 0"):
        InstanceDataset(inst, tf, train=True, image_cache_bytes=-1)


def test_dataset_read_error_propagates(coco, tmp_path: Path):
    inst = load_coco_instances(*coco)
    Path(inst.records[2].file_name).write_bytes(b"garbage")
    ds = InstanceDataset(inst, None, train=True)
    with pytest.raises(ImageReadError, match="102.png"):
        ds[2]
    it = iter(build_test_loader(ds, batch_size=3, num_workers=1))
    with pytest.raises(
        ImageReadError, match=r"102\.png: cannot read image"
    ):  # type survives workers
        next(it)
    # The re-raised exception's traceback holds the iterator in a reference cycle; finalised by the
    # GC it waits 5 s for its worker, so shut it down explicitly.
    it._shutdown_workers()


def test_rasterize_uncompressed_rle():
    from dynaseg.data.coco import AnnotationRecord

    rle = {"size": [4, 5], "counts": [5, 3, 12]}  # column-major: column 1, rows 1..3
    m = rasterize_masks([AnnotationRecord(0, (1, 1, 2, 4), rle, False)], 4, 5)
    assert m.shape == (1, 4, 5) and m.sum() == 3 and m[0, 1:4, 1].all()


# ----------------------------------------------------------------------------- collate


def test_collate_padding(coco):
    ds = InstanceDataset(load_coco_instances(*coco), None, train=False)
    batch = BatchCollator(size_divisibility=32)([ds[0], ds[1], ds[2]])
    assert batch.images.shape == (3, 3, 64, 96) and batch.images.dtype == torch.float32
    assert batch.image_sizes == [(48, 64), (64, 48), (40, 70)]
    assert batch.original_sizes == batch.image_sizes and batch.image_ids == [100, 101, 102]
    assert torch.equal(batch.images[1, :, :64, :48], ds[1].image.float())
    assert batch.images[1, :, 64:].abs().sum() == 0 and batch.images[1, :, :, 48:].abs().sum() == 0
    assert [t.masks.shape[-2:] for t in batch.targets] == [(48, 64), (64, 48), (40, 70)]
    assert BatchCollator(0)([ds[2]]).images.shape == (1, 3, 40, 70)


# ----------------------------------------------------------------------------- samplers


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_training_sampler_sharding_and_determinism():
    n, ws = 10, 3
    streams = [_take(iter(TrainingSampler(n, seed=5, rank=r, world_size=ws)), 8) for r in range(ws)]
    assert streams[0] == _take(iter(TrainingSampler(n, seed=5, rank=0, world_size=ws)), 8)
    assert streams[0] != _take(iter(TrainingSampler(n, seed=6, rank=0, world_size=ws)), 8)
    per_rank = 4  # ceil(10 / 3), padded to 12
    epoch0 = [i for s in streams for i in s[:per_rank]]
    assert set(epoch0) == set(range(n)) and len(epoch0) == 12
    epoch1 = [i for s in streams for i in s[per_rank:]]
    assert all(n <= i < 2 * n for i in epoch1) and set(epoch1) == set(range(n, 2 * n))
    # divisible case: exactly disjoint
    parts = [TrainingSampler(12, seed=1, rank=r, world_size=4).epoch_indices(0) for r in range(4)]
    assert sorted(sum(parts, [])) == list(range(12))
    full = _take(iter(TrainingSampler(n, seed=5, rank=1, world_size=ws)), 20)
    assert _take(iter(TrainingSampler(n, seed=5, rank=1, world_size=ws, skip=7)), 13) == full[7:]


def test_grouped_batch_sampler_groups():
    groups = [0, 1, 0, 1, 1, 0, 0]
    batches = _take(iter(GroupedBatchSampler(TrainingSampler(7, seed=0), groups, 3)), 10)
    for b in batches:
        assert len(b) == 3 and len({groups[i % 7] for i in b}) == 1
    resumed = _take(
        iter(GroupedBatchSampler(TrainingSampler(7, seed=0), groups, 3, skip_batches=4)), 6
    )
    assert resumed == batches[4:]


def test_inference_sampler():
    shards = [list(InferenceSampler(10, rank=r, world_size=4)) for r in range(4)]
    assert shards == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [len(InferenceSampler(2, rank=r, world_size=4)) for r in range(4)] == [1, 1, 0, 0]


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("grouping", [True, False])
def test_train_loader_resume(coco, grouping):
    ds = InstanceDataset(
        load_coco_instances(*coco),
        build_train_transforms((24, 32, 40), 80, 0.5),
        train=True,
        seed=1,
    )
    kw = dict(
        batch_size_per_rank=2,
        num_workers=0,
        aspect_ratio_grouping=grouping,
        seed=4,
        size_divisibility=16,
    )
    fresh = _batches(build_train_loader(ds, **kw), 9)
    resumed = _batches(build_train_loader(ds, start_iter=5, **kw), 4)
    for a, b in zip(fresh[5:], resumed):
        assert a.image_ids == b.image_ids and a.image_sizes == b.image_sizes
        assert torch.equal(a.images, b.images)
        assert all(
            torch.equal(x.masks, y.masks) and torch.equal(x.boxes, y.boxes)
            for x, y in zip(a.targets, b.targets)
        )
    for b in fresh:
        assert b.images.shape[-1] % 16 == 0 and b.images.shape[-2] % 16 == 0
        if grouping:
            assert len({h > w for h, w in b.original_sizes}) == 1
    assert len({tuple(b.image_ids) for b in fresh}) > 1


def test_train_loader_workers_match_main_process(coco):
    ds = InstanceDataset(
        load_coco_instances(*coco),
        build_train_transforms((24, 32, 40), 80, 0.5),
        train=True,
        seed=2,
    )
    kw = dict(batch_size_per_rank=2, aspect_ratio_grouping=True, seed=0, rank=1, world_size=2)
    main = _batches(build_train_loader(ds, num_workers=0, **kw), 5)
    workers = _batches(build_train_loader(ds, num_workers=2, **kw), 5)
    for a, b in zip(main, workers):
        assert a.image_ids == b.image_ids and torch.equal(a.images, b.images)


def test_test_loader(coco):
    ds = InstanceDataset(load_coco_instances(*coco), build_test_transforms(32, 60), train=False)
    ids = []
    for rank in range(2):
        for batch in build_test_loader(
            ds, batch_size=2, rank=rank, world_size=2, size_divisibility=8
        ):
            ids += batch.image_ids
            for (h, w), (oh, ow) in zip(batch.image_sizes, batch.original_sizes):
                assert (h, w) == resized_shape(oh, ow, 32, 60)
    assert ids == list(range(100, 106))


@pytest.mark.parametrize("key", ["num_workers", "image_cache_gb"])
def test_build_dataset_refuses_negative_loader_settings(coco, key: str):
    from dynaseg.config.overrides import ConfigError
    from dynaseg.config.presets import load_config
    from dynaseg.data.build import build_dataset

    cfg = load_config("blendmask_tiny", [f"data.{key}=-1"])
    with pytest.raises(ConfigError, match=rf"data\.{key}: must be >= 0, got -1"):
        build_dataset(cfg, load_coco_instances(*coco), train=True)


def test_build_dataset_refuses_empty_split(tmp_path: Path):
    from dynaseg.config.presets import load_config
    from dynaseg.data.build import build_dataset

    path = write_coco(tmp_path, [], [])
    data = load_coco_instances(path, tmp_path)
    cfg = load_config("blendmask_tiny", [])
    for train, what in ((True, "train"), (False, "evaluate")):
        with pytest.raises(
            DatasetError, match=rf"ann\.json: 'images' is empty, nothing to {what} on"
        ):
            build_dataset(cfg, data, train=train)
