"""BlendMask: blender equation, sparse top layer, targets, and whole-model behaviour on tiny inputs."""

import factories
import pytest
import torch
from torch.nn import functional as F

from dynaseg.config.overrides import ConfigError
from dynaseg.config.presets import load_config
from dynaseg.modeling.blendmask.attention import AttentionTopLayer
from dynaseg.modeling.build import build_model
from dynaseg.modeling.one_stage.blender import blend, blender_mask_loss
from dynaseg.modeling.one_stage.semantic import IGNORE_INDEX, semantic_targets
from dynaseg.structures.masks import crop_and_resize, paste_masks


def slow_blend(pooled, attention):
    """Per instance, per pixel: Σ_k softmax_k(bilinear(a))[k, y, x] · r[k, y, x]."""
    n, k, r, _ = pooled.shape
    out = torch.zeros(n, r, r, dtype=pooled.dtype)
    for i in range(n):
        up = F.interpolate(attention[i : i + 1], size=(r, r), mode="bilinear", align_corners=False)[
            0
        ]
        for y in range(r):
            for x in range(r):
                w = torch.exp(up[:, y, x]) / torch.exp(up[:, y, x]).sum()
                out[i, y, x] = (w * pooled[i, :, y, x]).sum()
    return out


def test_blend_matches_slow_reference_and_gradcheck():
    torch.manual_seed(0)
    pooled = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    attention = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    assert torch.allclose(blend(pooled, attention), slow_blend(pooled, attention), atol=1e-10)
    assert torch.autograd.gradcheck(
        blend,
        (
            pooled[:1, :, :4, :4].clone().requires_grad_(),
            attention[:1, :, :2, :2].clone().requires_grad_(),
        ),
    )
    assert blend(pooled[:0], attention[:0]).shape == (0, 8, 8)


def test_uniform_attention_averages_the_bases():
    pooled = torch.randn(2, 4, 6, 6)
    assert torch.allclose(blend(pooled, torch.zeros(2, 4, 3, 3)), pooled.mean(dim=1), atol=1e-6)


def test_sparse_top_layer_equals_dense_conv():
    torch.manual_seed(0)
    layer = AttentionTopLayer(in_channels=5, num_bases=2, attention_size=3)
    torch.nn.init.normal_(layer.conv.weight)
    torch.nn.init.normal_(layer.conv.bias)
    tower = [torch.randn(2, 5, 6, 7), torch.randn(2, 5, 3, 4)]
    dense = [d.flatten(2).transpose(1, 2) for d in layer.forward_dense(tower)]  # (B, HW, KMM)
    dense = torch.cat(dense, dim=1)
    image = torch.tensor([0, 1, 1, 0, 1])
    location = torch.tensor([0, 41, 6 * 7 + 11, 6 * 7, 20])  # corners, both levels
    sparse = layer(tower, image, location)
    assert sparse.shape == (5, 2, 3, 3)
    assert torch.allclose(sparse.flatten(1), dense[image, location], atol=1e-5)


def test_mask_loss_weighting():
    logits = torch.zeros(2, 4, 4)
    targets = torch.ones(2, 4, 4)
    loss = blender_mask_loss(logits, targets, torch.tensor([1.0, 0.0]), torch.tensor(2.0))
    assert torch.isclose(loss, torch.log(torch.tensor(2.0)) / 2)
    assert blender_mask_loss(logits[:0], targets[:0], torch.zeros(0), torch.tensor(1.0)) == 0


def test_crop_and_resize_and_paste_round_trip():
    masks = torch.zeros(1, 40, 50, dtype=torch.bool)
    masks[0, 10:30, 5:45] = True
    box = torch.tensor([[5.0, 10.0, 45.0, 30.0]])
    crop = crop_and_resize(masks, box, 16)
    assert crop.shape == (1, 16, 16) and crop.min() == 1  # the box is all foreground
    pasted = paste_masks(crop, box, (40, 50))
    assert torch.equal(pasted, masks)


def test_paste_keeps_border_objects_unsquashed():
    # A mask predicted on a box clipped to the image must land exactly on the clipped box.
    probs = torch.ones(1, 8, 8)
    pasted = paste_masks(probs, torch.tensor([[0.0, 0.0, 10.0, 20.0]]), (20, 30))
    assert pasted[0].sum() == 200 and pasted[0, :, 10:].sum() == 0


