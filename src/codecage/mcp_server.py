"""The MCP server (`codecage mcp`): codecage sandboxes as tools for any MCP client, over
stdio or streamable HTTP, built on the official `mcp` SDK.

    from codecage.mcp_server import build_server, serve
    serve(Policy(timeout_s=10), "stdio")          # what `codecage mcp` runs
    app = build_server(Policy()).streamable_http_app()   # or mount the server yourself

Tools: `run_python_code`, `upload_file`, `download_file`, `list_files`, `reset_session`.
Sessions: each MCP connection (stdio: the process's pipe; streamable HTTP: one
`Mcp-Session-Id`) gets its own sandboxes, created on first use and killed by
`reset_session`, when the connection ends, and when the server stops. Every tool takes an
optional `session` name so that one client can keep a few separate sandboxes.

A run's text is `codecage.tools.render`'s JSON (the code's output and codecage's status
kept apart); charts come back as MCP image content. Failures of the code and limits it hit
are tool results (`isError`), never protocol errors; a message that is not JSON-RPC gets a
JSON-RPC error and the connection goes on.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import quote

import anyio
import anyio.to_thread
from mcp.server.connection import Connection
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage
from mcp.types import (
    INVALID_REQUEST,
    PARSE_ERROR,
    BlobResourceContents,
    CallToolResult,
    ContentBlock,
    EmbeddedResource,
    ErrorData,
    ImageContent,
    JSONRPCError,
    TextContent,
)
from pydantic import Field, ValidationError

from ._errors import FileNotFoundInSandbox, SandboxError, wire
from ._models import Execution
from ._policy import Policy
from ._sandbox import Sandbox
from .tools import render

MAX_FILE_BYTES = 8 << 20  # per upload or download: a tool result travels whole in one message
MAX_SESSIONS = 8  # named sessions per connection: each is a live sandbox
MAX_SANDBOXES = 64  # live sandboxes of the whole server (`codecage mcp --max-sandboxes`)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

T = TypeVar("T")
SessionName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        description="which of this connection's sandboxes to use (each name is its own sandbox)",
    ),
]


class Sessions:
    """Live sandboxes of one server, keyed by (connection, session name). Thread-safe: the
    tools run sandbox calls in worker threads."""

    def __init__(self, policy: Policy | None = None, max_sandboxes: int = MAX_SANDBOXES) -> None:
        self.policy = policy or Policy()
        self.max_sandboxes = max_sandboxes
        self._live: dict[tuple[int, str], Sandbox] = {}
        self._lock = threading.Lock()

    def get(self, connection: int, name: str) -> tuple[Sandbox, bool]:
        """The session's sandbox, created if there is none; True if it replaces one that
        ended (idle or CPU budget), whose state is therefore gone."""
        with self._lock:
            sandbox = self._live.get((connection, name))
            if sandbox is not None and sandbox.alive:
                return sandbox, False
            names = {n for c, n in self._live if c == connection} - {name}
            if len(names) >= MAX_SESSIONS:
                raise ToolError(
                    f"this connection already has {MAX_SESSIONS} sessions "
                    f"({', '.join(sorted(names))}): reset one first"
                )
            if sandbox is None and len(self._live) >= self.max_sandboxes:
                raise ToolError(
                    f"the server already runs its maximum of {self.max_sandboxes} sandboxes: "
                    "try again later"
                )
            fresh = Sandbox(self.policy)
            self._live[(connection, name)] = fresh
        if sandbox is not None:
            sandbox.kill()
        return fresh, sandbox is not None

    def find(self, connection: int, name: str) -> Sandbox | None:
        with self._lock:
            return self._live.get((connection, name))

    def reset(self, connection: int, name: str) -> bool:
        with self._lock:
            sandbox = self._live.pop((connection, name), None)
        if sandbox is not None:
            sandbox.kill()
        return sandbox is not None

    def close_connection(self, connection: int) -> None:
        with self._lock:
            keys = [key for key in self._live if key[0] == connection]
            ended = [self._live.pop(key) for key in keys]
        for sandbox in ended:
            sandbox.kill()

    def close(self) -> None:
        with self._lock:
            ended, self._live = list(self._live.values()), {}
        for sandbox in ended:
            sandbox.kill()

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)


_connection_ids = itertools.count(1)


def _connection(ctx: Context) -> Connection:
    # mcp 2.3 gives a tool no public path to its Connection, whose `exit_stack` is the SDK's
    # documented per-connection teardown; the request's ServerSession holds it.
    connection: Connection = ctx.request_context.session._connection
    return connection


def _connection_id(ctx: Context, sessions: Sessions) -> int:
    """A number for the caller's connection; the first time, its sandboxes are set to be
    killed when it ends (stdio EOF, HTTP DELETE, idle expiry, server shutdown)."""
    connection = _connection(ctx)
    number = connection.state.get("codecage")
    if not isinstance(number, int):
        number = next(_connection_ids)
        connection.state["codecage"] = number
        connection.exit_stack.push_async_callback(
            partial(anyio.to_thread.run_sync, sessions.close_connection, number)
        )
    return number


async def _in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Sandbox calls block (a run can last its whole timeout): keep them off the event loop,
    and turn system errors into tool errors the model can read."""
    try:
        return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs))
    except SandboxError as exc:  # worded as `WIRE` says (a missing file says so)
        raise ToolError(wire(exc).tool_text.format(exc)) from None


