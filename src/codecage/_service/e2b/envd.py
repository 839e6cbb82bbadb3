"""envd's HTTP API on a sandbox's port 49983: `GET /health`, and `GET`/`POST /files`
(download; upload as `application/octet-stream`, gzip-coded or not, or `multipart/form-data`
with one or more parts named `file`, each part's filename its path). Transfers go through
the Manager's recorded uploads and downloads (the audit log keeps each one's size and
sha256), stream both ways (the host holds one chunk at a time) and are bounded by the
service's upload limit, decoded bytes included.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..._errors import FileNotFoundInSandbox, SandboxError
from ..app import _check_path, _stream
from . import SandboxAccess, sandbox_access
from .errors import E2BError

router = APIRouter()
ACCESS = Depends(sandbox_access)
RAW = "application/octet-stream"
MULTIPART = "multipart/form-data"
MAX_PARTS = 64  # files in one multipart upload


@router.get("/health", status_code=204)
async def health(access: SandboxAccess = ACCESS) -> Response:
    if not access.entry.sandbox.alive:
        raise E2BError(502, f"The sandbox {access.sandbox_id} was not found")
    return Response(status_code=204)


def _path(path: str | None) -> str:
    if not path:
        raise E2BError(400, "path: a file's path is required")
    try:
        _check_path(path)
    except Exception as exc:
        raise E2BError(400, f"invalid path: {exc}") from None
    return path


def _file_error(exc: SandboxError, path: str) -> E2BError | SandboxError:
    """envd's statuses for a file that cannot be read or written: 404 missing, 400 a
    directory or otherwise unusable path; the service's own errors keep theirs."""
    if isinstance(exc, FileNotFoundInSandbox):
        return E2BError(404, f"path '{path}' does not exist")
    if type(exc) is SandboxError:  # the sandbox's own refusal (a directory, permissions)
        return E2BError(400, str(exc))
    return exc


@router.get("/files")
async def download(
    path: str | None = Query(None),
    username: str | None = Query(None, max_length=64),
    access: SandboxAccess = ACCESS,
) -> Response:
    wanted = _path(path)
    chunks = access.manager.download(access.tenant, access.sandbox_id, wanted)
    try:
        head = await run_in_threadpool(next, chunks)
    except SandboxError as exc:
        await run_in_threadpool(chunks.close)
        raise _file_error(exc, wanted) from None
    except BaseException:
        await run_in_threadpool(chunks.close)
        raise
    return StreamingResponse(_stream(head, chunks), media_type=RAW)


class _Gunzip:
    """A gzip-coded upload decoded as it arrives, never past `limit` decoded bytes."""

    def __init__(self, limit: int) -> None:
        self.limit, self.seen = limit, 0
        self._z = zlib.decompressobj(wbits=31)

    def feed(self, data: bytes) -> bytes:
        try:
            out = self._z.decompress(data, self.limit - self.seen + 1)
        except zlib.error:
            raise E2BError(400, "a malformed gzip body") from None
        self.seen += len(out)
        if self.seen > self.limit or self._z.unconsumed_tail:
            raise E2BError(413, f"the decoded upload is over {self.limit} bytes")
        return out

    def end(self) -> bytes:
        if not self._z.eof:
            raise E2BError(400, "a truncated gzip body")
        return b""


async def _raw_pieces(request: Request, limit: int) -> AsyncIterator[bytes]:
    coding = request.headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("", "identity", "gzip"):
        raise E2BError(415, f"Content-Encoding {coding!r}: identity or gzip")
    gunzip = _Gunzip(limit) if coding == "gzip" else None
    async for chunk in request.stream():
        piece = gunzip.feed(chunk) if gunzip else chunk
        if piece:
            yield piece
    if gunzip is not None:
        gunzip.end()


async def _store(access: SandboxAccess, path: str, pieces: AsyncIterator[bytes]) -> None:
    """One file, streamed to the sandbox through a recorded upload."""
    from ..._sandbox import FILE_CHUNK

    uploading = access.manager.uploading(access.tenant, access.sandbox_id, path)
    sink = await run_in_threadpool(uploading.__enter__)
    try:
        held: list[bytes] = []
        size = 0
        async for piece in pieces:
            if time.monotonic() > sink.deadline:
                raise E2BError(408, "the upload took longer than the policy's timeout_s")
            held.append(piece)
            size += len(piece)
            if size >= FILE_CHUNK:
                await run_in_threadpool(sink.write, b"".join(held))
                held, size = [], 0
        await run_in_threadpool(sink.write, b"".join(held))
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(SandboxError):
                await run_in_threadpool(uploading.__exit__, type(exc), exc, exc.__traceback__)
        if isinstance(exc, SandboxError):
            raise _file_error(exc, path) from None
        raise
    try:
        await run_in_threadpool(uploading.__exit__, None, None, None)
    except SandboxError as exc:
        raise _file_error(exc, path) from None


