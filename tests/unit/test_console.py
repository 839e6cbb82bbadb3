"""The console's pure logic (sessions, CSRF, cookies, image checks, escaping, charts) and
its refusals, against the service in this process over the fake backend. The browser tests
on a real `codecage serve` are tests/test_console.py. Every refusal has its positive
control: the same request, right, is served."""

from __future__ import annotations

import base64
import contextlib
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import httpx
import pytest

import codecage
from codecage import ApprovalDenied, Policy
from codecage._service.config import Console
from codecage._service.console import charts, safety, sessions
from codecage._service.console.pages import templates
from codecage.testing import fake as fakes
from tests.unit.test_service import KEYS, Service, serve

OPERATOR_KEY = "key-operator-0123456789"


def png() -> bytes:
    """A real 1x1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


# -- sessions, CSRF, cookies -------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_ends_when_idle_and_at_its_maximum_age() -> None:
    clock = Clock()
    store = sessions.Sessions(idle_s=60, max_age_s=300, clock=clock)
    one = store.create("ops", "operator", "abc", "Olga")
    for _ in range(5):  # used every 50 s: never idle for 60 s, alive for 300 s
        clock.now += 50
        assert store.get(one.id) == (one, "")
    clock.now += 51  # 301 s after sign-in, 51 s after its last use
    assert store.get(one.id) == (None, "expired")  # too old, however much in use
    two = store.create("ops", "operator", "abc", "Olga")
    clock.now += 61
    assert store.get(two.id) == (None, "expired")  # idle too long
    assert store.get(two.id) == (None, "unknown")  # and forgotten
    assert store.get(None) == (None, "none")
    three = store.create("ops", "operator", "abc", "Olga")
    assert three.id != two.id and three.csrf != two.csrf  # fresh at every sign-in


def test_csrf_token_must_be_the_sessions_own() -> None:
    store = sessions.Sessions(60, 300)
    one, two = store.create("a", "operator", "k", "a"), store.create("b", "operator", "k", "b")
    assert sessions.csrf_ok(one, one.csrf)  # the positive control
    assert not sessions.csrf_ok(one, two.csrf)
    assert not sessions.csrf_ok(one, "")
    assert not sessions.csrf_ok(one, None)
    assert not sessions.csrf_ok(one, one.csrf[:-1])


def test_cookie_is_httponly_strict_and_secure_only_over_https() -> None:
    plain = sessions.cookie_header("v", secure=False, max_age_s=60)
    assert plain == "codecage_console=v; HttpOnly; SameSite=Strict; Path=/; Max-Age=60"
    secure = sessions.cookie_header("v", secure=True, max_age_s=None)
    assert secure.startswith("__Host-codecage_console=v;") and "; Secure" in secure
    forwarded = {b"x-forwarded-proto": b"https"}
    assert sessions.is_https("https", {}, False)
    assert sessions.is_https("http", forwarded, True)  # a proxy the config trusts
    assert not sessions.is_https("http", forwarded, False)  # anyone could send the header
    assert not sessions.is_https("http", {b"x-forwarded-proto": b"http"}, True)
    assert sessions.session_id_of({"__Host-codecage_console": "a", "codecage_console": "b"}) == "a"


# -- images, escaping, findings --------------------------------------------------------


def test_images_are_served_only_as_what_their_bytes_are() -> None:
    real = png()
    assert safety.image_type(real, "image/png") == "image/png"  # the positive control
    jpeg = b"\xff\xd8\xff\xe0" + b"\x00" * 32 + b"\xff\xd9"
    assert safety.image_type(jpeg, "image/jpeg") == "image/jpeg"
    assert safety.image_type(b"<script>alert(1)</script>", "image/png") is None
    assert safety.image_type(b"<svg onload=alert(1)>", "image/jpeg") is None
    assert safety.image_type(real, "image/jpeg") is None  # not what it was declared as
    assert safety.image_type(real, "text/html") is None
    assert safety.image_type(b"\x89PNG\r\n\x1a\n", "image/png") is None  # a signature alone


def test_sandbox_text_renders_as_text() -> None:
    hostile = '<script>document.title="pwned"</script><button id="forged">Approve</button>'
    run = {
        "id": "r1", "tenant": "alice", "kind": "execute", "sandbox_id": None, "node": "n",
        "started_at": 0.0, "ended_at": 1.0, "status": "completed", "outcome": "ok",
        "error_name": hostile, "killed_by": None, "limits_hit": [hostile], "duration_ms": 1.0,
        "peak_memory_mb": 1.0, "code_bytes": 1, "code_truncated": False, "code_sha256": "ab" * 32,
        "output": hostile, "output_truncated": False, "findings": [],
        "files": [{"direction": "upload", "path": hostile, "size": 1, "sha256": "x"}],
        "approval": None, "policy": {"note": hostile},
    }  # fmt: skip
    lines = safety.code_lines(
        hostile, [{"rule": "CC1", "severity": "high", "line": 1, "message": hostile}]
    )
    html = templates.get_template("run.html").render(
        session=None, flashes=[hostile], now=0.0, run=run, images=[], lines=lines
    )
    assert "<script>document" not in html and 'id="forged"' not in html
    assert "&lt;script&gt;document.title=" in html  # there, as text
    assert html.count("&lt;button id=&#34;forged&#34;&gt;") >= 5


def test_findings_mark_their_lines() -> None:
    lines = safety.code_lines(
        "import os\nimport subprocess\n",
        [{"rule": "CC101", "severity": "high", "line": 2, "message": "spawns processes"},
         {"rule": "CC9", "severity": "low", "line": 99, "message": "nowhere"}],
    )  # fmt: skip
    assert [line.findings for line in lines] == [
        ["CC9 low: nowhere"],
        ["CC101 high: spawns processes"],
        [],
    ]


# -- charts ------------------------------------------------------------------------------


def test_latency_quantiles_from_histogram_buckets() -> None:
    buckets = {0.01: 50.0, 0.1: 90.0, 1.0: 100.0, float("inf"): 100.0}
    assert charts.quantile(buckets, 0.5) == pytest.approx(0.01)
    assert charts.quantile(buckets, 0.9) == pytest.approx(0.1)
    assert charts.quantile(buckets, 0.95) == pytest.approx(0.55)
    assert charts.quantile({0.1: 0.0, float("inf"): 0.0}, 0.5) is None


def test_runs_per_minute_are_counter_deltas() -> None:
    base = 60.0 * 1000
    samples = [
        charts.Sample(base + 1, runs={"ok": 10.0}),
        charts.Sample(base + 59, runs={"ok": 13.0, "error": 1.0}),
        charts.Sample(base + 61, runs={"ok": 15.0, "error": 1.0}),
    ]
    series = charts.runs_series(samples, base + 70)
    assert series["ok"] == [(base, 3.0), (base + 60, 2.0)]
    assert series["error"] == [(base, 1.0), (base + 60, 0.0)]


def test_chart_labels_are_escaped() -> None:
    svg = charts.svg("<t>", {"<script>x</script>": [(99.0, 1.0)]}, "u&", 100.0)
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "u&amp;" in svg


# -- the console in the service (fake backend) ------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with fakes.installed():
        for svc in serve(
            tmp_path_factory.mktemp("console"),
            pool_size=0,
            console=Console(idle_timeout_s=1.0, trust_forwarded_proto=True),
        ):
            svc.audit.add_key(OPERATOR_KEY, "ops", role="operator")
            yield svc


@contextlib.contextmanager
def signed_in(service: Service, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30) as browser:
        response = browser.post("/console/signin", data={"key": key, "name": "Olga"})
        assert response.status_code == 303, response.text
        yield browser


def csrf(browser: httpx.Client) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', browser.get("/console/runs").text)
    assert found is not None
    return found.group(1)


def test_a_wrong_key_is_refused_and_sets_no_cookie(service: Service) -> None:
    with httpx.Client(base_url=service.url) as browser:
        wrong = browser.post("/console/signin", data={"key": "not-a-key"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        assert "not a key of this service" in wrong.text
        assert browser.get("/console/runs").status_code == 303  # to the sign-in page
        right = browser.post("/console/signin", data={"key": KEYS["alice"]})
        assert right.status_code == 303 and "HttpOnly" in right.headers["set-cookie"]
        assert "Secure" not in right.headers["set-cookie"]  # plain http, no proxy header
        assert browser.get("/console/runs").status_code == 200


def test_secure_cookie_behind_a_trusted_tls_proxy(service: Service) -> None:
    with httpx.Client(base_url=service.url, headers={"X-Forwarded-Proto": "https"}) as proxy:
        response = proxy.post("/console/signin", data={"key": KEYS["alice"]})
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("__Host-codecage_console=") and "; Secure" in cookie


def test_no_key_in_a_url(service: Service) -> None:
    """A key in the query string signs nobody in: the key goes in the form's body only."""
    with httpx.Client(base_url=service.url) as browser:
        response = browser.post(f"/console/signin?key={KEYS['alice']}")
        assert response.status_code == 401 and "set-cookie" not in response.headers


