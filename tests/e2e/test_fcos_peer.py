"""torchvision's FCOS behind our model contract (the issue-16 reference detector)."""

import json

import pytest
import torch
from helpers import data_overrides, dynaseg
from torchvision.ops import clip_boxes_to_image

from dynaseg.bench.fcos_peer import build_torchvision_fcos
from dynaseg.config.overrides import ConfigError
from dynaseg.config.presets import load_config
from dynaseg.modeling.preprocess import normalize_images
from dynaseg.structures import Batch, Instances


def _batch(original_scale: int = 1) -> Batch:
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(2, 3, 96, 128)
    images[0, :, :96, :128] = torch.rand(3, 96, 128, generator=g) * 255
    images[1, :, :64, :96] = torch.rand(3, 64, 96, generator=g) * 255
    sizes = [(96, 128), (64, 96)]
    targets = [
        Instances(
            image_size=s, boxes=torch.tensor([[10.0, 12.0, 50.0, 60.0]]), labels=torch.tensor([2])
        )
        for s in sizes
    ]
    return Batch(
        images=images,
        image_sizes=sizes,
        original_sizes=[(h * original_scale, w * original_scale) for h, w in sizes],
        image_ids=[1, 2],
        targets=targets,
    )


def _model():
    torch.manual_seed(0)
    cfg = load_config("blendmask_tiny", ["model.backbone.fpn_channels=64"]).model
    return build_torchvision_fcos(cfg), cfg


def test_sees_our_normalised_pixels_without_resizing():
    model, cfg = _model()
    seen = []
    model.detector.backbone.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    batch = _batch()
    model.eval()
    model(batch)
    ours = normalize_images(
        batch.images,
        batch.image_sizes,
        torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1),
        torch.tensor(cfg.pixel_std).view(1, 3, 1, 1),
    )
    assert seen[0].shape == ours.shape  # no resize, same padding
    torch.testing.assert_close(seen[0], ours, atol=1e-4, rtol=1e-4)


def test_training_losses_and_boxes_at_the_original_size():
    model, _ = _model()
    losses = model.train()(_batch())
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
    sum(losses.values()).backward()
    assert model.detector.head.classification_head.cls_logits.weight.grad.abs().sum() > 0
    model.eval().detector.score_thresh = 0.0
    with torch.no_grad():
        same, doubled = model(_batch(1)), model(_batch(2))
    assert len(same[0]) > 0 and same[0].masks is None and doubled[1].image_size == (128, 192)
    torch.testing.assert_close(doubled[0].boxes, clip_boxes_to_image(same[0].boxes * 2, (192, 256)))


def test_narrow_fpn_is_a_config_error():
    with pytest.raises(ConfigError, match="multiple of 32"):
        build_torchvision_fcos(
            load_config("blendmask_tiny", ["model.backbone.fpn_channels=48"]).model
        )


@pytest.mark.slow
def test_bench_fcos_peer_trains_and_reports_box_ap(synth_dir, tmp_path):
    proc = dynaseg(
        "bench",
        "fcos-peer",
        "--config",
        "blendmask_tiny",
        *data_overrides(synth_dir),
        "model.backbone.fpn_channels=64",
        "solver.max_iter=4",
        f"output_dir={tmp_path}",
    )
    assert "bbox" in proc.stdout and "segm" not in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics) == ["bbox"]
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"} <= set(logged)
    bad = dynaseg("bench", "fcos-peer", "--config", "mask_rcnn_tiny", check=False)
    assert (
        bad.returncode == 2
        and bad.stderr.startswith("dynaseg: error:")
        and "Traceback" not in bad.stderr
    )
