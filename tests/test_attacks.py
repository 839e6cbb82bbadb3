"""Attacks on the jail, each with a positive control, run against every backend here.

Every probe is written once, as a code string. It runs on the host (a subprocess of this
test process, as root) where it must succeed, proving that the probe works, and in a
sandbox (`codecage.run`) where it must be blocked. "Blocked" inside is therefore never
just a broken probe. Probes report with one line `RESULT <json>` on stdout.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import codecage
from codecage._jail import BACKENDS, get_jail, guest_oom, oci
from codecage._jail.host import UID_BASE
from codecage.testing import (
    DEFAULT,
    PRELUDE,
    current_backend,
    enforces,
    in_jail,
    on_host,
    policy,
    result_of,
    stdout_of,
)

pytestmark = [
    pytest.mark.requires_root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the jails need root"),
    pytest.mark.usefixtures("backend"),  # every test runs on every backend (codecage.testing)
    pytest.mark.every_backend,  # in `make test` too (tests/conftest.py)
]

RUNTIME_PYTHON = "/var/lib/codecage/runtime/bin/python"


def host_pids_with(needle: str) -> list[str]:
    """Host processes whose command line holds `needle`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or entry.name == str(os.getpid()):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle.encode() in cmdline:
            found.append(f"{entry.name}: {cmdline!r}")
    return found


def processes_of_uid(uid: int) -> list[str]:
    """Host processes (zombies included) running as `uid`: a sandbox's own uid, so that
    sandboxes of anyone else running on this machine at the same time do not count."""
    assert uid >= UID_BASE
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            lines = (entry / "status").read_text().splitlines()
        except OSError:
            continue
        fields = {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}
        if int(fields["Uid"].split()[0]) == uid:
            found.append(f"{entry.name} {fields['Name']} {fields['State']} ppid={fields['PPid']}")
    return found


def leftovers(uid: int) -> list[str]:
    """What is left on the host of a finished sandbox whose code ran as `uid`. With a host
    uid per sandbox: every host process of that uid. Without one (gvisor: `uid` is the
    guest's, and the guest's processes are tasks of the sentry, never host processes):
    every host process still in a cgroup of this process's sandboxes of that backend (the
    sentry, the gofer, the ptrace stubs)."""
    if enforces("own_uid"):
        return processes_of_uid(uid)
    assert uid == oci.SANDBOX_UID, uid
    owner: str = getattr(get_jail(current_backend()), "owner")  # noqa: B009
    found = []
    for entry in Path("/proc").iterdir():
        try:
            membership = (entry / "cgroup").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if f"/codecage/{owner}/" in membership:
            found.append(f"{entry.name}: {membership.split()[0]}")
    return found


def is_sandbox_uid(uid: int) -> bool:
    """The code runs as the sandbox's own unprivileged host uid; without one (gvisor), as
    the guest's one unprivileged uid."""
    return uid >= UID_BASE if enforces("own_uid") else uid == oci.SANDBOX_UID


def uid_after(word: str, ex: codecage.Execution) -> int:
    """The sandbox's uid, printed by the code as `<word> <uid>` on its first line."""
    first = stdout_of(ex).splitlines()[0].split()
    assert first[0] == word, stdout_of(ex)[:200]
    return int(first[1])


def vm_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def host_can_fork() -> bool:
    return subprocess.run(["true"], timeout=10).returncode == 0


# -- files: secrets of the host ------------------------------------------------------------

READ_FILES = (
    PRELUDE
    + r"""
out = {}
for path in PATHS:
    try:
        with open(path, "rb") as f:
            data = f.read()
        out[path] = "ok:" + data[:64].decode("latin-1")
    except Exception as exc:
        out[path] = errname(exc)
report(**out)
"""
)


def test_read_etc_shadow() -> None:
    paths = ["/etc/shadow", "/proc/self/root/etc/shadow", "/usr/../etc/shadow"]
    probe = f"PATHS = {[*paths, '/proc/1/root/etc/shadow']!r}\n" + READ_FILES
    host = on_host(probe)  # (the host's own PID 1 root is closed even to root here)
    assert all(host[p].startswith("ok:root:") for p in paths), host
    inside = in_jail(probe)
    for p in [*paths, "/proc/1/root/etc/shadow"]:
        assert not inside[p].startswith("ok"), (p, inside[p])
        assert inside[p] in ("ENOENT", "EACCES", "EPERM"), (p, inside[p])


@pytest.fixture
def home_canary() -> Iterator[tuple[str, str]]:
    secret = "canary-" + secrets.token_hex(16)
    path = Path("/root") / f".codecage-canary-{secrets.token_hex(6)}"
    path.write_text(secret)
    try:
        yield str(path), secret
    finally:
        path.unlink(missing_ok=True)


def test_read_canary_in_host_home(home_canary: tuple[str, str]) -> None:
    path, secret = home_canary
    paths = [path, "/proc/1/root" + path, "/proc/self/root" + path, "/home/../" + path]
    probe = f"PATHS = {paths!r}\n" + READ_FILES
    host = on_host(probe)
    assert host[path] == "ok:" + secret and host["/proc/self/root" + path] == "ok:" + secret
    ex = codecage.run(probe, policy())
    assert secret not in stdout_of(ex)
    inside = result_of(stdout_of(ex))
    for p in paths:
        assert inside[p] in ("ENOENT", "EACCES", "EPERM"), (p, inside[p])


# -- environment and memory: nothing of the host -------------------------------------------

SCANNER = (
    PRELUDE
    + r"""
H1L, H2L = len(H1), len(H2)
def holds(data):
    # H1 immediately followed by H2, without ever building their concatenation
    b1, b2 = H1.encode(), H2.encode()
    i = data.find(b1)
    while i >= 0:
        if data[i + H1L : i + H1L + H2L] == b2:
            return True
        i = data.find(b1, i + 1)
    return False

environ_hits, environ_read, names = [], 0, []
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        continue
    environ_read += 1
    if holds(data):
        environ_hits.append(pid)
    if (NAME + "=").encode() in data:
        names.append(pid)

mem_hits, scanned, regions = [], 0, 0
fd = os.open("/proc/self/mem", os.O_RDONLY)
with open("/proc/self/maps") as f:
    maps = f.read().splitlines()
CH = 1 << 20
for line in maps:
    parts = line.split()
    start, end = (int(x, 16) for x in parts[0].split("-"))
    if "r" not in parts[1] or (len(parts) > 5 and parts[5].startswith(("[vvar", "[vsyscall"))):
        continue
    regions += 1
    pos, tail = start, b""
    while pos < end:
        try:
            chunk = os.pread(fd, min(CH, end - pos), pos)
        except OSError:
            break
        if not chunk:
            break
        scanned += len(chunk)
        if holds(tail + chunk):
            mem_hits.append(line)
            break
        tail = chunk[-(H1L + H2L):]
        pos += len(chunk)
os.close(fd)
report(environ_hits=environ_hits, environ_read=environ_read, names=names,
       mem_hits=mem_hits, scanned=scanned, regions=regions)
"""
)


def test_no_host_environment_in_sandbox_env_or_memory() -> None:
    name = "CODECAGE_CANARY_" + secrets.token_hex(4).upper()
    half1, half2 = secrets.token_hex(12), secrets.token_hex(12)
    probe = f"H1 = {half1!r}\nNAME = {name!r}\nH2 = {half2!r}\n" + SCANNER
    assert half1 + half2 not in probe
    os.environ[name] = half1 + half2
    try:
        # Positive control: a subprocess that inherited the canary finds it, in its
        # /proc/<pid>/environ and in its own memory.
        host = on_host(probe, env=dict(os.environ))
        # A jail started after the canary was planted (its template is started now, from
        # this very process), so that "not found" cannot be due to an older template.
        jail = BACKENDS[policy().isolation].load()
        try:
            sandbox = jail.create(policy())
            try:
                ex = sandbox.execute(probe, mode="main", recover=False)
            finally:
                sandbox.kill()
        finally:
            jail.close()
    finally:
        del os.environ[name]
    assert host["environ_hits"] and host["names"] and host["mem_hits"], host
    assert ex.error is None and ex.killed_by is None, (ex.error, ex.killed_by)
    inside = result_of(stdout_of(ex))
    assert inside["environ_read"] >= 1 and inside["regions"] > 10, inside
    assert inside["scanned"] > 20 << 20, inside  # the scan really read the process's memory
    assert inside["environ_hits"] == [] and inside["names"] == [], inside
    assert inside["mem_hits"] == [], inside
    # and the default jail (template shared by the other tests) too
    os.environ[name] = half1 + half2
    try:
        ex = codecage.run(probe, policy())
    finally:
        del os.environ[name]
    inside = result_of(stdout_of(ex))
    assert inside["environ_hits"] == [] and inside["names"] == [] and inside["mem_hits"] == [], (
        inside
    )


