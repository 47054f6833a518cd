"""Config → dataset: COCO instances, or COCO panoptic for models with stuff classes."""

from __future__ import annotations

from typing import Any, Literal

from dynaseg.config.overrides import ConfigError
from dynaseg.config.schema import ExperimentConfig, num_stuff_classes
from dynaseg.data.coco import CocoInstances, DatasetError, load_coco_instances
from dynaseg.data.coco_panoptic import CocoPanoptic, load_coco_panoptic
from dynaseg.data.dataset import InstanceDataset
from dynaseg.data.panoptic_dataset import PanopticDataset
from dynaseg.data.transforms import build_test_transforms, build_train_transforms

__all__ = ["is_panoptic", "load_split", "build_dataset", "dataset_metadata"]


def is_panoptic(cfg: ExperimentConfig) -> bool:
    """Whether the model predicts stuff classes too (and so trains and evaluates on panoptic data)."""
    return num_stuff_classes(cfg.model) > 0


def load_split(
    cfg: ExperimentConfig, split: Literal["train", "val"], *, parsed: dict[str, Any] | None = None
) -> CocoInstances | CocoPanoptic:
    """The validated annotations of a split; checks the class counts against the model.

    parsed: the instances JSON of the split already read (``read_coco_json``), to parse it once.
    """
    d = cfg.data
    images = d.train_images if split == "train" else d.val_images
    if is_panoptic(cfg):
        json_path = d.panoptic_train_json if split == "train" else d.panoptic_val_json
        data: CocoInstances | CocoPanoptic = load_coco_panoptic(
            json_path, images, d.panoptic_train_dir if split == "train" else d.panoptic_val_dir
        )
        if data.num_stuff_classes != cfg.model.num_stuff_classes:  # type: ignore[union-attr]
            raise DatasetError(
                f"{json_path}: {data.num_stuff_classes} stuff categories but model.num_stuff_classes="
                f"{cfg.model.num_stuff_classes}; set model.num_stuff_classes={data.num_stuff_classes}"
            )
    else:
        json_path = d.train_json if split == "train" else d.val_json
        data = load_coco_instances(json_path, images, parsed=parsed, dataset_format=d.format)
    if data.num_classes != cfg.model.num_classes:
        raise DatasetError(
            f"{json_path}: {data.num_classes} thing categories but model.num_classes="
            f"{cfg.model.num_classes}; set model.num_classes={data.num_classes}"
        )
    return data


def build_dataset(
    cfg: ExperimentConfig, data: CocoInstances | CocoPanoptic, *, train: bool
) -> InstanceDataset:
    """The map-style dataset over ``data`` with the config's train or test transforms.

    ``data.on_error`` decides what an unreadable image does: "stop" raises, "skip" reports it once
    and uses the next readable image in training, a blank image (ground truth still counted) in
    evaluation; see :mod:`dynaseg.data.dataset`.
    """
    d = cfg.data
    for key in ("num_workers", "image_cache_gb"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key}: must be >= 0, got {getattr(d, key)}")
    if not data.records:
        raise DatasetError(
            f"{data.json_path}: 'images' is empty, nothing to {'train' if train else 'evaluate'} on"
        )
    transforms = (
        build_train_transforms(d.min_size_train, d.max_size_train, d.hflip_prob)
        if train
        else build_test_transforms(d.min_size_test, d.max_size_test)
    )
    max_instances = d.max_instances if train else 0
    cls = PanopticDataset if isinstance(data, CocoPanoptic) else InstanceDataset
    return cls(
        data,
        transforms,
        train=train,
        max_instances=max_instances,
        seed=cfg.seed,  # type: ignore[arg-type]
        on_error=d.on_error,
        image_cache_bytes=int(d.image_cache_gb * 2**30) if train else 0,
    )


def dataset_metadata(data: CocoInstances | CocoPanoptic) -> dict:
    """Class names and COCO ids stored with the weights (stuff ones for panoptic data)."""
    meta = {"class_names": data.class_names, "category_ids": data.category_ids}
    if isinstance(data, CocoPanoptic):
        meta |= {"stuff_names": data.stuff_names, "stuff_category_ids": data.stuff_category_ids}
    return meta
