"""``solver.freeze=backbone,rpn,box_head``: train only what is left.

A frozen group's parameters get ``requires_grad=False`` (so the optimizer skips them and autograd
neither computes their gradients nor keeps activations for them, as long as no trainable part runs
before them), and its batch-norm layers always run in eval mode (they keep their statistics; the
group itself keeps the mode of the model, e.g. the RPN's training proposal counts).
Group names are the model's top-level submodules (``backbone``, ``rpn``, ``box_head``,
``mask_branch``; ``fcos_head``, ``basis``, ``attention``, ``top_layer``, ``predictor``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from dynaseg.errors import UserError

__all__ = ["FreezeError", "freeze_groups"]


class FreezeError(UserError, ValueError):
    """``solver.freeze`` names a group the model does not have."""


def _keep_eval(module: nn.Module, _inputs) -> None:
    if module.training:
        module.eval()


def freeze_groups(model: nn.Module, names: Sequence[str]) -> int:
    """Freeze the named top-level groups of ``model``; returns the number of frozen parameters."""
    groups = dict(model.named_children())
    unknown = [n for n in names if n not in groups or groups[n] is None]
    if unknown:
        raise FreezeError(
            f"solver.freeze: {type(model).__name__} has no group {', '.join(unknown)}; "
            f"its groups are {', '.join(k for k, v in groups.items() if v is not None)}"
        )
    frozen = 0
    for name in names:
        module = groups[name]
        for p in module.parameters():
            if p.requires_grad:
                frozen += p.numel()
            p.requires_grad_(False)
        for norm in module.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                norm.eval()
                norm.register_forward_pre_hook(_keep_eval)
    return frozen
