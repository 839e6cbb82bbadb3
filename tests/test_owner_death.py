"""No state of the host's own making keeps a sandbox alive once its owner is gone.

The host is SIGKILLed in the middle of ending a sandbox (the end of a one-shot run, a
timeout's kill of the kernel, an interrupt), at the moment a test hook pauses it inside the
kill; nothing of the sandbox may be left: no process, no frozen or populated cgroup.
Positive control: the sandbox's processes were seen on the host before the kill began (the
kill itself may already have taken some of them by the time the hook pauses it).

The dead host is left a zombie (not reaped) until the checks are done: its descriptors are
closed, as after any death, but its pid and start time still name a live owner, so no
start-up sweep of a parallel process removes its sandboxes and hides what was left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import codecage
from codecage._jail import available_backends, cgroups

from .conftest import sandbox_processes, start_service

pytestmark = pytest.mark.requires_root

HOOK = "CODECAGE_TEST_PAUSE_IN_KILL"

SDK = r"""
import sys
import codecage
from codecage import Policy, Sandbox

mode, isolation = sys.argv[1], sys.argv[2]
if mode == "one-shot":  # the end of every one-shot run kills its sandbox
    code = "import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(1); print(1)"
    codecage.run(code, Policy(isolation=isolation))
else:  # a timeout kills the kernel at once (no grace) or interrupts it first
    grace = 0 if mode == "timeout" else 30
    with Sandbox(Policy(isolation=isolation, interrupt_grace_s=grace)) as sbx:
        sbx.run_code("import subprocess; subprocess.Popen(['sleep', '600'])")
        sbx.run_code("import time; time.sleep(600)", timeout=1)
"""


def owner_of(pid: int) -> str:
    """The cgroup owner name of a process (see cgroups.owner_name)."""
    return cgroups.owner_name(pid)


def cgroup_dirs(owner: str) -> list[Path]:
    return [d for base in cgroups._bases(1) for d in base.glob(f"{owner}-*/*") if d.is_dir()]


def wait_for(
    path: Path, process: subprocess.Popen[bytes], owner: str, timeout_s: float = 90
) -> bool:
    """Wait until the host pauses in its kill; whether the owner's sandbox processes were
    seen on the host meanwhile (the positive control)."""
    deadline, seen = time.monotonic() + timeout_s, False
    while not path.exists():
        assert time.monotonic() < deadline, "the host never reached the kill"
        assert process.poll() is None, "the host exited early"
        seen = seen or bool(sandbox_processes(owner))
        time.sleep(0.02)
    return seen


def kill_and_keep_zombie(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the host and wait until it is dead, without reaping it."""
    process.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)


def assert_nothing_left(owner: str) -> None:
    """Within a bounded wait: no process of the owner's sandboxes, no frozen or populated
    cgroup. Then the (empty) cgroups are removed, as the next start-up sweep would."""

    def populated() -> bool:
        return any((d / "cgroup.procs").read_text().split() for d in cgroup_dirs(owner))

    deadline = time.monotonic() + 60  # a loaded host reaps slowly; nothing here is a timing
    while (sandbox_processes(owner) or populated()) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = sandbox_processes(owner)
    states = {}
    for d in cgroup_dirs(owner):
        if d.parent.parent.parent.name == "freezer":
            states[str(d)] = (d / "freezer.state").read_text().strip()
        procs = (d / "cgroup.procs").read_text().split()
        if procs:
            states[str(d) + " procs"] = " ".join(procs)
    try:
        assert left == [], f"processes outlived their owner: {left} {states}"
        assert all(s == "THAWED" for k, s in states.items() if "procs" not in k), states
        assert not [k for k in states if k.endswith("procs")], states
    finally:
        for d in cgroup_dirs(owner):
            cgroups.SandboxCgroups(1, d.name, d.parent.name).remove()
        for jail_dir in {d.parent.name for d in cgroup_dirs(owner)} | {f"{owner}-1"}:
            cgroups.remove_owner(1, jail_dir)


@pytest.mark.parametrize(
    ("mode", "isolation"),
    [
        ("one-shot", "namespace"),
        ("timeout", "namespace"),
        ("interrupt", "namespace"),
        ("one-shot", "bwrap"),
        ("interrupt", "bwrap"),
    ],
)
def test_an_sdk_process_killed_mid_kill_leaves_nothing(
    tmp_path: Path, mode: str, isolation: str
) -> None:
    why = available_backends().get(isolation)
    if why is not None:
        pytest.skip(f"{isolation}: {why}")
    marker = tmp_path / "paused"
    env = os.environ | {HOOK: str(marker)}
    process = subprocess.Popen(
        [sys.executable, "-c", SDK, mode, isolation],
        env=env,
        stdout=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        owner = owner_of(process.pid)
        assert wait_for(marker, process, owner), "control: the sandbox was never alive"
        kill_and_keep_zombie(process)
        assert_nothing_left(owner)
    finally:
        process.kill()
        process.wait()


def test_the_service_killed_mid_kill_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "paused"
    config = tmp_path / "service.toml"
    config.write_text("pool_size = 0\n")
    monkeypatch.setenv(HOOK, str(marker))
    svc = start_service(tmp_path / "audit.db", ("alice",), config)
    monkeypatch.delenv(HOOK)
    owner = owner_of(svc.process.pid)

    def one_shot() -> None:
        code = "import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(1)"
        with svc.client() as client, contextlib.suppress(codecage.SandboxError, httpx.HTTPError):
            client.run(code)  # never answered: the service dies first

    caller = threading.Thread(target=one_shot)
    caller.start()
    try:
        assert wait_for(marker, svc.process, owner), "control: the sandbox was never alive"
        kill_and_keep_zombie(svc.process)
        assert_nothing_left(owner)
    finally:
        svc.process.kill()
        svc.process.wait()
        caller.join()