def waiting_run(
    service: Service, tenant: str = "alice"
) -> tuple[threading.Thread, dict[str, object]]:
    """A run of `tenant`'s that waits for an approval; the dict gets its answer."""
    out: dict[str, object] = {}

    def go() -> None:
        with (
            service.client(tenant) as client,
            client.Sandbox(Policy(approval_findings_at="high")) as sbx,
        ):
            try:
                out["execution"] = sbx.run_code("import subprocess")
            except ApprovalDenied as exc:
                out["denied"] = exc

    thread = threading.Thread(target=go)
    thread.start()
    return thread, out


def pending_id(browser: httpx.Client) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.search(r'id="approval-([0-9a-f]+)"', browser.get("/console/approvals/live").text)
        if found:
            return found.group(1)
        time.sleep(0.05)
    raise AssertionError("no approval appeared")


def test_a_forged_csrf_token_or_origin_changes_nothing(service: Service) -> None:
    thread, out = waiting_run(service)
    with signed_in(service, OPERATOR_KEY) as browser:
        approval = pending_id(browser)
        token = csrf(browser)
        url = f"/console/approvals/{approval}"
        forged = browser.post(url, data={"csrf": token[::-1], "decision": "approve"})
        assert forged.status_code == 403 and "security token" in forged.text
        missing = browser.post(url, data={"decision": "approve"})
        assert missing.status_code == 403
        elsewhere = browser.post(
            url, data={"csrf": token, "decision": "approve"}, headers={"Origin": "http://evil.test"}
        )
        assert elsewhere.status_code == 403
        assert pending_id(browser) == approval  # still waiting: nothing changed
        right = browser.post(url, data={"csrf": token, "decision": "deny", "reason": "no"})
        assert right.status_code == 303
        thread.join(30)
        assert isinstance(out["denied"], ApprovalDenied)
        assert "denied by Olga (console): no" in str(out["denied"])
        again = browser.post(
            url, data={"csrf": token, "decision": "approve"}, follow_redirects=True
        )
        assert "already decided: denied by Olga (console)" in again.text
    row = next(a for a in service.audit.approvals(tenant="alice") if a["id"] == approval)
    assert (row["approved"], row["decided_by"], row["reason"]) == (False, "Olga (console)", "no")
    assert row["decided_key"]


