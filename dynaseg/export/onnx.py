"""ONNX export: a trace of each model's own ``predict_raw`` on one padded image.

The graph's inputs and outputs, what stays outside it and why, and the few export-only pieces
(each where an op has no exportable form) are described in ``docs/export.md``.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dynaseg.errors import UserError
from dynaseg.modeling.blendmask.model import BlendMask
from dynaseg.modeling.dr1mask.model import DR1Mask
from dynaseg.modeling.dynamask.branch import DynaMaskBranch
from dynaseg.modeling.rcnn.fcn_mask_head import FCNMaskHead
from dynaseg.modeling.rcnn.model import TwoStageDetector
from dynaseg.utils.files import atomic_write

__all__ = [
    "export_onnx",
    "export_model",
    "export_module",
    "model_metadata",
    "ExportError",
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "MAX_OPSET",
    "INPUT_NAMES",
    "METADATA_PREFIX",
]

logger = logging.getLogger("dynaseg.export")

DEFAULT_OPSET, MIN_OPSET, MAX_OPSET = 17, 16, 20
INPUT_NAMES = ("image", "image_size")
METADATA_PREFIX = "dynaseg."
FORMAT_VERSION = 1
_DETECTIONS = ("boxes", "scores", "labels", "mask_probs")
_PANOPTIC = ("panoptic_columns", "panoptic_features", "panoptic_stuff_logits")


class ExportError(UserError, ValueError):
    """A model or option the ONNX export does not support; one line for the user."""


class OneImageExport(nn.Module):
    """``model.predict_raw`` on one image, its outputs as a flat tuple (the graph's outputs).

    forward(image (1, 3, Hp, Wp) float RGB 0-255 padded, image_size (2,) int64 valid (h, w)).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if isinstance(model, TwoStageDetector):
            _check_two_stage(model)
            names = (*_DETECTIONS, "mask_resolutions")
        elif isinstance(model, DR1Mask) and model.panoptic_layer is not None:
            names = (*_DETECTIONS, *_PANOPTIC)
        elif isinstance(model, (BlendMask, DR1Mask)):
            names = _DETECTIONS
        else:
            raise ExportError(f"cannot export a {type(model).__name__}")
        self.model, self.output_names = model, names

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        maps = {"panoptic_features", "panoptic_stuff_logits"}
        return {
            name: {1: "height_4", 2: "width_4"} if name in maps else {0: "detections"}
            for name in self.output_names
        }

    def forward(self, image: Tensor, image_size: Tensor) -> tuple[Tensor, ...]:
        (out,) = self.model.predict_raw(image, image_size[None])
        if isinstance(self.model, DR1Mask):
            raw, maps = out
            return (*raw[:4], *(maps or ()))
        return tuple(out[: len(self.output_names)])


def _check_two_stage(model: TwoStageDetector) -> None:
    branch = model.mask_branch
    if isinstance(branch, FCNMaskHead):
        return
    if not isinstance(branch, DynaMaskBranch):
        raise ExportError(f"cannot export the mask branch {type(branch).__name__}")
    if branch.pooler is not None:
        raise ExportError("DynaMask with a custom RoI pooler cannot be exported")
    if branch.policy == "quota":
        raise ExportError(
            "DynaMask policy 'quota' (fixed fractions, for benchmarks) cannot be exported; "
            "use model.dynamask.policy=msm, size or a fixed side"
        )


def export_module(model: nn.Module) -> OneImageExport:
    """The traceable one-image wrapper of a built dynaseg model (put in eval mode)."""
    return OneImageExport(model.eval()).eval()


def _mask_threshold(model: nn.Module) -> float:
    return float(getattr(model, "mask_threshold", 0.5))


def model_metadata(
    cfg, model: nn.Module, weights_metadata: dict[str, Any] | None = None
) -> dict[str, str]:
    """The ONNX ``metadata_props`` (keys prefixed ``dynaseg.``, values strings, JSON where structured)."""
    from dynaseg.config.overrides import to_dict

    meta = dict(weights_metadata or {})
    num_classes = cfg.model.num_classes
    values = {
        "format_version": FORMAT_VERSION,
        "model_kind": cfg.model.kind,
        "class_names": list(meta.get("class_names") or [f"class_{i}" for i in range(num_classes)]),
        "category_ids": list(meta.get("category_ids") or range(1, num_classes + 1)),
        "stuff_names": list(meta.get("stuff_names") or []),
        "stuff_category_ids": list(meta.get("stuff_category_ids") or []),
        "size_divisibility": cfg.model.size_divisibility,
        "min_size_test": cfg.data.min_size_test,
        "max_size_test": cfg.data.max_size_test,
        "mask_threshold": _mask_threshold(model),
        "mask_policy": getattr(getattr(model, "mask_branch", None), "policy", None),
        "pixel_format": "RGB float32 0-255, (1, 3, H, W) padded bottom/right to size_divisibility",
        "config": to_dict(cfg),
    }
    return {METADATA_PREFIX + k: json.dumps(v) for k, v in values.items()}


def _example_input(cfg) -> tuple[Tensor, Tensor]:
    """A seeded random image at the test scale (4:3), padded: the input the graph is traced with."""
    from dynaseg.data.transforms import resized_shape

    h, w = resized_shape(480, 640, cfg.data.min_size_test, cfg.data.max_size_test)
    from dynaseg.structures import Batch

    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, h, w, generator=generator) * 255
    batch = Batch.from_images([image], size_divisibility=cfg.model.size_divisibility)
    return batch.images, torch.tensor([h, w], dtype=torch.int64)


def export_model(
    model: nn.Module,
    cfg,
    output: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    weights_metadata: dict[str, Any] | None = None,
    example: tuple[Tensor, Tensor] | None = None,
) -> Path:
    """Export a built model (its weights loaded) to ``output`` with metadata; returns the path.

    cfg: the model's ``ExperimentConfig`` (stored in the metadata with the class names, test sizes,
    size divisibility and mask threshold). example: (image, image_size) to trace with (default: a
    random image at the test scale). The file is written atomically.
    """
    import onnx

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"--opset must be in {MIN_OPSET}..{MAX_OPSET} (RoIAlign aligned=True needs 16), got {opset}"
        )
    module = export_module(model.cpu())
    image, image_size = example if example is not None else _example_input(cfg)
    output = Path(output)
    names = module.output_names
    dynamic = {"image": {2: "height", 3: "width"}} | module.dynamic_axes

    def write(tmp: str) -> None:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            torch.onnx.export(
                module,
                (image, image_size),
                tmp,
                dynamo=False,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=list(names),
                dynamic_axes=dynamic,
                do_constant_folding=True,
            )
        for w in caught:
            logger.debug("export: %s: %s", w.category.__name__, str(w.message).splitlines()[0])
        proto = onnx.load(tmp)
        onnx.helper.set_model_props(proto, model_metadata(cfg, model, weights_metadata))
        proto.doc_string = (
            f"dynaseg {cfg.model.kind}: see dynaseg/export/onnx.py for the inputs and outputs"
        )
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)

    atomic_write(output, write)
    return output


def export_onnx(
    cfg, weights: str | Path, output: str | Path, *, opset: int = DEFAULT_OPSET
) -> Path:
    """``dynaseg export --format onnx``: build ``cfg``'s model, load ``weights``, export to ``output``."""
    from dynaseg.engine.checkpoint import load_weights, read_metadata
    from dynaseg.modeling.build import build_model

    model = build_model(cfg.model, pretrained=False)
    load_weights(model, weights)
    return export_model(model, cfg, output, opset=opset, weights_metadata=read_metadata(weights))
