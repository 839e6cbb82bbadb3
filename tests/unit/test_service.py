"""The service (codecage._service.app) on loopback, in this process, over the fake backend: routes,
keys, error mapping to HTTP status, NDJSON streams, approvals, the audit API, and the remote
SDK against it. Every response is checked against docs/openapi.json."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

import codecage
from codecage import (
    ApprovalDenied,
    CodeRejected,
    FileNotFoundInSandbox,
    Policy,
    PolicyError,
    QuotaExceeded,
    SandboxNotFound,
)
from codecage._service.app import create_app
from codecage._service.audit import AuditLog
from codecage._service.config import Quotas, ServerConfig
from codecage.testing import fake as f
from codecage.testing import fake as fakes
from codecage.testing.fake import FakeJail
from tests.openapi_check import validate

KEYS = {"alice": "key-alice-0123456789", "bob": "key-bob-0123456789"}


@dataclass
class Service:
    url: str
    audit: AuditLog

    def http(self, tenant: str | None = "alice") -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
        return httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=30,
            event_hooks={"response": [validate]},
        )

    def client(self, tenant: str = "alice") -> codecage.Client:
        client = codecage.connect(self.url, KEYS[tenant])
        client._http.event_hooks["response"].append(validate)
        return client


def serve(tmp_path: Path, **fields: Any) -> Iterator[Service]:
    audit = AuditLog(tmp_path / "audit.db")
    for tenant, key in KEYS.items():
        audit.add_key(key, tenant)
    audit.add_key("key-approver-0123456789", "alice", role="approver")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServerConfig(
        db=str(tmp_path / "audit.db"), port=port, audit_min_free_mb=0, worker_threads=8, **fields
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(config, audit), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, name="unit-uvicorn")
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the service did not start")
        time.sleep(0.01)
    try:
        yield Service(f"http://127.0.0.1:{port}", audit)
    finally:
        server.should_exit = True
        thread.join(30)
        audit.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One service for the module (a start and stop take a few tenths of a second). Its
    start-up gets a jail of its own; each test's `fake` is installed over it, and the
    sandboxes a test creates come from that test's fake."""
    with fakes.installed():
        yield from serve(tmp_path_factory.mktemp("service"), pool_size=0)


@pytest.fixture
def http(service: Service) -> Iterator[httpx.Client]:
    with service.http() as client:
        yield client


