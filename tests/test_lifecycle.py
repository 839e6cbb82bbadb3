"""Nothing outlives a sandbox, even when the process that owns it crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from codecage._jail import cgroups
from tests.conftest import sandbox_processes

pytestmark = pytest.mark.requires_root

OWNER_SCRIPT = r"""
import sys
from codecage import Policy
from codecage._jail import get_jail
from codecage._jail import cgroups
sandbox = get_jail("namespace").create(Policy())
ex = sandbox.execute(
    "import subprocess, os\n"
    "p = subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
    "print(p.pid)",
    mode="session",
)
print(cgroups.owner_name(), flush=True)
sys.stdin.read()   # wait to be killed
"""


def _owner_dirs(owner: str) -> list[str]:
    return [
        str(p)
        for c in cgroups.V1_CONTROLLERS
        for p in (cgroups.ROOT / c / "codecage").glob(f"{owner}-*")
    ]


def test_crashed_owner_leaves_no_process_and_the_sweep_removes_its_cgroups() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            owner = proc.stdout.readline().strip()
            assert owner.startswith(str(proc.pid))
            assert len(sandbox_processes(owner)) >= 3, "init, the kernel and its sleeper"
            assert _owner_dirs(owner)
        finally:
            proc.send_signal(signal.SIGKILL)  # a crash: no cleanup code runs
            proc.wait()
    # init sees its host end close and kills everything in the sandbox.
    deadline = time.monotonic() + 10
    while sandbox_processes(owner) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes(owner) == []  # zombies included: the template reaps them
    # The cgroups remain until a start-up sweep finds their owner dead: this test's, or that
    # of a jail starting meanwhile in another test process (a service, a cluster's node
    # host), which is the same property: so this sweep's count is not asserted, only that
    # none is left after it.
    cgroups.sweep(1, cgroups.owner_name())
    assert _owner_dirs(owner) == []


def test_sweep_kills_what_a_dead_owner_left_running() -> None:
    # A process left in a dead owner's cgroup (owner "1-0": pid 1 never started at tick 0).
    owner, sid = "1-0", "leftover"
    cg = cgroups.SandboxCgroups(1, sid, owner)
    from codecage import Policy

    # Every jail that starts on this host sweeps dead owners (another test process's
    # service, a cluster's node host): one may sweep this leftover first. That is the
    # property too, so the leftover is made again until it is seen in its cgroup, and the
    # sweep that ends it may be this test's or another's.
    for _ in range(5):
        cg.create(Policy())
        child = subprocess.Popen(
            ["sh", "-c", f"echo $$ > {cg.dirs['pids']}/cgroup.procs && exec sleep 1000"],
        )
        deadline = time.monotonic() + 5
        while child.pid not in cg.pids() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if child.pid in cg.pids():
            break
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait()
    try:
        assert child.pid in cg.pids() or child.poll() == -signal.SIGKILL
        cgroups.sweep(1, cgroups.owner_name())
        assert child.wait(timeout=5) == -signal.SIGKILL
        assert not any(d.exists() for d in cg.dirs.values())
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
