"""Inference-only speed-ups, each optional and checked for equal outputs by the tests.

* ``fold_batch_norms``: an eval-mode BatchNorm / FrozenBatchNorm right after a convolution is an
  affine map per channel; folding it into the convolution's weight and bias removes two full
  passes over every backbone feature map (exact up to float rounding).
* ``AutocastDense``: runs a dense submodule (backbone + FPN, dense heads) under ``torch.autocast``
  (bf16 / fp16) and returns float32, so box decoding, NMS and pasting stay in float32.
* ``compile_dense``: ``torch.compile`` of the same dense submodules (dynamic shapes); the
  per-instance, data-dependent parts stay eager.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from dynaseg.modeling.backbone.resnet import ResNet

__all__ = [
    "AMP_DTYPES",
    "fold_batch_norms",
    "AutocastDense",
    "autocast_dense",
    "compile_dense",
    "optimize_for_inference",
]

AMP_DTYPES: dict[str, torch.dtype | None] = {
    "none": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _fold_pair(conv: nn.Conv2d, norm: nn.Module) -> None:
    """Fold ``norm`` (applied right after ``conv``) into ``conv``'s weight and bias, in place."""
    eps = norm.eps
    weight, bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, norm.running_mean, norm.running_var, eps, norm.weight, norm.bias
    )
    conv.weight = weight
    conv.bias = bias


def _conv_norm_pairs(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, conv name, norm name) of the convolution → norm pairs ``module`` applies directly."""
    pairs: list[tuple[nn.Module, str, str]] = []
    for parent in module.modules():
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                pairs.append((parent, a, b))
        elif isinstance(
            parent, (BasicBlock, Bottleneck, ResNet)
        ):  # forward: bnK(convK(x)), stem bn1(conv1(x))
            pairs += [(parent, f"conv{k}", f"bn{k}") for k in (1, 2, 3)]
    return [
        (p, c, n)
        for p, c, n in pairs
        if isinstance(getattr(p, c, None), nn.Conv2d) and isinstance(getattr(p, n, None), _NORMS)
    ]


@torch.no_grad()
def fold_batch_norms(model: nn.Module) -> int:
    """Fold every BatchNorm2d / FrozenBatchNorm2d that directly follows a Conv2d into it.

    The norm is replaced by ``nn.Identity``. Only for inference: ``model`` must be in eval mode
    (a training BatchNorm normalises with batch statistics, which cannot be folded).
    Returns the number of folded norms.
    """
    if any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        raise ValueError("fold_batch_norms needs the model in eval mode (call model.eval() first)")
    pairs = _conv_norm_pairs(model)
    for parent, conv_name, norm_name in pairs:
        _fold_pair(getattr(parent, conv_name), getattr(parent, norm_name))
        setattr(parent, norm_name, nn.Identity())
    return len(pairs)


def _to_float32(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value,
            **{
                f.name: _to_float32(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if f.init
            },
        )
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple
        return type(value)(*(_to_float32(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    return value


class AutocastDense(nn.Module):
    """``module`` run under ``torch.autocast(device_type, dtype)``; floating outputs come back float32.

    Attribute access falls through to the wrapped module (``out_channels``, ``strides`` …).
    """

    def __init__(self, module: nn.Module, *, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.dtype = module, dtype

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        device_type = next(iter(self.module.parameters())).device.type
        with torch.autocast(device_type, dtype=self.dtype):
            out = self.module(*args, **kwargs)
        return _to_float32(out)


def _replace(model: nn.Module, path: str, make) -> None:
    """Replace the submodule at ``path`` by ``make(submodule)``; a path that names nothing is an error."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    child = getattr(parent, name, None)
    if not isinstance(child, nn.Module):
        raise AttributeError(
            f"{type(model).__name__}.dense_submodules() names '{path}', which is not a module"
        )
    setattr(parent, name, make(child))


def _dense_paths(model: nn.Module) -> tuple[str, ...]:
    """The model's own list of dense parts (``dense_submodules()``): dense convolution over whole
    feature maps; sampling, decoding, NMS, per-instance heads and pasting are not in it."""
    if not hasattr(model, "dense_submodules"):
        raise TypeError(
            f"{type(model).__name__} does not say which of its parts are dense (dense_submodules())"
        )
    return tuple(model.dense_submodules())


def autocast_dense(model: nn.Module, *, dtype: torch.dtype) -> list[str]:
    """Wrap ``model``'s dense submodules in ``AutocastDense``; returns the wrapped paths."""
    paths = _dense_paths(model)
    for p in paths:
        _replace(model, p, lambda m: AutocastDense(m, dtype=dtype))
    return list(paths)


def compile_dense(model: nn.Module, **compile_kwargs: Any) -> list[str]:
    """``torch.compile`` ``model``'s dense submodules (``dynamic=True`` unless given); returns their paths."""
    compile_kwargs.setdefault("dynamic", True)
    paths = _dense_paths(model)
    for p in paths:
        _replace(model, p, lambda m: torch.compile(m, **compile_kwargs))
    return list(paths)


def optimize_for_inference(
    model: nn.Module,
    *,
    fold_norms: bool = True,
    amp: str = "none",
    compile: bool = False,
    compile_backend: str = "inductor",
) -> nn.Module:
    """Apply the chosen speed-ups to an eval-mode ``model`` in place and return it.

    Args:
        fold_norms: ``fold_batch_norms``.
        amp: "none", "bf16" or "fp16": autocast of the dense submodules (fp16 needs CUDA).
        compile: ``torch.compile`` of the dense submodules (after autocast wrapping, so both apply),
            with ``compile_backend``. The first call per input shape compiles (a minute on a CPU).
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got '{amp}'")
    model.eval()
    if fold_norms:
        fold_batch_norms(model)
    if AMP_DTYPES[amp] is not None:
        autocast_dense(model, dtype=AMP_DTYPES[amp])
    if compile:
        compile_dense(model, backend=compile_backend)
    return model