def run_result(ex: Execution, replaced: bool = False) -> CallToolResult:
    """An Execution as MCP content: render()'s JSON text, then one image per chart."""
    out = render(ex)
    text = out.text
    if replaced:  # render() knows nothing of the session; add ours to its status
        report = json.loads(text)
        note = "the session's earlier sandbox had ended (idle or CPU budget): state is gone"
        report["status"] = "; ".join(filter(None, [report.get("status"), note]))
        text = json.dumps(report, ensure_ascii=False)
    content: list[ContentBlock] = [TextContent(type="text", text=text)]
    content += [ImageContent(type="image", data=png, mime_type="image/png") for png in out.images]
    return CallToolResult(content=content, is_error=out.is_error)


def file_content(path: str, data: bytes) -> list[ContentBlock]:
    """PNG as an image, UTF-8 as text, anything else as a base64 embedded resource."""
    if data.startswith(PNG_MAGIC):
        image = base64.b64encode(data).decode()
        return [
            TextContent(type="text", text=f"{path}: PNG image, {len(data)} bytes"),
            ImageContent(type="image", data=image, mime_type="image/png"),
        ]
    try:
        return [TextContent(type="text", text=data.decode("utf-8"))]
    except UnicodeDecodeError:
        blob = BlobResourceContents(
            uri=f"file://{quote(path)}",
            mime_type="application/octet-stream",
            blob=base64.b64encode(data).decode(),
        )
        return [
            TextContent(type="text", text=f"{path}: binary, {len(data)} bytes (base64 resource)"),
            EmbeddedResource(type="resource", resource=blob),
        ]


def _download(sbx: Sandbox, path: str) -> tuple[str, bytes]:
    stat = sbx.files._op("stat", path)
    if not stat.get("exists"):
        raise FileNotFoundInSandbox(path)
    full, size = str(stat.get("path", path)), stat.get("size")
    if stat.get("type") == "dir":
        raise SandboxError(f"{full} is a directory: use list_files")
    if not isinstance(size, int) or size > MAX_FILE_BYTES:
        raise SandboxError(f"{full} is {size} bytes, more than download_file's {MAX_FILE_BYTES}")
    data = sbx.files.read(path)
    if len(data) > MAX_FILE_BYTES:  # the kernel's stat is its own claim: check what came
        raise SandboxError(f"{full} is more than download_file's {MAX_FILE_BYTES} bytes")
    return full, data


