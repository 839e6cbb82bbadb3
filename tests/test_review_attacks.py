"""An attack review of the hostile-tenant fixes: the same classes of problem through other
doors, against a real `codecage serve` on loopback with two tenants' keys. Each refusal has
its positive control."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import Service, stop_service
from .test_service_limits import connect, http, small_service

pytestmark = pytest.mark.requires_root


def _running(db: Path, tenant: str) -> int:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute(
            "SELECT count(*) FROM runs WHERE tenant = ? AND status = 'started'", (tenant,)
        ).fetchone()
        return int(row[0])
    finally:
        conn.close()


def _wait_running(db: Path, tenant: str, count: int) -> None:
    deadline = time.monotonic() + 60  # a bound for a failing test, not a measurement
    while _running(db, tenant) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _running(db, tenant) >= count


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[Service]:
    svc = small_service(
        tmp_path,
        "worker_threads = 16\n[quotas]\nconcurrent_requests = 2\nlive_sandboxes = 4\n",
    )
    try:
        yield svc
    finally:
        stop_service(svc)


def _stream_and_hang_up(service: Service, sandbox_id: str, code: str) -> None:
    """A streaming execute whose client goes away once the answer has started."""
    sock = connect(service)
    body = json.dumps({"code": code}).encode()
    sock.sendall(
        f"POST /v1/sandboxes/{sandbox_id}/execute HTTP/1.1\r\nHost: t\r\n"
        f"Authorization: Bearer {service.keys['alice']}\r\nAccept: application/x-ndjson\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
    sock.close()


def test_a_streamed_run_whose_client_hangs_up_still_counts_in_flight(capped: Service) -> None:
    """quotas.concurrent_requests caps the worker threads one tenant holds. A streaming
    execute whose client disconnects keeps its thread (the run goes on): it must keep its
    place in the tenant's count too, else hanging up frees the place and a tenant holds as
    many threads as its sandboxes' queues allow. Positive control: once those runs end, the
    same request is answered."""
    sleep = "import time; print('go', flush=True); time.sleep(600)"
    with http(capped, "alice") as alice:
        sids = [alice.post("/v1/sandboxes", json={}).json()["id"] for _ in range(3)]
        try:
            for sid in sids[:2]:
                _stream_and_hang_up(capped, sid, sleep)
            _wait_running(capped.db, "alice", 2)
            time.sleep(0.5)  # let the server see the hang-ups (it cannot be observed)
            third = alice.post(f"/v1/sandboxes/{sids[2]}/execute", json={"code": "1 + 1"})
            assert third.status_code == 429, third.text  # two runs of alice hold threads
            for sid in sids[:2]:  # a tenant at its cap can still end what holds its places
                gone = alice.delete(f"/v1/sandboxes/{sid}")
                assert gone.status_code == 204, gone.text
            deadline = time.monotonic() + 60
            while _running(capped.db, "alice") and time.monotonic() < deadline:
                time.sleep(0.05)
            again = alice.post(f"/v1/sandboxes/{sids[2]}/execute", json={"code": "1 + 1"})
            assert again.status_code == 200, again.text  # control: the places are free
        finally:
            for sid in sids:
                alice.delete(f"/v1/sandboxes/{sid}")


LONG_NAME = """
class E(Exception):
    pass
