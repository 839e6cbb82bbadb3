"""Attacks on the console (a security review, docs/console.md "Security properties"),
against the service in this process over the fake backend: each probe with its positive
control, the same request made right (or made where it should work) and served. The
ones that need a real browser or a real `codecage serve` are tests/test_console_attacks.py."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from codecage import ApprovalDenied
from codecage._errors import AuditUnavailable
from codecage._service.config import Console
from codecage._service.console import cookies, sessions
from codecage.testing import fake as fakes
from tests.unit.test_console import waiting_run
from tests.unit.test_service import KEYS, Service, serve

OPERATOR_KEY = "key-operator-0123456789"
APPROVER_KEY = "key-approver-0123456789"  # alice's approver (tests/unit/test_service.py)
BOB_APPROVER_KEY = "key-approver-bob-0123456789"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with fakes.installed():
        for svc in serve(
            tmp_path_factory.mktemp("console-attacks"),
            pool_size=0,
            console=Console(trust_forwarded_proto=True),
        ):
            svc.audit.add_key(OPERATOR_KEY, "ops", role="operator")
            svc.audit.add_key(BOB_APPROVER_KEY, "bob", role="approver")
            yield svc


@contextlib.contextmanager
def browser(service: Service, key: str, **headers: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30, headers=headers) as client:
        response = client.post("/console/signin", data={"key": key, "name": "Olga"})
        assert response.status_code == 303, response.text
        client.cookies = dict([cookie_of(response)])  # (httpx keeps a Secure one for https)
        yield client


def token(client: httpx.Client) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', client.get("/console/runs").text)
    assert found is not None
    return found.group(1)


def cookie_of(response: httpx.Response) -> tuple[str, str]:
    found = re.match(r"([^=]+)=([^;]*);", response.headers["set-cookie"])
    assert found is not None
    return found.group(1), found.group(2)


# -- sessions ----------------------------------------------------------------------------


def test_one_key_signing_in_again_and_again_does_not_sign_out_others() -> None:
    """A client key's holder signing in MAX_SESSIONS times used to push every other
    session out of the table (the oldest went first, whoever's): an operator signed out
    by any tenant. Now a key's own oldest sessions go first."""
    store = sessions.Sessions(idle_s=600, max_age_s=3600)
    operator = store.create("ops", "operator", "op-key", "Olga")
    first = store.create("alice", "client", "alice-key", "alice")
    for _ in range(sessions.MAX_SESSIONS + 1):
        last = store.create("alice", "client", "alice-key", "alice")
    assert store.get(operator.id) == (operator, "")  # another key's session lives on
    assert store.get(last.id) == (last, "")  # the positive control: the flooder's newest
    assert store.get(first.id) == (None, "unknown")  # its own oldest went
    assert len(store._by_id) <= sessions.MAX_PER_KEY + 1


def test_a_full_table_drops_the_ended_sessions_first() -> None:
    clock = [1000.0]
    store = sessions.Sessions(idle_s=60, max_age_s=3600, clock=lambda: clock[0])
    oldest = store.create("ops", "operator", "op-key", "Olga")
    stale = [store.create("t", "client", f"k{i}", "t") for i in range(sessions.MAX_SESSIONS - 1)]
    for s in stale[:10]:  # ten sessions end (idle); the operator's keeps being used
        s.seen_at = clock[0] - 61
    store.create("t", "client", "new-key", "t")  # one over the cap
    assert store.get(oldest.id) == (oldest, "")  # not the oldest: an ended one went
    assert store.get(stale[10].id)[0] is stale[10]


def test_signing_in_again_ends_the_session_the_browser_had(service: Service) -> None:
    with browser(service, KEYS["alice"]) as client:
        before = dict(client.cookies)
        assert client.get("/console/runs").status_code == 200
        again = client.post("/console/signin", data={"key": KEYS["alice"]})
        assert again.status_code == 303 and cookie_of(again)[1] != next(iter(before.values()))
        assert client.get("/console/runs").status_code == 200  # the new session works
    with httpx.Client(base_url=service.url, cookies=before) as old:
        stale = old.get("/console/runs")
        assert stale.status_code == 303 and "/console/signin" in stale.headers["location"]


def test_signing_out_ends_the_session_on_the_server(service: Service) -> None:
    with browser(service, KEYS["alice"]) as client:
        kept = dict(client.cookies)
        assert client.post("/console/signout", data={"csrf": token(client)}).status_code == 303
    with httpx.Client(base_url=service.url, cookies=kept) as replay:  # the cookie, replayed
        assert replay.get("/console/runs").status_code == 303
    with httpx.Client(base_url=service.url, cookies={"codecage_console": "A" * 43}) as fixed:
        assert fixed.get("/console/runs").status_code == 303  # a chosen id names nothing
        signed = fixed.post("/console/signin", data={"key": KEYS["alice"]})
        assert cookie_of(signed)[1] != "A" * 43  # a new id at sign-in, never the one given


def test_another_apps_cookie_does_not_hide_the_session(service: Service) -> None:
    """Cookies are shared by every port of a host: another app on 127.0.0.1 that sets a
    cookie http.cookies cannot parse (JSON, a space) made every console request look
    signed out (http.cookies stops at it)."""
    parsed = cookies({"headers": [(b"cookie", b'prefs={"a": 1}; codecage_console=abc')]})
    assert parsed["codecage_console"] == "abc"
    with browser(service, KEYS["alice"]) as client:
        name, value = next(iter(client.cookies.items()))
        assert client.get("/console/runs").status_code == 200  # the positive control
        for other in ('prefs={"theme": "dark"}', "greeting=hello world"):
            headers = {"Cookie": f"{other}; {name}={value}"}
            with httpx.Client(base_url=service.url, headers=headers) as raw:
                assert raw.get("/console/runs").status_code == 200, other


def test_over_https_only_the_host_prefixed_cookie_counts(service: Service) -> None:
    """Anyone who can write a cookie for the host (another port, a plain-http answer, a
    sibling domain) can set `codecage_console`; only `__Host-` is the browser's promise
    that it came from this https origin."""
    https = {"X-Forwarded-Proto": "https"}
    with httpx.Client(base_url=service.url, headers=https) as client:
        signed = client.post("/console/signin", data={"key": KEYS["alice"]})
        name, value = cookie_of(signed)
        assert name == "__Host-codecage_console"
    with httpx.Client(base_url=service.url, headers=https, cookies={name: value}) as right:
        assert right.get("/console/runs").status_code == 200  # the positive control
    tossed = {"codecage_console": value}
    with httpx.Client(base_url=service.url, headers=https, cookies=tossed) as planted:
        assert planted.get("/console/runs").status_code == 303
    with httpx.Client(base_url=service.url, cookies=tossed) as plain:  # plain http: it counts
        assert plain.get("/console/runs").status_code == 200


# -- CSRF and origins --------------------------------------------------------------------


def test_origin_checks_on_every_form(service: Service) -> None:
    host = service.url.split("//", 1)[1]
    port = int(host.rsplit(":", 1)[1])
    bad = [
        {"Origin": "http://evil.test"},
        {"Origin": "null"},
        {"Origin": f"http://127.0.0.1:{port + 1}"},  # another port is another origin
        {"Origin": f"http://localhost:{port}"},
        {"Referer": "http://evil.test/console/approvals"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # another port of this host
    ]
    with browser(service, OPERATOR_KEY) as client:
        csrf = token(client)
        for headers in bad:
            for path, data in (
                ("/console/signout", {"csrf": csrf}),
                ("/console/sandboxes/" + "0" * 32 + "/kill", {"csrf": csrf}),
                ("/console/approvals/" + "0" * 32, {"csrf": csrf, "decision": "approve"}),
            ):
                refused = client.post(path, data=data, headers=headers)
                assert refused.status_code == 403, (headers, path)
            login = client.post("/console/signin", data={"key": KEYS["bob"]}, headers=headers)
            assert login.status_code == 403 and "set-cookie" not in login.headers, headers
        assert client.get("/console/sandboxes").status_code == 200  # still the operator
        # The positive controls: our own origin, a Referer of ours, no header at all.
        for headers in ({"Origin": f"http://{host}"}, {"Referer": f"http://{host}/console"}, {}):
            ok = client.post(
                "/console/sandboxes/" + "0" * 32 + "/kill", data={"csrf": csrf}, headers=headers
            )
            assert ok.status_code == 303, headers
        assert client.post("/console/signout", data={"csrf": csrf}).status_code == 303


def test_a_plain_http_origin_is_refused_when_the_console_is_https(service: Service) -> None:
    host = service.url.split("//", 1)[1]
    with browser(service, KEYS["alice"], **{"X-Forwarded-Proto": "https"}) as client:
        csrf = token(client)
        http = client.post(
            "/console/signout", data={"csrf": csrf}, headers={"Origin": f"http://{host}"}
        )
        assert http.status_code == 403
        assert client.get("/console/runs").status_code == 200  # still signed in
        login = client.post(
            "/console/signin", data={"key": KEYS["bob"]}, headers={"Origin": f"http://{host}"}
        )
        assert login.status_code == 403 and "set-cookie" not in login.headers
        ok = client.post(
            "/console/signout", data={"csrf": csrf}, headers={"Origin": f"https://{host}"}
        )
        assert ok.status_code == 303


def test_no_get_changes_anything(service: Service) -> None:
    """The state-changing routes answer GET with 405 (and change nothing)."""
    with browser(service, OPERATOR_KEY) as client:
        for path in (
            "/console/signout",
            "/console/approvals/" + "0" * 32,
            "/console/sandboxes/" + "0" * 32 + "/kill",
        ):
            assert client.get(path).status_code in (404, 405), path
        assert client.get("/console/sandboxes").status_code == 200  # still signed in


# -- tenants -----------------------------------------------------------------------------


def pending(service: Service, tenant: str) -> str:
    deadline = time.monotonic() + 20
    with browser(service, OPERATOR_KEY) as ops:
        while time.monotonic() < deadline:
            live = ops.get("/console/approvals/live").text
            for match in re.finditer(
                r'id="approval-([0-9a-f]+)".*?tenant ([^<]+)</span>', live, re.S
            ):
                if match.group(2) == tenant:
                    return match.group(1)
            time.sleep(0.05)
    raise AssertionError("no approval appeared")


def test_an_approver_decides_its_own_tenants_requests_only(service: Service) -> None:
    thread, out = waiting_run(service, "alice")
    approval = pending(service, "alice")
    url = f"/console/approvals/{approval}"
    with browser(service, BOB_APPROVER_KEY) as bob, browser(service, KEYS["alice"]) as client:
        assert approval not in bob.get("/console/approvals/live").text
        other = bob.post(
            url, data={"csrf": token(bob), "decision": "approve"}, follow_redirects=True
        )
        assert "no pending approval" in other.text and "already decided" not in other.text
        # a client key (alice's own) may not decide at all
        mine = client.post(url, data={"csrf": token(client), "decision": "approve"})
        assert mine.status_code == 403
    with browser(service, APPROVER_KEY) as alice:  # the positive control
        assert approval in alice.get("/console/approvals/live").text
        done = alice.post(url, data={"csrf": token(alice), "decision": "deny", "reason": "no"})
        assert done.status_code == 303
    thread.join(30)
    assert isinstance(out.get("denied"), ApprovalDenied)
    with browser(service, BOB_APPROVER_KEY) as bob:  # nor does bob see alice's decision
        again = bob.post(
            url, data={"csrf": token(bob), "decision": "approve"}, follow_redirects=True
        )
        assert "already decided" not in again.text and "denied by" not in again.text
        assert "<td>alice</td>" not in bob.get("/console/approvals/live").text
    with browser(service, OPERATOR_KEY) as ops:  # the control: the operator sees it
        assert "<td>alice</td>" in ops.get("/console/approvals/live").text


def test_filters_and_export_keep_a_tenant_to_its_own(service: Service) -> None:
    with service.client("alice") as client:
        client.run("print('alice-secret')")
    run_id = service.audit.runs(tenant="alice")[-1]["id"]
    with browser(service, KEYS["bob"]) as bob, browser(service, BOB_APPROVER_KEY) as approver:
        for who in (bob, approver):
            for params in ({"tenant": "alice"}, {"tenant": "alice", "sandbox": ""}, {}):
                assert "alice-secret" not in who.get("/console/runs", params=params).text
                assert "alice-secret" not in who.get("/console/runs/export", params=params).text
            assert who.get(f"/console/runs/{run_id}").status_code == 404
            assert who.get(f"/console/runs/{run_id}/images/0").status_code == 404
            assert who.get("/console/sandboxes").status_code == 403
            assert who.get("/console/charts/runs.svg").status_code == 403
    with browser(service, KEYS["alice"]) as alice, browser(service, OPERATOR_KEY) as ops:
        assert "alice-secret" in alice.get("/console/runs/export").text  # the controls
        assert "alice-secret" in ops.get("/console/runs/export", params={"tenant": "alice"}).text


# -- what an answer says and carries -----------------------------------------------------


def test_every_console_answer_carries_the_security_headers(service: Service) -> None:
    with browser(service, KEYS["alice"]) as client:
        assert client.get("/console/runs").headers["x-frame-options"] == "DENY"  # the control
        for path in ("/console/runs?before=x", "/console/nope", "/console/static/nope.js"):
            answer = client.get(path)
            assert answer.status_code in (404, 422), path
            assert answer.headers.get("x-frame-options") == "DENY", path
            assert answer.headers.get("x-content-type-options") == "nosniff", path
            assert "frame-ancestors 'none'" in answer.headers.get("content-security-policy", "")
        big = client.post("/console/signin", data={"key": "x" * 70_000})
        assert big.status_code == 413 and big.headers.get("x-content-type-options") == "nosniff"


def test_an_unreachable_audit_log_at_sign_in_does_not_say_where_it_is(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sign-in page is open to anyone: the database's address and the driver's words
    are for the service's log (the API's admission already keeps them there)."""

    def down(key: str) -> None:
        raise AuditUnavailable(
            "the audit log (postgresql://codecage:***@10.1.2.3:5432/codecage) cannot be"
            ' read: connection to server at "10.1.2.3", port 5432 failed'
        )

    with httpx.Client(base_url=service.url) as client:
        assert client.post("/console/signin", data={"key": KEYS["alice"]}).status_code == 303
        monkeypatch.setattr(service.audit, "identity", down)
        answer = client.post("/console/signin", data={"key": KEYS["alice"]})
        assert answer.status_code == 503 and "set-cookie" not in answer.headers
        assert "cannot be reached" in answer.text  # it says what, not where
        assert "10.1.2.3" not in answer.text and "postgresql" not in answer.text
        assert "Traceback" not in answer.text


def test_the_key_is_never_echoed(service: Service) -> None:
    key = KEYS["alice"]
    with httpx.Client(base_url=service.url) as client:
        wrong = client.post("/console/signin", data={"key": key + "x", "name": key})
        assert wrong.status_code == 401 and key not in wrong.text
        right = client.post("/console/signin", data={"key": key, "name": "Olga"})
        assert key not in right.headers.get("location", "") and key not in str(right.headers)
        for path in ("/console/runs", "/console/runs/export"):
            assert key not in client.get(path).text
