"""DynaMask mask branch: r-FPN head with early exit, measured costs, two-phase losses, inference policies."""

import pytest
import torch
from torch.nn import functional as F
from torchvision.ops import DeformConv2d

from dynaseg.engine.trainer import training_objective
from dynaseg.layers.flop_count import count_gmacs
from dynaseg.layers.roi_align import roi_align_aligned
from dynaseg.modeling.dynamask.branch import DynaMaskBranch
from dynaseg.modeling.dynamask.cost import mask_head_macs, msm_macs
from dynaseg.modeling.dynamask.head import DynaMaskHead, project_level_first
from dynaseg.modeling.dynamask.mask_switch import MaskSwitchModule, select_resolution
from dynaseg.structures.masks import roi_mask_targets

C, NUM_CLASSES, WIDTHS, IMAGE = 16, 3, (16, 8, 8, 4), 64
SIDES = (14, 28, 56, 112)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These ops are tiny: one intra-op thread is several times faster than two on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pooler(features, rois):
    """Single-level stand-in for the detector's multi-level pooler: P3, 14×14."""
    return roi_align_aligned(
        features["p3"], rois, output_size=14, spatial_scale=1 / 8, sampling_ratio=2
    )


def _head(**kwargs) -> DynaMaskHead:
    torch.manual_seed(0)
    return DynaMaskHead(in_channels=C, num_classes=NUM_CLASSES, stage_channels=WIDTHS, **kwargs)


def _branch(**kwargs) -> DynaMaskBranch:
    head = _head()
    msm = MaskSwitchModule(in_channels=C, conv_channels=8, fc_channels=16)
    return DynaMaskBranch(head=head, msm=msm, num_classes=NUM_CLASSES, pooler=_pooler, **kwargs)


