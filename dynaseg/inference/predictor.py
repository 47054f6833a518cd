"""``Predictor(cfg, weights)(image) -> Instances | PanopticSegmentation``: the Python inference API."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors

from dynaseg.config.presets import load_config
from dynaseg.config.schema import ExperimentConfig, num_stuff_classes
from dynaseg.data.image_io import read_image
from dynaseg.data.transforms import build_test_transforms
from dynaseg.engine.checkpoint import load_weights, read_metadata
from dynaseg.engine.distributed import init_distributed
from dynaseg.inference.optimize import optimize_for_inference
from dynaseg.modeling.build import build_model
from dynaseg.structures import Batch, Instances
from dynaseg.structures.panoptic import PanopticSegmentation

__all__ = ["Predictor", "stuff_categories"]


class Predictor:
    """Load a trained model once and segment images with it.

    Args:
        cfg: an :class:`ExperimentConfig`, a preset name or a YAML path (e.g. a run's ``config.yaml``).
        weights: ``model_final.safetensors`` (or any state dict file of the same model).
        device: "auto", "cpu" or "cuda[:N]".

    The model is prepared for inference as ``cfg.inference`` asks (norms folded into convolutions by
    default; optional autocast and ``torch.compile`` of the dense parts), so ``model`` is no longer a
    training module: its state dict keys may differ from the weights file.

    Calling it with a path, an (H, W, 3) uint8 RGB array or a (3, H, W) uint8 tensor returns, on
    the CPU and at the image's size, what the model returns:

    * instance models: :class:`Instances` with boxes, labels, scores and (N, H, W) bool masks,
      sorted by score;
    * panoptic models (``is_panoptic``): a :class:`PanopticSegmentation`, (H, W) segment ids plus
      its segments and the thing detections they came from.

    ``class_names`` / ``category_ids`` map (thing) labels to names / COCO category ids;
    ``stuff_names`` / ``stuff_category_ids`` do the same for stuff labels (from the weights'
    metadata; empty when it has none).
    """

    def __init__(
        self, cfg: ExperimentConfig | str, weights: str | Path, *, device: str = "auto"
    ) -> None:
        cfg = load_config(cfg) if isinstance(cfg, str) else cfg
        self.cfg = cfg
        self.device = init_distributed(device if device != "auto" else cfg.device)
        self.model = build_model(cfg.model, pretrained=False)  # the weights come from ``weights``
        load_weights(self.model, weights)
        self.memory_format = (
            torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        )
        self.model.to(self.device, memory_format=self.memory_format).eval()
        optimize_for_inference(self.model, **dataclasses.asdict(self.cfg.inference))
        meta = read_metadata(weights)
        self.class_names: list[str] = list(
            meta.get("class_names") or [f"class_{i}" for i in range(self.cfg.model.num_classes)]
        )
        self.category_ids: list[int] = list(
            meta.get("category_ids") or range(1, self.cfg.model.num_classes + 1)
        )
        self.stuff_names: list[str] = list(meta.get("stuff_names") or [])
        self.stuff_category_ids: list[int] = list(meta.get("stuff_category_ids") or [])
        self._transform = build_test_transforms(
            self.cfg.data.min_size_test, self.cfg.data.max_size_test
        )

    def _to_tensor(self, image: str | Path | np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            return read_image(image)
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"expected an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}"
                )
            return torch.from_numpy(image.copy()).permute(2, 0, 1)
        if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(
                f"expected a (3, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}"
            )
        return image

    @property
    def is_panoptic(self) -> bool:
        """Whether the model segments stuff too, i.e. returns :class:`PanopticSegmentation`."""
        return num_stuff_classes(self.cfg.model) > 0

    @torch.inference_mode()
    def __call__(
        self, image: str | Path | np.ndarray | torch.Tensor
    ) -> Instances | PanopticSegmentation:
        original = self._to_tensor(image)
        resized = self._transform(tv_tensors.Image(original)).as_subclass(torch.Tensor)
        batch = Batch.from_images(
            [resized],
            size_divisibility=self.cfg.model.size_divisibility,
            original_sizes=[tuple(original.shape[-2:])],
        )
        return _to_cpu(self.model(batch.to(self.device, memory_format=self.memory_format))[0])


def _to_cpu(result: Instances | PanopticSegmentation) -> Instances | PanopticSegmentation:
    """The prediction with every tensor moved to the CPU."""
    if isinstance(result, PanopticSegmentation):
        instances = None if result.instances is None else result.instances.to("cpu")
        return dataclasses.replace(result, ids=result.ids.cpu(), instances=instances)
    return result.to("cpu")


def stuff_categories(predictor: Any) -> tuple[list[int], list[str]]:
    """Stuff category ids and names of a predictor (eager or ONNX): from the weights' metadata, else
    ``stuff_i`` numbered on from the thing ids."""
    num = max(
        len(predictor.stuff_category_ids),
        len(predictor.stuff_names),
        num_stuff_classes(predictor.cfg.model),
    )
    first = max(predictor.category_ids, default=0) + 1
    ids = list(predictor.stuff_category_ids) or list(range(first, first + num))
    names = list(predictor.stuff_names) or [f"stuff_{i}" for i in range(num)]
    return ids, names