# -- writes outside the workspace ----------------------------------------------------------

WRITE_DIRS = (
    PRELUDE
    + r"""
import numpy
site = os.path.dirname(os.path.dirname(numpy.__file__))
targets = {"usr": "/usr", "usr_bin": "/usr/bin", "etc": "/etc", "site": site,
           "numpy": os.path.dirname(numpy.__file__), "runtime": sys.prefix, "codecage": PKG}
out = {}
for key, d in targets.items():
    path = os.path.join(d, "codecage-attack-" + TOKEN)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"pwned")
        os.close(fd)
        os.unlink(path)
        out[key] = "ok"
    except Exception as exc:
        out[key] = errname(exc)
try:  # an existing file of the runtime, opened for writing (nothing is written)
    os.close(os.open(numpy.__file__, os.O_WRONLY | os.O_APPEND))
    out["existing"] = "ok"
except Exception as exc:
    out["existing"] = errname(exc)
try:
    os.chmod(numpy.__file__, os.stat(numpy.__file__).st_mode)
    out["chmod"] = "ok"
except Exception as exc:
    out["chmod"] = errname(exc)
report(site_dir=site, **out)
"""
)


def test_write_usr_etc_and_runtime() -> None:
    token = secrets.token_hex(6)
    # The codecage package where sandboxes see it (a staged copy, bound read-only).
    pkg = str(get_jail(policy().isolation).package)  # type: ignore[attr-defined]
    probe = f"TOKEN = {token!r}\nPKG = {pkg!r}\n" + WRITE_DIRS
    host = on_host(probe, python=RUNTIME_PYTHON)  # the sandbox's own interpreter, as root
    keys = ["usr", "usr_bin", "etc", "site", "numpy", "runtime", "codecage", "existing", "chmod"]
    assert all(host[k] == "ok" for k in keys), host
    inside = in_jail(probe)
    assert inside["site_dir"] == host["site_dir"]  # the same site-packages, seen at the same path
    for key in keys:
        assert inside[key] in ("EROFS", "EACCES", "EPERM"), (key, inside[key])
    assert host_pids_with(token) == []
    leftovers = [
        p
        for p in ("/usr", "/etc", host["site_dir"])
        if (Path(p) / f"codecage-attack-{token}").exists()
    ]
    assert leftovers == []


ROOT_WRITE = (
    PRELUDE
    + r"""
path = "/root/codecage-root-" + TOKEN
try:
    with open(path, "w") as f:
        f.write("written in /root")
    out = {"write": "ok"}
except Exception as exc:
    out = {"write": errname(exc)}
report(**out)
"""
)

ROOT_HOME = (
    ROOT_WRITE.replace("report(**out)", "")
    + r"""
out["real"] = os.path.realpath("/root")
out["in_workspace"] = open("/home/user/codecage-root-" + TOKEN).read()
for key, op in (
    ("rename", lambda: os.rename("/root", "/root-old")),
    ("unlink", lambda: os.unlink("/root")),
    ("relink", lambda: os.symlink("/etc", "/root-new")),
):
    try:
        op()
        out[key] = "ok"
    except Exception as exc:
        out[key] = errname(exc)
os.chdir("/root")
out["cwd"] = os.getcwd()
report(**out)
"""
)


def test_root_is_the_workspace_and_writes_there_stay_inside() -> None:
    """/root (E2B's home for root, `cwd="/root"`) is a link on the read-only root to the
    workspace: a write there lands in the sandbox's own workspace, never in the host's
    /root, and the link itself cannot be moved or replaced."""
    token = secrets.token_hex(6)
    host_file = Path(f"/root/codecage-root-{token}")
    control = on_host(f"TOKEN = {token!r}\n" + ROOT_WRITE)  # the same write, on the host
    try:
        assert control["write"] == "ok" and host_file.read_text() == "written in /root"
    finally:
        host_file.unlink(missing_ok=True)
    inside = in_jail(f"TOKEN = {token!r}\n" + ROOT_HOME)
    assert inside["write"] == "ok" and inside["in_workspace"] == "written in /root"
    assert inside["real"] == "/home/user" and inside["cwd"] == "/home/user"
    for key in ("rename", "unlink", "relink"):
        assert inside[key] in ("EROFS", "EACCES", "EPERM", "EBUSY"), (key, inside[key])
    assert not host_file.exists()


# -- another sandbox's workspace -----------------------------------------------------------

WRITER = r"""
import os, time
for d in ("/home/user", "/tmp", "/dev/shm"):
    with open(os.path.join(d, MARKER), "w") as f:
        f.write("the other tenant's data")
print("written", flush=True)
time.sleep(HOLD)
"""

SEARCHER = (
    PRELUDE
    + r"""
roots = ["/home", "/tmp", "/dev/shm", "/run", "/mnt", "/srv", "/opt", "/media", "/var/tmp", "/root"]
pids = [p for p in os.listdir("/proc") if p.isdigit()]
hits, walked = [], 0
for pid in pids:  # every process's view of the places a workspace could be
    for sub in ("root/home/user", "root/tmp", "root/dev/shm", "cwd"):
        if os.path.exists(f"/proc/{pid}/{sub}/{MARKER}"):
            hits.append(f"/proc/{pid}/{sub}/{MARKER}")
for top in roots:
    depth0 = top.rstrip("/").count("/")
    for dirpath, dirnames, filenames in os.walk(top):
        walked += 1
        if MARKER in filenames:
            hits.append(os.path.join(dirpath, MARKER))
        if dirpath.count("/") - depth0 >= 3:
            dirnames[:] = []
report(hits=hits, walked=walked, pids=len(pids))
"""
)


def test_cannot_reach_another_sandboxs_workspace() -> None:
    marker = "codecage-xsb-" + secrets.token_hex(8)
    written = threading.Event()
    results: list[codecage.Execution] = []

    def watch(event: dict[str, Any]) -> None:
        if event.get("ev") == "stdout" and "written" in str(event.get("text")):
            written.set()

    def tenant_a() -> None:
        code = f"MARKER = {marker!r}\nHOLD = 6\n" + WRITER
        results.append(codecage.run(code, policy(timeout_s=20), on_event=watch))

    a = threading.Thread(target=tenant_a)
    a.start()
    try:
        assert written.wait(30), "tenant A never wrote its file"
        probe = f"MARKER = {marker!r}\n" + SEARCHER
        host = on_host(probe)  # positive control: root on the host finds A's files
        assert any(h.endswith("/home/user/" + marker) for h in host["hits"]), host
        b_result: list[dict[str, Any]] = []
        b = threading.Thread(target=lambda: b_result.append(in_jail(probe)))
        b.start()
        b.join(60)
        assert a.is_alive(), "tenant A ended before B looked: the test proved nothing"
    finally:
        a.join(60)
    assert b_result, "tenant B did not report"
    inside = b_result[0]
    assert inside["walked"] > 3, inside
    assert inside["hits"] == [], inside
    assert results and stdout_of(results[0]) == "written\n"


# -- network -------------------------------------------------------------------------------

