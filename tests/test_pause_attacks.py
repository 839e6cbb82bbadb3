"""Pause and resume (docs/pause.md) attacked on the real jail: a kill while a freeze is stuck
(FREEZING) does not wait for it; a kernel that dies between runs (a thread of the user's
code that calls os._exit later, a process of the sandbox that SIGKILLs it) is restarted and
the loss reported instead of a broken sandbox; a paused sandbox its owner dropped is killed
at interpreter exit, not left frozen; sandbox ids given to the CLI stay one path segment.
The layers above the jail are attacked in tests/unit/test_pause.py."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from codecage import Policy, Sandbox, SandboxError, SandboxNotFound
from codecage._jail import cgroups

from .conftest import Service, start_service, stop_service
from .test_service import _leftover_cgroups, _server_sandboxes

pytestmark = [pytest.mark.requires_root, pytest.mark.every_backend]

FREEZE_TIMEOUT_S = 5.0  # cgroups.SandboxCgroups.freeze's: how long a pause waits at most


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@contextlib.contextmanager
def stuck_in_the_kernel(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two host processes asleep in the kernel where the freezer cannot freeze them: the
    first creates a file on a FUSE mount whose daemon never answers (it waits, holding the
    directory's lock), the second creates one in the same directory and waits for that
    lock, uninterruptibly. A task stuck so keeps a cgroup FREEZING. Both die of SIGKILL
    once the first is not frozen; closing the device ends the mount's requests."""
    libc = ctypes.CDLL(None, use_errno=True)
    mnt = tmp_path / "fuse"
    mnt.mkdir()
    device = os.open("/dev/fuse", os.O_RDWR)
    options = f"fd={device},rootmode=40000,user_id=0,group_id=0".encode()
    if libc.mount(b"codecage-test", str(mnt).encode(), b"fuse", 0, options) != 0:
        os.close(device)
        pytest.skip(f"cannot mount FUSE here: errno {ctypes.get_errno()}")
    create = "import os, sys; os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY)"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name in ("holds-the-lock", "waits-for-it"):
            # -I -S: a bare interpreter, quick to start on a loaded host
            command = [sys.executable, "-I", "-S", "-c", create, str(mnt / name)]
            procs.append(subprocess.Popen(command))
            deadline = time.monotonic() + 60
            while _state(procs[-1].pid) != "D" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _state(procs[-1].pid) == "D", f"{name} never went to sleep in the kernel"
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.kill()
        libc.umount2(str(mnt).encode(), 2)  # MNT_DETACH
        os.close(device)  # the connection is aborted: every request of it fails
        for proc in procs:
            proc.wait(30)


def _freezing(tree: cgroups.SandboxCgroups) -> bool:
    if tree.version == 1:
        return (tree.dirs["freezer"] / "freezer.state").read_text().strip() == "FREEZING"
    events = (tree.dirs["unified"] / "cgroup.events").read_text()
    wanted = (tree.dirs["unified"] / "cgroup.freeze").read_text().strip() == "1"
    return wanted and "frozen 0" in events


def test_a_kill_does_not_wait_for_a_freeze_in_progress(backend: str, tmp_path: Path) -> None:
    sbx = Sandbox(Policy(isolation=backend, allow_weaker=True))  # type: ignore[arg-type]
    try:
        with stuck_in_the_kernel(tmp_path) as stuck:
            tree = sbx._jailed.launcher.tree  # type: ignore[attr-defined]
            for proc in stuck:  # a task of the sandbox stuck in the kernel, as it can be
                for directory in tree.dirs.values():
                    (directory / "cgroup.procs").write_text(str(proc.pid))
            outcome: list[BaseException | str] = []

            def pause() -> None:
                try:
                    sbx.pause()
                    outcome.append("paused")
                except SandboxError as exc:
                    outcome.append(exc)

            started = time.monotonic()
            pausing = threading.Thread(target=pause)
            pausing.start()
            deadline = started + FREEZE_TIMEOUT_S
            while not _freezing(tree) and time.monotonic() < deadline:
                time.sleep(0.01)
            # positive control: the freeze is really stuck in progress, as the kernel says
            assert _freezing(tree) and pausing.is_alive()
            sbx.kill()
            killed_after = time.monotonic() - started
            pausing.join(FREEZE_TIMEOUT_S * 2)
            assert killed_after < FREEZE_TIMEOUT_S  # it never waited for the freeze's end
            assert len(outcome) == 1 and isinstance(outcome[0], SandboxNotFound), outcome
            assert not sbx.alive
            for proc in stuck:  # they took their SIGKILL: the freeze was undone
                assert proc.wait(10) == -9
    finally:
        sbx.kill()