def create(http: httpx.Client, **body: Any) -> str:
    response = http.post("/v1/sandboxes", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def error_of(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["type"]


# -- keys and routes ---------------------------------------------------------------------------


def test_healthz_needs_no_key(service: Service) -> None:
    with service.http(None) as anonymous:
        response = anonymous.get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_no_key_is_401_with_a_challenge(service: Service) -> None:
    with service.http(None) as anonymous:
        response = anonymous.get("/v1/sandboxes")
    assert error_of(response) == (401, "Unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_a_wrong_key_is_401(service: Service) -> None:
    with httpx.Client(base_url=service.url, headers={"Authorization": "Bearer nope"}) as client:
        assert client.get("/v1/sandboxes").status_code == 401


def test_an_approver_key_may_not_run_code(service: Service) -> None:
    headers = {"Authorization": "Bearer key-approver-0123456789"}
    with httpx.Client(base_url=service.url, headers=headers) as client:
        response = client.post("/v1/sandboxes", json={})
    assert error_of(response) == (403, "Forbidden")


def test_create_list_get_delete(http: httpx.Client, fake: FakeJail) -> None:
    sid = create(http)
    assert [s["id"] for s in http.get("/v1/sandboxes").json()] == [sid]
    assert http.get(f"/v1/sandboxes/{sid}").json()["policy"]["memory_mb"] == 512
    assert http.delete(f"/v1/sandboxes/{sid}").status_code == 204
    assert error_of(http.get(f"/v1/sandboxes/{sid}")) == (404, "SandboxNotFound")
    assert not fake.live()


def test_another_tenants_sandbox_is_404(service: Service, http: httpx.Client) -> None:
    sid = create(http)
    with service.http("bob") as bob:
        assert error_of(bob.get(f"/v1/sandboxes/{sid}")) == (404, "SandboxNotFound")
        assert error_of(bob.post(f"/v1/sandboxes/{sid}/execute", json={"code": "x"}))[0] == 404
        assert bob.get("/v1/sandboxes").json() == []
    http.delete(f"/v1/sandboxes/{sid}")


def test_a_policy_over_the_ceiling_is_422(http: httpx.Client, fake: FakeJail) -> None:
    response = http.post("/v1/sandboxes", json={"policy": {"memory_mb": 1 << 20}})
    assert error_of(response) == (422, "PolicyError")
    assert fake.sandboxes == []


def test_an_unknown_policy_field_is_422(http: httpx.Client) -> None:
    response = http.post("/v1/sandboxes", json={"policy": {"no_such_field": 1}})
    assert response.status_code == 422


def test_the_live_sandbox_quota_is_429(tmp_path: Path, fake: FakeJail) -> None:
    for service in serve(tmp_path, pool_size=0, quotas=Quotas(live_sandboxes=1)):
        with service.http() as http:
            sid = create(http)
            assert error_of(http.post("/v1/sandboxes", json={})) == (429, "QuotaExceeded")
            http.delete(f"/v1/sandboxes/{sid}")


# -- runs --------------------------------------------------------------------------------------


def test_execute_answers_one_execution(http: httpx.Client, fake: FakeJail) -> None:
    fake.on_code("1 + 1", f.stdout("hi\n"), f.result("2"))
    sid = create(http)
    body = http.post(f"/v1/sandboxes/{sid}/execute", json={"code": "1 + 1"}).json()
    assert body["logs"]["stdout"] == ["hi\n"] and body["results"][0]["text"] == "2"
    assert body["error"] is None and body["execution_count"] == 1
    http.delete(f"/v1/sandboxes/{sid}")


def test_execute_streams_ndjson_events_then_the_execution(
    http: httpx.Client, fake: FakeJail
) -> None:
    fake.on_code("x", f.stdout("a"), f.stderr("b"), f.result("c"))
    sid = create(http)
    headers = {"Accept": "application/x-ndjson"}
    with http.stream(
        "POST", f"/v1/sandboxes/{sid}/execute", json={"code": "x"}, headers=headers
    ) as r:
        events = [json.loads(line) for line in r.iter_lines() if line]
    assert [e["ev"] for e in events] == ["stdout", "stderr", "result", "end", "execution"]
    assert events[-1]["execution"]["results"][0]["text"] == "c"
    http.delete(f"/v1/sandboxes/{sid}")


def test_the_stream_carries_only_known_fields(http: httpx.Client, fake: FakeJail) -> None:
    fake.on_code("x", f.frame("stdout", text="a", injected="<script>"))
    sid = create(http)
    headers = {"Accept": "application/x-ndjson"}
    with http.stream(
        "POST", f"/v1/sandboxes/{sid}/execute", json={"code": "x"}, headers=headers
    ) as r:
        first = json.loads(next(r.iter_lines()))
    assert first["ev"] == "stdout" and first["text"] == "a"
    assert "injected" not in first
    http.delete(f"/v1/sandboxes/{sid}")


def test_a_broken_kernel_in_a_stream_is_a_failed_event(http: httpx.Client, fake: FakeJail) -> None:
    fake.on_code("evil", f.Frame({"ev": "stdout", "id": "forged", "text": "x"}))
    sid = create(http)
    headers = {"Accept": "application/x-ndjson"}
    with http.stream(
        "POST", f"/v1/sandboxes/{sid}/execute", json={"code": "evil"}, headers=headers
    ) as r:
        events = [json.loads(line) for line in r.iter_lines() if line]
    assert events[-1]["ev"] == "failed" and events[-1]["type"] == "SandboxNotFound"
    assert error_of(http.get(f"/v1/sandboxes/{sid}")) == (404, "SandboxNotFound")


def test_a_broken_kernel_is_404_afterwards(http: httpx.Client, fake: FakeJail) -> None:
    fake.on_code("evil", f.Frame({"ev": "bogus", "text": "x", "id": "<the request's id>"}))
    sid = create(http)
    response = http.post(f"/v1/sandboxes/{sid}/execute", json={"code": "evil"})
    assert error_of(response) == (404, "SandboxNotFound")
    assert "broke the protocol" in response.json()["error"]["message"]


def test_a_malformed_frame_is_409_transport_error(http: httpx.Client, fake: FakeJail) -> None:
    fake.on_code("bad", f.Raw(b"\x00\x00\x00\x02{]"))
    sid = create(http)
    response = http.post(f"/v1/sandboxes/{sid}/execute", json={"code": "bad"})
    assert error_of(response) == (409, "TransportError")


def test_limits_are_values_in_the_execution(http: httpx.Client, fake: FakeJail) -> None:
    fake.on_code("big", f.Reading(oom_kills=1), f.Die(signal=signal.SIGKILL))
    sid = create(http)
    body = http.post(f"/v1/sandboxes/{sid}/execute", json={"code": "big"}).json()
    assert body["killed_by"] == "memory_limit" and body["state_lost"]
    assert body["error"]["name"] == "MemoryLimitExceeded"
    assert http.get(f"/v1/sandboxes/{sid}").status_code == 200  # the session goes on
    http.delete(f"/v1/sandboxes/{sid}")


def test_blocked_code_is_422_with_findings(http: httpx.Client, fake: FakeJail) -> None:
    sid = create(http, policy={"analysis_block_at": "high"})
    response = http.post(f"/v1/sandboxes/{sid}/execute", json={"code": "import subprocess"})
    assert error_of(response) == (422, "CodeRejected")
    assert response.json()["error"]["findings"][0]["rule"] == "CC101"
    assert fake.ran() == []
    http.delete(f"/v1/sandboxes/{sid}")


def test_invalid_envs_are_422(http: httpx.Client, fake: FakeJail) -> None:
    sid = create(http)
    response = http.post(f"/v1/sandboxes/{sid}/execute", json={"code": "x", "envs": {"A=B": "1"}})
    assert response.status_code == 422 and fake.ran() == []
    http.delete(f"/v1/sandboxes/{sid}")


def test_one_shot_run(http: httpx.Client, fake: FakeJail) -> None:
    fake.on_code("print(1)", f.stdout("1\n"))
    body = http.post("/v1/run", json={"code": "print(1)"}).json()
    assert body["logs"]["stdout"] == ["1\n"] and body["exit_code"] == 0
    assert not fake.live()


def test_commands_route(http: httpx.Client, fake: FakeJail) -> None:
    fake.on_command("ls", f.command_reply(stdout="a\n", exit_code=0))
    sid = create(http)
    body = http.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "ls"}).json()
    assert (body["stdout"], body["exit_code"]) == ("a\n", 0)
    http.delete(f"/v1/sandboxes/{sid}")


# -- files ---------------------------------------------------------------------------------------


def test_upload_download_list_exists_remove_mkdir(http: httpx.Client, fake: FakeJail) -> None:
    sid = create(http)
    base = f"/v1/sandboxes/{sid}/files"
    up = http.put(base, params={"path": "d/a.bin"}, files={"file": ("a.bin", b"\x00\x01")})
    assert up.status_code == 200, up.text
    assert up.json()["size"] == 2
    assert http.get(base, params={"path": "d/a.bin"}).content == b"\x00\x01"
    assert [e["name"] for e in http.get(f"{base}/list", params={"path": "d"}).json()] == ["a.bin"]
    assert http.get(f"{base}/exists", params={"path": "d/a.bin"}).json() == {"exists": True}
    assert http.post(f"{base}/mkdir", json={"path": "e"}).json() == {"created": True}
    assert http.delete(base, params={"path": "d"}).status_code == 204
    assert http.get(f"{base}/exists", params={"path": "d/a.bin"}).json() == {"exists": False}
    http.delete(f"/v1/sandboxes/{sid}")


def test_a_missing_file_is_404_file_not_found(http: httpx.Client) -> None:
    sid = create(http)
    response = http.get(f"/v1/sandboxes/{sid}/files", params={"path": "nope"})
    assert error_of(response) == (404, "FileNotFound")
    http.delete(f"/v1/sandboxes/{sid}")


# -- approvals and the audit API ---------------------------------------------------------------


def test_a_run_waits_for_an_approval_answered_over_http(
    service: Service, http: httpx.Client, fake: FakeJail
) -> None:
    sid = create(http, policy={"approval_findings_at": "high"})
    answer: list[httpx.Response] = []
    worker = threading.Thread(
        target=lambda: answer.append(
            http.post(f"/v1/sandboxes/{sid}/execute", json={"code": "import subprocess"})
        )
    )
    worker.start()
    try:
        with service.http() as other:
            while not (pending := other.get("/v1/approvals").json()):
                time.sleep(0.01)
            assert pending[0]["kind"] == "execute" and pending[0]["sandbox_id"] == sid
            with service.http("bob") as bob:
                assert bob.get("/v1/approvals").json() == []
                no = bob.post(f"/v1/approvals/{pending[0]['id']}", json={"decision": "approve"})
                assert no.status_code == 404
            yes = other.post(f"/v1/approvals/{pending[0]['id']}", json={"decision": "deny"})
            assert yes.json()["approved"] is False
    finally:
        worker.join(30)
    assert error_of(answer[0]) == (403, "ApprovalDenied")
    assert fake.ran() == []
    http.delete(f"/v1/sandboxes/{sid}")


def test_the_audit_api_shows_a_tenant_its_own_runs(
    service: Service, http: httpx.Client, fake: FakeJail
) -> None:
    sid = create(http)
    http.post(f"/v1/sandboxes/{sid}/execute", json={"code": "secret = 1"})
    rows = http.get("/v1/audit", params={"sandbox_id": sid}).json()
    assert [(r["kind"], r["code"], r["outcome"]) for r in rows] == [("execute", "secret = 1", "ok")]
    assert {r["tenant"] for r in http.get("/v1/audit").json()} == {"alice"}
    with service.http("bob") as bob:
        assert bob.get("/v1/audit", params={"sandbox_id": sid}).json() == []
    http.delete(f"/v1/sandboxes/{sid}")


def test_metrics_without_an_operator_key_have_no_sandbox_ids(
    service: Service, http: httpx.Client
) -> None:
    sid = create(http)
    text = http.get("/metrics").text
    assert "codecage_sandboxes_live 1.0" in text and sid not in text
    http.delete(f"/v1/sandboxes/{sid}")


def test_the_pool_serves_creates_when_configured(tmp_path: Path, fake: FakeJail) -> None:
    for service in serve(tmp_path, pool_size=2):
        while not fake.pools or fake.pools[0].ready < 2:
            time.sleep(0.01)
        with service.http() as http:
            sid = create(http)
            assert fake.pools[0].hits == 1
            prefaulted = next(b for b in fake.sandboxes if b.id == sid)
            assert [r["op"] for r in prefaulted.launcher.requests] == ["prefault"]
            http.delete(f"/v1/sandboxes/{sid}")
    assert not fake.live()


# -- the remote SDK ----------------------------------------------------------------------------


def test_the_remote_sandbox_works_like_the_local_one(service: Service, fake: FakeJail) -> None:
    fake.on_code("1 + 1", f.result("2"))
    with service.client() as client, client.Sandbox() as sbx:
        assert sbx.run_code("1 + 1").text == "2"
        sbx.files.write("a.txt", "hello")
        assert sbx.files.read("a.txt", format="text") == "hello"
        assert [e.name for e in sbx.files.list(".")] == ["a.txt"]
        assert sbx.files.exists("a.txt") and sbx.files.make_dir("d")
        sbx.files.remove("a.txt")
        assert not sbx.files.exists("a.txt")
    assert not fake.live()


def test_remote_callbacks_stream(service: Service, fake: FakeJail) -> None:
    fake.on_code("x", f.stdout("a"), f.stdout("b"))
    lines: list[str] = []
    with service.client() as client, client.Sandbox() as sbx:
        sbx.run_code("x", on_stdout=lambda m: lines.append(m.line))
    assert lines == ["a", "b"]


def test_remote_errors_are_the_sdks_exceptions(service: Service, fake: FakeJail) -> None:
    with service.client() as client:
        with pytest.raises(PolicyError):
            client.Sandbox(Policy(memory_mb=1 << 20))
        with client.Sandbox(Policy(analysis_block_at="high")) as sbx:
            with pytest.raises(CodeRejected) as caught:
                sbx.run_code("import subprocess")
            assert caught.value.findings[0].rule == "CC101"
            with pytest.raises(FileNotFoundInSandbox):
                sbx.files.read("nope")
        with pytest.raises(SandboxNotFound):
            sbx.run_code("x")


def test_remote_approver_callback_answers(service: Service, fake: FakeJail) -> None:
    asked: list[str] = []
    with (
        service.client() as client,
        client.Sandbox(
            Policy(approval_findings_at="high"), approver=lambda r: asked.append(r.subject) or False
        ) as sbx,
        pytest.raises(ApprovalDenied),
    ):
        sbx.run_code("import subprocess")
    assert asked == ["import subprocess"] and fake.ran() == []


def test_remote_quota_is_quota_exceeded(tmp_path: Path, fake: FakeJail) -> None:
    for service in serve(tmp_path, pool_size=0, quotas=Quotas(live_sandboxes=1)):
        with service.client() as client, client.Sandbox(), pytest.raises(QuotaExceeded):
            client.Sandbox()


def test_remote_one_shot_run_and_audit(service: Service, fake: FakeJail) -> None:
    fake.on_code("print(3)", f.stdout("3\n"), f.end(exit_code=0))
    with service.client() as client:
        ex = client.run("print(3)")
        assert ex.logs.stdout == ["3\n"] and ex.exit_code == 0
        last = client.audit(limit=1000)[-1]
        assert (last["kind"], last["code"], last["outcome"]) == ("run", "print(3)", "ok")


# -- one of each step per request ----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_run_prepares_looks_up_and_analyses_once(
    http: httpx.Client, fake: FakeJail, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    import codecage._analysis
    import codecage._api
    import codecage._approvals
    import codecage._sandbox
    import codecage._service.app
    import codecage._service.manager

    calls: dict[str, int] = {"prepare_code": 0, "get": 0, "analyze": 0}

    def counted(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return fn(*args, **kwargs)

        return call

    sid = create(http)
    headers = {"Accept": "application/x-ndjson"} if stream else {}
    for module in (
        codecage._api,
        codecage._service.manager,
        codecage._sandbox,
        codecage._service.app,
    ):
        if hasattr(module, "prepare_code"):
            monkeypatch.setattr(
                module, "prepare_code", counted("prepare_code", module.prepare_code)
            )
    for module in (
        codecage._analysis,
        codecage._service.manager,
        codecage._approvals,
        codecage._service.app,
    ):
        if hasattr(module, "analyze"):
            monkeypatch.setattr(module, "analyze", counted("analyze", module.analyze))
    manager_get = codecage._service.manager.Manager.get
    monkeypatch.setattr(codecage._service.manager.Manager, "get", counted("get", manager_get))
    response = http.post(f"/v1/sandboxes/{sid}/execute", json={"code": "x"}, headers=headers)
    assert response.status_code == 200
    assert calls == {"prepare_code": 1, "get": 1, "analyze": 1}
    calls.update(dict.fromkeys(calls, 0))
    assert http.post("/v1/run", json={"code": "x"}, headers=headers).status_code == 200
    assert calls == {"prepare_code": 1, "get": 0, "analyze": 1}
    http.delete(f"/v1/sandboxes/{sid}")


# -- background processes: the routes' validation (the process manager itself: tests/) -------


def test_process_routes_refuse_bad_input_and_other_tenants(
    service: Service, http: httpx.Client, fake: FakeJail
) -> None:
    sid = create(http)
    base = f"/v1/sandboxes/{sid}/processes"
    for method, path, body, status in [
        ("POST", base, {}, 400),
        ("POST", base, {"cmd": "id", "user": "admin"}, 422),
        ("POST", base, {"cmd": "id", "pty": {"rows": 0}}, 422),
        ("POST", base, {"cmd": "x" * (1 << 17)}, 422),
        ("POST", f"{base}/1/signal", {"signal": "SIGSTOP"}, 422),
        ("POST", f"{base}/1/stdin", {"data": "!!"}, 400),
        ("POST", f"{base}/1/resize", {"rows": 99999, "cols": 1}, 422),
        ("GET", f"{base}/x/output", None, 422),
        ("GET", f"{base}/1/output?offset=-3", None, 422),
    ]:
        answer = http.request(method, path, json=body)
        assert answer.status_code == status, (path, body, answer.text)
    with service.http("bob") as bob:
        for method, path in [("GET", base), ("POST", f"{base}/1/signal")]:
            answer = bob.request(method, path, json={"signal": "SIGKILL"})
            assert answer.status_code == 404
            assert answer.json()["error"]["type"] == "SandboxNotFound"
    # the fake backend starts no process manager: a clear 409, never a 500
    answer = http.post(base, json={"cmd": "true"})
    assert answer.status_code == 409 and "process manager" in answer.json()["error"]["message"]
    assert http.delete(f"/v1/sandboxes/{sid}").status_code == 204
