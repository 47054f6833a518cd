"""DR1Mask: DR1Conv, aligned upsampling, DR1Basis, factored attention, the panoptic layer, and the model."""

import factories
import pytest
import torch
from torch.nn import functional as F
from torchvision.ops import FeaturePyramidNetwork

from dynaseg.config.presets import load_config
from dynaseg.layers.aligned_upsample import aligned_upsample, nearest_upsample_crop
from dynaseg.layers.dr1conv import DR1Conv2d
from dynaseg.modeling.build import build_model
from dynaseg.modeling.dr1mask.basis import DR1Basis
from dynaseg.modeling.dr1mask.instance_head import InstancePredictor, dynamic_projection
from dynaseg.modeling.dr1mask.panoptic import (
    group_duplicate_detections,
    mean_embeddings_per_instance,
    panoptic_logits,
    panoptic_loss,
    panoptic_postprocess,
    panoptic_targets,
)
from dynaseg.modeling.dr1mask.top_layer import DR1TopLayer
from dynaseg.modeling.one_stage.blender import blend
from dynaseg.structures import Instances
from dynaseg.structures.panoptic import IGNORE_LABEL, PanopticSegmentation

# ---------------------------------------------------------------- DR1Conv (Eq. 2-4)


def test_dr1conv_1x1_is_a_per_pixel_rank1_modulated_weight():
    """Eq. 2: y_p = (W ∘ b_p a_pᵀ) x_p at every pixel p."""
    torch.manual_seed(0)
    conv = DR1Conv2d(5, 3, kernel_size=1).double()
    x, a, b = (
        torch.randn(2, 5, 4, 6).double(),
        torch.randn(2, 5, 4, 6).double(),
        torch.randn(2, 3, 4, 6).double(),
    )
    y = conv(x, a, b)
    w = conv.weight[:, :, 0, 0]
    for n in range(2):
        for i in range(4):
            for j in range(6):
                modulated = w * torch.outer(b[n, :, i, j], a[n, :, i, j])
                assert torch.allclose(y[n, :, i, j], modulated @ x[n, :, i, j], atol=1e-12)


def test_dr1conv_3x3_matches_slow_reference():
    """Eq. 3-4: y_p = b_p ∘ Σ_taps W_t (x ∘ a)_{p+t}, zero padding."""
    torch.manual_seed(1)
    conv = DR1Conv2d(3, 2, kernel_size=3).double()
    x, a, b = (
        torch.randn(1, 3, 5, 4).double(),
        torch.randn(1, 3, 5, 4).double(),
        torch.randn(1, 2, 5, 4).double(),
    )
    xa = F.pad(x * a, (1, 1, 1, 1))
    ref = torch.zeros(1, 2, 5, 4, dtype=torch.float64)
    for i in range(5):
        for j in range(4):
            for dy in range(3):
                for dx in range(3):
                    ref[0, :, i, j] += conv.weight[:, :, dy, dx] @ xa[0, :, i + dy, j + dx]
    assert torch.allclose(conv(x, a, b), ref * b, atol=1e-12)
    assert torch.autograd.gradcheck(
        conv, (x.requires_grad_(), a.requires_grad_(), b.requires_grad_())
    )


def test_dr1conv_with_unit_or_missing_factors_is_the_plain_conv():
    torch.manual_seed(2)
    conv = DR1Conv2d(4, 4)
    x = torch.randn(1, 4, 7, 7)
    plain = F.conv2d(x, conv.weight, padding=1)
    ones = torch.ones(1, 4, 7, 7)
    assert torch.equal(conv(x, ones, ones), plain) and torch.equal(conv(x), plain)
    assert conv.bias is None