NETWORK = (
    PRELUDE
    + r"""
import socket, struct
def attempt(fn):
    try:
        return fn()
    except socket.gaierror as exc:
        return "gaierror"
    except Exception as exc:
        return errname(exc)
def tcp_out():
    with socket.create_connection(("1.1.1.1", 53), timeout=5):
        return "ok"
def tcp_out2():
    with socket.create_connection(("8.8.8.8", 53), timeout=5):
        return "ok"
def udp_dns():
    query = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"\x04pypi\x03org\x00" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(query, ("8.8.8.8", 53))
        reply = s.recv(512)
        return "ok" if reply[:2] == b"\x42\x42" else "bad reply"
def resolve():
    socket.getaddrinfo("pypi.org", 443)
    return "ok"
def loopback():
    with socket.create_connection(("127.0.0.1", PORT), timeout=5) as s:
        return "ok:" + s.recv(64).decode()
report(tcp=attempt(tcp_out), tcp2=attempt(tcp_out2), udp=attempt(udp_dns), dns=attempt(resolve),
       loopback=attempt(loopback), ifaces=[n for _, n in socket.if_nameindex()])
"""
)


@pytest.fixture
def loopback_server() -> Iterator[tuple[int, str]]:
    """A TCP server on the host's loopback that greets each client with a token."""
    greeting = "hello-" + secrets.token_hex(4)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)
    stop = threading.Event()
    connections: list[str] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, addr = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                connections.append(str(addr))
                with contextlib.suppress(OSError):
                    conn.sendall(greeting.encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], greeting
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_network_is_cut_off(loopback_server: tuple[int, str]) -> None:
    port, greeting = loopback_server
    probe = f"PORT = {port}\n" + NETWORK
    host = on_host(probe)
    assert host["tcp"] == "ok" and host["tcp2"] == "ok", host
    assert host["udp"] == "ok" and host["dns"] == "ok", host
    assert host["loopback"] == "ok:" + greeting, host
    assert set(host["ifaces"]) - {"lo"}, host
    inside = in_jail(probe)
    assert inside["ifaces"] == ["lo"], inside
    # gVisor's netstack (a loopback-only stack) answers "no route" as EHOSTUNREACH
    unreachable = "EHOSTUNREACH" if current_backend() == "gvisor" else "ENETUNREACH"
    assert inside["tcp"] == unreachable and inside["tcp2"] == unreachable, inside
    assert inside["udp"] == unreachable, inside
    assert inside["dns"] == "gaierror", inside
    assert inside["loopback"] == "ECONNREFUSED", inside  # its own, empty loopback


# -- dangerous system calls ----------------------------------------------------------------

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWUSER, CLONE_NEWNET = 0x20000, 0x4000000, 0x10000000, 0x40000000

SYSCALL_PROBES: dict[str, str] = {
    "mount": r"""
import tempfile
d = tempfile.mkdtemp()
r, e = sc(165, b"none", d.encode(), b"tmpfs", 0, b"size=1m")
if r == 0:
    sc(166, d.encode(), 2)  # umount2(MNT_DETACH): leave nothing mounted on the host
os.rmdir(d)
report(ret=r, err=e)
""",
    "unshare_user": f"r, e = sc(272, {CLONE_NEWUSER}); report(ret=r, err=e)",
    "unshare_mount": f"r, e = sc(272, {CLONE_NEWNS}); report(ret=r, err=e)",
    "unshare_net": f"r, e = sc(272, {CLONE_NEWNET}); report(ret=r, err=e)",
    **{
        f"clone_{label}": rf"""
r, e = sc(56, {flags} | signal.SIGCHLD, 0, 0, 0, 0)
if r == 0:
    os._exit(0)  # the child: leave at once
if r > 0:
    os.waitpid(r, 0)
report(ret=r, err=e)
"""
        for label, flags in (
            ("newuser", CLONE_NEWUSER),
            ("newnet", CLONE_NEWNET),
            ("newuts", CLONE_NEWUTS),
        )
    },
    "setns": f"""
fd = os.open("/proc/self/ns/net", os.O_RDONLY)
r, e = sc(308, fd, {CLONE_NEWNET})
report(ret=r, err=e)
""",
    "keyctl": "r, e = sc(250, 0, -3, 1)  # KEYCTL_GET_KEYRING_ID, session keyring, create\n"
    "report(ret=r, err=e)",
    "bpf": r"""
attr = (ctypes.c_uint32 * 32)(2, 4, 4, 1)  # BPF_MAP_TYPE_ARRAY, key 4, value 4, 1 entry
r, e = sc(321, 0, attr, ctypes.sizeof(attr))  # BPF_MAP_CREATE
if r >= 0:
    os.close(r)
report(ret=r, err=e)
""",
    "ptrace_attach": r"""
import time
child = os.fork()
if child == 0:
    time.sleep(30)
    os._exit(0)
r, e = sc(101, 16, child, 0, 0)  # PTRACE_ATTACH
os.kill(child, signal.SIGKILL)
os.waitpid(child, 0)
report(ret=r, err=e)
""",
    "ptrace_traceme": r"""
child = os.fork()
if child == 0:
    r, e = sc(101, 0, 0, 0, 0)  # PTRACE_TRACEME
    os._exit(0 if r == 0 else 100 + (ctypes.get_errno() or 0))
_, status = os.waitpid(child, 0)
code = os.waitstatus_to_exitcode(status)
report(ret=0 if code == 0 else -1, err=None if code == 0 else errno.errorcode.get(code - 100, str(code)))
""",
    "io_uring_setup": r"""
params = (ctypes.c_char * 120)()
r, e = sc(425, 4, params)
if r >= 0:
    os.close(r)
report(ret=r, err=e)
""",
    "perf_event_open": r"""
attr = (ctypes.c_uint32 * 32)()
attr[0] = 1  # PERF_TYPE_SOFTWARE
attr[1] = 128  # size; config 0 = PERF_COUNT_SW_CPU_CLOCK; kernel not excluded
r, e = sc(298, attr, 0, -1, -1, 0)
if r >= 0:
    os.close(r)
report(ret=r, err=e)
""",
    "userfaultfd": r"""
r, e = sc(323, 1)  # UFFD_USER_MODE_ONLY: allowed to unprivileged users unless filtered
if r >= 0:
    os.close(r)
report(ret=r, err=e)
""",
}


@pytest.mark.parametrize("name", sorted(SYSCALL_PROBES))
def test_denied_syscall(name: str) -> None:
    probe = PRELUDE + SYSCALL_PROBES[name]
    host = on_host(probe)
    assert host["ret"] >= 0 and host["err"] is None, f"positive control failed on the host: {host}"
    inside = in_jail(probe)
    assert inside["ret"] == -1 and inside["err"] == "EPERM", inside


def test_clone3_answers_enosys_and_threads_still_work() -> None:
    probe = (
        PRELUDE
        + r"""
import threading
args = (ctypes.c_uint64 * 11)()
args[0] = 0x10000000  # CLONE_NEWUSER
args[4] = signal.SIGCHLD  # exit_signal
r, e = sc(435, args, ctypes.sizeof(args))
if r == 0:
    os._exit(0)
if r > 0:
    os.waitpid(r, 0)
box = []
t = threading.Thread(target=lambda: box.append(1)); t.start(); t.join()
report(ret=r, err=e, thread=box == [1])
"""
    )
    host = on_host(probe)
    assert host["ret"] > 0 and host["thread"], host
    inside = in_jail(probe)
    assert inside == {"ret": -1, "err": "ENOSYS", "thread": True}, inside


