"""``dynaseg convert --from torchvision:maskrcnn_resnet50_fpn``: torchvision's outputs, exactly.

torchvision's model is built with random weights (no download), its last layers re-drawn with a
spread so that scores and boxes are well separated, saved, converted, and both models segment the
same images at their own size (no resize: torchvision's transform gets min_size / max_size equal
to the image). Tolerances: boxes 1e-3 px, scores 1e-5, labels and order equal; masks (each model's
paste-back, ``model.mask_paste=torchvision``) equal after the 0.5 threshold. Measured: boxes
< 2e-5 px, scores < 5e-8, masks identical. (Without ``zero_init_residual`` the random R50 blows
activations up to ~260 and the one rounding difference left, (x/255 − m)/s against
(x − 255·m)/(255·s) at the input, grows to 7e-3 px.)
"""

import pytest
import torch
from safetensors.torch import load_file
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from dynaseg.cli import main
from dynaseg.config.presets import load_config
from dynaseg.convert.mapping import ConversionError
from dynaseg.convert.torchvision_detection import convert_torchvision
from dynaseg.engine.checkpoint import read_metadata
from dynaseg.inference.predictor import Predictor
from dynaseg.modeling.build import build_model

SIZES = [
    (192, 256),
    (160, 224),
]  # the second: Hp / 32 odd, so P6's inferred anchor stride is not 64
NUM_CLASSES = 4
SPREAD = {
    "rpn.head.cls_logits": 0.5,
    "roi_heads.box_predictor.cls_score": 0.05,
    "roi_heads.box_predictor.bbox_pred": 0.01,
    "roi_heads.mask_predictor.mask_fcn_logits": 0.05,
}


