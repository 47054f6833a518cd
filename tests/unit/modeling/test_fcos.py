"""FCOS target assignment, losses and decoding on hand-built cases."""

import math

import torch

from dynaseg.modeling.fcos.detector import FCOSTraining, fcos_training
from dynaseg.modeling.fcos.head import FCOSHead, FCOSOutputs
from dynaseg.modeling.fcos.inference import decode_fcos
from dynaseg.modeling.fcos.locations import compute_locations
from dynaseg.modeling.fcos.losses import fcos_losses, object_balanced_weights
from dynaseg.modeling.fcos.targets import assign_fcos_targets, centerness_target, level_size_ranges
from dynaseg.structures import Instances


def _assign(locations, stride, boxes, labels, radius=1.5, ranges=(-1.0, float("inf"))):
    n = locations.shape[0]
    return assign_fcos_targets(
        locations=locations,
        strides=torch.full((n,), float(stride)),
        size_ranges=torch.tensor([ranges]).expand(n, 2),
        gt_boxes=boxes,
        gt_labels=labels,
        num_classes=5,
        center_sampling_radius=radius,
    )


def test_locations_follow_stride_convention():
    (loc,) = compute_locations([(2, 3)], [8], torch.device("cpu"))
    assert loc.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]


def test_size_ranges_inclusive_table():
    assert level_size_ranges((64, 128)) == [(-1.0, 64.0), (64.0, 128.0), (128.0, float("inf"))]


def test_center_sampling_limits_positives_to_radius():
    loc = compute_locations([(16, 16)], [8], torch.device("cpu"))[0]
    box = torch.tensor([[0.0, 0.0, 128.0, 128.0]])  # centre (64, 64); radius 1.5·8 = 12
    t = _assign(loc, 8, box, torch.tensor([2]))
    pos = loc[t.labels != 5]
    # sub-box (52, 76) is open: of the cell centres 52, 60, 68, 76 only 60 and 68 lie strictly inside
    assert sorted(map(tuple, pos.tolist())) == [(60, 60), (60, 68), (68, 60), (68, 68)]
    t0 = _assign(loc, 8, box, torch.tensor([2]), radius=0)
    assert (t0.labels != 5).sum() == 256  # whole box without centre sampling


def test_regression_targets_are_stride_normalised_and_centerness():
    loc = torch.tensor([[20.0, 30.0]])
    t = _assign(loc, 8, torch.tensor([[10.0, 10.0, 50.0, 40.0]]), torch.tensor([1]), radius=0)
    assert t.labels.tolist() == [1] and t.gt_inds.tolist() == [0]
    assert torch.allclose(t.box_ltrb, torch.tensor([[10 / 8, 20 / 8, 30 / 8, 10 / 8]]))
    ctr = centerness_target(t.box_ltrb)
    assert math.isclose(ctr.item(), math.sqrt(10 / 30 * 10 / 20), rel_tol=1e-6)


def test_ambiguous_location_takes_smallest_box_and_size_range_filters():
    loc = torch.tensor([[50.0, 50.0]])
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0], [40.0, 40.0, 60.0, 60.0]])
    t = _assign(loc, 8, boxes, torch.tensor([0, 3]), radius=0)
    assert t.labels.tolist() == [3] and t.gt_inds.tolist() == [1]
    # max(l, t, r, b) = 10 for the small box, 50 for the large: a [32, 64] level only takes the large one
    t = _assign(loc, 8, boxes, torch.tensor([0, 3]), radius=0, ranges=(32.0, 64.0))
    assert t.labels.tolist() == [0]


