"""Cityscapes ``gtFine`` instance annotations → COCO instances JSON (``dynaseg data cityscapes``).

Input layout (the official download)::

    ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png   16-bit, (H, W)
    ROOT/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png     RGB, (H, W)

An instanceIds pixel ``v >= 1000`` belongs to instance ``v % 1000`` of label id ``v // 1000``; a
pixel ``v < 1000`` carries the plain label id ``v`` (for a thing label, a "group" region such as a
crowd of cars that was not split into instances).

Conversion rules (the semantics of the official ``cityscapesscripts``), per image:

* each value ``v >= 1000`` of one of the 8 scored thing labels (:data:`THING_CLASSES`) becomes one
  annotation (``iscrowd: 0``), however small: the 100-pixel minimum of the benchmark is applied
  by :func:`dynaseg.evaluation.cityscapes.evaluate_cityscapes`, not here;
* the pixels whose value is a thing label id itself (its group region) become one
  ``iscrowd: 1`` annotation of that class;
* labels without instances or ignored in evaluation (road, caravan, trailer, ...) give no
  annotation;
* the pixels whose value is an ignored label id (:data:`VOID_LABEL_IDS`), i.e. what the official
  evaluation counts as void, are stored as an RLE under :data:`VOID_KEY` in the image entry.

Masks are compressed COCO RLEs (exact); ``bbox`` and ``area`` come from the mask. Categories use
the Cityscapes label ids. Each annotation also keeps its instanceIds value under ``cityscapes_id``.
The test split has no instance labels and is not converted.

Bad input (missing root or ``gtFine`` folder, an unreadable or non-PNG file, a PNG whose size
differs from its image, a pixel value of an unknown label) raises
:class:`~dynaseg.data.coco.DatasetError` naming the file and the problem.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from dynaseg.data.coco import DatasetError
from dynaseg.errors import UserError

__all__ = [
    "THING_CLASSES",
    "VOID_LABEL_IDS",
    "VOID_KEY",
    "SPLITS",
    "convert_cityscapes",
    "convert_instance_image",
]

#: The 8 scored classes with instances: Cityscapes label id → name (also the COCO category ids).
THING_CLASSES: dict[int, str] = {
    24: "person",
    25: "rider",
    26: "car",
    27: "truck",
    28: "bus",
    31: "train",
    32: "motorcycle",
    33: "bicycle",
}
_SUPERCATEGORY = {24: "human", 25: "human"}  # the others are "vehicle"
#: Label ids with ``ignoreInEval`` (unlabeled, ego vehicle, ..., polegroup, caravan, trailer).
#: The official evaluation calls a pixel void when its *instanceIds value* is one of these, so a
#: caravan instance (29001) is not void but a caravan group (29) is.
VOID_LABEL_IDS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30)
_NUM_LABELS = 34  # label ids 0..33 appear in the PNGs ("license plate", -1, never does)
_MAX_VALUE = _NUM_LABELS * 1000 - 1  # instance 999 of label 33
#: Image-entry key of the void pixels' RLE.
VOID_KEY = "void_segmentation"
#: The splits with instance labels, in conversion order.
SPLITS: tuple[str, ...] = ("train", "val")
_GT_SUFFIX = "_gtFine_instanceIds.png"
_IMAGE_SUFFIX = "_leftImg8bit.png"
_INSTANCE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit (official) or 32-bit gray


def convert_cityscapes(
    root: str | Path,
    out_dir: str | Path,
    *,
    splits: tuple[str, ...] = SPLITS,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, Path]:
    """Write ``out_dir/annotations/instances_<split>.json`` for each split of ``root/gtFine``.

    Args:
        root: the Cityscapes folder holding ``gtFine/`` and ``leftImg8bit/``.
        out_dir: output folder.
        splits: splits to convert when their ``gtFine/<split>`` folder exists (at least one must).
        num_workers: worker processes (0: convert in this process).
        progress: show a tqdm bar per split.

    Returns:
        ``{"<split>_json": annotation file, "<split>_images": image root its file_names are
        relative to}`` for every converted split.

    Raises:
        DatasetError: a missing folder or a bad file, named in a one-line message.
    """
    if num_workers < 0:
        raise UserError(f"num_workers must be >= 0, got {num_workers}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Cityscapes root '{root}' does not exist or is not a folder")
    if not (root / "gtFine").is_dir():
        raise DatasetError(
            f"Cityscapes root '{root}' has no gtFine folder "
            f"(expected gtFine/<split>/<city>/*{_GT_SUFFIX})"
        )
    present = [s for s in splits if (root / "gtFine" / s).is_dir()]
    if not present:
        raise DatasetError(f"'{root / 'gtFine'}' has none of the split folders {list(splits)}")
    out_ann = Path(out_dir) / "annotations"
    out_ann.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split in present:
        gt_files = _instance_files(root / "gtFine" / split)
        image_root = root / "leftImg8bit" / split
        data = _coco_split(split, gt_files, image_root, num_workers=num_workers, progress=progress)
        paths[f"{split}_json"] = out_ann / f"instances_{split}.json"
        with paths[f"{split}_json"].open("w") as f:
            json.dump(data, f, separators=(",", ":"))
        paths[f"{split}_images"] = image_root
    return paths


def convert_instance_image(gt_path: str | Path, image_path: str | Path) -> dict[str, Any]:
    """Annotations of one instanceIds PNG, without ids.

    Args:
        gt_path: ``*_gtFine_instanceIds.png``, (H, W) 16-bit.
        image_path: its ``*_leftImg8bit.png`` (only its size is read).

    Returns:
        ``{"height": H, "width": W, VOID_KEY: RLE, "annotations": [{"category_id", "segmentation"
        (RLE), "area", "bbox" (x, y, w, h), "iscrowd", "cityscapes_id"}, ...]}``, annotations
        in increasing instanceIds value.
    """
    gt_path, image_path = Path(gt_path), Path(image_path)
    values = _read_instance_ids(gt_path)  # (H, W) integer
    height, width = values.shape
    image_size = _image_size(image_path)
    if image_size != (height, width):
        raise DatasetError(
            f"{gt_path}: size {width}x{height} differs from its image {image_path} "
            f"({image_size[1]}x{image_size[0]})"
        )
    present = _present_values(values, gt_path)
    values_f = np.asfortranarray(values)  # pycocotools encodes column-major masks
    annotations = []
    for value in present.tolist():
        label = value // 1000 if value >= 1000 else value
        if label in THING_CLASSES:
            annotations.append(_annotation(values_f == value, label, value))
    void = _encode(np.isin(values_f, VOID_LABEL_IDS))
    return {"height": height, "width": width, VOID_KEY: void, "annotations": annotations}


def _instance_files(split_dir: Path) -> list[Path]:
    files = sorted(split_dir.glob(f"*/*{_GT_SUFFIX}"))
    if not files:
        raise DatasetError(f"'{split_dir}' holds no <city>/*{_GT_SUFFIX} files")
    return files


def _coco_split(
    split: str, gt_files: list[Path], image_root: Path, *, num_workers: int, progress: bool
) -> dict[str, Any]:
    file_names = [f"{p.parent.name}/{p.name[: -len(_GT_SUFFIX)]}{_IMAGE_SUFFIX}" for p in gt_files]
    image_paths = [image_root / name for name in file_names]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    converted = _convert_all(gt_files, image_paths, num_workers=num_workers)
    if progress:
        from tqdm import tqdm

        converted = tqdm(converted, total=len(gt_files), desc=f"cityscapes {split}", unit="img")
    # converted first: its end (not file_names') stops the loop, so the bar and the pool close
    for image_id, (image, file_name) in enumerate(zip(converted, file_names), start=1):
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": image["height"],
                "width": image["width"],
                VOID_KEY: image[VOID_KEY],
            }
        )
        for ann in image["annotations"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    categories = [
        {"id": cid, "name": name, "supercategory": _SUPERCATEGORY.get(cid, "vehicle")}
        for cid, name in THING_CLASSES.items()
    ]
    info = {"description": f"Cityscapes gtFine {split} instances (dynaseg data cityscapes)"}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def _convert_all(
    gt_files: list[Path], image_paths: list[Path], *, num_workers: int
) -> Iterator[dict[str, Any]]:
    """:func:`convert_instance_image` of each pair, in order (in worker processes if asked)."""
    if num_workers == 0:
        yield from map(convert_instance_image, gt_files, image_paths)
        return
    pool = ProcessPoolExecutor(max_workers=num_workers)
    try:
        yield from pool.map(convert_instance_image, gt_files, image_paths, chunksize=4)
    finally:  # on an error, do not wait for the images still queued
        pool.shutdown(cancel_futures=True)


def _read_instance_ids(path: Path) -> np.ndarray:
    """The instanceIds values, (H, W) uint16 or int32."""
    try:
        with Image.open(path) as im:
            fmt, mode = im.format, im.mode
            if fmt == "PNG" and mode in _INSTANCE_MODES:
                # native byte order; 16-bit PNGs read as uint16, 32-bit ('I') as int32
                return _non_negative(np.asarray(im).astype(_dtype_of(mode), copy=False), path)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot read it as a PNG image ({e})") from None
    if fmt != "PNG":
        raise DatasetError(f"{path}: not a PNG file (format {fmt})")
    raise DatasetError(f"{path}: mode {mode!r}, expected a 16-bit grayscale instanceIds PNG")


def _dtype_of(mode: str) -> type:
    return np.int32 if mode == "I" else np.uint16


def _non_negative(values: np.ndarray, path: Path) -> np.ndarray:
    if values.dtype != np.uint16 and values.min() < 0:
        raise DatasetError(f"{path}: negative pixel value {int(values.min())}")
    return values


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image, from its header."""
    if not path.is_file():
        raise DatasetError(f"image '{path}' is missing (every gtFine file needs its leftImg8bit)")
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, SyntaxError) as e:
        raise DatasetError(f"{path}: cannot read the image ({e})") from None


