"""envd's `process.Process` Connect service (port 49983) on the sandbox's process manager
(docs/protocol.md, "Process channel") through the Manager: a process's start and its end
are audit records (`Manager.start_process`), the policy's command approval applies, and
nothing waits for a cell (the process manager is not the kernel).

`Start` and `Connect` stream a process's output as envd does: first `start{pid}`, then
`data` events (stdout, stderr or pty bytes, base64 in the JSON codec) polled every
POLL_MIN_S..POLL_MAX_S, keepalives when asked for, and `end{exitCode, exited, status,
error}` in Go's words (`exit status 1`, `signal: killed`, exit code -1 for a signal).
The stream's own deadline (Connect-Timeout-Ms: E2B's `timeout`, 60 s by default) also
bounds the process, as envd's does: it is killed when the deadline passes, whether or not
anyone still watches. A client that goes away leaves the process running.
Output the process manager's bounded buffer let go before it was read becomes a marker
on stderr (on the pty for a terminal).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from ..._errors import PolicyError, ProcessNotFound, SandboxError, SandboxNotFound
from ..._processes import USERS, Exit, PtySize, dropped_text, listing, signal_process
from ..._processes import read as read_output
from ..._sandbox import Sandbox
from . import SandboxAccess, sandbox_access
from .connect import (
    HEADER,
    MAX_MESSAGE,
    STREAM_TYPE,
    Call,
    ConnectError,
    Service,
    end_stream,
    envelope,
    error_response,
    field,
    from_sandbox_error,
    parse_message,
)

service = Service("process.Process")
POLL_MIN_S, POLL_MAX_S = 0.01, 0.05
MAX_ARGS = 4096
SIGNALS = {"SIGNAL_SIGKILL": signal.SIGKILL, "SIGNAL_SIGTERM": signal.SIGTERM, 9: 9, 15: 15}
# Go's names of the signals (os.ProcessState.String()), as envd's `status` says them.
GO_SIGNALS: dict[int, str] = {
    signal.SIGKILL: "killed",
    signal.SIGTERM: "terminated",
    signal.SIGINT: "interrupt",
    signal.SIGHUP: "hangup",
    signal.SIGPIPE: "broken pipe",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted",
    signal.SIGBUS: "bus error",
    signal.SIGFPE: "floating point exception",
    signal.SIGSYS: "bad system call",
    signal.SIGXCPU: "CPU time limit exceeded",
}
T = TypeVar("T")


async def _on(call: Call, op: Callable[[Sandbox], T]) -> T:
    """An operation on the call's sandbox's processes, off the event loop."""
    access = call.access
    try:
        return await run_in_threadpool(
            access.manager.on_process, access.tenant, access.sandbox_id, op
        )
    except ProcessNotFound as exc:
        raise ConnectError("not_found", str(exc)) from None


def _strings(value: object, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_ARGS:
        raise ConnectError("invalid_argument", f"{name}: a list of at most {MAX_ARGS} strings")
    return [field({"v": v}, "v", "str", "") for v in value]


def _envs(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_ARGS:
        raise ConnectError("invalid_argument", "envs: a map of strings")
    return {field({"k": k}, "k", "str"): field({"v": v}, "v", "str", "") for k, v in value.items()}


def _size(message: dict[str, Any]) -> PtySize:
    size = field(message, "size", "dict", {})
    rows, cols = field(size, "rows", "int", 0), field(size, "cols", "int", 0)
    if not (1 <= rows <= 4096 and 1 <= cols <= 4096):
        raise ConnectError("invalid_argument", "pty size: rows and cols between 1 and 4096")
    return PtySize(rows=rows, cols=cols)


async def _pid(call: Call, message: dict[str, Any]) -> int:
    """The process a `ProcessSelector` (`process: {pid}` or `{tag}`) names."""
    selector = field(message, "process", "dict", {})
    pid, tag = field(selector, "pid", "int"), field(selector, "tag", "str")
    if pid is not None:
        return int(pid)
    if tag is None:
        raise ConnectError("invalid_argument", "process: a pid or a tag")
    for info in await _on(call, lambda sbx: listing(sbx._proc_call)):
        if info.tag == tag:
            return info.pid
    raise ConnectError("not_found", f"process with tag {tag[:64]} not found")


def end_event(ended: Exit) -> dict[str, Any]:
    """envd's EndEvent: Go's ProcessState in its words."""
    if ended.signal is not None:
        name = GO_SIGNALS.get(ended.signal, f"signal {ended.signal}")
        status = f"signal: {name}"
        return {"exitCode": -1, "exited": False, "status": status, "error": status}
    code = ended.exit_code if ended.exit_code is not None else -1
    out: dict[str, Any] = {"exitCode": code, "exited": True, "status": f"exit status {code}"}
    if code != 0:
        out["error"] = out["status"]
    return out


async def _follow(
    call: Call, pid: int, offset: int | None, pty: bool
) -> AsyncIterator[dict[str, Any]]:
    """A process's output events from `offset` (None: from now on), then its end."""
    delay = POLL_MIN_S
    while True:
        try:
            chunks, offset, ended = await _on(
                call,
                lambda sbx, at=offset: read_output(sbx._proc_call, pid, at),  # type: ignore[misc]
            )
        except SandboxNotFound:
            # as E2B's proxy words it when a sandbox ends under a stream: the client then
            # asks the sandbox's health and says it was killed or reached its end of life
            sid = call.access.sandbox_id
            message = f"the connection to sandbox {sid} ended before the stream completed"
            raise ConnectError("unavailable", message) from None
        for chunk in chunks:
            if chunk.dropped:
                marker = dropped_text(chunk.dropped).encode()
                data = {"pty" if pty else "stderr": base64.b64encode(marker).decode()}
            else:
                data = {chunk.stream: base64.b64encode(chunk.data).decode()}
            yield {"event": {"data": data}}
        if ended is not None:
            yield {"event": {"end": end_event(ended)}}
            return
        delay = POLL_MIN_S if chunks else min(delay * 2, POLL_MAX_S)
        await asyncio.sleep(delay)


