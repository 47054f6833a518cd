"""Run a model over a COCO split and compute box / mask AP (sharded across ranks)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from dynaseg.config.schema import ExperimentConfig
from dynaseg.data.build import build_dataset, is_panoptic, load_split
from dynaseg.data.coco import read_coco_json
from dynaseg.data.samplers import build_test_loader
from dynaseg.evaluation.cityscapes import evaluate_cityscapes, is_cityscapes
from dynaseg.evaluation.coco import CategoryMap, evaluate_coco, instances_to_coco_results
from dynaseg.evaluation.panoptic import format_panoptic_table, pq_compute
from dynaseg.evaluation.panoptic_io import panoptic_to_coco
from dynaseg.evaluation.resolutions import format_resolution_table, resolution_statistics
from dynaseg.utils.comm import all_gather_objects, get_rank, get_world_size, is_main_process
from dynaseg.utils.files import atomic_write

__all__ = ["evaluate_model", "predict_coco_results", "predict_panoptic"]

logger = logging.getLogger("dynaseg.eval")


@torch.no_grad()
def predict_coco_results(
    model: nn.Module,
    loader,
    category_map: CategoryMap,
    device: torch.device,
    *,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """COCO-format results of this rank's share of ``loader``."""
    was_training = model.training
    model.eval()
    results = []
    for batch in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True, mininterval=5):
        for instances, image_id in zip(model(batch.to(device)), batch.image_ids):
            per_image = instances_to_coco_results(instances.to("cpu"), image_id, category_map)
            sides = getattr(instances, "mask_resolutions", None)
            if sides is not None:  # two-stage detectors: which mask resolution each detection used
                for r, side in zip(per_image, sides.tolist()):
                    r["mask_resolution"] = side
            results += per_image
    model.train(was_training)
    return results


@torch.no_grad()
def predict_panoptic(
    model: nn.Module,
    loader,
    *,
    thing_category_ids: list[int],
    stuff_category_ids: list[int],
    category_map: CategoryMap,
    png_dir: Path,
    device: torch.device,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """This rank's share of a panoptic model's predictions: PNGs written to ``png_dir``; returns
    (COCO panoptic annotations, COCO instance results of the thing detections)."""
    was_training = model.training
    model.eval()
    annotations, results = [], []
    for batch in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True, mininterval=5):
        for pan, image_id in zip(model(batch.to(device)), batch.image_ids):
            pan = dataclasses.replace(pan, ids=pan.ids.cpu())
            png, ann = panoptic_to_coco(
                pan,
                image_id=image_id,
                file_name=f"{image_id}.png",
                thing_category_ids=thing_category_ids,
                stuff_category_ids=stuff_category_ids,
            )
            Image.fromarray(png).save(png_dir / ann["file_name"])
            annotations.append(ann)
            if pan.instances is not None:
                results += instances_to_coco_results(
                    pan.instances.to("cpu"), image_id, category_map
                )
    model.train(was_training)
    return annotations, results


def _evaluate_panoptic(
    cfg: ExperimentConfig, model: nn.Module, device: torch.device, output_dir: Path | None
) -> dict[str, Any]:
    """PQ on the panoptic val split (+ box / mask AP of the thing detections on ``data.val_json``)."""
    data = load_split(cfg, "val")
    loader = build_test_loader(
        build_dataset(cfg, data, train=False),
        batch_size=1,
        num_workers=min(cfg.data.num_workers, 2),
        rank=get_rank(),
        world_size=get_world_size(),
        size_divisibility=cfg.model.size_divisibility,
    )
    category_map = CategoryMap(category_ids=data.category_ids, names=data.class_names)
    # Every rank writes its PNGs into one folder of the run (periodic evaluations overwrite theirs).
    folder = output_dir if output_dir is not None else Path(cfg.output_dir) / "periodic_eval"
    png_dir = folder / "panoptic_val"
    png_dir.mkdir(parents=True, exist_ok=True)
    annotations, results = predict_panoptic(
        model,
        loader,
        thing_category_ids=data.category_ids,
        stuff_category_ids=data.stuff_category_ids,
        category_map=category_map,
        png_dir=png_dir,
        device=device,
        progress=is_main_process(),
    )
    annotations = [a for part in all_gather_objects(annotations) for a in part]
    results = [r for part in all_gather_objects(results) for r in part]
    if not is_main_process():
        return {}
    categories = json.loads(Path(cfg.data.panoptic_val_json).read_text())["categories"]
    pred_json = folder / "panoptic_val.json"
    atomic_write(
        pred_json,
        lambda t: Path(t).write_text(
            json.dumps({"annotations": annotations, "categories": categories})
        ),
    )
    panoptic = pq_compute(cfg.data.panoptic_val_json, cfg.data.panoptic_val_dir, pred_json, png_dir)
    logger.info("panoptic quality:\n%s", format_panoptic_table(panoptic))
    metrics: dict[str, Any] = {"panoptic": panoptic}
    if cfg.data.val_json and Path(cfg.data.val_json).is_file():
        metrics |= evaluate_coco(cfg.data.val_json, results, ("bbox", "segm", "boundary"))
    if output_dir is not None:
        atomic_write(
            output_dir / "results_val.json", lambda tmp: Path(tmp).write_text(json.dumps(results))
        )
    return metrics


