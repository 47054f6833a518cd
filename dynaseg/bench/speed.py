"""End-to-end inference speed against torchvision peers (``dynaseg bench speed``).

Every model segments the same seeded random image at batch 1: preprocessing (to float, pad /
torchvision's transform) → postprocessed output with full-image masks. Weights are untrained, so
score thresholds are set to 0 and the detection cap to N: every model then does the work of N
instances (the count each run really produced is recorded and reported). All models live in one
process and run interleaved (round-robin per repeat), so drift (thermal, other load) hits all alike.

Per-stage times (``dynaseg/bench/stages.py``) come from forward pre/post hooks (or, where the work
is done outside ``forward``, a wrapped method) on the parts each model names, with exclusive
accounting: time inside a hooked module nested in another (torchvision's mask heads inside
``roi_heads``) counts for the inner one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dynaseg.bench.peers import PEERS_WITH_MASKS, build_peer, peer_stage_targets
from dynaseg.bench.stages import STAGES, StageTarget, StageTimer, stage_hooks
from dynaseg.config.overrides import with_overrides
from dynaseg.config.presets import load_config
from dynaseg.config.schema import BlendMaskConfig, DR1MaskConfig, ExperimentConfig, RCNNConfig
from dynaseg.inference.optimize import optimize_for_inference
from dynaseg.modeling.blendmask.model import BlendMask
from dynaseg.modeling.build import build_model
from dynaseg.modeling.dr1mask.model import DR1Mask
from dynaseg.structures import Batch, Instances
from dynaseg.structures.panoptic import PanopticSegmentation

__all__ = [
    "parse_size",
    "check_device",
    "sync_function",
    "force_detections",
    "nondegenerate_fcos_boxes",
    "random_image",
    "count_detections",
    "our_inference_fn",
    "peer_inference_fn",
    "time_inference",
    "describe_backbone",
    "unique_names",
    "BenchModel",
    "prepare_models",
    "run_speed_benchmark",
    "format_speed_table",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------- models


def parse_size(text: str) -> tuple[int, int]:
    """``"800x1216"`` → (800, 1216) = (height, width) in pixels; ValueError if malformed."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must be HxW, e.g. 800x1216, got '{text}'") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got '{text}'")
    return h, w


def check_device(name: str) -> torch.device:
    """``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` → a usable device; ValueError when CUDA is missing."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got '{name}'")
    return device


def sync_function(device: torch.device) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` for a CUDA device (timings wait for queued kernels), None on the CPU."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def force_detections(cfg: ExperimentConfig, n: int) -> ExperimentConfig:
    """``cfg`` with score thresholds 0 and the detection cap ``n``, so that an untrained model outputs
    (up to NMS and empty boxes) exactly ``n`` instances; candidate pools are widened to at least ``n``."""
    model = cfg.model
    if isinstance(model, (BlendMaskConfig, DR1MaskConfig)):
        return with_overrides(
            cfg,
            {
                "model.fcos.score_threshold": 0.0,
                "model.fcos.max_detections": n,
                "model.fcos.pre_nms_topk": max(model.fcos.pre_nms_topk, n),
            },
        )
    if isinstance(model, RCNNConfig):
        post = max(model.rpn.post_nms_topk_test, n)
        return with_overrides(
            cfg,
            {
                "model.box_head.score_threshold": 0.0,
                "model.box_head.detections_per_image": n,
                "model.rpn.post_nms_topk_test": post,
                "model.rpn.pre_nms_topk_test": max(model.rpn.pre_nms_topk_test, post),
            },
        )
    raise TypeError(f"unsupported model config: {type(model).__name__}")


def nondegenerate_fcos_boxes(model: nn.Module, *, distance: float = 1.5) -> bool:
    """Give an untrained FCOS-based model boxes of real size: its box regressor's bias := ``distance``.

    Untrained, ``relu(conv)`` gives side distances ≈ 0, i.e. empty boxes, which postprocessing drops
    (fewer than N detections) and whose masks cost nothing to paste. With ``distance`` strides to every
    side, boxes are 2·distance strides wide (24-384 px on P3-P7 for 1.5, like the RPN's 32-512 px
    anchors) and neighbours overlap at IoU 0.5, under FCOS's NMS threshold of 0.6.
    Returns whether ``model`` had an FCOS box regressor (ours or torchvision's).
    """
    from torchvision.models.detection import FCOS

    if isinstance(model, (BlendMask, DR1Mask)):
        conv = model.fcos_head.bbox_pred
    elif isinstance(model, FCOS):
        conv = model.head.regression_head.bbox_reg
    else:
        return False
    with torch.no_grad():
        conv.bias.fill_(distance)
    return True


def random_image(
    image_size: tuple[int, int], *, seed: int = 0, device: torch.device | str = "cpu"
) -> Tensor:
    """A fixed (seeded) random RGB image: (3, H, W) uint8 on ``device``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *image_size), generator=g, dtype=torch.uint8).to(device)