def _kill_at_deadline(
    call: Call, pid: int, cmd: str, args: list[str]
) -> asyncio.TimerHandle | None:
    """envd's process context: the request's timeout bounds the process itself. A timer
    of the event loop (no thread of its own waits for it: a client that starts many
    processes with long timeouts piles up no threads), cancelled once the process is seen
    to end; when it fires, it kills the pid only if that pid still runs the same command
    (a pid that ended and was used again is another process)."""
    if call.timeout_s is None:
        return None
    access = call.access

    def kill() -> None:
        def op(sbx: Sandbox) -> None:
            for info in listing(sbx._proc_call):
                if info.pid == pid and (info.cmd, info.args) == (cmd, args):
                    signal_process(sbx._proc_call, pid, signal.SIGKILL)

        with contextlib.suppress(SandboxError):  # gone with its sandbox or process manager
            access.manager.on_process(access.tenant, access.sandbox_id, op)

    loop = asyncio.get_running_loop()
    return loop.call_later(call.timeout_s, lambda: loop.run_in_executor(None, kill))


@service.stream("Start", keepalive={"event": {"keepalive": {}}})
async def start(call: Call, message: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    process = field(message, "process", "dict")
    if process is None:
        raise ConnectError("invalid_argument", "process: the command to start")
    cmd = field(process, "cmd", "str", "")
    if not cmd:
        raise ConnectError("invalid_argument", "process.cmd: a command")
    args = _strings(process.get("args"), "process.args")
    envs = _envs(process.get("envs"))
    cwd = field(process, "cwd", "str") or None
    tag = field(message, "tag", "str")
    pty_message = field(message, "pty", "dict")
    size = None if pty_message is None else _size(pty_message)
    stdin = field(message, "stdin", "bool", True)  # envd's default, for older clients
    user = call.access.user
    if user not in USERS:
        raise ConnectError("invalid_argument", f"user {user[:64]!r}: only 'user' and 'root' exist")
    access = call.access
    try:
        pid = await run_in_threadpool(
            access.manager.start_process,
            access.tenant,
            access.sandbox_id,
            cmd,
            args,
            envs=envs,
            cwd=cwd,
            tag=tag,
            pty=size,
            stdin=bool(stdin),
            user=user,
        )
    except PolicyError as exc:
        raise ConnectError("invalid_argument", str(exc)) from None
    deadline = _kill_at_deadline(call, pid, cmd, args)
    yield {"event": {"start": {"pid": pid}}}
    async for event in _follow(call, pid, 0, size is not None):
        if deadline is not None and "end" in event["event"]:
            deadline.cancel()  # a client that went away leaves it for the deadline
        yield event


@service.stream("Connect", keepalive={"event": {"keepalive": {}}})
async def connect(call: Call, message: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    pid = await _pid(call, message)
    infos = await _on(call, lambda sbx: listing(sbx._proc_call))
    running = next((p for p in infos if p.pid == pid), None)
    # an ended one the process manager still holds: its start and its end, as envd's
    # retained exits (read raises not_found for one it never had)
    await _on(call, lambda sbx: read_output(sbx._proc_call, pid, None))
    yield {"event": {"start": {"pid": pid}}}
    pty = running is not None and running.pty is not None
    async for event in _follow(call, pid, None, pty):
        yield event


@service.unary("List")
async def list_processes(call: Call, message: dict[str, Any]) -> dict[str, Any]:
    infos = await _on(call, lambda sbx: listing(sbx._proc_call))
    out = []
    for p in infos:
        config: dict[str, Any] = {"cmd": p.cmd, "args": p.args, "envs": p.envs}
        if p.cwd is not None:
            config["cwd"] = p.cwd
        item: dict[str, Any] = {"config": config, "pid": p.pid}
        if p.tag is not None:
            item["tag"] = p.tag
        out.append(item)
    return {"processes": out}


def _input(message: dict[str, Any]) -> bytes:
    given = field(message, "input", "dict", {})
    raw = given.get("pty", given.get("stdin"))
    if not isinstance(raw, str):
        raise ConnectError("invalid_argument", "input: stdin or pty bytes")
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        raise ConnectError("invalid_argument", "input: base64 bytes") from None


@service.unary("SendInput")
async def send_input(call: Call, message: dict[str, Any]) -> dict[str, Any]:
    pid, data = await _pid(call, message), _input(message)
    await _send(call, pid, data)
    return {}


async def _send(call: Call, pid: int, data: bytes) -> None:
    try:
        await _on(call, lambda sbx: sbx.commands.send_stdin(pid, data))
    except PolicyError as exc:  # no stdin (closed, or started without one)
        raise ConnectError("failed_precondition", str(exc)) from None


@service.unary("SendSignal")
async def send_signal(call: Call, message: dict[str, Any]) -> dict[str, Any]:
    pid = await _pid(call, message)
    sig = SIGNALS.get(field(message, "signal", "enum", 0))
    if sig is None:
        raise ConnectError("invalid_argument", "signal: SIGNAL_SIGKILL or SIGNAL_SIGTERM")
    if not await _on(call, lambda sbx: signal_process(sbx._proc_call, pid, sig)):
        raise ConnectError("not_found", f"process with pid {pid} not found")
    return {}


@service.unary("CloseStdin")
async def close_stdin(call: Call, message: dict[str, Any]) -> dict[str, Any]:
    pid = await _pid(call, message)
    try:
        await _on(call, lambda sbx: sbx.commands.close_stdin(pid))
    except PolicyError as exc:
        raise ConnectError("failed_precondition", str(exc)) from None
    return {}


@service.unary("Update")
async def update(call: Call, message: dict[str, Any]) -> dict[str, Any]:
    pid = await _pid(call, message)
    pty = field(message, "pty", "dict")
    if pty is not None:
        size = _size(pty)
        try:
            await _on(call, lambda sbx: sbx.pty.resize(pid, size))
        except PolicyError as exc:
            raise ConnectError("failed_precondition", str(exc)) from None
    return {}


# -- StreamInput: the one client stream (a body of envelopes, read as they arrive) --------


async def _messages(request: Request) -> AsyncIterator[dict[str, Any]]:
    """A client stream's messages, each envelope parsed as soon as it is whole."""
    held = bytearray()
    async for piece in request.stream():
        held += piece
        while len(held) >= HEADER.size:
            flags, length = HEADER.unpack_from(held)
            if flags != 0:
                raise ConnectError("invalid_argument", f"a malformed envelope: flags {flags:#x}")
            if length > MAX_MESSAGE:
                raise ConnectError("resource_exhausted", f"a message over {MAX_MESSAGE} bytes")
            if len(held) < HEADER.size + length:
                break
            data = bytes(held[HEADER.size : HEADER.size + length])
            del held[: HEADER.size + length]
            yield parse_message(data)
    if held:
        raise ConnectError("invalid_argument", "a malformed envelope: the body ends inside one")


async def _stream_input(call: Call) -> None:
    pid: int | None = None
    async for message in _messages(call.request):
        if "start" in message:
            if pid is not None:
                raise ConnectError("invalid_argument", "a second start event")
            pid = await _pid(call, field(message, "start", "dict", {}))
        elif "data" in message:
            if pid is None:
                raise ConnectError("invalid_argument", "data before the start event")
            await _send(call, pid, _input(field(message, "data", "dict", {})))
        elif "keepalive" not in message:
            raise ConnectError("invalid_argument", "an event that is not start, data or keepalive")
    if pid is None:
        raise ConnectError("invalid_argument", "no start event")


router = APIRouter()
ACCESS = Depends(sandbox_access)


@router.post("/process.Process/StreamInput", include_in_schema=False)
async def stream_input(request: Request, access: SandboxAccess = ACCESS) -> Response:
    """Input as the client streams it, to the process's stdin or pty; one empty reply."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != STREAM_TYPE:
        err = ConnectError(
            "invalid_argument", f"Content-Type {media or 'none'!r}: a stream is {STREAM_TYPE}"
        )
        return error_response(err, 415)
    try:
        await _stream_input(Call(access, request, None, None))
    except ConnectError as err:
        return Response(end_stream(err), media_type=STREAM_TYPE)
    except SandboxError as exc:
        return Response(
            end_stream(from_sandbox_error(exc, access.sandbox_id)), media_type=STREAM_TYPE
        )
    return Response(envelope({}) + end_stream(), media_type=STREAM_TYPE)


router.include_router(service.router())