def test_an_expired_session_is_refused(service: Service) -> None:
    with signed_in(service, OPERATOR_KEY) as browser:
        token = csrf(browser)
        assert browser.get("/console/sandboxes").status_code == 200  # the positive control
        time.sleep(1.2)  # idle_timeout_s = 1
        post = browser.post("/console/signout", data={"csrf": token})
        assert post.status_code == 401 and "your session has expired" in post.text
        assert browser.get("/console/approvals/live").status_code == 401  # the poll
        page = browser.get("/console/sandboxes")
        assert page.status_code == 303  # a page goes to the sign-in page
        assert page.headers["location"].startswith("/console/signin?ended=")
    with signed_in(service, OPERATOR_KEY) as browser:
        time.sleep(1.2)
        page = browser.get("/console/sandboxes")
        assert page.headers["location"] == "/console/signin?ended=expired"
        note = browser.get(page.headers["location"])
        assert "Your session expired" in note.text


def test_another_tenants_run_is_not_found(service: Service) -> None:
    with service.client() as client:
        client.run("print(1)")
    run_id = service.audit.runs(tenant="alice")[-1]["id"]
    with signed_in(service, KEYS["bob"]) as bob, signed_in(service, KEYS["alice"]) as alice:
        refused = bob.get(f"/console/runs/{run_id}")
        assert refused.status_code == 404 and "no run" in refused.text
        assert run_id not in bob.get("/console/runs").text
        assert run_id not in bob.get("/console/runs?tenant=alice").text  # a client's own only
        assert alice.get(f"/console/runs/{run_id}").status_code == 200
        assert run_id in alice.get("/console/runs").text
        # read-only: a client key sees no approvals, no sandboxes, kills nothing
        assert alice.get("/console/sandboxes").status_code == 403
        assert alice.get("/console/approvals").status_code == 403