def test_new_top_layer_gives_unit_factors_so_dr1basis_starts_as_its_static_pyramid():
    torch.manual_seed(3)
    top = DR1TopLayer(in_channels=8, embedding_dim=5, basis_channels=4)
    feats = [torch.randn(2, 8, s, s) for s in (8, 4, 2)]
    context = top.context_factors(feats)
    assert all(
        torch.equal(a, torch.ones_like(a)) and torch.equal(b, torch.ones_like(b))
        for a, b in context
    )
    basis = DR1Basis(in_channels=8, channels=4, num_levels=3, norm="GN").eval()
    static = DR1Basis(in_channels=8, channels=4, num_levels=3, norm="GN", factors="none").eval()
    static.load_state_dict(basis.state_dict())
    assert torch.allclose(basis(feats, context, (16, 16)), static(feats, context, (16, 16)))
    # and the context does act once it is not 1
    context = [(a * 2, b) for a, b in context]
    assert not torch.allclose(basis(feats, context, (16, 16)), static(feats, context, (16, 16)))


def test_top_layer_embeddings_at_locations_equal_the_dense_conv():
    torch.manual_seed(4)
    top = DR1TopLayer(in_channels=6, embedding_dim=9, basis_channels=2)
    feats = [torch.randn(2, 6, 5, 4), torch.randn(2, 6, 3, 2)]
    dense = [top.embedding(f) for f in feats]
    image, loc = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 7, 19, 25])
    got = top.embeddings_at(feats, image, loc)
    flat = [torch.cat([d[b].flatten(1) for d in dense], dim=1).T for b in range(2)]
    assert torch.allclose(
        got, torch.stack([flat[b][i] for b, i in zip(image.tolist(), loc.tolist())]), atol=1e-6
    )


def test_context_position_is_validated():
    with pytest.raises(ValueError, match="context_position"):
        DR1TopLayer(in_channels=4, embedding_dim=4, basis_channels=2, context_position="head")


# ---------------------------------------------------------------- aligned upsampling (§3.3, Table 5)


