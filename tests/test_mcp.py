"""`codecage mcp` end to end, driven by the official MCP SDK's own client over both
transports: the server runs as a real subprocess (`.venv/bin/codecage mcp`) with real
sandboxes. The server's sandboxes belong to its process, not to this one, so each test
checks by the server's cgroup owner that it killed every sandbox it started."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import httpx
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, EmbeddedResource, ImageContent, TextContent

from codecage._jail import cgroups

from .conftest import free_port, sandbox_processes, stop_process

pytestmark = pytest.mark.requires_root

CODECAGE = str(Path(sys.executable).with_name("codecage"))
POLICY = ["--set", "timeout_s=10", "--set", "interrupt_grace_s=0.5"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOOLS = {"run_python_code", "upload_file", "download_file", "list_files", "reset_session"}


# -- the server's sandboxes, seen from the host -----------------------------------------------


def owner_of(pid: int) -> str:
    """The cgroup owner name of a process (see cgroups.owner_name)."""
    return cgroups.owner_name(pid)


def mcp_server_pids() -> list[int]:
    """This process's children that are a `codecage mcp` server."""
    me, found = str(os.getpid()), []
    for entry in Path("/proc").iterdir():
        try:
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if ppid == me and CODECAGE.encode() in cmdline and b"mcp" in cmdline:
            found.append(int(entry.name))
    return found


def live_sandboxes(owner: str) -> list[str]:
    """Sandbox cgroups of a server process (one directory per sandbox)."""
    base = cgroups.ROOT / "memory" / "codecage"
    return [str(d) for jail in base.glob(f"{owner}-*") for d in jail.iterdir() if d.is_dir()]


def assert_all_killed(owner: str) -> None:
    deadline = time.monotonic() + 5
    while live_sandboxes(owner) or sandbox_processes(owner):
        assert time.monotonic() < deadline, (live_sandboxes(owner), sandbox_processes(owner))
        time.sleep(0.05)


# -- helpers for tool results ------------------------------------------------------------------


def text(result: CallToolResult) -> str:
    first = result.content[0]
    assert isinstance(first, TextContent), result
    return first.text


def report(result: CallToolResult) -> dict[str, Any]:
    """run_python_code's JSON report."""
    data: dict[str, Any] = json.loads(text(result))
    return data


async def run(client: ClientSession, code: str, **args: Any) -> CallToolResult:
    return await client.call_tool("run_python_code", {"code": code, **args})


# -- stdio --------------------------------------------------------------------------------------


@asynccontextmanager
async def stdio_session(log: IO[str], *extra: str) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command=CODECAGE, args=["mcp", *POLICY, *extra])
    async with stdio_client(params, errlog=log) as (read, write), ClientSession(read, write) as s:
        await s.initialize()
        yield s


def over_stdio(
    tmp_path: Path, scenario: Callable[[ClientSession], Awaitable[None]], *extra: str
) -> None:
    """Run a scenario against a fresh `codecage mcp` over stdio; afterwards, every sandbox
    the server started must be dead."""
    owners: list[str] = []

    async def main() -> None:
        with open(tmp_path / "server.log", "w") as log:
            async with stdio_session(log, *extra) as session:
                await session.list_tools()
                (pid,) = mcp_server_pids()
                owners.append(owner_of(pid))
                await scenario(session)

    anyio.run(main)
    assert_all_killed(owners[0])


def test_stdio_lists_the_five_tools_with_schemas(tmp_path: Path) -> None:
    async def scenario(session: ClientSession) -> None:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        assert set(tools) == TOOLS
        code = tools["run_python_code"].input_schema
        assert code["required"] == ["code"] and code["properties"]["code"]["type"] == "string"
        assert {"timeout", "session"} <= set(code["properties"])
        upload = tools["upload_file"].input_schema
        assert upload["properties"]["encoding"]["enum"] == ["text", "base64"]
        assert tools["list_files"].input_schema["properties"]["path"]["default"] == "/home/user"
        assert all(tool.description for tool in tools.values())

    over_stdio(tmp_path, scenario)


