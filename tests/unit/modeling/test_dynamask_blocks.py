"""DynaMask building blocks: MSM + Gumbel-softmax (Eq. 1-2), losses (Eq. 3-7), size rule (Eq. 8), FAM."""

import math

import pytest
import torch
from torch.nn import functional as F

from dynaseg.modeling.dynamask.fam import FeatureAggregationModule
from dynaseg.modeling.dynamask.losses import (
    LaplacianEdges,
    budget_loss,
    entropy_loss,
    mask_edge_targets,
    predicted_mask_edges,
    selected_edge_loss,
    selected_mask_loss,
)
from dynaseg.modeling.dynamask.mask_switch import (
    MaskSwitchModule,
    gumbel_softmax_select,
    select_resolution,
)
from dynaseg.modeling.dynamask.size_rule import size_based_resolution

GFLOPS = torch.tensor([0.23, 0.62, 1.01, 1.40])  # paper Table 7, 14/28/56/112


def _gumbel(shape, seed, dtype=torch.float64):
    """The Gumbel(0, 1) noise g = -log(-log(u)) that gumbel_softmax_select draws from the same seed."""
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return -torch.log(-torch.log(u))


# ---------------------------------------------------------------- Eq. 1-2: MSM and Gumbel-softmax


def test_gumbel_rows_sum_to_one_and_generator_is_reproducible():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    a = gumbel_softmax_select(
        logits, tau=0.5, hard=False, generator=torch.Generator().manual_seed(1)
    )
    b = gumbel_softmax_select(
        logits, tau=0.5, hard=False, generator=torch.Generator().manual_seed(1)
    )
    assert a.shape == (5, 4) and torch.equal(a, b) and (a >= 0).all()
    assert torch.allclose(a.sum(dim=1), torch.ones(5), atol=1e-6)
    with pytest.raises(ValueError):
        gumbel_softmax_select(logits, tau=0.0, hard=False)


def test_gumbel_matches_eq2_and_low_temperature_is_argmax_of_logits_plus_noise():
    logits = torch.randn(64, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = _gumbel(logits.shape, seed=3)
    eq2 = ((logits.log_softmax(dim=1) + g) / 0.7).softmax(dim=1)  # Eq. 2 with log p^k
    ours = gumbel_softmax_select(
        logits, tau=0.7, hard=False, generator=torch.Generator().manual_seed(3)
    )
    assert torch.allclose(ours, eq2, atol=1e-12)
    assert torch.allclose(
        ours, ((logits + g) / 0.7).softmax(dim=1), atol=1e-12
    )  # log p = logits - const
    cold = gumbel_softmax_select(
        logits, tau=1e-5, hard=False, generator=torch.Generator().manual_seed(3)
    )
    assert torch.allclose(cold, F.one_hot((logits + g).argmax(dim=1), 4).double(), atol=1e-4)


def test_gumbel_high_temperature_is_near_uniform():
    logits = torch.tensor([[3.0, -1.0, 0.5, 2.0], [0.0, 0.0, 5.0, 0.0]])
    hot = gumbel_softmax_select(
        logits, tau=1e4, hard=False, generator=torch.Generator().manual_seed(0)
    )
    assert torch.allclose(hot, torch.full_like(hot, 0.25), atol=1e-2)


def test_gumbel_hard_is_one_hot_with_the_soft_gradient():
    base = torch.randn(6, 4, generator=torch.Generator().manual_seed(4))
    weights = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    grads, samples = [], []
    for hard in (False, True):
        logits = base.clone().requires_grad_()
        y = gumbel_softmax_select(
            logits, tau=0.5, hard=hard, generator=torch.Generator().manual_seed(6)
        )
        (y * weights).sum().backward()
        grads.append(logits.grad)
        samples.append(y.detach())
    soft, hard = samples
    assert set(hard.unique().tolist()) == {0.0, 1.0} and torch.equal(hard.sum(dim=1), torch.ones(6))
    assert torch.equal(hard.argmax(dim=1), soft.argmax(dim=1))
    assert grads[1].abs().sum() > 0 and torch.allclose(
        grads[1], grads[0], atol=1e-7
    )  # straight-through


def test_gumbel_max_frequencies_follow_softmax_like_torch_reference():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5]).expand(20000, 4)
    ours = gumbel_softmax_select(
        logits, tau=1.0, hard=True, generator=torch.Generator().manual_seed(7)
    ).mean(0)
    torch.manual_seed(7)
    ref = F.gumbel_softmax(logits, tau=1.0, hard=True).mean(0)
    assert torch.allclose(ours, logits[0].softmax(0), atol=0.015)
    assert torch.allclose(ours, ref, atol=0.02)