def test_aligned_upsample_puts_coarse_cell_i_on_fine_cell_2i():
    x = torch.randn(1, 2, 5, 3)
    for size in ((10, 6), (9, 5), (10, 5)):
        up = aligned_upsample(x, size)
        assert up.shape[-2:] == size
        assert torch.allclose(
            up[..., ::2, ::2], x[..., : (size[0] + 1) // 2, : (size[1] + 1) // 2], atol=1e-6
        )
        assert torch.allclose(
            up[..., 1:-1:2, 0],
            (x[..., :-1, 0] + x[..., 1:, 0])[..., : up[..., 1:-1:2, 0].shape[-1]] / 2,
            atol=1e-6,
        )
    with pytest.raises(ValueError, match="cannot upsample"):
        aligned_upsample(x, (12, 6))


def test_stride2_conv_then_aligned_upsample_keeps_a_linear_ramp_in_place():
    """A 3×3 stride-2 conv samples fine cell 2i; upsampling back must return the ramp unshifted."""
    ramp = torch.arange(11.0).view(1, 1, 1, 11).expand(1, 1, 11, 11)
    pick = torch.zeros(1, 1, 3, 3)
    pick[0, 0, 1, 1] = 1.0
    coarse = F.conv2d(ramp, pick, stride=2, padding=1)  # 6×6: values 0, 2, …, 10
    back = aligned_upsample(coarse, (11, 11))
    assert torch.allclose(back, ramp)


def test_fpn_crop_equals_torchvision_for_even_sizes_and_runs_for_odd_ones():
    from dynaseg.modeling.backbone.fpn import ResNetFPN
    from dynaseg.modeling.backbone.resnet import ResNet

    torch.manual_seed(5)
    fpn = ResNetFPN(body=ResNet(depth=18, width=8, norm="BN", freeze_at=0), out_channels=8).eval()
    x = torch.randn(1, 3, 64, 96)
    c = {k: v for k, v in fpn.body(x).items() if k in fpn.in_features}
    ours = fpn.fpn(c)
    reference = FeaturePyramidNetwork.forward(fpn.fpn, c)
    assert all(torch.equal(a, b) for a, b in zip(ours.values(), reference.values()))
    out = fpn(torch.randn(1, 3, 804 // 4, 1204 // 4))  # 201 × 301: odd levels
    assert [tuple(v.shape[-2:]) for v in out.values()] == [
        (26, 38),
        (13, 19),
        (7, 10),
        (4, 5),
        (2, 3),
    ]
    assert torch.equal(
        nearest_upsample_crop(torch.arange(3.0).view(1, 1, 1, 3), (1, 5)),
        torch.tensor([[[[0.0, 0.0, 1.0, 1.0, 2.0]]]]),
    )


# ---------------------------------------------------------------- instance prediction (Eq. 7-8, Table 4)


def test_factored_attention_equals_explicit_u_diag_s_v():
    torch.manual_seed(6)
    pred = InstancePredictor(kind="factored", channels=3, num_bases=2, attention_size=5, rank=3)
    e = torch.randn(4, pred.embedding_dim)
    assert pred.embedding_dim == 2 * 3 + 2 * 3
    q = pred.attention(e)
    s = e[:, 6:].view(4, 2, 3)
    for n in range(4):
        for k in range(2):
            assert torch.allclose(q[n, k], pred.u[k] @ torch.diag(s[n, k]) @ pred.v[k], atol=1e-6)


@pytest.mark.parametrize("kind", ["factored", "full", "vector"])
def test_instance_predictor_matches_explicit_projection_and_blend(kind):
    torch.manual_seed(7)
    pred = InstancePredictor(kind=kind, channels=3, num_bases=2, attention_size=4, rank=2)
    pooled = torch.randn(3, 3, 8, 8)
    e = torch.randn(5, pred.embedding_dim)
    src = torch.tensor([2, 0, 2, 1, 0])
    got = pred(pooled, e, src)
    crops = pooled[src]
    if kind == "vector":
        expected = (e[:, :, None, None] * crops).sum(1)
    else:
        w = e[:, :6].view(5, 2, 3)
        projected = torch.einsum("nkc,nchw->nkhw", w, crops)
        a = e[:, 6:].view(5, 2, 4, 4) if kind == "full" else pred.attention(e)
        expected = blend(projected, a)
    assert got.shape == (5, 8, 8) and torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(pred(crops, e), expected, atol=1e-5)  # one crop per embedding


def test_dynamic_projection_grouped_equals_gathered():
    torch.manual_seed(8)
    pooled, w = torch.randn(4, 6, 5, 5), torch.randn(9, 3, 6)
    src = torch.tensor([3, 3, 0, 1, 3, 0, 2, 2, 1])
    assert torch.allclose(
        dynamic_projection(pooled, w, src),
        torch.einsum("nkc,nchw->nkhw", w, pooled[src]),
        atol=1e-5,
    )


def test_panoptic_columns_use_the_embedding_or_its_own_slice():
    vec = InstancePredictor(kind="vector", channels=4)
    e = torch.randn(2, 4)
    assert torch.equal(vec.panoptic_columns(e), e)
    fac = InstancePredictor(kind="factored", channels=4, panoptic=True)
    e = torch.randn(2, fac.embedding_dim)
    assert fac.embedding_dim == 4 * 4 + 16 + 4 and torch.equal(fac.panoptic_columns(e), e[:, -4:])
    with pytest.raises(RuntimeError, match="panoptic"):
        InstancePredictor(kind="factored", channels=4).panoptic_columns(e)


# ---------------------------------------------------------------- panoptic layer (Eq. 9)


def test_panoptic_logits_equal_the_concatenated_weight_product_per_pixel():
    torch.manual_seed(9)
    feats, stuff, things = torch.randn(4, 3, 5), torch.randn(2, 4), torch.randn(3, 4)
    y = panoptic_logits(feats, stuff, things)
    w = torch.cat([stuff, things])
    assert y.shape == (5, 3, 5)
    for i in range(3):
        for j in range(5):
            assert torch.allclose(y[:, i, j], w @ feats[:, i, j], atol=1e-6)


def test_mean_embeddings_per_instance():
    e = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [0.0, 4.0]])
    means, present = mean_embeddings_per_instance(e, torch.tensor([0, 0, 2, 2]), 3)
    assert present.tolist() == [True, False, True]
    assert torch.equal(means, torch.tensor([[2.0, 1.0], [2.5, 4.5]]))


def test_duplicates_of_one_object_of_any_class_form_one_test_time_instance():
    boxes = torch.tensor(
        [[0.0, 0, 10, 10], [1, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 6], [30, 30, 40, 40]]
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    kept, group = group_duplicate_detections(boxes, scores, 0.5)
    assert kept.tolist() == [0, 2, 4] and group.tolist() == [
        0,
        0,
        1,
        0,
        2,
    ]  # box 3: IoU 0.6 with box 0
    kept, group = group_duplicate_detections(boxes, scores, 0.65)
    assert kept.tolist() == [0, 2, 3, 4] and group.tolist() == [0, 0, 1, 2, 3]


def test_panoptic_targets_paint_instances_with_rows_and_ignore_the_rest():
    sem = torch.full((8, 8), IGNORE_LABEL)
    sem[:4] = 0  # stuff 0 on the top half
    sem[4:, :4] = 1
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 4:, 4:6] = True  # present → row 0 → label 2
    masks[1, 6:, 6:] = True  # absent → stays ignored
    masks[2, 4:6, 6:] = True  # present → row 1 → label 3
    t = panoptic_targets(sem, masks, torch.tensor([True, False, True]), num_stuff=2, stride=2)
    assert t.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 2, 3], [1, 1, 2, IGNORE_LABEL]]


