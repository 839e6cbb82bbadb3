"""The bwrap backend's own guarantees, beyond the conformance suite (which runs the attack
and behaviour tests on it too).

The trap: bubblewrap run as root without `--unshare-user --uid N --cap-drop ALL` keeps root
and every capability, and can remount a read-only bind of a host path writable. The same
probe proves both sides: under a plain `bwrap --unshare-all --bind / /` as root (the
positive control) it remounts a throwaway host directory and writes into it; in a codecage
bwrap sandbox it is not root, holds no capability, maps no uid 0, and fails.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from codecage import Policy, Sandbox, SandboxError
from codecage._jail import available_backends, get_jail
from codecage._jail.bwrap import BwrapJail, bwrap_binary
from codecage._jail.host import UID_BASE, HostJail
from codecage._jail.template import Runtime
from codecage.testing import PRELUDE, in_jail, result_of

from .conftest import start_service, stop_service

pytestmark = [
    pytest.mark.requires_root,
    pytest.mark.skipif(
        available_backends().get("bwrap") is not None,
        reason=f"bwrap backend unavailable: {available_backends().get('bwrap')}",
    ),
]

BWRAP = Policy(isolation="bwrap")

TRAP = (
    PRELUDE
    + r"""
out = {"uid": os.getuid(), "gid": os.getgid()}
out["uid_map"] = [line.split() for line in open("/proc/self/uid_map").read().splitlines()]
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
    out[key] = int(status[key].strip(), 16)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
def mount(source, target, fstype, flags):
    ctypes.set_errno(0)
    r = libc.mount(source, target.encode(), fstype, flags, None)
    return "ok" if r == 0 else errno.errorcode.get(ctypes.get_errno(), "?")
MS_REMOUNT, MS_BIND = 32, 4096
out["remount_rw"] = mount(None, TARGET, None, MS_REMOUNT | MS_BIND)
try:
    with open(os.path.join(TARGET, "trap-" + TOKEN), "w") as f:
        f.write("written from inside")
    out["write"] = "ok"
except Exception as exc:
    out["write"] = errname(exc)
out["tmpfs_over"] = mount(b"none", TARGET, b"tmpfs", 0)
report(**out)
"""
)


@pytest.fixture
def throwaway() -> Iterator[Path]:
    """A host directory the positive control may write into; removed afterwards."""
    path = Path("/var/tmp") / f"codecage-trap-{secrets.token_hex(6)}"
    path.mkdir()
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def test_plain_bwrap_as_root_is_the_trap(throwaway: Path) -> None:
    """Positive control: the probe works, and what it shows is real (a host write)."""
    token = secrets.token_hex(6)
    bwrap = bwrap_binary()
    assert bwrap is not None
    probe = f"TARGET = {str(throwaway)!r}\nTOKEN = {token!r}\n" + TRAP
    argv = [bwrap, "--unshare-all", "--bind", "/", "/", "--ro-bind", str(throwaway)]
    argv += [str(throwaway), "--proc", "/proc", "--dev", "/dev", "--", sys.executable, "-c", probe]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    host = result_of(proc.stdout)
    assert host["uid"] == 0 and host["CapEff"] != 0 and host["CapBnd"] != 0, host
    assert any(m[:2] == ["0", "0"] for m in host["uid_map"]), host  # root, and the host's root
    assert host["remount_rw"] == "ok" and host["write"] == "ok", host
    assert (throwaway / f"trap-{token}").read_text() == "written from inside"


def test_codecage_bwrap_is_not_root_and_cannot_remount() -> None:
    token = secrets.token_hex(6)
    runtime = str(Runtime.default().path.resolve())  # a host path, bound read-only
    for target in (runtime, "/usr", "/etc"):
        inside = in_jail(f"TARGET = {target!r}\nTOKEN = {token!r}\n" + TRAP, BWRAP)
        assert inside["uid"] >= UID_BASE and inside["gid"] >= UID_BASE, inside
        # one mapping, of the sandbox's own uid: there is no uid 0 in its namespace at all
        ((first, _outside, count),) = inside["uid_map"]
        assert int(first) == inside["uid"] and count == "1", inside
        for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert inside[key] == 0, (key, inside)
        assert inside["remount_rw"] in ("EPERM", "EACCES"), inside
        assert inside["tmpfs_over"] in ("EPERM", "EACCES"), inside
        assert inside["write"] in ("EROFS", "EACCES", "EPERM"), inside
        assert not Path(target, f"trap-{token}").exists()


def test_every_process_of_a_sandbox_runs_as_its_own_host_uid() -> None:
    """Seen from the host: bwrap's monitor, init and the kernel all run as one unprivileged
    uid of this sandbox's own, never as root (bwrap is handed that uid before it starts)."""
    with Sandbox(BWRAP) as a, Sandbox(BWRAP) as b:
        ua, ub = (s.run_code("import os; os.getuid()").text for s in (a, b))
        assert ua is not None and ub is not None and ua != ub
        for sbx in (a, b):
            pids = sbx._jailed.launcher.tree.pids()  # type: ignore[attr-defined]
            assert len(pids) >= 3, pids  # monitor, init, kernel
            uids = set()
            for pid in pids:
                status = Path(f"/proc/{pid}/status").read_text().splitlines()
                line = next(x for x in status if x.startswith("Uid:"))
                uids |= {int(u) for u in line.split()[1:]}
            assert len(uids) == 1 and min(uids) >= UID_BASE, uids
            assert str(min(uids)) == sbx.run_code("os.getuid()").text


