"""Inference speed-ups keep the outputs: folded norms, bf16 autocast, torch.compile, channels_last,
batched mask pasting, and the DynaMask quota policy used to time a known resolution mix."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from dynaseg.bench.speed import force_detections, nondegenerate_fcos_boxes
from dynaseg.config.presets import load_config
from dynaseg.export.onnx import ExportError, export_module
from dynaseg.inference.optimize import AutocastDense, fold_batch_norms, optimize_for_inference
from dynaseg.modeling.backbone.resnet import ResNet
from dynaseg.modeling.build import build_model
from dynaseg.modeling.dynamask.branch import quota_resolution
from dynaseg.structures import Batch
from dynaseg.structures.masks import paste_masks

TINY = (
    "blendmask_tiny",
    "dr1mask_tiny",
    "mask_rcnn_tiny",
    "dynamask_tiny",
    "dr1mask_panoptic_tiny",
)


def _randomise_norm_statistics(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so that folding has work to do."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            c = m.running_var.shape[0]
            m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
            m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=g))


def _tiny_model(
    name: str, overrides: tuple[str, ...] = (), detections: int = 20
) -> tuple[nn.Module, int]:
    cfg = force_detections(load_config(name, list(overrides)), detections)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    nondegenerate_fcos_boxes(model)
    _randomise_norm_statistics(model)
    return model, cfg.model.size_divisibility


def _batch(size_divisibility: int, h: int = 120, w: int = 152, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(1, 3, h + (-h) % size_divisibility, w + (-w) % size_divisibility)
    image[:, :, :h, :w] = torch.randint(0, 256, (1, 3, h, w), generator=g).float()
    return Batch(images=image, image_sizes=[(h, w)], original_sizes=[(h, w)], image_ids=[-1])


def _instances(output):
    return output.instances if hasattr(output, "segments") else output


# ------------------------------------------------------------------------------------------ folding


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_fold_batch_norms_keeps_resnet_features(norm):
    torch.manual_seed(0)
    net = ResNet(depth=18, width=8, norm=norm).eval()
    _randomise_norm_statistics(net)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        before = net(x)
        folded = fold_batch_norms(net)
        after = net(x)
    assert folded == 1 + 8 * 2 + 3  # stem + two per basic block + three downsample shortcuts
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in net.modules())
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-4, atol=1e-4)


def test_fold_batch_norms_refuses_training_mode():
    net = ResNet(depth=18, width=8, norm="BN").train()
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(net)


def test_fold_leaves_norms_it_cannot_prove_follow_a_conv():
    # a norm after a ReLU in a Sequential is not folded into anything
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    assert fold_batch_norms(seq) == 0
    assert isinstance(seq[2], nn.BatchNorm2d)


@pytest.mark.parametrize("name", TINY)
def test_default_inference_preparation_keeps_outputs(name):
    """Folded norms (the default ``inference`` section) give the same detections and masks."""
    model, div = _tiny_model(name)
    fast = optimize_for_inference(copy.deepcopy(model))
    batch = _batch(div)
    with torch.inference_mode():
        a, b = _instances(model(batch)[0]), _instances(fast(batch)[0])
    assert len(a) == len(b) > 0
    torch.testing.assert_close(b.boxes, a.boxes, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-5)
    assert torch.equal(b.labels, a.labels)
    assert (a.masks != b.masks).float().mean() < 1e-3


def test_channels_last_keeps_outputs():
    model, div = _tiny_model("blendmask_tiny")
    batch = _batch(div)
    with torch.inference_mode():
        a = model(batch)[0]
        model.to(memory_format=torch.channels_last)
        b = model(
            Batch(
                images=batch.images.contiguous(memory_format=torch.channels_last),
                image_sizes=batch.image_sizes,
                original_sizes=batch.original_sizes,
                image_ids=[-1],
            )
        )[0]
    torch.testing.assert_close(b.boxes, a.boxes, rtol=1e-4, atol=1e-3)
    assert (a.masks != b.masks).float().mean() < 1e-3


# ------------------------------------------------------------------------------------------ autocast


def test_bf16_autocast_wraps_dense_parts_and_returns_float32():
    model, div = _tiny_model("blendmask_tiny")
    reference = copy.deepcopy(model)
    optimize_for_inference(model, amp="bf16")
    assert isinstance(model.backbone, AutocastDense) and isinstance(model.fcos_head, AutocastDense)
    batch = _batch(div)
    with torch.inference_mode():
        fast = model.backbone(batch.images)
        slow = reference.backbone(batch.images)
        out = model(batch)[0]
    for k in slow:
        assert fast[k].dtype == torch.float32
        rel = (fast[k] - slow[k]).norm() / slow[k].norm()
        assert rel < 3e-2, (k, float(rel))  # bf16 has 8 mantissa bits
    assert out.boxes.dtype == torch.float32 and len(out) > 0


def test_bf16_autocast_two_stage_runs_and_keeps_box_precision():
    model, div = _tiny_model("mask_rcnn_tiny")
    reference = copy.deepcopy(model)
    optimize_for_inference(model, amp="bf16")
    batch = _batch(div)
    with torch.inference_mode():
        a, b = reference(batch)[0], model(batch)[0]
    assert b.boxes.dtype == torch.float32 and len(b) == len(a) > 0
    # The dense features differ at bf16 precision; the proposals decoded from them stay in float32.
    assert b.masks.shape == a.masks.shape


def test_unknown_amp_mode_is_refused():
    model, _ = _tiny_model("blendmask_tiny")
    with pytest.raises(ValueError, match="amp must be one of"):
        optimize_for_inference(model, amp="int8")


# ------------------------------------------------------------------------------------------ compile


@pytest.mark.slow
def test_compiled_dense_parts_keep_outputs():
    """torch.compile through dynamo and AOT autograd (backend aot_eager: the capture the inductor
    backend also needs, without its minute-long C++ build here); two image sizes (dynamic shapes)."""
    model, div = _tiny_model("blendmask_tiny")
    fast = optimize_for_inference(copy.deepcopy(model), compile=True, compile_backend="aot_eager")
    for h, w in ((120, 152), (96, 128)):
        batch = _batch(div, h, w)
        with torch.inference_mode():
            a, b = model(batch)[0], fast(batch)[0]
        assert len(a) == len(b) > 0
        torch.testing.assert_close(b.boxes, a.boxes, rtol=1e-4, atol=1e-3)
        assert (a.masks != b.masks).float().mean() < 1e-3


def test_predictor_applies_the_inference_section(tiny_run):
    from dynaseg.inference.predictor import Predictor

    config, weights = str(tiny_run.output_dir / "config.yaml"), tiny_run.weights
    every = ["model.fcos.score_threshold=0.0", "model.fcos.max_detections=20"]
    plain = Predictor(load_config(config, [*every, "inference.fold_norms=false"]), weights)
    folded = Predictor(load_config(config, every), weights)
    amp = Predictor(load_config(config, [*every, "inference.amp=bf16"]), weights)
    assert isinstance(amp.model.backbone, AutocastDense)
    assert not any(
        isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in folded.model.backbone.modules()
    )
    image = torch.randint(
        0, 256, (3, 90, 120), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    a, b = plain(image), folded(image)
    assert len(a) == len(b) > 0
    torch.testing.assert_close(b.boxes, a.boxes, rtol=1e-4, atol=1e-3)
    assert amp(image).boxes.dtype == torch.float32


# ------------------------------------------------------------------------------------------ pasting


def test_batched_paste_equals_per_box_paste():
    g = torch.Generator().manual_seed(0)
    n, h, w = 40, 70, 90
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) - 10  # some start outside
    wh = torch.rand(n, 2, generator=g) * 60 + 0.3  # sub-pixel to large
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[0] = torch.tensor([5.0, 5.0, 5.0, 9.0])  # empty: zero width
    boxes[1] = torch.tensor([100.0, 80.0, 120.0, 95.0])  # entirely outside
    for res in (14, 28):
        probs = torch.rand(n, res, res, generator=g)
        per_box = paste_masks(probs, boxes, (h, w), batched=False)
        batched = paste_masks(probs, boxes, (h, w), batched=True, chunk_size=7)
        assert torch.equal(per_box, batched)
        assert not per_box[0].any() and not per_box[1].any()
        assert per_box[2:].any()


def test_paste_matches_grid_sample_over_the_box():
    """One box, checked against grid_sample over the box's own pixels (the definition)."""
    probs = torch.rand(1, 14, 14, generator=torch.Generator().manual_seed(2))
    box = torch.tensor([[3.3, 4.6, 21.9, 17.2]])
    out = paste_masks(probs, box, (30, 30))
    ys, xs = torch.meshgrid(torch.arange(4, 18) + 0.5, torch.arange(3, 22) + 0.5, indexing="ij")
    grid = torch.stack([(xs - 3.3) / (21.9 - 3.3), (ys - 4.6) / (17.2 - 4.6)], dim=-1)[None] * 2 - 1
    expected = torch.nn.functional.grid_sample(probs[None], grid, align_corners=False)[0, 0] >= 0.5
    assert torch.equal(out[0, 4:18, 3:22], expected)
    assert out[0].sum() == expected.sum()