def test_kill_from_the_console_is_audited(service: Service) -> None:
    with (
        service.client() as client,
        client.Sandbox() as sbx,
        signed_in(service, OPERATOR_KEY) as browser,
    ):
        assert sbx.id in browser.get("/console/sandboxes").text
        token = csrf(browser)
        forged = browser.post(f"/console/sandboxes/{sbx.id}/kill", data={"csrf": "x"})
        assert forged.status_code == 403 and sbx.run_code("1").error is None
        with signed_in(service, KEYS["alice"]) as tenant:  # a client key kills nothing
            denied = tenant.post(f"/console/sandboxes/{sbx.id}/kill", data={"csrf": csrf(tenant)})
            assert denied.status_code == 403 and sbx.run_code("1").error is None
        done = browser.post(f"/console/sandboxes/{sbx.id}/kill", data={"csrf": token})
        assert done.status_code == 303
        with pytest.raises(codecage.SandboxNotFound):
            sbx.run_code("1")
        kills = [r for r in service.audit.runs(sandbox_id=sbx.id) if r["kind"] == "sandbox_kill"]
        assert len(kills) == 1 and "by Olga (operator key" in kills[0]["code"]
        assert f"sandbox-{sbx.id}" not in browser.get("/console/sandboxes").text


def test_audit_filters_and_export(service: Service, fake: fakes.FakeJail) -> None:
    fake.on_code("boom", fakes.error("ValueError", "x"))
    with service.client() as client, client.Sandbox() as sbx:
        assert sbx.run_code("boom").error is not None
    with signed_in(service, OPERATOR_KEY) as browser:
        errors = browser.get("/console/runs", params={"outcome": "error", "tenant": "alice"}).text
        assert "<code>boom</code>" in errors and "outcome-ok" not in errors
        none = browser.get("/console/runs", params={"tenant": "nobody"}).text
        assert "No runs match" in none
        exported = browser.get("/console/runs/export", params={"outcome": "error"})
        lines = exported.text.splitlines()
        assert lines and all('"outcome": "error"' in line for line in lines)


def test_a_runs_images_are_served_only_if_they_are_png(
    service: Service, fake: fakes.FakeJail
) -> None:
    real, forged = base64.b64encode(png()).decode(), base64.b64encode(b"<script>x</script>")
    fake.on_code("show", fakes.result({"text/plain": "fig", "image/png": real}, main=False),
                 fakes.result({"text/plain": "fig", "image/png": forged.decode()}, main=False))  # fmt: skip
    with service.client() as client, client.Sandbox() as sbx:
        sbx.run_code("show")
    run_id = service.audit.runs(tenant="alice")[-1]["id"]
    with signed_in(service, KEYS["alice"]) as alice, signed_in(service, KEYS["bob"]) as bob:
        page = alice.get(f"/console/runs/{run_id}").text
        assert f"/console/runs/{run_id}/images/0" in page  # the real one is shown
        assert f"/console/runs/{run_id}/images/1" not in page
        assert "not the image/png it claims to be" in page
        image = alice.get(f"/console/runs/{run_id}/images/0")
        assert image.status_code == 200 and image.content == png()
        assert image.headers["content-type"] == "image/png"
        assert "sandbox" in image.headers["content-security-policy"]
        refused = alice.get(f"/console/runs/{run_id}/images/1")
        assert refused.status_code == 415 and b"<script>x" not in refused.content
        assert bob.get(f"/console/runs/{run_id}/images/0").status_code == 404  # not bob's
