"""``dynaseg convert --from detectron2 FILE``: a fake model-zoo checkpoint built from detectron2's
source, every tensor mapped, broken checkpoints and code-running pickles refused.

The manifest (names and shapes) is written from detectron2's public source at commit
02b5c4e295e990042a714712c21dc79b731e8833 (read, not installed):
- detectron2/modeling/backbone/resnet.py: ``BasicStem.conv1`` (7×7, 3→64) and ``BottleneckBlock``
  ``conv1/conv2/conv3/shortcut``, each a ``Conv2d`` without bias holding its ``norm``
  (FrozenBatchNorm2d: weight, bias, running_mean, running_var); stages ``res2``-``res5`` with
  3/4/6/3 blocks (R-50), bottleneck widths 64·2^i, outputs 256·2^i; the shortcut only in block 0.
- detectron2/modeling/backbone/fpn.py: ``fpn_lateral{2..5}`` (1×1) and ``fpn_output{2..5}`` (3×3),
  with bias (no norm), 256 channels; P6 by max-pooling (no tensors).
- detectron2/modeling/proposal_generator/rpn.py ``StandardRPNHead``: ``conv`` (3×3),
  ``objectness_logits`` (A = 3), ``anchor_deltas`` (4A).
- detectron2/modeling/roi_heads/box_head.py ``FastRCNNConvFCHead``: ``fc1`` (256·7·7 → 1024), ``fc2``.
- detectron2/modeling/roi_heads/fast_rcnn.py ``FastRCNNOutputLayers``: ``cls_score`` (C + 1, the
  background last), ``bbox_pred`` (4C, class-specific without background).
- detectron2/modeling/roi_heads/mask_head.py ``MaskRCNNConvUpsampleHead``: ``mask_fcn{1..4}``
  (3×3), ``deconv`` (ConvTranspose2d 2×2: weight (in, out, 2, 2)), ``predictor`` (1×1 → C).
The zoo's files (e.g. model_final_f10217.pkl) are pickles of {"model": {name: ndarray}, "__author__"}.
"""

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dynaseg.cli import main
from dynaseg.config.presets import load_config
from dynaseg.convert.detectron2 import convert_detectron2, read_detectron2_checkpoint
from dynaseg.convert.mapping import ConversionError
from dynaseg.engine.checkpoint import read_metadata
from dynaseg.inference.predictor import Predictor
from dynaseg.modeling.build import build_model


