"""The image of a multipart/form-data upload, parsed synchronously (in a worker thread)."""

from __future__ import annotations

try:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # python-multipart < 0.0.13 names its module multipart
    from multipart.exceptions import FormParserError
    from multipart.multipart import MultipartParser, parse_options_header

from dynaseg.serve.limits import RequestError, request_kind

__all__ = ["multipart_image"]

MAX_PARTS = 16


class _Part:
    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.field = self.value = b""
        self.chunks: list[bytes] | None = None  # kept only for the 'file' field

    def file_field(self) -> bool:
        """Whether this is the upload: Content-Disposition ``form-data; name="file"; filename=...``."""
        _, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        return params.get(b"name") == b"file" and b"filename" in params


class _Collector:
    """python-multipart callbacks keeping the first 'file' part's bytes and its Content-Type."""

    def __init__(self) -> None:
        self.parts = 0
        self.part = _Part()
        self.file: _Part | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.data,
        }

    def begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise RequestError(400, f"malformed multipart body: more than {MAX_PARTS} parts")
        self.part = _Part()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.part.field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.part.value += data[start:end]

    def header_end(self) -> None:
        self.part.headers[self.part.field.strip().lower()] = self.part.value.strip()
        self.part.field = self.part.value = b""

    def headers_finished(self) -> None:
        if self.file is None and self.part.file_field():
            self.part.chunks = []
            self.file = self.part

    def data(self, data: bytes, start: int, end: int) -> None:
        if self.part.chunks is not None:
            self.part.chunks.append(data[start:end])


def multipart_image(body: bytes, *, content_type: str) -> bytes:
    """The bytes of the ``file`` field of a multipart/form-data ``body``; 400 when malformed or
    missing, 415 when the part's own type is not an image."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "malformed multipart body: no boundary in the Content-Type")
    collector = _Collector()
    try:
        parser = MultipartParser(boundary, collector.callbacks())
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise RequestError(400, f"malformed multipart body: {e}") from None
    if collector.file is None or collector.file.chunks is None:
        raise RequestError(400, "multipart upload has no file in a 'file' field")
    part_type = collector.file.headers.get(b"content-type")
    if part_type:
        request_kind(part_type.decode("latin-1"))  # the part's own type: image/* or octet-stream
    return b"".join(collector.file.chunks)