# Every argument rule of the filter, in each spelling the kernel reads as the same call:
# plain, with bit 32 set (the kernel truncates `int` arguments to 32 bits), and with every
# bit above the argument's width set. The probe is built from seccomp.ARG_RULES itself, so a
# rule added there is probed here. Each call is made so that the kernel, when it gets it,
# answers harmlessly without EPERM (sockets open; ioctl on a pipe: ENOTTY; mknod under a
# missing directory: ENOENT; clone with CLONE_SIGHAND but no CLONE_VM: EINVAL, before any
# namespace exists), so EPERM can only come from the filter.
ARG_RULE_PROBE = r"""
NR = {"socket": 41, "ioctl": 16, "mknod": 133, "mknodat": 259, "clone": 56}
CLONE_SIGHAND, AT_FDCWD, SO_DOMAIN = 0x800, -100, 39
missing = b"/codecage-missing-dir/node"
read_end, write_end = os.pipe()
def call(name, v):
    if name == "socket":
        family = v[0] & 0xFFFFFFFF
        r, e = sc(NR[name], v[0], 1 if family == 40 else 2, v.get(2, 0))
        if r >= 0:
            dom = ctypes.c_int()
            size = ctypes.c_uint(4)
            libc.getsockopt(ctypes.c_int(r), 1, SO_DOMAIN, ctypes.byref(dom), ctypes.byref(size))
            os.close(r)
            return "ok:%d" % dom.value
        return e
    if name == "ioctl":
        return sc(NR[name], read_end, v[1], ctypes.create_string_buffer(64))[1] or "ok"
    if name == "mknod":
        return sc(NR[name], missing, v[1] | 0o600, 0)[1] or "ok"
    if name == "mknodat":
        return sc(NR[name], AT_FDCWD, missing, v[2] | 0o600, 0)[1] or "ok"
    if name == "clone":
        r, e = sc(NR[name], v[0] | CLONE_SIGHAND, 0, 0, 0, 0)
        if r == 0:
            os._exit(0)
        if r > 0:
            os.waitpid(r, 0)
        return e or "ok"
    raise AssertionError("no probe for " + name)
out = {}
for i, (name, args) in enumerate(RULES):
    for spelling in ("plain", "bit32", "ignored"):
        v = {}
        for index, bits, value in args:
            if spelling == "bit32":
                value |= 1 << 32
            elif spelling == "ignored":
                value |= ((1 << 64) - 1) & ~((1 << bits) - 1)
            v[index] = value
        out["%d:%s:%s" % (i, name, spelling)] = call(name, v)
report(**out)
"""


def arg_rule_probe() -> str:
    """The probe above, with the filter's own rule table spelled into it."""
    from codecage._inside import seccomp

    rules = [
        (rule.syscall, [(i, seccomp.ARG_BITS[(rule.syscall, i)], v) for i, _, v in rule.args])
        for rule in seccomp.ARG_RULES
    ]
    return PRELUDE + f"RULES = {rules!r}\n" + ARG_RULE_PROBE


def assert_reaches_the_kernel(host: dict[str, Any]) -> None:
    """The positive control: on the host every spelling is the call the rule refuses."""
    from codecage._inside import seccomp

    assert len(host) == 3 * len(seccomp.ARG_RULES), host
    for key, got in host.items():
        name = key.split(":")[1]
        assert got != "EPERM", (key, got)
        if name == "socket":  # the socket really opens, in the family the rule is about
            family = seccomp.ARG_RULES[int(key.split(":")[0])].args[0][2]
            assert got == f"ok:{family}", (key, got)
        else:
            assert got == {"ioctl": "ENOTTY", "clone": "EINVAL"}.get(name, "ENOENT"), (key, got)


def test_argument_rules_hold_in_every_spelling() -> None:
    probe = arg_rule_probe()
    assert_reaches_the_kernel(on_host(probe))
    inside = in_jail(probe)
    assert inside and all(got == "EPERM" for got in inside.values()), {
        k: v for k, v in inside.items() if v != "EPERM"
    }


# -- resource exhaustion -------------------------------------------------------------------

FORK_BOMB = r"""
import os
print("bombing", os.getuid(), flush=True)
while True:
    try:
        os.fork()
    except OSError:
        pass
"""

THREAD_BOMB = r"""
import os, threading, time
print("bombing", os.getuid(), flush=True)
started = 0
while True:
    try:
        threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
        started += 1
    except RuntimeError:
        pass
"""


@pytest.mark.slow
@pytest.mark.parametrize("bomb", ["fork", "thread"])
def test_bombs_are_contained(bomb: str) -> None:
    code = FORK_BOMB if bomb == "fork" else THREAD_BOMB
    ex = codecage.run(code, policy(pids_max=32, timeout_s=5))
    uid = uid_after("bombing", ex)
    if current_backend() == "gvisor":
        # The guest's tasks are counted by the sentry (RLIMIT_NPROC: EAGAIN inside, which
        # the host does not see); the host cgroup counts runsc's own tasks, ~35 per guest
        # process on the ptrace platform here, so a fork bomb reaches its floor
        # (guest_oom.PIDS_FLOOR) and the sentry SIGKILLs the forking kernel; a thread bomb
        # stays below it and runs into its timeout (the guest's EAGAIN is not seen).
        # A fork bomb also costs host memory per guest process (page tables, the stubs):
        # whichever of the host's floor or memory limit comes first ends it, contained.
        if ex.killed_by == "signal":
            assert bomb == "fork" and "pids_limit" in ex.limits_hit, ex.limits_hit
        elif ex.killed_by == "memory_limit":
            assert bomb == "fork" and "memory_limit" in ex.limits_hit, ex.limits_hit
        else:
            assert ex.killed_by == "timeout", (ex.killed_by, ex.limits_hit)
    else:
        assert "pids_limit" in ex.limits_hit, ex.limits_hit
        assert ex.killed_by == "timeout", ex.killed_by
    assert leftovers(uid) == []
    assert host_can_fork()
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()


def test_memory_bomb() -> None:
    before = vm_rss_kb()
    code = 'print("eating", flush=True)\nx = []\nwhile True:\n    x.append(b"x" * (8 << 20))\n'
    ex = codecage.run(code, policy(memory_mb=128, timeout_s=30))
    assert stdout_of(ex) == "eating\n"
    assert ex.killed_by == "memory_limit", (ex.killed_by, ex.limits_hit, ex.error)
    assert "memory_limit" in ex.limits_hit
    # gvisor: the hard limit stands GUEST_OOM_HEADROOM_MB above memory_mb, where the kernel
    # is ended (room for what the code allocates while the kill is on its way)
    headroom = guest_oom.GUEST_OOM_HEADROOM_MB if current_backend() == "gvisor" else 0
    assert ex.peak_memory_mb is not None and ex.peak_memory_mb <= 128 + 1 + headroom
    assert vm_rss_kb() - before < 20 << 10
    assert host_can_fork()
    ok = codecage.run("print(sum(range(10)))", policy())  # the service goes on
    assert stdout_of(ok) == "45\n"


