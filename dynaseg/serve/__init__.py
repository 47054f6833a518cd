"""HTTP inference service (``dynaseg serve``): a FastAPI app around a :class:`Predictor`.

Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart). See docs/serve.md.
"""

from __future__ import annotations

from dynaseg.serve.app import create_app
from dynaseg.serve.limits import RequestError, ServeLimits

__all__ = ["RequestError", "ServeLimits", "create_app"]