def _present_values(values: np.ndarray, path: Path) -> np.ndarray:
    """The distinct pixel values, ascending; raise on one whose label id is not 0..33."""
    top = int(values.max())
    if top <= _MAX_VALUE:
        present = np.flatnonzero(np.bincount(values.ravel()))
        unknown = present[(present >= _NUM_LABELS) & (present < 1000)]
        if not unknown.size:
            return present
        top = int(unknown[0])
    label = top // 1000 if top >= 1000 else top
    raise DatasetError(
        f"{path}: pixel value {top} has unknown Cityscapes label id {label} "
        f"(expected 0-{_NUM_LABELS - 1}, or label id * 1000 + index for an instance)"
    )


def _annotation(mask: np.ndarray, label: int, value: int) -> dict[str, Any]:
    """COCO annotation (no ids) of one instance (``value >= 1000``) or group region."""
    rle = _encode(mask)
    compressed = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return {
        "category_id": label,
        "segmentation": rle,
        "area": int(mask_utils.area(compressed)),
        "bbox": [float(b) for b in mask_utils.toBbox(compressed)],
        "iscrowd": int(value < 1000),
        "cityscapes_id": value,
    }


def _encode(mask: np.ndarray) -> dict[str, Any]:
    """Compressed RLE (JSON-ready: ``counts`` is str) of an (H, W) bool mask."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