def test_stdio_state_persists_until_reset(tmp_path: Path) -> None:
    async def scenario(session: ClientSession) -> None:
        first = await run(session, "x = 20\nprint('set')")
        assert report(first) == {"stdout": "set\n"} and not first.is_error
        second = await run(session, "x * 2 + 2")
        assert report(second)["result"] == "42" and not second.is_error
        # a named session is another sandbox
        other = await run(session, "x", session="other")
        assert other.is_error and "NameError" in report(other)["error"]
        reset = await session.call_tool("reset_session", {})
        assert "killed" in text(reset)
        gone = await run(session, "x")
        assert gone.is_error and "NameError" in report(gone)["error"]
        again = await session.call_tool("reset_session", {"session": "never-used"})
        assert "nothing to reset" in text(again)

    over_stdio(tmp_path, scenario)


def test_stdio_chart_comes_back_as_png_image(tmp_path: Path) -> None:
    async def scenario(session: ClientSession) -> None:
        result = await run(
            session,
            "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2]); plt.show()\n"
            "plt.figure(); plt.bar(['a'], [1]);",
        )
        assert not result.is_error
        images = [c for c in result.content if isinstance(c, ImageContent)]
        assert len(images) == 2 and all(i.mime_type == "image/png" for i in images)
        for image in images:
            assert base64.b64decode(image.data, validate=True).startswith(PNG_MAGIC)
        assert "status" not in report(result)

    over_stdio(tmp_path, scenario)


def test_stdio_upload_run_download_list(tmp_path: Path) -> None:
    async def scenario(session: ClientSession) -> None:
        up = await session.call_tool(
            "upload_file", {"path": "data/in.csv", "content": "a,b\n1,2\n3,4\n"}
        )
        assert text(up) == "wrote 12 bytes to /home/user/data/in.csv" and not up.is_error
        blob = bytes(range(256))
        raw = {"path": "/tmp/raw.bin", "content": base64.b64encode(blob).decode()}
        await session.call_tool("upload_file", {**raw, "encoding": "base64"})
        ran = await run(
            session,
            "import pandas as pd\ndf = pd.read_csv('data/in.csv')\n"
            "df.assign(c=df.a + df.b).to_csv('out.csv', index=False)\n"
            "open('/tmp/raw.bin', 'rb').read() == bytes(range(256))",
        )
        assert report(ran)["result"] == "True", report(ran)
        down = await session.call_tool("download_file", {"path": "out.csv"})
        assert text(down) == "a,b,c\n1,2,3\n3,4,7\n" and not down.is_error
        binary = await session.call_tool("download_file", {"path": "/tmp/raw.bin"})
        resource = binary.content[1]
        assert isinstance(resource, EmbeddedResource)
        assert base64.b64decode(getattr(resource.resource, "blob", "")) == blob
        await run(session, "import matplotlib.pyplot as plt; plt.plot([1]); plt.savefig('p.png')")
        png = await session.call_tool("download_file", {"path": "/home/user/p.png"})
        image = png.content[1]
        assert isinstance(image, ImageContent) and image.mime_type == "image/png"
        assert base64.b64decode(image.data).startswith(PNG_MAGIC)
        listed = json.loads(text(await session.call_tool("list_files", {})))
        names = {(e["name"], e["type"]) for e in listed}
        assert names == {("data", "dir"), ("out.csv", "file"), ("p.png", "file")}
        sub = json.loads(text(await session.call_tool("list_files", {"path": "data"})))
        assert sub == [
            {"name": "in.csv", "path": "/home/user/data/in.csv", "type": "file", "size": 12}
        ]

    over_stdio(tmp_path, scenario)


def test_stdio_file_errors_are_readable(tmp_path: Path) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host only")
    assert secret.read_text() == "host only"  # the control: the host reads it

    async def scenario(session: ClientSession) -> None:
        for path in (str(secret), "../../.." + str(secret)):
            for tool in ("download_file", "list_files"):
                leak = await session.call_tool(tool, {"path": path})
                assert leak.is_error and "no such file" in text(leak), text(leak)
        missing = await session.call_tool("download_file", {"path": "nope.txt"})
        assert missing.is_error and "no such file" in text(missing)
        folder = await session.call_tool("download_file", {"path": "/home/user"})
        assert folder.is_error and "directory" in text(folder)
        await run(session, "open('big.bin', 'wb').write(b'x' * (9 << 20))")
        big = await session.call_tool("download_file", {"path": "big.bin"})
        assert big.is_error and "more than download_file's 8388608" in text(big)
        listing = await session.call_tool("list_files", {"path": "/no/such/dir"})
        assert listing.is_error and "no such file" in text(listing)
        bad = await session.call_tool(
            "upload_file", {"path": "x", "content": "%%%", "encoding": "base64"}
        )
        assert bad.is_error and "not valid base64" in text(bad)

    over_stdio(tmp_path, scenario)


