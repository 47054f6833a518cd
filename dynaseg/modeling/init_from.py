"""``model.init_from=FILE``: start a model from another one's weights, by name and shape.

Whatever matches (same name, same shape) is copied; everything else is reported in one table:
this model's tensors the file lacks, tensors whose shapes differ, and the file's tensors this model
has no place for. Typical uses: a DynaMask mask branch on top of a COCO Mask R-CNN (the detector
matches, the mask branch is new), a converted torchvision / detectron2 checkpoint
(``dynaseg convert``), or a model with another class count (the class-specific layers differ).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dynaseg.modeling.backbone.pretrained import read_state_dict, resolve_weights_file

__all__ = ["InitReport", "init_from", "format_init_report"]

logger = logging.getLogger("dynaseg.checkpoint")


@dataclass
class InitReport:
    """What ``init_from`` did: tensor names by outcome."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    mismatched: list[str] = field(default_factory=list)  # "name: file shape vs model shape"
    unused: list[str] = field(default_factory=list)  # in the file, not in the model


def init_from(model: nn.Module, spec: str | Path) -> InitReport:
    """Copy the tensors of ``spec`` (a ``.safetensors`` / ``.pth`` file, or ``torchvision:NAME``)
    whose name and shape match into ``model`` (parameters and buffers); returns the report."""
    path = resolve_weights_file(str(spec))
    state = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
    own = model.state_dict()
    report = InitReport(source=str(spec))
    matched = {}
    for name, value in state.items():
        if name not in own:
            report.unused.append(name)
        elif own[name].shape != value.shape:
            report.mismatched.append(
                f"{name}: file {tuple(value.shape)} vs model {tuple(own[name].shape)}"
            )
        else:
            matched[name] = value
    report.missing = [k for k in own if k not in state]
    with torch.no_grad():
        model.load_state_dict(matched, strict=False)
    report.loaded = sorted(matched)
    logger.info("%s", format_init_report(report))
    return report


def _by_module(names: list[str]) -> str:
    """ "a.b.c.weight", "a.b.d.bias", "e.f" → "a.b (2), e (1)": counts per two-level prefix."""
    counts = Counter(".".join(n.split(".")[:2]) if n.count(".") > 1 else n for n in names)
    return ", ".join(f"{k} ({v})" for k, v in sorted(counts.items())) or "-"


def format_init_report(report: InitReport) -> str:
    """One table: how many tensors loaded, and where the rest are (grouped by module)."""
    rows = [
        ("loaded", len(report.loaded), _by_module(report.loaded)),
        ("missing in file (kept as built)", len(report.missing), _by_module(report.missing)),
        ("shape differs (kept as built)", len(report.mismatched), "; ".join(report.mismatched[:5])),
        ("unused from file", len(report.unused), _by_module(report.unused)),
    ]
    lines = [f"init_from {report.source}:", "| tensors | count | where |", "| --- | ---: | --- |"]
    lines += [f"| {what} | {n} | {where if n else '-'} |" for what, n, where in rows]
    return "\n".join(lines)
