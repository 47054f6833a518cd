"""Two-stage detector: FPN P2-P6, multilevel pooler, RPN anchors, RoI sampling, box/mask heads, whole model."""

import factories
import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from dynaseg.layers.roi_align import roi_align_aligned
from dynaseg.modeling.backbone.fpn import ResNetFPN
from dynaseg.modeling.backbone.resnet import ResNet
from dynaseg.modeling.rcnn.box_head import BoxHead, box_inference, box_losses, sample_proposals
from dynaseg.modeling.rcnn.fcn_mask_head import FCNMaskHead, fcn_mask_loss, fcn_mask_probs
from dynaseg.modeling.rcnn.model import RCNNInstances, TwoStageDetector
from dynaseg.modeling.rcnn.pooler import assign_levels, multilevel_roi_align
from dynaseg.modeling.rcnn.rpn import RPN
from dynaseg.structures import Instances

NUM_CLASSES = 7


def square_rois(sides, image=0, x0=4.0, y0=6.0):
    return torch.tensor([[image, x0, y0, x0 + s, y0 + s] for s in sides], dtype=torch.float32)


def test_assign_levels_hand_picked():
    # √(wh) = 20 → clamp to 2; 56 → ⌊4 + log2(1/4)⌋ = 2; 112 → 3; 224 → 4; 448 → 5; 1000 → clamp to 5
    assert assign_levels(square_rois([20, 56, 112, 223.9, 224, 448, 1000])).tolist() == [
        2,
        2,
        3,
        3,
        4,
        5,
        5,
    ]
    wide = torch.tensor([[0.0, 0.0, 0.0, 448.0, 112.0]])  # √(448·112) = 224
    assert assign_levels(wide).tolist() == [4]


def test_pooler_matches_single_level_roi_align_and_keeps_order():
    torch.manual_seed(0)
    features = {f"p{k}": torch.randn(2, 3, 256 // 2**k, 256 // 2**k) for k in range(2, 7)}
    one_level = torch.cat([square_rois([112, 150, 200]), square_rois([120, 180], image=1, x0=30.0)])
    expected = roi_align_aligned(
        features["p3"], one_level, output_size=7, spatial_scale=1 / 8, sampling_ratio=2
    )
    assert torch.equal(
        multilevel_roi_align(features, one_level, output_size=7, sampling_ratio=2), expected
    )
    mixed = torch.cat(
        [square_rois([460]), square_rois([30], image=1), square_rois([120])]
    )  # levels 5, 2, 3
    pooled = multilevel_roi_align(features, mixed, output_size=5, sampling_ratio=2)
    for row, k in zip(range(3), (5, 2, 3)):
        ref = roi_align_aligned(
            features[f"p{k}"],
            mixed[row : row + 1],
            output_size=5,
            spatial_scale=2.0**-k,
            sampling_ratio=2,
        )
        assert torch.equal(pooled[row : row + 1], ref)
    assert multilevel_roi_align(features, mixed[:0], output_size=5).shape == (0, 3, 5, 5)


def test_fpn_p2p6_layout_and_exact_anchor_strides():
    fpn = ResNetFPN(body=ResNet(depth=18, width=8, norm="BN"), out_channels=16, layout="p2p6")
    feats = fpn(torch.zeros(1, 3, 96, 128))
    assert fpn.strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert {k: tuple(v.shape[-2:]) for k, v in feats.items()} == {
        "p2": (24, 32),
        "p3": (12, 16),
        "p4": (6, 8),
        "p5": (3, 4),
        "p6": (2, 2),
    }
    default = ResNetFPN(body=ResNet(depth=18, width=8, norm="BN"), out_channels=16)
    assert list(default(torch.zeros(1, 3, 64, 64))) == ["p3", "p4", "p5", "p6", "p7"]
    # Hp/32 = 3 is odd: torchvision alone would infer a P6 stride of 96 // 2 = 48
    rpn = RPN(in_channels=16)
    anchors = rpn.rpn.anchor_generator(
        ImageList(torch.zeros(1, 3, 96, 128), [(96, 128)]), list(feats.values())
    )[0]
    p6 = anchors[-2 * 2 * 3 :]  # 2×2 cells, 3 ratios
    centres = (p6[:, :2] + p6[:, 2:]) / 2
    assert sorted(set(centres[:, 1].tolist())) == [0.0, 64.0]


def test_sample_proposals_adds_gt_and_respects_positive_fraction():
    torch.manual_seed(0)
    gt = Instances(
        image_size=(100, 100),
        boxes=torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 95.0]]),
        labels=torch.tensor([3, 5]),
    )
    far = torch.tensor([[0.0, 70.0, 20.0, 90.0]]).repeat(30, 1)  # IoU 0 with both GT
    s = sample_proposals(
        [far], [gt], num_classes=NUM_CLASSES, batch_size_per_image=16, positive_fraction=0.25
    )
    fg = s.labels < NUM_CLASSES
    assert fg.sum() == 2 and len(s.labels) == 16  # only the added GT boxes
    assert torch.equal(s.rois[fg, 1:], gt.boxes) and s.labels[fg].tolist() == [3, 5]
    assert s.gt_index[fg].tolist() == [0, 1] and (s.gt_index[~fg] == -1).all()
    assert (s.regression_targets == 0).all()
    near = gt.boxes[0] + torch.randn(40, 4)  # IoU > 0.5 with GT 0
    s = sample_proposals(
        [torch.cat([near, far])],
        [gt],
        num_classes=NUM_CLASSES,
        batch_size_per_image=16,
        positive_fraction=0.25,
    )
    fg = s.labels < NUM_CLASSES
    assert fg.sum() == 4 and (~fg).sum() == 12 and fg[:4].all()  # 25 %, positives first
    assert (s.regression_targets[fg].abs().sum(1) > 0).any() and (
        s.regression_targets[~fg] == 0
    ).all()