def _written(path: str, sink_path: str | None = None) -> dict[str, Any]:
    full = sink_path or path
    return {"name": full.rstrip("/").rsplit("/", 1)[-1], "type": "file", "path": full}


@router.post("/files")
async def upload(
    request: Request,
    path: str | None = Query(None),
    username: str | None = Query(None, max_length=64),
    access: SandboxAccess = ACCESS,
) -> list[dict[str, Any]]:
    if any(k.lower().startswith("x-metadata-") for k in request.headers):
        raise E2BError(400, "file metadata (X-Metadata-*) is not supported by this server")
    declared = request.headers.get("content-type")
    media = (declared or "").split(";")[0].strip().lower()
    limit = access.manager.config.max_upload_bytes
    if declared is None or media == RAW:
        wanted = _path(path)
        await _store(access, wanted, _raw_pieces(request, limit))
        return [_written(wanted, _resolved(wanted))]
    if media != MULTIPART:
        raise E2BError(400, f"Content-Type {media!r}: {RAW} or {MULTIPART}")
    if request.headers.get("content-encoding", "identity").strip().lower() not in (
        "",
        "identity",
    ):
        raise E2BError(415, "Content-Encoding: a multipart upload is sent without a coding")
    written = []
    async for name, pieces in _parts(request, declared):
        target = _path(path if path and name is None else name or path)
        await _store(access, target, pieces)
        written.append(_written(target, _resolved(target)))
    if not written:
        raise E2BError(400, "multipart upload without a part named 'file'")
    return written


def _resolved(path: str) -> str:
    """The path as the sandbox resolves it (relative paths are under /home/user)."""
    import posixpath

    from ..._inside.files import WORKSPACE

    return posixpath.normpath(posixpath.join(WORKSPACE, path))


async def _parts(request: Request, declared: str) -> AsyncIterator[tuple[str | None, Any]]:
    """Each part named `file` of a multipart body, in order: (its filename, an async
    iterator of its bytes). The next part is only read once the previous one is consumed."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    boundary = parse_options_header(declared)[1].get(b"boundary")
    if not boundary:
        raise E2BError(400, "multipart/form-data without a boundary")
    events: list[tuple[str, Any]] = []
    part: dict[str, Any] = {"headers": {}, "field": b"", "value": b""}

    def header_field(data: bytes, start: int, end: int) -> None:
        part["field"] += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def header_end() -> None:
        part["headers"][part["field"].strip().lower()] = part["value"].strip()
        part["field"], part["value"] = b"", b""

    def headers_finished() -> None:
        kind, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if kind != b"form-data" or name != "file":
            raise E2BError(400, f"multipart upload: parts are named 'file' (got {name!r})")
        coding = part["headers"].get(b"content-transfer-encoding", b"binary").lower()
        if coding not in (b"binary", b"8bit", b"7bit"):
            raise E2BError(415, "multipart upload: a part is sent as the file's own bytes")
        filename = options.get(b"filename")
        try:
            events.append(("start", filename.decode() if filename else None))
        except UnicodeDecodeError:
            raise E2BError(400, "multipart upload: a filename that is not UTF-8") from None

    def part_data(data: bytes, start: int, end: int) -> None:
        events.append(("data", data[start:end]))

    def part_begin() -> None:
        part["headers"] = {}

    def part_end() -> None:
        events.append(("end", None))

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": part_begin,
            "on_header_field": header_field,
            "on_header_value": header_value,
            "on_header_end": header_end,
            "on_headers_finished": headers_finished,
            "on_part_data": part_data,
            "on_part_end": part_end,
        },
    )
    stream = request.stream()
    finished = False

    async def more() -> bool:
        nonlocal finished
        if finished:
            return False
        try:
            chunk = await anext(stream)
        except StopAsyncIteration:
            finished = True
            try:
                parser.finalize()
            except MultipartParseError:
                raise E2BError(400, "a malformed multipart/form-data body") from None
            return bool(events)
        try:
            parser.write(chunk)
        except MultipartParseError:
            raise E2BError(400, "a malformed multipart/form-data body") from None
        return True

    async def body_of() -> AsyncIterator[bytes]:
        while True:
            while events:
                kind, value = events.pop(0)
                if kind == "data":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise E2BError(400, "a malformed multipart/form-data body")
            if not await more():
                raise E2BError(400, "a truncated multipart/form-data body")

    count = 0
    while True:
        while not events:
            if not await more():
                return
        kind, value = events.pop(0)
        if kind != "start":
            continue  # data outside a part (a preamble): dropped, as by any parser
        count += 1
        if count > MAX_PARTS:
            raise E2BError(400, f"a multipart upload of at most {MAX_PARTS} files")
        pieces = body_of()
        yield value, pieces
        async for _ in pieces:  # whatever the consumer left of this part
            pass