def oom_scores(sbx: codecage.Sandbox) -> tuple[int, int]:
    """(init's, the kernel's) oom_score_adj, read on the host from /proc: the kernel is the
    child of init whose innermost pid is the one the kernel itself reports."""
    inner = int(result_of(stdout_of(sbx.run_code(PRELUDE + "report(pid=os.getpid())")))["pid"])
    init = sbx._jailed.init_pid
    assert init is not None
    children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    (kernel,) = [
        pid
        for pid in children
        if any(
            line.startswith("NSpid:") and line.split()[-1] == str(inner)
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
    ]
    read = lambda pid: int(Path(f"/proc/{pid}/oom_score_adj").read_text())  # noqa: E731
    return read(init), read(kernel)


def test_the_kernel_is_the_oom_killers_first_pick() -> None:
    if current_backend() == "gvisor":
        pytest.skip("the guest's processes are the sentry's: the host's OOM killer sees runsc")
    with codecage.Sandbox(policy(memory_mb=160, timeout_s=60)) as sbx:
        init_pid = sbx._jailed.init_pid
        init_score, kernel_score = oom_scores(sbx)
        assert kernel_score == 1000 and init_score < 1000, (init_score, kernel_score)
        eat = "x = []\nwhile True:\n    x.append(b'x' * (8 << 20))\n"
        ex = sbx.run_code(eat)
        assert ex.killed_by == "memory_limit", (ex.killed_by, ex.limits_hit, ex.error)
        # the kill took the kernel: the same init goes on, and so does a new kernel, scored
        assert sbx._jailed.init_pid == init_pid and os.path.exists(f"/proc/{init_pid}")
        assert stdout_of(sbx.run_code("print(6 * 7)")) == "42\n"
        assert oom_scores(sbx) == (init_score, 1000)


FILL = (
    PRELUDE
    + r"""
import tempfile
path = tempfile.mktemp(dir=DIR, prefix="fill-")
written, err = 0, None
block = b"\xa5" * (1 << 20)
try:
    with open(path, "wb", buffering=0) as f:
        while written < LIMIT:
            written += f.write(block)
            f.flush()
except OSError as exc:
    err = errname(exc)
finally:
    if CLEAN:
        os.unlink(path)
print("errno", err, flush=True)
report(written=written, err=err)
"""
)


@pytest.mark.parametrize(
    ("where", "field"), [("/home/user", "disk_mb"), ("/tmp", "tmp_mb"), ("/dev/shm", "shm_mb")]
)
def test_filling_a_filesystem(where: str, field: str) -> None:
    size_mb = 16
    with tempfile.TemporaryDirectory() as scratch:
        # Positive control: the probe writes 3x the quota where there is room.
        host = on_host(f"DIR = {scratch!r}\nLIMIT = {3 * size_mb << 20}\nCLEAN = True\n" + FILL)
    assert host == {"written": 3 * size_mb << 20, "err": None}, host
    probe = f"DIR = {where!r}\nLIMIT = {3 * size_mb << 20}\nCLEAN = False\n" + FILL
    ex = codecage.run(probe, policy(**{field: size_mb}))
    assert ex.error is None and ex.killed_by is None, (ex.error, ex.killed_by)
    inside = result_of(stdout_of(ex))
    assert inside["err"] == "ENOSPC", inside
    assert inside["written"] <= size_mb << 20, inside
    assert "errno ENOSPC" in stdout_of(ex)
    if current_backend() == "gvisor":
        # the tmpfs lives in the sentry's memory: the host has no statvfs of it, so the
        # ENOSPC above (the sentry's size= limit) is all there is; limits_hit cannot say
        assert "disk_quota" not in ex.limits_hit, ex.limits_hit
    else:
        assert "disk_quota" in ex.limits_hit, ex.limits_hit


@pytest.mark.parametrize(
    "code",
    [
        "import os\nprint('started', os.getuid(), flush=True)\nwhile True:\n    pass\n",
        "import os, time\nprint('started', os.getuid(), flush=True)\ntime.sleep(10**6)\n",
    ],
    ids=["spin", "sleep"],
)
def test_timeout(code: str) -> None:
    ex = codecage.run(code, policy(timeout_s=1))
    uid = uid_after("started", ex)  # it really ran
    # Code that never ends came back, ended by its time limit (never before it: a lower
    # bound, the only timing a loaded machine cannot break).
    assert ex.killed_by == "timeout" and "timeout" in ex.limits_hit, (ex.killed_by, ex.limits_hit)
    assert ex.duration_ms >= 1000, ex.duration_ms
    assert leftovers(uid) == []


ESCAPE_TREE = r"""
import os, signal, sys, time
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
child = os.fork()
if child == 0:
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    # the grandchild: its own session, orphaned, deaf to TERM/INT/HUP (kept across exec)
    os.execv(sys.executable, [sys.executable, "-c",
             "import time\nwhile True: time.sleep(1)", MARKER])
os.waitpid(child, 0)
time.sleep(0.5)
seen = []
for pid in os.listdir("/proc"):
    try:
        if MARKER.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
            seen.append(pid)
    except OSError:
        pass
print("grandchild", os.getuid(), len(seen), flush=True)
time.sleep(10**6)
"""


def test_orphaned_session_does_not_outlive_the_sandbox() -> None:
    marker = "codecage-orphan-" + secrets.token_hex(6)
    ex = codecage.run(f"MARKER = {marker!r}\n" + ESCAPE_TREE, policy(timeout_s=2))
    uid = uid_after("grandchild", ex)
    assert stdout_of(ex) == f"grandchild {uid} 1\n"  # it was running inside (positive control)
    assert ex.killed_by == "timeout"
    assert host_pids_with(marker) == []
    assert leftovers(uid) == []


# -- output --------------------------------------------------------------------------------


class RssSampler:
    """Peak VmRSS of this process while a run goes on."""

    def __init__(self) -> None:
        self.base = vm_rss_kb()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, vm_rss_kb())
            time.sleep(0.005)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, vm_rss_kb())


@pytest.mark.parametrize(
    "code",
    [
        "import sys\nline = 'x' * 999 + '\\n'\nfor _ in range(150_000):\n    sys.stdout.write(line)\n",
        "import sys\nsys.stdout.write('y' * (100 << 20))\n",
        "import os\nos.write(1, b'z' * (100 << 20))\n",
        "import os\nos.write(2, b'e' * (50 << 20))\nos.write(1, b'o' * (50 << 20))\n",
    ],
    ids=["flood", "long-line", "fd-long-line", "both-streams"],
)
def test_output_flood_is_capped(code: str) -> None:
    with RssSampler() as rss:
        ex = codecage.run(code, policy(timeout_s=60))
    total = sum(len(c.encode()) for c in ex.logs.stdout + ex.logs.stderr)
    assert ex.killed_by is None and ex.error is None, (ex.killed_by, ex.error)
    assert ex.truncated is True
    assert "output_limit" in ex.limits_hit, ex.limits_hit
    assert 0 < total <= policy().output_bytes, total
    assert rss.peak - rss.base < 40 << 10, f"the host grew by {(rss.peak - rss.base) >> 10} MB"


# -- signals -------------------------------------------------------------------------------

KILL_ALL = r"""
import os, signal, time
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
time.sleep(0.2)
os.kill(-1, signal.SIGKILL)
_, status = os.waitpid(child, 0)
print("child", os.WTERMSIG(status) if os.WIFSIGNALED(status) else "exited", flush=True)
"""


def test_kill_minus_one_stays_inside() -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        ex = codecage.run(KILL_ALL, policy())
        # positive control, inside: kill(-1) really killed the sandbox's own child
        assert stdout_of(ex) == f"child {int(signal.SIGKILL)}\n", (stdout_of(ex), ex.killed_by)
        assert bystander.poll() is None, "a host process was killed by the sandbox"
        assert os.getppid() > 1 and Path(f"/proc/{os.getpid()}").exists()
    finally:
        bystander.kill()
        bystander.wait()


# -- code execution that stays inside ------------------------------------------------------

SYSTEM = (
    PRELUDE
    + r"""
target = "/etc/codecage-pwned-" + TOKEN
rc = libc.system(("id -u > out; (cd /proc && echo [0-9]*) > procs; touch %s 2> err; echo $? > rc; rm -f %s 2> /dev/null || true" % (target, target)).encode())
read = lambda name: open(name).read().strip()
report(system=rc, uid=read("out"), pids=[p for p in read("procs").split() if p.isdigit()],
       touch_rc=int(read("rc")), touch_err=read("err"), cwd=os.getcwd())
"""
)


def test_libc_system_runs_but_stays_inside() -> None:
    token = secrets.token_hex(6)
    probe = f"TOKEN = {token!r}\n" + SYSTEM
    with tempfile.TemporaryDirectory() as cwd:
        host = on_host(probe, cwd=cwd)
    assert host["system"] == 0 and host["uid"] == "0" and host["touch_rc"] == 0, host
    assert len(host["pids"]) > 20, host
    inside = in_jail(probe)
    assert inside["system"] == 0 and is_sandbox_uid(int(inside["uid"])), inside
    assert inside["touch_rc"] != 0, inside
    assert (
        "Read-only file system" in inside["touch_err"] or "Permission denied" in inside["touch_err"]
    )
    assert len(inside["pids"]) <= 6, inside  # init, the kernel, the shell and its children
    assert not Path(f"/etc/codecage-pwned-{token}").exists()