def test_no_ground_truth_gives_all_background():
    t = _assign(torch.rand(7, 2) * 100, 8, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert (t.labels == 5).all() and (t.gt_inds == -1).all()


def _loss(labels, box_pred, box_t, ctr_t):
    torch.manual_seed(0)
    cls = torch.randn(len(labels), 5, requires_grad=True)
    ctr = torch.randn(len(box_pred), requires_grad=True)
    out = fcos_losses(
        cls_logits=cls,
        box_ltrb=box_pred,
        centerness=ctr,
        labels=labels,
        box_targets=box_t,
        ctr_targets=ctr_t,
        num_pos_avg=torch.tensor(max(len(box_pred), 1.0)),
        ctr_sum_avg=ctr_t.sum().clamp(min=1e-6),
        focal_alpha=0.25,
        focal_gamma=2.0,
    )
    return out, cls, ctr


def test_losses_empty_ground_truth():
    out, cls, _ = _loss(
        torch.full((10,), 5),
        torch.zeros(0, 4, requires_grad=True),
        torch.zeros(0, 4),
        torch.zeros(0),
    )
    assert out["loss_fcos_cls"] > 0
    assert out["loss_fcos_loc"] == 0 and out["loss_fcos_ctr"] == 0
    sum(out.values()).backward()
    assert (cls.grad > 0).all()  # every location is background: each logit is pushed down


def test_losses_with_ground_truth_and_perfect_box():
    target = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out, _, _ = _loss(
        torch.tensor([1, 5, 5]), target.clone().requires_grad_(), target, centerness_target(target)
    )
    assert out["loss_fcos_cls"] > 0 and out["loss_fcos_ctr"] > 0
    assert out["loss_fcos_loc"].abs() < 1e-6  # GIoU loss of a perfect box
    worse, _, _ = _loss(
        torch.tensor([1, 5, 5]), (target * 2).requires_grad_(), target, centerness_target(target)
    )
    assert worse["loss_fcos_loc"] > 0.1


def test_decode_scores_boxes_and_nms():
    loc = [torch.tensor([[10.0, 10.0], [12.0, 10.0], [50.0, 50.0]])]
    logits = torch.full((3, 2), -10.0)
    logits[0, 1] = logits[1, 1] = 3.0  # two overlapping detections of class 1
    logits[2, 0] = 1.0
    ltrb = torch.tensor([[1.0, 1, 1, 1], [1.0, 1, 1, 1], [0.5, 0.5, 0.5, 0.5]])
    ctr = torch.tensor([2.0, 0.0, 0.0])
    d = decode_fcos(
        cls_logits=[logits],
        box_ltrb=[ltrb],
        centerness=[ctr],
        locations=loc,
        strides=[8],
        score_threshold=0.05,
        thresh_with_ctr=True,
        pre_nms_topk=1000,
        nms_threshold=0.6,
        max_detections=100,
    )
    assert d.labels.tolist() == [1, 0]  # the duplicate was suppressed
    expected = math.sqrt(torch.sigmoid(torch.tensor(3.0)) * torch.sigmoid(torch.tensor(2.0)))
    assert math.isclose(d.scores[0].item(), expected, rel_tol=1e-5)
    assert d.boxes[0].tolist() == [2.0, 2.0, 18.0, 18.0] and d.location_index.tolist() == [0, 2]


def test_head_output_shapes_and_prior():
    head = FCOSHead(in_channels=16, num_classes=3, num_levels=2, num_convs=1, norm="GN")
    out = head([torch.randn(2, 16, 8, 10), torch.randn(2, 16, 4, 5)])
    assert out.cls_logits[1].shape == (2, 3, 4, 5) and out.box_ltrb[0].shape == (2, 4, 8, 10)
    assert (out.box_ltrb[0] >= 0).all() and out.box_tower[0].shape == (2, 16, 8, 10)
    assert abs(torch.sigmoid(out.cls_logits[0]).mean().item() - 0.01) < 0.005


def test_class_agnostic_nms_keeps_one_class_per_object():
    loc = [torch.tensor([[10.0, 10.0], [12.0, 10.0]])]
    logits = torch.full((2, 3), -10.0)
    logits[0, 1], logits[1, 2] = 3.0, 2.0  # one object, two locations voting for different classes
    ltrb = torch.ones(2, 4)
    kw = dict(
        cls_logits=[logits],
        box_ltrb=[ltrb],
        centerness=[torch.zeros(2)],
        locations=loc,
        strides=[8],
        score_threshold=0.05,
        thresh_with_ctr=True,
        pre_nms_topk=1000,
        nms_threshold=0.6,
        max_detections=100,
    )
    assert decode_fcos(**kw).labels.tolist() == [1, 2]  # per-class NMS keeps both
    assert decode_fcos(**kw, class_agnostic_nms=True).labels.tolist() == [
        1
    ]  # one NMS: the better class


def test_object_balanced_weights_give_each_object_the_mean_share():
    # 6 positives on 2 objects: 3 per object on average; object 7 has 4 positives, object 3 has 2.
    w = object_balanced_weights(torch.tensor([7, 7, 3, 7, 3, 7]))
    assert w.tolist() == [0.75, 0.75, 1.5, 0.75, 1.5, 0.75]
    assert object_balanced_weights(torch.tensor([5, 5, 5])).tolist() == [1.0, 1.0, 1.0]
    assert object_balanced_weights(torch.zeros(0, dtype=torch.long)).numel() == 0


def _focal(logit: float, target: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    p_t, a_t = (p, alpha) if target else (1 - p, 1 - alpha)
    return -a_t * (1 - p_t) ** gamma * math.log(p_t)


def test_positive_weights_scale_each_positive_row_of_the_focal_loss():
    labels = torch.tensor([1, 5, 3, 5])  # rows 0 and 2 are positives, C = 5 classes
    box = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
    cls = torch.randn(4, 5)
    out = fcos_losses(
        cls_logits=cls,
        box_ltrb=box,
        centerness=torch.zeros(2),
        labels=labels,
        box_targets=box,
        ctr_targets=centerness_target(box),
        num_pos_avg=torch.tensor(2.0),
        ctr_sum_avg=torch.tensor(1.0),
        focal_alpha=0.25,
        focal_gamma=2.0,
        positive_weights=torch.tensor([0.5, 1.5]),
    )
    row_weight = [0.5, 1.0, 1.5, 1.0]
    expected = sum(
        row_weight[r] * _focal(cls[r, c].item(), float(labels[r] == c))
        for r in range(4)
        for c in range(5)
    )
    assert math.isclose(out["loss_fcos_cls"].item(), expected / 2.0, rel_tol=1e-5)


def _fcos_cls_loss(weighting: str, boxes: torch.Tensor) -> tuple[float, list[int]]:
    """FCOS's classification loss on one 96² image, and the number of positives of each box."""
    torch.manual_seed(0)
    sizes, strides = [(12, 12), (6, 6)], [8, 16]
    head = FCOSOutputs(
        cls_logits=[torch.randn(1, 3, h, w) for h, w in sizes],
        box_ltrb=[torch.rand(1, 4, h, w) + 0.5 for h, w in sizes],
        centerness=[torch.randn(1, 1, h, w) for h, w in sizes],
        box_tower=[],
        cls_tower=[],
    )
    target = Instances(image_size=(96, 96), boxes=boxes, labels=torch.arange(len(boxes)) % 3)
    out = fcos_training(
        head,
        [target],
        strides=strides,
        size_ranges=level_size_ranges((16,)),
        num_classes=3,
        params=FCOSTraining(1.5, 0.25, 2.0, weighting),
    )
    return out.losses["loss_fcos_cls"].item(), out.gt_index.bincount().tolist()


def test_object_weighting_reaches_the_loss_and_is_neutral_for_equal_objects():
    # Two objects with 1 and 9 positives (an 8 px box on stride 8; an 80 px one on stride 16).
    unequal = torch.tensor([[8.0, 8.0, 16.0, 16.0], [0.0, 0.0, 80.0, 80.0]])
    by_object, counts = _fcos_cls_loss("object", unequal)
    by_location, _ = _fcos_cls_loss("location", unequal)
    assert counts == [1, 9]
    assert not math.isclose(by_object, by_location, rel_tol=1e-3)
    # One object: every weight is 1, the loss is FCOS's.
    by_object, counts = _fcos_cls_loss("object", unequal[1:])
    by_location, _ = _fcos_cls_loss("location", unequal[1:])
    assert counts == [9] and math.isclose(by_object, by_location, rel_tol=1e-6)
