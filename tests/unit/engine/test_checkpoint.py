"""Weights files, backbone loading from local torchvision checkpoints, atomic training states, bad checkpoints."""

import os
import stat

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import dynaseg
from dynaseg.config.presets import load_config
from dynaseg.engine.checkpoint import (
    CheckpointError,
    find_last_checkpoint,
    load_training_state,
    load_weights,
    read_metadata,
    remove_stale_temp_files,
    save_training_state,
    save_weights,
)
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
    model = build_model(
        load_config(
            "blendmask_tiny",
            [
                "model.backbone.width=64",
                "model.backbone.norm=FrozenBN",
                "model.backbone.freeze_at=2",
                f"model.backbone_weights={path}",
            ],
        ).model
    )
    body = model.backbone.body
    assert torch.equal(body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(body.bn1.running_mean, reference.bn1.running_mean)
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    x = torch.randn(1, 3, 64, 64)
    reference.eval()
    body.eval()
    expected = reference.layer4(
        reference.layer3(
            reference.layer2(
                reference.layer1(
                    reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
                )
            )
        )
    )
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
    assert read_metadata(tmp_path / "w.safetensors") == {
        "class_names": ["a", "b"],
        "weights_format": 1,
        "dynaseg_version": dynaseg.__version__,
    }
    other = build_model(cfg.model)
    load_weights(other, tmp_path / "w.safetensors")
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values())
    )
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


def test_training_state_errors_name_the_file_and_problem(tmp_path):
    good = save_training_state(tmp_path, 2, {"model": {"w": torch.ones(3)}})
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(
        CheckpointError, match=r"cut\.pt: cannot read training state \(RuntimeError: .*zip"
    ):
        load_training_state(tmp_path / "cut.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt: not a dynaseg training state \(a list"):
        load_training_state(tmp_path / "list.pt")
    torch.save(
        {"iteration": 1, "model": {}, "format": 99, "dynaseg_version": "9.9.9"}, tmp_path / "new.pt"
    )
    with pytest.raises(
        CheckpointError,
        match=r"new\.pt: training state format 99 \(written by dynaseg 9\.9\.9\) is "
        r"not readable by dynaseg .*, which reads format 1",
    ):
        load_training_state(tmp_path / "new.pt")
    state = load_training_state(good)
    assert state["format"] == 1 and state["dynaseg_version"] == dynaseg.__version__


def test_weights_of_another_model_list_missing_and_unexpected_keys(tmp_path, caplog):
    rcnn = build_model(load_config("mask_rcnn_tiny").model)
    save_weights(rcnn, tmp_path / "rcnn.safetensors")
    blend = build_model(load_config("blendmask_tiny").model)
    own, theirs = set(blend.state_dict()), set(rcnn.state_dict())
    missing, unexpected = len(own - theirs), len(theirs - own)
    assert missing > 3 and unexpected > 3
    with pytest.raises(CheckpointError) as e:
        load_weights(blend, tmp_path / "rcnn.safetensors")
    message = str(e.value)
    assert message.startswith(
        f"{tmp_path / 'rcnn.safetensors'}: weights do not match the model (BlendMask"
    )
    assert f"missing {missing} (" in message and f"unexpected {unexpected} (" in message
    assert f"… {missing - 3} more" in message and "\n" not in message
    # strict=False loads what fits and logs what it skipped.
    before = {k: v.clone() for k, v in blend.state_dict().items()}
    with caplog.at_level("WARNING", logger="dynaseg.checkpoint"):
        load_weights(blend, tmp_path / "rcnn.safetensors", strict=False)
    assert "partial load, skipped" in caplog.text and f"missing {missing} (" in caplog.text
    shared = [
        k
        for k in own & theirs
        if rcnn.state_dict()[k].shape == before[k].shape
        and k.endswith("weight")
        and not torch.equal(rcnn.state_dict()[k], before[k])
    ]
    assert shared and all(torch.equal(blend.state_dict()[k], rcnn.state_dict()[k]) for k in shared)


def test_weights_from_a_newer_format_are_refused(tmp_path):
    model = build_model(load_config("blendmask_tiny").model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(
        state,
        str(tmp_path / "new.safetensors"),
        metadata={"weights_format": "7", "dynaseg_version": '"3.0"'},
    )
    with pytest.raises(
        CheckpointError, match=r"new\.safetensors: weights format 7 \(written by dynaseg 3\.0\)"
    ):
        load_weights(model, tmp_path / "new.safetensors")
    save_file(state, str(tmp_path / "plain.safetensors"))  # no metadata (another tool): keys decide
    load_weights(model, tmp_path / "plain.safetensors")


class _Payload:
    """Unpickling this creates ``marker``: stands for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    save_training_state(tmp_path, 1, {"model": {"w": torch.ones(2)}})
    evil = tmp_path / "model_0000002.pt"
    torch.save({"iteration": 2, "model": {"w": torch.ones(2)}, "x": _Payload(marker)}, evil)
    (tmp_path / "last_checkpoint").write_text(evil.name)
    with pytest.raises(
        CheckpointError, match=r"model_0000002\.pt: cannot read training state \(it holds pickled"
    ):
        load_training_state(evil)
    with pytest.raises(
        CheckpointError,
        match=r"model_0000002\.pt: cannot read checkpoint \(it holds pickled objects",
    ):
        load_weights(ResNet(depth=18, width=8), evil)
    assert find_last_checkpoint(tmp_path).name == "model_0000001.pt"
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: full unpickling runs it
    assert marker.exists()


def _state(tmp_path, iteration):
    return save_training_state(
        tmp_path, iteration, {"model": {"w": torch.full((2,), float(iteration))}}
    )


def test_find_last_checkpoint_falls_back_to_the_newest_readable_state(tmp_path, caplog):
    for it in (2, 4, 6):
        _state(tmp_path, it)
    last = tmp_path / "model_0000006.pt"
    last.write_bytes(last.read_bytes()[:100])  # pointer names a truncated file
    with caplog.at_level("WARNING", logger="dynaseg.checkpoint"):
        assert find_last_checkpoint(tmp_path).name == "model_0000004.pt"
    assert "model_0000006.pt: cannot read training state" in caplog.text
    last.unlink()  # pointer names a missing file
    assert find_last_checkpoint(tmp_path).name == "model_0000004.pt"
    (tmp_path / "last_checkpoint").write_text("model_0000002.pt")
    assert (
        find_last_checkpoint(tmp_path).name == "model_0000002.pt"
    )  # newer files than the pointer's: stale
    (tmp_path / "last_checkpoint").write_text("")
    assert find_last_checkpoint(tmp_path).name == "model_0000004.pt"
    (tmp_path / "last_checkpoint").unlink()
    assert find_last_checkpoint(tmp_path).name == "model_0000004.pt"
    for p in tmp_path.glob("model_*.pt"):
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no readable training state"):
        find_last_checkpoint(tmp_path)


def test_stale_temporary_files_are_ignored_and_removed(tmp_path):
    _state(tmp_path, 2)
    stale = [
        tmp_path / ".model_0000004.pt.k2j3.tmp",
        tmp_path / ".last_checkpoint.x1.tmp",
        tmp_path / ".model_final.safetensors.y7.tmp",
    ]
    for p in stale:
        p.write_bytes(b"half a file")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert find_last_checkpoint(tmp_path).name == "model_0000002.pt"
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert not any(p.exists() for p in stale) and (tmp_path / "notes.tmp").exists()


def test_atomic_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = _state(tmp_path, 1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask != 0o600
