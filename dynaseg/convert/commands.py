"""``dynaseg convert``: another library's checkpoint → a dynaseg weights file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dynaseg.errors import UserError

__all__ = ["add_convert_parser"]

# the preset whose switches reproduce each source's model
_DEFAULT_CONFIG = {
    "torchvision:maskrcnn_resnet50_fpn": "mask_rcnn_r50_fpn_torchvision",
    "torchvision:fcos_resnet50_fpn": "blendmask_r50_fpn_1x",
    "detectron2": "mask_rcnn_r50_fpn_detectron2",
}


def _coco_metadata(num_rows: int, num_classes: int) -> dict[str, Any]:
    """Class names and COCO category ids for a COCO checkpoint (names from torchvision's list)."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    from dynaseg.convert.torchvision_detection import coco_ids

    categories = list(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
    if num_classes == 80 and num_rows in (81, 91):
        labels = coco_ids(categories)
    elif num_rows == 91:
        labels = list(range(1, 91))
    else:
        return {"category_ids": list(range(1, num_classes + 1))}
    return {"class_names": [categories[i] for i in labels], "category_ids": labels}


def _cmd_convert(args: argparse.Namespace) -> int:
    from dynaseg.config.presets import load_config, save_config
    from dynaseg.engine.checkpoint import save_weights
    from dynaseg.modeling.build import build_model

    source, *rest = args.source
    if len(rest) > 1 or (rest and args.weights):
        raise UserError("--from takes a source and at most one checkpoint file (or use --weights)")
    weights_file = rest[0] if rest else args.weights
    if source not in _DEFAULT_CONFIG:
        known = ", ".join(_DEFAULT_CONFIG)
        if source.startswith("torchvision:"):
            from dynaseg.convert.torchvision_detection import convert_torchvision

            convert_torchvision(source.split(":", 1)[1], {}, None, coco_labels=[], source=source)
        raise UserError(f"--from {source}: expected one of {known}")
    if not args.to.endswith(".safetensors"):
        raise UserError(f"--to {args.to}: write a .safetensors file")
    if source == "detectron2":
        from dynaseg.convert.detectron2 import (
            architecture_overrides,
            convert_detectron2,
            read_detectron2_checkpoint,
        )

        if not weights_file:
            raise UserError("--from detectron2 needs the checkpoint file: --from detectron2 FILE")
        state = read_detectron2_checkpoint(weights_file)
        blendmask = any(k.startswith("basis_module.") for k in state)  # AdelaiDet's BlendMask
        config = args.config or (
            "blendmask_r50_fpn_adelaidet" if blendmask else _DEFAULT_CONFIG[source]
        )
        cfg = load_config(config, [*architecture_overrides(state), *args.overrides])
        model = build_model(cfg.model, pretrained=False)
        converted = convert_detectron2(state, model, source=str(weights_file))
        rows = (
            state["proposal_generator.fcos_head.cls_logits.bias"].shape[0] + 1
            if blendmask
            else state["roi_heads.box_predictor.cls_score.bias"].shape[0]
        )
    else:
        from dynaseg.convert.torchvision_detection import TORCHVISION_MODELS

        spec = TORCHVISION_MODELS[source.split(":", 1)[1]]
        config = args.config or _DEFAULT_CONFIG[source]
        cfg = load_config(config, [*spec.overrides, *args.overrides])
        model = build_model(cfg.model, pretrained=False)
        from torchvision.models import get_model_weights

        from dynaseg.convert.torchvision_detection import coco_ids, convert_torchvision
        from dynaseg.modeling.backbone.pretrained import cached_torchvision_weights, read_state_dict

        name = source.split(":", 1)[1]
        weights = get_model_weights(name).DEFAULT  # its file unless --weights is given
        path = weights_file or cached_torchvision_weights(weights, source)
        state = read_state_dict(path)
        converted = convert_torchvision(
            name,
            state,
            model,
            coco_labels=coco_ids(list(weights.meta["categories"])),
            source=str(path),
        )
        rows = state[spec.classes_key].shape[0]
        untouched = sorted({k.split(".")[0] for k in model.state_dict() if k not in converted})
        if untouched:
            print(f"not in the checkpoint, kept as built (train them next): {', '.join(untouched)}")
    model.load_state_dict(converted, strict=False)  # strict where the source covers the model
    metadata = _coco_metadata(rows, cfg.model.num_classes) | {"converted_from": source}
    save_weights(model, args.to, metadata)
    config_file = Path(args.to).with_suffix(".yaml")
    save_config(cfg, config_file)
    print(
        f"wrote {args.to} ({len(converted)} tensors) and its config {config_file} "
        f"({config} with the checkpoint's switches); use them with "
        f"--config {config_file} --weights {args.to}"
    )
    return 0


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    from dynaseg.cli import _add_config

    p = sub.add_parser(
        "convert",
        help="a torchvision or detectron2 Mask R-CNN checkpoint → a dynaseg .safetensors",
    )
    p.add_argument(
        "--from",
        dest="source",
        nargs="+",
        required=True,
        metavar="SOURCE [FILE]",
        help="torchvision:maskrcnn_resnet50_fpn (its COCO weights from torch's cache, or --weights) "
        "or detectron2 FILE (.pkl from the model zoo, or a .pth of detectron2's checkpointer)",
    )
    p.add_argument("--weights", help="the checkpoint file (torchvision: default, torch's cache)")
    p.add_argument("--to", required=True, help="output .safetensors")
    _add_config(p, required=False)
    p.set_defaults(func=_cmd_convert)
