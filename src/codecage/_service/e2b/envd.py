"""envd's HTTP API on a sandbox's port 49983: `GET /health`, and `GET`/`POST /files`
(download; upload as `application/octet-stream`, gzip-coded or not, or `multipart/form-data`
with one or more parts named `file`, each part's filename its path). Transfers go through
the Manager's recorded uploads and downloads (the audit log keeps each one's size and
sha256), stream both ways (the host holds one chunk at a time) and are bounded by the
service's upload limit, decoded bytes included.
"""

from __future__ import annotations

import errno
import zlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..._errors import FileNotFoundInSandbox, SandboxError
from ..app import _check_path, _stream, multipart_parts, stream_upload
from . import SandboxAccess, sandbox_access
from .errors import E2BError

router = APIRouter()
ACCESS = Depends(sandbox_access)
RAW = "application/octet-stream"
NOSNIFF = {"X-Content-Type-Options": "nosniff"}  # a tenant's file: bytes, never a script
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
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return E2BError(507, f"not enough disk space in the sandbox for '{path}'")
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
    return StreamingResponse(_stream(head, chunks), media_type=RAW, headers=NOSNIFF)


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
    uploading = access.manager.uploading(access.tenant, access.sandbox_id, path)
    try:
        await stream_upload(uploading, pieces, lambda message: E2BError(408, message))
    except SandboxError as exc:
        raise _file_error(exc, path) from None


def _metadata(request: Request) -> dict[str, str]:
    """`X-Metadata-<key>: <value>` headers: the key lowercased, the first value of each
    (envd's rules: printable ASCII, 246 bytes a key, 4096 in all)."""
    from ..._sandbox import check_metadata

    found: dict[str, str] = {}
    for name, value in request.headers.items():
        if name.lower().startswith("x-metadata-"):
            found.setdefault(name[len("x-metadata-") :].lower(), value)
    try:
        check_metadata(found)
    except ValueError as exc:
        raise E2BError(400, str(exc)) from None
    return found


async def _labelled(access: SandboxAccess, path: str, metadata: dict[str, str]) -> dict[str, Any]:
    """An uploaded file's metadata replaced by the request's (none: removed, as envd does),
    and E2B's WriteInfo of it."""
    try:
        entry = await run_in_threadpool(
            access.manager.file_call,
            access.tenant,
            access.sandbox_id,
            "file_metadata",
            path,
            lambda sbx: sbx.files.set_metadata(path, metadata),
        )
    except SandboxError as exc:  # a filesystem without user attributes, say
        raise _file_error(exc, path) from None
    out: dict[str, Any] = {"name": entry.name, "type": "file", "path": entry.path}
    if entry.metadata:
        out["metadata"] = entry.metadata
    return out


@router.post("/files")
async def upload(
    request: Request,
    path: str | None = Query(None),
    username: str | None = Query(None, max_length=64),
    access: SandboxAccess = ACCESS,
) -> list[dict[str, Any]]:
    metadata = _metadata(request)
    declared = request.headers.get("content-type")
    media = (declared or "").split(";")[0].strip().lower()
    limit = access.manager.config.max_upload_bytes
    if declared is None or media == RAW:
        wanted = _path(path)
        await _store(access, wanted, _raw_pieces(request, limit))
        return [await _labelled(access, wanted, metadata)]
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
        written.append(await _labelled(access, target, metadata))
    if not written:
        raise E2BError(400, "multipart upload without a part named 'file'")
    return written