def test_box_head_label_convention():
    # torchvision's column c + 1 is our class c; column 0 is background
    logits = torch.full((2, NUM_CLASSES + 1), -10.0)
    logits[0, 3], logits[1, 0] = 10.0, 10.0  # class 2; background
    deltas = torch.zeros(2, 4 * (NUM_CLASSES + 1))
    proposals = [torch.tensor([[5.0, 5.0, 40.0, 30.0], [50.0, 10.0, 200.0, 60.0]])]
    det = box_inference(logits, deltas, proposals, [(64, 100)])[0]
    assert det.labels.tolist() == [2] and torch.equal(det.boxes, proposals[0][:1])
    losses = box_losses(
        logits, deltas, torch.tensor([2, NUM_CLASSES]), torch.zeros(2, 4), num_classes=NUM_CLASSES
    )
    assert losses["loss_cls"] < 1e-6 and losses["loss_box_reg"] == 0


def test_fcn_mask_head_uses_the_label_channel():
    head = FCNMaskHead(in_channels=4, num_classes=3, conv_dim=8, num_convs=1)
    logits = torch.zeros(2, 3, 28, 28)
    logits[0, 1], logits[1, 2] = 20.0, -20.0
    assert (
        fcn_mask_loss(
            logits, torch.tensor([1, 2]), torch.stack([torch.ones(28, 28), torch.zeros(28, 28)])
        )
        < 1e-6
    )
    assert torch.equal(fcn_mask_probs(logits, torch.tensor([0, 0])), torch.full((2, 28, 28), 0.5))
    features = {f"p{k}": torch.randn(1, 4, 64 // 2**k, 64 // 2**k) for k in range(2, 6)}
    out = head.predict(
        features=features,
        rois=square_rois([10, 30]),
        labels=torch.tensor([0, 2]),
        image_sizes=[(64, 64)],
    )
    assert [p.shape for p in out.mask_probs] == [(28, 28)] * 2 and out.resolutions.tolist() == [
        28,
        28,
    ]


def tiny_detector(max_mask_rois_per_image=0):
    torch.manual_seed(0)
    backbone = ResNetFPN(body=ResNet(depth=18, width=8, norm="BN"), out_channels=32, layout="p2p6")
    return TwoStageDetector(
        backbone=backbone,
        rpn=RPN(
            in_channels=32,
            pre_nms_topk_train=200,
            post_nms_topk_train=100,
            pre_nms_topk_test=100,
            post_nms_topk_test=50,
        ),
        box_head=BoxHead(
            in_channels=32, num_classes=NUM_CLASSES, fc_dim=64, batch_size_per_image=64
        ),
        mask_branch=FCNMaskHead(in_channels=32, num_classes=NUM_CLASSES, conv_dim=16),
        num_classes=NUM_CLASSES,
        max_mask_rois_per_image=max_mask_rois_per_image,
        pixel_mean=(123.675, 116.28, 103.53),
        pixel_std=(58.395, 57.12, 57.375),
    )


def make_batch(sizes=((96, 128), (90, 117)), with_targets=True, empty=False):
    return factories.make_batch(
        sizes, with_targets=with_targets, empty=empty, mask_inset=3, odd_original=True
    )


def test_every_parameter_gets_a_gradient():
    model = tiny_detector(max_mask_rois_per_image=4)
    model.train()
    seen = []
    model.mask_branch.register_forward_hook(lambda module, args, out: seen.append(args[1][:, 0]))
    losses = model(make_batch())
    per_image = torch.bincount(seen[0].long(), minlength=2)
    assert per_image.max() <= 4 and per_image.min() > 0  # the per-image mask RoI cap
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"


def test_empty_ground_truth_losses():
    model = tiny_detector()
    model.train()
    losses = model(make_batch(empty=True))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_rpn_cls"] > 0 and losses["loss_cls"] > 0
    assert losses["loss_rpn_loc"] == 0 and losses["loss_box_reg"] == 0 and losses["loss_mask"] == 0
    sum(losses.values()).backward()


def test_odd_sizes_inference_at_original_resolution():
    model = tiny_detector()
    model.eval()
    out = model(make_batch(sizes=((97, 131), (64, 65)), with_targets=False))
    assert [o.image_size for o in out] == [(195, 262), (129, 130)]
    for o in out:
        assert isinstance(o, RCNNInstances) and 0 < len(o) <= 100
        assert o.masks.shape[1:] == o.image_size and o.masks.dtype == torch.bool
        assert o.mask_resolutions.dtype == torch.int64 and (o.mask_resolutions == 28).all()
        assert (o.boxes[:, 2] <= o.image_size[1]).all() and (o.boxes[:, 3] <= o.image_size[0]).all()
        assert (o.scores[:-1] >= o.scores[1:]).all() and o.labels.max() < NUM_CLASSES
        top = o[o.scores >= o.scores[2]]  # indexing keeps the subclass field
        assert isinstance(top, RCNNInstances) and len(top.mask_resolutions) == len(top) >= 3
        assert torch.equal(o.to("cpu").mask_resolutions, o.mask_resolutions)


# Loss lock: update deliberately (print shows the new values) when the model's maths changes.
EXPECTED_LOSSES = {
    "loss_rpn_cls": 0.6918,
    "loss_rpn_loc": 0.0177,
    "loss_cls": 2.0606,
    "loss_box_reg": 0.1883,
    "loss_mask": 0.6911,
}


def test_loss_lock():
    model = tiny_detector(max_mask_rois_per_image=8)
    model.train()
    torch.manual_seed(2)
    losses = {k: round(v.item(), 4) for k, v in model(make_batch()).items()}
    same = losses.keys() == EXPECTED_LOSSES.keys() and all(
        abs(losses[k] - EXPECTED_LOSSES[k]) < 2e-3 for k in losses
    )
    assert same, f"Losses have changed! New losses: {losses}"


# DynaMask's loss lock, phase 1 (all resolutions, no MSM) and phase 2 (MSM, Gumbel draw seeded, a binding
# budget of 10 % of the 112 cost).
EXPECTED_DYNAMASK = {
    1: {
        "loss_rpn_cls": 0.6918,
        "loss_rpn_loc": 0.0031,
        "loss_cls": 2.0254,
        "loss_box_reg": 0.109,
        "loss_mask": 2.7758,
        "loss_edge": 0.2431,
        "loss_budget": 0.0,
        "loss_entropy": 0.0,
    },
    2: {
        "loss_rpn_cls": 0.6918,
        "loss_rpn_loc": 0.0031,
        "loss_cls": 2.0254,
        "loss_box_reg": 0.109,
        "loss_mask": 0.6951,
        "loss_edge": 0.1057,
        "loss_budget": 0.0531,
        "loss_entropy": -0.1386,
        # logged beside the losses in phase 2 (not summed): the MSM's picks, mean p, argmax shares
        # and mean max p
        "msm/confidence": 0.2583,
        "msm/argmax_14": 0.6,
        "msm/argmax_28": 0.0,
        "msm/argmax_56": 0.2,
        "msm/argmax_112": 0.2,
        "msm/pick_14": 0.6,
        "msm/pick_28": 0.2,
        "msm/pick_56": 0.2,
        "msm/pick_112": 0.0,
        "msm/prob_14": 0.257,
        "msm/prob_28": 0.2449,
        "msm/prob_56": 0.248,
        "msm/prob_112": 0.2501,
    },
}


@pytest.mark.parametrize("phase", [1, 2])
def test_dynamask_loss_lock(phase):
    from dynaseg.config.presets import load_config
    from dynaseg.modeling.build import build_model

    cfg = load_config(
        "dynamask_tiny", [f"model.num_classes={NUM_CLASSES}", "model.dynamask.budget_target=0.1"]
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.train()
    if phase == 2:
        model.mask_branch.num_updates.fill_(cfg.model.dynamask.msm_start_iter)
    batch = make_batch()
    torch.manual_seed(2)
    losses = {k: round(v.item(), 4) for k, v in model(batch).items()}
    expected = EXPECTED_DYNAMASK[phase]
    same = losses.keys() == expected.keys() and all(
        abs(losses[k] - expected[k]) < 2e-3 for k in losses
    )
    assert same, f"Losses have changed! New losses: {losses}"
