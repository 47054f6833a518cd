"""Per-stage wall time of one inference: a stack-based timer and the hooks that feed it.

Stages: ``pre`` (padding and batching / torchvision's ``transform``), ``backbone+fpn``, ``head``
(FCOS head / RPN + box head with its box decoding and NMS, as in torchvision's ``roi_heads``),
``mask`` (basis + attention / mask branch / DR1 top layer, basis and predictor) and ``post`` =
total − the others (FCOS decoding and NMS, BlendMask's blending, rescaling, mask paste). Each model
names its own parts (``timing_stages()`` on our models, ``peer_stage_targets`` for torchvision's),
as module objects, so a renamed attribute fails loudly instead of timing nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

__all__ = ["STAGES", "StageTarget", "StageTimer", "stage_hooks"]

STAGES = ("pre", "backbone+fpn", "head", "mask", "post")

# A module (timed by forward hooks), or (module, method name) for work done outside ``forward``.
StageTarget = nn.Module | tuple[nn.Module, str]


class StageTimer:
    """Exclusive wall time per stage (seconds), fed by ``enter`` / ``exit`` calls that may nest.

    Args:
        sync: called before every clock reading (``torch.cuda.synchronize`` on CUDA), or None.
        clock: what is accumulated: ``time.perf_counter`` (seconds), or any other monotonic
            counter, e.g. a flop counter's running total (``bench flops``).
    """

    def __init__(
        self,
        *,
        sync: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.sync, self.clock = sync, clock
        self.totals: dict[str, float] = {}
        self._stack: list[str] = []
        self._since = 0.0

    def reset(self) -> None:
        """Forget the totals (and any stage left open by an exception)."""
        self.totals, self._stack = {}, []
        self._since = self.clock()

    @property
    def open(self) -> bool:
        """Whether a stage is still entered."""
        return bool(self._stack)

    def _switch(self) -> None:
        if self.sync is not None:
            self.sync()
        now = self.clock()
        if self._stack:
            stage = self._stack[-1]
            self.totals[stage] = self.totals.get(stage, 0.0) + now - self._since
        self._since = now

    def enter(self, stage: str) -> None:
        """Start ``stage``, pausing the stage it is nested in."""
        self._switch()
        self._stack.append(stage)

    def exit(self) -> None:
        """End the innermost stage, resuming the one it was nested in."""
        self._switch()
        if self._stack:
            self._stack.pop()

    @contextlib.contextmanager
    def section(self, stage: str):
        """``with timer.section("pre"): ...`` times a block as ``stage``."""
        self.enter(stage)
        try:
            yield
        finally:
            self.exit()


def stage_hooks(
    *, targets: Mapping[str, Sequence[StageTarget]], timer: StageTimer
) -> contextlib.ExitStack:
    """Attach ``timer`` to ``{stage: (module, (module, "method"), ...)}``.

    Modules get a forward pre-hook (``timer.enter(stage)``) and an always-called forward hook
    (``timer.exit()``); ``(module, method)`` replaces that method on the instance by a timed
    wrapper (AttributeError if it has none). Returns an ``ExitStack`` that removes everything: use
    it in a ``with`` block or call ``.close()``.
    """
    stack = contextlib.ExitStack()
    for stage, stage_targets in targets.items():
        for target in stage_targets:
            if isinstance(target, tuple):
                module, method = target
                stack.callback(_wrap_method(module, method, stage, timer))
                continue
            pre = target.register_forward_pre_hook(lambda _m, _a, stage=stage: timer.enter(stage))
            post = target.register_forward_hook(lambda _m, _a, _o: timer.exit(), always_call=True)
            stack.callback(pre.remove)
            stack.callback(post.remove)
    return stack


def _wrap_method(module: nn.Module, name: str, stage: str, timer: StageTimer) -> Callable[[], None]:
    """Replace ``module.name`` by a timed call of the original; returns the function that undoes it."""
    own = name in vars(module)
    previous = vars(module).get(name)
    original = getattr(module, name)
    if not callable(original):
        raise AttributeError(f"{type(module).__name__}.{name} is not a method")

    def timed(*args: Any, **kwargs: Any) -> Any:
        with timer.section(stage):
            return original(*args, **kwargs)

    object.__setattr__(module, name, timed)

    def undo() -> None:
        if own:
            object.__setattr__(module, name, previous)
        else:
            object.__delattr__(module, name)

    return undo
