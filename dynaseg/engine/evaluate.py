"""Run a model over a COCO split and compute box / mask AP (sharded across ranks)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dynaseg.config.schema import ExperimentConfig
from dynaseg.data.coco import load_coco_instances
from dynaseg.data.dataset import InstanceDataset
from dynaseg.data.samplers import build_test_loader
from dynaseg.data.transforms import build_test_transforms
from dynaseg.engine.checkpoint import atomic_write
from dynaseg.engine.distributed import all_gather_objects, get_rank, get_world_size, is_main_process
from dynaseg.evaluation.coco import CategoryMap, evaluate_coco, instances_to_coco_results
from dynaseg.evaluation.resolutions import format_resolution_table, resolution_statistics

__all__ = ["evaluate_model", "predict_coco_results"]

logger = logging.getLogger("dynaseg.eval")


@torch.no_grad()
def predict_coco_results(model: nn.Module, loader, category_map: CategoryMap, device: torch.device,
                         *, progress: bool = True) -> list[dict[str, Any]]:
    """COCO-format results of this rank's share of ``loader``."""
    was_training = model.training
    model.eval()
    results = []
    for batch in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True, mininterval=5):
        for instances, image_id in zip(model(batch.to(device)), batch.image_ids):
            per_image = instances_to_coco_results(instances.to("cpu"), image_id, category_map)
            sides = getattr(instances, "mask_resolutions", None)
            if sides is not None:   # two-stage detectors: which mask resolution each detection used
                for r, side in zip(per_image, sides.tolist()):
                    r["mask_resolution"] = side
            results += per_image
    model.train(was_training)
    return results


def evaluate_model(cfg: ExperimentConfig, model: nn.Module, device: torch.device,
                   output_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate on ``cfg.data.val_json``.

    The main process writes ``results_val.json`` (COCO results), ``metrics.json`` (AP, AP50, AP75,
    APs, APm, APl ×100 per IoU type) and ``metrics_per_class.json``; other ranks return {}.
    """
    data = load_coco_instances(cfg.data.val_json, cfg.data.val_images)
    dataset = InstanceDataset(data, build_test_transforms(cfg.data.min_size_test, cfg.data.max_size_test), train=False)
    loader = build_test_loader(dataset, batch_size=1, num_workers=min(cfg.data.num_workers, 2),
                               rank=get_rank(), world_size=get_world_size(),
                               size_divisibility=cfg.model.size_divisibility)
    category_map = CategoryMap.from_coco_json(cfg.data.val_json)
    results = predict_coco_results(model, loader, category_map, device, progress=is_main_process())
    gathered = [r for part in all_gather_objects(results) for r in part]
    if not is_main_process():
        return {}
    metrics = evaluate_coco(cfg.data.val_json, gathered, ("bbox", "segm"))
    if output_dir is not None:
        output_dir = Path(output_dir)
        atomic_write(output_dir / "results_val.json", lambda tmp: Path(tmp).write_text(json.dumps(gathered)))
        summary = {t: {k: v for k, v in m.items() if k != "per_class"} for t, m in metrics.items()}
        per_class = {t: m.get("per_class", {}) for t, m in metrics.items()}
        atomic_write(output_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
        atomic_write(output_dir / "metrics_per_class.json", lambda tmp: Path(tmp).write_text(json.dumps(per_class, indent=2)))
    if any("mask_resolution" in r for r in gathered):
        costs = model.mask_gmac_per_resolution() if hasattr(model, "mask_gmac_per_resolution") else None
        names = dict(zip(category_map.category_ids, category_map.names))
        metrics["mask_resolution"] = resolution_statistics(gathered, names, costs)
        logger.info("mask resolutions chosen:\n%s", format_resolution_table(metrics["mask_resolution"]))
        if output_dir is not None:
            text = json.dumps(metrics["mask_resolution"], indent=2)
            atomic_write(Path(output_dir) / "mask_resolutions.json", lambda tmp: Path(tmp).write_text(text))
    return metrics