def test_panoptic_loss_is_cross_entropy_over_labelled_pixels():
    logits = [torch.randn(3, 2, 2), torch.randn(4, 2, 2)]
    targets = [
        torch.tensor([[0, 2], [IGNORE_LABEL, 1]]),
        torch.tensor([[3, IGNORE_LABEL], [IGNORE_LABEL, 0]]),
    ]
    ce = [
        F.cross_entropy(lg[:, i, j][None], torch.tensor([int(t[i, j])]))
        for lg, t in zip(logits, targets)
        for i in range(2)
        for j in range(2)
        if t[i, j] != IGNORE_LABEL
    ]
    assert torch.allclose(panoptic_loss(logits, targets, 0.5), 0.5 * torch.stack(ce).mean())


def test_panoptic_postprocess_segments_labels_scores_and_stuff_area():
    logits = torch.full((4, 4, 4), -5.0)  # 2 stuff + 2 things at stride 2 → 8×8 input
    logits[0, :2] = 5.0  # stuff 0: top half
    logits[1, 2:, :1] = 5.0  # stuff 1: a small patch
    logits[2, 2:, 1:3] = 5.0  # thing row 0
    logits[3, 2:, 3:] = 5.0  # thing row 1
    things = Instances(
        image_size=(8, 8),
        boxes=torch.tensor([[2.0, 4.0, 6.0, 8.0], [6.0, 4.0, 8.0, 8.0]]),
        labels=torch.tensor([5, 1]),
        scores=torch.tensor([0.9, 0.6]),
    )
    pan = panoptic_postprocess(
        logits, things, num_stuff=2, stride=2, input_size=(8, 8), min_stuff_area=9
    )
    assert isinstance(pan, PanopticSegmentation) and pan.image_size == (8, 8)
    kinds = [(s.isthing, s.label, s.area) for s in pan.segments]
    assert kinds == [(False, 0, 32), (True, 5, 16), (True, 1, 8)]  # stuff 1 (8 px) dropped to void
    assert (pan.ids[4:, :2] == 0).all() and (pan.ids[:4] == 1).all()
    assert [s.score for s in pan.segments] == [1.0, pytest.approx(0.9), pytest.approx(0.6)]
    # restricted to its box, thing row 1 cannot win the pixel column x=5 even with a huge logit
    logits[3, 2:, 2] = 50.0
    free = panoptic_postprocess(logits, things, num_stuff=2, stride=2, input_size=(8, 8))
    boxed = panoptic_postprocess(
        logits, things, num_stuff=2, stride=2, input_size=(8, 8), restrict_to_boxes=True
    )
    assert (free.ids[4:, 5] == free.ids[4, 7]).all() and (boxed.ids[4:, 5] != boxed.ids[4, 7]).all()


# ---------------------------------------------------------------- whole model