# -- a kernel that dies between runs -------------------------------------------------------------


def _in_the_sandbox(sbx: Any, cmd: str) -> None:
    """A command of the sandbox's own, beside the kernel (a background process), to its end."""
    sbx.commands.run(cmd, background=True).wait(timeout=60)


def _wait_gone(sbx: Any, pid: int) -> None:
    """Until the sandbox's process `pid` (its own pid namespace's) is gone."""
    _in_the_sandbox(sbx, f"while kill -0 {pid} 2>/dev/null; do sleep 0.05; done")


@pytest.mark.parametrize("how", ["a thread of its own calls os._exit", "a process SIGKILLs it"])
def test_a_kernel_that_dies_between_runs_is_restarted_and_the_loss_reported(
    backend: str, how: str
) -> None:
    with Sandbox(Policy(isolation=backend, allow_weaker=True)) as sbx:  # type: ignore[arg-type]
        sbx.run_code("kept = 41")
        assert sbx.run_code("kept + 1").text == "42"  # positive control: its state is kept
        pid = int(sbx.run_code("import os; os.getpid()").text or "0")
        if how.startswith("a thread"):
            sbx.run_code(
                "import os, threading, time\n"
                "threading.Thread(target=lambda: (time.sleep(0.2), os._exit(3))).start()"
            )
        else:
            _in_the_sandbox(sbx, f"kill -9 {pid}")
        _wait_gone(sbx, pid)
        ex = sbx.run_code("kept + 1")
        assert ex.error is not None and ex.error.name == "KernelDied", ex
        assert ex.state_lost and "did not run" in ex.error.value
        assert ("exit code 3" if how.startswith("a thread") else "SIGKILL") in ex.error.value
        assert sbx.run_code("'kept' in globals()").text == "False"  # a fresh kernel
        assert sbx.run_code("6 * 7").text == "42"  # and the sandbox works on
        sbx.files.write("after.txt", "ok")  # so do requests
        assert sbx.files.read("after.txt", format="text") == "ok"


def test_a_request_after_the_kernel_died_restarts_it_too() -> None:
    with Sandbox() as sbx:
        pid = int(sbx.run_code("import os; os.getpid()").text or "0")
        _in_the_sandbox(sbx, f"kill -9 {pid}")
        _wait_gone(sbx, pid)
        sbx.files.write("f.txt", "written")  # the next call is a request: it works
        ex = sbx.run_code("1")
        assert ex.error is not None and ex.error.name == "KernelDied" and ex.state_lost
        assert sbx.run_code("1 + 1").text == "2"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = start_service(tmp_path / "audit.db", ("alice",))
    yield svc
    stop_service(svc)


def test_over_http_a_dead_kernel_is_an_execution_not_a_409(service: Service) -> None:
    with service.client() as client, client.Sandbox() as sbx:
        pid = int(sbx.run_code("import os; os.getpid()").text or "0")
        _in_the_sandbox(sbx, f"kill -9 {pid}")
        _wait_gone(sbx, pid)
        ex = sbx.run_code("1")  # 200: an Execution
        assert ex.error is not None and ex.error.name == "KernelDied" and ex.state_lost
        assert sbx.run_code("2 + 2").text == "4"


# -- a paused sandbox dropped by its owner -------------------------------------------------------

DROPPED = """
import gc, sys
from pathlib import Path
from codecage import Policy, Sandbox
sbx = Sandbox(Policy(isolation=sys.argv[1], allow_weaker=True))
sbx.run_code("x = 1")
sbx.pause()
sid = sbx.id
state = [
    p.read_text().strip()
    for p in Path("/sys/fs/cgroup/freezer").glob(f"codecage/*/{sid}/freezer.state")
]
print(sid, state, flush=True)
del sbx
gc.collect()
"""


@pytest.mark.backends("namespace", "bwrap")
def test_a_dropped_paused_sandbox_is_killed_at_exit(backend: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", DROPPED, backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        sid, state = out.split(maxsplit=1)
        assert len(sid) == 32 and state.strip() == "['FROZEN']"  # positive control: frozen
        assert _server_sandboxes(proc.pid) == []  # killed at exit, not left frozen
        assert not _leftover_cgroups(proc.pid)
    finally:  # a sandbox left frozen by a dead owner: what the next start's sweep does
        version = cgroups.detect_version()
        if version is not None:
            cgroups.sweep(version, cgroups.owner_name())