# ------------------------------------------------------------------------------------------ quota policy


def test_quota_resolution_gives_fractions_smallest_boxes_first():
    sides = torch.tensor([10.0, 80, 20, 40, 5, 60, 30, 70, 50, 90])
    rois = torch.stack([torch.zeros(10), torch.zeros(10), torch.zeros(10), sides, sides], dim=1)
    choice = quota_resolution(rois, (0.3, 0.2, 0.4, 0.1))
    assert torch.bincount(choice, minlength=4).tolist() == [3, 2, 4, 1]
    order = sides.argsort()
    assert choice[order].tolist() == sorted(choice.tolist())  # monotone in size
    # per image: a second image gets its own quota
    two = torch.cat([rois, rois.clone().index_fill_(1, torch.tensor([0]), 1.0)])
    assert torch.bincount(quota_resolution(two, (0.3, 0.2, 0.4, 0.1)), minlength=4).tolist() == [
        6,
        4,
        8,
        2,
    ]


def test_quota_policy_runs_and_cannot_be_exported():
    model, div = _tiny_model(
        "dynamask_tiny", ("model.dynamask.policy=quota", "model.dynamask.quota=[0.5,0,0,0.5]")
    )
    with torch.inference_mode():
        out = model(_batch(div))[0]
    counts = {int(s): int((out.mask_resolutions == s).sum()) for s in (14, 28, 56, 112)}
    assert counts[28] == counts[56] == 0 and abs(counts[14] - counts[112]) <= 1
    with pytest.raises(ExportError, match="quota"):
        export_module(model)


