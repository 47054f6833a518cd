"""``dynaseg convert``: another library's checkpoint → a dynaseg weights file."""

from __future__ import annotations

import argparse

from dynaseg.errors import UserError

__all__ = ["add_convert_parser"]

_DEFAULT_CONFIG = {"maskrcnn_resnet50_fpn": "mask_rcnn_r50_fpn_torchvision"}


def _cmd_convert(args: argparse.Namespace) -> int:
    from torchvision.models import get_model_weights

    from dynaseg.config.presets import load_config
    from dynaseg.convert.torchvision_detection import (
        TORCHVISION_MODELS,
        UNSUPPORTED,
        ConversionError,
        coco_ids,
        convert_torchvision,
    )
    from dynaseg.engine.checkpoint import save_weights
    from dynaseg.modeling.backbone.pretrained import (
        TORCHVISION_PREFIX,
        cached_torchvision_weights,
        read_state_dict,
    )
    from dynaseg.modeling.build import build_model

    if not args.source.startswith(TORCHVISION_PREFIX):
        raise UserError(
            f"--from {args.source}: expected torchvision:NAME "
            f"({', '.join(TORCHVISION_MODELS)}; detectron2 checkpoints are not supported yet)"
        )
    name = args.source[len(TORCHVISION_PREFIX) :]
    if name in UNSUPPORTED or name not in TORCHVISION_MODELS:
        convert_torchvision(name, {}, None, coco_labels=[], source=args.source)  # raises
    cfg = load_config(args.config or _DEFAULT_CONFIG[name], args.overrides)
    model = build_model(cfg.model, pretrained=False)
    weights = get_model_weights(name).DEFAULT  # its metadata; its file unless --weights is given
    path = args.weights or cached_torchvision_weights(weights, args.source)
    categories = list(weights.meta["categories"])
    state = read_state_dict(path)
    converted = convert_torchvision(
        name, state, model, coco_labels=coco_ids(categories), source=str(path)
    )
    model.load_state_dict(converted)
    rows = state["roi_heads.box_predictor.cls_score.bias"].shape[0]
    num_classes = cfg.model.num_classes
    if rows == 91:  # a COCO checkpoint: torchvision's label index is the COCO category id
        labels = coco_ids(categories) if num_classes == 80 else list(range(1, 91))
        metadata = {"class_names": [categories[i] for i in labels], "category_ids": labels}
    else:
        metadata = {"category_ids": list(range(1, num_classes + 1))}
    if not args.to.endswith(".safetensors"):
        raise ConversionError(f"--to {args.to}: write a .safetensors file")
    save_weights(model, args.to, {**metadata, "converted_from": args.source})
    print(
        f"wrote {args.to} ({len(converted)} tensors from {path}); use it with "
        f"--config {args.config or _DEFAULT_CONFIG[name]} --weights {args.to}"
    )
    return 0


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    from dynaseg.cli import _add_config

    p = sub.add_parser(
        "convert",
        help="another library's checkpoint → a dynaseg .safetensors (torchvision:maskrcnn_resnet50_fpn)",
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="torchvision:NAME (its COCO weights from torch's cache, or --weights)",
    )
    p.add_argument("--weights", help="the checkpoint file (default: torchvision's, cached)")
    p.add_argument("--to", required=True, help="output .safetensors")
    _add_config(p, required=False)
    p.set_defaults(func=_cmd_convert)