def test_select_resolution_is_noise_free_argmax():
    logits = torch.tensor([[0.1, 0.3, 0.2, 0.0], [5.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.1]])
    assert (
        select_resolution(logits).tolist() == [1, 0, 3]
        and select_resolution(logits).dtype == torch.int64
    )


@pytest.mark.parametrize("norm", ["BN", "GN", "none"])
def test_msm_shape_init_and_gradients_reach_every_parameter(norm):
    torch.manual_seed(0)
    msm = MaskSwitchModule(in_channels=16, conv_channels=8, fc_channels=16, norm=norm)
    logits = msm(torch.randn(3, 16, 14, 14))
    assert logits.shape == (3, 4)
    assert torch.allclose(
        logits.softmax(dim=1), torch.full((3, 4), 0.25), atol=0.05
    )  # near-uniform start
    (logits * torch.randn(3, 4)).sum().backward()
    for name, p in msm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
    assert msm.eval()(torch.zeros(0, 16, 14, 14)).shape == (0, 4)


# ---------------------------------------------------------------- Eq. 3-4: selected mask / edge loss


def _two_stage_case():
    """K = 2 stages at 2×2 and 4×4, N = 2; instance 0 selects stage 1, instance 1 selects stage 0."""
    x = math.log(3.0)  # sigmoid(x) = 0.75
    logits = [torch.full((2, 2, 2), x), torch.full((2, 4, 4), x)]
    targets = [torch.tensor([[[1.0, 0.0], [1.0, 1.0]]] * 2), torch.ones(2, 4, 4)]
    selection = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    return logits, targets, selection


def test_selected_mask_loss_equals_hand_bce_and_ignores_unselected_stages():
    logits, targets, selection = _two_stage_case()
    # instance 0 @ stage 1: all targets 1 → -log 0.75 = log(4/3) per pixel
    # instance 1 @ stage 0: three 1s (log 4/3) and one 0 (-log 0.25 = log 4), mean over the 4 pixels
    hand = math.log(4 / 3) + (3 * math.log(4 / 3) + math.log(4)) / 4
    assert selected_mask_loss(logits, targets, selection).item() == pytest.approx(hand, rel=1e-6)
    assert selected_mask_loss(logits, targets, selection, normalizer=2).item() == pytest.approx(
        hand / 2, rel=1e-6
    )
    # garbage in the unselected (instance, stage) pairs changes nothing and gets no gradient
    garbage = [logits[0].clone(), logits[1].clone()]
    garbage[0][0], garbage[1][1] = -30.0, 17.0
    garbage = [g.requires_grad_() for g in garbage]
    loss = selected_mask_loss(garbage, targets, selection)
    loss.backward()
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    assert garbage[0].grad[0].abs().sum() == 0 and garbage[1].grad[1].abs().sum() == 0
    assert garbage[0].grad[1].abs().sum() > 0 and garbage[1].grad[0].abs().sum() > 0


def test_selected_mask_loss_gradient_to_selection_is_each_stage_bce():
    logits, targets, selection = _two_stage_case()
    selection = selection.clone().requires_grad_()
    selected_mask_loss(logits, targets, selection).backward()
    bce_stage0 = (3 * math.log(4 / 3) + math.log(4)) / 4
    expected = torch.tensor([[bce_stage0, math.log(4 / 3)], [bce_stage0, math.log(4 / 3)]])
    assert torch.allclose(selection.grad, expected, atol=1e-6)  # what reaches the MSM through y^k


def test_selected_edge_loss_on_logits_and_on_probabilities():
    logits, targets, selection = _two_stage_case()
    edges = [mask_edge_targets(t) for t in targets]
    from_logits = selected_edge_loss(logits, edges, selection)
    from_probs = selected_edge_loss(
        [torch.sigmoid(x) for x in logits], edges, selection, from_logits=False
    )
    assert from_logits.item() == pytest.approx(from_probs.item(), rel=1e-5)
    # instance 1 @ 2×2: every foreground pixel touches the zero-padded border, edges = its mask [[1,0],[1,1]]
    # instance 0 @ 4×4 all ones: edges = the border ring (12 ones, 4 zeros)
    hand = (3 * math.log(4 / 3) + math.log(4)) / 4 + (12 * math.log(4 / 3) + 4 * math.log(4)) / 16
    assert from_logits.item() == pytest.approx(hand, rel=1e-6)
    with pytest.raises(ValueError):
        selected_edge_loss(logits[:1], edges, selection)