SUBCLASS_WALK = r"""
import json
found = None
for cls in ().__class__.__base__.__subclasses__():
    g = getattr(getattr(cls, "__init__", None), "__globals__", None)
    if isinstance(g, dict) and "sys" in g:
        found = cls
        break
sys_module = found.__init__.__globals__["sys"]
os_module = sys_module.modules["os"]
try:
    shadow = "ok:" + os_module.fdopen(os_module.open("/etc/shadow", os_module.O_RDONLY)).read()[:5]
except OSError as exc:
    shadow = type(exc).__name__
uid = os_module.popen("id -u").read().strip()
pids = [p for p in os_module.listdir("/proc") if p.isdigit()]
print("RESULT " + json.dumps({"via": found.__name__, "shadow": shadow, "uid": uid, "pids": len(pids)}))
"""


def test_subclass_walk_reaches_os_but_stays_inside() -> None:
    host = on_host(SUBCLASS_WALK)
    assert host["shadow"] == "ok:root:" and host["uid"] == "0", host
    inside = in_jail(SUBCLASS_WALK)
    assert inside["via"], inside
    assert inside["shadow"] == "FileNotFoundError", inside
    assert is_sandbox_uid(int(inside["uid"])), inside
    assert inside["pids"] <= 4, inside


# -- the operator's terminal ---------------------------------------------------------------

TERMINAL = (
    PRELUDE
    + r"""
import fcntl, termios
out = {}
out["tty_nr"] = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[4])
try:
    os.close(os.open("/dev/tty", os.O_RDWR))
    out["dev_tty"] = "ok"
except OSError as exc:
    out["dev_tty"] = errname(exc)
out["isatty"] = [os.isatty(fd) for fd in (0, 1, 2)]
sti = {}
for fd in (0, 1, 2):
    try:
        fcntl.ioctl(fd, termios.TIOCSTI, b"x")
        sti[fd] = "ok"
    except OSError as exc:
        sti[fd] = errname(exc)
out["sti_std"] = sti
# A pty of its own, made the controlling terminal of a new session: the kernel itself
# allows TIOCSTI there (no privilege needed), so only the jail's filter can refuse it.
master, slave = os.openpty()
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    try:
        fcntl.ioctl(slave, termios.TIOCSTI, b"x")
        res = "ok"
    except OSError as exc:
        res = errname(exc)
    os.write(w, res.encode())
    os._exit(0)
os.waitpid(child, 0)
out["sti_own_ctty"] = os.read(r, 100).decode()
try:
    fcntl.ioctl(slave, termios.TIOCSTI, b"x")
    out["sti_own_pty"] = "ok"
except OSError as exc:
    out["sti_own_pty"] = errname(exc)
report(**out)
"""
)