def _torchvision_model(num_classes: int, size: tuple[int, int]) -> torch.nn.Module:
    """torchvision's ``maskrcnn_resnet50_fpn`` as its COCO weights build it (FrozenBatchNorm2d in the
    ResNet, trainable layers 3), with random weights."""
    torch.manual_seed(0)
    body = resnet50(norm_layer=FrozenBatchNorm2d, zero_init_residual=True)
    model = MaskRCNN(
        _resnet_fpn_extractor(body, 3),
        num_classes=num_classes,
        min_size=min(size),
        max_size=max(size),
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = next((s for k, s in SPREAD.items() if name.startswith(k)), None)
            if std is not None:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tv")
    tv = _torchvision_model(NUM_CLASSES + 1, SIZES[0])
    torch.save(tv.state_dict(), folder / "maskrcnn.pth")
    out = folder / "maskrcnn.safetensors"
    rc = main(
        [
            "convert",
            "--from",
            "torchvision:maskrcnn_resnet50_fpn",
            "--weights",
            str(folder / "maskrcnn.pth"),
            "--to",
            str(out),
            f"model.num_classes={NUM_CLASSES}",
        ]
    )
    assert rc == 0
    return tv, out


@pytest.mark.parametrize("size", SIZES)
def test_converted_model_gives_torchvision_detections(converted, size):
    tv, weights = converted
    tv.transform.min_size, tv.transform.max_size = (min(size),), max(size)
    cfg = load_config(
        "mask_rcnn_r50_fpn_torchvision",
        [
            f"model.num_classes={NUM_CLASSES}",
            f"data.min_size_test={min(size)}",
            f"data.max_size_test={max(size)}",
            "device=cpu",
            "inference.fold_norms=false",
        ],
    )
    ours = Predictor(cfg, weights)
    image = torch.randint(0, 256, (3, *size), generator=torch.Generator().manual_seed(5)).to(
        torch.uint8
    )
    with torch.no_grad():
        expected = tv([image.float() / 255])[0]
    got = ours(image)
    n = len(expected["boxes"])
    assert n > 20 and len(got) == n
    assert torch.equal(got.labels, expected["labels"] - 1)
    torch.testing.assert_close(got.boxes, expected["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(got.scores, expected["scores"], atol=1e-5, rtol=0)
    theirs = expected["masks"][:, 0] >= 0.5
    differ = (got.masks != theirs).sum(dim=(1, 2))
    assert int(differ.max()) == 0  # the same paste-back (model.mask_paste=torchvision)


def test_metadata_and_strictness(converted, tmp_path):
    tv, weights = converted
    assert read_metadata(weights)["converted_from"] == "torchvision:maskrcnn_resnet50_fpn"
    model = build_model(
        load_config("mask_rcnn_r50_fpn_torchvision", [f"model.num_classes={NUM_CLASSES}"]).model,
        pretrained=False,
    )
    state = tv.state_dict()
    for broken, message in [
        (
            {k: v for k, v in state.items() if k != "rpn.head.conv.0.0.weight"},
            "1 model tensors missing",
        ),
        (
            {**state, "roi_heads.extra.weight": torch.zeros(1)},
            "1 tensors with no place in the model: roi_heads.extra.weight",
        ),
        (
            {**state, "backbone.fpn.inner_blocks.0.0.bias": torch.zeros(7)},
            "1 tensors of the wrong shape: backbone.fpn.inner_blocks.0.0.bias",
        ),
    ]:
        with pytest.raises(ConversionError, match=message):
            convert_torchvision(
                "maskrcnn_resnet50_fpn", broken, model, coco_labels=[], source="x.pth"
            )
    with pytest.raises(ConversionError, match="set model.num_classes=4"):
        convert_torchvision(
            "maskrcnn_resnet50_fpn",
            state,
            build_model(
                load_config("mask_rcnn_r50_fpn_torchvision", ["model.num_classes=7"]).model,
                pretrained=False,
            ),
            coco_labels=[],
            source="x.pth",
        )
    with pytest.raises(ConversionError, match="FastRCNNConvFCHead"):
        convert_torchvision(
            "maskrcnn_resnet50_fpn_v2", state, model, coco_labels=[], source="x.pth"
        )


def test_coco_checkpoint_maps_category_ids_onto_80_classes(tmp_path, capsys):
    """A 91-row COCO checkpoint into an 80-class model: row = COCO category id, names from torchvision."""
    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(tv.state_dict(), tmp_path / "coco.pth")
    out = tmp_path / "coco.safetensors"
    assert (
        main(
            [
                "convert",
                "--from",
                "torchvision:maskrcnn_resnet50_fpn",
                "--weights",
                str(tmp_path / "coco.pth"),
                "--to",
                str(out),
            ]
        )
        == 0
    )
    meta, tensors = read_metadata(out), load_file(str(out))
    assert len(meta["class_names"]) == 80 and meta["class_names"][:3] == [
        "person",
        "bicycle",
        "car",
    ]
    assert meta["category_ids"][:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13]  # 12 is N/A
    ids = torch.tensor(meta["category_ids"])
    source = tv.state_dict()
    assert torch.equal(
        tensors["mask_branch.predictor.mask_fcn_logits.weight"],
        source["roi_heads.mask_predictor.mask_fcn_logits.weight"][ids],
    )
    assert torch.equal(
        tensors["box_head.predictor.cls_score.bias"],
        source["roi_heads.box_predictor.cls_score.bias"][torch.cat([torch.tensor([0]), ids])],
    )
    rows = torch.stack([4 * ids + k for k in range(4)], 1).flatten()
    assert torch.equal(
        tensors["box_head.predictor.bbox_pred.weight"][4:],
        source["roi_heads.box_predictor.bbox_pred.weight"][rows],
    )


def test_fcos_checkpoint_drives_blendmask_detections(tmp_path, capsys):
    """torchvision's ``fcos_resnet50_fpn`` into BlendMask's FCOS part: the same detections (boxes,
    scores, labels) as torchvision's FCOS, with the switches convert writes to OUT.yaml (locations
    at cell corners, clip before NMS, threshold 0.2 on √(p·c) = 0.04 on p·c). An image whose sides
    are multiples of 128, since torchvision infers each level's stride as padded size // grid."""
    from torchvision.models.detection import FCOS
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.manual_seed(0)
    body = resnet50(norm_layer=FrozenBatchNorm2d, zero_init_residual=True)
    backbone = _resnet_fpn_extractor(
        body, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    tv = FCOS(backbone, num_classes=NUM_CLASSES + 1, min_size=256, max_size=384).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        head = tv.head
        head.classification_head.cls_logits.weight.copy_(
            torch.randn(head.classification_head.cls_logits.weight.shape, generator=generator)
            * 0.05
        )
        head.classification_head.cls_logits.bias[
            0
        ] = -30.0  # torchvision's unused background column
        head.regression_head.bbox_reg.weight.copy_(
            torch.randn(head.regression_head.bbox_reg.weight.shape, generator=generator) * 0.02
        )
        head.regression_head.bbox_reg.bias.fill_(1.5)
    torch.save(tv.state_dict(), tmp_path / "fcos.pth")
    out = tmp_path / "blendmask_from_fcos.safetensors"
    args = [
        "convert",
        "--from",
        "torchvision:fcos_resnet50_fpn",
        "--weights",
        str(tmp_path / "fcos.pth"),
    ]
    assert main([*args, "--to", str(out), f"model.num_classes={NUM_CLASSES}"]) == 0
    assert (
        "kept as built (train them next): attention, basis, semantic_head"
        in capsys.readouterr().out
    )
    cfg = load_config(
        str(out.with_suffix(".yaml")),
        ["data.min_size_test=256", "data.max_size_test=384", "device=cpu"],
    )
    image = torch.randint(0, 256, (3, 256, 384), generator=torch.Generator().manual_seed(5)).to(
        torch.uint8
    )
    with torch.no_grad():
        expected = tv([image.float() / 255])[0]
    got = Predictor(cfg, out)(image)
    n = len(expected["boxes"])
    assert n > 20 and len(got) == n
    assert torch.equal(got.labels, expected["labels"] - 1)
    torch.testing.assert_close(got.boxes, expected["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(got.scores, expected["scores"], atol=1e-5, rtol=0)