# ---------------------------------------------------------------- Laplacian edge targets


def test_laplacian_edges_of_a_square_are_its_boundary_ring():
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:6, 2:6] = 1.0
    ring = mask.clone()
    ring[0, 3:5, 3:5] = 0.0  # rows/cols 2 and 5 of the square, corners included
    assert torch.equal(mask_edge_targets(mask), ring)
    soft = LaplacianEdges().soft_edges(mask)[0]
    # 8·centre − Σ 8 neighbours: corner 8 − 3 = 5, side 8 − 5 = 3, interior 8 − 8 = 0, outside < 0 → 0
    assert [soft[2, 2].item(), soft[2, 3].item(), soft[3, 3].item(), soft[1, 2].item()] == [
        5.0,
        3.0,
        0.0,
        0.0,
    ]
    full = torch.ones(1, 4, 4)  # the grid outside is background: the border is edge
    assert torch.equal(
        mask_edge_targets(full), torch.tensor([[[1.0] * 4, [1, 0, 0, 1], [1, 0, 0, 1], [1.0] * 4]])
    )
    assert mask_edge_targets(torch.zeros(2, 5, 5)).sum() == 0
    assert mask_edge_targets(torch.zeros(0, 5, 5)).shape == (0, 5, 5)


def test_laplacian_kernel_is_a_non_persistent_buffer():
    module = LaplacianEdges()
    assert list(module.parameters()) == []
    assert "kernel" in dict(module.named_buffers()) and "kernel" not in module.state_dict()
    assert module.kernel.sum() == 0 and module.kernel[0, 0, 1, 1] == 8
    mask = (torch.rand(3, 7, 7, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    assert torch.equal(module(mask), mask_edge_targets(mask))
    assert module.double().kernel.dtype == torch.float64


# ---------------------------------------------------------------- Eq. 5: budget


def test_budget_hinge_in_the_papers_unit():
    # C_t in G per instance, as Table 5 prints it: all-14 (0.23 G) is under C_t = 0.4
    cheap = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2, requires_grad=True)
    loss = budget_loss(cheap, GFLOPS, 0.4)
    loss.backward()
    assert loss.item() == 0.0 and cheap.grad.abs().sum() == 0
    large = torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 2)  # E = 1.40 G
    assert budget_loss(large, GFLOPS, 0.4).item() == pytest.approx(1.40 / 0.4 - 1)
    # the paper's default row, C_t = 1.0: all-112 exceeds it, so the budget binds (1.13 G in Table 5)
    assert budget_loss(large, GFLOPS, 1.0).item() == pytest.approx(0.40)
    mixed = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])  # E = (1.40 + 1.01) / 2
    assert budget_loss(mixed, GFLOPS, 1.0).item() == pytest.approx((1.40 + 1.01) / 2 - 1, rel=1e-6)
    assert budget_loss(mixed, GFLOPS, 1.3).item() == 0.0  # 1.205 G ≤ 1.3 G
    assert budget_loss(torch.zeros(0, 4), GFLOPS, 0.4).item() == 0.0
    with pytest.raises(ValueError):
        budget_loss(large, GFLOPS, 0.0)


def test_budget_on_the_straight_through_selection():
    """E(C) is the batch mean of the *selected* costs; its gradient reaches the logits through the
    soft Gumbel sample s: dL/dz_j = s_j (C_j − Σ_k s_k C_k) / (τ N C_t)."""
    logits = torch.zeros(3, 4, requires_grad=True)
    y = gumbel_softmax_select(
        logits, tau=0.5, hard=True, generator=torch.Generator().manual_seed(3)
    )
    loss = budget_loss(y, GFLOPS, 0.2)
    loss.backward()
    picked = GFLOPS[y.detach().argmax(dim=1)]
    assert loss.item() == pytest.approx(
        picked.mean().item() / 0.2 - 1, rel=1e-6
    )  # one-hot: real costs
    soft = gumbel_softmax_select(
        logits.detach(), tau=0.5, hard=False, generator=torch.Generator().manual_seed(3)
    )
    expected = soft * (GFLOPS - (soft * GFLOPS).sum(dim=1, keepdim=True)) / (0.5 * 3 * 0.2)
    assert torch.allclose(logits.grad, expected, atol=1e-6)
    assert (logits.grad[:, 0] < 0).all() and (
        logits.grad[:, 3] > 0
    ).all()  # towards 14, away from 112


