"""Pause and resume (docs/pause.md) on the real jail: the cgroup freezer stops every process
of a sandbox (the host's own CPU reading proves it, against the same reading of the same
sandbox running), its clocks stop (idle timeout, lifetime) while paused_timeout_s runs,
and nothing reaches a paused sandbox; through the native SDK on every backend, the HTTP
API, the remote SDK (from a client that was not there at the pause), the CLI and E2B's
own SDK; a service killed with a paused sandbox leaves it to the next start's sweep."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox as E2BSandbox
from e2b import SandboxQuery, SandboxState
from e2b_code_interpreter import Sandbox as InterpreterSandbox

import codecage
from codecage import Policy, Sandbox, SandboxBusy, SandboxNotFound, SandboxPaused

from .conftest import Service, start_service, stop_service
from .e2b_server import env_for
from .test_service import _leftover_cgroups, _server_sandboxes, runs

pytestmark = pytest.mark.requires_root

SPIN = (
    "import threading\n"
    "def spin():\n"
    "    while True: pass\n"
    "threading.Thread(target=spin, daemon=True).start()\n"
    "kept = 41\n"
)


def cpu_over(sbx: Sandbox, seconds: float) -> float:
    """The host's reading of the sandbox's CPU time used over `seconds`."""
    before = sbx._jailed.usage().cpu_s
    time.sleep(seconds)
    return sbx._jailed.usage().cpu_s - before


def seen_spinning(sbx: Sandbox, timeout: float = 15.0) -> bool:
    """Whether, within `timeout`, the sandbox uses over 0.05 s of CPU in a 0.5 s window:
    five times what a frozen one may show (a loaded host can give a spinner less than a
    fifth of a core for a moment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cpu_over(sbx, 0.5) > 0.05:
            return True
    return False


def test_a_paused_sandbox_runs_nothing_and_resumes_where_it_was(backend: str) -> None:
    with Sandbox(Policy(isolation=backend, allow_weaker=True)) as sbx:  # type: ignore[arg-type]
        sbx.run_code(SPIN)  # a thread of the kernel spins: the sandbox always uses CPU
        assert seen_spinning(sbx)  # positive control: running, it is seen to spin
        sbx.pause()
        assert sbx.paused
        assert cpu_over(sbx, 0.5) == pytest.approx(0.0, abs=0.01)  # frozen: not one tick
        with pytest.raises(SandboxPaused):
            sbx.run_code("1")
        with pytest.raises(SandboxPaused):
            sbx.files.write("f.txt", "x")
        with pytest.raises(SandboxPaused):
            sbx.pause()
        paused_for = sbx.resume()
        assert paused_for >= 0.5 and not sbx.paused
        assert seen_spinning(sbx)  # the spinner goes on
        assert sbx.run_code("kept + 1").text == "42"  # the same interpreter, its state kept


def test_background_processes_are_frozen_too() -> None:
    with Sandbox() as sbx:
        cmd = sbx.commands.run("while :; do date +%s%N >> /tmp/ticks; done", background=True)
        while not (sbx.files.exists("/tmp/ticks") and sbx.files.read("/tmp/ticks")):
            time.sleep(0.05)  # the loop has started
        sbx.pause()
        stopped = sbx._jailed.usage().cpu_s
        time.sleep(0.5)
        assert sbx._jailed.usage().cpu_s - stopped == pytest.approx(0.0, abs=0.01)
        sbx.resume()
        time.sleep(0.3)
        cmd.kill()  # first: a file that grows while it is read is refused (threat-model.md)
        ticks = [int(t) for t in sbx.files.read("/tmp/ticks", format="text").split()]
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert max(gaps) >= 0.45e9  # the loop stood still for the pause, then went on


def test_a_paused_sandbox_keeps_its_idle_time_and_paused_timeout_ends_it() -> None:
    policy = Policy(idle_timeout_s=1.0, paused_timeout_s=60)
    with Sandbox(policy) as control, Sandbox(policy) as paused:
        paused.pause()
        time.sleep(2.5)  # more than idle_timeout_s: the running one idles out
        assert not control.alive  # positive control: the idle timeout works
        assert paused.alive and paused.paused
        paused.resume()
        assert paused.run_code("1 + 1").text == "2"
    with Sandbox(Policy(paused_timeout_s=1.0)) as sbx:
        sbx.pause()
        deadline = time.monotonic() + 10
        while sbx.alive and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not sbx.alive
        with pytest.raises(SandboxNotFound, match="paused_timeout_s"):
            sbx.run_code("1")


def test_pause_waits_for_no_run_and_kill_of_a_paused_sandbox_is_whole() -> None:
    sbx = Sandbox()
    running = threading.Thread(target=lambda: sbx.run_code("import time; time.sleep(1.5)"))
    running.start()
    time.sleep(0.5)
    with pytest.raises(SandboxBusy):
        sbx.pause()  # never in the middle of a run: its deadline runs on the host
    running.join()
    sbx.commands.run("sleep 600", background=True)
    sbx.pause()
    sbx.kill()  # frozen processes take their SIGKILL: the leak check sees none left
    assert not sbx.alive


# -- the service --------------------------------------------------------------------------------


@pytest.fixture
def paused_service(tmp_path: Path) -> Service:
    config = tmp_path / "service.toml"
    config.write_text("[quotas]\npaused_sandboxes = 1\n")
    svc = start_service(tmp_path / "audit.db", ("alice", "bob"), config)
    yield svc  # type: ignore[misc]
    stop_service(svc)


def test_the_http_api_remote_sdk_and_cli_pause_and_resume(paused_service: Service) -> None:
    svc = paused_service
    with svc.client("alice") as alice, svc.client("bob") as bob:
        sbx = alice.Sandbox()
        other = alice.Sandbox()
        try:
            sbx.run_code("kept = 'before the pause'")
            sbx.pause()
            assert sbx.paused
            listed = {s["id"]: s["state"] for s in alice.request("GET", "/v1/sandboxes").json()}
            assert listed == {sbx.id: "paused", other.id: "running"}
            with pytest.raises(codecage.SandboxPaused):
                sbx.run_code("1")
            with pytest.raises(codecage.QuotaExceeded):
                other.pause()  # quotas.paused_sandboxes = 1
            with pytest.raises(codecage.SandboxNotFound):  # another tenant's: the same 404
                bob.request("POST", f"/v1/sandboxes/{sbx.id}/resume")
            with pytest.raises(codecage.SandboxPaused):
                alice.request("POST", f"/v1/sandboxes/{sbx.id}/pause")
        finally:
            alice.close()  # the client goes away; the sandbox stays paused
        with svc.client("alice") as later:
            again = later.connect_sandbox(sbx.id)  # resumes it
            assert not again.paused
            assert again.run_code("kept").text == "'before the pause'"
            env = {"CODECAGE_URL": svc.url, "CODECAGE_API_KEY": svc.keys["alice"]}
            out = _cli(env, "sandboxes", "pause", sbx.id)
            assert out == f"{sbx.id}: paused"
            assert f"{sbx.id}  paused" in _cli(env, "sandboxes", "list")
            assert _cli(env, "sandboxes", "resume", sbx.id) == f"{sbx.id}: running"
            assert _cli(env, "sandboxes", "kill", other.id) == f"{other.id}: killed"
            again.kill()
    kinds = [r["kind"] for r in runs(svc.db, sandbox_id=sbx.id)]
    assert kinds.count("sandbox_pause") == 2 and kinds.count("sandbox_resume") == 2


def _cli(env: dict[str, str], *args: str) -> str:
    import os

    out = subprocess.run(
        [sys.executable, "-m", "codecage", *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return out.stdout.strip()


def test_a_service_killed_with_a_paused_sandbox_leaves_it_to_the_next_start(
    tmp_path: Path,
) -> None:
    db = tmp_path / "audit.db"
    svc = start_service(db, ("alice",))
    with svc.client() as client:
        sbx = client.Sandbox()
        sbx.run_code("x = 1")
        sbx.pause()
    svc.process.send_signal(signal.SIGKILL)
    svc.process.wait()
    # Frozen, its init cannot see the service gone: it waits, running nothing, for a sweep
    # (any codecage's start sweeps dead owners' cgroups: another test's may come first).
    frozen = list(Path("/sys/fs/cgroup/freezer/codecage").glob(f"{svc.process.pid}-*/{sbx.id}"))
    assert [(d / "freezer.state").read_text().strip() for d in frozen] == ["FROZEN"]
    assert _server_sandboxes(svc.process.pid) != []
    again = start_service(db, ())
    try:
        deadline = time.monotonic() + 15
        while _server_sandboxes(svc.process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _server_sandboxes(svc.process.pid) == []  # thawed and killed by the sweep
    finally:
        stop_service(again)
    assert not _leftover_cgroups(svc.process.pid)


# -- E2B's SDK ------------------------------------------------------------------------------------


def test_e2b_pause_connect_and_auto_pause(e2b_env: dict[str, str], e2b_service: Service) -> None:
    sbx = InterpreterSandbox.create(timeout=120)
    try:
        sbx.run_code("kept = 6 * 7")
        assert sbx.pause() is True
        assert not sbx.is_running()
        assert sbx.get_info().state == SandboxState.PAUSED
        paused = E2BSandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        assert [s.sandbox_id for s in paused] == [sbx.sandbox_id]
        assert sbx.pause() is False  # already paused: E2B's 409
        resumed = InterpreterSandbox.connect(sbx.sandbox_id)
        assert resumed.is_running() and resumed.run_code("kept").text == "42"
    finally:
        sbx.kill()
    auto = E2BSandbox.create(timeout=2, lifecycle={"on_timeout": "pause", "auto_resume": False})
    try:
        deadline = time.monotonic() + 15
        while auto.get_info().state != SandboxState.PAUSED and time.monotonic() < deadline:
            time.sleep(0.2)
        assert auto.get_info().state == SandboxState.PAUSED  # its lifetime's end paused it
        assert not auto.is_running()
        auto.connect()
        assert auto.is_running() and auto.commands.run("echo back").stdout == "back\n"
    finally:
        auto.kill()


def test_e2b_auto_resume_needs_the_sandboxes_token(
    e2b_env: dict[str, str], e2b_service: Service
) -> None:
    sbx = E2BSandbox.create(timeout=120, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        sbx.pause()
        envd = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
        forged = httpx.get(f"{e2b_service.url}/health", headers={**envd, "X-Access-Token": "x"})
        assert forged.status_code == 401  # a wrong token resumes nothing
        assert sbx.get_info().state == SandboxState.PAUSED
        other = E2BSandbox.list(**_api(e2b_service, "bob")).next_items()
        assert other == []  # bob does not see it, paused or not
        assert sbx.files.write("woke.txt", "by a request").path  # autoResume: the token's
        assert sbx.get_info().state == SandboxState.RUNNING
    finally:
        sbx.kill()


def _api(service: Service, tenant: str) -> dict[str, str]:
    env = env_for(service, tenant)
    return {"api_key": env["E2B_API_KEY"], "api_url": env["E2B_API_URL"]}