def _features(seed=0, requires_grad=False, image=IMAGE):
    """Random P2..P5 of a batch of two image×image images (strides 4..32)."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"p{lv}": torch.randn(2, C, image >> lv, image >> lv, generator=g).requires_grad_(
            requires_grad
        )
        for lv in range(2, 6)
    }


ROIS = torch.tensor(
    [
        [0, 4.0, 6.0, 40.0, 50.0],
        [0, 20.0, 10.0, 60.0, 30.0],
        [1, 0.0, 0.0, 64.0, 64.0],
        [1, 10.0, 30.0, 26.0, 50.0],
        [0, 30.0, 30.0, 62.0, 63.0],
        [1, 5.0, 5.0, 35.0, 20.0],
        [0, 8.0, 40.0, 50.0, 60.0],
        [1, 33.0, 2.0, 60.0, 44.0],
    ]
)
LABELS = torch.tensor([0, 2, 1, 0, 1, 2, 2, 0])


def _gt():
    """Two images with two GT masks each (a disc and rectangles); every RoI matched to one of them."""
    yy, xx = torch.meshgrid(torch.arange(IMAGE), torch.arange(IMAGE), indexing="ij")
    disc = (yy - 30) ** 2 + (xx - 24) ** 2 < 18**2
    rect = (yy > 12) & (yy < 28) & (xx > 22) & (xx < 58)
    blob = ((yy - 40) ** 2 / 4 + (xx - 40) ** 2 < 15**2) | (
        (yy > 5) & (yy < 18) & (xx > 8) & (xx < 30)
    )
    gt_masks = [torch.stack([disc, rect]), torch.stack([blob, rect.flip(0)])]
    gt_index = torch.tensor([0, 1, 0, 0, 0, 1, 0, 1])
    return gt_masks, gt_index


def _loss_inputs(features=None, n=8):
    gt_masks, gt_index = _gt()
    return dict(
        features=features if features is not None else _features(),
        rois=ROIS[:n],
        labels=LABELS[:n],
        gt_masks=gt_masks,
        gt_index=gt_index[:n],
    )


# ---------------------------------------------------------------- head: stages, crops, early exit


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(class_specific=False, fuse_after_upsample=False, edge_head=True)]
)
def test_early_exit_equals_the_selected_output_of_all_stages(kwargs):
    head = _head(**kwargs).eval()
    features = _features()
    roi_feats = _pooler(features, ROIS)
    with torch.no_grad():
        masks, edges = head.forward_all(roi_feats, features, ROIS, LABELS)
        choice = torch.tensor([0, 3, 1, 2, 3, 0, 2, 1])
        early = head.forward_early_exit(roi_feats, features, ROIS, LABELS, choice)
    assert [tuple(m.shape) for m in masks] == [(8, s, s) for s in SIDES]
    assert [tuple(e.shape) for e in edges] == (
        [(8, s, s) for s in SIDES] if head.edge_predictors else []
    )
    assert early.shape == (8, 112, 112)
    for i, k in enumerate(choice.tolist()):
        r = SIDES[k]
        assert (early[i, :r, :r] - masks[k][i]).abs().max() <= 1e-5
        assert (early[i, r:] == float("-inf")).all() and (early[i, :, r:] == float("-inf")).all()
    # the class-specific predictors at 14/28/56 use the label's channel; 112 is class-agnostic
    assert [p.weight.shape[0] for p in head.mask_predictors] == (
        [3, 3, 3, 1] if head.class_specific else [1, 1, 1, 1]
    )


def test_early_exit_runs_each_stage_only_on_the_instances_that_need_it(monkeypatch):
    head = _head().eval()
    features = _features()
    roi_feats = _pooler(features, ROIS)
    calls, shapes = [], []
    original = head.stage

    def spy(s, region, feats, rois):
        out = original(s, region, feats, rois)
        calls.append((s, region.shape[0]))
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(head, "stage", spy)
    with torch.no_grad():
        out = head.forward_early_exit(
            roi_feats, features, ROIS, LABELS, torch.zeros(8, dtype=torch.long)
        )
        assert calls == [] and out.shape == (8, 112, 112)
        assert torch.isfinite(out[:, :14, :14]).all() and torch.isinf(out[:, 14:]).all()
        head.forward_early_exit(
            roi_feats, features, ROIS, LABELS, torch.tensor([0, 3, 1, 2, 3, 0, 2, 1])
        )
    assert calls == [(0, 6), (1, 4), (2, 2)]  # choice ≥ 1, ≥ 2, == 3
    assert shapes == [
        (6, WIDTHS[1], 28, 28),
        (4, WIDTHS[2], 56, 56),
        (2, WIDTHS[3], 112, 112),
    ]  # real L_large


def test_crops_sample_each_level_at_its_own_stride():
    """Each level holds the image-pixel x (channel 0) and y (channel 1) of its cell centres, plus
    1000·b: aligned RoIAlign at the right scale returns each bin centre's pixel coordinates."""
    head = _head(fuse_after_upsample=False)
    features = {}
    for lv in range(2, 6):
        s, n = 2**lv, IMAGE >> lv
        centres = torch.arange(n, dtype=torch.float32) * s + s / 2
        level = torch.zeros(2, C, n, n)
        level[:, 0] = centres[None, None, :]
        level[:, 1] = centres[None, :, None]
        level += 1000.0 * torch.arange(2.0)[:, None, None, None]
        features[f"p{lv}"] = level
    rois = torch.tensor([[0, 12.0, 16.0, 52.0, 50.0], [1, 20.0, 18.0, 44.0, 40.0]])
    for s, (level, side) in enumerate(zip(("p4", "p3", "p2"), (14, 28, 56))):
        crop = head.crop(s, features, rois)
        assert crop.shape == (2, C, side, side)
        for i, (b, x0, y0, x1, y1) in enumerate(rois.tolist()):
            xs = x0 + (torch.arange(side) + 0.5) * (x1 - x0) / side + 1000 * b
            ys = y0 + (torch.arange(side) + 0.5) * (y1 - y0) / side + 1000 * b
            assert torch.allclose(crop[i, 0], xs[None, :].expand(side, side), atol=1e-3), level
            assert torch.allclose(crop[i, 1], ys[:, None].expand(side, side), atol=1e-3), level
    assert _head().crop(0, features, rois).shape[-1] == 28  # the paper's order crops at 2·r_s