def test_budget_on_probabilities_moves_them_to_cheaper_resolutions():
    logits = torch.zeros(3, 4, requires_grad=True)  # uniform: E = 0.815 G > 0.4
    loss = budget_loss(logits.softmax(dim=1), GFLOPS, 0.4)
    loss.backward()
    assert loss.item() == pytest.approx(GFLOPS.mean().item() / 0.4 - 1, rel=1e-6)
    # dL/dz_k = p_k (c_k − E) / (C_t N): negative for 14/28, positive for 56/112
    expected = 0.25 * (GFLOPS - GFLOPS.mean()) / (0.4 * 3)
    assert torch.allclose(logits.grad, expected.expand(3, 4), atol=1e-7)
    assert (logits.grad[:, :2] < 0).all() and (logits.grad[:, 2:] > 0).all()


# ---------------------------------------------------------------- Eq. 4: edges of the predicted masks


def _disc(side: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    c = (side - 1) / 2
    return (((yy - c) ** 2 + ((xx - c) * 1.3) ** 2) < (0.35 * side) ** 2).float()[None]


def test_predicted_mask_edges_of_a_confident_mask_are_the_ground_truth_edges():
    mask = _disc(20)
    edges = predicted_mask_edges((mask * 2 - 1) * 30)  # logits ±30: σ = 0 or 1 to 1e-13
    assert torch.allclose(edges, mask_edge_targets(mask).clamp(1e-4, 1 - 1e-4), atol=1e-6)
    # hand-checked pixels of a square: corner and side of the ring are edge, interior and outside not
    square = torch.zeros(1, 8, 8)
    square[0, 2:6, 2:6] = 1
    e = predicted_mask_edges((square * 2 - 1) * 30)[0]
    assert e[2, 2] > 0.999 and e[2, 4] > 0.999 and e[3, 3] < 1e-3 and e[1, 1] < 1e-3
    blurry = torch.zeros(1, 8, 8, requires_grad=True)  # σ = 0.5 everywhere: interior edges 0
    e = predicted_mask_edges(blurry)
    assert e[0, 3, 3].item() == pytest.approx(1e-4) and e[0, 0, 0].item() == pytest.approx(
        1 - 1e-4
    )  # corner: 8·½ − 3·½
    soft = (torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.3).requires_grad_()
    e = predicted_mask_edges(soft)
    e.sum().backward()  # unsaturated pixels (0 < Laplacian < 1) pass a gradient
    inside = (e > 1e-4) & (e < 1 - 1e-4)
    assert inside.any() and soft.grad.abs().sum() > 0


def test_edge_loss_of_predicted_masks_separates_resolutions_more_than_the_mask_loss():
    """Fig. 5 / §3.3: masks predicted at lower resolutions, resized to the target, have edge losses
    much further apart than their mask losses; a sharper mask has the lower edge loss."""
    target = _disc(112)
    edges = mask_edge_targets(target)
    mask_losses, edge_losses = [], []
    for side in (14, 28, 56, 112):
        low = F.interpolate(target[None], size=(side, side), mode="area")
        probs = F.interpolate(low, size=(112, 112), mode="bilinear", align_corners=False)[0].clamp(
            1e-4, 1 - 1e-4
        )
        logits = torch.log(probs / (1 - probs))
        sel = torch.ones(1, 1)
        mask_losses.append(selected_mask_loss([logits], [target], sel).item())
        edge_losses.append(
            selected_edge_loss(
                [predicted_mask_edges(logits)], [edges], sel, from_logits=False
            ).item()
        )
    assert edge_losses == sorted(edge_losses, reverse=True)  # 14 worst … 112 best
    assert mask_losses == sorted(mask_losses, reverse=True)
    assert edge_losses[0] - edge_losses[2] > 1.2 * (
        mask_losses[0] - mask_losses[2]
    )  # 0.084 vs 0.055


# ---------------------------------------------------------------- Eq. 6: entropy


def test_entropy_loss_is_minimal_at_uniform_batch_frequency():
    uniform = entropy_loss(torch.full((5, 4), 0.25)).item()
    assert uniform == pytest.approx(-math.log(4) / 4)
    balanced_one_hot = entropy_loss(torch.eye(4)).item()  # f uniform, rows one-hot
    assert balanced_one_hot == pytest.approx(uniform)
    skewed = entropy_loss(torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 5)).item()
    assert skewed > uniform
    assert (
        entropy_loss(torch.tensor([[0.0, 0.0, 1.0, 0.0]] * 3)).item() == 0.0
    )  # one resolution: max
    random_batches = (
        torch.randn(200, 6, 4, generator=torch.Generator().manual_seed(0)).mul(3).softmax(dim=-1)
    )
    assert min(entropy_loss(p).item() for p in random_batches) >= uniform - 1e-7
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]], requires_grad=True)
    entropy_loss(probs).backward()
    assert (
        torch.isfinite(probs.grad).all() and probs.grad[0, 0] > probs.grad[0, 3]
    )  # pushes the common one down


