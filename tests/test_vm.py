"""The full-VM level (docs/backends.md, "vm"): the guest images `codecage vm build` makes, a
real QEMU guest booted from them, the doctor's choice of accelerator, and the backend
(`isolation="vm"`) through the SDK, the CLI and the service: the code in a kernel of its
own, QEMU confined on the host, every limit outcome reported as on the other backends.
Every probe has a positive control outside. One guest serves the module's sandbox tests
(a cold boot is ~20 s under TCG); the attack kit runs its subset on `vm` too
(tests/conftest.py, VM_SUBSET), the whole of it in `make test-slow`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import codecage
from codecage import Policy
from codecage._jail import cgroups, get_jail, vmimage
from codecage._jail.host import UID_BASE
from codecage._jail.vm import GUEST_BASE_MB, QEMU_OVERHEAD_MB, QEMU_PIDS, VmJail, VmLauncher

from .conftest import start_service, stop_service

pytestmark = pytest.mark.requires_root

POLICY = Policy(isolation="vm", memory_mb=256, disk_mb=16, pids_max=16, timeout_s=60)


@pytest.fixture(scope="module")
def vm() -> vmimage.VmImage:
    if shutil.which(vmimage.QEMU) is None:
        pytest.skip("QEMU is not installed (scripts/install-backends)")
    return vmimage.build(progress=lambda line: None)


def test_the_guest_images_are_built_once_and_cached(vm: vmimage.VmImage) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in (vm.kernel, vm.initrd, vm.root)}
    again = vmimage.build(progress=lambda line: None)
    assert again == vm == vmimage.current()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing was made again
    assert vm.root.stat().st_size > 100 << 20  # the sandbox image: the runtime, numpy, ...


def _host_interfaces() -> list[str]:
    return sorted(os.listdir("/sys/class/net"))


def _host_root_options() -> str:
    with open("/proc/mounts") as f:
        return [line.split()[3] for line in f if line.split()[1] == "/"][-1]


def test_a_guest_boots_with_no_network_device_and_a_read_only_root(vm: vmimage.VmImage) -> None:
    """What the guest sees, in its own words (its greeting on the virtio-serial port)."""
    booted = vmimage.probe("tcg", vm=vm)
    assert booted.ok, booted.detail
    hello = booted.hello
    assert hello is not None and hello["pid"] == 1
    assert hello["kernel"] == vm.kernel.name.removeprefix("vmlinuz-")  # our kernel, not the host's
    assert hello["kernel"] != os.uname().release
    assert hello["interfaces"] == ["lo"]  # no network device at all
    options = str(hello["root_options"]).split(",")
    assert options[0] == "ro" and {"nosuid", "nodev"} <= set(options)
    # positive controls: the host itself has a network device and a writable root
    assert [i for i in _host_interfaces() if i != "lo"]
    assert _host_root_options().split(",")[0] == "rw"


def test_the_accelerator_is_the_one_a_guest_really_boots_with(vm: vmimage.VmImage) -> None:
    found = vmimage.accelerator(refresh=True, vm=vm)
    assert found.ok and found.accel in ("kvm", "tcg"), found
    if found.accel == "tcg" and Path("/dev/kvm").exists():  # a node without working KVM
        assert "KVM:" in found.detail
    kept = vmimage.accelerator(vm=vm)  # booted once, then kept
    assert kept == found


# -- the backend -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest(vm: vmimage.VmImage) -> Iterator[codecage.Sandbox]:
    """One sandbox for the module's tests; its end is checked here (the leak check of each
    test leaves a cgroup older than the test alone)."""
    jail = get_jail("vm")
    assert isinstance(jail, VmJail)
    sbx = codecage.Sandbox(policy=POLICY)
    launcher = _launcher(sbx)
    qemu, directory, tree = launcher.qemu, launcher.dir, list(launcher.tree.dirs.values())
    assert qemu is not None and qemu.poll() is None and directory.is_dir()  # positive controls
    assert all(d.is_dir() for d in tree)
    try:
        yield sbx
    finally:
        sbx.kill()
    assert qemu.poll() is not None  # QEMU has ended, its directory and cgroups are gone
    assert not directory.exists()
    assert not any(d.exists() for d in tree)


def _launcher(sbx: codecage.Sandbox) -> VmLauncher:
    launcher = sbx._jailed.launcher  # type: ignore[attr-defined]
    assert isinstance(launcher, VmLauncher)
    return launcher


def test_the_code_runs_in_a_kernel_of_its_own(guest: codecage.Sandbox, vm: vmimage.VmImage) -> None:
    release = guest.run_code("import os; os.uname().release").text
    assert release == repr(vm.kernel.name.removeprefix("vmlinuz-"))
    assert release != repr(os.uname().release)  # positive control: the host's is another
    assert guest.run_code("os.getuid(), os.getgid(), os.getpid() > 1").text == "(1000, 1000, True)"
    guest.run_code("x = 41")
    assert guest.run_code("x + 1").text == "42"  # a session, like every backend's
    status = guest.run_code("print(open('/proc/self/status').read())").logs.stdout[0]
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Seccomp"].strip() == "2" and fields["NoNewPrivs"].strip() == "1"
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0


def test_files_commands_and_rich_results(guest: codecage.Sandbox) -> None:
    guest.files.write("data.txt", b"hello")
    assert guest.files.read("data.txt") == b"hello"
    assert guest.commands.run("cat /home/user/data.txt").stdout == "hello"
    ex = guest.run_code("from IPython.display import HTML; HTML('<b>hi</b>')")
    assert ex.results and ex.results[0].html == "<b>hi</b>"
    guest.files.remove("data.txt")


def test_the_root_is_read_only_and_only_the_disks_are_writable(guest: codecage.Sandbox) -> None:
    probe = (
        "import errno\nout = {}\n"
        "for path in ('/usr/x', '/etc/x', '/x', '/home/user/x', '/tmp/x', '/dev/shm/x'):\n"
        "    try:\n        open(path, 'w').close(); out[path] = 'ok'\n"
        "    except OSError as e:\n        out[path] = errno.errorcode[e.errno]\n"
        "print(out)"
    )
    out = eval(guest.run_code(probe).logs.stdout[0])
    assert {out[p] for p in ("/usr/x", "/etc/x", "/x")} <= {"EROFS", "EACCES"}, out
    assert {out[p] for p in ("/home/user/x", "/tmp/x", "/dev/shm/x")} == {"ok"}, out
    devices = guest.run_code("import os; sorted(os.listdir('/dev'))").text
    assert "vda" not in devices and "vport0p1" not in devices and "'null'" in devices


def test_the_guest_has_no_network_device(guest: codecage.Sandbox) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # positive control
        for host in ("127.0.0.1", "10.0.2.2", "1.1.1.1"):  # the host's, QEMU's user net, out
            probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=3)"
            ex = guest.run_code(probe)
            assert ex.error is not None, host
            assert ex.error.name in ("ConnectionRefusedError", "OSError", "TimeoutError"), ex.error
        devices = guest.commands.run("cat /proc/net/dev").stdout
        assert [line.split(":")[0].strip() for line in devices.splitlines()[2:]] == ["lo"]
    finally:
        server.close()


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def test_qemu_runs_confined_on_the_host(guest: codecage.Sandbox, vm: vmimage.VmImage) -> None:
    launcher = _launcher(guest)
    assert launcher.qemu is not None
    pid = launcher.qemu.pid
    assert Path(f"/proc/{pid}/exe").resolve().name == vmimage.QEMU
    status = _status(pid)
    uid = int(status["Uid"].split()[0])
    assert uid >= UID_BASE and set(status["Uid"].split()) == {str(uid)}
    assert set(status["Gid"].split()) == {str(uid)} and status["Groups"] == ""
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"  # QEMU's -sandbox on
    tree = launcher.tree
    assert all(str(pid) in Path(f).read_text().split() for f in tree.procs_files())
    if tree.version == 1:
        memory = int((tree.dirs["memory"] / "memory.limit_in_bytes").read_text())
        pids = (tree.dirs["pids"] / "pids.max").read_text().strip()
    else:
        memory = int((tree.dirs["unified"] / "memory.max").read_text())
        pids = (tree.dirs["unified"] / "pids.max").read_text().strip()
    assert memory == (256 + GUEST_BASE_MB + QEMU_OVERHEAD_MB) << 20
    assert pids == str(QEMU_PIDS)
    # QEMU's uid can open no host file of root's: not its images for writing, not a secret
    canary = Path("/root") / f".codecage-vm-canary-{secrets.token_hex(4)}"
    canary.write_text("secret")
    canary.chmod(0o600)
    try:
        probe = (
            "import sys\nfor path, mode in ((sys.argv[1], 'r+b'), (sys.argv[2], 'rb')):\n"
            "    try:\n        open(path, mode).close(); print('ok')\n"
            "    except OSError as e:\n        print(e.errno)"
        )
        args = [sys.executable, "-I", "-c", probe, str(vm.root), str(canary)]
        assert subprocess.run(args, capture_output=True, text=True).stdout.split() == ["ok"] * 2
        setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *args]
        denied = subprocess.run(setpriv, capture_output=True, text=True).stdout.split()
        assert denied == ["13", "13"], denied  # EACCES, both
    finally:
        canary.unlink()


def test_a_timeout_ends_the_run_and_the_session_goes_on(guest: codecage.Sandbox) -> None:
    guest.run_code("kept = 'yes'")
    ex = guest.run_code("while True: pass", timeout=3)
    assert ex.killed_by == "timeout" and "timeout" in ex.limits_hit
    assert guest.run_code("kept").text == "'yes'"  # interrupted: the state is intact


def test_the_memory_limit_ends_the_kernel_and_the_next_run_works(guest: codecage.Sandbox) -> None:
    ex = guest.run_code("x = bytearray(400 << 20); x[::4096] = b'1' * len(x[::4096])")
    assert ex.killed_by == "memory_limit" and "memory_limit" in ex.limits_hit, ex
    assert ex.state_lost
    assert guest.run_code("1 + 1").text == "2"
    # positive control: below the limit the same allocation works
    assert guest.run_code("len(bytearray(64 << 20))").text == str(64 << 20)


def test_a_full_disk_is_reported(guest: codecage.Sandbox) -> None:
    ex = guest.run_code("open('/home/user/big', 'wb').write(b'x' * (32 << 20))")
    assert ex.error is not None and "No space left" in ex.error.value, ex.error
    assert "disk_quota" in ex.limits_hit
    guest.commands.run("rm -f /home/user/big")
    small = guest.run_code("open('/home/user/small', 'wb').write(b'x' * (1 << 20))")
    assert small.error is None and "disk_quota" not in small.limits_hit  # positive control
    guest.commands.run("rm -f /home/user/small")


def test_an_output_flood_is_truncated(guest: codecage.Sandbox) -> None:
    ex = guest.run_code("for i in range(150_000): print('y' * 1000)")
    assert ex.truncated and "output_limit" in ex.limits_hit
    assert sum(map(len, ex.logs.stdout)) <= POLICY.output_bytes
    assert guest.run_code("'after'").text == "'after'"


def test_the_pids_limit_is_the_guests(guest: codecage.Sandbox) -> None:
    bomb = (
        "import os, time\nkids = []\ntry:\n"
        "    for _ in range(40):\n        pid = os.fork()\n"
        "        if pid == 0:\n            time.sleep(30); os._exit(0)\n"
        "        kids.append(pid)\n"
        "finally:\n    for pid in kids:\n        os.kill(pid, 9); os.waitpid(pid, 0)\n"
    )
    ex = guest.run_code(bomb)
    assert ex.error is not None and ex.error.name == "BlockingIOError", ex.error
    assert "pids_limit" in ex.limits_hit
    fine = guest.run_code("import subprocess; subprocess.run(['true']).returncode")
    assert fine.text == "0" and "pids_limit" not in fine.limits_hit  # positive control


def test_the_cli_runs_code_in_a_vm(vm: vmimage.VmImage) -> None:
    command = [
        "run",
        "--set",
        "isolation=vm",
        "--json",
        "-c",
        "import os; print(os.uname().release)",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "codecage", *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["logs"]["stdout"] == [vm.kernel.name.removeprefix("vmlinuz-") + "\n"]


def test_the_service_runs_vm_sandboxes_from_its_pool(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text('pool_size = 1\n[policy]\nisolation = "vm"\n[ceiling]\nisolation = "vm"\n')
    service = start_service(tmp_path / "audit.db", ("alice",), config)
    try:
        with service.client("alice") as client:
            deadline = time.monotonic() + 300
            while "codecage_pool_ready 1.0" not in client.request("GET", "/metrics").text:
                assert time.monotonic() < deadline, "the vm pool never filled"
                time.sleep(0.5)
            with client.Sandbox() as sbx:
                ex = sbx.run_code("import os; os.uname().release")
                assert ex.text != repr(os.uname().release), ex
                sbx.files.write("a.txt", b"x")
                assert sbx.commands.run("cat a.txt").stdout == "x"
            metrics = client.request("GET", "/metrics").text
            assert "codecage_pool_hits 1.0" in metrics, metrics[-2000:]
    finally:
        stop_service(service)
    # the service's guests are gone with it (this process's own are the module's guest)
    mine = cgroups.owner_name()
    left = cgroups.ROOT.glob("*/codecage/*-vm/*")
    assert not [d for d in left if d.is_dir() and not d.parent.name.startswith(mine)]
