"""Generated input against every E2B route of a real `codecage serve` on loopback (docs/e2b.md):
the control plane (`/sandboxes`, `/v2/sandboxes`), envd (`/health`, `/files`, the Connect
services `filesystem.Filesystem` and `process.Process`, unary and streaming) and the code
interpreter (`/execute`, `/contexts`), reached by the `E2b-Sandbox-Id` / `E2b-Sandbox-Port`
headers. Hypothesis draws methods, paths, query strings, headers, bodies and Connect
envelopes; every answer must be a 4xx (or a success) in E2B's error shape, never a server
error: REST errors are `{"code": <status>, "message": str}`, Connect errors Connect's error
JSON, `/execute` an NDJSON stream or a 4xx. The only 5xx allowed are the ones E2B itself
answers: 502 "... was not found" / "port is not open" (its proxy), 501 for what is not served,
and Connect's `unimplemented` / `deadline_exceeded`. The examples are bounded and derandomized
(the same inputs every run; `CODECAGE_FUZZ_EXAMPLES` sets how many). Positive controls: the same checks pass on well-formed calls
that succeed (`test_the_checks_accept_good_calls`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import Service
from .e2b_server import kill_all

pytestmark = [pytest.mark.requires_root, pytest.mark.slow]

ENVD, INTERPRETER = "49983", "49999"
HEADER = struct.Struct(">BI")
END_STREAM = 0x02
CONNECT_CODES = {
    "canceled", "unknown", "invalid_argument", "deadline_exceeded", "not_found",
    "already_exists", "permission_denied", "resource_exhausted", "failed_precondition",
    "aborted", "out_of_range", "unimplemented", "internal", "unavailable", "data_loss",
    "unauthenticated",
}  # fmt: skip
# Connect codes that say the server failed, not the request.
SERVER_FAULTS = {"unknown", "internal", "unavailable", "data_loss"}
FILESYSTEM = ["Stat", "MakeDir", "Move", "ListDir", "Remove", "WatchDir", "CreateWatcher"]
FILESYSTEM += ["GetWatcherEvents", "RemoveWatcher", "NoSuchMethod"]
PROCESS = ["Start", "Connect", "List", "SendInput", "SendSignal", "CloseStdin", "Update"]
PROCESS += ["StreamInput", "NoSuchMethod"]
STREAMS = {"WatchDir", "Start", "Connect"}
# CODECAGE_FUZZ_EXAMPLES=1000 for a longer hunt; the default keeps the module under a minute.
FUZZ = settings(
    max_examples=int(os.environ.get("CODECAGE_FUZZ_EXAMPLES", "100")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Target:
    """A live sandbox created through E2B's API, and the service it lives on."""

    service: Service
    sandbox_id: str
    token: str

    @property
    def key(self) -> str:
        return self.service.keys["alice"]


@pytest.fixture(scope="module")
def target(e2b_service: Service) -> Iterator[Target]:
    response = httpx.post(
        f"{e2b_service.url}/sandboxes",
        json={"templateID": "code-interpreter-v1", "timeout": 600},
        headers={"X-API-KEY": e2b_service.keys["alice"]},
        timeout=60,
    )
    assert response.status_code == 201, response.text
    made = response.json()
    try:
        yield Target(e2b_service, made["sandboxID"], made["envdAccessToken"])
    finally:
        kill_all(e2b_service, "alice")
        kill_all(e2b_service, "bob")


# --- what an answer may be ---------------------------------------------------------------


def _json(response: httpx.Response) -> Any:
    try:
        return json.loads(response.content)
    except ValueError:
        raise AssertionError(
            f"not JSON: {response.status_code} {response.content[:300]!r}"
        ) from None


def check_rest(response: httpx.Response) -> None:
    """An E2B REST answer: a success, or E2B's `{"code", "message"}` with a 4xx (or the
    proxy's 502 / a 501 for what is not served)."""
    status = response.status_code
    where = f"{response.request.method} {response.request.url}"
    if status < 400:
        return
    found = _json(response)
    assert isinstance(found, dict) and set(found) == {"code", "message"}, (where, found)
    assert found["code"] == status and isinstance(found["message"], str), (where, found)
    if status >= 500:
        assert status in (501, 502), (where, found)
    if status == 502:
        message = found["message"]
        assert "was not found" in message or "port is not open" in message, (where, found)