def _boxes(sizes):
    return torch.tensor([[10.0, 20.0, 10.0 + w, 20.0 + h] for w, h in sizes])


def test_size_rule_on_hand_picked_boxes():
    # k = floor(4 + log2(sqrt(wh) / 224)), clamped to [1, 4], minus 1
    boxes = _boxes(
        [
            (224, 224),  # 4 + log2(1) = 4                → 3 (112×112)
            (112, 112),  # 4 − 1 = 3                      → 2
            (56, 56),  # 4 − 2 = 2                      → 1
            (55, 55),  # 4 + log2(55/224) = 1.97 → 1    → 0
            (100, 400),  # sqrt = 200: 4 − 0.16 = 3.84 → 3 → 2
            (223, 224),  # 3.997 → 3                      → 2
            (10, 10),  # 4 − 4.49 = −0.49 → −1 → 1      → 0
            (800, 800),
        ]
    )  # 4 + 1.84 = 5.84 → 5 → 4       → 3
    out = size_based_resolution(boxes, canonical_size=224.0)
    assert out.dtype == torch.int64 and out.tolist() == [3, 2, 1, 0, 2, 2, 0, 3]
    # the input-image reading: sqrt(w0 h0) = sqrt(800 · 1250) = 1000
    image = _boxes([(1000, 1000), (500, 500), (250, 250), (249, 250)])  # 4, 3, 2, floor(1.99) = 1
    assert size_based_resolution(image, canonical_size=1000.0).tolist() == [3, 2, 1, 0]
    per_box = size_based_resolution(
        _boxes([(250, 250)] * 2), canonical_size=torch.tensor([1000.0, 224.0])
    )
    assert per_box.tolist() == [1, 3]  # 2 and floor(4.16) = 4
    assert size_based_resolution(_boxes([(0, 5)]), canonical_size=224.0).tolist() == [
        0
    ]  # empty box: smallest
    assert size_based_resolution(torch.zeros(0, 4), canonical_size=224.0).shape == (0,)


# ---------------------------------------------------------------- FAM


def test_fam_shapes_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    fam = FeatureAggregationModule(channels=8)
    region, pyramid = (
        torch.randn(2, 8, 6, 6, requires_grad=True),
        torch.randn(2, 8, 6, 6, requires_grad=True),
    )
    out = fam(region, pyramid)
    assert out.shape == (2, 8, 6, 6)
    out.square().sum().backward()
    for name, p in fam.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
    assert region.grad.abs().sum() > 0 and pyramid.grad.abs().sum() > 0
    assert fam(torch.zeros(0, 8, 6, 6), torch.zeros(0, 8, 6, 6)).shape == (0, 8, 6, 6)


def test_fam_at_init_is_the_same_computation_with_plain_convs():
    torch.manual_seed(1)
    fam = FeatureAggregationModule(channels=8, deform_groups=2)
    region, pyramid = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    aligned = F.relu(F.conv2d(region, fam.align_conv.weight, fam.align_conv.bias, padding=1))
    fused = F.relu(F.conv2d(torch.cat([aligned, pyramid], 1), fam.fuse.weight, fam.fuse.bias))
    plain = F.relu(F.conv2d(fused, fam.attend_conv.weight, fam.attend_conv.bias, padding=1))
    with torch.no_grad():
        assert torch.allclose(fam(region, pyramid), plain, atol=1e-5)
        torch.nn.init.constant_(fam.align_offset.bias, 0.5)  # offsets are really used
        assert not torch.allclose(fam(region, pyramid), plain, atol=1e-3)
