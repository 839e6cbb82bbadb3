# ruff: noqa: F811 (the fixtures audit and manager are test_manager's, imported)
"""Pause and resume above the jail (docs/pause.md), attacked, over the fake backend: a resume
racing a pause, the reaper's autoPause on stale state, pause/resume against the run quota,
E2B's autoResume off the event loop and after admission, paused SDK sandboxes dropped by
their owner, and sandbox ids that are not one path segment. The freezer's own behaviour is
tests/test_pause*.py, on the real jail."""

from __future__ import annotations

import contextlib
import gc
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import codecage
from codecage import Policy, Sandbox
from codecage._errors import QuotaExceeded, SandboxError, SandboxNotFound
from codecage._service.audit import AuditLog
from codecage._service.config import Quotas
from codecage._service.e2b import ENVD_PORT
from codecage._service.manager import Manager
from codecage.testing import fake as fakes
from codecage.testing.fake import FakeJail
from tests.unit.test_manager import audit, manager, manager_with  # noqa: F401 (fixtures)
from tests.unit.test_service import KEYS, Service, serve

served = contextlib.contextmanager(serve)


class Gate:
    """Holds a FakeTree's freeze or thaw in the middle until `release()`: a freeze or thaw
    that takes its time, as the kernel's can."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()

    def wrap(self, real: Callable[..., None]) -> Callable[..., None]:
        def slow(tree: fakes.FakeTree, *args: Any, **kwargs: Any) -> None:
            self.entered.set()
            assert self.go.wait(10), "the gate was never released"
            real(tree, *args, **kwargs)

        return slow

    def release(self) -> None:
        self.go.set()


def _frozen(entry: Any) -> bool:
    return bool(entry.sandbox._jailed.launcher.tree.frozen)


# -- 4: a resume racing a pause ----------------------------------------------------------------


def test_a_resume_racing_a_pause_waits_for_it_and_the_state_is_the_freezers(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = manager.create("alice", {}, {})
    sid = entry.sandbox.id
    manager.pause("alice", sid)  # positive control: an uncontended pause and resume
    assert entry.paused_at is not None and _frozen(entry)
    assert manager.resume("alice", sid)[1] and entry.paused_at is None and not _frozen(entry)
    gate = Gate()
    monkeypatch.setattr(fakes.FakeTree, "freeze", gate.wrap(fakes.FakeTree.freeze))
    pausing = threading.Thread(target=manager.pause, args=("alice", sid))
    pausing.start()
    assert gate.entered.wait(10)  # the pause is freezing it now
    resumed: list[bool] = []
    resuming = threading.Thread(target=lambda: resumed.append(manager.resume("alice", sid)[1]))
    resuming.start()
    time.sleep(0.3)  # the resume comes while the freeze is in progress
    gate.release()
    pausing.join(10)
    resuming.join(10)
    assert resumed == [True]  # it took its turn after the pause, and thawed what it froze
    assert entry.paused_at is None and not _frozen(entry) and not entry.sandbox.paused
    assert [e.sandbox.id for e in manager.entries("alice")] == [sid]
    assert manager.start_execute("alice", sid, "1").run_id  # usable: nothing is stuck


def test_an_sdk_resume_racing_a_pause_waits_for_it(
    fake: FakeJail, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Sandbox() as sbx:
        gate = Gate()
        monkeypatch.setattr(fakes.FakeTree, "freeze", gate.wrap(fakes.FakeTree.freeze))
        pausing = threading.Thread(target=sbx.pause)
        pausing.start()
        assert gate.entered.wait(10)
        resuming = threading.Thread(target=sbx.resume)
        resuming.start()
        time.sleep(0.3)
        gate.release()
        pausing.join(10)
        resuming.join(10)
        tree = sbx._jailed.launcher.tree  # type: ignore[attr-defined]
        assert not sbx.paused and not tree.frozen  # the resume thawed what the pause froze
        assert sbx.paused_at is None


# -- 5: the reaper's autoPause on stale state --------------------------------------------------


def _reaper_sees(manager: Manager, meanwhile: Callable[[Any], object]) -> list[Any]:
    """Make the reaper's next autoPause find `meanwhile(entry)` done between its look at
    the entry and its action (as another request's would be); the entries it acted on."""
    real = manager._pause
    acted: list[Any] = []

    def stale(entry: Any, why: str, lifetime_over: bool = False) -> Any:
        if lifetime_over and not acted:
            meanwhile(entry)
        acted.append(entry)
        return real(entry, why, lifetime_over)

    manager._pause = stale  # type: ignore[method-assign]
    return acted


def _auto_paused(manager: Manager, until: Callable[[Any], bool]) -> Any:
    """A sandbox whose lifetime's end (0.3 s) pauses it, once `until(entry)` holds (the
    reaper acted on it), and a moment more for whatever it then does."""
    entry = manager.create("alice", {}, {}, lifetime_s=0.3)
    entry.on_timeout = "pause"
    deadline = time.monotonic() + 10
    while not until(entry) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    return entry


def test_the_reaper_does_not_pause_a_sandbox_given_more_time_meanwhile(
    manager: Manager, audit: AuditLog
) -> None:
    acted = _reaper_sees(manager, lambda e: manager.set_lifetime("alice", e.sandbox.id, 60))
    entry = _auto_paused(manager, lambda e: bool(acted))
    assert acted == [entry]
    assert entry.paused_at is None and not entry.sandbox.paused  # not paused after all
    assert entry.expires_at is not None and entry.expires_at > time.time() + 50  # kept
    kinds = [r["kind"] for r in audit.runs(sandbox_id=entry.sandbox.id)]
    assert "sandbox_pause" not in kinds
    # positive control: one left alone is paused at its lifetime's end
    other = _auto_paused(manager, lambda e: e.paused_at is not None)
    assert other.paused_at is not None and other.sandbox.paused


def test_the_reaper_does_not_pause_a_sandbox_killed_meanwhile(
    manager: Manager, audit: AuditLog
) -> None:
    acted = _reaper_sees(manager, lambda e: manager.delete("alice", e.sandbox.id))
    entry = _auto_paused(manager, lambda e: bool(acted))
    assert acted == [entry] and not entry.sandbox.alive
    assert entry.paused_at is None  # never marked paused
    kinds = [r["kind"] for r in audit.runs(sandbox_id=entry.sandbox.id)]
    assert "sandbox_pause" not in kinds


def test_the_reaper_does_not_pause_a_sandbox_resumed_meanwhile(
    manager: Manager, audit: AuditLog
) -> None:
    def paused_and_resumed(entry: Any) -> None:
        manager.pause("alice", entry.sandbox.id)  # by hand, then resumed: a new lifetime?
        manager.set_lifetime("alice", entry.sandbox.id, 60)
        manager.resume("alice", entry.sandbox.id)

    acted = _reaper_sees(manager, paused_and_resumed)
    entry = _auto_paused(manager, lambda e: bool(acted))
    assert entry.paused_at is None and not entry.sandbox.paused
    kinds = [r["kind"] for r in audit.runs(sandbox_id=entry.sandbox.id)]
    assert kinds.count("sandbox_pause") == 1  # the one by hand only


# -- 6: pause and resume count against the run quota -------------------------------------------


def test_pause_and_resume_count_against_runs_per_minute(audit: AuditLog) -> None:
    m = manager_with(audit, runs_per_minute=4)
    try:
        sid = m.create("alice", {}, {}).sandbox.id
        m.pause("alice", sid)
        m.resume("alice", sid)
        m.pause("alice", sid)
        m.resume("alice", sid)
        with pytest.raises(QuotaExceeded, match="runs per minute"):
            m.pause("alice", sid)  # a fifth recorded operation in the minute
        with pytest.raises(QuotaExceeded, match="runs per minute"):
            m.resume("alice", sid)
        with pytest.raises(QuotaExceeded, match="runs per minute"):
            m.start_execute("alice", sid, "1")  # one quota for all of them
        bobs = m.create("bob", {}, {}).sandbox.id
        m.pause("bob", bobs)  # positive control: another tenant's quota is its own
        m.resume("bob", bobs)
        kinds = [r["kind"] for r in audit.runs(tenant="alice")]
        assert kinds.count("sandbox_pause") == 2 and kinds.count("sandbox_resume") == 2
    finally:
        m.shutdown()


def test_a_pause_past_the_run_quota_is_429(tmp_path: Path, fake: FakeJail) -> None:
    with (
        served(tmp_path, pool_size=0, quotas=Quotas(runs_per_minute=2)) as service,
        service.http() as http,
    ):
        sid = http.post("/v1/sandboxes", json={}).json()["id"]
        assert http.post(f"/v1/sandboxes/{sid}/pause").status_code == 200
        assert http.post(f"/v1/sandboxes/{sid}/resume").status_code == 200
        refused = http.post(f"/v1/sandboxes/{sid}/pause")
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "QuotaExceeded"
        assert http.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"
        assert http.delete(f"/v1/sandboxes/{sid}").status_code == 204


# -- 7: E2B's autoResume off the event loop, after admission -----------------------------------


def _e2b_paused(service: Service) -> tuple[str, str]:
    with httpx.Client(base_url=service.url, headers={"X-API-KEY": KEYS["alice"]}) as api:
        body = {"templateID": "base", "autoPause": True, "autoResume": {"enabled": True}}
        made = api.post("/v2/sandboxes", json=body)
        assert made.status_code == 201, made.text
        sid, token = made.json()["sandboxID"], made.json()["envdAccessToken"]
        assert api.post(f"/sandboxes/{sid}/pause", json={}).status_code == 204
    return sid, token


def _envd(service: Service, sid: str, token: str) -> httpx.Client:
    headers = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": str(ENVD_PORT), "X-Access-Token": token}
    return httpx.Client(base_url=service.url, headers=headers, timeout=30)


def _kill(service: Service, sid: str) -> None:
    with httpx.Client(base_url=service.url, headers={"X-API-KEY": KEYS["alice"]}) as api:
        api.delete(f"/sandboxes/{sid}")


def test_auto_resume_runs_off_the_event_loop(
    tmp_path: Path, fake: FakeJail, monkeypatch: pytest.MonkeyPatch
) -> None:
    with served(tmp_path, pool_size=0) as service:
        sid, token = _e2b_paused(service)
        try:
            gate = Gate()
            monkeypatch.setattr(fakes.FakeTree, "thaw", gate.wrap(fakes.FakeTree.thaw))
            answers: list[int] = []

            def woken() -> None:
                with _envd(service, sid, token) as envd:
                    answers.append(envd.get("/health").status_code)

            waking = threading.Thread(target=woken)
            waking.start()
            assert gate.entered.wait(10)  # the autoResume is thawing it now
            try:
                # the event loop still answers others meanwhile
                health = httpx.get(f"{service.url}/healthz", timeout=3)
                assert health.status_code == 200
            finally:
                gate.release()
                waking.join(30)
            assert answers == [204]  # positive control: the request woke it and was answered
            monkeypatch.undo()
            with httpx.Client(base_url=service.url, headers={"X-API-KEY": KEYS["alice"]}) as api:
                assert api.get(f"/sandboxes/{sid}").json()["state"] == "running"
        finally:
            _kill(service, sid)


def test_auto_resume_comes_after_admission(
    tmp_path: Path, fake: FakeJail, monkeypatch: pytest.MonkeyPatch
) -> None:
    with served(tmp_path, pool_size=0, quotas=Quotas(concurrent_requests=1)) as service:
        first, first_token = _e2b_paused(service)
        second, second_token = _e2b_paused(service)
        try:
            gate = Gate()
            monkeypatch.setattr(fakes.FakeTree, "thaw", gate.wrap(fakes.FakeTree.thaw))

            def woken() -> None:
                with _envd(service, first, first_token) as envd:
                    envd.get("/health")

            waking = threading.Thread(target=woken)
            waking.start()
            try:
                assert gate.entered.wait(10)  # alice's one request in flight: a resume
                with _envd(service, second, second_token) as envd:
                    refused = envd.get("/health", timeout=3)
                assert refused.status_code == 429  # not admitted...
            finally:
                gate.release()
                waking.join(30)
            monkeypatch.undo()
            with httpx.Client(base_url=service.url, headers={"X-API-KEY": KEYS["alice"]}) as api:
                states = {s: api.get(f"/sandboxes/{s}").json()["state"] for s in (first, second)}
            assert states == {first: "running", second: "paused"}  # ...so not resumed
            with _envd(service, second, second_token) as envd:
                assert envd.get("/health").status_code == 204  # positive control: admitted
        finally:
            _kill(service, first)
            _kill(service, second)


# -- 3: a paused SDK sandbox dropped by its owner ----------------------------------------------


def test_a_dropped_paused_sandbox_is_held_and_its_paused_timeout_ends_it(fake: FakeJail) -> None:
    sbx = Sandbox(Policy(idle_timeout_s=0.5, paused_timeout_s=4.0))
    jailed = sbx._jailed
    held = weakref.ref(sbx)
    sbx.pause()
    del sbx
    gc.collect()
    assert held() is not None  # the registry holds it: nothing else could end it
    time.sleep(1.5)  # past idle_timeout_s: paused, its idle clock stands still
    assert jailed.alive
    deadline = time.monotonic() + 10
    while jailed.alive and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not jailed.alive and "paused_timeout_s" in jailed.ended_because
    deadline = time.monotonic() + 5
    while held() is not None and time.monotonic() < deadline:
        gc.collect()  # (the watchdog's round may still name it)
        time.sleep(0.1)
    assert held() is None  # let go once ended
    # positive control: a running one dropped is not held (its GC closes its channels)
    running = Sandbox()
    other = running._jailed
    ref = weakref.ref(running)
    del running
    gc.collect()
    assert ref() is None
    other.kill()


def test_paused_sandboxes_are_killed_at_exit(fake: FakeJail) -> None:
    from codecage._sandbox import _registry

    paused, running = Sandbox(), Sandbox()
    paused.pause()
    _registry.kill_paused()  # what atexit runs
    assert not paused.alive and running.alive
    running.kill()


# -- 8: sandbox ids are one path segment -------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["../approvals", "..", ".", "x/../../approvals", "a?b=1", "a#frag", "%2e%2e", "a/b"]
)
def test_an_id_that_is_no_sandboxes_goes_nowhere_else(
    tmp_path: Path, fake: FakeJail, bad: str
) -> None:
    seen: list[bytes] = []
    answers: list[int] = []
    with (
        served(tmp_path, pool_size=0) as service,
        codecage.connect(service.url, KEYS["alice"]) as client,
    ):
        client._http.event_hooks["request"].append(lambda r: seen.append(r.url.raw_path))
        client._http.event_hooks["response"].append(lambda r: answers.append(r.status_code))
        with pytest.raises(SandboxError):  # SandboxNotFound; an id with "/" routes nowhere
            client.connect_sandbox(bad, resume=False)
        with pytest.raises(SandboxError):
            client.connect_sandbox(bad)  # POST .../resume
        assert answers == [404, 404]
        for path in seen:
            assert path.startswith(b"/v1/sandboxes/") and path.count(b"/") == 3 + (
                path.endswith(b"/resume")
            )
        made = client.Sandbox()  # positive control: a real id is found
        assert client.connect_sandbox(made.id).id == made.id
        made.kill()