def tiny(name="dr1mask_tiny", **overrides):
    cfg = load_config(name, [f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    return build_model(cfg.model), cfg


def make_batch(sizes=((97, 131), (130, 98)), empty=False, panoptic=False, with_targets=True):
    """Odd sizes padded to a multiple of 4 (DR1Mask's size divisibility)."""
    return factories.make_batch(
        sizes, divisibility=4, empty=empty, panoptic=panoptic, with_targets=with_targets
    )


@pytest.mark.parametrize(
    "name,attention",
    [
        ("dr1mask_tiny", "factored"),
        ("dr1mask_tiny", "full"),
        ("dr1mask_tiny", "vector"),
        ("dr1mask_panoptic_tiny", "vector"),
        ("dr1mask_panoptic_tiny", "factored"),
    ],
)
def test_every_parameter_gets_a_gradient_on_odd_sizes(name, attention):
    model, _ = tiny(name, **{"model.dr1.attention": attention})
    model.train()
    panoptic = "panoptic" in name
    losses = model(make_batch(panoptic=panoptic))
    expected = {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_mask"}
    expected |= {"loss_panoptic"} if panoptic else {"loss_basis_sem"}
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"


def test_p2_into_p3_trains_on_odd_sizes():
    model, _ = tiny(**{"model.backbone.fpn_p2_into_p3": "true"})
    assert model.backbone.layout == "p2p7"
    model.train()
    sum(model(make_batch()).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"  # P2's lateral and output conv included


@pytest.mark.parametrize(
    ("position", "factors"), [("cls_tower", "pre"), ("fpn", "post"), ("box_tower", "none")]
)
def test_context_positions_and_factor_ablations_train(position, factors):
    """Table 3: the context conv reads the configured features; Table 1: only the configured factors
    reach DR1Basis's DR1Convs."""
    model, _ = tiny(
        **{"model.dr1.context_position": position, "model.dr1.dynamic_factors": factors}
    )
    model.train()
    seen = {"context": [], "merge": []}
    captured = {}
    model.backbone.register_forward_hook(lambda m, args, out: captured.setdefault("fpn", out))
    model.fcos_head.register_forward_hook(lambda m, args, out: captured.setdefault("head", out))
    model.top_layer.context.register_forward_hook(
        lambda m, args, out: seen["context"].append(args[0])
    )
    for conv in model.basis.merge:
        conv.register_forward_pre_hook(lambda m, args: seen["merge"].append(args[1:]))
    sum(model(make_batch()).values()).backward()
    head, fpn = captured["head"], captured["fpn"]
    source = {
        "cls_tower": head.cls_tower,
        "box_tower": head.box_tower,
        "fpn": [fpn[f"p{i}"] for i in range(3, 3 + len(model.strides))],
    }[position]
    assert len(seen["context"]) == len(source)
    assert all(x is y for x, y in zip(seen["context"], source))
    use_a, use_b = factors in ("both", "pre"), factors in ("both", "post")
    assert seen["merge"] and all(
        (a is not None) == use_a and (b is not None) == use_b for a, b in seen["merge"]
    )
    assert (model.top_layer.context.weight.grad is not None) == (use_a or use_b)


def test_empty_ground_truth_and_panoptic_without_sem_seg():
    model, _ = tiny("dr1mask_panoptic_tiny")
    model.train()
    losses = model(make_batch(empty=True, panoptic=True))
    assert losses["loss_mask"] == 0 and losses["loss_panoptic"] > 0  # stuff pixels still supervised
    sum(losses.values()).backward()
    with pytest.raises(ValueError, match="sem_seg"):
        model(make_batch())


def test_inference_on_odd_sizes_instance_and_panoptic():
    model, _ = tiny(**{"model.fcos.score_threshold": 0.0})
    model.eval()
    out = model(make_batch(with_targets=False))
    assert [o.image_size for o in out] == [(194, 262), (260, 196)]
    assert all(0 < len(o) <= 100 and o.masks.shape[1:] == o.image_size for o in out)
    model, _ = tiny(
        "dr1mask_panoptic_tiny",
        **{"model.fcos.score_threshold": 0.0, "model.dr1.panoptic_score_threshold": 0.0},
    )
    model.eval()
    out = model(make_batch(with_targets=False))
    for pan in out:
        assert isinstance(pan, PanopticSegmentation) and pan.image_size == pan.instances.image_size
        present = set(pan.ids.unique().tolist()) - {0}
        assert present == {s.id for s in pan.segments}
        assert sum(s.area for s in pan.segments) == int((pan.ids > 0).sum())


def test_a_few_steps_on_one_batch_reduce_every_loss():
    """The model learns: 40 SGD steps on a fixed panoptic batch cut the mask and panoptic losses."""
    model, _ = tiny("dr1mask_panoptic_tiny", **{"model.dr1.attention": "factored"})
    model.train()
    batch = make_batch(panoptic=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    first = None
    for _ in range(40):
        losses = model(batch)
        first = first or {k: v.item() for k, v in losses.items()}
        opt.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    last = {k: v.item() for k, v in model(batch).items()}
    assert last["loss_mask"] < 0.7 * first["loss_mask"], (first, last)
    assert last["loss_panoptic"] < 0.5 * first["loss_panoptic"], (first, last)
    assert last["loss_fcos_cls"] < first["loss_fcos_cls"], (first, last)


def test_dr1basis_recursion_is_eq6_from_the_coarsest_level_down():
    """F^L = σ(DR1Conv_{A^L,B^L}(Conv(P^L))), F^l = σ(DR1Conv_{A^l,B^l}(Conv(P^l) + Up(F^{l+1}))),
    F = σ(Conv3×3(Up(F^3))), written out level by level with plain F.conv2d (norm "none")."""
    torch.manual_seed(0)
    basis = DR1Basis(
        in_channels=6, channels=4, num_levels=3, norm="none", aligned_upsample=False
    ).eval()
    for conv in basis.reduce:
        torch.nn.init.normal_(conv.bias)
    p = [torch.randn(1, 6, s, s) for s in (12, 6, 3)]  # P3, P4, P5
    ctx = [
        (1 + 0.5 * torch.randn(1, 4, s, s), 1 + 0.5 * torch.randn(1, 4, s, s)) for s in (12, 6, 3)
    ]
    with torch.no_grad():
        out = basis(p, ctx, output_size=(24, 24))

        def conv(lv, x):
            return F.conv2d(x, basis.reduce[lv].weight, basis.reduce[lv].bias, padding=1)

        def dr1(lv, x):
            a, b = ctx[lv]
            return F.conv2d(x * a, basis.merge[lv].weight, padding=1) * b

        def up(x, s):
            return F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)

        f5 = torch.relu(dr1(2, conv(2, p[2])))
        f4 = torch.relu(dr1(1, conv(1, p[1]) + up(f5, 6)))
        f3 = torch.relu(dr1(0, conv(0, p[0]) + up(f4, 12)))
        out_conv = basis.output[0]
        expected = torch.relu(F.conv2d(up(f3, 24), out_conv.weight, out_conv.bias, padding=1))
    assert torch.allclose(out, expected, atol=1e-5)


# Loss locks: update deliberately (print shows the new values) when the model's maths changes.
EXPECTED_LOSSES = {
    "dr1mask_tiny": {
        "loss_fcos_cls": 1.1142,
        "loss_fcos_loc": 1.0001,
        "loss_fcos_ctr": 0.7001,
        "loss_mask": 0.7086,
        "loss_basis_sem": 0.7011,
    },
    "dr1mask_panoptic_tiny": {
        "loss_fcos_cls": 1.1191,
        "loss_fcos_loc": 0.9996,
        "loss_fcos_ctr": 0.6976,
        "loss_mask": 0.6501,
        "loss_panoptic": 1.3685,
    },
}


@pytest.mark.parametrize("name", list(EXPECTED_LOSSES))
def test_loss_lock(name):
    model, _ = tiny(name)
    model.train()
    batch = make_batch(panoptic="panoptic" in name)
    losses = {k: round(v.item(), 4) for k, v in model(batch).items()}
    expected = EXPECTED_LOSSES[name]
    same = losses.keys() == expected.keys() and all(
        abs(losses[k] - expected[k]) < 2e-3 for k in losses
    )
    assert same, f"Losses have changed! New losses: {losses}"
