"""ONNX export (dynaseg/export/onnx.py) against eager PyTorch, and ``dynaseg predict --onnx``.

Each model is exported once and run in onnxruntime on two images of different sizes (and
different padding), which shows the graph's image size is dynamic. The graph's outputs are
compared with what the eager model hands to its paste-back step (captured by patching
``one_stage_postprocess`` / ``rcnn_postprocess``), on untrained tiny models whose last layers are
re-drawn with a larger spread (``_spread``) so that scores, boxes and DynaMask's resolution choices
are well separated, with the score thresholds at 0 so that there are many detections.

Tolerances (float32; onnxruntime's kernels sum in other orders than PyTorch's):
boxes 1e-3 px absolute, scores 1e-4, mask probabilities 1e-3; detection count, order and labels
(and DynaMask's chosen resolutions) exactly equal.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from dynaseg import cli  # noqa: E402
from dynaseg.config.presets import load_config  # noqa: E402
from dynaseg.engine.checkpoint import save_weights  # noqa: E402
from dynaseg.export.onnx import export_model  # noqa: E402
from dynaseg.export.onnx_runtime import OnnxPredictor, read_onnx_metadata  # noqa: E402
from dynaseg.inference.predictor import Predictor  # noqa: E402
from dynaseg.modeling.build import build_model  # noqa: E402
from dynaseg.structures import Batch  # noqa: E402
from dynaseg.structures.panoptic import PanopticSegmentation  # noqa: E402

BOX_ATOL, SCORE_ATOL, MASK_ATOL = 1e-3, 1e-4, 1e-3
SIZES = [((128, 171), 2), ((150, 120), 3)]  # valid (h, w) inside the padding, image seed

# Parameter name prefix → std of the re-drawn values (heads whose default init makes near-ties).
_SPREAD = {
    "fcos_head.cls_logits": 0.3,
    "fcos_head.bbox_pred": 0.1,
    "fcos_head.ctrness": 0.3,
    "attention.conv": 0.3,
    "top_layer.embedding": 0.3,
    "rpn.rpn.head.cls_logits": 0.3,
    "box_head.predictor.cls_score": 0.3,
    "box_head.predictor.bbox_pred": 0.02,
    "mask_branch.predictor.mask_fcn_logits": 0.3,
    "mask_branch.head.mask_predictors": 0.3,
    "mask_branch.msm.fc1": 0.5,
}

CASES = {  # id → (preset, overrides)
    "blendmask": ("blendmask_tiny", ["model.fcos.score_threshold=0.0"]),
    "blendmask_agnostic_nms": (
        "blendmask_tiny",
        ["model.fcos.score_threshold=0.0", "model.fcos.class_agnostic_nms=true"],
    ),
    "blendmask_p2": (
        "blendmask_tiny",
        [
            "model.fcos.score_threshold=0.0",
            "model.fcos.strides=[4,8,16,32,64]",
            "model.fcos.sizes_of_interest=[16,32,64,128]",
        ],
    ),
    "blendmask_stride4_skip": (  # with P2 into P3 as well: both P2 paths traced
        "blendmask_tiny",
        [
            "model.fcos.score_threshold=0.0",
            "model.basis.stride4_skip=true",
            "model.backbone.fpn_p2_into_p3=true",
        ],
    ),
    "dr1mask": ("dr1mask_tiny", ["model.fcos.score_threshold=0.0"]),
    "dr1mask_panoptic": ("dr1mask_panoptic_tiny", ["model.fcos.score_threshold=0.0"]),
    "mask_rcnn": ("mask_rcnn_tiny", ["model.box_head.score_threshold=0.0"]),
    "dynamask_msm": (
        "dynamask_tiny",
        ["model.box_head.score_threshold=0.0", "model.dynamask.policy=msm"],
    ),
    "dynamask_size": (
        "dynamask_tiny",
        ["model.box_head.score_threshold=0.0", "model.dynamask.policy=size"],
    ),
    "dynamask_28": (
        "dynamask_tiny",
        ["model.box_head.score_threshold=0.0", "model.dynamask.policy=28"],
    ),
}


def _spread(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = next((s for prefix, s in _SPREAD.items() if name.startswith(prefix)), None)
            if std is not None:
                p.normal_(0, std, generator=generator)
        msm = getattr(getattr(model, "mask_branch", None), "msm", None)
        if msm is not None:
            _mix_msm(model.eval(), generator)
    return model.eval()


def _mix_msm(model, generator: torch.Generator) -> None:
    """Large MSM logits centred over random RoIs of a test image: each RoI's choice is its own, so
    one image mixes several resolutions (an untrained MSM picks the same one for every RoI)."""
    msm = model.mask_branch.msm
    msm.fc2.weight.normal_(0, 1.0, generator=generator)
    (h, w), seed = SIZES[0]
    features = model.backbone(
        model.normalize(_image((h, w), model.backbone.strides["p5"], seed), [(h, w)])
    )
    xy = torch.rand(64, 2, generator=generator) * torch.tensor([w * 0.7, h * 0.7])
    rois = torch.cat(
        [torch.zeros(64, 1), xy, xy + 8 + torch.rand(64, 2, generator=generator) * 60], dim=1
    )
    logits = msm(model.mask_branch.roi_features(features, rois))
    msm.fc2.bias.sub_(logits.mean(0))


def _model(case: str):
    preset, overrides = CASES[case]
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    return cfg, _spread(build_model(cfg.model))


def _image(size: tuple[int, int], div: int, seed: int) -> torch.Tensor:
    h, w = size
    image = torch.zeros(1, 3, h + (-h) % div, w + (-w) % div)
    image[:, :, :h, :w] = (
        torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255
    )
    return image


def _eager_raw(model, kind: str, image: torch.Tensor, size: tuple[int, int]):
    """What the eager model passes to its paste-back step: boxes, scores, labels, [mask probs], sides."""
    target = {
        "blendmask": "dynaseg.modeling.blendmask.model.one_stage_postprocess",
        "dr1mask": "dynaseg.modeling.dr1mask.model.one_stage_postprocess",
    }.get(kind, "dynaseg.modeling.rcnn.model.rcnn_postprocess")
    module, name = target.rsplit(".", 1)
    original = getattr(importlib.import_module(module), name)
    captured = {}

    def capture(*args, **kwargs):
        captured["args"] = args
        return original(*args, **kwargs)

    batch = Batch(images=image, image_sizes=[size], original_sizes=[size], image_ids=[0])
    with mock.patch(target, capture), torch.no_grad():
        model(batch)
    args = captured["args"]
    if kind in ("blendmask", "dr1mask"):
        boxes, scores, labels, probs = args[:4]
        return boxes, scores, labels, list(probs), None
    (raw,) = args
    sides = raw.mask_resolutions
    probs = [p[:r, :r] for p, r in zip(raw.mask_probs, sides.tolist())]
    return raw.boxes, raw.scores, raw.labels, probs, sides


def _session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_matches_eager(case, tmp_path):
    cfg, model = _model(case)
    path = export_model(model, cfg, tmp_path / f"{case}.onnx")
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    div = cfg.model.size_divisibility
    worst = {"boxes": 0.0, "scores": 0.0, "masks": 0.0}
    for size, seed in SIZES:
        image = _image(size, div, seed)
        out = dict(
            zip(
                names,
                session.run(
                    None, {"image": image.numpy(), "image_size": np.array(size, dtype=np.int64)}
                ),
            )
        )
        boxes, scores, labels, probs, sides = _eager_raw(model, cfg.model.kind, image, size)
        got = {k: out[k] for k in ("boxes", "scores", "labels", "mask_probs")}
        if cfg.model.kind == "dr1mask":
            # Eager DR1Mask drops boxes empty at the output size before this step; so does the runtime.
            keep = (got["boxes"][:, 2] > got["boxes"][:, 0]) & (
                got["boxes"][:, 3] > got["boxes"][:, 1]
            )
            got = {k: v[keep] for k, v in got.items()}
        n = len(boxes)
        assert n > 10, "the comparison needs detections"
        assert len(got["boxes"]) == n, f"{size}: {len(got['boxes'])} detections in ONNX, {n} eager"
        np.testing.assert_array_equal(got["labels"], labels.numpy())
        np.testing.assert_allclose(got["boxes"], boxes.numpy(), atol=BOX_ATOL, rtol=0)
        np.testing.assert_allclose(got["scores"], scores.numpy(), atol=SCORE_ATOL, rtol=0)
        if sides is not None:
            np.testing.assert_array_equal(out["mask_resolutions"], sides.numpy())
            policy = getattr(model.mask_branch, "policy", "28")
            assert out["mask_probs"].shape[1] == (112 if policy in ("msm", "size") else int(policy))
        for i, p in enumerate(probs):
            r = p.shape[-1]
            np.testing.assert_allclose(
                got["mask_probs"][i, :r, :r], p.numpy(), atol=MASK_ATOL, rtol=0
            )
            assert not got["mask_probs"][i, r:].any() and not got["mask_probs"][i, :, r:].any()
        worst["boxes"] = max(worst["boxes"], float(np.abs(got["boxes"] - boxes.numpy()).max()))
        worst["scores"] = max(worst["scores"], float(np.abs(got["scores"] - scores.numpy()).max()))
        worst["masks"] = max(
            worst["masks"],
            max(
                float(np.abs(got["mask_probs"][i, : p.shape[-1], : p.shape[-1]] - p.numpy()).max())
                for i, p in enumerate(probs)
            ),
        )
    if case == "dynamask_msm":  # the early exit really splits the instances
        assert len(np.unique(out["mask_resolutions"])) >= 2
    sides_seen = (
        np.unique(out["mask_resolutions"], return_counts=True)
        if "mask_resolutions" in out
        else None
    )
    print(f"{case}: max |ONNX - eager| {worst}; mask sides (last image) {sides_seen}")


@pytest.mark.parametrize("case", ["blendmask", "dr1mask", "dynamask_msm"])
def test_onnx_no_detections(case, tmp_path):
    """Nothing above the threshold: empty outputs, not an onnxruntime error (empty tensors are fragile there)."""
    cfg, model = _model(case)
    key = (
        "model.fcos.score_threshold"
        if cfg.model.kind in ("blendmask", "dr1mask")
        else "model.box_head.score_threshold"
    )
    cfg = load_config(CASES[case][0], CASES[case][1] + [f"{key}=1.0"])
    torch.manual_seed(0)
    model = _spread(build_model(cfg.model))
    session = _session(export_model(model, cfg, tmp_path / "m.onnx"))
    size, seed = SIZES[0]
    out = session.run(
        None,
        {
            "image": _image(size, cfg.model.size_divisibility, seed).numpy(),
            "image_size": np.array(size, dtype=np.int64),
        },
    )
    assert all(o.shape[0] == 0 for o in out)


def test_onnx_metadata(tmp_path):
    cfg, model = _model("dynamask_msm")
    path = export_model(
        model,
        cfg,
        tmp_path / "m.onnx",
        opset=18,
        weights_metadata={
            "class_names": [f"thing{i}" for i in range(7)],
            "category_ids": list(range(11, 18)),
        },
    )
    meta = read_onnx_metadata(path)
    assert meta["model_kind"] == "dynamask" and meta["mask_policy"] == "msm"
    assert meta["class_names"][0] == "thing0" and meta["category_ids"][0] == 11
    assert (
        meta["size_divisibility"] == 32
        and meta["min_size_test"] == 128
        and meta["max_size_test"] == 192
    )
    assert meta["mask_threshold"] == 0.5 and meta["config"]["model"]["kind"] == "dynamask"
    import onnx

    assert onnx.load(str(path)).opset_import[0].version == 18


def _write_images(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (100, 140, 3)), ("b.png", (181, 150, 3))):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / name)
    return folder


def _decode(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(
        {
            "size": rle["size"],
            "counts": rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"],
        }
    )


@pytest.mark.parametrize("case", ["blendmask", "dynamask_msm", "dr1mask_panoptic"])
def test_predict_onnx_cli(case, tmp_path, capsys):
    """``dynaseg export`` then ``dynaseg predict --onnx`` (no --config) writes what eager ``predict`` writes."""
    preset, overrides = CASES[case]
    cfg, model = _model(case)
    if cfg.model.kind == "dynamask":  # onnxruntime runs its mask branch slowly on a CPU
        overrides = [*overrides, "model.box_head.detections_per_image=15"]
    weights = tmp_path / "w.safetensors"
    save_weights(
        model,
        weights,
        metadata={"class_names": [f"thing{i}" for i in range(cfg.model.num_classes)]},
    )
    images = _write_images(tmp_path / "images")
    onnx_path = tmp_path / "model.onnx"
    assert (
        cli.main(
            [
                "export",
                "--config",
                preset,
                "--weights",
                str(weights),
                "--format",
                "onnx",
                "--output",
                str(onnx_path),
                *overrides,
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    common = ["--input", str(images), "--score-threshold", "0.0"]
    assert (
        cli.main(["predict", "--onnx", str(onnx_path), "--output", str(tmp_path / "onnx"), *common])
        == 0
    )
    assert (
        cli.main(
            [
                "predict",
                "--config",
                preset,
                "--weights",
                str(weights),
                "--output",
                str(tmp_path / "eager"),
                *common,
                *overrides,
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "onnx").glob("*.png")) == ["a.png", "b.png"]
    got = json.loads((tmp_path / "onnx" / "results.json").read_text())
    want = json.loads((tmp_path / "eager" / "results.json").read_text())
    assert len(got) == len(want) > 10
    for g, w in zip(got, want):
        assert (g["file_name"], g["image_id"], g["category_id"]) == (
            w["file_name"],
            w["image_id"],
            w["category_id"],
        )
        np.testing.assert_allclose(
            g["bbox"], w["bbox"], atol=0.01 + 2 * BOX_ATOL
        )  # results.json rounds to 0.01 px
        assert abs(g["score"] - w["score"]) < SCORE_ATOL
        # Pasted masks are thresholded probabilities: a pixel can flip only where p is within 1e-3 of 0.5.
        assert (_decode(g["segmentation"]) != _decode(w["segmentation"])).mean() < 1e-3
    if cfg.model.kind == "dr1mask":
        got, want = (
            json.loads((tmp_path / d / "panoptic.json").read_text()) for d in ("onnx", "eager")
        )
        assert [[s["category_id"] for s in a["segments_info"]] for a in got["annotations"]] == [
            [s["category_id"] for s in a["segments_info"]] for a in want["annotations"]
        ]


def test_predictor_panoptic_parity(tmp_path):
    """The Python API on a panoptic DR1Mask: OnnxPredictor ≈ Predictor (segments and their map)."""
    cfg, model = _model("dr1mask_panoptic")
    cfg = dataclasses.replace(cfg, device="cpu")
    weights = tmp_path / "w.safetensors"
    save_weights(model, weights)
    onnx_path = export_model(model, cfg, tmp_path / "m.onnx")
    eager, exported = Predictor(cfg, weights), OnnxPredictor(onnx_path, threads=1)
    assert exported.is_panoptic and exported.class_names == eager.class_names
    image = np.random.default_rng(1).integers(0, 255, (120, 97, 3), dtype=np.uint8)
    a, b = exported(image), eager(image)
    assert isinstance(a, PanopticSegmentation) and len(a.instances) == len(b.instances) > 10
    assert [(s.label, s.isthing) for s in a.segments] == [(s.label, s.isthing) for s in b.segments]
    assert (a.ids != b.ids).float().mean() < 1e-3
    torch.testing.assert_close(a.instances.boxes, b.instances.boxes, atol=BOX_ATOL, rtol=0)


def test_export_cli_errors(tmp_path, capsys):
    cfg, model = _model("blendmask")
    weights = tmp_path / "w.safetensors"
    save_weights(model, weights)
    assert (
        cli.main(
            [
                "export",
                "--config",
                "blendmask_tiny",
                "--weights",
                str(weights),
                "--output",
                str(tmp_path / "m.onnx"),
                "--opset",
                "11",
            ]
        )
        == 2
    )
    assert "opset" in capsys.readouterr().err
    images = tmp_path / "images"  # inputs are checked first: give a readable one
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    assert (
        cli.main(
            [
                "predict",
                "--onnx",
                str(tmp_path / "missing.onnx"),
                "--input",
                str(images),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "missing.onnx" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "predict",
                "--config",
                "blendmask_tiny",
                "--input",
                str(images),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--weights" in capsys.readouterr().err