def detectron2_mask_rcnn_r50_fpn(num_classes: int = 80) -> dict[str, tuple[int, ...]]:
    """Name → shape of detectron2's Mask R-CNN R50-FPN (see the module docstring)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_norm(name, out_c, in_c, k):
        shapes[f"{name}.weight"] = (out_c, in_c, k, k)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.norm.{stat}"] = (out_c,)

    conv_norm("backbone.bottom_up.stem.conv1", 64, 3, 7)
    in_c = 64
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        width, out_c = 64 * 2 ** (stage - 2), 256 * 2 ** (stage - 2)
        for b in range(blocks):
            prefix = f"backbone.bottom_up.res{stage}.{b}"
            if b == 0:
                conv_norm(f"{prefix}.shortcut", out_c, in_c, 1)
            conv_norm(f"{prefix}.conv1", width, in_c if b == 0 else out_c, 1)
            conv_norm(f"{prefix}.conv2", width, width, 3)
            conv_norm(f"{prefix}.conv3", out_c, width, 1)
        in_c = out_c
    for level, c in zip(range(2, 6), (256, 512, 1024, 2048)):
        shapes[f"backbone.fpn_lateral{level}.weight"] = (256, c, 1, 1)
        shapes[f"backbone.fpn_lateral{level}.bias"] = (256,)
        shapes[f"backbone.fpn_output{level}.weight"] = (256, 256, 3, 3)
        shapes[f"backbone.fpn_output{level}.bias"] = (256,)
    rpn = "proposal_generator.rpn_head"
    shapes |= {
        f"{rpn}.conv.weight": (256, 256, 3, 3),
        f"{rpn}.conv.bias": (256,),
        f"{rpn}.objectness_logits.weight": (3, 256, 1, 1),
        f"{rpn}.objectness_logits.bias": (3,),
        f"{rpn}.anchor_deltas.weight": (12, 256, 1, 1),
        f"{rpn}.anchor_deltas.bias": (12,),
        "roi_heads.box_head.fc1.weight": (1024, 256 * 7 * 7),
        "roi_heads.box_head.fc1.bias": (1024,),
        "roi_heads.box_head.fc2.weight": (1024, 1024),
        "roi_heads.box_head.fc2.bias": (1024,),
        "roi_heads.box_predictor.cls_score.weight": (num_classes + 1, 1024),
        "roi_heads.box_predictor.cls_score.bias": (num_classes + 1,),
        "roi_heads.box_predictor.bbox_pred.weight": (4 * num_classes, 1024),
        "roi_heads.box_predictor.bbox_pred.bias": (4 * num_classes,),
        "roi_heads.mask_head.deconv.weight": (256, 256, 2, 2),
        "roi_heads.mask_head.deconv.bias": (256,),
        "roi_heads.mask_head.predictor.weight": (num_classes, 256, 1, 1),
        "roi_heads.mask_head.predictor.bias": (num_classes,),
    }
    for k in range(1, 5):
        shapes[f"roi_heads.mask_head.mask_fcn{k}.weight"] = (256, 256, 3, 3)
        shapes[f"roi_heads.mask_head.mask_fcn{k}.bias"] = (256,)
    return shapes


def _fake(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
    for k in arrays:
        if k.endswith("running_var"):
            arrays[k] = np.abs(arrays[k]) + 1.0
        if k.endswith("num_batches_tracked"):
            arrays[k] = np.array(0, np.int64)
    return arrays


def _convert(tmp_path, shapes: dict[str, tuple[int, ...]], name: str):
    """A fake zoo pickle of ``shapes`` converted by the CLI → (its arrays, our tensors, the config
    convert wrote, at a small test size)."""
    arrays = _fake(shapes)
    path = tmp_path / f"{name}.pkl"
    _save_zoo_pickle(path, arrays)
    out = tmp_path / f"{name}.safetensors"
    assert main(["convert", "--from", "detectron2", str(path), "--to", str(out)]) == 0
    cfg = load_config(
        str(out.with_suffix(".yaml")),
        ["data.min_size_test=128", "data.max_size_test=160", "device=cpu"],
    )
    return arrays, load_file(str(out)), cfg, out


def _runs(cfg, weights) -> None:
    """The converted model segments an image with no further step."""
    result = Predictor(cfg, weights)(torch.randint(0, 256, (3, 120, 150), dtype=torch.uint8))
    assert result.image_size == (120, 150)


def _save_zoo_pickle(path, arrays) -> None:
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, f, protocol=2)


@pytest.fixture(scope="module")
def zoo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("d2") / "model_final.pkl"
    arrays = _fake(detectron2_mask_rcnn_r50_fpn())
    _save_zoo_pickle(path, arrays)
    return path, arrays


def test_every_tensor_maps(zoo_file, tmp_path, capsys):
    path, arrays = zoo_file
    out = tmp_path / "mask_rcnn.safetensors"
    assert main(["convert", "--from", "detectron2", str(path), "--to", str(out)]) == 0
    ours = load_file(str(out))
    assert len(ours) == len(arrays)  # one of ours per tensor of theirs, nothing left over

    def theirs(name):
        return torch.from_numpy(arrays[name])

    assert torch.equal(
        ours["backbone.body.layer3.2.bn2.running_var"],
        theirs("backbone.bottom_up.res4.2.conv2.norm.running_var"),
    )
    assert torch.equal(
        ours["backbone.body.layer2.0.downsample.0.weight"],
        theirs("backbone.bottom_up.res3.0.shortcut.weight"),
    )
    assert torch.equal(
        ours["backbone.fpn.inner_blocks.3.0.bias"], theirs("backbone.fpn_lateral5.bias")
    )
    assert torch.equal(
        ours["mask_branch.convs.3.0.weight"], theirs("roi_heads.mask_head.mask_fcn4.weight")
    )
    # the stem takes RGB: its input channels reversed from detectron2's BGR
    stem = theirs("backbone.bottom_up.stem.conv1.weight")
    assert torch.equal(ours["backbone.body.conv1.weight"], stem[:, [2, 1, 0]])
    # background: detectron2's last score → torchvision's first; no background box row → zeros
    cls = theirs("roi_heads.box_predictor.cls_score.bias")
    assert torch.equal(ours["box_head.predictor.cls_score.bias"], torch.cat([cls[80:], cls[:80]]))
    box = ours["box_head.predictor.bbox_pred.weight"]
    assert not box[:4].any() and torch.equal(
        box[4:], theirs("roi_heads.box_predictor.bbox_pred.weight")
    )
    meta = read_metadata(out)
    assert meta["converted_from"] == "detectron2" and len(meta["class_names"]) == 80
    # the converted model runs as is
    cfg = load_config(
        "mask_rcnn_r50_fpn_detectron2",
        ["data.min_size_test=128", "data.max_size_test=160", "device=cpu"],
    )
    _runs(cfg, out)


def test_stem_flip_makes_rgb_input_equal_bgr_input():
    x = torch.rand(1, 3, 16, 16)
    weight = torch.randn(8, 3, 7, 7)
    rgb = torch.nn.functional.conv2d(x, weight.flip(1), padding=3)
    bgr = torch.nn.functional.conv2d(x.flip(1), weight, padding=3)
    torch.testing.assert_close(rgb, bgr)


@pytest.mark.parametrize(
    "change, message",
    [
        ("missing", "1 model tensors missing from the checkpoint: backbone.body.layer1.1.bn2.bias"),
        (
            "renamed",
            "1 tensors with no place in the model: backbone.bottom_up.res2.1.conv2.nrm.bias",
        ),
        ("shape", "1 tensors of the wrong shape: roi_heads.mask_head.mask_fcn2.weight"),
        ("classes", "the checkpoint has 80 classes, the config model.num_classes=3"),
    ],
)
def test_broken_checkpoints_are_refused(zoo_file, change, message):
    _, arrays = zoo_file
    state = {k: torch.from_numpy(v) for k, v in arrays.items()}
    cfg = load_config("mask_rcnn_r50_fpn_detectron2")
    key = "backbone.bottom_up.res2.1.conv2.norm.bias"
    if change == "missing":
        del state[key]
    elif change == "renamed":
        state[key.replace(".norm.", ".nrm.")] = state.pop(key)
    elif change == "shape":
        state["roi_heads.mask_head.mask_fcn2.weight"] = torch.zeros(256, 256, 1, 1)
    else:
        cfg = load_config("mask_rcnn_r50_fpn_detectron2", ["model.num_classes=3"])
    with pytest.raises(ConversionError, match=message):
        convert_detectron2(state, build_model(cfg.model, pretrained=False), source="x.pkl")


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch exploited",))


def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": np.zeros(1, np.float32)}, "payload": _Exploit()}, f)
    with pytest.raises(ConversionError, match="refused: the pickle would build posix.system"):
        read_detectron2_checkpoint(path)
    rc = main(
        ["convert", "--from", "detectron2", str(path), "--to", str(tmp_path / "x.safetensors")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("dynaseg: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "exploited").exists()


def adelaidet_blendmask_r50(num_classes: int = 80) -> dict[str, tuple[int, ...]]:
    """Name → shape of AdelaiDet's BlendMask R_50 (AdelaiDet@36721221eb572256206e60df6e9095ed00b2e08c):
    detectron2's ResNet as above; adet/modeling/backbone/fpn.py: ``fpn_lateral{3..5}``,
    ``fpn_output{3..5}`` and ``top_block.p6`` / ``p7`` (3×3 stride-2 on P5); adet/modeling/fcos/fcos.py
    ``FCOSHead``: ``cls_tower`` / ``bbox_tower`` Sequential of [conv (bias), GroupNorm(32), ReLU] × 4
    (indices 3i, 3i + 1), ``share_tower`` empty, ``cls_logits`` (C), ``bbox_pred`` (4), ``ctrness``
    (1), no ``scales`` (BlendMask's USE_SCALE False); adet/modeling/blendmask/blendmask.py
    ``top_layer`` (3×3 → K·M² = 4·14²); adet/modeling/blendmask/basis_module.py: ``refine``
    [conv (no bias), BN, ReLU] per P3-P5 to 128, ``tower`` = 3 such blocks, Upsample, a block and a
    1×1 conv to 4 bases, ``seg_head`` [conv, BN, ReLU, conv, BN, ReLU, 1×1 conv to C + 1]."""
    shapes = {
        k: v
        for k, v in detectron2_mask_rcnn_r50_fpn(num_classes).items()
        if k.startswith("backbone.bottom_up.")
    }

    def bn(name, c):
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{stat}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    for level, c in zip(range(3, 6), (512, 1024, 2048)):
        shapes[f"backbone.fpn_lateral{level}.weight"] = (256, c, 1, 1)
        shapes[f"backbone.fpn_lateral{level}.bias"] = (256,)
        shapes[f"backbone.fpn_output{level}.weight"] = (256, 256, 3, 3)
        shapes[f"backbone.fpn_output{level}.bias"] = (256,)
    for p in ("p6", "p7"):
        shapes[f"backbone.top_block.{p}.weight"] = (256, 256, 3, 3)
        shapes[f"backbone.top_block.{p}.bias"] = (256,)
    head = "proposal_generator.fcos_head"
    for tower in ("cls_tower", "bbox_tower"):
        for i in range(4):
            shapes[f"{head}.{tower}.{3 * i}.weight"] = (256, 256, 3, 3)
            shapes[f"{head}.{tower}.{3 * i}.bias"] = (256,)
            shapes[f"{head}.{tower}.{3 * i + 1}.weight"] = (256,)
            shapes[f"{head}.{tower}.{3 * i + 1}.bias"] = (256,)
    for name, out in (("cls_logits", num_classes), ("bbox_pred", 4), ("ctrness", 1)):
        shapes[f"{head}.{name}.weight"] = (out, 256, 3, 3)
        shapes[f"{head}.{name}.bias"] = (out,)
    shapes["top_layer.weight"] = (4 * 14 * 14, 256, 3, 3)
    shapes["top_layer.bias"] = (4 * 14 * 14,)
    for i in range(3):
        shapes[f"basis_module.refine.{i}.0.weight"] = (128, 256, 3, 3)
        bn(f"basis_module.refine.{i}.1", 128)
    for i in (0, 1, 2, 4):
        shapes[f"basis_module.tower.{i}.0.weight"] = (128, 128, 3, 3)
        bn(f"basis_module.tower.{i}.1", 128)
    shapes["basis_module.tower.5.weight"] = (4, 128, 1, 1)
    shapes["basis_module.tower.5.bias"] = (4,)
    shapes["basis_module.seg_head.0.weight"] = (128, 256, 3, 3)
    bn("basis_module.seg_head.1", 128)
    shapes["basis_module.seg_head.3.weight"] = (128, 128, 3, 3)
    bn("basis_module.seg_head.4", 128)
    shapes["basis_module.seg_head.6.weight"] = (num_classes + 1, 128, 1, 1)
    shapes["basis_module.seg_head.6.bias"] = (num_classes + 1,)
    return shapes


def test_adelaidet_blendmask_maps_and_runs(tmp_path, capsys):
    arrays, ours, cfg, out = _convert(tmp_path, adelaidet_blendmask_r50(), "R_50_1x")
    assert "(blendmask_r50_fpn_adelaidet with" in capsys.readouterr().out  # recognised
    counters = sum(k.endswith("num_batches_tracked") for k in arrays)  # skipped: BN step counts
    assert len(ours) == len(arrays) - counters + sum(
        k.endswith("num_batches_tracked") for k in ours
    )

    def theirs(name):
        return torch.from_numpy(arrays[name])

    assert torch.equal(
        ours["fcos_head.box_tower.convs.2.bias"],
        theirs("proposal_generator.fcos_head.bbox_tower.6.bias"),
    )
    assert torch.equal(
        ours["fcos_head.cls_tower.norms.3.0.weight"],
        theirs("proposal_generator.fcos_head.cls_tower.10.weight"),
    )
    assert torch.equal(
        ours["basis.post_upsample.1.running_var"], theirs("basis_module.tower.4.1.running_var")
    )
    assert torch.equal(ours["basis.predictor.weight"], theirs("basis_module.tower.5.weight"))
    assert torch.equal(
        ours["semantic_head.tower.1.0.weight"], theirs("basis_module.seg_head.3.weight")
    )
    assert torch.equal(
        ours["backbone.fpn.extra_blocks.p7.bias"], theirs("backbone.top_block.p7.bias")
    )
    assert torch.equal(ours["attention.conv.weight"], theirs("top_layer.weight"))
    _runs(cfg, out)


def test_adelaidet_dcn_backbone_is_recognised(tmp_path, capsys):
    """R_50_dcni3: DCNv2 (detectron2's ``DeformBottleneckBlock``: ``conv2_offset`` 3×3 → 27 =
    18 offsets + 9 modulation logits) in blocks 0, 3, ... of res3-res5 (AdelaiDet's
    ``make_stage_intervals``, adet/modeling/backbone/resnet_interval.py)."""
    shapes = adelaidet_blendmask_r50()
    for stage, blocks in zip(range(3, 6), (4, 6, 3)):
        width = 64 * 2 ** (stage - 2)
        for b in range(0, blocks, 3):
            shapes[f"backbone.bottom_up.res{stage}.{b}.conv2_offset.weight"] = (27, width, 3, 3)
            shapes[f"backbone.bottom_up.res{stage}.{b}.conv2_offset.bias"] = (27,)
    arrays, ours, cfg, out = _convert(tmp_path, shapes, "R_50_dcni3_5x")
    assert cfg.model.backbone.deform_stages == (3, 4, 5) and cfg.model.backbone.deform_interval == 3
    assert torch.equal(
        ours["backbone.body.layer3.3.conv2.offset.weight"],
        torch.from_numpy(arrays["backbone.bottom_up.res4.3.conv2_offset.weight"]),
    )
    _runs(cfg, out)


def test_adelaidet_real_time_blendmask_is_recognised(tmp_path, capsys):
    """RT_R_50 (configs/BlendMask/Base-RT.yaml, RT_R_50_4x_syncbn_shtw.yaml): FCOS on P3-P5
    (TOP_LEVELS 0: no ``top_block``), NUM_SHARE_CONVS 3 with 0 per-branch convs (``share_tower``
    indices 3i / 3i + 1), a 2-conv bottom module (``tower`` = 2 blocks, Upsample, block, 1×1)."""
    shapes = {
        k: v
        for k, v in adelaidet_blendmask_r50().items()
        if not k.startswith(
            (
                "backbone.top_block.",
                "proposal_generator.fcos_head.cls_tower",
                "proposal_generator.fcos_head.bbox_tower",
            )
        )
        and not k.startswith(
            ("basis_module.tower.2.", "basis_module.tower.4.", "basis_module.tower.5.")
        )
    }
    for i in range(3):
        shapes[f"proposal_generator.fcos_head.share_tower.{3 * i}.weight"] = (256, 256, 3, 3)
        shapes[f"proposal_generator.fcos_head.share_tower.{3 * i}.bias"] = (256,)
        shapes[f"proposal_generator.fcos_head.share_tower.{3 * i + 1}.weight"] = (256,)
        shapes[f"proposal_generator.fcos_head.share_tower.{3 * i + 1}.bias"] = (256,)
    shapes["basis_module.tower.3.0.weight"] = (128, 128, 3, 3)  # after the Upsample at index 2
    for stat in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"basis_module.tower.3.1.{stat}"] = (128,)
    shapes["basis_module.tower.4.weight"] = (4, 128, 1, 1)
    shapes["basis_module.tower.4.bias"] = (4,)
    arrays, ours, cfg, out = _convert(tmp_path, shapes, "RT_R_50_4x_syncbn_shtw")
    assert cfg.model.fcos.strides == (8, 16, 32) and cfg.model.fcos.num_share_convs == 3
    assert cfg.model.fcos.num_convs == 0 and cfg.model.basis.num_convs == 2
    assert torch.equal(
        ours["fcos_head.share_tower.norms.2.0.bias"],
        torch.from_numpy(arrays["proposal_generator.fcos_head.share_tower.7.bias"]),
    )
    assert torch.equal(
        ours["basis.post_upsample.0.weight"],
        torch.from_numpy(arrays["basis_module.tower.3.0.weight"]),
    )
    _runs(cfg, out)