def check_connect_error(found: Any, where: str) -> None:
    assert isinstance(found, dict) and found.get("code") in CONNECT_CODES, (where, found)
    assert isinstance(found.get("message", ""), str), (where, found)
    # connect-go's answer to a compressed flag on an uncompressed stream is `internal` too
    protocol = found["code"] == "internal" and "compressed" in found.get("message", "")
    assert found["code"] not in SERVER_FAULTS or protocol, (where, found)


def check_unary(response: httpx.Response) -> None:
    """A unary Connect answer: 200 with a JSON object, or Connect's error JSON with the
    code's status. Before the call reaches envd (credentials, the proxy) it is E2B's
    REST error, as E2B's own proxy answers."""
    where = f"{response.request.method} {response.request.url}"
    found = _json(response)
    if response.status_code == 200:
        assert isinstance(found, dict), (where, found)
        return
    if isinstance(found.get("code"), int):
        check_rest(response)
        return
    check_connect_error(found, where)
    assert response.status_code < 500 or found["code"] in ("unimplemented", "deadline_exceeded")


def check_stream(response: httpx.Response, most: int = 1) -> None:
    """A streaming Connect answer: envelopes, of which an end-of-stream one carries any
    error; read until it ends or `most` messages came (a watch, or a process that runs on,
    does not end by itself and may stay silent: the connection is then closed)."""
    where = f"{response.request.method} {response.request.url}"
    streamed = response.headers.get("content-type", "").startswith("application/connect+json")
    if response.status_code != 200 or not streamed:  # an error, or a unary method's answer
        response.read()
        check_unary(response)
        return
    held = b""
    messages = 0
    for chunk in response.iter_bytes():
        held += chunk
        while len(held) >= HEADER.size:
            flags, length = HEADER.unpack_from(held)
            if len(held) < HEADER.size + length:
                break
            payload = json.loads(held[HEADER.size : HEADER.size + length])
            held = held[HEADER.size + length :]
            if flags & END_STREAM:
                if "error" in payload:
                    check_connect_error(payload["error"], where)
                return
            messages += 1
            if messages >= most:
                return
    raise AssertionError(f"{where}: the stream ended without its end-of-stream message")


def check_execute(response: httpx.Response) -> None:
    """`/execute`: NDJSON lines (results, output, errors) or an E2B REST error."""
    if response.status_code != 200:
        response.read()
        check_rest(response)
        return
    for line in response.iter_lines():
        if line.strip():
            assert isinstance(json.loads(line), dict), line


# --- what is drawn -----------------------------------------------------------------------

TEXT = st.text(max_size=24)
JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
PATHS = st.sampled_from(["/", "/home/user", "/tmp", "/nonexistent", "", "../..", "/proc/1"])
PATHS = PATHS | TEXT
CODE = st.sampled_from(["1+1", "print(1)", "raise ValueError('x')", "x = 1", "!pwd", ""])
CODE = CODE | TEXT