def test_no_terminal_and_no_tiocsti() -> None:
    # Positive control for "no controlling terminal": the probe under a pty on the host.
    wrapper = f"import pty, sys\npty.spawn([sys.executable, '-c', {TERMINAL!r}])\n"
    proc = subprocess.run(
        [sys.executable, "-c", wrapper],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    host = result_of(proc.stdout.replace("\r", ""))
    assert (
        host["tty_nr"] != 0 and host["dev_tty"] == "ok" and host["isatty"] == [True, True, True]
    ), host
    assert host["sti_std"] == {"0": "ok", "1": "ok", "2": "ok"}, host
    assert host["sti_own_ctty"] == "ok" and host["sti_own_pty"] == "ok", host
    inside = in_jail(TERMINAL)
    assert inside["tty_nr"] == 0, inside
    # bwrap's /dev has a tty node: no controlling terminal (ENXIO), and Landlock refuses
    # opening it for writing (EACCES)
    # (gVisor's /dev/tty answers EIO without a controlling terminal)
    no_tty = ("ENOENT", "ENXIO", "EACCES") + (("EIO",) if current_backend() == "gvisor" else ())
    assert inside["dev_tty"] in no_tty, inside
    assert inside["isatty"] == [False, False, False], inside
    assert all(v in ("EPERM", "ENOTTY") for v in inside["sti_std"].values()), inside
    assert inside["sti_own_ctty"] == "EPERM", inside
    assert inside["sti_own_pty"] == "EPERM", inside


# -- foreign system call ABIs --------------------------------------------------------------

ABI_CHILD = (
    PRELUDE
    + r"""
import mmap
def in_child(fn):
    child = os.fork()
    if child == 0:
        os._exit(fn())
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        return "signal:" + signal.Signals(os.WTERMSIG(status)).name
    code = os.WEXITSTATUS(status)
    return "ok" if code == 0 else errno.errorcode.get(code - 100, "exit:" + str(code))
def x32():
    r, e = sc(39 | 0x40000000)  # getpid through the x32 ABI
    return 0 if r == os.getpid() else 100 + ctypes.get_errno()
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(b"\xb8\x14\x00\x00\x00\xcd\x80\xc3")  # mov eax, 20 (i386 getpid); int 0x80; ret
int80 = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
report(x32=in_child(x32), i386=in_child(lambda: 0 if int80() == os.getpid() else 3))
"""
)


def test_foreign_abis_kill_the_process() -> None:
    host = on_host(ABI_CHILD)
    assert host["i386"] == "ok", host  # int 0x80 getpid works on this host
    # x32: the host either supports it or lacks it (ENOSYS: CONFIG_X86_X32_ABI unset here)
    assert host["x32"] in ("ok", "ENOSYS"), host
    inside = in_jail(ABI_CHILD)  # only children use the foreign ABIs: they must die of SIGSYS
    if current_backend() == "gvisor":
        # The sentry has no i386 ABI: `int 0x80` is served with its native table (20 is
        # writev there, on a bad descriptor), so i386 getpid never runs; that the same
        # seccomp program filters it is test_i386_syscall_reported_as_seccomp_kill's.
        assert inside == {"x32": "signal:SIGSYS", "i386": "exit:3"}, inside
    else:
        assert inside == {"x32": "signal:SIGSYS", "i386": "signal:SIGSYS"}, inside


def test_x32_syscall_reported_as_seccomp_kill() -> None:
    probe = (
        PRELUDE
        + "print('calling', flush=True)\nsc(39 | 0x40000000)\nprint('survived', flush=True)\n"
    )
    if current_backend() == "gvisor":
        # gVisor (Debian's 2022 runsc) kills only the calling thread on the filter's
        # bad-arch verdict: the call never runs and that thread dies (a single-threaded
        # process dies of SIGSYS, test_foreign_abis_kill_the_process), but the kernel's other
        # threads live on, so the run ends by its timeout, not as a seccomp kill.
        ex = codecage.run(probe, policy(timeout_s=2))
        assert stdout_of(ex) == "calling\n"
        assert ex.killed_by == "timeout", (ex.killed_by, ex.exit_code, ex.limits_hit)
        return
    ex = codecage.run(probe, policy())
    assert stdout_of(ex) == "calling\n"
    assert ex.killed_by == "seccomp", (ex.killed_by, ex.exit_code, ex.limits_hit)
    assert ex.exit_code == 128 + signal.SIGSYS, ex.exit_code


def test_i386_syscall_reported_as_seccomp_kill() -> None:
    probe = (
        PRELUDE
        + r"""
import mmap
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(b"\xb8\x14\x00\x00\x00\xcd\x80\xc3")
int80 = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
print("calling", flush=True)
print("survived", int80() == os.getpid(), flush=True)
"""
    )
    if current_backend() == "gvisor":
        # No i386 ABI in the sentry: `int 0x80` runs the native call of that number (20 is
        # writev: not getpid; 39 is getpid), through the same seccomp program: personality
        # (135), denied by the filter, is refused with EPERM that way too.
        inside = in_jail(probe.replace('print("calling", flush=True)\n', "") + INT80_NATIVE)
        assert inside == {
            "i386_getpid": False,
            "native_getpid": True,  # the control: int 0x80 reaches the sentry's native table
            "personality": [-1, "EPERM"],
        }, inside
        return
    ex = codecage.run(probe, policy())
    assert stdout_of(ex) == "calling\n"
    assert ex.killed_by == "seccomp", (ex.killed_by, ex.exit_code, ex.limits_hit)


INT80_NATIVE = r"""
pages = []  # kept mapped while their code is called
def machine_code(code):
    pages.append(mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC))
    pages[-1].write(code)
    return ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(pages[-1])))
native_getpid = machine_code(b"\xb8\x27\x00\x00\x00\xcd\x80\xc3")  # eax=39; int 0x80
personality = machine_code(b"\xbf\xff\xff\xff\xff\xb8\x87\x00\x00\x00\xcd\x80\xc3")  # edi=-1; eax=135
r = personality()
report(i386_getpid=int80() == os.getpid(), native_getpid=native_getpid() == os.getpid(),
       personality=[r, errno.errorcode.get(-r) if r < 0 else None])
"""


def test_killed_by_a_signal_reports_128_plus_signal() -> None:
    """The documented contract: exit_code is 128+signal when the code was killed."""
    ex = codecage.run(
        "import os, signal\nprint('x', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n",
        policy(),
    )
    assert stdout_of(ex) == "x\n"
    assert ex.killed_by == "signal", ex.killed_by
    assert ex.exit_code == 128 + signal.SIGKILL, ex.exit_code


# -- more ways out -------------------------------------------------------------------------

CGROUP_WRITE = (
    PRELUDE
    + r"""
out = {}
for name, value in (("pids.max", "max"), ("notify_on_release", "1"), ("cgroup.procs", str(os.getpid()))):
    path = os.path.join(DIR, name)
    try:
        with open(path, "w") as f:
            f.write(value)
        out[name] = "ok"
    except Exception as exc:
        out[name] = errname(exc)
try:
    with open(os.path.join(MEMDIR, "memory.limit_in_bytes"), "w") as f:
        f.write(str(1 << 40))
    out["memory"] = "ok"
except Exception as exc:
    out["memory"] = errname(exc)
out["release_agent"] = os.path.exists(os.path.join(os.path.dirname(DIR), "release_agent"))
report(**out)
"""
)


@pytest.fixture
def scratch_cgroups() -> Iterator[tuple[str, str]]:
    """Throw-away v1 cgroups on the host, for the positive control."""
    name = "codecage-attack-" + secrets.token_hex(4)
    pids, mem = Path("/sys/fs/cgroup/pids") / name, Path("/sys/fs/cgroup/memory") / name
    pids.mkdir()
    mem.mkdir()
    try:
        yield str(pids), str(mem)
    finally:
        for d in (pids, mem):
            for pid in (d / "cgroup.procs").read_text().split():  # the probe has exited
                Path("/sys/fs/cgroup", d.parent.name, "cgroup.procs").write_text(pid)
            d.rmdir()


def test_cannot_lift_its_own_cgroup_limits(scratch_cgroups: tuple[str, str]) -> None:
    pids_dir, mem_dir = scratch_cgroups
    host = on_host(f"DIR = {pids_dir!r}\nMEMDIR = {mem_dir!r}\n" + CGROUP_WRITE)
    assert {
        k: host[k] for k in ("pids.max", "notify_on_release", "cgroup.procs", "memory")
    } == dict.fromkeys(("pids.max", "notify_on_release", "cgroup.procs", "memory"), "ok"), host
    probe = "DIR = '/sys/fs/cgroup/pids'\nMEMDIR = '/sys/fs/cgroup/memory'\n" + CGROUP_WRITE
    inside = in_jail(probe, policy(pids_max=20, memory_mb=256))
    if current_backend() == "gvisor":
        # the sentry shows no cgroup hierarchy at all: the host's cgroups (on the whole
        # runsc sandbox) are out of the guest's reach, and nothing inside reads them
        assert {k: inside[k] for k in ("pids.max", "notify_on_release", "cgroup.procs")} == (
            dict.fromkeys(("pids.max", "notify_on_release", "cgroup.procs"), "ENOENT")
        ), inside
        assert inside["memory"] == "ENOENT" and inside["release_agent"] is False, inside
        return
    for key in ("pids.max", "notify_on_release", "cgroup.procs", "memory"):
        assert inside[key] in ("EROFS", "EACCES", "EPERM"), (key, inside[key])
    assert inside["release_agent"] is False  # the hierarchy's root is not visible inside
    # 256 MiB: bwrap's init imports the data stack itself; at 100 MiB an unlucky start could
    # be killed by its memory limit before the probe ran
    limits = in_jail(
        "import json\nprint('RESULT ' + json.dumps({'pids': open('/sys/fs/cgroup/pids/pids.max').read().strip(),"
        " 'mem': open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read().strip()}))",
        policy(pids_max=20, memory_mb=256),
    )
    monitor = 1 if policy().isolation == "bwrap" else 0  # bwrap's monitor shares the cgroup
    assert limits == {"pids": str(20 + monitor), "mem": str(256 << 20)}


MKNOD = (
    PRELUDE
    + r"""
import stat
out = {}
for label, major, minor in (("null", 1, 3), ("mem", 1, 1)):
    path = os.path.join(DIR, "node-" + label)
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.unlink(path)
        out[label] = "ok"
    except Exception as exc:
        out[label] = errname(exc)
for dev in ("/dev/mem", "/dev/kmem", "/dev/port", "/dev/vda", "/dev/sda", "/dev/kmsg"):
    try:
        os.close(os.open(dev, os.O_RDONLY))
        out[dev] = "ok"
    except Exception as exc:
        out[dev] = errname(exc)
report(**out)
"""
)


def test_no_device_nodes() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        host = on_host(f"DIR = {scratch!r}\n" + MKNOD)
    assert host["null"] == "ok" and host["mem"] == "ok" and host["/dev/kmsg"] == "ok", host
    inside = in_jail("DIR = '/home/user'\n" + MKNOD)
    assert inside["null"] in ("EPERM", "EACCES") and inside["mem"] in ("EPERM", "EACCES"), inside
    for dev in ("/dev/mem", "/dev/kmem", "/dev/port", "/dev/vda", "/dev/sda", "/dev/kmsg"):
        assert inside[dev] == "ENOENT", (dev, inside[dev])


@pytest.fixture
def abstract_unix_server() -> Iterator[str]:
    """A host service on an abstract unix socket (not in the filesystem: only a network
    namespace separates it from the sandbox)."""
    name = "\0codecage-attack-" + secrets.token_hex(6)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(name)
    server.listen(4)
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.sendall(b"host-service")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield name
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_abstract_unix_socket_of_the_host(abstract_unix_server: str) -> None:
    probe = (
        PRELUDE
        + f"NAME = {abstract_unix_server!r}\n"
        + r"""
import socket
try:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(NAME)
        got = "ok:" + s.recv(64).decode()
except Exception as exc:
    got = errname(exc)
report(got=got)
"""
    )
    assert on_host(probe) == {"got": "ok:host-service"}
    assert in_jail(probe) == {"got": "ECONNREFUSED"}


MALFORMED = r"""
import gc, struct, time
channel = [o for o in gc.get_objects() if type(o).__name__ == "Channel"][0]
channel.sock.sendall(PAYLOAD)
time.sleep(10**6)  # only the host's reaction ends the run before its timeout
"""


@pytest.mark.parametrize(
    "payload",
    [b"\x00\x00\x00\x05hello", b"\xff\xff\xff\xf0", b"\x00\x00\x00\x02[]"],
    ids=["not-json", "huge-length", "not-an-object"],
)
def test_malformed_control_stream_ends_only_that_sandbox(payload: bytes) -> None:
    """The code can write anything on its channel to the host: the host must end that
    sandbox (a value or a SandboxError), stay up, and leave nothing behind."""
    try:
        ex = codecage.run(f"PAYLOAD = {payload!r}\n" + MALFORMED, policy(timeout_s=120))
    except codecage.SandboxError:
        pass
    else:
        assert ex.error is None or ex.error.name != "IndexError", (
            ex.error
        )  # the probe found its channel
        assert ex.killed_by != "timeout", ex  # the host ended it, not its time limit
    assert stdout_of(codecage.run("print(6 * 7)", policy())) == "42\n"


@pytest.mark.requires_feature("own_uid")  # zombies are found by the sandbox's host uid
def test_killed_sandbox_is_fully_reaped_when_run_returns() -> None:
    """After run() returns nothing of the sandbox may exist on the host, not even a zombie
    (the autouse leak check counts every process with a sandbox uid)."""
    leftovers: list[str] = []
    bodies = ["import time\ntime.sleep(10**6)", "os.kill(os.getpid(), 9)", "pass"]
    # a race is looked for: 15 runs on the default backend, 6 (each ending twice) where a
    # one-shot sandbox takes seconds to start
    for i in range(15 if current_backend() == DEFAULT else 6):
        code = "import os\nprint('uid', os.getuid(), flush=True)\n" + bodies[i % 3]
        ex = codecage.run(code, policy(timeout_s=0.3))
        leftovers = [f"run {i}: {p}" for p in processes_of_uid(uid_after("uid", ex))]
        if leftovers:
            break
    assert leftovers == []


# -- privilege-carrying files, mounts, devices, groups (the OCI levels included) -----------

SETID_FILES = (
    PRELUDE
    + r"""
import stat
mounts = []  # (target, per-mount flags), the longest target first
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    mounts.append((fields[4], set(fields[5].split(","))))
mounts.sort(key=lambda m: len(m[0]), reverse=True)
def mount_of(path):
    return next(m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/"))
honoured, seen = [], 0
for top in ROOTS:
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in ("/proc", "/sys")]
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                seen += 1
                if "nosuid" not in mount_of(path)[1]:
                    honoured.append(path)
report(seen=seen, honoured=sorted(honoured)[:20])
"""
)


def test_no_setuid_or_setgid_file_is_honoured() -> None:
    """A setuid/setgid file could give the code another identity: none may be where its
    mount honours the bit (the OCI images hold none at all; the namespace jail's host
    binds are nosuid). Positive control: the host's /usr has such files, honoured."""
    host = on_host("ROOTS = ['/usr']\n" + SETID_FILES)
    assert host["seen"] > 0 and any(p.endswith("/su") for p in host["honoured"]), host
    inside = in_jail("ROOTS = ['/']\n" + SETID_FILES, policy(timeout_s=120))
    assert inside["honoured"] == [], inside
    if current_backend() in ("gvisor", "container"):
        assert inside["seen"] == 0, inside  # the image's (codecage image build) has none


MOUNT_FLAGS = (
    PRELUDE
    + r"""
devices = set(ALLOWED)
weak = []
top = {}  # target -> its last mount: one mounted over another hides it
for line in open("/proc/self/mountinfo"):
    top[line.split()[4]] = line
for line in top.values():
    fields = line.split()
    source_root, target, flags = fields[3], fields[4], set(fields[5].split(","))
    device = target in ("/dev", "/dev/pts") or target in devices or "/dev" + source_root in devices
    if "nosuid" in flags and ("nodev" in flags or device):
        continue
    try:  # an engine's masks of /proc and /sys paths: read-only and empty
        if "ro" in flags and os.path.isdir(target) and not os.listdir(target):
            continue
    except OSError:
        pass
    weak.append(target + " " + fields[5])
report(weak=weak)
"""
)


@pytest.mark.requires_feature("nosuid_mounts")
def test_every_mount_is_nosuid_and_nodev() -> None:
    """nosuid everywhere; nodev wherever no allowed device node is (/dev, /dev/pts and the
    binds of the allowed devices need theirs). Positive control: the host's root is not."""
    probe = f"ALLOWED = {list(oci.ALLOWED_DEVICES)!r}\n" + MOUNT_FLAGS
    host = on_host(probe)
    assert any(m.startswith("/ ") for m in host["weak"]), host
    assert in_jail(probe)["weak"] == []


DEVICE_NODES = (
    PRELUDE
    + r"""
import stat
found = []
for dirpath, dirnames, filenames in os.walk("/dev"):
    for name in dirnames + filenames:
        path = os.path.join(dirpath, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            found.append(path)
opened = {}
for path in ("/dev/fuse", "/dev/net/tun", "/dev/tty"):
    try:
        fd = os.open(path, os.O_RDWR)
        opened[path] = "char" if stat.S_ISCHR(os.fstat(fd).st_mode) else "not a device"
        os.close(fd)
    except OSError as exc:
        opened[path] = errname(exc)
report(found=sorted(found), opened=opened)
"""
)


def test_no_device_beyond_the_allowed_set() -> None:
    """The devices of oci.ALLOWED_DEVICES, no other (runsc makes /dev/fuse and /dev/net/tun,
    engines /dev/tty: masked). Positive control: the host's /dev has them, usable."""
    host = on_host(DEVICE_NODES)
    assert {"/dev/fuse", "/dev/net/tun", "/dev/tty"} <= set(host["found"]), host
    assert host["opened"]["/dev/fuse"] == "char" and host["opened"]["/dev/net/tun"] == "char"
    inside = in_jail(DEVICE_NODES)
    assert set(inside["found"]) <= set(oci.ALLOWED_DEVICES), inside
    assert "char" not in inside["opened"].values(), inside


IDENTITY = (
    PRELUDE
    + r"""
status = {k: v.strip() for k, _, v in (l.partition(":") for l in open("/proc/self/status"))}
report(
    groups=os.getgroups(),
    status_groups=status.get("Groups"),  # gVisor's status has the line, some fields it lacks
    no_new_privs=libc.prctl(39, 0, 0, 0, 0),  # PR_GET_NO_NEW_PRIVS: readable on every level
    gid=os.getgid(),
)
"""
)


def test_no_supplementary_groups_and_no_new_privs() -> None:
    """The code's groups are its own gid only, none supplementary, and no_new_privs is set
    (read by prctl: gVisor's /proc/self/status has no NoNewPrivs line). Positive control:
    the same probe on the host reads this process's groups and a clear no_new_privs."""
    host = on_host(IDENTITY)
    assert host["groups"] == os.getgroups() and host["no_new_privs"] == 0, host
    assert host["status_groups"] == " ".join(map(str, os.getgroups())), host
    inside = in_jail(IDENTITY)
    assert inside["groups"] == [] and inside["status_groups"] == "", inside
    assert inside["no_new_privs"] == 1, inside


MEMORY_BOMB = 'print("eating", flush=True)\nx = []\nwhile True:\n    x.append(b"x" * (8 << 20))\n'


@pytest.mark.requires_feature("kernel_oom")
def test_memory_bomb_ends_the_kernel_and_the_next_run_works() -> None:
    """At memory_mb the kernel ends, not the sandbox, on every level (gVisor: the host's own
    OOM handling, guest_oom.GuestOom); twice in a row, each time a working next run. Positive
    control: the same sandbox holds the state it had before, and the bomb hits the limit."""
    with codecage.Sandbox(policy(memory_mb=192, timeout_s=60)) as sbx:
        assert stdout_of(sbx.run_code("kept = 41\nprint(kept + 1)")) == "42\n"
        assert stdout_of(sbx.run_code("print(kept)")) == "41\n"  # state survives runs
        for _ in range(2):
            ex = sbx.run_code(MEMORY_BOMB)
            assert stdout_of(ex) == "eating\n"
            assert ex.killed_by == "memory_limit", (ex.killed_by, ex.limits_hit, ex.error)
            assert "memory_limit" in ex.limits_hit and ex.state_lost
            after = sbx.run_code("print(sum(range(10)), 'kept' in dir())")
            assert stdout_of(after) == "45 False\n", (after.error, after.logs)
    assert host_can_fork()
