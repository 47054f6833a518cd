"""Drawings people would rather see than read: prediction overlays (loss curves: ``engine/loss_curve.py``).

* :func:`draw_instances` blends each mask in its own colour, darkens its boundary,
  outlines its box and writes ``"name 0.87"`` on a filled tag.
* :func:`draw_panoptic` tints every stuff region in its class's fixed (muted) colour with
  the class name written once inside it, and draws thing segments like instances (own
  colour, darker boundary, ``"name 0.87"`` tag); void pixels stay as they are.
"""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dynaseg.errors import UserError
from dynaseg.structures.instances import Instances
from dynaseg.structures.panoptic import PanopticSegmentation, Segment

__all__ = [
    "RESOLUTION_COLORS",
    "Color",
    "draw_instances",
    "draw_panoptic",
    "instance_colors",
    "resolution_style",
    "save_overlay",
    "save_panoptic_overlay",
]

Color = tuple[int, int, int]
_GOLDEN = 0.618033988749895


# --------------------------------------------------------------------------- colours
def _golden_color(
    i: int, h0: float, saturations: tuple[float, float], values: tuple[float, float]
) -> Color:
    """``i``-th colour of a golden-ratio hue walk from ``h0``, alternating saturation and value."""
    h = (h0 + i * _GOLDEN) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, saturations[i % 2], values[(i // 2) % 2])
    return (round(r * 255), round(g * 255), round(b * 255))


def instance_colors(n: int, seed: int = 0) -> list[Color]:
    """``n`` well separated RGB colours (golden-ratio hue steps, alternating saturation)."""
    h0 = (seed * _GOLDEN + 0.1) % 1.0
    return [_golden_color(i, h0, (0.85, 0.6), (0.95, 0.8)) for i in range(n)]


def _stuff_color(label: int) -> Color:
    """Fixed colour of stuff class ``label``: muted, so stuff reads as background behind things."""
    return _golden_color(label, 0.45, (0.4, 0.25), (0.85, 0.7))


def _darker(c: Color, f: float = 0.55) -> Color:
    return (int(c[0] * f), int(c[1] * f), int(c[2] * f))


def _text_color(bg: Color) -> Color:
    luma = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if luma > 150 else (255, 255, 255)


# --------------------------------------------------------------------------- helpers
def _to_hwc_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8 ndarray or (3, H, W) uint8 tensor -> private (H, W, 3) uint8 copy."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be (3, H, W), got {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image array must be (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    return np.array(image, copy=True, order="C")


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """Float image -> uint8, rounded and clipped to [0, 255]."""
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font only
        return ImageFont.load_default()


def _image_font(h: int, w: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Tag font for an (h, w) image: 2.5 % of the short side, 10 to 32 px."""
    return _font(max(10, min(32, round(0.025 * min(h, w)))))


def _line_px(h: int, w: int) -> int:
    """Box outline / mask boundary width for an (h, w) image: 1 px per 300 px of the short side."""
    return max(1, round(min(h, w) / 300))


def _bbox_crop(mask: np.ndarray) -> tuple[slice, slice] | None:
    """(H, W) bool -> (rows, cols) slices of its tight bounding box; None if empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _boundary(mask: np.ndarray, thickness: int) -> np.ndarray:
    """(H, W) bool -> pixels of ``mask`` within ``thickness`` px of its edge (border counts)."""
    inner = mask
    for _ in range(thickness):
        p = np.pad(inner, 1, constant_values=False)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def _interior_point(mask: np.ndarray) -> tuple[float, float] | None:
    """(x, y) of a pixel of ``mask`` (H, W) bool deep inside it, or None if the mask is empty.

    Peels the mask (sampled every few pixels, at most 64 samples a side) one ring at a time; of
    the last pixels standing, i.e. about the farthest from any edge, returns the one nearest
    their mean. Always a pixel of the mask, also for rings, C shapes and split regions.
    """
    crop = _bbox_crop(mask)
    if crop is None:
        return None
    m = mask[crop]
    step = max(1, math.ceil(max(m.shape) / 64))
    off = step // 2
    core = m[off::step, off::step]
    if not core.any():  # thin shape missed by the sampling grid
        core, step, off = m, 1, 0
    while True:
        inner = core & ~_boundary(core, 1)
        if not inner.any():
            break
        core = inner
    ys, xs = np.nonzero(core)
    k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return float(crop[1].start + off + xs[k] * step), float(crop[0].start + off + ys[k] * step)


def _label_text(name: str, score: float | None) -> str:
    return name if score is None else f"{name} {score:.2f}"


def _class_name(names: Sequence[str], label: int) -> str:
    """Name of a contiguous label; unknown labels print as the number."""
    return names[label] if 0 <= label < len(names) else str(label)


def _clamp(v: float, hi: float) -> float:
    return min(max(v, 0), max(hi, 0))


def _draw_tag(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    color: Color,
    font: Any,
    image_wh: tuple[int, int],
    *,
    centered: bool = False,
) -> None:
    """Filled tag with ``text``: centred on (x, y) if ``centered``, else placed above (x, y) if
    it fits, else just inside below it; kept inside the image."""
    left, t, r, b = draw.textbbox((0, 0), text, font=font)
    tw, th, pad = r - left, b - t, 2
    w, h = image_wh
    bw, bh = tw + 2 * pad, th + 2 * pad
    if centered:
        x, y = _clamp(xy[0] - bw / 2, w - bw), _clamp(xy[1] - bh / 2, h - bh)
    else:
        x, y = _clamp(xy[0], w - bw), xy[1] - bh
        if y < 0:
            y = _clamp(xy[1], h - bh)
    draw.rectangle((x, y, x + bw, y + bh), fill=color)
    draw.text((x + pad - left, y + pad - t), text, fill=_text_color(color), font=font)


def _draw_legend(
    draw: ImageDraw.ImageDraw, legend: Mapping[str, Color], font: Any, image_wh: tuple[int, int]
) -> None:
    """Small key (swatch + name per entry) in the top-right corner on a white panel."""
    if not legend:
        return
    boxes = [draw.textbbox((0, 0), str(name), font=font) for name in legend]
    line_h = max(b[3] - b[1] for b in boxes) + 4
    text_w = max(b[2] - b[0] for b in boxes)
    sw, pad = line_h - 4, 4
    panel_w, panel_h = pad * 3 + sw + text_w, pad * 2 + line_h * len(legend)
    x0, y0 = max(image_wh[0] - panel_w - pad, 0), pad
    draw.rectangle((x0, y0, x0 + panel_w, y0 + panel_h), fill=(255, 255, 255), outline=(0, 0, 0))
    for i, ((name, color), tb) in enumerate(zip(legend.items(), boxes)):
        y = y0 + pad + i * line_h
        draw.rectangle(
            (x0 + pad, y + 2, x0 + pad + sw, y + 2 + sw), fill=tuple(color), outline=(0, 0, 0)
        )
        draw.text((x0 + 2 * pad + sw - tb[0], y + 2 - tb[1]), str(name), fill=(0, 0, 0), font=font)


# --------------------------------------------------------------------------- overlays
def draw_instances(
    image: np.ndarray | torch.Tensor,
    instances: Instances,
    class_names: Sequence[str],
    *,
    score_threshold: float = 0.0,
    alpha: float = 0.5,
    colors: Sequence[Color] | None = None,
    legend: Mapping[str, Color] | None = None,
) -> np.ndarray:
    """Draw predictions on an image.

    Args:
        image: (H, W, 3) uint8 array or (3, H, W) uint8 tensor, RGB; not modified.
        instances: predictions at this image's size; ``masks`` (N, H, W) may be None.
        class_names: name per contiguous label (unknown labels print as the number).
        score_threshold: draw only instances with ``score >= score_threshold``.
        alpha: mask opacity in [0, 1].
        colors: optional colour per instance (length N, original order); default distinct.
        legend: optional ``{name: colour}`` key drawn in the top-right corner.

    Returns:
        (H, W, 3) uint8 RGB array.
    """
    out = _to_hwc_uint8(image)
    h, w = out.shape[:2]
    n = len(instances)
    if instances.masks is not None and n and tuple(instances.masks.shape[1:]) != (h, w):
        raise ValueError(
            f"masks are {tuple(instances.masks.shape[1:])} but image is {(h, w)}; "
            "resize the masks (or image) first"
        )
    if colors is not None and len(colors) != n:
        raise ValueError(f"colors has {len(colors)} entries for {n} instances")
    colors = list(colors) if colors is not None else instance_colors(n)
    scores = None if instances.scores is None else instances.scores.detach().cpu().float().numpy()
    keep = np.arange(n) if scores is None else np.flatnonzero(scores >= score_threshold)
    if len(keep) == 0 and not legend:
        return out

    if instances.masks is not None and len(keep):
        out = _blend_masks(out, instances.masks, keep, colors, alpha)
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    font = _image_font(h, w)
    line_w = _line_px(h, w)
    boxes = instances.boxes.detach().cpu().float().numpy()
    labels = instances.labels.detach().cpu().numpy()
    for i in keep:
        x0, y0, x1, y1 = boxes[i].tolist()
        draw.rectangle((x0, y0, max(x1, x0), max(y1, y0)), outline=tuple(colors[i]), width=line_w)
    for i in keep:  # tags last so boxes never cover them
        name = _class_name(class_names, int(labels[i]))
        text = _label_text(name, None if scores is None else float(scores[i]))
        _draw_tag(
            draw,
            (float(boxes[i][0]), float(boxes[i][1])),
            text,
            _darker(colors[i], 0.8),
            font,
            (w, h),
        )
    if legend:
        _draw_legend(draw, legend, font, (w, h))
    return np.asarray(pil).copy()


def _blend_masks(
    out: np.ndarray, masks: torch.Tensor, keep: np.ndarray, colors: Sequence[Color], alpha: float
) -> np.ndarray:
    """Alpha-blend masks (largest first, so small objects stay visible) and darken their edges."""
    m = masks.detach()[torch.as_tensor(keep, device=masks.device)].to(torch.bool).cpu().numpy()
    order = np.argsort(-m.reshape(len(keep), -1).sum(1), kind="stable")
    img = out.astype(np.float32)
    thickness = _line_px(*out.shape[:2])
    for j in order:
        crop = _bbox_crop(m[j])
        if crop is None:
            continue
        mask, region = m[j][crop], img[crop]  # region is a view: edits land in img
        color = np.asarray(colors[keep[j]], np.float32)
        region[mask] = region[mask] * (1.0 - alpha) + color * alpha
        region[_boundary(mask, thickness)] = np.asarray(_darker(tuple(colors[keep[j]])), np.float32)
    return _to_uint8(img)


def _save_image(path: str | Path, image: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 array (format from the suffix, parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def save_overlay(
    path: str | Path,
    image: np.ndarray | torch.Tensor,
    instances: Instances,
    class_names: Sequence[str],
    **kwargs: Any,
) -> Path:
    """:func:`draw_instances` and write the result (format from the suffix); returns the path."""
    return _save_image(path, draw_instances(image, instances, class_names, **kwargs))


def draw_panoptic(
    image: np.ndarray | torch.Tensor,
    pan: PanopticSegmentation,
    *,
    thing_names: Sequence[str],
    stuff_names: Sequence[str],
    alpha: float = 0.5,
) -> np.ndarray:
    """Draw a panoptic segmentation on an image.

    Stuff segments are tinted in a fixed colour per stuff class and named once per class (on
    its largest segment, at a pixel deep inside it). Thing segments get a colour each (as in
    :func:`draw_instances`), a darker boundary and a ``"name 0.87"`` tag at their top-left
    corner. Void pixels (id 0) and ids without a segment are left as they are, tags aside.

    Args:
        image: (H, W, 3) uint8 array or (3, H, W) uint8 tensor, RGB; not modified.
        pan: the segmentation at this image's size; ``ids`` (H, W) int.
        thing_names: name per contiguous thing label (unknown labels print as the number).
        stuff_names: name per contiguous stuff label (likewise).
        alpha: segment opacity in [0, 1].

    Returns:
        (H, W, 3) uint8 RGB array.
    """
    out = _to_hwc_uint8(image)
    h, w = out.shape[:2]
    if pan.image_size != (h, w):
        raise ValueError(
            f"panoptic ids are {pan.image_size} but image is {(h, w)}; "
            "resize the ids (or image) first"
        )
    ids = (
        pan.ids.detach().cpu().numpy() if isinstance(pan.ids, torch.Tensor) else np.asarray(pan.ids)
    )
    segments = sorted((s for s in pan.segments if s.id > 0), key=lambda s: s.id)
    if not segments:
        return out
    things = [s for s in segments if s.isthing]
    thing_colors = dict(zip((s.id for s in things), instance_colors(len(things))))
    colors = [thing_colors[s.id] if s.isthing else _stuff_color(s.label) for s in segments]

    # One blend for all segments: a colour lookup by each pixel's position in the sorted ids.
    seg_ids = np.asarray([s.id for s in segments], np.int64)
    pos = np.minimum(np.searchsorted(seg_ids, ids), len(seg_ids) - 1)
    hit = seg_ids[pos] == ids
    img = out.astype(np.float32)
    img[hit] = img[hit] * (1.0 - alpha) + np.asarray(colors, np.float32)[pos[hit]] * alpha
    thickness = _line_px(h, w)
    corners: list[tuple[Segment, tuple[float, float]]] = []
    for s in things:
        mask = ids == s.id
        crop = _bbox_crop(mask)
        if crop is None:
            continue
        img[crop][_boundary(mask[crop], thickness)] = np.asarray(
            _darker(thing_colors[s.id]), np.float32
        )
        corners.append((s, (float(crop[1].start), float(crop[0].start))))

    pil = Image.fromarray(_to_uint8(img))
    draw = ImageDraw.Draw(pil)
    font = _image_font(h, w)
    largest: dict[int, Segment] = {}
    for s in segments:  # name each stuff class once, on its largest segment
        if not s.isthing and (s.label not in largest or s.area > largest[s.label].area):
            largest[s.label] = s
    for label, s in largest.items():
        point = _interior_point(ids == s.id)
        if point is not None:
            _draw_tag(
                draw,
                point,
                _label_text(_class_name(stuff_names, label), None),
                _darker(_stuff_color(label), 0.8),
                font,
                (w, h),
                centered=True,
            )
    for s, corner in corners:  # thing tags last so stuff names never cover them
        _draw_tag(
            draw,
            corner,
            _label_text(_class_name(thing_names, s.label), s.score),
            _darker(thing_colors[s.id], 0.8),
            font,
            (w, h),
        )
    return np.asarray(pil).copy()


def save_panoptic_overlay(
    path: str | Path,
    image: np.ndarray | torch.Tensor,
    pan: PanopticSegmentation,
    *,
    thing_names: Sequence[str],
    stuff_names: Sequence[str],
    alpha: float = 0.5,
) -> Path:
    """:func:`draw_panoptic` and write the result (format from the suffix); returns the path."""
    return _save_image(
        path,
        draw_panoptic(image, pan, thing_names=thing_names, stuff_names=stuff_names, alpha=alpha),
    )


# --------------------------------------------------------------------------- mask resolutions


# The DynaMask paper's Fig. 7 colours: red 112, blue 56, green 28, yellow 14.
RESOLUTION_COLORS: dict[int, Color] = {
    112: (230, 30, 30),
    56: (40, 90, 240),
    28: (30, 190, 60),
    14: (245, 210, 20),
}


def resolution_style(instances: Instances, path: str | Path) -> dict[str, Any]:
    """``save_overlay`` arguments colouring each instance by its chosen mask side, with a legend;
    UserError naming ``path`` when the model reports no mask sides (one-stage models)."""
    sides = getattr(instances, "mask_resolutions", None)
    if sides is None:
        raise UserError(
            f"{path}: --color-by resolution needs a two-stage model (mask_rcnn / dynamask)"
        )
    colors = [RESOLUTION_COLORS.get(int(s), (128, 128, 128)) for s in sides.tolist()]
    legend = {f"{side}×{side}": color for side, color in RESOLUTION_COLORS.items()}
    return {"colors": colors, "legend": legend}
