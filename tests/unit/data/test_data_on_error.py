"""data.on_error: a corrupt image stops the run naming the file ("stop"), or is reported once and
skipped ("skip"), in the datasets, across DataLoader workers and in a tiny training run."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynaseg.data.coco import DatasetError, load_coco_instances
from dynaseg.data.coco_panoptic import load_coco_panoptic
from dynaseg.data.dataset import InstanceDataset
from dynaseg.data.image_io import ImageReadError, read_image
from dynaseg.data.panoptic_dataset import PanopticDataset
from dynaseg.data.samplers import build_test_loader
from dynaseg.data.synthetic import generate_synthetic
from dynaseg.data.transforms import build_test_transforms
from dynaseg.structures.panoptic import IGNORE_LABEL

pytestmark = [
    pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning"),
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"
    ),
]

SKIP_NOTE = "[data.on_error=skip"


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory) -> dict[str, Path]:
    """4 train / 2 val images of 64x64 (instances and panoptic); tests copy it before corrupting."""
    out = tmp_path_factory.mktemp("synth_on_error")
    return generate_synthetic(out, num_train=4, num_val=2, image_size=64, seed=3, max_objects=3)


@pytest.fixture
def synth(small_synth, tmp_path: Path) -> Path:
    root = small_synth["train_json"].parents[1]
    shutil.copytree(root, tmp_path / "synth")
    return tmp_path / "synth"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    """One flipped byte in the compressed data (crashed torchvision's PNG decoder with SIGSEGV)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "garbage": (
        lambda p: p.write_bytes(b"this is not an image" * 10),
        "not a recognised image format",
    ),
    "truncated": (_truncate, "truncated PNG"),
    "flipped_byte": (_flip_byte, "corrupt PNG"),
}


def _warnings_about(caplog, path: Path) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and str(path) in r.getMessage()
    ]


# ----------------------------------------------------------------------------- image_io


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_png_raises_image_read_error(synth: Path, kind: str):
    path = synth / "train" / "000001.png"
    corrupt, reason = CORRUPTIONS[kind]
    corrupt(path)
    with pytest.raises(ImageReadError) as err:
        read_image(path, (64, 64))
    assert str(err.value).startswith(f"{path}: cannot read image ({reason}")
    assert err.value.path == str(path)


