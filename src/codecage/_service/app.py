"""`codecage serve`: the HTTP API (FastAPI). See docs/openapi.json for the contract.

Every error is a JSON body {"error": {"type", "message"}} with a 4xx/5xx status: never a
stack trace, never a host path. Another tenant's sandbox is the same 404 as a missing one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._approvals import operation
from .._errors import (
    AuditUnavailable,
    CodeRejected,
    PolicyError,
    ProcessNotFound,
    SandboxError,
    SnapshotNotFound,
    wire,
)
from .._jail import cgroups, close_jails
from .._models import Execution
from .._processes import PTY_ENVS, PtySize, signal_process
from .._processes import read as read_output
from .._sandbox import check_language
from .._text import has_lone_surrogate
from .audit import AuditLog
from .config import ServerConfig, check_fits
from .manager import Manager, Started, Upload

NDJSON = "application/x-ndjson"
STREAM_EVENTS = {
    "stdout": ("text",),
    "stderr": ("text",),
    "result": ("data", "is_main_result"),
    "error": ("name", "value", "traceback"),
    "end": ("execution_count",),
    "pending_approval": ("approval",),  # the host's own event: the run waits for a person
}


# -- request and response bodies (the OpenAPI contract) --------------------------------------


class CreateSandbox(BaseModel):
    policy: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the service's default policy"
    )
    envs: dict[str, str] = Field(default_factory=dict)
    snapshot: str | None = Field(
        None, max_length=256, description="start from this snapshot (id or name; docs/fork.md)"
    )
    template: str | None = Field(
        None, max_length=64, description="a built template's name (docs/templates.md)"
    )
    volumes: dict[str, str] = Field(
        default_factory=dict,
        description="{mount path: volume name} of the tenant's volumes (docs/volumes.md)",
    )


class VolumeBody(BaseModel):
    name: str = Field(..., min_length=1, max_length=63)
    size_mb: int = Field(..., ge=8, le=1 << 20)
    inodes: int | None = Field(None, ge=16, description="files at most (default: one per 16 KiB)")


class VolumeOut(BaseModel):
    name: str
    size_mb: int
    inodes: int
    created_at: float


class ImportOut(BaseModel):
    members: int


class SnapshotBody(BaseModel):
    name: str | None = Field(None, min_length=1, max_length=256)
    memory: bool = Field(True, description="the variables too (else the files only)")


class SnapshotOut(BaseModel):
    id: str
    sandbox_id: str
    names: list[str]
    created_at: float
    size: int
    sha256: str
    memory: bool


class ExecuteBody(BaseModel):
    code: str
    timeout: float | None = Field(
        None, gt=0, description="seconds; can only lower the policy's timeout_s"
    )
    envs: dict[str, str] = Field(default_factory=dict)


class CellBody(ExecuteBody):
    language: str | None = Field(
        None,
        max_length=64,
        description="python (the default) or bash: the language's default context",
    )
    context: str | None = Field(
        None,
        max_length=64,
        description="a code context's id (POST .../contexts); not with language",
    )


class ContextBody(BaseModel):
    cwd: str | None = Field(None, max_length=4096, description="default /home/user")
    language: str | None = Field(None, max_length=64, description="python (default) or bash")


class ContextOut(BaseModel):
    id: str
    language: str
    cwd: str


class RunBody(ExecuteBody):
    policy: dict[str, Any] = Field(default_factory=dict)


MAX_BATCH = 10_000  # one-shot runs in one batch (the body's size bounds it too)


class BatchBody(BaseModel):
    codes: list[str] = Field(..., min_length=1, max_length=MAX_BATCH)
    policy: dict[str, Any] = Field(default_factory=dict)
    envs: dict[str, str] = Field(default_factory=dict)
    concurrency: int | None = Field(
        None, ge=1, le=256, description="runs at once (default: two per core of the node)"
    )


class CommandBody(BaseModel):
    cmd: str
    timeout: float | None = Field(None, gt=0)
    envs: dict[str, str] = Field(default_factory=dict)


class PathBody(BaseModel):
    path: str


class PtySizeBody(BaseModel):
    rows: int = Field(24, ge=1, le=4096)
    cols: int = Field(80, ge=1, le=4096)


class ProcessBody(BaseModel):
    cmd: str | None = Field(
        None,
        max_length=1 << 16,
        description="a shell command, run as `/bin/bash -l -c CMD`; none with `pty`: an "
        "interactive `/bin/bash -i -l`",
    )
    envs: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = Field(None, max_length=4096, description="default /home/user")
    user: Literal["user", "root"] | None = Field(
        None, description="both name the sandbox's one unprivileged identity"
    )
    stdin: bool = Field(False, description="a stdin pipe (else /dev/null)")
    pty: PtySizeBody | None = None
    tag: str | None = Field(None, max_length=256)


class InputBody(BaseModel):
    data: str = Field(..., max_length=2 << 20, description="base64")


class SignalBody(BaseModel):
    signal: Literal["SIGKILL", "SIGTERM", "SIGINT", "SIGHUP"] = "SIGKILL"


class SandboxOut(BaseModel):
    id: str
    created_at: float
    policy: dict[str, Any]
    state: Literal["running", "paused"] = "running"
    paused_at: float | None = Field(None, description="Unix time of its pause, while paused")


class FindingOut(BaseModel):
    rule: str
    severity: str
    line: int
    col: int
    message: str


class ApprovalOut(BaseModel):
    id: str
    kind: str
    reasons: list[str]
    subject: str
    sandbox_id: str | None
    tenant: str | None
    run_id: str | None
    client_ref: str | None
    findings: list[FindingOut]
    requested_at: float
    expires_at: float


class DecisionBody(BaseModel):
    decision: Literal["approve", "deny"]
    reason: str = Field("", max_length=4000)
    by: str = Field("", max_length=200, description="who decided (recorded in the audit log)")


class DecisionOut(BaseModel):
    approved: bool
    by: str
    reason: str
    at: float
    key: str | None


class ErrorOut(BaseModel):
    name: str = Field(
        description="the exception's class name, or the host's verdict: KernelDied (the kernel"
        " exited or was killed; the value says how and that the state is lost), TimeoutError,"
        " MemoryLimitExceeded, CpuLimitExceeded, SeccompViolation"
    )
    value: str
    traceback: str


class LogsOut(BaseModel):
    stdout: list[str]
    stderr: list[str]


class ResultOut(BaseModel):
    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    png: str | None = None
    jpeg: str | None = None
    svg: str | None = None
    latex: str | None = None
    json_: Any = Field(None, alias="json")
    chart: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    is_main_result: bool = False
    extra: dict[str, Any] = Field(default_factory=dict)


class ExecutionOut(BaseModel):
    results: list[ResultOut]
    logs: LogsOut
    error: ErrorOut | None
    execution_count: int | None
    duration_ms: float
    exit_code: int | None
    killed_by: str | None
    limits_hit: list[str]
    truncated: bool
    peak_memory_mb: float | None
    state_lost: bool
    findings: list[FindingOut]
    text: str | None


class CommandOut(BaseModel):
    stdout: str
    stderr: str
    exit_code: int
    error: str | None
    truncated: bool
    killed_by: str | None = Field(
        None, description="the limit that ended the sandbox during the command (cpu_limit)"
    )


class ProcessOut(BaseModel):
    pid: int
    cmd: str
    args: list[str]
    envs: dict[str, str]
    cwd: str | None
    tag: str | None
    pty: PtySizeBody | None


class StartedOut(BaseModel):
    pid: int


class ChunkOut(BaseModel):
    stream: Literal["stdout", "stderr", "pty"]
    data: str = Field(description="base64")


class OutputOut(BaseModel):
    chunks: list[ChunkOut]
    offset: int = Field(description="where `chunks` start in the process's output")
    next: int = Field(description="the offset to ask for next")
    dropped: int = Field(description="bytes before `offset` the bounded buffer let go")
    running: bool
    exit_code: int | None = Field(description="once it ended (and all was read) by exiting")
    signal: int | None = Field(description="once it ended (and all was read) by a signal")


class EntryOut(BaseModel):
    """A file or directory (the SDK's EntryInfo). Listings, `info` and `rename` fill every
    field; an upload the first four."""

    name: str
    path: str
    type: str = Field(description='"file", "dir", "symlink" (a broken link) or "other"')
    size: int
    mode: int | None = Field(None, description="the permission bits")
    permissions: str | None = Field(None, description='as `ls -l` shows them, "-rw-r--r--"')
    owner: str | None = None
    group: str | None = None
    modified_time: datetime.datetime | None = None
    symlink_target: str | None = Field(None, description="a symlink's resolved target")
    metadata: dict[str, str] | None = Field(None, description="E2B's file metadata")


class RenameBody(BaseModel):
    source: str
    destination: str


class WatchBody(BaseModel):
    path: str
    recursive: bool = False


class WatcherOut(BaseModel):
    id: str


class WatchEventOut(BaseModel):
    name: str = Field(description="relative to the watched directory")
    type: str = Field(description='"create", "write", "remove", "rename" or "chmod"')


class WatchEventsOut(BaseModel):
    events: list[WatchEventOut]
    overflowed: bool = Field(
        description="some events were lost since the watcher began (its queue was full)"
    )


class ExistsOut(BaseModel):
    exists: bool


class MadeOut(BaseModel):
    created: bool


class ErrorBody(BaseModel):
    type: str
    message: str
    findings: list[FindingOut] | None = Field(
        None, description="CodeRejected: the static-analysis findings that blocked the code"
    )


class ErrorResponse(BaseModel):
    error: ErrorBody


class HealthOut(BaseModel):
    status: str
    sandboxes: int


def _execution_json(ex: Execution) -> dict[str, Any]:
    return ex.to_dict()


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse}
    for code in (400, 401, 403, 404, 408, 409, 413, 415, 422, 429, 500, 503)
}
PIPELINED_MAX = 16  # HTTP/1.1 requests one connection may send ahead of their answers
HEAD_MAX_BYTES = 64 << 10  # a request's line and headers (llhttp itself has no limit)
SCRAPES = 4  # /metrics requests at once (it is open: no tenant's quota covers it)
# DELETEs a tenant may have in flight beyond quotas.concurrent_requests: a tenant whose places
# are all held (by runs that go on) can still end what holds them. A delete never waits for a
# run, so these few places hold a thread each only briefly.
DELETES_BEYOND_CAP = 4
OPEN_PATHS = frozenset({"/healthz", "/metrics", "/openapi.json", "/docs", "/redoc"})
RAW = "application/octet-stream"
# A tenant's file is bytes, never a page or a script of this origin (the console shares it).
NOSNIFF = {"X-Content-Type-Options": "nosniff"}
MAX_LIST_DEPTH = 1024  # levels a listing goes down at most (E2B's ListDir too)
MULTIPART = "multipart/form-data"
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "the file's bytes, raw (application/octet-stream, or no Content-Type), "
        "or as E2B clients send them: multipart/form-data with one part named `file`. "
        "Anything else, or a Content-Encoding other than identity, is refused with 415.",
        "content": {
            RAW: {"schema": {"type": "string", "format": "binary"}},
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                    "additionalProperties": False,
                }
            },
        },
    }
}


# -- dependencies: the app's Manager, and who the request's API key is ----------------------


async def current_manager(request: Request) -> Manager:  # async: no worker thread to resolve it
    return request.app.state.codecage["manager"]  # type: ignore[no-any-return]


MANAGER = Depends(current_manager)


def _identity(audit: AuditLog, authorization: str | None) -> tuple[str, str, str]:
    """(tenant, role, key id) of an API key in a header value (for an open route that
    reads an optional key itself; Admission has already checked every other route's)."""
    scheme, _, key = (authorization or "").partition(" ")
    found = audit.identity(key.strip()) if scheme.lower() == "bearer" and key else None
    if found is None:
        raise Unauthorized()
    return found


async def admitted(  # async, as the two below: no worker thread to resolve them
    request: Request, authorization: str | None = Header(None)
) -> tuple[str, str, str]:
    """(tenant, role, key id) of the request's API key, as Admission found it from the
    headers before any body was read (`authorization` is declared for the document)."""
    found = getattr(request.state, "identity", None)
    if found is None:
        raise Unauthorized()
    return found  # type: ignore[no-any-return]


async def tenant(who: tuple[str, str, str] = Depends(admitted)) -> str:
    """A client key's tenant (an approver key only answers approvals)."""
    if who[1] != "client":
        raise Forbidden("this key may only answer approvals")
    return who[0]


async def approver(
    who: tuple[str, str, str] = Depends(admitted), manager: Manager = MANAGER
) -> tuple[str, str, str]:
    """A key that may see and answer its tenant's approvals (config `approvers`)."""
    only_approver_keys = manager.config.approvers == "approver_keys"
    if who[1] == "operator" or (who[1] != "approver" and only_approver_keys):
        raise Forbidden("approvals on this service are answered with approver keys only")
    return who


ref_header = Header(
    None,
    alias="X-Codecage-Ref",
    max_length=64,
    description="the caller's reference, copied into approval requests this raises",
)


def sandbox_out(entry: Any) -> SandboxOut:
    return SandboxOut(
        id=entry.sandbox.id,
        created_at=entry.created_at,
        policy=entry.sandbox.policy.model_dump(),
        state="paused" if entry.paused_at is not None else "running",
        paused_at=entry.paused_at,
    )


# -- the routes, by area (included in this order: the OpenAPI document's) -------------------

service = APIRouter()  # liveness and metrics: open (no key needed)
sandboxes = APIRouter()
runs = APIRouter()  # cells, one-shot runs, commands
files = APIRouter()
processes = APIRouter()  # background commands and ptys
approvals = APIRouter()
audit_log = APIRouter()
volumes = APIRouter()  # persistent volumes (docs/volumes.md)
ROUTERS = (service, sandboxes, volumes, runs, files, processes, approvals, audit_log)


@service.get("/healthz", response_model=HealthOut)
async def healthz(manager: Manager = MANAGER) -> HealthOut:
    # on the event loop: never waits for a worker thread
    return HealthOut(status="ok", sandboxes=manager.live())


@service.get("/metrics", response_class=PlainTextResponse, responses=ERRORS)
def metrics(
    authorization: str | None = Header(None), manager: Manager = MANAGER
) -> PlainTextResponse:
    """Aggregate series; with an operator key (`keys create --role operator`) also the
    per-sandbox ones, which name tenants and sandboxes."""
    from prometheus_client import generate_latest

    text = generate_latest(manager.metrics.registry).decode()
    if authorization is not None and _identity(manager.audit, authorization)[1] == "operator":
        text += generate_latest(manager.metrics.detail).decode()
    return PlainTextResponse(text)


@sandboxes.post("/v1/sandboxes", response_model=SandboxOut, status_code=201, responses=ERRORS)
def create_sandbox(
    body: CreateSandbox,
    who: str = Depends(tenant),
    ref: str | None = ref_header,
    manager: Manager = MANAGER,
) -> SandboxOut:
    _valid_text(body)
    overrides = body.policy | ({"template": body.template} if body.template else {})
    with operation(client_ref=ref):
        if body.snapshot is not None:
            if body.volumes:
                raise PolicyError("a sandbox from a snapshot takes no volumes")
            made = manager.from_snapshot(who, body.snapshot, overrides=overrides, envs=body.envs)
            return sandbox_out(made)
        return sandbox_out(manager.create(who, overrides, body.envs, volumes=body.volumes))


@sandboxes.get("/v1/sandboxes", response_model=list[SandboxOut], responses=ERRORS)
def list_sandboxes(who: str = Depends(tenant), manager: Manager = MANAGER) -> list[SandboxOut]:
    return [sandbox_out(e) for e in manager.entries(who)]


@sandboxes.get("/v1/sandboxes/{sandbox_id}", response_model=SandboxOut, responses=ERRORS)
def get_sandbox(
    sandbox_id: str, who: str = Depends(tenant), manager: Manager = MANAGER
) -> SandboxOut:
    return sandbox_out(manager.get(who, sandbox_id))


@sandboxes.delete("/v1/sandboxes/{sandbox_id}", status_code=204, responses=ERRORS)
def delete_sandbox(
    sandbox_id: str, who: str = Depends(tenant), manager: Manager = MANAGER
) -> Response:
    manager.delete(who, sandbox_id)
    return Response(status_code=204)


@sandboxes.post("/v1/sandboxes/{sandbox_id}/pause", response_model=SandboxOut, responses=ERRORS)
def pause_sandbox(
    sandbox_id: str, who: str = Depends(tenant), manager: Manager = MANAGER
) -> SandboxOut:
    """Freeze the sandbox (docs/pause.md): 409 SandboxPaused if it is paused, SandboxBusy
    while an operation runs in it; 429 past quotas.paused_sandboxes."""
    return sandbox_out(manager.pause(who, sandbox_id))


@sandboxes.post("/v1/sandboxes/{sandbox_id}/resume", response_model=SandboxOut, responses=ERRORS)
def resume_sandbox(
    sandbox_id: str, who: str = Depends(tenant), manager: Manager = MANAGER
) -> SandboxOut:
    """Thaw a paused sandbox (a running one is answered as it is)."""
    return sandbox_out(manager.resume(who, sandbox_id)[0])


def snapshot_out(snap: Any) -> SnapshotOut:
    return SnapshotOut(
        id=snap.id,
        sandbox_id=snap.sandbox_id,
        names=snap.names,
        created_at=snap.created_at,
        size=snap.size,
        sha256=snap.sha256,
        memory=snap.memory,
    )


@sandboxes.post(
    "/v1/sandboxes/{sandbox_id}/snapshots",
    response_model=SnapshotOut,
    status_code=201,
    responses=ERRORS,
)
def create_snapshot(
    sandbox_id: str,
    body: SnapshotBody | None = None,
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> SnapshotOut:
    """Keep the sandbox's state and files for new sandboxes (docs/fork.md); it runs on.
    409 naming what cannot be carried; 429 past quotas.snapshots or quotas.snapshot_mb."""
    wanted = body or SnapshotBody()
    _valid_text(wanted)
    return snapshot_out(manager.snapshot(who, sandbox_id, wanted.name, wanted.memory))


@sandboxes.get("/v1/snapshots", response_model=list[SnapshotOut], responses=ERRORS)
def list_snapshots(who: str = Depends(tenant), manager: Manager = MANAGER) -> list[SnapshotOut]:
    return [snapshot_out(s) for s in manager.snapshots.list(who)]


@sandboxes.delete("/v1/snapshots/{snapshot_id}", status_code=204, responses=ERRORS)
def delete_snapshot(
    snapshot_id: str, who: str = Depends(tenant), manager: Manager = MANAGER
) -> Response:
    if not manager.delete_snapshot(who, snapshot_id[:64]):
        raise SnapshotNotFound(f"no snapshot {snapshot_id[:64]!r}")
    return Response(status_code=204)


def volume_out(volume: Any) -> VolumeOut:
    return VolumeOut(
        name=volume.name,
        size_mb=volume.size_mb,
        inodes=volume.inodes,
        created_at=volume.created_at,
    )


@volumes.post("/v1/volumes", response_model=VolumeOut, status_code=201, responses=ERRORS)
def create_volume(
    body: VolumeBody, who: str = Depends(tenant), manager: Manager = MANAGER
) -> VolumeOut:
    """A new, empty volume: hard limits of `size_mb` and `inodes` (ENOSPC in the sandbox);
    409 if the name is taken, 429 past quotas.volumes or quotas.volume_mb."""
    return volume_out(manager.create_volume(who, body.name, body.size_mb, body.inodes))


@volumes.get("/v1/volumes", response_model=list[VolumeOut], responses=ERRORS)
def list_volumes(who: str = Depends(tenant), manager: Manager = MANAGER) -> list[VolumeOut]:
    return [volume_out(v) for v in manager.volumes(who).list()]


@volumes.get("/v1/volumes/{name}", response_model=VolumeOut, responses=ERRORS)
def get_volume(name: str, who: str = Depends(tenant), manager: Manager = MANAGER) -> VolumeOut:
    """404 for another tenant's volume, as for a missing one."""
    return volume_out(manager.volumes(who).get(name[:64]))


@volumes.delete("/v1/volumes/{name}", status_code=204, responses=ERRORS)
def delete_volume(name: str, who: str = Depends(tenant), manager: Manager = MANAGER) -> Response:
    """Delete it and its files; 409 while it is attached to a sandbox."""
    manager.delete_volume(who, name[:64])
    return Response(status_code=204)


@volumes.get(
    "/v1/volumes/{name}/archive",
    responses={**ERRORS, 200: {"content": {RAW: {}}}},
    response_class=Response,
)
async def export_volume(
    name: str, who: str = Depends(tenant), manager: Manager = MANAGER
) -> Response:
    """The volume's files as a tar stream, packed inside a sandbox that has it attached
    (409 while it is attached elsewhere)."""
    chunks = await run_in_threadpool(manager.export_volume, who, name[:64])
    try:
        head = await run_in_threadpool(next, chunks, b"")
    except BaseException:
        await run_in_threadpool(chunks.close)  # type: ignore[attr-defined]
        raise
    return StreamingResponse(_stream(head, chunks), media_type=RAW, headers=NOSNIFF)  # type: ignore[arg-type]


@volumes.put("/v1/volumes/{name}/archive", response_model=ImportOut, responses=ERRORS)
async def import_volume(
    name: str, request: Request, who: str = Depends(tenant), manager: Manager = MANAGER
) -> ImportOut:
    """Unpack a tar archive (raw body, at most max_upload_bytes) into the volume, inside a
    sandbox that has it attached: each member checked there (no path out of it, no device,
    no setuid bit). 409 with the reason for a refused member, or ENOSPC past its quotas."""
    from .._sandbox import FILE_CHUNK

    pieces = _upload_pieces(request)
    await anext(pieces)
    held, chunks = bytearray(), []
    async for piece in pieces:
        held += piece
        while len(held) >= FILE_CHUNK:
            chunks.append(bytes(held[:FILE_CHUNK]))
            del held[:FILE_CHUNK]
    chunks.append(bytes(held))
    members = await run_in_threadpool(manager.import_volume, who, name[:64], chunks)
    return ImportOut(members=members)


class ForkBody(BaseModel):
    count: int = Field(1, ge=1, le=20, description="how many forks")


@sandboxes.post(
    "/v1/sandboxes/{sandbox_id}/fork",
    response_model=list[SandboxOut],
    status_code=201,
    responses=ERRORS,
)
def fork_sandbox(
    sandbox_id: str,
    body: ForkBody | None = None,
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> list[SandboxOut]:
    """New sandboxes with this one's interpreter state and a copy of its workspace
    (docs/fork.md): 409 with the reason when something cannot be carried, 409 SandboxBusy
    while an operation runs in it, 429 past the live-sandbox quota."""
    count = body.count if body is not None else 1
    return [sandbox_out(e) for e in manager.fork(who, sandbox_id, count)]


@runs.post(
    "/v1/sandboxes/{sandbox_id}/execute",
    response_model=ExecutionOut,
    responses={**ERRORS, 200: {"content": {NDJSON: {}}}},
)
async def execute(
    sandbox_id: str,
    body: CellBody,
    request: Request,
    who: str = Depends(tenant),
    ref: str | None = ref_header,
    manager: Manager = MANAGER,
) -> Response:
    _valid_text(body)

    def begin() -> Started:  # in a worker thread: analysis is off the event loop
        return manager.start_execute(
            who, sandbox_id, body.code, context=body.context, language=body.language
        )

    def work(started: Started, on_event: Callable[[dict[str, Any]], None] | None) -> Execution:
        with operation(client_ref=ref):
            return manager.carry_out(
                started,
                body.envs,
                on_event,
                body.timeout,
                context=body.context,
                language=body.language,
            )

    if body.language is not None:
        check_language(body.language)  # a 400 before anything is recorded
    return await _answer(request, begin, work)


@runs.post("/v1/sandboxes/{sandbox_id}/contexts", response_model=ContextOut, responses=ERRORS)
def create_context(
    sandbox_id: str, body: ContextBody, who: str = Depends(tenant), manager: Manager = MANAGER
) -> ContextOut:
    _valid_text(body)
    what = f"create_code_context(language={body.language!r}, cwd={body.cwd!r})"
    made = manager.code_context(
        who, sandbox_id, what, lambda s: s.create_code_context(cwd=body.cwd, language=body.language)
    )
    return ContextOut(id=made.id, language=made.language, cwd=made.cwd)


@runs.get("/v1/sandboxes/{sandbox_id}/contexts", response_model=list[ContextOut], responses=ERRORS)
def list_contexts(
    sandbox_id: str, who: str = Depends(tenant), manager: Manager = MANAGER
) -> list[ContextOut]:
    found = manager.code_context(
        who, sandbox_id, "list_code_contexts()", lambda s: s.list_code_contexts()
    )
    return [ContextOut(id=c.id, language=c.language, cwd=c.cwd) for c in found]


@runs.post(
    "/v1/sandboxes/{sandbox_id}/contexts/{context_id}/restart", status_code=204, responses=ERRORS
)
def restart_context(
    sandbox_id: str, context_id: str, who: str = Depends(tenant), manager: Manager = MANAGER
) -> Response:
    what = f"restart_code_context({context_id!r})"
    manager.code_context(who, sandbox_id, what, lambda s: s.restart_code_context(context_id))
    return Response(status_code=204)


@runs.delete("/v1/sandboxes/{sandbox_id}/contexts/{context_id}", status_code=204, responses=ERRORS)
def remove_context(
    sandbox_id: str, context_id: str, who: str = Depends(tenant), manager: Manager = MANAGER
) -> Response:
    what = f"remove_code_context({context_id!r})"
    manager.code_context(who, sandbox_id, what, lambda s: s.remove_code_context(context_id))
    return Response(status_code=204)


@runs.post(
    "/v1/run", response_model=ExecutionOut, responses={**ERRORS, 200: {"content": {NDJSON: {}}}}
)
async def run(
    body: RunBody,
    request: Request,
    who: str = Depends(tenant),
    ref: str | None = ref_header,
    manager: Manager = MANAGER,
) -> Response:
    _valid_text(body)

    def begin() -> Started:
        return manager.start_run(who, body.code, body.policy)

    def work(started: Started, on_event: Callable[[dict[str, Any]], None] | None) -> Execution:
        with operation(client_ref=ref):
            return manager.carry_out(started, body.envs, on_event)

    return await _answer(request, begin, work)


@runs.post("/v1/batch", responses={**ERRORS, 200: {"content": {NDJSON: {}}}})
async def batch(
    body: BatchBody,
    who: str = Depends(tenant),
    ref: str | None = ref_header,
    manager: Manager = MANAGER,
) -> Response:
    """Many one-shot runs, each a fresh sandbox with its own audit record: NDJSON, a line
    `{"ev": "result", "index", "execution"}` (or `"error"`: what refused that run) as each
    finishes, then `{"ev": "end", "count", "ok", "errors"}`. A policy outside the ceiling
    is a 400 before anything runs."""
    _valid_text(body)
    manager.check_policy(body.policy)
    width = manager.batch_width(who, body.concurrency)

    def one(code: str) -> dict[str, Any]:
        with operation(client_ref=ref):
            try:
                ex = manager.carry_out(manager.start_run(who, code, body.policy), body.envs)
            except SandboxError as exc:
                return {"error": _error_body(exc)}
        return {"execution": _execution_json(ex)}

    async def lines() -> AsyncIterator[bytes]:
        gate = asyncio.Semaphore(width)

        async def run(index: int, code: str) -> dict[str, Any]:
            async with gate:
                return {"ev": "result", "index": index, **await run_in_threadpool(one, code)}

        tasks = [asyncio.ensure_future(run(i, code)) for i, code in enumerate(body.codes)]
        ok = 0
        try:
            for next_done in asyncio.as_completed(tasks):
                line = await next_done
                ok += "execution" in line
                yield json.dumps(line).encode() + b"\n"
        finally:
            for task in tasks:  # a client gone: what has not started never does
                task.cancel()
        end = {"ev": "end", "count": len(tasks), "ok": ok, "errors": len(tasks) - ok}
        yield json.dumps(end).encode() + b"\n"

    return StreamingResponse(lines(), media_type=NDJSON)


@runs.post("/v1/sandboxes/{sandbox_id}/commands", response_model=CommandOut, responses=ERRORS)
def command(
    sandbox_id: str,
    body: CommandBody,
    who: str = Depends(tenant),
    ref: str | None = ref_header,
    manager: Manager = MANAGER,
) -> CommandOut:
    _valid_text(body)
    with operation(client_ref=ref):
        result = manager.command(who, sandbox_id, body.cmd, body.timeout, body.envs)
    return CommandOut(**vars(result))


@files.put(
    "/v1/sandboxes/{sandbox_id}/files",
    response_model=EntryOut,
    responses=ERRORS,
    openapi_extra=UPLOAD_BODY,
)
async def upload(
    sandbox_id: str,
    request: Request,
    path: str = Query(...),
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> EntryOut:
    """Store a file: streamed to the sandbox as it arrives (the host holds one chunk)."""

    _check_path(path)
    pieces = _upload_pieces(request)  # 415 / 400 before anything is stored
    await anext(pieces)
    uploading = manager.uploading(who, sandbox_id, path)
    sink = await stream_upload(uploading, pieces, RequestTimeout)
    assert sink.info is not None
    return EntryOut(**vars(sink.info))


async def stream_upload(
    uploading: contextlib.AbstractContextManager[Upload],
    pieces: AsyncIterator[bytes],
    too_slow: Callable[[str], Exception],
) -> Upload:
    """Feed a recorded upload (`Manager.uploading`) from a body's pieces, FILE_CHUNK at a
    time, within the policy's time for the whole transfer (`too_slow` is the front end's
    error for it). A failure aborts and records the upload; its first error is the one
    raised."""
    from .._sandbox import FILE_CHUNK

    sink = await run_in_threadpool(uploading.__enter__)
    try:
        held: list[bytes] = []
        size = 0
        async for piece in pieces:
            if time.monotonic() > sink.deadline:  # a trickle cannot hold the sandbox
                raise too_slow("the upload took longer than the policy's timeout_s")
            held.append(piece)
            size += len(piece)
            if size >= FILE_CHUNK:
                await run_in_threadpool(sink.write, b"".join(held))
                held, size = [], 0
        await run_in_threadpool(sink.write, b"".join(held))
    except BaseException as exc:
        with anyio.CancelScope(shield=True), contextlib.suppress(SandboxError):
            await run_in_threadpool(uploading.__exit__, type(exc), exc, exc.__traceback__)
        raise
    await run_in_threadpool(uploading.__exit__, None, None, None)
    return sink


@files.get(
    "/v1/sandboxes/{sandbox_id}/files",
    responses={**ERRORS, 200: {"content": {RAW: {}}}},
    response_class=Response,
)
async def download(
    sandbox_id: str,
    path: str = Query(...),
    who: str = Depends(tenant),
    ref: str | None = ref_header,
    manager: Manager = MANAGER,
) -> Response:
    """The file, streamed chunk by chunk (errors before the first byte are JSON; a
    transfer that fails later ends the connection before the body is complete)."""
    _check_path(path)
    chunks = manager.download(who, sandbox_id, path)

    def first() -> bytes:
        with operation(client_ref=ref):
            return next(chunks)

    try:
        head = await run_in_threadpool(first)
    except BaseException:
        await run_in_threadpool(chunks.close)
        raise
    return StreamingResponse(_stream(head, chunks), media_type=RAW, headers=NOSNIFF)


@files.get("/v1/sandboxes/{sandbox_id}/files/list", response_model=list[EntryOut], responses=ERRORS)
def list_files(
    sandbox_id: str,
    path: str = Query("."),
    depth: int = Query(1, ge=1, le=MAX_LIST_DEPTH, description="1: the directory's own"),
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> list[EntryOut]:
    _check_path(path)
    return [EntryOut(**vars(e)) for e in manager.list_files(who, sandbox_id, path, depth)]


@files.get("/v1/sandboxes/{sandbox_id}/files/info", response_model=EntryOut, responses=ERRORS)
def file_info(
    sandbox_id: str,
    path: str = Query(...),
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> EntryOut:
    """Everything about one file or directory (404 FileNotFound if it is missing)."""
    _check_path(path)
    return EntryOut(**vars(manager.get_info(who, sandbox_id, path)))


@files.post("/v1/sandboxes/{sandbox_id}/files/rename", response_model=EntryOut, responses=ERRORS)
def rename(
    sandbox_id: str,
    body: RenameBody,
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> EntryOut:
    """Move a file or directory (the destination's parents are created): where it is now."""
    _check_path(body.source)
    _check_path(body.destination)
    return EntryOut(**vars(manager.rename(who, sandbox_id, body.source, body.destination)))


@files.post(
    "/v1/sandboxes/{sandbox_id}/files/watchers",
    response_model=WatcherOut,
    status_code=201,
    responses=ERRORS,
)
def watch_dir(
    sandbox_id: str,
    body: WatchBody,
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> WatcherOut:
    """Start watching a directory; poll its events with GET .../events (docs/service.md)."""
    _check_path(body.path)
    return WatcherOut(id=manager.watch_dir(who, sandbox_id, body.path, body.recursive))


@files.get(
    "/v1/sandboxes/{sandbox_id}/files/watchers/{watcher_id}/events",
    response_model=WatchEventsOut,
    responses=ERRORS,
)
def watch_events(
    sandbox_id: str,
    watcher_id: str,
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> WatchEventsOut:
    """The watcher's events since the last call (each is given once)."""
    events, overflowed = manager.watch_events(who, sandbox_id, watcher_id)
    return WatchEventsOut(
        events=[WatchEventOut(name=e.name, type=e.type) for e in events], overflowed=overflowed
    )


@files.delete(
    "/v1/sandboxes/{sandbox_id}/files/watchers/{watcher_id}", status_code=204, responses=ERRORS
)
def unwatch(
    sandbox_id: str,
    watcher_id: str,
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> Response:
    manager.unwatch(who, sandbox_id, watcher_id)
    return Response(status_code=204)


@files.get("/v1/sandboxes/{sandbox_id}/files/exists", response_model=ExistsOut, responses=ERRORS)
def exists(
    sandbox_id: str,
    path: str = Query(...),
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> ExistsOut:
    _check_path(path)
    return ExistsOut(exists=manager.exists(who, sandbox_id, path))


@files.delete("/v1/sandboxes/{sandbox_id}/files", status_code=204, responses=ERRORS)
def remove(
    sandbox_id: str,
    path: str = Query(...),
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> Response:
    _check_path(path)
    manager.remove(who, sandbox_id, path)
    return Response(status_code=204)


@files.post("/v1/sandboxes/{sandbox_id}/files/mkdir", response_model=MadeOut, responses=ERRORS)
def make_dir(
    sandbox_id: str,
    body: PathBody,
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> MadeOut:
    _check_path(body.path)
    return MadeOut(created=manager.make_dir(who, sandbox_id, body.path))


@processes.post(
    "/v1/sandboxes/{sandbox_id}/processes",
    response_model=StartedOut,
    status_code=201,
    responses=ERRORS,
)
def start_process(
    sandbox_id: str,
    body: ProcessBody,
    who: str = Depends(tenant),
    ref: str | None = ref_header,
    manager: Manager = MANAGER,
) -> StartedOut:
    """Start a background command (or, with `pty`, a terminal): recorded at its start and
    at its end; it runs while cells run and outlives kernel restarts."""
    _valid_text(body)
    if body.cmd is None and body.pty is None:
        raise BadRequest("cmd: a command, or a pty")
    args = ["-l", "-c", body.cmd] if body.cmd is not None else ["-i", "-l"]
    envs = {**PTY_ENVS, **body.envs} if body.pty is not None else body.envs
    size = None if body.pty is None else PtySize(body.pty.rows, body.pty.cols)
    with operation(client_ref=ref):
        pid = manager.start_process(
            who,
            sandbox_id,
            "/bin/bash",
            args,
            envs=envs,
            cwd=body.cwd,
            tag=body.tag,
            pty=size,
            stdin=body.stdin,
            user=body.user,
        )
    return StartedOut(pid=pid)


@processes.get(
    "/v1/sandboxes/{sandbox_id}/processes", response_model=list[ProcessOut], responses=ERRORS
)
def list_processes(
    sandbox_id: str, who: str = Depends(tenant), manager: Manager = MANAGER
) -> list[ProcessOut]:
    """The running background commands and terminals."""
    found = manager.on_process(who, sandbox_id, lambda sbx: sbx.commands.list())
    return [ProcessOut(**{**vars(p), "pty": None if p.pty is None else vars(p.pty)}) for p in found]


@processes.get(
    "/v1/sandboxes/{sandbox_id}/processes/{pid}/output", response_model=OutputOut, responses=ERRORS
)
def process_output(
    sandbox_id: str,
    pid: int,
    offset: int | None = Query(None, ge=0, description="none: from now on"),
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> OutputOut:
    """A process's output from `offset` (poll again from `next`); `exit_code` or `signal`
    once it ended and everything before was read."""
    chunks, nxt, ended = manager.on_process(
        who, sandbox_id, lambda sbx: read_output(sbx._proc_call, pid, offset)
    )
    dropped = sum(c.dropped for c in chunks)
    data = [c for c in chunks if not c.dropped]
    size = sum(len(c.data) for c in data)
    return OutputOut(
        chunks=[ChunkOut(stream=c.stream, data=base64.b64encode(c.data).decode()) for c in data],
        offset=nxt - size,
        next=nxt,
        dropped=dropped,
        running=ended is None,
        exit_code=None if ended is None else ended.exit_code,
        signal=None if ended is None else ended.signal,
    )


@processes.post(
    "/v1/sandboxes/{sandbox_id}/processes/{pid}/stdin", status_code=204, responses=ERRORS
)
def process_stdin(
    sandbox_id: str,
    pid: int,
    body: InputBody,
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> Response:
    """Bytes (base64) to a process's stdin, or a terminal's input."""
    try:
        data = base64.b64decode(body.data, validate=True)
    except ValueError:
        raise BadRequest("data: base64") from None
    manager.on_process(who, sandbox_id, lambda sbx: sbx.commands.send_stdin(pid, data))
    return Response(status_code=204)


@processes.post(
    "/v1/sandboxes/{sandbox_id}/processes/{pid}/close-stdin", status_code=204, responses=ERRORS
)
def process_close_stdin(
    sandbox_id: str, pid: int, who: str = Depends(tenant), manager: Manager = MANAGER
) -> Response:
    manager.on_process(who, sandbox_id, lambda sbx: sbx.commands.close_stdin(pid))
    return Response(status_code=204)


@processes.post(
    "/v1/sandboxes/{sandbox_id}/processes/{pid}/signal", status_code=204, responses=ERRORS
)
def process_signal(
    sandbox_id: str,
    pid: int,
    body: SignalBody,
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> Response:
    """A signal to a process's group (404 if it is not running)."""
    sig = int(getattr(signal, body.signal))
    done = manager.on_process(who, sandbox_id, lambda sbx: signal_process(sbx._proc_call, pid, sig))
    if not done:
        raise ProcessNotFound(f"no running process {pid}")
    return Response(status_code=204)


@processes.post(
    "/v1/sandboxes/{sandbox_id}/processes/{pid}/resize", status_code=204, responses=ERRORS
)
def process_resize(
    sandbox_id: str,
    pid: int,
    body: PtySizeBody,
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> Response:
    size = PtySize(body.rows, body.cols)
    manager.on_process(who, sandbox_id, lambda sbx: sbx.pty.resize(pid, size))
    return Response(status_code=204)


@approvals.get("/v1/approvals", response_model=list[ApprovalOut], responses=ERRORS)
def pending_approvals(
    who: tuple[str, str, str] = Depends(approver), manager: Manager = MANAGER
) -> list[dict[str, Any]]:
    """This tenant's operations waiting for a person's yes."""
    return [r.to_dict() for r in manager.approvals.pending(who[0])]


@approvals.post("/v1/approvals/{approval_id}", response_model=DecisionOut, responses=ERRORS)
def decide(
    approval_id: str,
    body: DecisionBody,
    who: tuple[str, str, str] = Depends(approver),
    manager: Manager = MANAGER,
) -> dict[str, Any]:
    """Approve or deny a pending operation (the first answer wins; the audit log keeps it,
    with the key that answered: `by` is the decider's own note)."""
    _valid_text(body)
    tenant_name, role, key_id = who
    decision = manager.approvals.decide(
        approval_id,
        body.decision == "approve",
        body.by or f"{role} key {key_id}",
        body.reason,
        tenant_name,
        key=key_id,
    )
    return decision.to_dict()


@audit_log.get("/v1/audit/approvals", responses=ERRORS)
def audit_approvals(
    after: int = Query(0, ge=0, le=2**62),
    limit: int = Query(100, ge=1, le=1000),
    who: tuple[str, str, str] = Depends(approver),
    manager: Manager = MANAGER,
) -> list[dict[str, Any]]:
    """This tenant's approval requests and decisions: who, when, why; a page at a time
    (the next page: `after` = the last one's `rowid`)."""
    return manager.audit.approvals(tenant=who[0], after_rowid=after, limit=limit)


@audit_log.get("/v1/audit", responses=ERRORS)
def audit_runs(
    sandbox_id: str | None = None,
    outcome: str | None = None,
    since: float | None = None,
    until: float | None = None,
    after: int = Query(0, ge=0, le=2**62),
    limit: int = Query(100, ge=1, le=1000),
    who: str = Depends(tenant),
    manager: Manager = MANAGER,
) -> list[dict[str, Any]]:
    return manager.audit.runs(
        tenant=who,
        sandbox_id=sandbox_id,
        outcome=outcome,
        since=since,
        until=until,
        after_rowid=after,
        limit=limit,
    )


# -- the app ---------------------------------------------------------------------------------


def create_app(config: ServerConfig, audit: AuditLog | None = None) -> FastAPI:
    state: dict[str, Any] = {}  # the audit log and the Manager, once the app has started

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import anyio.to_thread

        workers = config.worker_threads
        anyio.to_thread.current_default_thread_limiter().total_tokens = workers
        # Streaming runs (and runs waiting for approval) use the loop's executor: as many.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="codecage-run")
        )
        log = audit or config.open_audit()
        log.mark_interrupted()  # runs of a previous process that never completed
        state["audit"] = log
        state["manager"] = Manager(config, log)
        await run_in_threadpool(state["manager"].start)  # the jail, warm; its pool if configured
        try:
            yield
        finally:
            await run_in_threadpool(state["manager"].shutdown)
            await run_in_threadpool(close_jails)
            if audit is None:
                log.close()

    app = FastAPI(
        title="codecage",
        version="1",
        description="Run untrusted Python in locked-down sandboxes.",
        lifespan=lifespan,
    )
    app.state.codecage = state
    app.add_middleware(
        BodyLimit, default=config.max_code_bytes + (1 << 20), upload=config.max_upload_bytes
    )
    app.add_middleware(Admission, config=config, state=state)  # outermost: before any body
    _handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    from . import e2b

    e2b.install(app, config, state)  # E2B's API, in front of all this (docs/e2b.md)
    from . import console

    console.install(app, config, state)  # the operator's web console (docs/console.md)
    return app


async def _answer(
    request: Request,
    begin: Callable[[], Started],
    work: Callable[[Started, Callable[[dict[str, Any]], None] | None], Execution],
) -> Response:
    """Record the run (durably) before it starts, then answer with one JSON Execution, or
    (Accept: application/x-ndjson) the events as they happen and {"ev": "execution", ...}
    once the completion record is durable. A log that cannot be written is a 503 first."""
    if NDJSON not in request.headers.get("accept", ""):
        ex = await run_in_threadpool(lambda: work(begin(), None))  # one thread hop per run
        return JSONResponse(_execution_json(ex))
    started = await run_in_threadpool(begin)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def on_event(event: dict[str, Any]) -> None:
        fields = STREAM_EVENTS.get(str(event.get("ev")))
        if fields is not None:  # only known events and fields: the sandbox's frames are untrusted
            clean = {"ev": event["ev"], **{f: event.get(f) for f in fields}}
            loop.call_soon_threadsafe(events.put_nowait, clean)

    task = loop.run_in_executor(None, work, started, on_event)
    task.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))

    async def lines() -> AsyncIterator[bytes]:
        while (event := await events.get()) is not None:
            yield json.dumps(event).encode() + b"\n"
        try:
            ex = task.result()
        except SandboxError as exc:
            yield json.dumps({"ev": "failed", **_error_body(exc)}).encode() + b"\n"
            return
        yield json.dumps({"ev": "execution", "execution": _execution_json(ex)}).encode() + b"\n"

    return _Streamed(lines(), task)


class _Streamed(StreamingResponse):
    """A run's NDJSON stream, which ends only when the run has: a client that hangs up
    does not stop the run (its worker thread is still held), so the request keeps its
    place in the tenant's requests in flight (Admission) until the run is over."""

    def __init__(self, content: AsyncIterator[bytes], task: asyncio.Future[Execution]) -> None:
        super().__init__(content, media_type=NDJSON)
        self._task = task

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await asyncio.wait([self._task])


def _check_path(path: str) -> None:
    if not path or "\0" in path or len(path.encode("utf-8", "surrogatepass")) > 4096:
        raise BadRequest("a path must be non-empty, without NUL bytes, and at most 4096 bytes")
    if has_lone_surrogate(path):
        raise BadRequest(
            "path: text must be valid Unicode (a lone surrogate such as \\ud800 is not)"
        )


def _valid_text(body: BaseModel) -> None:
    """400 for a body with a lone surrogate in any string (valid JSON, not valid UTF-8):
    code, commands, paths, envs, policies, notes."""
    for name, value in body:
        if has_lone_surrogate(value):
            raise BadRequest(
                f"{name}: text must be valid Unicode (a lone surrogate such as \\ud800 is not)"
            )


async def _stream(head: bytes, chunks: Generator[bytes, None, None]) -> AsyncIterator[bytes]:
    """A download's body: each chunk is fetched from the sandbox in a worker thread when the
    previous one has been sent, so the host holds one at a time."""
    try:
        yield head
        while (chunk := await run_in_threadpool(next, chunks, None)) is not None:
            yield chunk
    finally:
        with anyio.CancelScope(shield=True):  # the transfer's locks and record, always
            await run_in_threadpool(chunks.close)


async def _upload_pieces(request: Request) -> AsyncIterator[bytes]:
    """An upload's bytes as they arrive: raw bodies as they are, multipart/form-data (E2B's
    clients) as the content of its one part named `file`. Anything else: 415. The first
    item is b"" once the Content-Type has been accepted, before any byte is stored."""
    declared = request.headers.get("content-type")
    media = (declared or "").split(";")[0].strip().lower()
    codings = ",".join(request.headers.getlist("content-encoding")).lower().split(",")
    if any(c.strip() not in ("", "identity") for c in codings):
        raise UnsupportedMedia(  # never decoded here: stored, it would not be the file
            "Content-Encoding: an upload is sent as the file's own bytes, without a coding"
        )
    if declared is None or media == RAW:
        yield b""
        async for chunk in request.stream():
            yield chunk
        return
    if media != MULTIPART:
        raise UnsupportedMedia(
            f"Content-Type {media or declared!r}: an upload is raw bytes ({RAW}) or "
            f"{MULTIPART} with one part named 'file'"
        )
    parts = multipart_parts(request, declared, _refusal, max_parts=1)  # 400 without a boundary
    yield b""
    seen = False
    async for _filename, pieces in parts:
        seen = True
        async for piece in pieces:
            yield piece
    if not seen:
        raise BadRequest("multipart upload without a part named 'file'")


def _refusal(status: int, message: str) -> Exception:
    return UnsupportedMedia(message) if status == 415 else BadRequest(message)


def multipart_parts(
    request: Request,
    declared: str,
    refuse: Callable[[int, str], Exception],
    max_parts: int,
) -> AsyncIterator[tuple[str | None, AsyncIterator[bytes]]]:
    """The parts named `file` of a multipart/form-data body, streamed: (each part's
    filename, an iterator of its bytes), the next part read once the previous one has
    been consumed. A part of another name, a Content-Transfer-Encoding (never decoded
    here), more than `max_parts` parts or a malformed body is `refuse(status, message)`,
    raised; a body without a boundary is refused at once, before anything is read."""
    from python_multipart.multipart import parse_options_header

    boundary = parse_options_header(declared)[1].get(b"boundary")
    if not boundary:
        raise refuse(400, "multipart/form-data without a boundary")
    return _parts(request, boundary, refuse, max_parts)


async def _parts(
    request: Request, boundary: bytes, refuse: Callable[[int, str], Exception], max_parts: int
) -> AsyncIterator[tuple[str | None, AsyncIterator[bytes]]]:
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    events: list[tuple[str, Any]] = []
    part: dict[str, Any] = {"headers": {}, "field": b"", "value": b""}
    count = 0

    def header_field(data: bytes, start: int, end: int) -> None:
        part["field"] += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def header_end() -> None:
        part["headers"][part["field"].strip().lower()] = part["value"].strip()
        part["field"], part["value"] = b"", b""

    def headers_finished() -> None:
        nonlocal count
        kind, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        count += 1
        if kind != b"form-data" or name != "file" or count > max_parts:
            raise refuse(
                400,
                f"multipart upload: at most {max_parts} part(s), each named 'file' (got "
                f"{name!r}{' after another' if count > max_parts else ''})",
            )
        coding = part["headers"].get(b"content-transfer-encoding", b"binary").lower()
        if coding not in (b"binary", b"8bit", b"7bit"):  # never decoded here
            raise refuse(
                415,
                f"multipart upload: Content-Transfer-Encoding {coding.decode('latin-1')!r}:"
                " the part is sent as the file's own bytes",
            )
        filename = options.get(b"filename")
        try:
            events.append(("start", filename.decode() if filename else None))
        except UnicodeDecodeError:
            raise refuse(400, "multipart upload: a filename that is not UTF-8") from None

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
        """Feed the parser the next chunk; False once the body is over."""
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
                raise refuse(400, "a malformed multipart/form-data body") from None
            return bool(events)
        try:
            parser.write(chunk)
        except MultipartParseError:
            raise refuse(400, "a malformed multipart/form-data body") from None
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
                    raise refuse(400, "a malformed multipart/form-data body")
            if not await more():
                raise refuse(400, "a truncated multipart/form-data body")

    while True:
        while not events:
            if not await more():
                return
        kind, value = events.pop(0)
        if kind != "start":
            continue  # bytes outside a part (a preamble): dropped, as by any parser
        pieces = body_of()
        yield value, pieces
        async for _ in pieces:  # whatever the consumer left of this part
            pass


class Unauthorized(Exception):
    pass


class UnsupportedMedia(Exception):
    pass


class RequestTimeout(Exception):
    pass


class Forbidden(Exception):
    pass


class BadRequest(Exception):
    pass


def _handlers(app: FastAPI) -> None:
    """The service's own errors by their status here; every SandboxError by `WIRE`."""
    mapping: list[tuple[type[BaseException], int]] = [
        (Unauthorized, 401),
        (Forbidden, 403),
        (BadRequest, 400),
        (UnsupportedMedia, 415),
        (RequestTimeout, 408),
    ]
    for exc_type, status in mapping:
        app.add_exception_handler(exc_type, _handler(status))  # type: ignore[arg-type]

    @app.exception_handler(SandboxError)
    async def sandbox_error(request: Request, exc: SandboxError) -> JSONResponse:
        return JSONResponse({"error": _error_body(exc)}, status_code=wire(exc).status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "ValidationError", validation_text(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, "InternalError", "internal error (details are in the server's log)")


def validation_text(exc: RequestValidationError) -> str:
    """A malformed request's problems, one `where: what` each (any front end's message)."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts)


def _error_body(exc: SandboxError) -> dict[str, Any]:
    """An error's `{"type", "message"}` by its wire name; CodeRejected adds what was found,
    so the caller can change the code."""
    body: dict[str, Any] = {"type": wire(exc).name, "message": str(exc)}
    if isinstance(exc, CodeRejected):
        body["findings"] = [dataclasses.asdict(f) for f in exc.findings]
    return body


def _handler(status: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        kind = type(exc).__name__
        response = _error(status, kind, str(exc) if status != 401 else "missing or invalid API key")
        if status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    return handle


class BodyLimit:
    """413 for bodies over the limit: file uploads get their own, larger one. A declared
    length over it is refused before the body; a body without one (chunked) is refused
    when it passes the limit: the 413 is sent from here and the app sees the client gone
    (the app's own answer goes nowhere), so an upload stops and leaves no file."""

    def __init__(
        self,
        app: ASGIApp,
        default: int,
        upload: int,
        is_upload: Callable[[Scope], bool] = lambda scope: scope["method"] == "PUT",
        refuse: Refusal | None = None,
    ) -> None:
        self.app, self.default, self.upload = app, default, upload
        self.is_upload, self.refuse = is_upload, refuse or _answer_early

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload if self.is_upload(scope) else self.default
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self.refuse(send, 413, "TooLarge", f"body over {limit} bytes", ())
            return
        seen = 0
        started = answered = False

        async def counted() -> Message:
            nonlocal seen, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                if not started:
                    await self.refuse(send, 413, "TooLarge", f"body over {limit} bytes", ())
                answered = True
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return  # 413 was answered here; the app's answer goes nowhere
            started = True
            await send(message)

        await self.app(scope, counted, guarded_send)


class Refused(Exception):
    """What `Admission.identify` raises to answer a request at once with another error
    than 401 (a front end's own: an unknown sandbox, a key of the wrong kind)."""

    def __init__(self, status: int, message: str, kind: str = "Refused") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


AUDIT_DOWN = "the audit log cannot be reached (the service's log says why)"
_log = logging.getLogger("codecage.service")


class Admission:
    """In front of everything: the API key is checked from the headers before any body is
    read (401 at once), each tenant's requests in flight are capped (429 at once), and a
    request body that stops arriving, or a client that stops reading its answer, is cut
    off after `body_timeout_s`. Runs on the event loop: it never waits for a worker
    thread (the key is one indexed SQLite read)."""

    open_paths: frozenset[str] = OPEN_PATHS

    def __init__(self, app: ASGIApp, config: ServerConfig, state: dict[str, Any]) -> None:
        self.app, self.config, self.state = app, config, state
        self.in_flight: dict[str, int] = {}
        self.scrapes = 0

    def identify(self, scope: Scope) -> tuple[str, str, str] | None:
        """(tenant, role, key id) of the request's API key (`Authorization: Bearer`), from
        the headers alone; None: 401. A front end with other credentials overrides it."""
        headers = dict(scope.get("headers", []))
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        audit = self.state.get("audit")
        if audit and scheme.lower() == "bearer" and key:
            return audit.identity(key.strip())  # type: ignore[no-any-return]
        return None

    async def admitted(self, scope: Scope) -> None:
        """What a front end does once the request is admitted (its tenant's place in
        flight taken), before the app sees it; Refused answers it instead. Nothing here."""

    async def refuse(
        self,
        send: Send,
        status: int,
        kind: str,
        message: str,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """An answer before the body was read, in this front end's error format."""
        await _answer_early(send, status, kind, message, extra)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timeout = self.config.body_timeout_s
        answered = started = body_done = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return  # this middleware already answered; the app's answer goes nowhere
            started = True
            with anyio.fail_after(timeout):  # a client that stops reading is cut off
                await send(message)

        async def guarded_receive() -> Message:
            nonlocal body_done, answered
            if body_done:
                return await receive()
            try:
                with anyio.fail_after(timeout):
                    message = await receive()
            except TimeoutError:
                if not started:
                    answered = True
                    await self.refuse(send, 408, "Timeout", f"no body for {timeout:g} s")
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body"):
                body_done = True
            return message

        if scope["path"] in self.open_paths:
            if scope["path"] == "/metrics":  # open and served by a worker thread: a few at once
                if self.scrapes >= SCRAPES:
                    await self.refuse(send, 429, "QuotaExceeded", "too many scrapes at once")
                    return
                self.scrapes += 1
            try:
                await self.app(scope, guarded_receive, guarded_send)
            finally:
                if scope["path"] == "/metrics":
                    self.scrapes -= 1
            return
        try:
            audit = self.state.get("audit")
            if audit is not None and audit.db.local_dir is None:
                # A database server may take its time: never on the event loop.
                who = await anyio.to_thread.run_sync(self.identify, scope)
            else:
                who = self.identify(scope)
        except Refused as refused:
            await self.refuse(send, refused.status, refused.kind, refused.message)
            return
        except AuditUnavailable as exc:  # keys live in the audit log's database
            # Anyone may ask (no key is checked yet): the cause, with the database's
            # address and its driver's words, is for the service's log only.
            _log.warning("admission: %s", exc)
            await self.refuse(send, 503, "AuditUnavailable", AUDIT_DOWN)
            return
        if who is None:
            await self.refuse(
                send,
                401,
                "Unauthorized",
                "missing or invalid API key",
                ((b"www-authenticate", b"Bearer"),),
            )
            return
        tenant, cap = who[0], self.config.quotas.concurrent_requests
        if scope.get("method") == "DELETE":
            cap += DELETES_BEYOND_CAP
        if self.in_flight.get(tenant, 0) >= cap:
            await self.refuse(
                send, 429, "QuotaExceeded", f"more than {cap} requests in flight (quota)"
            )
            return
        scope.setdefault("state", {})["identity"] = who
        self.in_flight[tenant] = self.in_flight.get(tenant, 0) + 1
        try:
            try:
                await self.admitted(scope)
            except Refused as refused:
                await self.refuse(send, refused.status, refused.kind, refused.message)
                return
            await self.app(scope, guarded_receive, guarded_send)
        finally:
            self.in_flight[tenant] -= 1
            if not self.in_flight[tenant]:
                del self.in_flight[tenant]


Refusal = Callable[[Send, int, str, str, tuple[tuple[bytes, bytes], ...]], Awaitable[None]]


async def _answer_early(
    send: Send, status: int, kind: str, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """An error answered before the body was read: the connection closes after it."""
    await answer_early(send, status, {"error": {"type": kind, "message": message}}, extra)


async def answer_early(
    send: Send, status: int, payload: Any, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """A JSON answer sent before the body was read (any front end's error format)."""
    body = json.dumps(payload).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _protocol(header_timeout_s: float, max_connections: int) -> type:
    """uvicorn's httptools protocol, with a deadline for each request's headers: a client
    that opens a connection, or starts a request, and never finishes its headers is
    disconnected (uvicorn's own keep-alive timeout only covers idle connections). A
    connection beyond `max_connections` is closed at once, so idle ones cannot pile up
    descriptors (uvicorn alone keeps them and answers their requests 503); so is one with
    more than PIPELINED_MAX requests sent ahead of their answers, or with a request line and
    headers over HEAD_MAX_BYTES."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderDeadline(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _head_bytes = 0

        def data_received(self, data: bytes) -> None:
            within = self._deadline is not None  # a request's line and headers under way
            self._head_bytes = self._head_bytes + len(data) if within else 0
            super().data_received(data)
            if self._deadline is not None and self._head_bytes > HEAD_MAX_BYTES:
                # Still no end of the headers (the body after them is not counted). No key
                # is needed to send headers and uvicorn keeps them whole: a megabyte of
                # them on each of max_connections, held until the header deadline.
                self._disarm()
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(header_timeout_s, self._late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _late(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            if len(self.pipeline) >= PIPELINED_MAX:
                # uvicorn queues every pipelined request (and reads on after each answer),
                # so a client that sends without reading holds memory without bound, and
                # needs no key: its connection is closed (the raise stops the parsing of
                # what it already sent; uvicorn answers 400 and closes).
                self.transport.close()
                raise ConnectionAbortedError("too many pipelined requests")
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline


def check_machine(config: ServerConfig) -> None:
    """check_fits against this machine: CODECAGE_TOTAL_MEMORY_MB (else 80% of its memory)
    and the processes it allows."""
    memory = int(os.environ.get("CODECAGE_TOTAL_MEMORY_MB", 0)) or cgroups.default_total_mb()
    check_fits(config, memory, cgroups.default_total_pids())


def serve(config: ServerConfig) -> None:
    check_machine(config)
    run_server(create_app(config), config)


def run_server(app: ASGIApp, config: ServerConfig) -> None:
    """uvicorn serving `app` with the config's bounds (headers, connections, keep-alive)."""
    import uvicorn

    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level="warning",
        access_log=False,
        http=_protocol(config.header_timeout_s, config.max_connections),
        limit_concurrency=config.max_connections,
        timeout_keep_alive=config.keep_alive_s,
        timeout_graceful_shutdown=max(1, round(config.shutdown_grace_s)),
    )