def test_a_sandbox_that_fails_to_start_says_why_and_leaves_nothing() -> None:
    """The entry's own error (here: a preload module that does not exist) reaches the
    caller as a SandboxError; the leak check after the test proves the tree is gone."""
    jail = BwrapJail(preload=("codecage_no_such_module",))
    try:
        with pytest.raises(SandboxError, match="codecage_no_such_module"):
            jail.spawn(BWRAP, {})
    finally:
        jail.close()


def test_pool_serves_bwrap_sandboxes_with_their_own_envs() -> None:
    jail = get_jail("bwrap")
    assert isinstance(jail, HostJail)
    pool = jail.start_pool(1, BWRAP, refill_per_s=10)
    try:
        deadline = time.monotonic() + 60
        while pool.ready < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.ready == 1
        with Sandbox(BWRAP, envs={"POOLED": "yes"}) as sbx:
            assert pool.hits == 1  # the control: it came from the pool
            assert sbx.run_code("import os; os.environ['POOLED']").text == "'yes'"
    finally:
        pool.stop()


def test_pids_max_counts_the_sandboxs_own_processes() -> None:
    """bwrap's monitor is in the pids cgroup too; the limit is raised by one for it."""
    with Sandbox(Policy(isolation="bwrap", pids_max=10)) as sbx:
        assert sbx.run_code("open('/sys/fs/cgroup/pids/pids.max').read().strip()").text == "'11'"
        pids = sbx._jailed.launcher.tree.pids()  # type: ignore[attr-defined]
        assert len(pids) == 3, pids  # monitor, init, kernel: 8 more may start
        # the process manager, started at the first background command, counts too
        assert sbx.commands.run("true", background=True).wait().exit_code == 0
        assert len(sbx._jailed.launcher.tree.pids()) == 4  # type: ignore[attr-defined]


def test_the_service_runs_bwrap_sandboxes_from_its_pool(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text(
        'pool_size = 1\n[policy]\nisolation = "bwrap"\n[ceiling]\nisolation = "bwrap"\n'
    )
    service = start_service(tmp_path / "audit.db", ("alice",), config)
    try:
        with service.client("alice") as client:
            deadline = time.monotonic() + 60
            while "codecage_pool_ready 1.0" not in client.request("GET", "/metrics").text:
                assert time.monotonic() < deadline, "the bwrap pool never filled"
                time.sleep(0.2)
            with client.Sandbox() as sbx:
                assert sbx.run_code("import os; os.getuid() >= 1 << 20").text == "True"
                sbx.files.write("a.txt", b"x")
                assert sbx.commands.run("cat a.txt").stdout == "x"
            metrics = client.request("GET", "/metrics").text
            assert "codecage_pool_hits 1.0" in metrics, metrics[-2000:]
    finally:
        stop_service(service)