def _fields(names: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """An object with some of these fields, each drawn right or as any JSON."""
    parts = {name: strategy | JSON for name, strategy in names.items()}
    return st.fixed_dictionaries({}, optional=parts)


def _bodies(method: str) -> st.SearchStrategy[Any]:
    """A plausible message of `method` (some fields right, some wrong) or any JSON."""
    shapes: dict[str, dict[str, st.SearchStrategy[Any]]] = {
        "Stat": {"path": PATHS},
        "MakeDir": {"path": PATHS},
        "Move": {"source": PATHS, "destination": PATHS},
        "ListDir": {"path": PATHS, "depth": st.integers(-2, 5)},
        "Remove": {"path": st.sampled_from(["/tmp/fuzz-x", "/nonexistent/y"]) | TEXT},
        "WatchDir": {"path": PATHS, "recursive": st.booleans()},
        "CreateWatcher": {"path": PATHS, "recursive": st.booleans()},
        "GetWatcherEvents": {"watcherId": TEXT},
        "RemoveWatcher": {"watcherId": TEXT},
        "Start": {
            "process": _fields(
                {
                    "cmd": st.sampled_from(["/bin/true", "/bin/echo", "/nonexistent", ""]),
                    "args": st.lists(TEXT, max_size=3),
                    "envs": st.dictionaries(TEXT, TEXT, max_size=2),
                    "cwd": PATHS,
                }
            ),
            "stdin": st.booleans(),
            "pty": _fields({"size": _fields({"cols": st.integers(-1, 500)})}),
        },
        "Connect": {"process": _fields({"pid": st.integers(-1, 1 << 33), "tag": TEXT})},
        "SendInput": {"process": _fields({"pid": st.integers(-1, 70000)}), "input": JSON},
        "SendSignal": {
            "process": _fields({"pid": st.integers(-1, 70000)}),
            "signal": st.sampled_from(["SIGNAL_SIGTERM", "SIGNAL_SIGKILL", "SIGNAL_UNSPECIFIED"]),
        },
        "CloseStdin": {"process": _fields({"pid": st.integers(-1, 70000)})},
        "Update": {"process": _fields({"pid": st.integers(-1, 70000)}), "pty": JSON},
    }
    shape = shapes.get(method)
    return (_fields(shape) if shape else JSON) | JSON


def envelope(payload: bytes, flags: int = 0, length: int | None = None) -> bytes:
    return HEADER.pack(flags, len(payload) if length is None else length) + payload


@st.composite
def connect_calls(draw: st.DrawFn) -> tuple[str, dict[str, str], bytes]:
    service = draw(st.sampled_from(["filesystem.Filesystem", "process.Process", "nope.Nope"]))
    method = draw(st.sampled_from(FILESYSTEM if service.startswith("f") else PROCESS))
    message = json.dumps(draw(_bodies(method))).encode()
    streaming = method in STREAMS or method == "StreamInput"
    kind = draw(st.sampled_from(["right", "right", "raw", "other"]))
    if kind == "raw":  # any bytes, framed or not
        content = draw(st.binary(max_size=64))
    elif streaming:
        flags = draw(st.sampled_from([0, 0, 1, 2, 0xFF]))
        length = draw(st.none() | st.integers(0, (1 << 32) - 1))
        content = envelope(message, flags, length)
        if draw(st.booleans()):
            content = content[: draw(st.integers(0, len(content)))]
    else:
        content = message
    types = ["application/connect+json" if streaming else "application/json"]
    types += ["application/json", "application/connect+json", "application/proto", "", "text/x"]
    headers = {"Content-Type": draw(st.sampled_from(types))}
    if draw(st.booleans()):
        headers["Connect-Timeout-Ms"] = draw(st.sampled_from(["0", "1", "60000", "x", "9" * 12]))
    if draw(st.booleans()):
        headers["Connect-Content-Encoding"] = draw(st.sampled_from(["gzip", "identity", "br"]))
    if draw(st.booleans()):
        headers["Keepalive-Ping-Interval"] = draw(st.sampled_from(["0", "-1", "nan", "1e9", "x"]))
    return f"/{service}/{method}", headers, content


def _header_values() -> st.SearchStrategy[str]:
    # What a client sends in a header: printable ASCII, no surrounding blanks (h11 refuses
    # to send anything else; the server's HTTP parser answers that itself, before any app).
    chars = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
    return st.text(chars, max_size=40).map(str.strip)


# --- the tests ---------------------------------------------------------------------------


def sandbox_client(target: Target, port: str) -> httpx.Client:
    headers = {
        "E2b-Sandbox-Id": target.sandbox_id,
        "E2b-Sandbox-Port": port,
        "X-Access-Token": target.token,
    }
    return httpx.Client(base_url=target.service.url, headers=headers, timeout=60)


def test_the_checks_accept_good_calls(target: Target) -> None:
    """Positive control: well-formed calls succeed and pass the same checks, and the checks
    do tell a bad answer from a good one."""
    url, key = target.service.url, target.key
    with httpx.Client(base_url=url, headers={"X-API-KEY": key}, timeout=60) as api:
        listed = api.get("/v2/sandboxes")
        assert listed.status_code == 200
        check_rest(listed)
        missing = api.get("/sandboxes/" + "0" * 32)
        assert missing.status_code == 404
        check_rest(missing)
    with sandbox_client(target, ENVD) as envd:
        stat = envd.post("/filesystem.Filesystem/Stat", json={"path": "/tmp"})
        assert stat.status_code == 200 and stat.json()["entry"]["type"] == "FILE_TYPE_DIRECTORY"
        check_unary(stat)
        missing = envd.post("/filesystem.Filesystem/Stat", json={"path": "/nonexistent"})
        assert missing.status_code == 404 and missing.json()["code"] == "not_found"
        check_unary(missing)
        start = {"process": {"cmd": "/bin/echo", "args": ["hi"]}}
        headers = {"Content-Type": "application/connect+json"}
        content = envelope(json.dumps(start).encode())
        with envd.stream(
            "POST", "/process.Process/Start", content=content, headers=headers
        ) as answer:
            assert answer.status_code == 200
            check_stream(answer, most=100)
    with sandbox_client(target, INTERPRETER) as interpreter:
        with interpreter.stream("POST", "/execute", json={"code": "1+1"}) as answer:
            assert answer.status_code == 200
            lines = [json.loads(line) for line in answer.iter_lines() if line.strip()]
        assert any(line.get("type") == "result" and line.get("text") == "2" for line in lines)
    # the checks refuse what a server error looks like
    request = httpx.Request("GET", url)
    for status, answer_body in ((500, {"code": 500, "message": "boom"}), (400, {"detail": "x"})):
        bad = httpx.Response(status, json=answer_body, request=request)
        with pytest.raises(AssertionError):
            check_rest(bad)
    with pytest.raises(AssertionError):
        check_unary(httpx.Response(500, json={"code": "internal"}, request=request))


CONTROL_PATHS = [
    "/sandboxes", "/v2/sandboxes", "/sandboxes/{id}", "/sandboxes/{id}/timeout",
    "/sandboxes/{id}/connect", "/v2/sandboxes/{id}/connect", "/sandboxes/{id}/metrics",
    "/sandboxes/{id}/pause", "/sandboxes/{id}/resume", "/sandboxes/{id}/refreshes",
    "/sandboxes/{id}/{text}", "/v2/sandboxes/{text}", "/sandboxes/{id}/logs",
    "/sandboxes/{id}/fork", "/sandboxes/{id}/snapshots", "/snapshots", "/templates/{text}",
]  # fmt: skip


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]),
    path=st.sampled_from(CONTROL_PATHS),
    sandbox_id=st.sampled_from(["0" * 32, "x", "..", "%00"]) | st.text(max_size=40),
    text=st.text(max_size=12),
    query=st.dictionaries(
        st.sampled_from(["metadata", "state", "limit", "nextToken", "sandboxID", "name", "x"]),
        TEXT,
        max_size=3,
    ),
    body=_fields(
        {
            "templateID": st.sampled_from(["base", "code-interpreter-v1", "nope"]),
            "timeout": st.integers(-5, 1 << 40),
            "metadata": st.dictionaries(TEXT, TEXT, max_size=3),
            "envVars": st.dictionaries(TEXT, TEXT, max_size=3),
            "autoPause": st.booleans(),
            "autoResume": JSON,
            "count": st.integers(-5, 100),
            "name": TEXT,
            "memory": st.booleans() | TEXT,
            "secure": st.booleans(),
            "allow_internet_access": st.booleans(),
        }
    )
    | JSON,
    raw=st.none() | st.binary(max_size=40),
    key=st.sampled_from(["alice", "bob", "none", "wrong"]),
)
def test_the_control_plane_takes_any_input(
    target: Target,
    method: str,
    path: str,
    sandbox_id: str,
    text: str,
    query: dict[str, str],
    body: Any,
    raw: bytes | None,
    key: str,
) -> None:
    service = target.service
    url = path.replace("{id}", quote(sandbox_id, safe="")).replace("{text}", quote(text, safe=""))
    headers = {"X-API-KEY": service.keys.get(key, "wrong")} if key != "none" else {}
    if raw is not None:
        content, headers["Content-Type"] = raw, "application/json"
    else:
        content = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        request = httpx.Request(method, service.url + url, params=query, content=content)
    except (httpx.InvalidURL, UnicodeEncodeError):
        return  # not a request any client can send
    request.headers.update(headers)
    if not request.url.path.startswith(("/sandboxes", "/v2/sandboxes")):
        return  # `..` took it elsewhere: codecage's own API, fuzzed by tests/test_fuzz.py
    with httpx.Client(timeout=60) as client:
        response = client.send(request)
    check_rest(response)
    if response.status_code == 201:  # it made a sandbox: no longer needed
        made = response.json()["sandboxID"]
        with httpx.Client(timeout=60) as client:
            client.delete(f"{service.url}/sandboxes/{made}", headers=headers)


