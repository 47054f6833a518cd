"""``model.init_from`` (weights of another model, by name and shape) and ``solver.freeze``."""

import pytest
import torch
from factories import make_batch
from helpers import data_overrides
from safetensors.torch import load_file

from dynaseg.cli import main
from dynaseg.config.presets import load_config
from dynaseg.engine.checkpoint import save_weights
from dynaseg.engine.freeze import FreezeError, freeze_groups
from dynaseg.engine.optim import build_optimizer
from dynaseg.modeling.build import build_model
from dynaseg.modeling.init_from import init_from


def _randomised(model):
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture
def mask_rcnn_file(tmp_path):
    model = _randomised(build_model(load_config("mask_rcnn_tiny").model))
    path = tmp_path / "mask_rcnn.safetensors"
    save_weights(model, path, {})
    return model, path


def test_dynamask_starts_from_a_mask_rcnn_detector(mask_rcnn_file):
    source, path = mask_rcnn_file
    torch.manual_seed(0)
    model = build_model(load_config("dynamask_tiny", [f"model.init_from={path}"]).model)
    torch.manual_seed(0)
    fresh = build_model(load_config("dynamask_tiny").model).state_dict()
    theirs = source.state_dict()
    for name, value in model.state_dict().items():
        if name.startswith("mask_branch."):  # new: kept as built
            assert torch.equal(value, fresh[name]), name
        else:  # backbone, RPN, box head: the Mask R-CNN's
            assert torch.equal(value, theirs[name]), name


def test_report_lists_what_did_not_load(mask_rcnn_file, caplog):
    _, path = mask_rcnn_file
    model = build_model(load_config("dynamask_tiny", ["model.num_classes=5"]).model)
    with caplog.at_level("INFO", logger="dynaseg.checkpoint"):
        report = init_from(model, path)
    file_keys = set(load_file(str(path)))
    assert set(report.missing) == {k for k in model.state_dict() if k.startswith("mask_branch.")}
    assert set(report.unused) == {k for k in file_keys if k.startswith("mask_branch.")}
    # 5 classes here, the tiny preset's count in the file: the class-specific box rows differ
    assert {m.split(":")[0] for m in report.mismatched} == {
        f"box_head.predictor.{layer}.{kind}"
        for layer in ("cls_score", "bbox_pred")
        for kind in ("weight", "bias")
    }
    assert len(report.loaded) == len(file_keys) - len(report.unused) - len(report.mismatched)
    assert "| loaded |" in caplog.text and "| shape differs (kept as built) | 4 |" in caplog.text


def test_freeze_trains_only_what_is_left():
    cfg = load_config("mask_rcnn_tiny", ["model.backbone.norm=BN"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    frozen = freeze_groups(model, ("backbone", "rpn", "box_head"))
    assert frozen == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("mask_branch.")
    )
    optimizer = build_optimizer(model, cfg.solver)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.mask_branch.parameters()}
    model.train()
    bn = model.backbone.body.bn1
    before = bn.running_mean.clone()
    outputs = {}
    model.backbone.register_forward_hook(lambda m, i, o: outputs.update(o))
    losses = model(make_batch())
    sum(losses.values()).backward()
    assert torch.equal(bn.running_mean, before)  # frozen norms keep their statistics
    assert not any(f.requires_grad for f in outputs.values())  # no graph kept through the backbone
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("mask_"))
    assert any(p.grad is not None for p in model.mask_branch.parameters())
    assert model.rpn.training  # the group keeps the model's mode (training proposal counts)


def test_unknown_group_is_a_one_line_error(synth_dir, tmp_path, capsys):
    with pytest.raises(FreezeError, match="has no group mask_head; its groups are backbone, rpn"):
        freeze_groups(build_model(load_config("mask_rcnn_tiny").model), ("mask_head",))
    rc = main(
        [
            "train",
            "--config",
            "mask_rcnn_tiny",
            "solver.freeze=backbone,fpn",
            *data_overrides(synth_dir),
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(
        "dynaseg: error: solver.freeze: TwoStageDetector has no group fpn"
    )
    assert len(err.splitlines()) == 1
