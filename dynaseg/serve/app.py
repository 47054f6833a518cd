"""The FastAPI app: ``POST /predict``, ``GET /health``, ``GET /model`` around a loaded predictor."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dynaseg import __version__
from dynaseg.config.overrides import to_dict
from dynaseg.inference.predictor import stuff_categories
from dynaseg.serve.encoding import overlay_png, prediction_json
from dynaseg.serve.gate import InferenceGate
from dynaseg.serve.images import decode_image, probe_image
from dynaseg.serve.limits import (
    RequestError,
    ServeLimits,
    check_declared_length,
    read_body,
    request_kind,
)

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


async def _multipart_image(request: Request, body: bytes) -> bytes:
    """The bytes of the ``file`` field of a multipart body that was already read (within limits)."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(max_files=1, max_fields=16) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise RequestError(400, "multipart upload has no file in a 'file' field")
            if upload.content_type:
                request_kind(upload.content_type)  # the part's own type: image/* or octet-stream
            return await upload.read()
    except (HTTPException, MultiPartException) as e:
        raise RequestError(
            400, f"malformed multipart body: {getattr(e, 'detail', None) or e.message}"
        ) from None


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


def create_app(
    predictor: Any, *, limits: ServeLimits = ServeLimits(), score_threshold: float = 0.3
) -> FastAPI:
    """An app serving ``predictor`` (a loaded :class:`~dynaseg.inference.predictor.Predictor`).

    Args:
        predictor: called on (H, W, 3) uint8 RGB arrays; needs ``cfg``, ``device``, ``class_names``,
            ``category_ids``, ``stuff_names``, ``stuff_category_ids`` and ``is_panoptic``.
        limits: request size, pixel and concurrency limits.
        score_threshold: default of ``/predict``'s ``score_threshold`` query parameter.
    """
    gate = InferenceGate(max_concurrency=limits.max_concurrency, queue_size=limits.queue_size)
    default_threshold = score_threshold
    app = FastAPI(
        title="dynaseg",
        version=__version__,
        description="Instance / panoptic segmentation inference service (docs/serve.md).",
    )
    app.state.gate = gate

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

    app.add_middleware(_GenericServerError)

    def segment(data: bytes, *, as_png: bool, threshold: float) -> Response:
        """Decode, segment and encode one image (in a worker thread, holding a slot)."""
        image = decode_image(data)
        prediction = predictor(image)
        if as_png:
            png = overlay_png(image, prediction, predictor=predictor, score_threshold=threshold)
            return Response(png, media_type="image/png")
        return JSONResponse(
            prediction_json(
                prediction,
                image_size=image.shape[:2],
                predictor=predictor,
                score_threshold=threshold,
            )
        )

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
        kind = request_kind(request.headers.get("content-type"))
        check_declared_length(request.headers, max_bytes=limits.max_bytes)
        as_png = output == "png" if output else _wants_png(request.headers.get("accept"))
        threshold = default_threshold if score_threshold is None else score_threshold
        with gate.admit():
            body = await read_body(
                request, max_bytes=limits.max_bytes, timeout_s=limits.read_timeout_s
            )
            data = await _multipart_image(request, body) if kind == "multipart" else body
            del body
            if not data:
                raise RequestError(400, "empty image: send an image")
            probe_image(data, max_pixels=limits.max_pixels)
            try:
                return await gate.run(segment, data, as_png=as_png, threshold=threshold)
            except RequestError:
                raise
            except Exception:
                logger.exception("segmentation failed")
                raise RequestError(
                    500, "internal server error while segmenting the image"
                ) from None

    @app.get("/health", summary="Liveness and queue state")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model_loaded": predictor is not None, "queue": gate.state()}

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
