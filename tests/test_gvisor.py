"""The gvisor backend: the same sandbox API on runsc, and what only gVisor gives (the code's
kernel is the sentry, not the host's). Every probe has a positive control outside."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import codecage
from codecage import Policy, PolicyError
from codecage._jail import available_backends, get_jail
from codecage._jail.guest_oom import GUEST_OOM_HEADROOM_MB, PIDS_FLOOR
from codecage._jail.gvisor import GvisorJail
from codecage._jail.image import package_root

pytestmark = [pytest.mark.requires_root, pytest.mark.requires_runsc]

# gVisor has no Landlock and no host uid per sandbox: it says so, and runs only when told
POLICY = Policy(isolation="gvisor", allow_weaker=True)


@pytest.fixture(scope="module")
def jail() -> Iterator[GvisorJail]:
    if shutil.which("runsc") is None:
        pytest.skip("runsc is not installed (scripts/install-backends)")
    from codecage._jail import image as _image

    _image.build(progress=lambda line: None)
    assert available_backends()["gvisor"] is None
    j = get_jail("gvisor")
    assert isinstance(j, GvisorJail)
    yield j


def runsc_containers(j: GvisorJail) -> list[str]:
    out = subprocess.run(j.command("list", "--quiet"), capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.fixture
def sandbox(jail: GvisorJail) -> Iterator[codecage.Sandbox]:
    with codecage.Sandbox(policy=POLICY) as sbx:
        assert sbx.id in runsc_containers(jail)  # positive control: runsc lists it
        yield sbx
    assert sbx.id not in runsc_containers(jail)  # runsc's state is gone
    assert not (Path("/run/codecage/oci") / sbx.id).exists()


GVISOR_VERSION = "#1 SMP Sun Jan 10 15:06:54 PST 2016"  # the sentry's fixed uname version


def test_the_code_runs_on_gvisors_kernel(sandbox: codecage.Sandbox) -> None:
    ex = sandbox.run_code("import os; os.uname().release, os.uname().version")
    assert ex.text == repr(("4.4.0", GVISOR_VERSION))
    assert "4.4.0" in sandbox.commands.run("uname -r").stdout
    # positive control: the host's kernel is another one
    assert (os.uname().release, os.uname().version) != ("4.4.0", GVISOR_VERSION)


def test_session_state_interrupt_and_kernel_restart(sandbox: codecage.Sandbox) -> None:
    sandbox.run_code("x = 41")
    assert sandbox.run_code("x + 1").text == "42"
    slow = sandbox.run_code("import time; time.sleep(60)", timeout=1)
    assert slow.killed_by == "timeout"
    assert sandbox.run_code("x").text == "41"  # an interrupt keeps the session
    died = sandbox.run_code("import os; os.kill(os.getpid(), 9)")
    assert died.error is not None and "restarted" in died.error.value
    assert sandbox.run_code("'alive'").text == "'alive'"


def test_files_commands_and_rich_results(sandbox: codecage.Sandbox) -> None:
    sandbox.files.write("data.txt", b"hello")
    assert sandbox.files.read("data.txt") == b"hello"
    assert sandbox.commands.run("cat /home/user/data.txt").stdout == "hello"
    ex = sandbox.run_code("from IPython.display import HTML; HTML('<b>hi</b>')")
    assert ex.results and ex.results[0].html == "<b>hi</b>"


def test_no_network_but_loopback(sandbox: codecage.Sandbox) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        client = socket.create_connection(("127.0.0.1", port), timeout=2)  # positive control
        conn, _ = server.accept()
        conn.close()
        client.close()
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        ex = sandbox.run_code(probe)
        assert ex.error is not None and ex.error.name in ("ConnectionRefusedError", "TimeoutError")
        ex = sandbox.run_code("import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)")
        assert ex.error is not None
        devices = sandbox.commands.run("cat /proc/net/dev").stdout
        assert [line.split(":")[0].strip() for line in devices.splitlines()[2:]] == ["lo"]
    finally:
        server.close()


def test_read_only_root_and_sized_workspace(jail: GvisorJail) -> None:
    policy = POLICY.model_copy(update={"disk_mb": 16})
    with codecage.Sandbox(policy=policy) as sbx:
        assert sbx.run_code("open('/home/user/ok', 'w').write('x')").text == "1"  # control
        assert sbx.run_code("open('/tmp/ok', 'w').write('x')").text == "1"
        for path in (
            "/etc/x",
            "/usr/x",
            f"{package_root()}/codecage/x",
            "/x",
            "/run/codecage-channel/x",
        ):
            ex = sbx.run_code(f"open({path!r}, 'w')")
            assert ex.error is not None and ex.error.name in ("PermissionError", "OSError"), path
        full = sbx.run_code("open('/home/user/big', 'wb').write(b'x' * (64 << 20))")
        assert full.error is not None and "No space left" in full.error.value


def test_cgroup_limits_on_the_whole_sandbox(jail: GvisorJail) -> None:
    policy = POLICY.model_copy(update={"memory_mb": 300, "cpu_cores": 0.5})
    sbx = jail.create(policy)
    try:
        dirs = sbx.launcher.tree.dirs  # type: ignore[attr-defined]
        # the hard limit stands above memory_mb, where the guest's kernel is ended (guest_oom)
        hard = (300 + GUEST_OOM_HEADROOM_MB) << 20
        assert (dirs["memory"] / "memory.limit_in_bytes").read_text().strip() == str(hard)
        assert int((dirs["pids"] / "pids.max").read_text()) == PIDS_FLOOR
        assert (dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
        # the sentry and the gofer are charged to it: the host's cgroup holds runsc's processes
        procs = (dirs["pids"] / "cgroup.procs").read_text().split()
        names = {Path(f"/proc/{p}/comm").read_text().strip() for p in procs}
        assert any(name.startswith(("runsc", "exe")) for name in names), names
    finally:
        sbx.kill()


FORKS = r"""
import os, time
pids = []
for i in range(12):
    try:
        pid = os.fork()
    except OSError as exc:
        print("stopped", exc.errno)
        break
    if pid == 0:
        time.sleep(1)
        os._exit(0)
    pids.append(pid)
