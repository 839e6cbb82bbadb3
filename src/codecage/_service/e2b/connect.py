"""Connect-RPC over JSON, the server side of what E2B's envd speaks (the Connect protocol:
unary calls as `application/json`, server streams as `application/connect+json` envelopes).

A `Service` holds a service's methods; `Service.router()` serves them under
`/<package.Service>/<Method>`. A unary method is `async (call, message) -> reply`; a
server-streaming one `(call, message) -> AsyncIterator[reply]`; messages are the JSON form of
the protobuf messages (lowerCamelCase names; `field()` also takes the proto name, as
protobuf's JSON parsers do). Errors are `ConnectError(code, message)`: a unary call answers
the Connect error JSON with the code's HTTP status; a stream ends with it in its
end-of-stream message. Everything the client sends is bounded and checked: a malformed
envelope, a compressed message, a wrong content type or a body that is not a JSON object is
a Connect error, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from ..._errors import (
    ApprovalDenied,
    AuditUnavailable,
    ExecutionTimeout,
    FileNotFoundInSandbox,
    PolicyError,
    QuotaExceeded,
    SandboxBusy,
    SandboxError,
    SandboxNotFound,
    TransportError,
)
from ..._text import has_lone_surrogate
from .errors import NOT_FOUND

if TYPE_CHECKING:
    from . import SandboxAccess

# Connect's codes and the HTTP status of each in a unary answer.
CODES: dict[str, int] = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}
UNARY_TYPE = "application/json"
STREAM_TYPE = "application/connect+json"
MAX_MESSAGE = 1 << 20  # a request message (the BodyLimit middleware caps the body as well)
COMPRESSED, END_STREAM = 0x01, 0x02
HEADER = struct.Struct(">BI")  # an envelope: flags, then the length, big-endian
KEEPALIVE_HEADER = "keepalive-ping-interval"  # seconds, as E2B's clients ask for them
KEEPALIVE_MIN_S = 1.0


class ConnectError(Exception):
    def __init__(self, code: str, message: str) -> None:
        if code not in CODES:
            raise ValueError(f"not a Connect code: {code!r}")
        super().__init__(message)
        self.code, self.message = code, message

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def error_response(err: ConnectError, status: int | None = None) -> JSONResponse:
    """A unary call's error: the Connect error JSON with the code's status."""
    return JSONResponse(err.to_json(), status_code=status or CODES[err.code])


def from_sandbox_error(exc: SandboxError, sandbox_id: str = "") -> ConnectError:
    """The Connect error for a codecage error. A sandbox that has ended is `unavailable`
    with the proxy's "was not found", which E2B's clients read as "not running"."""
    message = str(exc)
    table: list[tuple[type[SandboxError], str]] = [
        (SandboxNotFound, "unavailable"),
        (FileNotFoundInSandbox, "not_found"),
        (PolicyError, "invalid_argument"),  # CodeRejected too
        (ApprovalDenied, "permission_denied"),
        (QuotaExceeded, "resource_exhausted"),
        (SandboxBusy, "resource_exhausted"),
        (AuditUnavailable, "unavailable"),
        (ExecutionTimeout, "deadline_exceeded"),
        (TransportError, "internal"),
    ]
    for cls, code in table:
        if isinstance(exc, cls):
            if cls is SandboxNotFound:
                message = f"{NOT_FOUND.format(sandbox_id)}: {exc}"
            return ConnectError(code, message)
    return ConnectError("unknown", message)


# -- messages and envelopes ------------------------------------------------------------------


def envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(flags, len(data)) + data


def end_stream(err: ConnectError | None = None) -> bytes:
    return envelope({"error": err.to_json()} if err else {}, END_STREAM)


def parse_message(data: bytes) -> dict[str, Any]:
    """A request message: a JSON object, valid UTF-8, within MAX_MESSAGE."""
    if len(data) > MAX_MESSAGE:
        raise ConnectError("resource_exhausted", f"a message over {MAX_MESSAGE} bytes")
    if not data.strip():
        return {}  # protobuf's JSON form of a message with every field at its default
    try:
        message = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ConnectError("invalid_argument", "the message is not valid JSON") from None
    if not isinstance(message, dict):
        raise ConnectError("invalid_argument", "the message is not a JSON object")
    return message


def parse_envelope(data: bytes) -> dict[str, Any]:
    """A server stream's request: exactly one uncompressed envelope, nothing after it."""
    if len(data) < HEADER.size:
        raise ConnectError("invalid_argument", "a malformed envelope: shorter than its header")
    flags, length = HEADER.unpack_from(data)
    if flags & COMPRESSED:
        raise ConnectError("internal", "a compressed message, but no compression was agreed")
    if flags != 0:
        raise ConnectError("invalid_argument", f"a malformed envelope: flags {flags:#x}")
    if length > MAX_MESSAGE:
        raise ConnectError("resource_exhausted", f"a message over {MAX_MESSAGE} bytes")
    if len(data) != HEADER.size + length:
        raise ConnectError("invalid_argument", "a malformed envelope: its length is not the body's")
    return parse_message(data[HEADER.size :])


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


