"""Issue 15: every user error of the CLI is one line ``dynaseg: error: ...`` (exit 2), found before
any model is loaded or any training starts. Runs ``dynaseg.cli.main`` in-process (one subprocess
checks ``python -m dynaseg`` itself); also the names of ``predict``'s overlays, which must not collide.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import data_overrides, dynaseg
from PIL import Image

from dynaseg.cli import main
from dynaseg.inference.predict_folder import overlay_names
from dynaseg.structures import Instances
from dynaseg.structures.panoptic import PanopticSegmentation, Segment


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``dynaseg ARGS`` run in this process."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *names: object) -> None:
    """Exit 2 and a stderr of one ``dynaseg: error:`` line that names each of ``names``."""
    assert "Traceback" not in err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynaseg: error: "), err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])


# --------------------------------------------------------------------------- train
@pytest.fixture
def train_args(synth_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``train`` of the tiny preset on the synthetic set; building the model fails the test, so every
    error below is shown to come before any training."""
    from dynaseg.engine import trainer

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built: the error came too late")

    monkeypatch.setattr(trainer, "build_model", no_model)
    return ["train", "--config", "blendmask_tiny", *data_overrides(synth_dir)]


def test_train_num_classes_above_the_json(capsys, train_args, synth_dir, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args, "model.num_classes=80", f"output_dir={out}")
    assert_one_line_error(
        code, err, synth_dir / "annotations/instances_train.json", "set model.num_classes=7"
    )
    assert {p.name for p in out.iterdir()} == {"config.yaml", "log.txt"}


@pytest.mark.parametrize(
    "output_dir, problem",
    [("afile", "is a file, not a folder"), ("afile/run", "lies under")],
)
def test_train_output_dir_file_or_under_a_file(
    capsys, train_args, tmp_path, output_dir: str, problem: str
):
    (tmp_path / "afile").write_text("not a folder")
    code, _, err = run_cli(capsys, *train_args, f"output_dir={tmp_path / output_dir}")
    assert_one_line_error(code, err, "output_dir", tmp_path / output_dir, problem)


def test_train_log_txt_is_a_folder(capsys, train_args, tmp_path):
    (tmp_path / "log.txt").mkdir()
    code, _, err = run_cli(capsys, *train_args, f"output_dir={tmp_path}")
    assert_one_line_error(code, err, tmp_path / "log.txt", "Is a directory")
    assert not (tmp_path / "config.yaml").exists()  # refused before train()


def test_train_empty_output_dir_is_refused(capsys, train_args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the old behaviour trained here
    code, _, err = run_cli(capsys, *train_args, "output_dir=")
    assert_one_line_error(code, err, "output_dir is empty")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["data.num_workers", "data.image_cache_gb"])
def test_train_negative_loader_setting(capsys, train_args, tmp_path, key: str):
    code, _, err = run_cli(capsys, *train_args, f"{key}=-1", f"output_dir={tmp_path / 'run'}")
    assert_one_line_error(code, err, key, "must be >= 0")


# --------------------------------------------------------------------------- predict
@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder with a.png (20x30) and a.jpg (40x10): two images of one stem."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (30, 20), "red").save(folder / "a.png")
    Image.new("RGB", (10, 40), "blue").save(folder / "a.jpg")
    return folder


def predict_args(images: Path, output: object) -> list[object]:
    # No such weights: a check that ran after loading the model would report them instead.
    return [
        "predict",
        "--config",
        "blendmask_tiny",
        "--weights",
        "none.safetensors",
        "--input",
        images,
        "--output",
        output,
    ]