E.__name__ = "E" * ({size})
raise E("x")
"""


def test_an_error_name_from_the_kernel_is_bounded_in_the_audit_log(tmp_path: Path) -> None:
    """The audit log keeps each run within a bound (code, output, policy, findings); the
    error's name is the kernel's word too: an exception class named with 8 MiB must not
    put 8 MiB in the log per run. Positive control: a short name is kept whole."""
    svc = small_service(tmp_path, "")
    try:
        with http(svc, "alice") as alice:
            for size in (8 << 20, 40):
                r = alice.post("/v1/run", json={"code": LONG_NAME.format(size=size)})
                assert r.status_code == 200, r.text[:200]
                assert r.json()["error"] is not None
            conn = sqlite3.connect(svc.db)
            try:
                names = [
                    row[0]
                    for row in conn.execute(
                        "SELECT error_name FROM runs WHERE kind = 'run' ORDER BY rowid"
                    )
                ]
            finally:
                conn.close()
            assert names[1] == "E" * 40  # control: a name as it was raised
            assert len(names[0].encode()) <= 4096, len(names[0])
    finally:
        stop_service(svc)


def test_an_upload_with_a_content_coding_is_refused_not_stored_encoded(
    service: Service,
) -> None:
    """`Content-Encoding: gzip` says the body is the file compressed; the service does not
    decode it, so storing it would store something other than the file the client sent
    (item 14's class): 415, nothing stored; so is a multipart part with a
    Content-Transfer-Encoding (base64). Positive control: the same bytes, without the
    coding (or `identity`), are stored as they are."""
    import base64
    import gzip

    data = b"the file itself\n" * 1000
    with http(service, "alice") as client:
        sid = client.post("/v1/sandboxes", json={}).json()["id"]
        base = f"/v1/sandboxes/{sid}/files"
        try:
            for coding in ("gzip", "deflate, gzip", "br"):
                r = client.put(
                    base,
                    params={"path": "coded.bin"},
                    content=gzip.compress(data),
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Encoding": coding,
                    },
                )
                assert r.status_code == 415, (coding, r.status_code, r.text[:200])
                assert client.get(base, params={"path": "coded.bin"}).status_code == 404
            boundary = "b0undary"
            envelope = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                'filename="f"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
                + base64.b64encode(data).decode()
                + f"\r\n--{boundary}--\r\n"
            )
            part = client.put(
                base,
                params={"path": "part.bin"},
                content=envelope.encode(),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
            assert part.status_code == 415, (part.status_code, part.text[:200])
            assert client.get(base, params={"path": "part.bin"}).status_code == 404
            plain = client.put(
                base,
                params={"path": "plain.bin"},
                content=data,
                headers={"Content-Encoding": "identity"},
            )
            assert plain.status_code == 200, plain.text
            assert client.get(base, params={"path": "plain.bin"}).content == data
        finally:
            client.delete(f"/v1/sandboxes/{sid}")


def _chunked(data: bytes) -> Iterator[bytes]:
    """A body httpx sends with Transfer-Encoding: chunked (no Content-Length to refuse)."""
    for i in range(0, len(data), 65536):
        yield data[i : i + 65536]


def test_a_chunked_body_over_the_limit_is_a_413_like_a_declared_one(tmp_path: Path) -> None:
    """Without a Content-Length the body limit is found while reading: it must still be the
    413 `TooLarge` error (a declared length over the limit is one), not FastAPI's own 400
    `{"detail": ...}` outside the error contract (a JSON body's read failing inside FastAPI);
    an upload stays a 413 that leaves no file. Positive control: the same chunked requests
    within the limits are answered 200."""
    svc = small_service(tmp_path, "max_code_bytes = 1000\nmax_upload_bytes = 1048576\n")
    try:
        with http(svc, "alice") as client:
            sid = client.post("/v1/sandboxes", json={}).json()["id"]
            files = f"/v1/sandboxes/{sid}/files"
            try:
                code = json.dumps({"code": "x = '" + "x" * (3 << 20) + "'"}).encode()
                headers = {"Content-Type": "application/json"}
                big = client.post(
                    f"/v1/sandboxes/{sid}/execute", content=_chunked(code), headers=headers
                )
                assert big.status_code == 413, big.text[:200]
                assert big.json()["error"]["type"] == "TooLarge"
                up = client.put(
                    files, params={"path": "big.bin"}, content=_chunked(b"y" * (3 << 20))
                )
                assert up.status_code == 413, up.text[:200]
                assert up.json()["error"]["type"] == "TooLarge"
                assert client.get(files, params={"path": "big.bin"}).status_code == 404
                small = json.dumps({"code": "6 * 7"}).encode()
                ok = client.post(
                    f"/v1/sandboxes/{sid}/execute", content=_chunked(small), headers=headers
                )
                assert ok.status_code == 200 and ok.json()["text"] == "42"
                fits = client.put(files, params={"path": "s.bin"}, content=_chunked(b"z" * 1000))
                assert fits.status_code == 200 and fits.json()["size"] == 1000
            finally:
                client.delete(f"/v1/sandboxes/{sid}")
    finally:
        stop_service(svc)


def test_approval_reasons_are_bounded_in_the_audit_log(tmp_path: Path) -> None:
    """An approval's reasons quote the request's environment overrides ("what was asked
    about must be what runs"), and any tenant may turn approvals on for its own sandbox
    and deny its own requests at once: a command with an 8 MiB env must not put 8 MiB in
    the audit log per request (the subject is already cut to 64 KiB). Positive control: a
    short env is recorded whole; the approver is still shown the reasons whole."""
    import threading

    svc = small_service(tmp_path, "")
    try:
        with http(svc, "alice") as alice:
            made = alice.post("/v1/sandboxes", json={"policy": {"approval_commands": True}})
            sid = made.json()["id"]
            try:
                for value in ("v" * (8 << 20), "short"):
                    answered: list[httpx.Response] = []
                    asking = threading.Thread(
                        target=lambda v=value, out=answered: out.append(
                            alice.post(
                                f"/v1/sandboxes/{sid}/commands",
                                json={"cmd": "true", "envs": {"K": v}},
                            )
                        )
                    )
                    asking.start()
                    deadline = time.monotonic() + 60
                    pending: list[dict[str, object]] = []
                    while not pending and time.monotonic() < deadline:
                        pending = alice.get("/v1/approvals").json()
                        time.sleep(0.05)
                    [request] = pending
                    assert any(value in str(r) for r in request["reasons"])  # shown whole
                    alice.post(f"/v1/approvals/{request['id']}", json={"decision": "deny"})
                    asking.join(60)
                    assert answered and answered[0].status_code == 403
            finally:
                alice.delete(f"/v1/sandboxes/{sid}")
        conn = sqlite3.connect(svc.db)
        try:
            rows = [r[0] for r in conn.execute("SELECT reasons FROM approvals ORDER BY rowid")]
        finally:
            conn.close()
        assert len(rows) == 2
        assert "K='short'" in rows[1]  # control: recorded whole
        assert len(rows[0].encode()) <= 128 << 10, len(rows[0])
    finally:
        stop_service(svc)


def test_pipelined_requests_without_a_key_are_bounded_per_connection(capped: Service) -> None:
    """HTTP/1.1 pipelining: uvicorn parses every request a client sends ahead and queues
    each (its scope, headers, a response cycle), resuming reads after every answer, so one
    connection that sends /healthz requests without reading the answers holds memory
    without bound, and no key is needed (20 such connections took the service from 56 to
    619 MiB). A connection holds a bounded queue of pipelined requests, then is closed.
    Positive control: a few pipelined requests are all answered."""
    from codecage._service.app import PIPELINED_MAX

    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    last = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    for count, bounded in ((PIPELINED_MAX, False), (2000, True)):
        sock = connect(capped)
        sock.sendall(request * (count - 1) + last)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:  # closed with our requests unread
            pass
        sock.close()
        answered = answer.count(b"HTTP/1.1 200 OK")
        if bounded:
            assert answered <= PIPELINED_MAX + 1, answered
        else:
            assert answered == count, answer[-300:]


PEAK = """
import resource, sys
from codecage import Policy, Sandbox, SandboxError
from tests.test_kernel_protocol import FIND
outcome = "taken"
with Sandbox(Policy(timeout_s=120)) as sbx:
    try:
        ex = sbx.run_code(FIND + sys.argv[1])
        assert ex.error is None, ex.error
    except SandboxError as exc:
        outcome = "ended" if "malformed" in str(exc) or "has ended" in str(exc) else repr(exc)
print(outcome, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10)
"""


def _host_peak_mb(frame: str) -> tuple[str, int]:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", PEAK, frame], capture_output=True, text=True, cwd=root, check=True
    )
    outcome, peak = out.stdout.split()[-2:]
    return outcome, int(peak)


def test_a_frame_of_small_containers_costs_the_host_no_more_than_its_bytes() -> None:
    """Code writes frames on the kernel's channel itself (test_kernel_protocol's FIND). A
    frame within MAX_FRAME whose extra field is millions of empty objects is parsed whole
    before the host drops the field: the host process must not pay far more memory than
    the bytes it read: such a frame (more JSON values than protocol.MAX_VALUES) is a
    protocol violation that ends the sandbox. Positive control: a frame of the same size
    that is one string is taken."""
    n = (15 << 20) // 3
    taken, string = _host_peak_mb(f"ch.send(ev='stdout', id=rid, text='x', pad='y' * {3 * n})")
    ended, objects = _host_peak_mb(f"ch.send(ev='stdout', id=rid, text='x', pad=[{{}}] * {n})")
    assert (taken, ended) == ("taken", "ended")
    assert objects - string < 128, (string, objects)


SPIN_CMD = "python3 -c 'while True: pass'"


def test_a_cpu_budget_spent_by_a_command_is_its_value_then_the_sandbox_has_ended(
    service: Service,
) -> None:
    """Item 16's class through commands (recorded as runs): a command that spends the
    sandbox's cpu_s returns a value saying so, in the SDK and the service; the next call
    on the ended sandbox is the error. Positive control: a command within the budget."""
    from codecage import Policy, Sandbox, SandboxNotFound

    sbx = Sandbox(Policy(cpu_s=1, timeout_s=120))
    try:
        ok = sbx.commands.run("echo fine")
        assert ok.stdout == "fine\n" and ok.killed_by is None
        spent = sbx.commands.run(SPIN_CMD, timeout=60)
        assert spent.killed_by == "cpu_limit" and spent.error and "cpu_limit" in spent.error
        with pytest.raises(SandboxNotFound, match="cpu_s"):
            sbx.commands.run("echo again")
    finally:
        sbx.kill()
    with http(service, "alice") as alice:
        sid = alice.post("/v1/sandboxes", json={"policy": {"cpu_s": 1}}).json()["id"]
        try:
            url = f"/v1/sandboxes/{sid}/commands"
            assert alice.post(url, json={"cmd": "echo fine"}).json()["killed_by"] is None
            r = alice.post(url, json={"cmd": SPIN_CMD, "timeout": 60})
            assert r.status_code == 200, r.text
            assert r.json()["killed_by"] == "cpu_limit"
            assert alice.post(url, json={"cmd": "echo again"}).status_code == 404
        finally:
            alice.delete(f"/v1/sandboxes/{sid}")