def test_semantic_targets_centres_and_ignore():
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, :8, :8] = True
    masks[1, 4:12, 4:12] = True  # painted later: wins where they overlap
    sem = semantic_targets([masks], [torch.tensor([0, 2])], (24, 24), stride=8)
    assert sem.shape == (1, 3, 3)
    # cell centres at 4, 12, 20; (4, 4) is under both masks; x or y = 20 lies in the padding
    i = IGNORE_INDEX
    assert sem[0].tolist() == [[3, 0, i], [0, 0, i], [i, i, i]]


def tiny_model(**overrides):
    cfg = load_config("blendmask_tiny", [f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    return build_model(cfg.model), cfg


def make_batch(sizes=((96, 128), (90, 117)), with_targets=True, empty=False):
    return factories.make_batch(sizes, with_targets=with_targets, empty=empty)


def test_every_parameter_gets_a_gradient():
    model, _ = tiny_model()
    model.train()
    losses = model(make_batch())
    assert set(losses) == {
        "loss_fcos_cls",
        "loss_fcos_loc",
        "loss_fcos_ctr",
        "loss_mask",
        "loss_basis_sem",
    }
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"


def test_empty_ground_truth_losses():
    model, _ = tiny_model()
    model.train()
    losses = model(make_batch(empty=True))
    assert losses["loss_fcos_cls"] > 0
    assert (
        losses["loss_fcos_loc"] == 0 and losses["loss_fcos_ctr"] == 0 and losses["loss_mask"] == 0
    )
    sum(losses.values()).backward()


def test_odd_sizes_inference_at_original_resolution():
    model, _ = tiny_model(**{"model.fcos.score_threshold": 0.0})
    model.eval()
    out = model(make_batch(sizes=((97, 131), (64, 65)), with_targets=False))
    assert [o.image_size for o in out] == [(194, 262), (128, 130)]
    for o in out:
        assert (
            0 < len(o) <= 100 and o.masks.shape[1:] == o.image_size and o.masks.dtype == torch.bool
        )
        assert (o.boxes[:, 2] <= o.image_size[1]).all() and (o.boxes[:, 3] <= o.image_size[0]).all()
        assert (o.scores[:-1] >= o.scores[1:]).all()


def test_no_detections_gives_empty_typed_output():
    model, _ = tiny_model(**{"model.fcos.score_threshold": 1.0})
    model.eval()
    out = model(make_batch(with_targets=False))
    assert (
        len(out[0]) == 0
        and out[0].masks.shape == (0, 192, 256)
        and out[0].masks.dtype == torch.bool
    )


# Loss lock: update deliberately (print shows the new values) when the model's maths changes.
EXPECTED_LOSSES = {
    "loss_fcos_cls": 1.1226,
    "loss_fcos_loc": 0.9994,
    "loss_fcos_ctr": 0.6924,
    "loss_mask": 0.8259,
    "loss_basis_sem": 0.6413,
}


def test_loss_lock():
    model, _ = tiny_model()
    model.train()
    losses = {k: round(v.item(), 4) for k, v in model(make_batch()).items()}
    same = losses.keys() == EXPECTED_LOSSES.keys() and all(
        abs(losses[k] - EXPECTED_LOSSES[k]) < 2e-3 for k in losses
    )
    assert same, f"Losses have changed! New losses: {losses}"


def test_stride_4_level_runs_fcos_on_p2_and_keeps_the_bases_on_p3():
    p2 = {"model.fcos.strides": "[4,8,16,32,64]", "model.fcos.sizes_of_interest": "[16,32,64,128]"}
    model, _ = tiny_model(**p2)
    reference, _ = tiny_model()
    batch = make_batch()
    features = model.backbone(model.normalize(batch.images, batch.image_sizes))
    assert model.backbone.strides == {f"p{i}": 2**i for i in range(2, 7)}
    levels = model.fcos_levels(features)
    assert [x.shape[-1] for x in levels] == [
        batch.images.shape[-1] // s for s in (4, 8, 16, 32, 64)
    ]
    assert model.basis_levels(features)[0] is features["p3"]
    ref_features = reference.backbone(reference.normalize(batch.images, batch.image_sizes))
    assert (
        model.basis(model.basis_levels(features)).shape
        == reference.basis(reference.basis_levels(ref_features)).shape
    )
    model.train()
    sum(model(batch).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"


def test_stride_4_skip_feeds_p2_into_the_bases_only():
    model, _ = tiny_model(**{"model.basis.stride4_skip": "true"})
    assert model.backbone.strides == {f"p{i}": 2**i for i in range(2, 8)}
    batch = make_batch(sizes=((96, 128), (90, 117)))
    features = model.backbone(model.normalize(batch.images, batch.image_sizes))
    assert [x.shape[-1] for x in model.fcos_levels(features)] == [16, 8, 4, 2, 1]
    model.eval()
    levels, p2 = model.basis_levels(features), features["p2"]
    bases = model.basis(levels, p2)
    assert bases.shape[-2:] == p2.shape[-2:] == (24, 32)
    # Bases change where P2 changes and nowhere else beyond the 3×3 blocks' reach.
    bumped = p2.clone()
    bumped[:, :, 10, 10] += 5.0
    diff = (model.basis(levels, bumped) - bases).abs().amax(dim=(0, 1))
    assert diff[10, 10] > 0
    assert diff[:, 14:].abs().max() == 0 and diff[14:].abs().max() == 0
    with pytest.raises(ValueError, match="pass p2"):
        model.basis(levels)
    model.train()
    sum(model(batch).values()).backward()
    assert model.basis.skip[0].weight.grad.abs().sum() > 0


def test_stride_4_skip_needs_p3p7_or_p2_fcos():
    with pytest.raises(ConfigError, match="stride4_skip=true needs P2"):
        tiny_model(
            **{
                "model.basis.stride4_skip": "true",
                "model.fcos.strides": "[8,16,32]",
                "model.fcos.sizes_of_interest": "[64,128]",
            }
        )
    p2_fcos, _ = tiny_model(
        **{
            "model.basis.stride4_skip": "true",
            "model.fcos.strides": "[4,8,16,32,64]",
            "model.fcos.sizes_of_interest": "[16,32,64,128]",
        }
    )
    assert p2_fcos.backbone.layout == "p2p6conv"


def test_p2_into_p3_adds_a_strided_conv_of_p2_to_p3_only():
    model, _ = tiny_model(
        **{"model.basis.stride4_skip": "true", "model.backbone.fpn_p2_into_p3": "true"}
    )
    fpn, conv = model.backbone, model.backbone.p3_from_p2
    torch.nn.init.normal_(conv.bias)  # zero at init: make it count
    images = torch.randn(1, 3, 90, 118)  # sizes not divisible by 8
    with torch.no_grad():
        out = fpn(images)
        fpn.p3_from_p2 = None
        plain = fpn(images)
        fpn.p3_from_p2 = conv
    p3 = plain["p3"]
    expected = p3 + F.conv2d(plain["p2"], conv.weight, conv.bias, stride=2, padding=1)
    assert torch.allclose(out["p3"], expected, atol=1e-5)
    assert not torch.allclose(out["p3"], p3, atol=1e-3)
    assert all(torch.equal(out[k], plain[k]) for k in plain if k != "p3")
    model.train()
    losses = model(make_batch())
    losses["loss_fcos_cls"].backward()  # the FCOS head on P3 trains the new conv
    assert conv.weight.grad.abs().sum() > 0


def test_p2_into_p3_alone_asks_the_fpn_for_p2():
    model, _ = tiny_model(**{"model.backbone.fpn_p2_into_p3": "true"})
    assert model.backbone.layout == "p2p7" and model.basis.skip is None
    with pytest.raises(ConfigError, match="fpn_p2_into_p3=true needs P2"):
        tiny_model(
            **{
                "model.backbone.fpn_p2_into_p3": "true",
                "model.fcos.strides": "[8,16,32]",
                "model.fcos.sizes_of_interest": "[64,128]",
            }
        )


def test_fcos_strides_are_checked():
    with pytest.raises(
        ConfigError,
        match=r"expected one of \[8, 16, 32, 64, 128\], \[8, 16, 32, 64\], \[8, 16, 32\], \[4, 8",
    ):
        tiny_model(**{"model.fcos.strides": "[8,16,24]", "model.fcos.sizes_of_interest": "[32,64]"})
    with pytest.raises(ConfigError, match="needs 4 bounds"):
        tiny_model(**{"model.fcos.sizes_of_interest": "[32,64]"})
    cfg = load_config("dr1mask_tiny", ["model.fcos.strides=[4,8,16,32,64]"])
    with pytest.raises(ConfigError, match=r"expected one of \[8, 16, 32, 64, 128\]$"):
        build_model(cfg.model)
