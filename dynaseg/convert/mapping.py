"""What every conversion shares: its error type and the check that a mapping is complete."""

from __future__ import annotations

from dynaseg.errors import UserError

__all__ = ["ConversionError", "raise_unless_complete"]


class ConversionError(UserError, ValueError):
    """A checkpoint that does not map onto the model; the message lists the tensors concerned."""


def raise_unless_complete(
    source: str, *, unmapped: list[str], wrong: list[str], missing: list[str]
) -> None:
    """A ``ConversionError`` naming the checkpoint's tensors with no place in the model, the shapes
    that differ and the model's tensors the checkpoint lacks (six of each), if there are any."""
    problems = [
        (f"{len(unmapped)} tensors with no place in the model", unmapped),
        (f"{len(wrong)} tensors of the wrong shape", wrong),
        (f"{len(missing)} model tensors missing from the checkpoint", missing),
    ]
    found = [
        f"{what}: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
        for what, names in problems
        if names
    ]
    if found:
        raise ConversionError(f"{source}: " + "; ".join(found))