_KINDS: dict[str, tuple[type, ...]] = {"str": (str,), "bool": (bool,), "dict": (dict,)}


def field(message: dict[str, Any], name: str, kind: str, default: Any = None) -> Any:
    """A field of a request message by its proto name (`watcher_id`) or its JSON name
    (`watcherId`), checked: "str", "bool", "dict", "int" (a number or, as protobuf writes
    64-bit ones, a decimal string; at least 0), or "enum" (a name or a number)."""
    value = message.get(_camel(name), message.get(name))
    if value is None:
        return default
    if kind == "int":
        if isinstance(value, str) and value.isdigit() and len(value) < 20:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise ConnectError("invalid_argument", f"{name}: a non-negative integer expected")
        return value
    if kind == "enum":
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ConnectError("invalid_argument", f"{name}: an enum name or number expected")
        return value
    if not isinstance(value, _KINDS[kind]) or (kind == "str" and has_lone_surrogate(value)):
        raise ConnectError("invalid_argument", f"{name}: a {kind} expected")
    return value


# -- calls and services ------------------------------------------------------------------


@dataclass
class Call:
    """One RPC: the sandbox it is for (authenticated), its request, and what it asked."""

    access: SandboxAccess
    request: Request
    timeout_s: float | None  # Connect-Timeout-Ms
    keepalive_s: float | None  # Keepalive-Ping-Interval (streams)


Unary = Callable[[Call, dict[str, Any]], Awaitable[dict[str, Any]]]
Streaming = Callable[[Call, dict[str, Any]], AsyncIterator[dict[str, Any]]]


@dataclass
class _Stream:
    handler: Streaming
    keepalive: dict[str, Any] | None  # the message a quiet stream sends now and then