def test_stdio_limits_are_readable_results_and_the_session_goes_on(tmp_path: Path) -> None:
    async def scenario(session: ClientSession) -> None:
        await run(session, "kept = 'still here'")
        slow = await run(session, "import time\nprint('start')\ntime.sleep(60)", timeout=1)
        out = report(slow)
        assert slow.is_error and out["stdout"] == "start\n"
        assert "timeout" in out["status"] and "KeyboardInterrupt" in out["error"]
        assert report(await run(session, "kept"))["result"] == "'still here'"
        hog = await run(session, "x = b'x' * (2 << 30)")
        out = report(hog)
        assert hog.is_error and "memory_limit" in out["status"] and "restarted" in out["status"]
        assert report(await run(session, "1 + 1"))["result"] == "2"

    over_stdio(tmp_path, scenario)


def test_stdio_a_session_whose_sandbox_ended_says_its_state_is_gone(tmp_path: Path) -> None:
    async def scenario(session: ClientSession) -> None:
        await run(session, "x = 1")
        await anyio.sleep(2.5)  # idle_timeout_s=1: the watchdog ends the sandbox
        result = await run(session, "x")
        out = report(result)
        assert result.is_error and "NameError" in out["error"]
        assert "earlier sandbox had ended" in out["status"]
        assert "status" not in report(await run(session, "x = 2"))

    over_stdio(tmp_path, scenario, "--set", "idle_timeout_s=1")


def test_stdio_wrong_arguments_are_tool_errors(tmp_path: Path) -> None:
    async def scenario(session: ClientSession) -> None:
        for name, args, why in [
            ("run_python_code", {"code": 123}, "valid string"),
            ("run_python_code", {}, "Field required"),
            ("run_python_code", {"code": "1", "timeout": -1}, "greater than 0"),
            ("run_python_code", {"code": "1", "session": ""}, "at least 1 character"),
            ("upload_file", {"path": "a", "content": "b", "encoding": "hex"}, "'text' or 'base64'"),
            ("download_file", {"path": ["a"]}, "valid string"),
        ]:
            result = await session.call_tool(name, args)
            assert result.is_error and why in text(result), (name, args, text(result))
        assert report(await run(session, "'fine'"))["result"] == "'fine'"

    over_stdio(tmp_path, scenario)


