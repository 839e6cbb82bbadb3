"""The code interpreter on a sandbox's port 49999, as E2B's code-interpreter SDK speaks it.

- `POST /execute` `{code, context_id, language, env_vars}`: NDJSON lines, each
  `{"type": ...}`: `stdout`/`stderr` (`text`, `timestamp`), `result` (the MIME bundle as
  E2B's fields: `text`, `html`, `png`, ..., `chart`, `data`, `extra`, `is_main_result`),
  `error` (`name`, `value`, `traceback`), `number_of_executions`, `keepalive` every few
  seconds of silence, and `end_of_execution` last. The run is codecage's: the Manager's
  queue, the static analysis, the audit records, approvals (a `pending_approval` line while
  one waits) and the policy's limits. A client that goes away interrupts the run (as E2B's
  server does), so the next one is not stuck behind it.
- `/contexts`: `POST` `{cwd, language}` creates a code context, `GET` lists them, `POST
  /contexts/{id}/restart` empties one, `DELETE /contexts/{id}` removes one.

Languages are python and bash; another is a 400 naming them. A sandbox that ends during a
run (killed, its lifetime over) breaks the stream off, as E2B's does: the SDK then asks the
control plane and says the sandbox was killed.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from ..._errors import ContextNotFound, SandboxError, SandboxNotFound, UnsupportedLanguage
from ..._models import Execution
from ..._sandbox import Context, Sandbox, check_language
from ..._text import has_lone_surrogate
from . import SandboxAccess, sandbox_access
from .errors import E2BError

router = APIRouter()
ACCESS = Depends(sandbox_access)
NDJSON = "application/x-ndjson"
KEEPALIVE_S = 5.0
MAX_ENV_VARS = 256

# A result's MIME types as E2B's Result fields; the rest goes to `extra`.
FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "application/vnd.codecage.data+json": "data",
    "application/vnd.codecage.chart+json": "chart",
}
OBJECTS = frozenset({"json", "data", "chart"})  # fields that are JSON objects, not text


class ExecuteBody(BaseModel):
    code: str = Field(max_length=16 << 20)
    context_id: str | None = Field(None, max_length=64)
    language: str | None = Field(None, max_length=64)
    env_vars: dict[str, str] | None = None


class ContextBody(BaseModel):
    cwd: str | None = Field(None, max_length=4096)
    language: str | None = Field(None, max_length=64)


def _text_ok(*values: str | None) -> None:
    for value in values:
        if value is not None and has_lone_surrogate(value):
            raise E2BError(400, "text must be valid Unicode (no lone surrogates)")


def _stamp() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def result_line(data: object, is_main: bool) -> dict[str, Any] | None:
    """A kernel's MIME bundle (already checked by the host) as E2B's result line."""
    if not isinstance(data, dict):
        return None
    line: dict[str, Any] = {"type": "result", "is_main_result": bool(is_main)}
    extra: dict[str, Any] = {}
    for mime, value in data.items():
        name = FIELDS.get(str(mime))
        if name is None:
            extra[str(mime)] = value
        elif name in OBJECTS:
            if name == "json" or isinstance(value, dict):
                line[name] = value
        elif isinstance(value, str):
            line[name] = value
    text = line.get("text")
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        line["text"] = text[1:-1]  # E2B shows a string result without its quotes
    if extra:
        line["extra"] = extra
    return line


def event_line(event: dict[str, Any]) -> dict[str, Any] | None:
    """One of the run's events (the host's checked frames) as E2B's NDJSON line."""
    ev = event.get("ev")
    if ev in ("stdout", "stderr") and isinstance(event.get("text"), str):
        return {"type": ev, "text": event["text"], "timestamp": _stamp()}
    if ev == "result":
        return result_line(event.get("data"), bool(event.get("is_main_result")))
    if ev == "error":
        return {
            "type": "error",
            "name": str(event.get("name", "Error")),
            "value": str(event.get("value", "")),
            "traceback": str(event.get("traceback", "")),
        }
    if ev == "end" and isinstance(event.get("execution_count"), int):
        return {"type": "number_of_executions", "execution_count": event["execution_count"]}
    if ev == "pending_approval":  # codecage's own: the run waits for a person
        return {"type": "pending_approval", "approval": event.get("approval")}
    return None


def _error_line(name: str, value: str) -> dict[str, Any]:
    return {"type": "error", "name": name, "value": value, "traceback": ""}


