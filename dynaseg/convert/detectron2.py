"""detectron2's Mask R-CNN R50-FPN checkpoints → our Mask R-CNN (``dynaseg convert --from detectron2``).

Names follow detectron2's modules (detectron2@02b5c4e: ``modeling/backbone/resnet.py`` BasicStem /
BottleneckBlock with a ``norm`` inside each ``Conv2d``, ``backbone/fpn.py`` ``fpn_lateral{2-5}`` /
``fpn_output{2-5}``, ``proposal_generator/rpn.py`` StandardRPNHead, ``roi_heads/box_head.py``
``fc1`` / ``fc2``, ``roi_heads/fast_rcnn.py`` (background is the *last* class score; boxes are
regressed for the C classes only), ``roi_heads/mask_head.py`` ``mask_fcn{k}`` / ``deconv`` /
``predictor``). Its model-zoo ResNets are MSRA's: BGR input with the per-channel mean only (no
std), the stride in each stage's first 1×1 conv. The conversion flips the stem's input channels so
the model takes RGB like every dynaseg model; the ``mask_rcnn_r50_fpn_detectron2`` preset sets the
rest (``stride_in_1x1``, ``pixel_std`` 1, unrounded anchors, mask RoIAlign sampling 0).

Files: the zoo's ``.pkl`` (a pickle of numpy arrays, read with an unpickler that builds arrays
and nothing else) or a ``.pth`` written by detectron2's checkpointer (``torch.load`` with
``weights_only=True``).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dynaseg.convert.mapping import ConversionError, raise_unless_complete
from dynaseg.modeling.backbone.pretrained import read_state_dict

__all__ = ["read_detectron2_checkpoint", "convert_detectron2", "architecture_overrides"]

# (detectron2 name pattern, ours), applied in order, the first match wins. ``{a-b}`` is arithmetic.
_RESNET_RULES: tuple[tuple[str, str], ...] = (
    (r"backbone\.bottom_up\.stem\.conv1\.weight", "backbone.body.conv1.weight"),
    (r"backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)", r"backbone.body.bn1.\1"),
    (
        r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.weight",
        r"backbone.body.layer{\1-1}.\2.conv\3.weight",
    ),
    (
        r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)",
        r"backbone.body.layer{\1-1}.\2.bn\3.\4",
    ),
    (
        r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv2_offset\.(\w+)",
        r"backbone.body.layer{\1-1}.\2.conv2.offset.\3",
    ),
    (
        r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.weight",
        r"backbone.body.layer{\1-1}.\2.downsample.0.weight",
    ),
    (
        r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.(\w+)",
        r"backbone.body.layer{\1-1}.\2.downsample.1.\3",
    ),
)
# Mask R-CNN R50-FPN (detectron2): FPN on res2-res5, P6 by max-pooling.
_MASK_RCNN_RULES = _RESNET_RULES + (
    (r"backbone\.fpn_lateral(\d)\.(\w+)", r"backbone.fpn.inner_blocks.{\1-2}.0.\2"),
    (r"backbone\.fpn_output(\d)\.(\w+)", r"backbone.fpn.layer_blocks.{\1-2}.0.\2"),
    (r"proposal_generator\.rpn_head\.conv\.(\w+)", r"rpn.rpn.head.conv.0.0.\1"),
    (r"proposal_generator\.rpn_head\.objectness_logits\.(\w+)", r"rpn.rpn.head.cls_logits.\1"),
    (r"proposal_generator\.rpn_head\.anchor_deltas\.(\w+)", r"rpn.rpn.head.bbox_pred.\1"),
    (r"roi_heads\.box_head\.fc1\.(\w+)", r"box_head.mlp.fc6.\1"),
    (r"roi_heads\.box_head\.fc2\.(\w+)", r"box_head.mlp.fc7.\1"),
    (r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(\w+)", r"box_head.predictor.\1.\2"),
    (r"roi_heads\.mask_head\.mask_fcn(\d)\.(\w+)", r"mask_branch.convs.{\1-1}.0.\2"),
    (r"roi_heads\.mask_head\.deconv\.(\w+)", r"mask_branch.predictor.conv5_mask.\1"),
    (r"roi_heads\.mask_head\.predictor\.(\w+)", r"mask_branch.predictor.mask_fcn_logits.\1"),
)
# AdelaiDet's BlendMask (adet/modeling/blendmask, fcos/fcos.py, backbone/fpn.py): FPN on res3-res5,
# P6 / P7 = ``top_block`` convs on P5; FCOS towers as Sequential [conv, GN, ReLU] × n; the bottom
# module's ``tower`` = [conv blocks × n, Upsample, conv block, 1×1 conv]; ``seg_head`` the semantic
# head [conv, BN, ReLU] × 2 + 1×1 conv; ``top_layer`` the attention conv.
_BLENDMASK_RULES = _RESNET_RULES + (
    (r"backbone\.fpn_lateral(\d)\.(\w+)", r"backbone.fpn.inner_blocks.{\1-3}.0.\2"),
    (r"backbone\.fpn_output(\d)\.(\w+)", r"backbone.fpn.layer_blocks.{\1-3}.0.\2"),
    (r"backbone\.top_block\.(p6|p7)\.(\w+)", r"backbone.fpn.extra_blocks.\1.\2"),
    (r"proposal_generator\.fcos_head\.(cls|bbox|share)_tower\.(\d+)\.(?:(\d+)\.)?(\w+)", "{tower}"),
    (r"proposal_generator\.fcos_head\.(cls_logits|bbox_pred|ctrness)\.(\w+)", r"fcos_head.\1.\2"),
    (r"top_layer\.(\w+)", r"attention.conv.\1"),
    (r"basis_module\.refine\.(\d)\.([01])\.(\w+)", r"basis.refine.\1.\2.\3"),
    (r"basis_module\.seg_head\.0\.(\w+)", r"semantic_head.tower.0.0.\1"),
    (r"basis_module\.seg_head\.1\.(\w+)", r"semantic_head.tower.0.1.\1"),
    (r"basis_module\.seg_head\.3\.(\w+)", r"semantic_head.tower.1.0.\1"),
    (r"basis_module\.seg_head\.4\.(\w+)", r"semantic_head.tower.1.1.\1"),
    (r"basis_module\.seg_head\.6\.(\w+)", r"semantic_head.predictor.\1"),
    (r"basis_module\.tower\.(\d+)\.(\w+(?:\.\w+)?)", "{basis}"),
)
_ARRAY_BUILDERS = {  # what a pickle of numpy arrays may construct
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # protocol 2 writes bytes as _codecs.encode(text, "latin1")
}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, numbers, strings and numpy arrays; anything else is refused unbuilt."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ARRAY_BUILDERS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_detectron2_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The model tensors of a detectron2 ``.pkl`` (model zoo) or ``.pth`` (checkpointer) file."""
    path = Path(path)
    if path.suffix != ".pkl":
        return read_state_dict(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        with path.open("rb") as f:
            data = _ArraysOnly(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{path}: refused: the pickle would build {e} (code), not arrays; nothing was run"
        ) from None
    except Exception as e:  # truncated or not a pickle
        raise ConversionError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    model = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(model, dict) or not all(isinstance(v, np.ndarray) for v in model.values()):
        raise ConversionError(f"{path}: not a detectron2 checkpoint (no 'model' dict of arrays)")
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.items()}


