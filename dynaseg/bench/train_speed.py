"""Training throughput against torchvision's Mask R-CNN (``dynaseg bench train``).

One iteration = forward with losses + backward + SGD step on a fixed synthetic batch (seeded random
images, a few random boxes per image with elliptical masks inside them), no data loading. All models
live in one process and run interleaved (round-robin per iteration).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dynaseg.bench.peers import build_peer
from dynaseg.bench.speed import describe_backbone, sync_function, unique_names
from dynaseg.config.presets import load_config
from dynaseg.config.schema import num_stuff_classes
from dynaseg.engine.optim import build_optimizer
from dynaseg.engine.trainer import training_autocast, training_dtype, training_objective
from dynaseg.modeling.build import build_model
from dynaseg.structures import Batch, Instances
from dynaseg.structures.panoptic import IGNORE_LABEL

__all__ = [
    "TRAIN_PEERS",
    "synthetic_batch",
    "our_train_step",
    "peer_train_step",
    "time_training",
    "run_train_benchmark",
    "format_train_table",
]

logger = logging.getLogger(__name__)

TRAIN_PEERS = ("torchvision-maskrcnn",)
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def synthetic_batch(
    *,
    image_size: tuple[int, int],
    batch_size: int,
    num_classes: int,
    instances_per_image: int = 3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, list[Instances]]:
    """Seeded random images and targets.

    Returns:
        images: (B, 3, H, W) uint8; targets: per image ``Instances`` at (H, W) with
        ``instances_per_image`` boxes (XYXY float32, sides 1/8 to 1/2 of the short image side),
        labels in [0, num_classes) and (N, H, W) bool masks (the ellipse inscribed in each box).
    """
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    images = torch.randint(0, 256, (batch_size, 3, h, w), generator=g, dtype=torch.uint8)
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    targets = []
    for _ in range(batch_size):
        n = instances_per_image
        side = min(h, w) * (0.125 + 0.375 * torch.rand(n, 2, generator=g))  # (N, 2) w, h
        x0 = torch.rand(n, generator=g) * (w - side[:, 0])
        y0 = torch.rand(n, generator=g) * (h - side[:, 1])
        boxes = torch.stack([x0, y0, x0 + side[:, 0], y0 + side[:, 1]], dim=1)
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        rx, ry = side[:, 0] / 2, side[:, 1] / 2
        masks = ((xs[None] - cx[:, None, None]) / rx[:, None, None]) ** 2 + (
            (ys[None] - cy[:, None, None]) / ry[:, None, None]
        ) ** 2 <= 1.0
        labels = torch.randint(num_classes, (n,), generator=g)
        targets.append(
            Instances(image_size=(h, w), boxes=boxes, labels=labels, masks=masks).to(device)
        )
    return images.to(device), targets


def _synthetic_sem_seg(
    targets: list[Instances], padded_size: tuple[int, int], num_stuff: int
) -> Tensor:
    """(B, Hp, Wp) int64: stuff 0 on the top half, stuff 1 (if any) below, IGNORE_LABEL on things and padding."""
    hp, wp = padded_size
    out = torch.full(
        (len(targets), hp, wp), IGNORE_LABEL, dtype=torch.int64, device=targets[0].boxes.device
    )
    for i, t in enumerate(targets):
        h, w = t.image_size
        out[i, : h // 2, :w] = 0
        out[i, h // 2 : h, :w] = min(1, num_stuff - 1)
        out[i, :h, :w][t.masks.any(0)] = IGNORE_LABEL
    return out


def _sgd_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, losses: dict[str, Tensor]
) -> None:
    total = training_objective(losses)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()


def our_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    images: Tensor,
    targets: list[Instances],
    size_divisibility: int,
    memory_format: torch.memory_format = torch.contiguous_format,
    num_stuff: int = 0,
    amp: bool = False,
) -> Callable[[], None]:
    """One training iteration of our model on a fixed batch: images (B, 3, H, W) uint8 are padded to
    ``size_divisibility`` once (outside the timing); panoptic models (``num_stuff`` > 0) get a synthetic
    semantic map. ``amp``: the forward under the trainer's autocast (``solver.amp``; fp16's loss
    scaling is left out, it does not change the cost)."""
    batch = Batch.from_images(
        list(images),
        size_divisibility=size_divisibility,
        image_ids=list(range(len(images))),
        targets=targets,
    )
    batch.images = batch.images.contiguous(memory_format=memory_format)
    if num_stuff:
        batch.sem_seg = _synthetic_sem_seg(targets, tuple(batch.images.shape[-2:]), num_stuff)

    autocast, _ = training_autocast(batch.images.device, amp)

    def step() -> None:
        with autocast:
            losses = model(batch)
        _sgd_step(model, optimizer, losses)

    return step


def peer_train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, images: Tensor, targets: list[Instances]
) -> Callable[[], None]:
    """One training iteration of a torchvision Mask R-CNN on the same batch (images in [0, 1],
    labels shifted by one for its background class, masks as uint8)."""
    tv_images = [x.float() / 255.0 for x in images]
    tv_targets = [
        {"boxes": t.boxes, "labels": t.labels + 1, "masks": t.masks.to(torch.uint8)}
        for t in targets
    ]

    def step() -> None:
        _sgd_step(model, optimizer, model(tv_images, tv_targets))

    return step


def time_training(
    steps: Mapping[str, Callable[[], Any]],
    *,
    iters: int,
    warmup: int = 1,
    images_per_iter: int,
    device: torch.device | str = "cpu",
    peer: str | None = None,
) -> list[dict[str, Any]]:
    """Time training iterations, interleaved: ``warmup`` untimed then ``iters`` timed rounds, each
    calling every step once in order, CUDA synchronised around each call.

    Returns:
        one row per step: ``model``, ``ms_per_iter`` (median), ``images_per_s`` (images_per_iter /
        median), ``min_ms``, ``max_ms``, ``iters``, ``ratio_to_peer`` (ms_per_iter / peer's; None for
        the peer or without one).
    """
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    sync = sync_function(torch.device(device)) or (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + iters):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            if round_index >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    rows = []
    for name, ts in times.items():
        median = statistics.median(ts)
        rows.append(
            {
                "model": name,
                "images_per_s": images_per_iter * 1000 / median,
                "ms_per_iter": median,
                "min_ms": min(ts),
                "max_ms": max(ts),
                "iters": iters,
                "ratio_to_peer": None,
            }
        )
    peer_row = next((r for r in rows if r["model"] == peer), None)
    if peer_row is not None:
        for r in rows:
            if r is not peer_row:
                r["ratio_to_peer"] = r["ms_per_iter"] / peer_row["ms_per_iter"]
    return rows


def run_train_benchmark(
    configs: Sequence[str],
    *,
    overrides: Sequence[str] = (),
    peer: str | None = "torchvision-maskrcnn",
    image_size: tuple[int, int] = (512, 512),
    batch_size: int = 2,
    iters: int = 10,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    lr: float = 1e-4,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[str]]:
    """``dynaseg bench train``: images/s of forward + backward + SGD step for every config and the peer.

    Args:
        configs: preset names or YAML paths, each optionally followed by its own ``key=value``
            overrides (``"blendmask_r18_synth_cpu solver.amp=true"``); ``overrides`` apply to all.
        peer: "torchvision-maskrcnn" or None; it gets the first config's ResNet depth, class count,
            backbone norm (FrozenBN or BN) and frozen stages (``freeze_at`` k → 5 − k trainable).
        image_size: (H, W), pixels; batch_size: images per iteration.
        lr: SGD learning rate for every model (the cost does not depend on it; a small one keeps
            untrained weights finite). Momentum and weight decay are the first config's.
    Returns:
        (rows as ``time_training``'s plus ``backbone``; notes to print under the table).
    """
    if not configs:
        raise ValueError("give at least one --config")
    if peer is not None and peer not in TRAIN_PEERS:
        raise ValueError(
            f"bench train supports peers {', '.join(TRAIN_PEERS)} (or none), not '{peer}'"
        )
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    device = torch.device(device)
    steps: dict[str, Callable[[], None]] = {}
    backbones: dict[str, str] = {}
    precisions: dict[str, str] = {}
    first = None
    images = targets = None
    for name, config in zip(unique_names(configs), configs):
        preset, *own = config.split()  # a config may carry its own overrides, as in bench speed
        cfg = load_config(preset, [*overrides, *own])
        model_cfg = cfg.model
        first = first or cfg
        if images is None:
            images, targets = synthetic_batch(
                image_size=image_size,
                batch_size=batch_size,
                num_classes=model_cfg.num_classes,
                seed=seed,
                device=device,
            )
        torch.manual_seed(seed)
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = (
            build_model(model_cfg, pretrained=False).to(device, memory_format=memory_format).train()
        )
        _steady_state(model)
        optimizer = build_optimizer(model, dataclasses.replace(cfg.solver, base_lr=lr))
        steps[name] = our_train_step(
            model,
            optimizer,
            images=images,
            targets=_clamp_labels(targets, model_cfg.num_classes),
            size_divisibility=model_cfg.size_divisibility,
            memory_format=memory_format,
            num_stuff=num_stuff_classes(model_cfg),
            amp=cfg.solver.amp,
        )
        backbones[name] = describe_backbone(model_cfg)
        precisions[name] = _DTYPE_NAMES[training_dtype(device, cfg.solver.amp)]
    b = first.model.backbone
    notes = [
        f"batch {batch_size}, images {image_size[0]}x{image_size[1]} (seeded random, 3 random instances each), "
        f"{device.type}, {iters} interleaved iterations after {warmup} warm-up, SGD lr {lr:g}; "
        "precision: each config's solver.amp"
    ]
    if peer is not None:
        frozen_bn, trainable = b.norm == "FrozenBN", max(0, min(5, 5 - b.freeze_at))
        torch.manual_seed(seed)
        peer_model = build_peer(
            peer,
            num_classes=first.model.num_classes,
            device=device,
            image_size=image_size,
            depth=b.depth,
            frozen_bn=frozen_bn,
            trainable_layers=trainable,
        ).train()
        optimizer = build_optimizer(peer_model, dataclasses.replace(first.solver, base_lr=lr))
        steps[peer] = peer_train_step(peer_model, optimizer, images=images, targets=targets)
        backbones[peer] = describe_backbone(depth=b.depth)
        precisions[peer] = "fp32"
        notes.append(
            f"peer: ResNet-{b.depth} FPN, {'FrozenBN' if frozen_bn else 'BatchNorm'}, {trainable} of 5 "
            "backbone stages trainable (matched to the first config)"
        )
    logger.info("timing training of %s", ", ".join(steps))
    rows = time_training(
        steps, iters=iters, warmup=warmup, images_per_iter=batch_size, device=device, peer=peer
    )
    for r in rows:
        r["backbone"] = backbones[r["model"]]
        r["precision"] = precisions[r["model"]]
    return rows, notes


def _clamp_labels(targets: list[Instances], num_classes: int) -> list[Instances]:
    """The shared targets with labels valid for a model of ``num_classes`` (configs may differ)."""
    return [dataclasses.replace(t, labels=t.labels % num_classes) for t in targets]


def _steady_state(model: nn.Module) -> None:
    """Skip warm-up phases of training that change the cost: DynaMask's MSM (off for its first
    ``msm_start_iter`` iterations) is switched on, as for most of a real schedule."""
    branch = getattr(model, "mask_branch", None)
    if branch is not None and hasattr(branch, "num_updates") and hasattr(branch, "msm_start_iter"):
        branch.num_updates.fill_(branch.msm_start_iter)


def format_train_table(rows: Sequence[Mapping[str, Any]], notes: Sequence[str] = ()) -> str:
    """Markdown table of ``time_training`` rows, followed by the notes as a list."""
    lines = [
        "| model | backbone | precision | ms / iter | images/s | min–max ms | × peer |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = "—" if r.get("ratio_to_peer") is None else f"{r['ratio_to_peer']:.2f}"
        lines.append(
            f"| {r['model']} | {r.get('backbone', '')} | {r.get('precision', 'fp32')} | {r['ms_per_iter']:.1f} | {r['images_per_s']:.2f} | "
            f"{r['min_ms']:.1f}–{r['max_ms']:.1f} | {ratio} |"
        )
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines)