def _write_metrics(output_dir: Path, metrics: dict[str, Any]) -> None:
    """``metrics.json`` (summaries) and ``metrics_per_class.json`` (the per-class parts)."""
    summary = {t: {k: v for k, v in m.items() if k != "per_class"} for t, m in metrics.items()}
    per_class = {t: m.get("per_class", {}) for t, m in metrics.items()}
    atomic_write(
        output_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2))
    )
    atomic_write(
        output_dir / "metrics_per_class.json",
        lambda tmp: Path(tmp).write_text(json.dumps(per_class, indent=2)),
    )


def evaluate_model(
    cfg: ExperimentConfig,
    model: nn.Module,
    device: torch.device,
    output_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate on the val split: box / mask AP on ``cfg.data.val_json``, and for panoptic models
    PQ / SQ / RQ on ``cfg.data.panoptic_val_json`` (``metrics["panoptic"]``).

    The main process writes ``results_val.json`` (COCO results), ``metrics.json`` (AP, AP50, AP75,
    APs, APm, APl ×100 per IoU type; PQ, SQ, RQ, N for All / Things / Stuff), ``metrics_per_class.json``
    and, for panoptic models, the predicted ``panoptic_val.json`` + ``panoptic_val/*.png``; other
    ranks return {}.
    """
    output_dir = Path(output_dir) if output_dir is not None else None
    if is_panoptic(cfg):
        metrics = _evaluate_panoptic(cfg, model, device, output_dir)
        if metrics and output_dir is not None:
            _write_metrics(output_dir, metrics)
        return metrics
    gt = read_coco_json(cfg.data.val_json)  # parsed once: dataset, category map, evaluation
    data = load_split(cfg, "val", parsed=gt)
    loader = build_test_loader(
        build_dataset(cfg, data, train=False),
        batch_size=1,
        num_workers=min(cfg.data.num_workers, 2),
        rank=get_rank(),
        world_size=get_world_size(),
        size_divisibility=cfg.model.size_divisibility,
    )
    category_map = CategoryMap.from_coco_json(gt)
    results = predict_coco_results(model, loader, category_map, device, progress=is_main_process())
    gathered = [r for part in all_gather_objects(results) for r in part]
    if not is_main_process():
        return {}
    box_only = bool(gathered) and not any(
        "segmentation" in r for r in gathered
    )  # detectors without masks
    metrics = evaluate_coco(
        gt,
        gathered,
        ("bbox",) if box_only else ("bbox", "segm", "boundary"),
        dataset_format=cfg.data.format,
    )
    if not box_only and is_cityscapes(gt):  # the official metric of Cityscapes' benchmark
        metrics["cityscapes"] = evaluate_cityscapes(gt, gathered)
    if output_dir is not None:
        atomic_write(
            output_dir / "results_val.json", lambda tmp: Path(tmp).write_text(json.dumps(gathered))
        )
        _write_metrics(output_dir, metrics)
    if any("mask_resolution" in r for r in gathered):
        costs = (
            model.mask_gmac_per_resolution() if hasattr(model, "mask_gmac_per_resolution") else None
        )
        names = dict(zip(category_map.category_ids, category_map.names))
        groups = dict(zip(category_map.category_ids, category_map.supercategories))
        metrics["mask_resolution"] = resolution_statistics(
            gathered, names, costs, category_groups=groups if any(groups.values()) else None
        )
        logger.info(
            "mask resolutions chosen:\n%s", format_resolution_table(metrics["mask_resolution"])
        )
        if output_dir is not None:
            text = json.dumps(metrics["mask_resolution"], indent=2)
            atomic_write(
                Path(output_dir) / "mask_resolutions.json", lambda tmp: Path(tmp).write_text(text)
            )
    return metrics