def _tower_name(match: re.Match[str]) -> str:
    """AdelaiDet's tower index 3i (conv) / 3i + 1 (GN, or per-level BN ``3i+1.{level}``) → our
    convs[i] / norms[i][level]."""
    tower, index, level, param = match[1], int(match[2]), match[3] or "0", match[4]
    ours = {"cls": "cls_tower", "bbox": "box_tower", "share": "share_tower"}[tower]
    part = f"convs.{index // 3}" if index % 3 == 0 else f"norms.{index // 3}.{level}"
    return f"fcos_head.{ours}.{part}.{param}"


def _basis_name(match: re.Match[str], num_convs: int) -> str:
    """AdelaiDet's bottom-module tower: n conv blocks, Upsample, a conv block, a 1×1 conv."""
    index, param = int(match[1]), match[2]
    if index < num_convs:
        return f"basis.tower.{index}.{param}"
    if index == num_convs + 1:
        return f"basis.post_upsample.{param}"
    return f"basis.predictor.{param}" if index == num_convs + 2 else f"basis.unknown.{index}"


def architecture_overrides(state: dict[str, Tensor]) -> list[str]:
    """Config overrides that build the checkpoint's architecture: the ResNet's depth (number of
    res4 blocks) and DCNv2 stages and interval (the blocks with ``conv2_offset``); for AdelaiDet's
    BlendMask also its FCOS levels (``top_block`` P6 / P7 present or not), tower depths (shared,
    per branch) and bottom-module depth."""

    def count(pattern: str) -> int:
        return sum(bool(re.fullmatch(pattern, k)) and state[k].dim() == 4 for k in state)

    blocks = {int(m[1]) for k in state if (m := re.match(r"backbone\.bottom_up\.res4\.(\d+)\.", k))}
    depth = {6: 50, 23: 101}.get(len(blocks))
    overrides = [f"model.backbone.depth={depth}"] if depth else []
    deformable: dict[int, list[int]] = {}
    for k in state:
        if m := re.match(r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv2_offset\.weight", k):
            deformable.setdefault(int(m[1]), []).append(int(m[2]))
    if deformable:
        gaps = {b - a for idx in deformable.values() for a, b in zip(sorted(idx), sorted(idx)[1:])}
        overrides += [
            f"model.backbone.deform_stages={','.join(map(str, sorted(deformable)))}",
            f"model.backbone.deform_interval={min(gaps) if gaps else 1}",
        ]
    if not any(k.startswith("basis_module.") for k in state):
        return overrides
    top = {p for p in ("p6", "p7") if f"backbone.top_block.{p}.weight" in state}
    strides, sizes = {
        frozenset({"p6", "p7"}): ("8,16,32,64,128", "64,128,256,512"),
        frozenset({"p6"}): ("8,16,32,64", "64,128,256"),
        frozenset(): ("8,16,32", "64,128"),
    }[frozenset(top)]
    head = r"proposal_generator\.fcos_head\."
    shared = count(head + r"share_tower\.\d+\.weight")
    per_branch = count(head + r"cls_tower\.\d+\.weight")
    basis_convs = count(r"basis_module\.tower\.\d+\.0\.weight") - 1  # less the post-upsample block
    return overrides + [
        f"model.fcos.strides={strides}",
        f"model.fcos.sizes_of_interest={sizes}",
        f"model.fcos.num_share_convs={shared}",
        f"model.fcos.num_convs={per_branch}",
        f"model.basis.num_convs={basis_convs}",
    ]


def _rename(key: str, rules: tuple[tuple[str, str], ...], basis_convs: int) -> str | None:
    for pattern, target in rules:
        m = re.fullmatch(pattern, key)
        if m is None:
            continue
        if target == "{tower}":
            return _tower_name(m)
        if target == "{basis}":
            return _basis_name(m, basis_convs)
        name = m.expand(target)
        return re.sub(r"\{(\d+)-(\d+)\}", lambda g: str(int(g[1]) - int(g[2])), name)
    return None


def _ours(name: str, value: Tensor, num_classes: int) -> Tensor:
    """detectron2's layout → ours where they differ (stem channels, class rows)."""
    if name == "backbone.body.conv1.weight":
        return value.flip(1)  # BGR → RGB input
    if name.startswith("box_head.predictor.cls_score."):  # background last → first
        return torch.cat([value[num_classes:], value[:num_classes]])
    if name.startswith("box_head.predictor.bbox_pred."):  # no background row → a zero row first
        return torch.cat([value.new_zeros((4, *value.shape[1:])), value])
    return value


def convert_detectron2(
    state: dict[str, Tensor], model: nn.Module, *, source: str
) -> dict[str, Tensor]:
    """A detectron2 Mask R-CNN R50-FPN or AdelaiDet BlendMask state → ``model``'s state dict, every
    tensor mapped; tensors with no place, missing tensors and shapes that differ are errors naming
    them. BatchNorm's ``num_batches_tracked`` counters are skipped."""
    from dynaseg.modeling.blendmask.model import BlendMask
    from dynaseg.modeling.rcnn.model import TwoStageDetector

    if isinstance(model, TwoStageDetector):
        rules, basis_convs, classes_key, background = (
            _MASK_RCNN_RULES,
            0,
            "roi_heads.box_predictor.cls_score.bias",
            1,
        )
    elif isinstance(model, BlendMask):
        rules, basis_convs = _BLENDMASK_RULES, len(model.basis.tower)
        classes_key, background = "proposal_generator.fcos_head.cls_logits.bias", 0
    else:
        raise ConversionError(
            f"detectron2 checkpoints convert into Mask R-CNN or BlendMask, not {type(model).__name__}"
        )
    rows = state.get(classes_key)
    if rows is None:
        raise ConversionError(f"{source}: no {classes_key}: not a checkpoint of this model")
    if rows.shape[0] != model.num_classes + background:
        raise ConversionError(
            f"{source}: the checkpoint has {rows.shape[0] - background} classes, the config "
            f"model.num_classes={model.num_classes}: set model.num_classes={rows.shape[0] - background}"
        )
    own = model.state_dict()
    converted, unmapped, wrong = {}, [], []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        ours = _rename(key, rules, basis_convs)
        if ours is None or ours not in own:
            unmapped.append(key)
            continue
        value = _ours(ours, value.float(), model.num_classes)
        if value.shape != own[ours].shape:
            wrong.append(f"{key} {tuple(value.shape)} → {ours} {tuple(own[ours].shape)}")
            continue
        converted[ours] = value
    missing = [k for k in own if k not in converted and not k.endswith("num_batches_tracked")]
    raise_unless_complete(f"{source} (detectron2)", unmapped=unmapped, wrong=wrong, missing=missing)
    return converted