class Service:
    """A Connect service's methods: `@svc.unary("Stat")`, `@svc.stream("WatchDir")`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.unaries: dict[str, Unary] = {}
        self.streams: dict[str, _Stream] = {}

    def unary(self, method: str) -> Callable[[Unary], Unary]:
        def register(handler: Unary) -> Unary:
            self.unaries[method] = handler
            return handler

        return register

    def stream(
        self, method: str, keepalive: dict[str, Any] | None = None
    ) -> Callable[[Streaming], Streaming]:
        def register(handler: Streaming) -> Streaming:
            self.streams[method] = _Stream(handler, keepalive)
            return handler

        return register

    def router(self) -> APIRouter:
        from . import sandbox_access

        router = APIRouter()
        access_dependency = Depends(sandbox_access)

        @router.post(f"/{self.name}/{{method}}", include_in_schema=False)
        async def rpc(
            method: str, request: Request, access: SandboxAccess = access_dependency
        ) -> Response:
            if method in self.unaries:
                return await _unary(self.unaries[method], access, request)
            if method in self.streams:
                return await _streaming(self.streams[method], access, request)
            return error_response(
                ConnectError("unimplemented", f"no method {self.name}/{method}"), 404
            )

        return router


def unknown_procedure() -> APIRouter:
    """The fallback for `/<service>/<method>` that no Service serves (registered last)."""
    router = APIRouter()

    @router.post("/{service}/{method}", include_in_schema=False)
    async def unknown(service: str, method: str) -> Response:
        return error_response(ConnectError("unimplemented", f"no method {service}/{method}"), 404)

    return router


def _media(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _check_encoding(request: Request) -> None:
    for header in ("content-encoding", "connect-content-encoding"):
        coding = request.headers.get(header, "identity").strip().lower()
        if coding not in ("", "identity"):
            raise ConnectError("unimplemented", f"{header} {coding!r}: only identity is served")


def _timeout(request: Request) -> float | None:
    raw = request.headers.get("connect-timeout-ms")
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 10:
        raise ConnectError("invalid_argument", "Connect-Timeout-Ms: at most 10 digits expected")
    return int(raw) / 1000


def _keepalive(request: Request) -> float | None:
    raw = request.headers.get(KEEPALIVE_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        return None
    return max(KEEPALIVE_MIN_S, seconds) if seconds > 0 else None


async def _read(request: Request) -> bytes:
    held = bytearray()
    async for chunk in request.stream():
        held += chunk
        if len(held) > MAX_MESSAGE + HEADER.size:
            raise ConnectError("resource_exhausted", f"a message over {MAX_MESSAGE} bytes")
    return bytes(held)


async def _unary(handler: Unary, access: SandboxAccess, request: Request) -> Response:
    try:
        if _media(request) != UNARY_TYPE:
            raise ConnectError(
                "invalid_argument",
                f"Content-Type {_media(request) or 'none'!r}: this server speaks {UNARY_TYPE}",
            )
        _check_encoding(request)
        call = Call(access, request, _timeout(request), None)
        message = parse_message(await _read(request))
        if call.timeout_s is not None:
            async with asyncio.timeout(call.timeout_s):
                reply = await handler(call, message)
        else:
            reply = await handler(call, message)
    except ConnectError as err:
        return error_response(err, 415 if "Content-Type" in err.message else None)
    except SandboxError as exc:
        return error_response(from_sandbox_error(exc, access.sandbox_id))
    except TimeoutError:
        return error_response(ConnectError("deadline_exceeded", "the call's deadline passed"))
    return JSONResponse(reply)


async def _streaming(method: _Stream, access: SandboxAccess, request: Request) -> Response:
    """A server stream: 200 at once, then one envelope per reply (keepalives when quiet)
    and the end-of-stream envelope, with the error if the call failed."""
    try:
        if _media(request) != STREAM_TYPE:
            raise ConnectError(
                "invalid_argument",
                f"Content-Type {_media(request) or 'none'!r}: a stream is {STREAM_TYPE}",
            )
        _check_encoding(request)
        call = Call(access, request, _timeout(request), _keepalive(request))
        message = parse_envelope(await _read(request))
    except ConnectError as err:
        status = 415 if "Content-Type" in err.message else 200
        if status == 415:
            return error_response(err, 415)
        return StreamingResponse(_once(end_stream(err)), media_type=STREAM_TYPE)
    replies = method.handler(call, message)
    frames = _frames(replies, call, method.keepalive, access.sandbox_id)
    return StreamingResponse(frames, media_type=STREAM_TYPE)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _frames(
    replies: AsyncIterator[dict[str, Any]],
    call: Call,
    keepalive: dict[str, Any] | None,
    sandbox_id: str,
) -> AsyncIterator[bytes]:
    """The replies as envelopes, a keepalive whenever none came for the interval, and the
    end of the stream. The replies are pumped by a task of their own, so a keepalive never
    cancels a reply half made; a client that goes away cancels the task."""
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=64)

    async def pump() -> None:
        try:
            async for reply in replies:
                await queue.put(("reply", reply))
            await queue.put(("end", None))
        except ConnectError as err:
            await queue.put(("end", err))
        except SandboxError as exc:
            await queue.put(("end", from_sandbox_error(exc, sandbox_id)))
        except asyncio.CancelledError:
            raise
        except Exception:
            await queue.put(("end", ConnectError("internal", "internal error")))

    task = asyncio.create_task(pump())
    interval = call.keepalive_s if keepalive is not None else None
    loop = asyncio.get_running_loop()
    deadline = None if call.timeout_s is None else loop.time() + call.timeout_s
    try:
        while True:
            wait = interval
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    yield end_stream(ConnectError("deadline_exceeded", "the deadline passed"))
                    return
                wait = left if wait is None else min(wait, left)
            try:
                kind, value = await asyncio.wait_for(queue.get(), wait)
            except TimeoutError:
                if keepalive is not None and (deadline is None or loop.time() < deadline):
                    yield envelope(keepalive)
                continue
            if kind == "reply":
                yield envelope(value)
            else:
                yield end_stream(value)
                return
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        aclose = getattr(replies, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
