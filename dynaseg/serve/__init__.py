"""HTTP inference service (``dynaseg serve``): a FastAPI app around a :class:`Predictor`.

Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart). See docs/serve.md. The names below
are imported on first use, so ``dynaseg.serve.commands`` (the CLI) loads without the extra.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RequestError", "ServeLimits", "create_app", "listen", "make_server"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from dynaseg.serve.app import create_app

        return create_app
    if name in ("listen", "make_server"):
        from dynaseg.serve import server

        return getattr(server, name)
    if name in ("RequestError", "ServeLimits"):
        from dynaseg.serve import limits

        return getattr(limits, name)
    raise AttributeError(f"module 'dynaseg.serve' has no attribute '{name}'")