for pid in pids:
    os.waitpid(pid, 0)
print("forked", len(pids))
"""


def test_pids_limit_is_the_guests_and_the_host_floor_is_runscs(jail: GvisorJail) -> None:
    with pytest.raises(PolicyError, match=r"landlock.*own_uid"):
        jail.check(Policy(isolation="gvisor"))  # weaker than asked: said, and refused
    roomy = POLICY.model_copy(update={"pids_max": 64, "memory_mb": 1024})
    with codecage.Sandbox(policy=roomy) as sbx:  # positive control: 12 children fit in 64
        assert sbx.run_code(FORKS).logs.stdout == ["forked 12\n"]
    tight = POLICY.model_copy(update={"pids_max": 8, "memory_mb": 1024})
    sbx = jail.create(tight)
    try:
        pids_max = sbx.launcher.tree.dirs["pids"] / "pids.max"  # type: ignore[attr-defined]
        assert pids_max.read_text().strip() == str(PIDS_FLOOR)  # runsc's own threads
        out = "".join(sbx.execute(FORKS).logs.stdout)
        assert "stopped 11" in out, out  # EAGAIN from the sentry: the guest's limit
    finally:
        sbx.kill()


def test_what_the_level_lacks_is_refused_without_allow_weaker(jail: GvisorJail) -> None:
    with pytest.raises(codecage.PolicyError, match="cannot enforce nosuid_mounts") as info:
        jail.create(POLICY.model_copy(update={"allow_weaker": False}))
    assert "kernel_oom" not in str(info.value)  # cgroup v1 here: the host handles the OOM


def test_memory_limit_ends_the_kernel_and_the_sandbox_goes_on(jail: GvisorJail) -> None:
    grab = "b = bytearray(400 << 20); len(b)"
    roomy = POLICY.model_copy(update={"memory_mb": 1024})
    with codecage.Sandbox(policy=roomy) as sbx:
        assert sbx.run_code(grab).text == str(400 << 20)  # positive control
    with codecage.Sandbox(policy=POLICY.model_copy(update={"memory_mb": 256})) as sbx:
        groups = sbx._jailed.launcher.tree
        oom_control = groups.dirs["memory"] / "memory.oom_control"
        assert "oom_kill_disable 1" in oom_control.read_text()  # the host handles the OOM
        ex = sbx.run_code(grab)
        assert ex.killed_by == "memory_limit" and ex.state_lost, (ex.killed_by, ex.error)
        # the sandbox goes on (once in CI it had ended, its cgroups gone: say why, if again)
        assert sbx._jailed.alive, (sbx._jailed.ended_because, ex.error)
        assert "oom_kill 0" in oom_control.read_text()  # the host's OOM killer took nothing
        limit = groups.dirs["memory"] / "memory.limit_in_bytes"
        # back from any raised headroom once the sentry has given the memory back (the run's
        # answer does not wait for that)
        hard = (256 + GUEST_OOM_HEADROOM_MB) << 20
        deadline = time.monotonic() + 40
        while int(limit.read_text()) != hard and time.monotonic() < deadline:
            time.sleep(0.1)
        assert int(limit.read_text()) == hard
        assert sbx.run_code("1 + 1").text == "2"  # a fresh kernel in the same sandbox
