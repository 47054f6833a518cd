"""Weights files, backbone loading from local torchvision checkpoints, atomic training states."""
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from dynaseg.config.presets import load_config
from dynaseg.engine.checkpoint import (CheckpointError, find_last_checkpoint, load_training_state, load_weights,
                                       read_metadata, save_training_state, save_weights)
from dynaseg.modeling.backbone.pretrained import load_backbone_weights
from dynaseg.modeling.backbone.resnet import ResNet
from dynaseg.modeling.build import build_model


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_resnet_checkpoint_loads_into_backbone(tmp_path, suffix):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(reference.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = build_model(load_config("blendmask_tiny", [
        "model.backbone.width=64", "model.backbone.norm=FrozenBN", "model.backbone.freeze_at=2",
        f"model.backbone_weights={path}"]).model)
    body = model.backbone.body
    assert torch.equal(body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(body.bn1.running_mean, reference.bn1.running_mean)
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    x = torch.randn(1, 3, 64, 64)
    reference.eval()
    body.eval()
    expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(
        reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))))
    assert torch.allclose(body(x)["c5"], expected, atol=1e-5)


def test_backbone_weights_shape_mismatch_is_an_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="wrong shape"):
        load_backbone_weights(ResNet(depth=18, width=16), path)
    with pytest.raises(ValueError, match="missing"):
        load_backbone_weights(ResNet(depth=34, width=64), path)


def test_pickled_code_is_never_loaded(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "obj": object()}, path)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_backbone_weights(ResNet(depth=18, width=8), path)


def test_weights_round_trip_with_metadata_and_strict_errors(tmp_path):
    cfg = load_config("blendmask_tiny")
    model = build_model(cfg.model)
    save_weights(model, tmp_path / "w.safetensors", {"class_names": ["a", "b"]})
    assert read_metadata(tmp_path / "w.safetensors") == {"class_names": ["a", "b"]}
    other = build_model(cfg.model)
    load_weights(other, tmp_path / "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    wider = build_model(load_config("blendmask_tiny", ["model.basis.channels=48"]).model)
    with pytest.raises(CheckpointError, match="wrong-shape"):
        load_weights(wider, tmp_path / "w.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_weights(other, tmp_path / "cut.safetensors")


def test_training_state_is_atomic_and_found(tmp_path):
    assert find_last_checkpoint(tmp_path) is None
    save_training_state(tmp_path, 10, {"model": {"w": torch.ones(2)}})
    save_training_state(tmp_path, 20, {"model": {"w": torch.zeros(2)}})
    last = find_last_checkpoint(tmp_path)
    assert last.name == "model_0000020.pt" and load_training_state(last)["iteration"] == 20
    assert not list(tmp_path.glob("*.tmp"))