def build_server(policy: Policy | None = None, sessions: Sessions | None = None) -> MCPServer:
    """An MCPServer with codecage's five tools; every sandbox uses `policy`. Its sandboxes
    are killed when their connection ends and when the server stops."""
    sessions = Sessions(policy) if sessions is None else sessions

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[dict[str, Any]]:
        try:
            yield {}
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(sessions.close)

    server: MCPServer = MCPServer(
        "codecage",
        instructions=(
            "Run Python in isolated sandboxes (no network, limited memory and time). State "
            "persists per session; files live in /home/user."
        ),
        log_level="WARNING",
        lifespan=lifespan,
    )

    @server.tool()
    async def run_python_code(
        ctx: Context,
        code: Annotated[str, Field(description="Python code to run")],
        timeout: Annotated[
            float | None,
            Field(gt=0, description="seconds before the run is interrupted (at most the limit)"),
        ] = None,
        session: SessionName = "default",
    ) -> CallToolResult:
        """Run Python code in a persistent, isolated sandbox (no network, limited memory and
        time). Variables, imports and files persist between calls of the same session.
        numpy, pandas, matplotlib, seaborn, scipy and scikit-learn are installed. The value
        of the last expression is returned; figures come back as images."""
        sbx, replaced = await _in_thread(sessions.get, _connection_id(ctx, sessions), session)
        ex = await _in_thread(sbx.run_code, code, timeout=timeout)
        return run_result(ex, replaced)

    @server.tool()
    async def upload_file(
        ctx: Context,
        path: Annotated[str, Field(description="relative paths are under /home/user")],
        content: str,
        encoding: Literal["text", "base64"] = "text",
        session: SessionName = "default",
    ) -> str:
        """Write a file into the session's sandbox (parent directories are created)."""
        if encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise ToolError("content is not valid base64") from None
        else:
            data = content.encode()
        if len(data) > MAX_FILE_BYTES:
            raise ToolError(f"{len(data)} bytes is more than upload_file's {MAX_FILE_BYTES}")
        sbx, _ = await _in_thread(sessions.get, _connection_id(ctx, sessions), session)
        entry = await _in_thread(sbx.files.write, path, data)
        return f"wrote {entry.size} bytes to {entry.path}"

    @server.tool()
    async def download_file(
        ctx: Context,
        path: Annotated[str, Field(description="relative paths are under /home/user")],
        session: SessionName = "default",
    ) -> CallToolResult:
        """Read a file from the session's sandbox: UTF-8 text as text, a PNG as an image,
        anything else as a base64 resource (at most 8 MiB)."""
        sbx, _ = await _in_thread(sessions.get, _connection_id(ctx, sessions), session)
        full, data = await _in_thread(_download, sbx, path)
        return CallToolResult(content=file_content(full, data))

    @server.tool()
    async def list_files(
        ctx: Context,
        path: Annotated[str, Field(description="a directory in the sandbox")] = "/home/user",
        session: SessionName = "default",
    ) -> str:
        """List a directory of the session's sandbox: JSON entries (name, path, type, size)."""
        sbx, _ = await _in_thread(sessions.get, _connection_id(ctx, sessions), session)
        entries = await _in_thread(sbx.files.list, path)
        return json.dumps(  # the four fields a model needs, not the whole entry info
            [{"name": e.name, "path": e.path, "type": e.type, "size": e.size} for e in entries]
        )

    @server.tool()
    async def reset_session(ctx: Context, session: SessionName = "default") -> str:
        """Kill the session's sandbox: variables and files are gone; the next call starts a
        fresh one."""
        killed = await _in_thread(sessions.reset, _connection_id(ctx, sessions), session)
        return f"session {session!r} " + (
            "reset: its sandbox was killed" if killed else "had no sandbox: nothing to reset"
        )

    return server


def _protocol_error(exc: Exception) -> SessionMessage:
    """JSON-RPC's answer to a line that is not JSON (parse error) or not a message."""
    bad_json = isinstance(exc, ValidationError) and any(
        e["type"] == "json_invalid" for e in exc.errors()
    )
    error = (
        ErrorData(code=PARSE_ERROR, message="Parse error: the line is not valid JSON")
        if bad_json
        else ErrorData(code=INVALID_REQUEST, message="Invalid Request: not a JSON-RPC message")
    )
    return SessionMessage(JSONRPCError(jsonrpc="2.0", id=_request_id(exc), error=error))


def _request_id(exc: Exception) -> str | int | None:
    """The id of a request that parsed as JSON but is not a valid message, if it has one."""
    for error in exc.errors() if isinstance(exc, ValidationError) else []:
        message = error.get("input")
        if isinstance(message, dict) and isinstance(message.get("id"), (str, int)):
            return message["id"] if not isinstance(message["id"], bool) else None
    return None


async def serve_stdio(server: MCPServer) -> None:
    """MCPServer.run_stdio_async, except that a line that is not JSON-RPC is answered with a
    JSON-RPC error (the SDK's stdio transport drops it without a word)."""
    lowlevel = server._lowlevel_server  # no public handle in mcp 2.3
    async with stdio_server() as (wire_in, wire_out):
        send, receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)

        async def pump() -> None:
            async with send:
                async for item in wire_in:
                    if isinstance(item, Exception):
                        await wire_out.send(_protocol_error(item))
                    else:
                        await send.send(item)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            await lowlevel.run(receive, wire_out, lowlevel.create_initialization_options())
            tg.cancel_scope.cancel()


def serve(
    policy: Policy,
    transport: Literal["stdio", "http"] = "stdio",
    host: str = "127.0.0.1",
    port: int = 8765,
    max_sandboxes: int = MAX_SANDBOXES,
) -> None:
    """Run until stdin closes or a signal comes; every sandbox is killed on the way out."""
    sessions = Sessions(policy, max_sandboxes)
    server = build_server(policy, sessions)
    try:
        if transport == "stdio":
            anyio.run(_stdio_until_signal, server, sessions)
        else:
            server.run("streamable-http", host=host, port=port)
    finally:
        sessions.close()


async def _stdio_until_signal(server: MCPServer, sessions: Sessions) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_die_of_signals, sessions)
        await serve_stdio(server)
        tg.cancel_scope.cancel()


async def _die_of_signals(sessions: Sessions) -> None:
    """SIGTERM, SIGINT or SIGHUP to the stdio server: kill the sandboxes, then die of the
    signal. Unwinding instead would wait for ever for the SDK's thread blocked on stdin."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            await anyio.to_thread.run_sync(sessions.close)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