def count_detections(output: Instances | PanopticSegmentation | dict[str, Tensor]) -> int:
    """Instances in one image's output (ours, panoptic or a torchvision dict)."""
    if isinstance(output, dict):
        return int(output["boxes"].shape[0])
    if isinstance(output, PanopticSegmentation):
        return 0 if output.instances is None else len(output.instances)
    return len(output)


def our_inference_fn(
    model: nn.Module,
    *,
    image: Tensor,
    size_divisibility: int,
    memory_format: torch.memory_format = torch.contiguous_format,
    timer: StageTimer | None = None,
) -> Callable[[], int]:
    """One end-to-end run of our model on ``image`` ((3, H, W) uint8, no resizing) → detection count.

    Preprocessing (to float, zero-pad to ``size_divisibility``, ``Batch``) is timed as stage ``pre``;
    the model normalises inside ``forward`` (counted in ``post``).
    """
    h, w = image.shape[-2:]
    timer = timer or StageTimer()

    def run() -> int:
        with timer.section("pre"):
            batch = Batch.from_images([image], size_divisibility=size_divisibility)
            batch.images = batch.images.contiguous(memory_format=memory_format)
        return count_detections(model(batch)[0])

    return run


def peer_inference_fn(model: nn.Module, *, image: Tensor) -> Callable[[], int]:
    """One end-to-end run of a torchvision detector on ``image`` ((3, H, W) uint8) → detection count."""

    def run() -> int:
        return count_detections(model([image.float() / 255.0])[0])

    return run


# ---------------------------------------------------------------------------------------- timing