def test_predict_output_is_a_file_in_a_real_process(images, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    proc = dynaseg(*predict_args(images, tmp_path / "afile"), check=False)
    assert_one_line_error(proc.returncode, proc.stderr, "--output", tmp_path / "afile", "is a file")


@pytest.mark.parametrize("output, problem", [("afile/vis", "lies under"), ("", "is empty")])
def test_predict_output_under_a_file_or_empty(capsys, images, tmp_path, output, problem):
    (tmp_path / "afile").write_text("not a folder")
    target = tmp_path / output if output else ""
    code, _, err = run_cli(capsys, *predict_args(images, target))
    assert_one_line_error(code, err, "--output", problem)


@pytest.mark.parametrize("single_image", [False, True])
def test_predict_into_the_input_folder_is_refused(capsys, images, single_image):
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    source = images / "a.png" if single_image else images
    output = images / ".." / images.name  # the same folder, spelled differently
    code, _, err = run_cli(capsys, *predict_args(source, output))
    assert_one_line_error(code, err, "--output", "is the folder of the input images")
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


class WholeImagePredictor:
    """Stands in for a model: one instance per image whose box is the whole image (so a result
    shows which image it came from); panoptic: that instance as the only segment."""

    category_ids = [1]
    class_names = ["thing"]
    stuff_category_ids: list[int] = []
    stuff_names: list[str] = []
    cfg = SimpleNamespace(model=None)

    def __init__(self, *, panoptic: bool) -> None:
        self.is_panoptic = panoptic

    def __call__(self, image: torch.Tensor) -> Instances | PanopticSegmentation:
        h, w = image.shape[-2:]
        instances = Instances(
            image_size=(h, w),
            boxes=torch.tensor([[0.0, 0.0, w, h]]),
            labels=torch.tensor([0]),
            scores=torch.tensor([0.9]),
            masks=torch.ones(1, h, w, dtype=torch.bool),
        )
        if not self.is_panoptic:
            return instances
        segment = Segment(id=1, label=0, isthing=True, score=0.9, area=h * w)
        ids = torch.ones(h, w, dtype=torch.int32)
        return PanopticSegmentation(ids=ids, segments=[segment], instances=instances)


@pytest.mark.parametrize("panoptic", [False, True])
def test_predict_images_sharing_a_stem_keep_their_own_outputs(
    capsys, images, tmp_path, monkeypatch, panoptic: bool
):
    import dynaseg.inference.predictor

    fake = WholeImagePredictor(panoptic=panoptic)
    monkeypatch.setattr(dynaseg.inference.predictor, "Predictor", lambda cfg, weights: fake)
    out = tmp_path / "vis"
    code, stdout, err = run_cli(capsys, *predict_args(images, out), "--score-threshold", "0")
    assert code == 0, err
    assert "wrote 2 overlays" in stdout
    sizes = {"a.jpg": (10, 40), "a.png": (30, 20)}  # (width, height)
    overlays = {p.name: Image.open(p).size for p in out.glob("*.png")}
    assert overlays == {f"{name}.png": size for name, size in sizes.items()}
    results = json.loads((out / "results.json").read_text())
    assert {r["file_name"]: (r["image_id"], tuple(r["bbox"][2:])) for r in results} == {
        "a.jpg": (1, (10, 40)),
        "a.png": (2, (30, 20)),
    }
    if panoptic:
        anns = json.loads((out / "panoptic.json").read_text())["annotations"]
        assert {a["file_name"]: a["image_id"] for a in anns} == {"a.jpg.png": 1, "a.png.png": 2}
        pngs = {p.name: Image.open(p).size for p in (out / "panoptic").iterdir()}
        assert pngs == overlays


@pytest.mark.parametrize(
    "files, names",
    [
        (["x.jpg", "y.png"], ["x.png", "y.png"]),  # the usual case: <stem>.png
        (["a.jpg", "a.png", "b.png"], ["a.jpg.png", "a.png.png", "b.png"]),
        (["A.jpg", "a.png"], ["A.jpg.png", "a.png.png"]),  # one file on macOS and Windows
        # a.jpg.png's stem is another image's name: a.jpg.png.png, not a.jpg.png
        (["a.jpg", "a.jpg.png", "a.png"], ["a.jpg.png", "a.jpg.png.png", "a.png.png"]),
    ],
)
def test_overlay_names_never_collide(files: list[str], names: list[str]):
    assert overlay_names([Path(f) for f in files]) == names


# --------------------------------------------------------------------------- eval
def _with(key: str, value: object) -> Callable[[list[dict]], None]:
    """An edit: ``key`` of the first entry (annotation or result) set to ``value``."""

    def edit(entries: list[dict]) -> None:
        entries[0][key] = value

    return edit


_DEEP = "[" * 100_000 + "]" * 100_000
_HUGE_INT = "1" * 100_000
# name: (the file spoilt, its whole text or an edit of its first entry, what the message says)
_EVAL_CASES = {
    "gt deeply nested": ("gt", _DEEP, "nested too deeply"),
    "results deeply nested": ("results", _DEEP, "nested too deeply"),
    "gt 100000-digit integer": ("gt", f'{{"images": [{{"id": {_HUGE_INT}}}]}}', "digits"),
    "results 100000-digit integer": ("results", f'[{{"image_id": {_HUGE_INT}}}]', "digits"),
    "gt iscrowd 'yes'": ("gt", _with("iscrowd", "yes"), "'iscrowd' must be 0 or 1"),
    "gt category_id [1]": ("gt", _with("category_id", [1]), "category_id [1]"),
    "results category_id [1]": ("results", _with("category_id", [1]), "category_id [1]"),
    "results NaN score": ("results", _with("score", float("nan")), "score must be a finite"),
    "gt NaN box": ("gt", _with("bbox", [0, float("nan"), 4, 4]), "'bbox' must be 4 finite"),
    "gt inf box": ("gt", _with("bbox", [0, 0, float("inf"), 4]), "'bbox' must be 4 finite"),
    "gt NaN area": ("gt", _with("area", float("nan")), "'area' must be a finite"),
    "gt inf area": ("gt", _with("area", float("inf")), "'area' must be a finite"),
}


@pytest.mark.parametrize("case", list(_EVAL_CASES))
def test_eval_malformed_files(capsys, synth_dir, tmp_path, case: str):
    bad, spoil, problem = _EVAL_CASES[case]
    gt = json.loads((synth_dir / "annotations/instances_val.json").read_text())
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1}
        for a in gt["annotations"]
    ]
    if callable(spoil):
        spoil(gt["annotations"] if bad == "gt" else results)
    paths = {"gt": tmp_path / "gt.json", "results": tmp_path / "results.json"}
    paths["gt"].write_text(json.dumps(gt))  # NaN and inf as JavaScript's NaN and Infinity
    paths["results"].write_text(json.dumps(results))
    if isinstance(spoil, str):
        paths[bad].write_text(spoil)
    code, _, err = run_cli(
        capsys, "eval", "--gt", paths["gt"], "--results", paths["results"], "--iou-types", "bbox"
    )
    assert_one_line_error(code, err, paths[bad], problem)


def test_eval_texts_are_malformed_as_intended():
    """Python's own JSON reader fails on them (so they test the CLI's handling of such failures)."""
    with pytest.raises(RecursionError):
        json.loads(_DEEP)
    with pytest.raises(ValueError, match="digits"):
        json.loads(_HUGE_INT)
