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
from ..app import _check_path, _stream, multipart_parts
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
    parts = multipart_parts(request, declared, E2BError, max_parts=MAX_PARTS)
    async for name, pieces in parts:
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