def test_lateral_then_crop_equals_crop_then_lateral_for_boxes_inside_the_image():
    """lateral_crop picks the cheaper order by pixel count; both orders give the same crop."""
    head, features = _head(), _features(seed=3)
    for s in range(3):
        block = head.stages[s]
        torch.nn.init.normal_(block.lateral.bias)  # the bias must commute too
        crop_first = torch.relu(block.lateral(head.crop(s, features, ROIS)))
        level = features[head.stage_levels[s]]
        project_first = torch.relu(head.crop(s, {head.stage_levels[s]: block.lateral(level)}, ROIS))
        assert torch.allclose(crop_first, project_first, atol=1e-5)
        assert torch.allclose(head.lateral_crop(s, features, ROIS), crop_first, atol=1e-5)
    assert project_level_first(8, 112, torch.Size((2, 256, 50, 76)))  # training: many RoIs
    assert not project_level_first(
        3, 112, torch.Size((1, 256, 200, 304))
    )  # inference: few reach 112


def test_reducing_before_upsampling_equals_upsampling_before_reducing():
    """The stage reduces channels at r_s, then upsamples: the same as upsample-then-1×1, 4× cheaper."""
    block = _head(fuse_after_upsample=False).stages[0]
    x = torch.randn(3, WIDTHS[0], 14, 14)
    up_first = torch.relu(
        block.reduce(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
    )
    assert torch.allclose(block.upsample(x), up_first, atol=1e-5)


# ---------------------------------------------------------------- costs


def test_costs_are_measured_increasing_and_not_checkpointed():
    branch = _branch()
    head = branch.head
    macs = branch.resolution_macs
    assert macs.shape == (4,) and (macs[1:] > macs[:-1]).all()
    assert "resolution_macs" not in branch.state_dict()
    # L_tiny = 3×3 C→16 and 16→16 at 14²; the 14×14 exit adds the label-picked 1×1 (16 MACs per pixel)
    assert macs[0].item() == pytest.approx((16 * 16 * 9 * 196 * 2 + 16 * 196) / 1e9, rel=1e-6)
    # the sum of pieces equals counting the early-exit path itself (an image large enough that
    # the head crops before its lateral conv, as it does for one RoI at inference)
    features, roi = _features(image=512), ROIS[:1]
    roi_feats = _pooler(features, roi)
    for k in range(4):
        choice = torch.tensor([k])
        direct, _ = count_gmacs(
            lambda: head.forward_early_exit(roi_feats, features, roi, LABELS[:1], choice)
        )
        assert direct == pytest.approx(macs[k].item(), rel=1e-6)
    assert mask_head_macs(head, channels=C, num_classes=NUM_CLASSES)[112] == pytest.approx(
        macs[3].item()
    )
    assert 0 < branch.msm_gmacs == msm_macs(branch.msm, channels=C)


def test_deform_conv_is_counted_like_a_plain_conv():
    x, offset = torch.randn(2, 6, 9, 9), torch.randn(2, 2 * 2 * 9, 9, 9)
    dcn = DeformConv2d(6, 4, 3, padding=1, groups=2)
    expected = 2 * 4 * 9 * 9 * (6 // 2) * 3 * 3 / 1e9  # N · Cout · H · W · Cin/groups · kh · kw
    assert count_gmacs(lambda: dcn(x, offset))[0] == pytest.approx(expected)
    assert count_gmacs(lambda: F.conv2d(x, dcn.weight, padding=1, groups=2))[0] == pytest.approx(
        expected
    )


# ---------------------------------------------------------------- losses: phases, gradients, Eq. 7


def _bce(logits_or_probs, target, from_logits):
    """Per-pixel binary cross-entropy written out: −t log q − (1 − t) log(1 − q)."""
    q = torch.sigmoid(logits_or_probs) if from_logits else logits_or_probs
    return -(target * torch.log(q) + (1 - target) * torch.log(1 - q))


def _laplacian_by_hand(x):
    """8·centre − Σ of the 8 neighbours, zero outside the grid: (N, r, r) → (N, r, r)."""
    padded = F.pad(x, (1, 1, 1, 1))
    r = x.shape[-1]
    neighbours = sum(
        padded[:, 1 + dy : 1 + dy + r, 1 + dx : 1 + dx + r]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if (dy, dx) != (0, 0)
    )
    return 8 * x - neighbours


@pytest.mark.parametrize("edge_source", ["mask", "head"])
def test_phase2_loss_is_eq7_written_out_and_every_parameter_gets_a_gradient(edge_source):
    head = _head(edge_head=edge_source == "head")
    msm = MaskSwitchModule(in_channels=C, conv_channels=8, fc_channels=16)
    costs = mask_head_macs(head, channels=C, num_classes=NUM_CLASSES)
    target_cost = 0.4 * costs[112]  # GMAC, binding for most selections
    branch = DynaMaskBranch(
        head=head,
        msm=msm,
        num_classes=NUM_CLASSES,
        pooler=_pooler,
        msm_start_iter=0,
        budget_target=target_cost,
        edge_source=edge_source,
    )
    inputs = _loss_inputs(_features(requires_grad=True))
    torch.manual_seed(7)
    losses = branch.losses(**inputs)
    statistics = {f"msm/{q}_{s}" for q in ("pick", "prob", "argmax") for s in SIDES}
    statistics.add("msm/confidence")
    assert set(losses) == {"loss_mask", "loss_edge", "loss_budget", "loss_entropy"} | statistics
    assert not any(losses[k].requires_grad for k in statistics)
    training_objective(losses).backward()
    missing = [n for n, p in branch.named_parameters() if p.grad is None]
    assert missing == []
    for module in (branch.msm, branch.head.instance_convs, *branch.head.stages):
        assert sum(p.grad.abs().sum() for p in module.parameters()) > 0
    assert all(
        inputs["features"][level].grad is not None for level in ("p2", "p3", "p4")
    )  # p5: unused

    # Eq. 3-7 written out, with the same Gumbel draw (the only random op: u ~ U(0, 1), seed 7)
    with torch.no_grad():
        feats = inputs["features"]
        roi_feats = _pooler(feats, ROIS)
        masks, edge_logits = branch.head.forward_all(roi_feats, feats, ROIS, LABELS)
        logits = branch.msm(roi_feats)
        torch.manual_seed(7)
        gumbel = -torch.log(-torch.log(torch.rand(8, 4)))
        y = F.one_hot(
            (logits.log_softmax(dim=1) + gumbel).argmax(dim=1), 4
        ).float()  # (8, 4) one-hot
        gt = [roi_mask_targets(inputs["gt_masks"], ROIS, inputs["gt_index"], s) for s in SIDES]
        gt_edges = [(_laplacian_by_hand(t) > 0.1).float() for t in gt]
        if edge_source == "mask":
            edge_preds = [_laplacian_by_hand(m.sigmoid()).clamp(1e-4, 1 - 1e-4) for m in masks]
        else:
            edge_preds = edge_logits
        per_mask = torch.stack(
            [_bce(m, t, True).mean(dim=(1, 2)) for m, t in zip(masks, gt)], dim=1
        )
        per_edge = torch.stack(
            [
                _bce(e, t, edge_source == "head").mean(dim=(1, 2))
                for e, t in zip(edge_preds, gt_edges)
            ],
            dim=1,
        )
        l_mask = (y * per_mask).sum() / 8  # per-instance mean (mask_normalizer="instances")
        l_edge = (y * per_edge).sum() / 8
        selected_cost = (y * torch.tensor([costs[s] for s in SIDES])).sum(dim=1).mean()
        l_budget = max(selected_cost.item() / target_cost - 1, 0.0)
        f = logits.softmax(dim=1).mean(dim=0)
        l_entropy = (f * f.log()).sum() / 4
    assert l_budget > 0
    assert losses["loss_mask"].item() == pytest.approx(l_mask.item(), rel=1e-4)
    assert losses["loss_edge"].item() == pytest.approx(0.1 * l_edge.item(), rel=1e-4)
    assert losses["loss_budget"].item() == pytest.approx(0.4 * l_budget, rel=1e-4)
    assert losses["loss_entropy"].item() == pytest.approx(0.4 * l_entropy.item(), rel=1e-4)
    # the logged statistics: the share of the 8 RoIs each side's sample took, the mean of p, the
    # share each side has as the most probable one, and the mean of the largest p
    p = logits.softmax(dim=1)
    for k, side in enumerate(SIDES):
        assert losses[f"msm/pick_{side}"].item() == pytest.approx(y[:, k].mean().item())
        assert losses[f"msm/prob_{side}"].item() == pytest.approx(f[k].item(), rel=1e-5)
        share = sum(int(row.argmax()) == k for row in p) / 8
        assert losses[f"msm/argmax_{side}"].item() == pytest.approx(share)
    confidence = sum(max(row.tolist()) for row in p) / 8
    assert losses["msm/confidence"].item() == pytest.approx(confidence, rel=1e-5)


def test_budget_units_and_the_soft_variant():
    gmac = _branch(msm_start_iter=0, budget_target=1.0)
    assert torch.equal(gmac.budget_costs(), gmac.resolution_macs)
    fraction = _branch(msm_start_iter=0, budget_target=0.4 / 1.40, budget_unit="fraction")
    relative = fraction.budget_costs()
    assert relative[-1] == 1.0 and torch.allclose(
        relative, gmac.resolution_macs / gmac.resolution_macs[-1]
    )
    assert (
        gmac.losses(**_loss_inputs())["loss_budget"] == 0
    )  # C_t = 1 GMAC ≫ this tiny head's costs
    torch.manual_seed(0)
    assert fraction.losses(**_loss_inputs())["loss_budget"] > 0
    # "probs": the budget follows the softmax, not the sample; at init p ≈ uniform
    soft = _branch(msm_start_iter=0, budget_target=0.1, budget_unit="fraction", budget_on="probs")
    uniform_cost = (soft.budget_costs().mean() / 0.1 - 1).item()
    assert soft.losses(**_loss_inputs())["loss_budget"].item() == pytest.approx(
        0.4 * uniform_cost, rel=1e-2
    )
    for bad in (
        dict(budget_unit="G"),
        dict(budget_on="mean"),
        dict(budget_target=0.0),
        dict(edge_source="head"),
        dict(size_reference=-1.0),
    ):
        with pytest.raises(ValueError):
            _branch(**bad)


def test_phase1_trains_all_resolutions_and_the_msm_gets_no_gradient():
    branch = _branch(msm_start_iter=1, budget_target=1e-9)  # a budget every selection exceeds
    inputs = _loss_inputs()
    losses = branch.losses(**inputs)
    assert losses["loss_budget"] == 0 and losses["loss_entropy"] == 0
    assert not [k for k in losses if not k.startswith("loss")]  # no MSM, no MSM statistics
    with torch.no_grad():
        after = branch.losses(**inputs)  # phase 2: the same budget binds
    assert after["loss_budget"] > 0 and after["loss_entropy"] < 0
    branch.zero_grad(set_to_none=True)
    branch.num_updates.zero_()
    losses = branch.losses(**inputs)
    sum(losses.values()).backward()
    # in phase 1 the MSM is not run: none of its parameters gets a gradient (not even a zero one)
    assert all(p.grad is None for p in branch.msm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.head.parameters())
    with torch.no_grad():  # mask loss = Σ_k (1/P) Σ_i BCE at all four resolutions (y = 1)
        feats = inputs["features"]
        masks, _ = branch.head.forward_all(_pooler(feats, ROIS), feats, ROIS, LABELS)
        targets = [roi_mask_targets(inputs["gt_masks"], ROIS, inputs["gt_index"], s) for s in SIDES]
        per_side = [F.binary_cross_entropy_with_logits(m, t) for m, t in zip(masks, targets)]
    assert losses["loss_mask"].item() == pytest.approx(sum(per_side).item(), rel=1e-5)


def test_phase_switches_at_msm_start_iter_and_survives_a_checkpoint():
    branch = _branch(msm_start_iter=2)
    msm_calls = []
    branch.msm.register_forward_hook(lambda *args: msm_calls.append(1))
    inputs = _loss_inputs(n=3)
    for _ in range(2):
        assert branch.losses(**inputs)["loss_entropy"] == 0
    assert msm_calls == [] and int(branch.num_updates) == 2
    assert branch.losses(**inputs)["loss_entropy"] < 0 and msm_calls == [1]
    state = branch.state_dict()
    assert int(state["num_updates"]) == 3

    resumed = _branch(msm_start_iter=2)
    assert not resumed.msm_active
    resumed.load_state_dict(state)
    assert resumed.msm_active and int(resumed.num_updates) == 3


def test_empty_rois_give_zero_losses_with_a_graph():
    branch = _branch()
    empty = dict(
        features=_features(),
        rois=torch.zeros(0, 5),
        labels=torch.zeros(0, dtype=torch.long),
        gt_masks=[torch.zeros(0, IMAGE, IMAGE, dtype=torch.bool)] * 2,
        gt_index=torch.zeros(0, dtype=torch.long),
    )
    losses = branch.losses(**empty)
    assert all(v.item() == 0 and v.requires_grad for k, v in losses.items() if k.startswith("loss"))
    # phase 2 logs the same statistics with or without RoIs (DDP ranks all-reduce every key)
    assert {k for k in losses if not k.startswith("loss")} == {
        f"msm/{q}_{s}" for q in ("pick", "prob", "argmax") for s in SIDES
    } | {"msm/confidence"}
    assert all(v.item() == 0 for k, v in losses.items() if k.startswith("msm/"))
    training_objective(losses).backward()
    assert all(p.grad is not None for p in branch.parameters())
    branch.eval()
    out = branch.predict(
        features=empty["features"],
        rois=empty["rois"],
        labels=empty["labels"],
        image_sizes=[(IMAGE, IMAGE)] * 2,
    )
    assert (
        out.mask_probs.shape[0] == 0
        and out.resolutions.shape == (0,)
        and out.resolutions.dtype == torch.long
    )


# ---------------------------------------------------------------- inference policies


def test_policies_choose_the_expected_resolutions_and_can_be_switched():
    branch = _branch().eval()
    features = _features()
    # image 0 is 64×64 (√(w0·h0) = 64), image 1 is 128×128 (√ = 128): Eq. 8 k = ⌊4 + log2(√(wh)/√(w0h0))⌋
    rois = torch.tensor(
        [
            [0, 0.0, 0.0, 64.0, 64.0],  # 64/64 → k=4 → 112
            [0, 10.0, 10.0, 42.0, 42.0],  # 32/64 → k=3 → 56
            [0, 5.0, 5.0, 21.0, 21.0],  # 16/64 → k=2 → 28
            [0, 5.0, 5.0, 13.0, 13.0],  # 8/64 → k=1 → 14
            [0, 5.0, 5.0, 7.0, 7.0],  # 2/64 → k=-1, clamped → 14
            [1, 0.0, 0.0, 32.0, 32.0],  # 32/128 → k=2 → 28
            [1, 0.0, 0.0, 64.0, 16.0],
        ]
    )  # √(64·16)=32 → 28
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    sizes = [(64, 64), (128, 128)]

    def run():
        with torch.no_grad():
            return branch.predict(features=features, rois=rois, labels=labels, image_sizes=sizes)

    branch.policy = "size"
    out = run()
    assert out.resolutions.tolist() == [112, 56, 28, 14, 14, 28, 28]
    assert out.mask_probs.shape == (7, 112, 112)
    for m, r in zip(out.mask_probs, out.resolutions.tolist()):
        assert not m[r:].any() and not m[:, r:].any()
    with torch.no_grad():
        roi_feats = _pooler(features, rois)
        masks, _ = branch.head.forward_all(roi_feats, features, rois, labels)
        expected_msm = torch.tensor(SIDES)[select_resolution(branch.msm(roi_feats))]
    for i, r in enumerate(out.resolutions.tolist()):
        assert torch.allclose(
            out.mask_probs[i, :r, :r], masks[SIDES.index(r)][i].sigmoid(), atol=1e-5
        )
    for side in SIDES:
        branch.policy = str(side)
        assert run().resolutions.tolist() == [side] * 7
    branch.policy = "msm"
    assert torch.equal(run().resolutions, expected_msm)
    assert torch.equal(run().resolutions, expected_msm)  # argmax, no noise
    branch.policy = "42"
    with pytest.raises(ValueError):
        run()
    # a fixed reference side (FPN's 224): k = ⌊4 + log2(√(wh)/224)⌋ whatever the image size
    branch.policy, branch.size_reference = "size", 224.0
    assert run().resolutions.tolist() == [28, 14, 14, 14, 14, 14, 14]  # 64/224 → k=2; 32/224 → 1
    wide = torch.tensor([[0, 0.0, 0.0, 120.0, 120.0], [1, 0.0, 0.0, 230.0, 230.0]])
    with torch.no_grad():
        assert branch.predict(
            features=features, rois=wide, labels=labels[:2], image_sizes=sizes
        ).resolutions.tolist() == [56, 112]  # 120/224 → 3; 230 → 4
    with pytest.raises(ValueError):
        _branch(policy="large")