@FUZZ
@given(call=connect_calls())
def test_envd_connect_takes_any_input(
    target: Target, call: tuple[str, dict[str, str], bytes]
) -> None:
    path, headers, content = call
    with (
        sandbox_client(target, ENVD) as envd,
        envd.stream("POST", path, content=content, headers=headers) as response,
    ):
        check_stream(response)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=st.sampled_from(["/files", "/health", "/", "/files/x", "/filesystem.Filesystem"]),
    query=st.dictionaries(
        st.sampled_from(["path", "username", "signature", "signature_expiration", "x"]),
        st.sampled_from(["/tmp/fuzz.txt", "/tmp", "/nonexistent/a", "v1_x", "-1", "99" * 11])
        | TEXT,
        max_size=4,
    ),
    content_type=st.sampled_from(
        [
            "application/octet-stream",
            "multipart/form-data; boundary=b",
            "multipart/form-data",
            "text/plain",
            "application/json",
            "",
        ]
    ),
    content=st.binary(max_size=200),
    gzip=st.booleans(),
    metadata=st.dictionaries(
        st.text("abcXYZ019-_.!~", min_size=1, max_size=8),  # a header name's characters
        _header_values(),
        max_size=2,
    ),
)
def test_envd_files_take_any_input(
    target: Target,
    method: str,
    path: str,
    query: dict[str, str],
    content_type: str,
    content: bytes,
    gzip: bool,
    metadata: dict[str, str],
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    if gzip:
        headers["Content-Encoding"] = "gzip"
    headers.update({f"X-Metadata-{k}": v for k, v in metadata.items()})
    with sandbox_client(target, ENVD) as envd:
        try:
            request = envd.build_request(method, path, params=query, content=content)
        except (httpx.InvalidURL, UnicodeEncodeError):
            return
        request.headers.update(headers)
        response = envd.send(request)
    if method == "POST" and path.count("/") == 2:  # /<service>/<method>: a Connect route
        check_unary(response)
    else:
        check_rest(response)


@FUZZ
@given(
    route=st.sampled_from(
        ["POST /execute"] * 4
        + ["POST /contexts", "GET /contexts", "POST /contexts/{ctx}/restart"]
        + ["DELETE /contexts/{ctx}", "GET /health", "GET /execute", "POST /{ctx}"]
    ),
    ctx=st.sampled_from(["default", "python", "0" * 32]) | st.text(max_size=20),
    body=_fields(
        {
            "code": CODE,
            "context_id": st.sampled_from(["default", "x"]) | TEXT,
            "language": st.sampled_from(["python", "js", "r", "bash", "PYTHON"]) | TEXT,
            "env_vars": st.dictionaries(TEXT, TEXT, max_size=2),
            "cwd": PATHS,
        }
    )
    | JSON,
    raw=st.none() | st.binary(max_size=40),
)
def test_the_interpreter_takes_any_input(
    target: Target, route: str, ctx: str, body: Any, raw: bytes | None
) -> None:
    method, path = route.split(" ")
    content = raw if raw is not None else json.dumps(body).encode()
    with sandbox_client(target, INTERPRETER) as interpreter:
        try:
            request = interpreter.build_request(method, path.replace("{ctx}", ctx), content=content)
        except (httpx.InvalidURL, UnicodeEncodeError):
            return
        request.headers["Content-Type"] = "application/json"
        response = interpreter.send(request, stream=True)
        try:
            if path == "/execute" and method == "POST":
                check_execute(response)
            else:
                response.read()
                check_rest(response)
        finally:
            response.close()


@FUZZ
@given(
    sandbox_id=st.sampled_from(["own", "own", "0" * 32, ""]) | _header_values(),
    port=st.sampled_from([ENVD, INTERPRETER, "80", "0", "", "99999999", "-1"]) | _header_values(),
    token=st.sampled_from(["own", "own", "", "wrong"]) | st.none() | _header_values(),
    basic=st.none() | st.sampled_from(["Basic dXNlcjo=", "Basic !!", "Basic ", "Bearer x"]),
    host=st.none() | st.sampled_from(["49983-" + "0" * 32 + ".x", "1-x.y", "api.x"]),
    path=st.sampled_from(["/health", "/files", "/execute", "/filesystem.Filesystem/Stat"]),
)
def test_the_sandbox_headers_take_any_value(
    target: Target,
    sandbox_id: str,
    port: str,
    token: str | None,
    basic: str | None,
    host: str | None,
    path: str,
) -> None:
    headers = {
        "E2b-Sandbox-Id": target.sandbox_id if sandbox_id == "own" else sandbox_id,
        "E2b-Sandbox-Port": port,
        "Content-Type": "application/json",
    }
    if token is not None:
        headers["X-Access-Token"] = target.token if token == "own" else token
    if basic is not None:
        headers["Authorization"] = basic
    if host is not None:
        headers["Host"] = host
    method = "GET" if path == "/health" else "POST"
    content = json.dumps({"path": "/tmp", "code": "1+1"}).encode()
    with httpx.Client(timeout=60) as client:
        try:
            response = client.request(
                method, target.service.url + path, headers=headers, content=content
            )
        except (httpx.LocalProtocolError, UnicodeEncodeError):
            return  # a header value no client can send
    if path.startswith("/filesystem"):
        check_unary(response)
    else:
        check_rest(response)