def test_the_cli_quotes_the_id(tmp_path: Path, fake: FakeJail, capsys: Any) -> None:
    from codecage._cli.main import main

    with served(tmp_path, pool_size=0) as service, service.client() as client:
        victim = client.Sandbox()
        env = ["--url", service.url, "--key", KEYS["alice"]]
        # unquoted, "x/../<victim>" would be DELETE /v1/sandboxes/<victim>
        assert main(["sandboxes", "kill", f"x/../{victim.id}", *env]) != 0
        assert client.connect_sandbox(victim.id, resume=False).alive
        assert victim.id in [s["id"] for s in client.request("GET", "/v1/sandboxes").json()]
        assert main(["sandboxes", "kill", victim.id, *env]) == 0  # positive control
        listed = client.request("GET", "/v1/sandboxes").json()
        assert victim.id not in [s["id"] for s in listed]
    capsys.readouterr()


def test_the_service_refuses_ids_that_are_not_a_sandboxes(manager: Manager) -> None:
    entry = manager.create("alice", {}, {})
    for bad in ("", "x" * 10_000, entry.sandbox.id.upper(), entry.sandbox.id + "\n", "../keys"):
        with pytest.raises(SandboxNotFound) as raised:
            manager.get("alice", bad)
        assert len(str(raised.value)) < 120  # not echoed in full
    assert manager.get("alice", entry.sandbox.id) is entry
