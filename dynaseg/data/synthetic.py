"""Deterministic synthetic COCO-style dataset of easy and hard shapes.

Easy things (circle, square, triangle) have smooth, regular outlines; hard things
(many-spiked star, toothed gear, rough blob, ring/crescent) need fine masks at any
size. Object size is drawn independently of shape (log-uniform diameter), objects
occlude each other and may be cut by the image border, and the background is a
textured, noisy "sky"/"ground" split that doubles as the panoptic stuff classes.

Every image is drawn from its own ``np.random.Generator`` seeded with
``(seed, split, index)``, so the same seed gives byte-identical files and an image
does not depend on how many others are generated.
"""

from __future__ import annotations

import colorsys
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

THING_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "gear", "blob", "ring")
EASY_CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
HARD_CLASSES: tuple[str, ...] = ("star", "gear", "blob", "ring")
STUFF_CLASSES: tuple[str, ...] = ("sky", "ground")

MIN_VISIBLE_AREA = 20  # px; smaller visible instances are painted but not annotated
MIN_VISIBLE_FRACTION = 0.15  # of the in-image shape area; below that -> heavily occluded
MIN_DIAMETER = 10.0  # px
MAX_DIAMETER_FRAC = 0.6  # of the shorter image side

_SPLIT_CODES = {"train": 0, "val": 1}
# Standard-normal quantiles of 256 equiprobable bins: a uint8 random byte -> Gaussian noise sample,
# several times faster than rng.standard_normal and indistinguishable after uint8 quantisation.
_GAUSS_LUT = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], np.float32)
# Noisy images compress poorly anyway; Huffman-only zlib is faster and smaller than the default strategy.
_PNG_KW = {"compress_level": 1, "compress_type": zlib.Z_HUFFMAN_ONLY}


def thing_categories() -> list[dict]:
    """COCO ``categories`` entries for the thing classes (ids 1..7)."""
    return [
        {"id": i + 1, "name": n, "supercategory": "easy" if n in EASY_CLASSES else "hard"}
        for i, n in enumerate(THING_CLASSES)
    ]


def panoptic_categories() -> list[dict]:
    """COCO panoptic ``categories``: things (isthing=1) then stuff (isthing=0, ids 8, 9)."""
    stuff = [
        {"id": len(THING_CLASSES) + i + 1, "name": n, "supercategory": "stuff", "isthing": 0}
        for i, n in enumerate(STUFF_CLASSES)
    ]
    return [{**c, "isthing": 1} for c in thing_categories()] + stuff


@dataclass
class SyntheticObject:
    """One painted thing: ``mask`` is the in-image shape, ``visible`` what remains after occlusion."""

    category_id: int
    mask: np.ndarray
    visible: np.ndarray
    kept: bool


@dataclass
class SyntheticSample:
    """A rendered image, its objects in paint order, and the boolean sky mask (rest is ground)."""

    image: np.ndarray
    sky: np.ndarray
    objects: list[SyntheticObject] = field(default_factory=list)


