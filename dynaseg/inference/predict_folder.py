"""``dynaseg predict``'s job: segment a folder of images, draw each result, write COCO results.

Works with any predictor that returns ``Instances`` or ``PanopticSegmentation`` for one image and
names its classes (the eager ``Predictor`` and the ONNX ``OnnxPredictor``). Writes, under ``out``:
one overlay PNG per image, ``results.json`` (COCO instance results with the image's ``file_name``),
and for panoptic models ``panoptic.json`` with its PNGs in ``panoptic/`` (COCO panoptic format).
An image's overlay and panoptic PNG are named ``<stem>.png`` (``a.jpg`` -> ``a.png``), or
``<name>.png`` (``a.jpg.png``, ``a.png.png``) when another image shares the stem, so that none
overwrites another (see ``overlay_names``).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dynaseg.data.image_io import read_image
from dynaseg.errors import UserError
from dynaseg.evaluation.coco import CategoryMap, instances_to_coco_results
from dynaseg.evaluation.panoptic_io import panoptic_to_coco, write_panoptic_predictions
from dynaseg.inference.predictor import stuff_categories
from dynaseg.inference.visualize import resolution_style, save_overlay, save_panoptic_overlay
from dynaseg.structures.panoptic import PanopticSegmentation
from dynaseg.utils.files import check_output_folder

__all__ = [
    "IMAGE_SUFFIXES",
    "check_output_for_images",
    "image_files",
    "overlay_names",
    "predict_folder",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def image_files(source: Path) -> list[Path]:
    """The images of a folder (sorted by name) or the one file given; UserError if there are none."""
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif source.is_file():
        files = [source]
    else:
        raise UserError(f"{source}: no such file or folder")
    if not files:
        raise UserError(f"{source}: no images found")
    return files


def check_output_for_images(out: str | Path, files: Sequence[Path]) -> Path:
    """``out`` as a Path if it can take the outputs of ``files``, else a one-line UserError naming
    ``--output``: an empty path, a file (or under one), or the folder of the images themselves
    (overlays would overwrite them, or be read as images by the next run)."""
    out = check_output_folder(out, option="--output")
    if out.resolve() in {f.parent.resolve() for f in files}:
        raise UserError(
            f"--output '{out}' is the folder of the input images: the overlays would overwrite "
            "or mix with them; give another folder"
        )
    return out


def overlay_names(files: Sequence[Path]) -> list[str]:
    """The output PNG name of each image (of one folder): ``<stem>.png``, or ``<name>.png`` where
    the stem is shared with another image (``a.png`` and ``a.jpg`` -> ``a.png.png``, ``a.jpg.png``)
    or is another image's name. Names are compared ignoring case, as macOS and Windows do."""
    stems = Counter(f.stem.casefold() for f in files)
    names = {f.name.casefold() for f in files}

    def unique_stem(f: Path) -> bool:
        return stems[f.stem.casefold()] == 1 and f.stem.casefold() not in names

    return [f"{f.stem if unique_stem(f) else f.name}.png" for f in files]


def predict_folder(
    predictor: Any,
    files: Sequence[Path],
    out: Path,
    *,
    score_threshold: float = 0.0,
    color_by: str = "instance",
) -> tuple[int, bool]:
    """Segment ``files`` and write the overlays and results under ``out``.

    ``color_by="resolution"`` colours each instance by its mask side (two-stage models).
    Overlays are named by ``overlay_names``; ``out`` is checked by ``check_output_for_images``.
    Returns (number of instance results written, whether panoptic files were written).
    """
    out = check_output_for_images(out, files)
    out.mkdir(parents=True, exist_ok=True)
    category_map = CategoryMap(category_ids=predictor.category_ids, names=predictor.class_names)
    stuff_ids, stuff_names = stuff_categories(predictor)
    categories = [
        {"id": c, "name": n, "isthing": 1}
        for c, n in zip(predictor.category_ids, predictor.class_names)
    ] + [{"id": c, "name": n, "isthing": 0} for c, n in zip(stuff_ids, stuff_names)]
    results: list[dict[str, Any]] = []

    def predict_all() -> Iterator[tuple[dict[str, Any], Any]]:
        """Overlays written, thing detections into ``results``; yields the (annotation, png) of each
        panoptic prediction (the panoptic map is final: no threshold)."""
        named = zip(files, overlay_names(files))
        for image_id, (path, name) in enumerate(
            tqdm(named, total=len(files), desc="predict", mininterval=5), start=1
        ):
            image = read_image(path)
            prediction = predictor(image)
            panoptic = isinstance(prediction, PanopticSegmentation)
            instances = prediction.instances if panoptic else prediction
            if instances is not None:
                instances = instances[instances.scores >= score_threshold]
                for r in instances_to_coco_results(instances, image_id, category_map):
                    results.append({**r, "file_name": path.name})
            if panoptic:
                png, ann = panoptic_to_coco(
                    prediction,
                    image_id=image_id,
                    file_name=name,
                    thing_category_ids=predictor.category_ids,
                    stuff_category_ids=stuff_ids,
                )
                yield ann, png
                save_panoptic_overlay(
                    out / name,
                    image,
                    prediction,
                    thing_names=predictor.class_names,
                    stuff_names=stuff_names,
                )
            else:
                style = resolution_style(instances, path) if color_by == "resolution" else {}
                save_overlay(out / name, image, instances, predictor.class_names, **style)

    # Instance models run to the end in next(); panoptic ones stream their PNGs to disk.
    steps = predict_all()
    first = next(steps, None)
    if first is not None:
        write_panoptic_predictions(
            itertools.chain([first], steps),
            json_path=out / "panoptic.json",
            png_dir=out / "panoptic",
            categories=categories,
        )
    (out / "results.json").write_text(json.dumps(results))
    return len(results), first is not None
