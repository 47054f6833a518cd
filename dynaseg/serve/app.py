"""The FastAPI app: ``POST /predict``, ``GET /health``, ``GET /model`` and the page at ``/``."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dynaseg import __version__
from dynaseg.config.overrides import to_dict
from dynaseg.inference import DRAW_SCORE_THRESHOLD
from dynaseg.inference.predictor import stuff_categories
from dynaseg.serve.encoding import json_bytes, prediction_json
from dynaseg.serve.forms import multipart_image
from dynaseg.serve.gate import InferenceGate, Place
from dynaseg.serve.images import decode_image, probe_image
from dynaseg.serve.inference import segment
from dynaseg.serve.limits import RequestError, ServeLimits, check_declared_length, request_kind
from dynaseg.serve.overlay import overlay_png
from dynaseg.serve.page import add_page
from dynaseg.serve.replies import HeldReply
from dynaseg.serve.uploads import ClientGone, UploadBudget, read_body

__all__ = ["create_app"]

logger = logging.getLogger("dynaseg.serve")

_BINARY = {"type": "string", "format": "binary"}
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": _BINARY},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": _BINARY}, "required": ["file"]}
            },
        },
    }
}


def _wants_png(accept: str | None) -> bool:
    """Accept negotiation when ``?format=`` is absent: PNG only if asked for and JSON is not."""
    types = [part.split(";", 1)[0].strip().lower() for part in (accept or "").split(",")]
    return "image/png" in types and "application/json" not in types


class _GenericServerError:
    """ASGI middleware: an exception escaping an endpoint is logged here and answered with a
    generic 500 JSON message (no traceback to the client); the connection stays usable. (An
    ``exception_handler(Exception)`` would make Starlette re-raise, and uvicorn drop the connection.)
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if scope["type"] != "http" or started:
                raise
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await JSONResponse({"detail": "internal server error"}, status_code=500)(
                scope, receive, send
            )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse(
            {"detail": f"{where}: {first.get('msg', 'invalid value')}"}, status_code=422
        )

    async def _gone(request: Request, exc: Exception) -> Response:
        """One info line, no traceback: a client hanging up is not a server error."""
        detail = f" {exc}" if str(exc) else ""
        logger.info("client disconnected%s: %s %s", detail, request.method, request.url.path)
        return Response(status_code=400)  # nobody reads it; uvicorn drops it

    app.add_exception_handler(ClientGone, _gone)
    app.add_exception_handler(ClientDisconnect, _gone)
    app.add_middleware(_GenericServerError)


def create_app(
    predictor: Any,
    *,
    limits: ServeLimits = ServeLimits(),
    score_threshold: float = DRAW_SCORE_THRESHOLD,
) -> FastAPI:
    """An app serving ``predictor`` (a loaded :class:`~dynaseg.inference.predictor.Predictor`).

    Args:
        predictor: needs ``model`` (with ``predict_raw``), ``cfg``, ``device``, ``memory_format``,
            ``class_names``, ``category_ids``, ``stuff_names``, ``stuff_category_ids`` and
            ``is_panoptic``.
        limits: request size, rate, pixel, concurrency and connection limits.
        score_threshold: default of ``/predict``'s ``score_threshold`` query parameter.
    """
    gate = InferenceGate(max_concurrency=limits.max_concurrency, queue_size=limits.queue_size)
    uploads = UploadBudget(max_bytes=limits.upload_budget)
    default_threshold = score_threshold
    app = FastAPI(
        title="dynaseg",
        version=__version__,
        description="Instance / panoptic segmentation inference service (docs/serve.md).",
    )
    app.state.gate, app.state.uploads = gate, uploads
    _add_error_handlers(app)
    add_page(app)

    def parse(body: bytes, *, content_type: str) -> bytes:
        """The image bytes, checked from the header (in a worker thread: untrusted input)."""
        kind = request_kind(content_type)
        data = multipart_image(body, content_type=content_type) if kind == "multipart" else body
        if not data:
            raise RequestError(400, "empty image: send an image")
        probe_image(data, max_pixels=limits.max_pixels)
        return data

    def answer(data: bytes, *, as_png: bool, threshold: float) -> tuple[bytes | memoryview, str]:
        """Decode, segment and encode one image (in a worker thread, holding a slot)."""
        image = decode_image(data)
        prediction = segment(predictor, image)
        if as_png:
            png = overlay_png(image, prediction, predictor=predictor, score_threshold=threshold)
            return png, "image/png"
        size = image.shape[:2]
        del image  # JSON needs only the masks, pasted one at a time
        document = prediction_json(
            prediction, image_size=size, predictor=predictor, score_threshold=threshold
        )
        return json_bytes(document), "application/json"

    async def run(place: Place, data: bytes, **kwargs: Any) -> tuple[bytes | memoryview, str]:
        try:
            return await gate.run(place, answer, data, **kwargs)
        except RequestError:
            raise
        except Exception:
            logger.exception("segmentation failed")
            raise RequestError(500, "internal server error while segmenting the image") from None

    @app.post(
        "/predict",
        summary="Segment one image",
        openapi_extra=_PREDICT_BODY,
        description="Body: the image (Content-Type image/*), or multipart/form-data with a 'file' field. "
        "Answers JSON (instances with COCO RLE masks; panoptic models add segments) or, "
        "with ?format=png or Accept: image/png, the overlay PNG.",
    )
    async def predict(
        request: Request,
        output: Literal["json", "png"] | None = Query(None, alias="format"),
        score_threshold: float | None = Query(None, ge=0.0, le=1.0),
    ) -> Response:
        content_type = request.headers.get("content-type") or ""
        request_kind(content_type)
        check_declared_length(request.headers, max_bytes=limits.max_bytes)
        as_png = output == "png" if output else _wants_png(request.headers.get("accept"))
        threshold = default_threshold if score_threshold is None else score_threshold
        body = await read_body(request.receive, limits=limits, budget=uploads)
        place = gate.admit()
        try:
            data = await gate.parse(parse, body, content_type=content_type)
            del body
            content, media_type = await run(place, data, as_png=as_png, threshold=threshold)
        except BaseException:
            place.release()
            raise
        return HeldReply(content, media_type=media_type, place=place)

    @app.get("/health", summary="Liveness and queue state")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model_loaded": predictor is not None,
            "queue": gate.state(),
            "uploads": {"count": uploads.uploads, "bytes": uploads.held},
        }

    @app.get("/model", summary="The served model")
    async def model() -> dict[str, Any]:
        info: dict[str, Any] = {
            "config": to_dict(predictor.cfg),
            "panoptic": bool(predictor.is_panoptic),
            "class_names": list(predictor.class_names),
            "category_ids": list(predictor.category_ids),
            "dynaseg_version": __version__,
            "torch_version": torch.__version__,
            "device": str(predictor.device),
            "score_threshold": default_threshold,
            "limits": dataclasses.asdict(limits),
        }
        if predictor.is_panoptic:
            info["stuff_category_ids"], info["stuff_names"] = stuff_categories(predictor)
        return info

    return app