# ----------------------------------------------------------------------------- shapes
def _shape_mask(
    name: str, rng: np.random.Generator, u: np.ndarray, v: np.ndarray, R: float
) -> np.ndarray:
    """Boolean mask of shape ``name`` of outer radius ``R`` in its rotated local frame (u, v)."""
    if name in (
        "square",
        "triangle",
    ):  # regular polygon with vertices on radius R: half-plane tests
        k = 4 if name == "square" else 3
        phis = 2 * np.pi * (np.arange(k) + 0.5) / k
        apothem = R * np.cos(np.pi / k)
        return np.all([u * np.cos(p) + v * np.sin(p) <= apothem for p in phis], axis=0)
    r = np.hypot(u, v)
    if name == "circle":
        return r <= R
    if name == "ring":  # ring (hole inside) or crescent (hole shifted out of the disc)
        if rng.random() < 0.5:
            hole = rng.uniform(0.45, 0.75)
            off = rng.uniform(0, 0.5) * (1 - hole)
        else:
            hole, off = rng.uniform(0.7, 0.9), rng.uniform(0.3, 0.55)
        return (r <= R) & (np.hypot(u - off * R, v) > hole * R)
    theta = np.arctan2(v, u)
    if name == "star":
        k, inner = int(rng.integers(7, 15)), rng.uniform(0.35, 0.6)
        tri = np.abs(2 * ((k * theta / (2 * np.pi)) % 1.0) - 1)  # 1 at spike tips, 0 in valleys
        return r <= R * (inner + (1 - inner) * tri)
    if name == "gear":
        k, duty, root = int(rng.integers(8, 17)), rng.uniform(0.4, 0.6), rng.uniform(0.68, 0.82)
        radius = np.where((k * theta / (2 * np.pi)) % 1.0 < duty, R, root * R)
        inside = r <= radius
        if rng.random() < 0.5:
            inside &= r > R * rng.uniform(0.18, 0.32)
        return inside
    if name == "blob":  # low harmonics for the outline + high-frequency roughness
        ks = np.concatenate([np.arange(2, 6), rng.choice(np.arange(8, 25), 4, replace=False)])
        amps = np.concatenate([rng.uniform(0, 0.18, 4), rng.uniform(0.01, 0.05, 4)])
        phases = rng.uniform(0, 2 * np.pi, 8)

        def radius_fn(t):
            waves = amps[:, None] * np.cos(ks[:, None] * t.ravel()[None] + phases[:, None])
            return 1 + waves.sum(0).reshape(t.shape)

        scale = R / radius_fn(np.linspace(-np.pi, np.pi, 720)).max()
        return r <= scale * radius_fn(theta)
    raise ValueError(f"unknown shape {name!r}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255


def _texture(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Smooth texture in [-1, 1] on the grid ``ys`` x ``xs``: mean of three random plane waves.

    Uses sin(a + b) = sin a cos b + cos a sin b so only 1-D sines are evaluated.
    """
    ys, xs = ys.ravel().astype(np.float32), xs.ravel().astype(np.float32)
    out = np.zeros((ys.size, xs.size), np.float32)
    for _ in range(3):
        freq, ang, phase = (
            2 * np.pi / rng.uniform(15, 150),
            rng.uniform(0, np.pi),
            rng.uniform(0, 2 * np.pi),
        )
        ay = (np.float32(freq * np.sin(ang)) * ys + np.float32(phase))[:, None]
        ax = (np.float32(freq * np.cos(ang)) * xs)[None, :]
        out += np.sin(ay) * np.cos(ax)
        out += np.cos(ay) * np.sin(ax)
    out *= np.float32(1 / 3)
    return out


def _draw_layout(rng: np.random.Generator, H: int, W: int, n: int, backgrounds: list[np.ndarray]):
    """Draw ``n`` objects: [(category_id, full-image mask, window slices, window mask, (3, N) colours)]."""
    max_d = MAX_DIAMETER_FRAC * min(H, W)
    objs, colours = [], []
    for _ in range(n):
        cls = int(rng.integers(len(THING_CLASSES)))
        R = 0.5 * np.exp(rng.uniform(np.log(MIN_DIAMETER), np.log(max_d)))
        cx, cy, rot = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(0, 2 * np.pi)
        x0, x1 = max(0, int(cx - R) - 1), min(W, int(cx + R) + 2)
        y0, y1 = max(0, int(cy - R) - 1), min(H, int(cy + R) + 2)
        dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
        dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
        c, s = np.cos(rot), np.sin(rot)
        u, v = dx * c + dy * s, dy * c - dx * s
        local = _shape_mask(THING_CLASSES[cls], rng, u, v, R)
        for attempt in range(
            1000
        ):  # saturated colour, far from the backgrounds and (if possible) other objects
            colour = _hsv(rng.random(), rng.uniform(0.65, 1), rng.uniform(0.55, 1))
            if min(np.linalg.norm(colour - b) for b in backgrounds) > 80 and (
                attempt >= 20 or all(np.linalg.norm(colour - prev) > 60 for prev in colours)
            ):
                break
        colours.append(colour)
        ang, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.3)
        shade = (
            1 + strength * (np.cos(ang) * u + np.sin(ang) * v) / R + 0.06 * _texture(rng, dy, dx)
        )
        window = (slice(y0, y1), slice(x0, x1))
        mask = np.zeros((H, W), bool)
        mask[window] = local
        objs.append((cls + 1, mask, window, local, colour[:, None] * shade[local][None, :]))
    return objs


def render_sample(
    seed: int,
    split: str,
    index: int,
    image_size: int | tuple[int, int] = 320,
    max_objects: int = 8,
    min_objects: int = 1,
) -> SyntheticSample:
    """Render image ``index`` of ``split`` deterministically from ``(seed, split, index)``."""
    H, W = _check_size(image_size)
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {tuple(_SPLIT_CODES)}, got {split!r}")
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    yy = np.arange(H, dtype=np.float32)[:, None]
    xx = np.arange(W, dtype=np.float32)[None, :]
    # Background: wavy sky/ground boundary, muted base colours, smooth texture, per-pixel noise.
    boundary = np.full(W, rng.uniform(0.3, 0.7) * H, np.float32)
    for _ in range(3):
        amp, cycles, phase = (
            rng.uniform(0, 0.06) * H,
            rng.uniform(0.3, 4),
            rng.uniform(0, 2 * np.pi),
        )
        boundary += amp * np.sin(2 * np.pi * cycles * xx[0] / W + phase)
    sky = yy + 0.5 < boundary[None, :]
    bases = [_hsv(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.9)) for _ in range(2)]
    lum = np.where(
        sky, rng.uniform(8, 25) * _texture(rng, yy, xx), rng.uniform(8, 25) * _texture(rng, yy, xx)
    )
    image = np.stack(
        [np.where(sky, b0, b1) + lum for b0, b1 in zip(*bases)]
    )  # channel-first: faster
    # Things, painted in order; re-drawn until enough instances survive occlusion/size filtering.
    for _ in range(100):
        objs = _draw_layout(rng, H, W, int(rng.integers(min_objects, max_objects + 1)), bases)
        covered = np.zeros((H, W), bool)
        out = []
        for cat, mask, *_ in reversed(objs):
            visible = mask & ~covered
            covered |= mask
            area = int(visible.sum())
            kept = area >= MIN_VISIBLE_AREA and area >= MIN_VISIBLE_FRACTION * mask.sum()
            out.append(SyntheticObject(cat, mask, visible, kept))
        if sum(o.kept for o in out) >= min(1, min_objects):
            break
    else:  # pragma: no cover - practically unreachable
        raise RuntimeError("could not draw a layout with a visible instance")
    for _, _, window, local, rgb in objs:
        for channel, values in zip(image, rgb):
            channel[window][local] = values
    noise = _GAUSS_LUT[np.frombuffer(rng.bytes(H * W), np.uint8).reshape(H, W)]
    image += np.float32(rng.uniform(2, 7)) * noise  # per-pixel Gaussian noise
    image = np.clip(image, 0, 255, out=image).astype(np.uint8).transpose(1, 2, 0)
    return SyntheticSample(np.ascontiguousarray(image), sky, out[::-1])


# ----------------------------------------------------------------------------- writer
def _check_size(image_size) -> tuple[int, int]:
    hw = (
        (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
    )
    if len(hw) != 2 or any(not isinstance(s, (int, np.integer)) or s < 32 for s in hw):
        raise ValueError(
            f"image_size must be an int or (height, width) of ints >= 32, got {image_size!r}"
        )
    return int(hw[0]), int(hw[1])


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]


def _write_json(obj: dict, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def generate_synthetic(
    out_dir: str | Path,
    *,
    num_train: int = 200,
    num_val: int = 50,
    image_size: int | tuple[int, int] = 320,
    seed: int = 0,
    max_objects: int = 8,
    min_objects: int = 1,
    panoptic: bool = True,
    progress: bool = False,
) -> dict[str, Path]:
    """Write the synthetic dataset (images, COCO instances and optionally panoptic) under ``out_dir``.

    ``image_size`` is an int or ``(height, width)``. Returns the written paths: ``train_json``,
    ``val_json``, ``train_images``, ``val_images`` and, if ``panoptic``, ``panoptic_{split}_json``
    and ``panoptic_{split}_dir``.
    """
    for name, val in (
        ("num_train", num_train),
        ("num_val", num_val),
        ("seed", seed),
        ("min_objects", min_objects),
        ("max_objects", max_objects),
    ):
        if not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    if max_objects < min_objects:
        raise ValueError(f"max_objects ({max_objects}) must be >= min_objects ({min_objects})")
    H, W = _check_size(image_size)
    out_dir = Path(out_dir)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_train + num_val, desc="synthetic", unit="img")
    stuff_ids = [len(THING_CLASSES) + 1 + i for i in range(len(STUFF_CLASSES))]
    paths: dict[str, Path] = {}
    for split, count in (("train", num_train), ("val", num_val)):
        img_dir, pan_dir = out_dir / split, out_dir / "annotations" / f"panoptic_{split}"
        img_dir.mkdir(exist_ok=True)
        if panoptic:
            pan_dir.mkdir(exist_ok=True)
        images, anns, pan_anns = [], [], []
        for index in range(count):
            sample = render_sample(seed, split, index, (H, W), max_objects, min_objects)
            image_id, file_name = index + 1, f"{index:06d}.png"
            Image.fromarray(sample.image).save(img_dir / file_name, **_PNG_KW)
            images.append({"id": image_id, "file_name": file_name, "height": H, "width": W})
            pan_ids = np.zeros((H, W), np.uint32)
            segments, covered = [], np.zeros((H, W), bool)
            for obj in sample.objects:
                covered |= obj.mask
                if not obj.kept:
                    continue
                rle = mask_utils.encode(np.asfortranarray(obj.visible.astype(np.uint8)))
                bbox = [float(b) for b in mask_utils.toBbox(rle)]
                area = int(mask_utils.area(rle))
                rle["counts"] = rle["counts"].decode("ascii")
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image_id,
                        "category_id": obj.category_id,
                        "segmentation": rle,
                        "area": area,
                        "bbox": bbox,
                        "iscrowd": 0,
                    }
                )
                segments.append(
                    {
                        "id": len(segments) + 1,
                        "category_id": obj.category_id,
                        "area": area,
                        "bbox": [int(b) for b in bbox],
                        "iscrowd": 0,
                    }
                )
                pan_ids[obj.visible] = segments[-1]["id"]
            if panoptic:
                for cat, region in zip(stuff_ids, (sample.sky, ~sample.sky)):
                    region = region & ~covered
                    if region.any():
                        segments.append(
                            {
                                "id": len(segments) + 1,
                                "category_id": cat,
                                "area": int(region.sum()),
                                "bbox": _bbox(region),
                                "iscrowd": 0,
                            }
                        )
                        pan_ids[region] = segments[-1]["id"]
                rgba = (
                    pan_ids.astype("<u4").view(np.uint8).reshape(H, W, 4)
                )  # id = R + 256 G + 256^2 B
                Image.fromarray(rgba).convert("RGB").save(pan_dir / file_name, compress_level=1)
                pan_anns.append(
                    {"image_id": image_id, "file_name": file_name, "segments_info": segments}
                )
            if bar is not None:
                bar.update()
        info = {"description": f"dynaseg synthetic shapes ({split}, seed={seed})", "version": "1.0"}
        paths[f"{split}_json"] = out_dir / "annotations" / f"instances_{split}.json"
        paths[f"{split}_images"] = img_dir
        _write_json(
            {
                "info": info,
                "licenses": [],
                "images": images,
                "annotations": anns,
                "categories": thing_categories(),
            },
            paths[f"{split}_json"],
        )
        if panoptic:
            paths[f"panoptic_{split}_json"] = out_dir / "annotations" / f"panoptic_{split}.json"
            paths[f"panoptic_{split}_dir"] = pan_dir
            _write_json(
                {
                    "info": info,
                    "licenses": [],
                    "images": images,
                    "annotations": pan_anns,
                    "categories": panoptic_categories(),
                },
                paths[f"panoptic_{split}_json"],
            )
    if bar is not None:
        bar.close()
    return paths