def test_huge_declared_size_refused_before_decoding(tmp_path: Path):
    """A 600-byte JPEG declaring 65000x65000 used to decode into a 12 GB tensor for 45 s."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (65000).to_bytes(2, "big") * 2
    path = tmp_path / "huge.jpg"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match=r"huge\.jpg: cannot read image \(too large: "):
        read_image(path)
    path2 = tmp_path / "big.jpg"
    data[sof + 5 : sof + 9] = (300).to_bytes(2, "big") * 2  # plausible size, not the annotation's
    path2.write_bytes(bytes(data))
    with pytest.raises(
        ImageReadError,
        match=r"big\.jpg: cannot read image \(size 300x300 \(HxW\) does not "
        r"match the annotation's 16x16\)",
    ):
        read_image(path2, (16, 16))


# ----------------------------------------------------------------------------- datasets


def _instances(root: Path):
    return load_coco_instances(root / "annotations" / "instances_train.json", root / "train")


def test_stop_raises_in_main_process_and_workers(synth: Path):
    path = synth / "train" / "000002.png"
    _truncate(path)
    ds = InstanceDataset(_instances(synth), None, train=True)
    expected = f"{path}: cannot read image (truncated PNG)"
    with pytest.raises(ImageReadError) as err:
        ds[2]
    assert str(err.value) == expected
    it = iter(build_test_loader(ds, batch_size=4, num_workers=1))
    with pytest.raises(ImageReadError) as err:
        next(it)
    it._shutdown_workers()  # the traceback keeps the iterator alive; do not wait for the GC
    # The DataLoader's "Caught ImageReadError in DataLoader worker ..." wrapper is unwrapped.
    assert str(err.value) == expected and err.value.path == str(path)
    assert err.value.reason == "truncated PNG"
    assert any("DataLoader worker process 0" in note for note in err.value.__notes__)


def test_dataset_error_from_worker_keeps_its_one_line_message(synth: Path):
    root = synth
    pan = load_coco_panoptic(
        root / "annotations" / "panoptic_train.json",
        root / "train",
        root / "annotations" / "panoptic_train",
    )
    png = Path(pan.records[0].panoptic_file)
    Image.fromarray(np.zeros((64, 32, 3), np.uint8)).save(png)  # wrong size
    ds = PanopticDataset(pan, None, train=False)
    it = iter(build_test_loader(ds, batch_size=1, num_workers=1))
    with pytest.raises(DatasetError) as err:
        next(it)
    it._shutdown_workers()
    assert str(err.value).startswith(f"{png}: panoptic PNG is 64x32 (HxW) but its image")
    assert "\n" not in str(err.value)


def test_skip_uses_next_image_and_reports_once(synth: Path, caplog):
    path = synth / "train" / "000001.png"
    _flip_byte(path)
    data = _instances(synth)
    ds = InstanceDataset(data, None, train=True, on_error="skip")
    reference = InstanceDataset(data, None, train=True)
    with caplog.at_level(logging.WARNING, logger="dynaseg.data"):
        for epoch in range(3):
            for i in range(4):
                s = ds[epoch * 4 + i]
                assert s.file_name != str(path)
                if i == 1:  # image 1 is bad: image 2 stands in, deterministically
                    assert s.image_id == reference[2].image_id and torch.equal(
                        s.image, reference[2].image
                    )
    messages = _warnings_about(caplog, path)
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"{path}: cannot read image (corrupt PNG")
    assert "the next readable image is used instead; reported once" in messages[0]


def test_skip_with_every_image_bad_raises(synth: Path, caplog):
    for p in sorted((synth / "train").glob("*.png")):
        _truncate(p)
    data = _instances(synth)
    ds = InstanceDataset(data, None, train=True, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="dynaseg.data"):
        for index in (2, 5):  # the second call fails at once, without re-reading
            with pytest.raises(DatasetError) as err:
                ds[index]
            assert str(err.value).startswith(
                f"{data.json_path}: none of the 4 images can be read, "
                f"data.on_error=skip has nothing to use instead (first: "
                f"{synth / 'train' / '000000.png'}: cannot read image"
            )
    assert sum(SKIP_NOTE in r.getMessage() for r in caplog.records) == 4


def test_skip_in_evaluation_gives_blank_image_with_same_id(synth: Path, caplog):
    path = synth / "train" / "000003.png"
    path.write_bytes(b"")
    data = _instances(synth)
    ds = InstanceDataset(data, build_test_transforms(32, 64), train=False, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="dynaseg.data"):
        a, b = ds[3], ds[3]
    assert a.image_id == data.records[3].image_id and a.file_name == str(path)
    assert (
        a.image.shape == (3, 32, 32)
        and int(a.image.abs().sum()) == 0
        and torch.equal(a.image, b.image)
    )
    assert len(a.target) == 0 and a.target.masks.shape == (0, 32, 32)
    messages = _warnings_about(caplog, path)
    assert len(messages) == 1 and "cannot read image (empty file)" in messages[0]
    assert "evaluated as a blank image, its ground truth still counts" in messages[0]
    assert len(ds[0].target) > 0  # the others are unaffected


def test_panoptic_skip_covers_bad_pngs(synth: Path, caplog):
    root = synth
    pan = load_coco_panoptic(
        root / "annotations" / "panoptic_train.json",
        root / "train",
        root / "annotations" / "panoptic_train",
    )
    png = Path(pan.records[0].panoptic_file)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(png)  # all void: listed segments missing
    ds = PanopticDataset(pan, None, train=True, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="dynaseg.data"):
        assert ds[0].image_id == pan.records[1].image_id
        blank = PanopticDataset(pan, None, train=False, on_error="skip")[0]
    assert blank.image_id == pan.records[0].image_id and len(blank.target) == 0
    assert blank.sem_seg.shape == (64, 64) and bool((blank.sem_seg == IGNORE_LABEL).all())
    messages = _warnings_about(caplog, png)
    assert len(messages) == 2 and all("have no pixels in the PNG" in m for m in messages)


def test_invalid_on_error_value(synth: Path):
    with pytest.raises(ValueError, match="on_error must be 'stop' or 'skip'"):
        InstanceDataset(_instances(synth), None, train=True, on_error="ignore")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- training


def _config(root: Path, out: Path, *extra: str):
    from dynaseg.config.presets import load_config

    return load_config(
        "blendmask_tiny",
        [
            f"data.train_json={root}/annotations/instances_train.json",
            f"data.train_images={root}/train",
            f"data.val_json={root}/annotations/instances_val.json",
            f"data.val_images={root}/val",
            f"output_dir={out}",
            "solver.max_iter=4",
            "solver.checkpoint_period=100",
            *extra,
        ],
    )


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_training_stops_on_corrupt_image_by_default(synth: Path, tmp_path: Path, workers: int):
    from dynaseg.engine.trainer import train

    path = synth / "train" / "000002.png"
    _truncate(path)
    cfg = _config(synth, tmp_path / "run", f"data.num_workers={workers}")
    assert cfg.data.on_error == "stop"
    with pytest.raises(ImageReadError) as err:
        train(cfg)  # 4 iterations of 2 images cover the 4 training images twice
    assert str(err.value) == f"{path}: cannot read image (truncated PNG)"


@pytest.mark.slow
def test_training_skips_corrupt_image_and_reports_it_once(synth: Path, tmp_path: Path, caplog):
    from dynaseg.engine.trainer import train

    path = synth / "train" / "000002.png"
    _flip_byte(path)
    cfg = _config(synth, tmp_path / "run", "data.on_error=skip", "data.num_workers=0")
    with caplog.at_level(logging.WARNING):
        train(cfg)  # two epochs over the 4 training images, then the final evaluation
    assert (tmp_path / "run" / "model_final.safetensors").is_file()
    messages = _warnings_about(caplog, path)
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"{path}: cannot read image (corrupt PNG")


def test_image_io_leaves_the_warning_filters_alone(tmp_path: Path):
    """Importing the reader must not change the process's warning filters; reading a JPEG through
    torchvision's decoder must not warn about torchvision's decoder deprecation either."""
    import subprocess
    import sys

    code = (
        "import warnings, torch, torchvision.io; before = list(warnings.filters); "
        "import dynaseg.data.image_io; assert warnings.filters == before, 'filters changed'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    from dynaseg.data.image_io import read_image

    path = tmp_path / "a.jpg"
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_image(path).shape == (3, 8, 8)
    assert not [w for w in caught if "TorchVision are deprecated" in str(w.message)]