def time_inference(
    models: Mapping[str, Callable[[], int]],
    *,
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    timers: Mapping[str, StageTimer] | None = None,
    peer: str | None = None,
    expected_detections: int | None = None,
) -> list[dict[str, Any]]:
    """Time zero-argument callables (each one inference, returning its detection count), interleaved.

    ``warmup`` untimed rounds, then ``repeats`` timed rounds; each round calls every model once in
    the mapping's order, under ``torch.inference_mode()``, with CUDA synchronised around each call.

    Args:
        timers: the ``StageTimer`` hooked into each model (models without one report only ``post``).
        peer: the key of the reference model for ``ratio_to_peer`` (None: no ratios).
        expected_detections: N; rows whose count differs get ``detections_ok = False``.
    Returns:
        one row per model, in order: ``model``, ``median_ms``, ``p90_ms``, ``q1_ms``, ``q3_ms`` (IQR),
        ``min_ms``, ``max_ms``, ``ratio_to_peer`` (median / peer median, None for the peer),
        ``detections`` (fewest of the timed runs), ``detections_max``, ``detections_ok``, ``repeats``,
        ``stages_ms`` ({stage: median ms} over ``STAGES``; ``post`` = median total − the others).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = torch.device(device)
    sync = sync_function(device) or (lambda: None)
    timers = timers or {}
    totals: dict[str, list[float]] = {name: [] for name in models}
    stages: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    counts: dict[str, list[int]] = {name: [] for name in models}
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for name, fn in models.items():
                timer = timers.get(name)
                if timer is not None:
                    timer.reset()
                sync()
                start = time.perf_counter()
                n = fn()
                sync()
                elapsed = time.perf_counter() - start
                if round_index < warmup:
                    continue
                totals[name].append(elapsed * 1000)
                stages[name].append(
                    {} if timer is None else {k: v * 1000 for k, v in timer.totals.items()}
                )
                counts[name].append(int(n))
    rows = []
    for name in models:
        times = sorted(totals[name])
        median = statistics.median(times)
        stage_ms = {
            s: statistics.median(run.get(s, 0.0) for run in stages[name])
            for s in STAGES
            if s != "post"
        }
        stage_ms["post"] = max(0.0, median - sum(stage_ms.values()))
        rows.append(
            {
                "model": name,
                "median_ms": median,
                "p90_ms": float(np.percentile(times, 90)),
                "q1_ms": float(np.percentile(times, 25)),
                "q3_ms": float(np.percentile(times, 75)),
                "min_ms": times[0],
                "max_ms": times[-1],
                "ratio_to_peer": None,
                "detections": min(counts[name]),
                "detections_max": max(counts[name]),
                "detections_ok": expected_detections is None
                or set(counts[name]) == {expected_detections},
                "repeats": repeats,
                "stages_ms": stage_ms,
            }
        )
    by_name = {r["model"]: r for r in rows}
    if peer is not None and peer in by_name:
        for r in rows:
            if r["model"] != peer:
                r["ratio_to_peer"] = r["median_ms"] / by_name[peer]["median_ms"]
    return rows


# ---------------------------------------------------------------------------------------- benchmark


def describe_backbone(
    cfg_model: BlendMaskConfig | RCNNConfig | DR1MaskConfig | None = None, *, depth: int = 50
) -> str:
    """Short backbone label for tables: ``R-50 FPN-256`` (torchvision's, width 64) or ours with its width."""
    if cfg_model is None:
        return f"R-{depth} FPN-256"
    b = cfg_model.backbone
    width = "" if b.width == 64 else f" w{b.width}"
    return f"R-{b.depth}{width} FPN-{b.fpn_channels}"


def unique_names(configs: Sequence[str]) -> list[str]:
    """Row names for config arguments: the name itself, ``#2``, ``#3`` … for repeats."""
    seen: dict[str, int] = {}
    out = []
    for c in configs:
        seen[c] = seen.get(c, 0) + 1
        out.append(c if seen[c] == 1 else f"{c}#{seen[c]}")
    return out


@dataclasses.dataclass
class BenchModel:
    """One model of a benchmark, ready to run: ``run()`` segments the image and returns the count."""

    name: str
    model: nn.Module
    run: Callable[[], int]
    timer: StageTimer
    targets: Mapping[str, Sequence[StageTarget]]  # stage → parts, for ``stage_hooks``
    backbone: str  # ``describe_backbone`` label
    depth: int
    is_peer: bool = False
    has_masks: bool = True


def prepare_models(
    configs: Sequence[str],
    *,
    overrides: Sequence[str] = (),
    peer: str | None = "torchvision-maskrcnn",
    image_size: tuple[int, int] = (800, 1216),
    detections: int = 100,
    device: torch.device | str = "cpu",
    seed: int = 0,
    make_timer: Callable[[], StageTimer] | None = None,
) -> tuple[list[BenchModel], list[str]]:
    """Build every config (untrained, N detections forced, ``inference`` section applied) and the peer.

    Args:
        configs: preset names or YAML paths, each optionally followed by its own space-separated
            ``key=value`` overrides (``"dynamask_r50_fpn_1x model.dynamask.policy=112"``); ``overrides``
            apply to all.
        peer: a ``PEERS`` key or None; built with the first config's ResNet depth and class count.
        image_size: (H, W) of the seeded random image, pixels. detections: N forced on every model.
        make_timer: the ``StageTimer`` of each model (default: wall time, CUDA-synchronised).
    Returns:
        (models in order, the peer last; notes on what differs between them).
    """
    if not configs:
        raise ValueError("give at least one --config")
    if detections < 1:
        raise ValueError(f"detections must be at least 1, got {detections}")
    device = torch.device(device)
    make_timer = make_timer or (lambda: StageTimer(sync=sync_function(device)))
    image = random_image(image_size, seed=seed, device=device)
    entries: list[BenchModel] = []
    first_model_cfg = None
    for name, config in zip(unique_names(configs), configs):
        preset, *own = config.split()
        cfg = force_detections(load_config(preset, [*overrides, *own]), detections)
        model_cfg = cfg.model
        first_model_cfg = first_model_cfg or model_cfg
        torch.manual_seed(seed)
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = build_model(model_cfg, pretrained=False)
        model = model.to(device, memory_format=memory_format).eval()
        nondegenerate_fcos_boxes(model)
        optimize_for_inference(model, **dataclasses.asdict(cfg.inference))
        timer = make_timer()
        run = our_inference_fn(
            model,
            image=image,
            size_divisibility=model_cfg.size_divisibility,
            memory_format=memory_format,
            timer=timer,
        )
        entries.append(
            BenchModel(
                name,
                model,
                run,
                timer,
                model.timing_stages(),
                describe_backbone(model_cfg),
                model_cfg.backbone.depth,
            )
        )
    notes = []
    if peer is not None:
        depth = first_model_cfg.backbone.depth
        torch.manual_seed(seed)
        peer_model = build_peer(
            peer,
            num_classes=first_model_cfg.num_classes,
            device=device,
            image_size=image_size,
            detections=detections,
            depth=depth,
        ).eval()
        nondegenerate_fcos_boxes(peer_model)
        entries.append(
            BenchModel(
                peer,
                peer_model,
                peer_inference_fn(peer_model, image=image),
                make_timer(),
                peer_stage_targets(peer_model),
                describe_backbone(depth=depth),
                depth,
                is_peer=True,
                has_masks=peer in PEERS_WITH_MASKS,
            )
        )
        if peer not in PEERS_WITH_MASKS:
            notes.append(f"{peer} has no mask branch: boxes only (its 'mask' stage is empty)")
        notes += [
            f"{e.name} has a ResNet-{e.depth} backbone, the peer ResNet-{depth}"
            for e in entries
            if e.depth != depth
        ]
        widths = {
            e.name: e.backbone
            for e in entries
            if not e.is_peer and e.backbone != entries[-1].backbone
        }
        if widths:
            notes.append(
                "peer backbone is torchvision's standard width (64) with 256 FPN channels; "
                "backbones differ: " + ", ".join(f"{n} {b}" for n, b in widths.items())
            )
    return entries, notes


def run_speed_benchmark(
    configs: Sequence[str],
    *,
    overrides: Sequence[str] = (),
    peer: str | None = "torchvision-maskrcnn",
    image_size: tuple[int, int] = (800, 1216),
    detections: int = 100,
    device: torch.device | str = "cpu",
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[str]]:
    """``dynaseg bench speed``: ``prepare_models`` (see there for the arguments), then time them.

    Args:
        device: "cpu" / "cuda". repeats, warmup: timed / untimed interleaved rounds. seed: image and weights.
    Returns:
        (rows as ``time_inference``'s plus ``backbone``, ``has_masks``; notes to print under the table).
    """
    device = torch.device(device)
    entries, model_notes = prepare_models(
        configs,
        overrides=overrides,
        peer=peer,
        image_size=image_size,
        detections=detections,
        device=device,
        seed=seed,
    )
    notes = [
        f"batch 1, image {image_size[0]}x{image_size[1]} (seeded random), {device.type}, "
        f"{repeats} interleaved repeats after {warmup} warm-up, untrained weights, N = {detections} forced "
        "(score thresholds 0; FCOS box regressors biased to non-empty boxes)",
        *model_notes,
    ]
    if device.type == "cuda":
        notes.append(
            "stage hooks synchronise CUDA at every stage boundary (included in the totals)"
        )
    with contextlib.ExitStack() as hooks:
        for e in entries:
            hooks.enter_context(stage_hooks(targets=e.targets, timer=e.timer))
        logger.info("timing %s", ", ".join(e.name for e in entries))
        rows = time_inference(
            {e.name: e.run for e in entries},
            repeats=repeats,
            warmup=warmup,
            device=device,
            timers={e.name: e.timer for e in entries},
            peer=peer,
            expected_detections=detections,
        )
    for r, e in zip(rows, entries):
        r["backbone"], r["has_masks"] = e.backbone, e.has_masks
        if not r["detections_ok"]:
            got = (
                str(r["detections"])
                if r["detections"] == r["detections_max"]
                else f"{r['detections']}-{r['detections_max']}"
            )
            notes.append(f"WARNING: {r['model']} output {got} detections, not {detections}")
    return rows, notes


def format_speed_table(rows: Sequence[Mapping[str, Any]], notes: Sequence[str] = ()) -> str:
    """Markdown table of ``time_inference`` rows (times in ms), followed by the notes as a list."""
    head = ["model", "backbone", "median ms", "p90 ms", "IQR ms", "× peer", "detections", *STAGES]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|",
    ]
    for r in rows:
        ratio = "—" if r.get("ratio_to_peer") is None else f"{r['ratio_to_peer']:.2f}"
        dets = (
            str(r["detections"])
            if r["detections"] == r.get("detections_max", r["detections"])
            else f"{r['detections']}-{r['detections_max']}"
        )
        if not r.get("detections_ok", True):
            dets += " ⚠"
        if not r.get("has_masks", True):
            dets += " (boxes)"
        cells = [
            str(r["model"]),
            str(r.get("backbone", "")),
            f"{r['median_ms']:.1f}",
            f"{r['p90_ms']:.1f}",
            f"{r['q1_ms']:.1f}–{r['q3_ms']:.1f}",
            ratio,
            dets,
            *(f"{r['stages_ms'].get(s, 0.0):.1f}" for s in STAGES),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines)