class _Aborted(Exception):
    """The sandbox ended during the run: the stream is broken off, not finished."""


@router.post("/execute")
async def execute(body: ExecuteBody, access: SandboxAccess = ACCESS) -> StreamingResponse:
    _text_ok(body.code, body.context_id, body.language, *(body.env_vars or {}).values())
    if body.context_id and body.language:
        raise E2BError(400, "Only one of context_id or language can be provided")
    envs = dict(body.env_vars or {})
    if len(envs) > MAX_ENV_VARS or any(not k or "\0" in k or "=" in k for k in envs):
        raise E2BError(400, "env_vars: names must be non-empty, without '=' or NUL")
    try:
        language = check_language(body.language)
    except UnsupportedLanguage as exc:
        raise E2BError(400, str(exc)) from None
    manager, tenant, sandbox_id = access.manager, access.tenant, access.sandbox_id
    context = body.context_id or None
    if context == "default":
        context = None
    run_language = None if context is not None else language

    def begin() -> Any:
        if context is not None:
            known = {c.id for c in manager.get(tenant, sandbox_id).sandbox.list_code_contexts()}
            if context not in known:
                raise ContextNotFound(f"Context {context} not found")
        return manager.start_execute(
            tenant, sandbox_id, body.code, context=context, language=run_language
        )

    try:
        started = await run_in_threadpool(begin)
    except ContextNotFound as exc:
        raise E2BError(404, str(exc)) from None
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[tuple[str, bytes, int] | None] = asyncio.Queue()
    policy = started.entry.sandbox.policy if started.entry is not None else None
    held = _Held(HELD_BYTES + (policy.results_bytes if policy is not None else 0))
    streamed_error = False

    def on_event(event: dict[str, Any]) -> None:
        line = event_line(event)
        if line is None:
            return
        data = _json(line)
        size = len(data) + LINE_OVERHEAD
        output = line["type"] in ("stdout", "stderr")
        gap = held.take(size, output, str(line.get("text", "")).count("\n") if output else 0)
        if gap is None:
            return  # dropped: the client is that far behind
        if gap:  # where the dropped lines were, in order
            note = _json({"type": "stderr", "text": dropped_note(*gap), "timestamp": _stamp()})
            loop.call_soon_threadsafe(lines.put_nowait, ("stderr", note, 0))
        loop.call_soon_threadsafe(lines.put_nowait, (str(line["type"]), data, size))

    def work() -> Execution:
        return manager.carry_out(
            started, envs, on_event, None, context=context, language=run_language
        )

    task = loop.run_in_executor(None, work)
    task.add_done_callback(lambda _: loop.call_soon_threadsafe(lines.put_nowait, None))
    sandbox = started.entry.sandbox if started.entry is not None else None

    async def stream() -> AsyncIterator[bytes]:
        nonlocal streamed_error
        finished = False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(lines.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield b'{"type": "keepalive"}\n'
                    continue
                if item is None:
                    gap = held.take(0)  # dropped at the end, after the last line queued
                    if gap:
                        text = dropped_note(*gap)
                        note = {"type": "stderr", "text": text, "timestamp": _stamp()}
                        yield _json(note)
                    break
                kind, data, size = item
                held.give(size)
                streamed_error |= kind == "error"
                yield data
            for line in _closing(task, streamed_error):
                yield _json(line)
            finished = True
            yield b'{"type": "end_of_execution"}\n'
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled request still cleans up
                if not finished and not task.done() and sandbox is not None:
                    await run_in_threadpool(_interrupt, sandbox)  # the client went away
                await asyncio.wait([task])

    return _Breakable(stream(), media_type=NDJSON)


class _Breakable(StreamingResponse):
    """A stream that a sandbox's end breaks off: the response is left incomplete, so the
    server closes the connection without the last chunk (the client sees a broken read)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except* _Aborted:
            pass


# What a run's stream holds for a client that reads slower than the run writes (or not at
# all): the lines' bytes plus LINE_OVERHEAD for each (what a queued line costs the host),
# at most HELD_BYTES + the policy's results_bytes (twice that for lines other than
# output). Lines past it are dropped, and the stream says how many on stderr where they were. A cell's output is bounded by
# output_bytes, but a line each character is many small lines.
HELD_BYTES = 16 << 20
LINE_OVERHEAD = 512


def dropped_note(events: int, lines: int) -> str:
    """What the stream says where `events` were dropped, holding `lines` line ends (a line
    cut between events counts where its end was)."""
    what = f"{lines} lines" if lines else "part of a line"
    return f"\n[codecage: {what} of output dropped: the client read them too slowly]\n"


class _Held:
    """The bytes a run's stream holds, from the run's thread and the event loop."""

    def __init__(self, limit: int) -> None:
        self.limit, self.size, self.dropped, self.lines = limit, 0, 0, 0
        self._lock = threading.Lock()

    def take(self, size: int, output: bool = True, lines: int = 0) -> tuple[int, ...] | None:
        """Room for `size` more (an event holding `lines` line ends): None if there is none
        (the event is dropped), else the events and line ends dropped since the last one
        that had room, or () if none was. Output (stdout, stderr) has `limit`; the other
        lines (results, errors, the count of executions: bounded by the results budget, or
        one a run) have twice that, so they outlast the output."""
        with self._lock:
            if self.size + size > self.limit * (1 if output else 2):
                self.dropped += 1
                self.lines += lines
                return None
            self.size += size
            gap = (self.dropped, self.lines) if self.dropped else ()
            self.dropped = self.lines = 0
            return gap

    def give(self, size: int) -> None:
        with self._lock:
            self.size -= size


def _interrupt(sandbox: Sandbox) -> None:
    if sandbox.busy and sandbox.alive:
        sandbox._jailed.interrupt()


def _closing(task: asyncio.Future[Execution], streamed_error: bool) -> list[dict[str, Any]]:
    """What the run's outcome adds after its events: the host's verdict (a limit, a kernel
    that died) as the error, or codecage's refusal; a sandbox that ended breaks the stream."""
    try:
        ex = task.result()
    except SandboxNotFound:
        raise _Aborted from None  # uvicorn closes the connection without the last chunk
    except SandboxError as exc:
        return [_error_line(type(exc).__name__, str(exc))]
    if ex.error is not None and (not streamed_error or ex.killed_by or ex.state_lost):
        return [_error_line(ex.error.name, ex.error.value)]
    return []


def _json(line: dict[str, Any]) -> bytes:
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"


# -- contexts -----------------------------------------------------------------------------------


def _context_json(context: Context) -> dict[str, str]:
    return {"id": context.id, "language": context.language, "cwd": context.cwd}


async def _on_sandbox(access: SandboxAccess, what: str, op: Callable[[Sandbox], Any]) -> Any:
    try:
        return await run_in_threadpool(
            access.manager.code_context, access.tenant, access.sandbox_id, what, op
        )
    except ContextNotFound as exc:
        raise E2BError(404, str(exc)) from None
    except UnsupportedLanguage as exc:
        raise E2BError(400, str(exc)) from None


@router.post("/contexts")
async def create_context(body: ContextBody, access: SandboxAccess = ACCESS) -> JSONResponse:
    _text_ok(body.cwd, body.language)
    if body.cwd is not None and "\0" in body.cwd:
        raise E2BError(400, "cwd: a path without NUL bytes")
    language = body.language
    what = f"create_code_context(language={language!r}, cwd={body.cwd!r})"
    made = await _on_sandbox(
        access, what, lambda s: s.create_code_context(cwd=body.cwd, language=language)
    )
    return JSONResponse(_context_json(made))


@router.get("/contexts")
async def list_contexts(access: SandboxAccess = ACCESS) -> JSONResponse:
    found = await _on_sandbox(access, "list_code_contexts()", lambda s: s.list_code_contexts())
    return JSONResponse([_context_json(c) for c in found])


def _context_id(context_id: str) -> str:
    if not context_id or len(context_id) > 64 or has_lone_surrogate(context_id):
        raise E2BError(404, f"Context {context_id[:64]} not found")
    return context_id


@router.post("/contexts/{context_id}/restart")
async def restart_context(context_id: str, access: SandboxAccess = ACCESS) -> JSONResponse:
    cid = _context_id(context_id)
    await _on_sandbox(
        access, f"restart_code_context({cid!r})", lambda s: s.restart_code_context(cid)
    )
    return JSONResponse(None)


@router.delete("/contexts/{context_id}")
async def remove_context(context_id: str, access: SandboxAccess = ACCESS) -> JSONResponse:
    cid = _context_id(context_id)
    await _on_sandbox(access, f"remove_code_context({cid!r})", lambda s: s.remove_code_context(cid))
    return JSONResponse(None)


@router.get("/health")
async def health(access: SandboxAccess = ACCESS) -> JSONResponse:
    return JSONResponse("OK")
