"""``model.backbone_weights=torchvision:resnet50``: torchvision's weights enums, torch's cache, offline errors.

No download happens here: the tests put a checkpoint file where torch's cache keeps it
($TORCH_HOME/hub/checkpoints/<file name of the enum's URL>) or replace the download.
"""

from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from helpers import data_overrides
from torchvision.models import ResNet18_Weights, ResNet50_Weights

from dynaseg.cli import main
from dynaseg.config.presets import load_config
from dynaseg.modeling.backbone.pretrained import WeightsError, resolve_weights_file
from dynaseg.modeling.build import build_model

R18 = ["model.backbone.depth=18", "model.backbone.width=64", "model.backbone.norm=FrozenBN"]


@pytest.fixture
def torch_cache(tmp_path, monkeypatch) -> Path:
    """An empty torch cache: $TORCH_HOME/hub/checkpoints."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


def _file(weights) -> str:
    return Path(weights.url).name


def test_torchvision_name_loads_from_the_torch_cache(torch_cache):
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, torch_cache / _file(ResNet18_Weights.IMAGENET1K_V1))
    cfg = load_config("blendmask_tiny", [*R18, "model.backbone_weights=torchvision:resnet18"])
    body = build_model(cfg.model).backbone.body
    assert torch.equal(body.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert torch.equal(body.bn1.running_var, state["bn1.running_var"])


def test_variant_picks_the_enum_member_and_downloads_once(torch_cache, monkeypatch):
    fetched = []

    def fake_download(url, **kwargs):
        fetched.append(url)
        torch.save({}, torch_cache / Path(url).name)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    v1, v2 = ResNet50_Weights.IMAGENET1K_V1, ResNet50_Weights.IMAGENET1K_V2
    assert resolve_weights_file("torchvision:resnet50") == torch_cache / _file(v1)
    assert resolve_weights_file("torchvision:resnet50.IMAGENET1K_V2") == torch_cache / _file(v2)
    assert resolve_weights_file("torchvision:resnet50") == torch_cache / _file(v1)  # cached
    assert fetched == [v1.url, v2.url]
    assert resolve_weights_file("some/local.pth") == Path("some/local.pth")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("torchvision:resnet51", "unknown torchvision backbone 'resnet51'; choose from"),
        ("torchvision:resnet50.IMAGENET9K", "has weights IMAGENET1K_V1, IMAGENET1K_V2"),
    ],
)
def test_bad_names_are_user_errors(spec, message):
    with pytest.raises(WeightsError, match=message):
        resolve_weights_file(spec)


def test_offline_with_an_empty_cache_says_what_to_download_and_where(
    torch_cache, monkeypatch, synth_dir, tmp_path, capsys
):
    def offline(url, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    weights = ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(WeightsError) as caught:
        resolve_weights_file("torchvision:resnet18")
    assert weights.url in str(caught.value)
    assert str(torch_cache / _file(weights)) in str(caught.value)
    rc = main(
        [
            "train",
            "--config",
            "blendmask_tiny",
            *R18,
            "model.backbone_weights=torchvision:resnet18",
            *data_overrides(synth_dir),
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("dynaseg: error: torchvision:resnet18: not in torch's cache")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