def test_stdio_garbage_gets_a_protocol_error_and_the_server_stays_up(tmp_path: Path) -> None:
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(
            [CODECAGE, "mcp", *POLICY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
        )
    assert server.stdin and server.stdout
    owner = owner_of(server.pid)

    def send(line: str | dict[str, Any]) -> dict[str, Any]:
        assert server.stdin and server.stdout
        data = line if isinstance(line, str) else json.dumps(line)
        server.stdin.write(data.encode() + b"\n")
        server.stdin.flush()
        if isinstance(line, dict) and "id" not in line:
            return {}  # a notification has no answer
        answer: dict[str, Any] = json.loads(server.stdout.readline())
        return answer

    try:
        assert send("this is not JSON {")["error"]["code"] == -32700
        assert send("\xff\x00\x01 binary noise")["error"]["code"] == -32700
        assert send("[1, 2, 3]")["error"] == {
            "code": -32600,
            "message": "Invalid Request: not a JSON-RPC message",
        }
        answer = send({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": 5})
        assert answer["id"] == 7 and answer["error"]["code"] == -32600
        hello = {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"},
        }
        init = send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello})
        assert init["result"]["serverInfo"]["name"] == "codecage"
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert send({"jsonrpc": "2.0", "id": 2, "method": "no/such"})["error"]["code"] == -32601
        assert send("{oops")["error"]["code"] == -32700
        call = {"name": "run_python_code", "arguments": {"code": "6 * 7"}}
        result = send({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": call})
        assert json.loads(result["result"]["content"][0]["text"])["result"] == "42"
        assert len(live_sandboxes(owner)) == 1  # the control for the check below
    finally:
        server.stdin.close()
        assert server.wait(timeout=30) == 0
        server.stdout.close()
    assert_all_killed(owner)


def test_stdio_sigterm_kills_the_sandboxes(tmp_path: Path) -> None:
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(
            [CODECAGE, "mcp", *POLICY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
        )
    assert server.stdin and server.stdout
    owner = owner_of(server.pid)
    hello = {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"},
    }
    call = {"name": "run_python_code", "arguments": {"code": "1", "session": "a"}}
    lines = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call},
        {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {**call, "arguments": {"code": "1", "session": "b"}},
        },
    ]
    try:
        server.stdin.write(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        server.stdin.flush()
        answers = [json.loads(server.stdout.readline()) for _ in range(3)]
        assert sorted(a["id"] for a in answers) == [1, 2, 3]
        assert len(live_sandboxes(owner)) == 2
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == -signal.SIGTERM
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdin.close()
        server.stdout.close()
    assert_all_killed(owner)


# -- streamable HTTP ----------------------------------------------------------------------------


@dataclass
class HttpServer:
    url: str
    process: subprocess.Popen[bytes]
    owner: str
    log: Path


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    log = tmp_path_factory.mktemp("mcp") / "server.log"
    port = free_port()
    with open(log, "wb") as out:  # a file, not a pipe nobody reads
        process = subprocess.Popen(
            [
                CODECAGE,
                "mcp",
                "--transport",
                "http",
                "--port",
                str(port),
                "--max-sandboxes",
                "10",
                *POLICY,
            ],
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    server = HttpServer(f"http://127.0.0.1:{port}/mcp", process, owner_of(process.pid), log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            try:  # any answer at all means the server is listening
                httpx.get(server.url, timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield server
    finally:
        stop_process(process)
    assert_all_killed(server.owner)


@pytest.fixture
def http(http_server: HttpServer) -> Iterator[HttpServer]:
    """The shared server; when the test's sessions have ended, none of its sandboxes is left."""
    assert_all_killed(http_server.owner)
    yield http_server
    assert_all_killed(http_server.owner)


@asynccontextmanager
async def http_session(server: HttpServer) -> AsyncIterator[ClientSession]:
    async with streamable_http_client(server.url) as (read, write), ClientSession(read, write) as s:
        await s.initialize()
        yield s


def test_http_session_keeps_state_and_returns_charts(http: HttpServer) -> None:
    async def main() -> None:
        async with http_session(http) as session:
            tools = {tool.name for tool in (await session.list_tools()).tools}
            assert tools == TOOLS
            await run(session, "import numpy as np\nx = np.arange(10)")
            result = await run(
                session, "import matplotlib.pyplot as plt\nplt.plot(x, x ** 2)\nint(x.sum())"
            )
            assert report(result)["result"] == "45" and not result.is_error
            (image,) = [c for c in result.content if isinstance(c, ImageContent)]
            assert base64.b64decode(image.data).startswith(PNG_MAGIC)
            up = await session.call_tool("upload_file", {"path": "n.txt", "content": "7"})
            assert not up.is_error
            read = await run(session, "int(open('n.txt').read()) * 6")
            assert report(read)["result"] == "42"
            slow = await run(session, "import time; time.sleep(30)", timeout=0.5)
            assert slow.is_error and "timeout" in report(slow)["status"]

    anyio.run(main)


def test_http_sessions_are_isolated_and_killed_when_they_end(http: HttpServer) -> None:
    owner = http.owner

    async def main() -> None:
        async with http_session(http) as alice, http_session(http) as bob:
            await run(alice, "secret = 'alice'")
            await alice.call_tool("upload_file", {"path": "mine.txt", "content": "alice"})
            peek = await run(bob, "secret")
            assert peek.is_error and "NameError" in report(peek)["error"]
            files = await bob.call_tool("list_files", {})
            assert json.loads(text(files)) == []
            assert report(await run(alice, "secret"))["result"] == "'alice'"
            assert len(live_sandboxes(owner)) == 2
            # a session name is per connection: bob's "default" is not alice's
            same_name = await run(bob, "secret", session="default")
            assert same_name.is_error

    anyio.run(main)
    # both clients sent DELETE on the way out: the `http` fixture sees their sandboxes gone


def test_http_sandboxes_are_capped_per_connection_and_in_all(http: HttpServer) -> None:
    async def main() -> None:
        async with http_session(http) as session, http_session(http) as other:
            for n in range(8):
                assert not (await run(session, "1", session=f"s{n}")).is_error
            ninth = await run(session, "1", session="s8")
            assert ninth.is_error and "already has 8 sessions" in text(ninth)
            await session.call_tool("reset_session", {"session": "s0"})
            assert not (await run(session, "1", session="s8")).is_error
            # the server was started with --max-sandboxes 10
            assert not (await run(other, "1", session="a")).is_error
            assert not (await run(other, "1", session="b")).is_error
            full = await run(other, "1", session="c")
            assert full.is_error and "maximum of 10 sandboxes" in text(full)
            assert not (await run(other, "'b still works'", session="b")).is_error

    anyio.run(main)


def test_http_garbage_gets_a_protocol_error_and_the_server_stays_up(
    http: HttpServer,
) -> None:
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    for body, code in [(b"garbage{", -32700), (b"\xff\xfe\x00", -32700), (b"[1, 2]", -32602)]:
        answer = httpx.post(http.url, content=body, headers=headers, timeout=10)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == code
    stranger = httpx.post(
        http.url,
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={**headers, "mcp-session-id": "not-a-session"},
        timeout=10,
    )
    assert stranger.status_code == 404

    async def main() -> None:
        async with http_session(http) as session:
            assert report(await run(session, "6 * 7"))["result"] == "42"

    anyio.run(main)


def sse_json(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC message in a streamable HTTP answer (an SSE stream or plain JSON)."""
    if response.headers["content-type"].startswith("application/json"):
        return dict(response.json())
    data = [line[5:] for line in response.text.splitlines() if line.startswith("data:")]
    return dict(json.loads(data[-1]))


def test_http_garbage_in_a_live_session_and_sigterm_kills_its_sandboxes(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    with open(tmp_path / "server.log", "wb") as log:
        process = subprocess.Popen(
            [CODECAGE, "mcp", "--transport", "http", "--port", str(port), *POLICY],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    owner = owner_of(process.pid)
    headers = {"accept": "application/json, text/event-stream"}
    hello = {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"},
    }
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline
            try:
                init = httpx.post(
                    url,
                    headers=headers,
                    timeout=5,
                    json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello},
                )
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert sse_json(init)["result"]["serverInfo"]["name"] == "codecage"
        headers["mcp-session-id"] = init.headers["mcp-session-id"]
        httpx.post(
            url,
            headers=headers,
            timeout=5,
            json={"jsonrpc": "2.0", "method": "notifications/initialized"},
        )
        for n, name in enumerate(["a", "b"]):
            call = {"name": "run_python_code", "arguments": {"code": "x = 1", "session": name}}
            answer = httpx.post(
                url,
                headers=headers,
                timeout=30,
                json={"jsonrpc": "2.0", "id": 2 + n, "method": "tools/call", "params": call},
            )
            assert sse_json(answer)["result"]["isError"] is False
        # garbage inside the live session: a protocol error, and the session goes on
        bad = httpx.post(url, headers=headers, timeout=5, content=b"{not json")
        assert bad.status_code == 400 and "Content-Type" in bad.text
        as_json = {**headers, "content-type": "application/json"}
        bad = httpx.post(url, headers=as_json, timeout=5, content=b"{not json")
        assert bad.status_code == 400 and bad.json()["error"]["code"] == -32700
        call = {"name": "run_python_code", "arguments": {"code": "x + 41", "session": "a"}}
        answer = httpx.post(
            url,
            headers=headers,
            timeout=30,
            json={"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": call},
        )
        assert json.loads(sse_json(answer)["result"]["content"][0]["text"])["result"] == "42"
        assert len(live_sandboxes(owner)) == 2  # the session is still open
        process.send_signal(signal.SIGTERM)  # uvicorn shuts down, then dies of the signal
        assert process.wait(timeout=30) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert_all_killed(owner)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "nope=1"], "unknown policy field 'nope'"),
        (["--set", "memory_mb=-5"], "memory_mb"),
        (["--max-sandboxes", "0"], "--max-sandboxes must be at least 1"),
    ],
)
def test_cli_refuses_a_bad_configuration(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [CODECAGE, "mcp", *args], input="", capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
