"""``dynaseg serve``: the HTTP inference service's command line (the app is in ``serve/app.py``)."""

from __future__ import annotations

import argparse

from dynaseg.cli import _add_config
from dynaseg.errors import UserError

__all__ = ["add_serve_parser"]


def _cmd_serve(args: argparse.Namespace) -> int:
    """``serve``: HTTP inference service (FastAPI + uvicorn); see docs/serve.md."""
    try:
        import uvicorn

        from dynaseg.serve import ServeLimits, create_app
    except ImportError as e:
        raise UserError(
            f"{e} (dynaseg serve needs the 'serve' extra: pip install 'dynaseg[serve]')"
        ) from None
    from dynaseg.config.presets import load_config
    from dynaseg.inference.predictor import Predictor

    try:
        limits = ServeLimits(
            max_bytes=args.max_bytes,
            max_pixels=args.max_pixels,
            max_concurrency=args.max_concurrency,
            queue_size=args.queue_size,
            read_timeout_s=args.read_timeout,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    if not 0.0 <= args.score_threshold <= 1.0:
        raise UserError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    predictor = Predictor(
        load_config(args.config, args.overrides), args.weights, device=args.device
    )
    app = create_app(predictor, limits=limits, score_threshold=args.score_threshold)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=5)
    return 0


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the top-level subparsers."""
    p = sub.add_parser(
        "serve",
        help="HTTP inference service: POST /predict, GET /health, GET /model "
        "(needs the 'serve' extra; see docs/serve.md)",
    )
    _add_config(p)
    p.add_argument("--weights", required=True, help="model weights (.safetensors)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--score-threshold",
        type=float,
        default=0.3,
        help="default of /predict's score_threshold query parameter",
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=16 * 2**20,
        help="largest request body in bytes (413 beyond)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=25_000_000,
        help="largest image width*height, checked from its header before decoding (413 beyond)",
    )
    p.add_argument(
        "--max-concurrency", type=int, default=1, help="images decoded and segmented at once"
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=16,
        help="further requests admitted to wait; beyond them 503 with Retry-After",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=60.0,
        help="seconds a request has to send its body (408 beyond)",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.set_defaults(func=_cmd_serve)
