"""``OnnxPredictor(model.onnx)(image) -> Instances | PanopticSegmentation``: an exported model in onnxruntime.

It is a drop-in for :class:`dynaseg.inference.predictor.Predictor` (same call, ``class_names``,
``category_ids``, ``stuff_names``, ``stuff_category_ids``, ``cfg``, ``is_panoptic``) and does the
same pre- and post-processing as eager inference, with the same functions: the test resize
(``build_test_transforms``), zero padding to the model's size divisibility (``Batch.from_images``),
then on the graph's outputs (the model's ``predict_raw``, docs/export.md) the function the eager
``forward`` calls next: ``one_stage_postprocess`` (BlendMask, DR1Mask), ``rcnn_postprocess``
(Mask R-CNN, DynaMask) or ``dr1mask_postprocess`` (panoptic DR1Mask).

Everything the model needs is in the ONNX file's ``metadata_props`` (class names, category ids,
size divisibility, test sizes, mask threshold, the whole config), so a config is optional; one
given (a preset, a YAML file, overrides) sets the test sizes and thresholds of the post-processing
(the graph's own thresholds, e.g. the detection score threshold, are fixed at export).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors

from dynaseg.config.overrides import ConfigError, apply_overrides, from_dict
from dynaseg.config.presets import load_config
from dynaseg.config.schema import ExperimentConfig
from dynaseg.data.transforms import build_test_transforms
from dynaseg.inference.predictor import Predictor
from dynaseg.structures import Batch, Instances
from dynaseg.structures.detections import PanopticMaps, RawDetections
from dynaseg.structures.panoptic import PanopticSegmentation

__all__ = ["OnnxPredictor", "read_onnx_metadata"]

_PREFIX = "dynaseg."
_PANOPTIC_OUTPUTS = ("panoptic_columns", "panoptic_features", "panoptic_stuff_logits")


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("onnxruntime is not installed (pip install 'dynaseg[export]')") from e
    return onnxruntime


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON-decoded ``dynaseg.*`` metadata_props of an exported model (prefix removed)."""
    ort = _onnxruntime()
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return _decode(session.get_modelmeta().custom_metadata_map)


def _decode(props: dict[str, str]) -> dict[str, Any]:
    return {k[len(_PREFIX) :]: json.loads(v) for k, v in props.items() if k.startswith(_PREFIX)}


class OnnxPredictor(Predictor):
    """Segment images with an ONNX file written by ``dynaseg export --format onnx``.

    Args:
        path: the .onnx file.
        cfg: None (the config stored in the file), a preset name / YAML path, or an
            :class:`ExperimentConfig`; it must be of the exported model's kind.
        overrides: ``key=value`` config overrides (e.g. ``data.min_size_test=640``).
        providers: onnxruntime execution providers (default: CPU).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
    """

    def __init__(
        self,
        path: str | Path,
        cfg: ExperimentConfig | str | None = None,
        overrides: list[str] | tuple[str, ...] = (),
        *,
        providers: list[str] | None = None,
        threads: int | None = None,
    ) -> None:
        ort = _onnxruntime()
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(path), options, providers=providers or ["CPUExecutionProvider"]
        )
        meta = _decode(self.session.get_modelmeta().custom_metadata_map)
        if "config" not in meta:
            raise ConfigError(
                f"{path}: not a dynaseg export (no dynaseg.config in its metadata_props)"
            )
        if cfg is None:
            cfg = apply_overrides(from_dict(ExperimentConfig, meta["config"]), list(overrides))
        elif isinstance(cfg, str):
            cfg = load_config(cfg, overrides)
        else:
            cfg = apply_overrides(cfg, list(overrides))
        if cfg.model.kind != meta["model_kind"]:
            raise ConfigError(
                f"{path} holds a {meta['model_kind']} model, the config is {cfg.model.kind}"
            )
        self.cfg = cfg
        self.path = Path(path)
        self.metadata = meta
        self.model = None
        self.device = torch.device("cpu")
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.class_names: list[str] = list(meta["class_names"])
        self.category_ids: list[int] = list(meta["category_ids"])
        self.stuff_names: list[str] = list(meta.get("stuff_names") or [])
        self.stuff_category_ids: list[int] = list(meta.get("stuff_category_ids") or [])
        self.size_divisibility = int(meta["size_divisibility"])
        self.mask_threshold = cfg.model.mask_threshold
        self._transform = build_test_transforms(cfg.data.min_size_test, cfg.data.max_size_test)

    def run(self, padded: torch.Tensor, image_size: tuple[int, int]) -> dict[str, np.ndarray]:
        """The graph on one (3, Hp, Wp) float 0-255 padded image with valid size (h, w) → its outputs by name."""
        feed = {
            "image": padded[None].contiguous().numpy(),
            "image_size": np.asarray(image_size, dtype=np.int64),
        }
        return dict(zip(self.output_names, self.session.run(None, feed)))

    @torch.no_grad()
    def __call__(self, image) -> Instances | PanopticSegmentation:
        original = self._to_tensor(image)
        resized = self._transform(tv_tensors.Image(original)).as_subclass(torch.Tensor)
        h, w = resized.shape[-2:]
        padded = Batch.from_images([resized], size_divisibility=self.size_divisibility).images[0]
        outputs = self.run(padded, (h, w))
        return self.postprocess(outputs, input_size=(h, w), output_size=tuple(original.shape[-2:]))

    def postprocess(
        self,
        outputs: dict[str, np.ndarray],
        *,
        input_size: tuple[int, int],
        output_size: tuple[int, int],
    ) -> Instances | PanopticSegmentation:
        """The graph's outputs for an image resized to ``input_size`` → the eager model's result at
        ``output_size``, through the post-processing function the eager model calls."""
        from dynaseg.modeling.dr1mask.model import PanopticInference, dr1mask_postprocess
        from dynaseg.modeling.one_stage.postprocess import one_stage_postprocess
        from dynaseg.modeling.rcnn.model import rcnn_postprocess

        tensors = {k: torch.from_numpy(v) for k, v in outputs.items()}
        probs = tensors["mask_probs"]
        sides = tensors.get("mask_resolutions")
        if sides is None:
            sides = torch.full_like(tensors["labels"], probs.shape[-1])
        raw = RawDetections(tensors["boxes"], tensors["scores"], tensors["labels"], probs, sides)
        sizes = dict(input_size=input_size, output_size=output_size)
        if "mask_resolutions" in outputs:  # two-stage
            return rcnn_postprocess(
                raw, mask_threshold=self.mask_threshold, paste=self.cfg.model.mask_paste, **sizes
            )
        if "panoptic_columns" not in outputs:
            return one_stage_postprocess(*raw[:4], mask_threshold=self.mask_threshold, **sizes)
        maps = PanopticMaps(*(tensors[k] for k in _PANOPTIC_OUTPUTS))
        d = self.cfg.model.dr1
        panoptic = PanopticInference(
            num_stuff=self.cfg.model.num_stuff_classes,
            score_threshold=d.panoptic_score_threshold,
            group_iou=d.panoptic_group_iou,
            restrict_to_boxes=d.panoptic_restrict_to_boxes,
            min_stuff_area=d.panoptic_min_stuff_area,
        )
        return dr1mask_postprocess(
            raw, maps, mask_threshold=self.mask_threshold, panoptic=panoptic, **sizes
        )