def test_quota_must_be_fractions():
    with pytest.raises(ValueError, match="quota"):
        build_model(
            dataclasses.replace(
                load_config("dynamask_tiny").model,
                dynamask=dataclasses.replace(
                    load_config("dynamask_tiny").model.dynamask, quota=(0.5, 0.5, 0.5, 0.0)
                ),
            )
        )


@pytest.mark.parametrize(
    ("preset", "overrides", "unused"),
    [
        ("blendmask_tiny", [], False),
        ("mask_rcnn_tiny", [], False),
        ("dynamask_tiny", [], True),  # phase 1 runs without the Mask Switch Module
        ("dr1mask_tiny", [], False),
        ("dr1mask_tiny", ["model.dr1.dynamic_factors=none"], True),  # the context conv is unused
    ],
)
def test_models_name_their_dense_parts_and_unused_parameters(preset, overrides, unused):
    from dynaseg.config.presets import load_config
    from dynaseg.inference.optimize import autocast_dense
    from dynaseg.modeling.build import build_model

    model = build_model(load_config(preset, overrides).model)
    paths = model.dense_submodules()
    assert paths and all(isinstance(model.get_submodule(p), torch.nn.Module) for p in paths)
    assert model.ddp_unused_parameters is unused
    model.dense_submodules = lambda: ("backbone", "no_such_head")  # a renamed part is an error
    with pytest.raises(AttributeError, match="no_such_head"):
        autocast_dense(model, dtype=torch.bfloat16)
