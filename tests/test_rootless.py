"""The jail started by a user who is not root: a user namespace instead of root, a process
tree instead of cgroups (weaker, so only with allow_weaker). Each probe's positive control
runs as the same unprivileged user on the host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import codecage

from .conftest import descends_from, held_by

pytestmark = pytest.mark.requires_root  # root is needed to become `nobody` for the test
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3.11"
SRC = str(Path(codecage.__file__).resolve().parent.parent)
SITE = next(p for p in sys.path if p.endswith("site-packages") and "pydantic" in os.listdir(p))

PROBE = r"""
import json, os, socket
out = {"uid": os.getuid(), "pids": len([p for p in os.listdir("/proc") if p.isdigit()])}
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
out["cap"] = status["CapEff"].strip(); out["seccomp"] = status["Seccomp"].strip()
out["nnp"] = status["NoNewPrivs"].strip()
try:
    socket.create_connection(("127.0.0.1", PORT), timeout=2).close(); out["loopback"] = "connected"
except OSError as exc:
    out["loopback"] = type(exc).__name__
try:
    open("/usr/codecage-rootless-probe", "w"); out["write_usr"] = "ok"
except OSError as exc:
    out["write_usr"] = type(exc).__name__
out["ifaces"] = [n for _, n in socket.if_nameindex()]
print(json.dumps(out))
"""

DRIVER = r"""
import json, sys, time
sys.path[:0] = [SRC, SITE]
import codecage
from codecage import Policy, Sandbox
report = {}
try:
    codecage.run("1")
except codecage.PolicyError as exc:
    report["refused"] = str(exc)
weak = Policy(allow_weaker=True, timeout_s=2, memory_mb=256)
ex = codecage.run(PROBE, weak)
report["probe"] = json.loads(ex.logs.stdout[-1]) if ex.logs.stdout else repr(ex)
tree = ("import os, signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        while True: pass\nwhile True: pass\n")
ex = codecage.run(tree, weak)
report["tree"] = ex.killed_by
ex = codecage.run("x = bytearray(1 << 30)", weak)
report["memory"] = ex.error.name if ex.error else None
with Sandbox(Policy(allow_weaker=True, interrupt_grace_s=2)) as sbx:
    sbx.run_code("kept = 7")
    ex = sbx.run_code("import time; time.sleep(60)", timeout=1)
    report["interrupt"] = [ex.killed_by, ex.error.name if ex.error else None, ex.state_lost]
    report["kept"] = sbx.run_code("kept").text
print(json.dumps(report))
"""


def as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", code],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        env={
            "PATH": "/usr/bin:/bin",
            "CODECAGE_RUNTIME": os.environ.get("CODECAGE_RUNTIME", "/var/lib/codecage/runtime"),
        },
        cwd="/",
        timeout=120,
    )


def runs_runsc(entry: Path) -> bool:
    """Whether the process runs gVisor's runsc (its sentry and gofer re-execute themselves as
    `exe` under uid nobody, and outlive the runsc that started them): this test never does."""
    try:
        return os.path.basename(os.readlink(entry / "exe")).startswith("runsc")
    except OSError:  # a sentry on its way out (a zombie has no exe): by its name, then
        try:
            return (entry / "comm").read_text().strip() == "exe"
        except OSError:
            return False


def nobody_processes() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if f"Uid:\t{NOBODY}\t" not in status:
                continue
            if not descends_from(int(entry.name), os.getpid()) and held_by(int(entry.name)):
                continue  # another session's, held by a live process that is not ours
            if runs_runsc(entry):
                continue  # another worker's gVisor sandbox: runsc runs its sentry as nobody
            found.append(f"{entry.name} {status.splitlines()[0]}")
    return found


@pytest.fixture
def server() -> Iterator[int]:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                sock.accept()[0].close()
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join()
        sock.close()


def test_rootless_jail(server: int) -> None:
    if not os.path.exists(SYSTEM_PYTHON) or as_nobody(f"import os; os.listdir({SRC!r})").returncode:
        pytest.skip("the checkout or the system Python is not usable by an unprivileged user")
    assert nobody_processes() == []
    probe = PROBE.replace("PORT", str(server))
    control = as_nobody(probe)  # the same probe, as the same user, on the host
    host = json.loads(control.stdout)
    assert host["loopback"] == "connected" and host["pids"] > 10 and len(host["ifaces"]) >= 1
    assert host["uid"] == NOBODY and host["seccomp"] == "0"

    driver = (
        DRIVER.replace("SRC", repr(SRC)).replace("SITE", repr(SITE)).replace("PROBE", repr(probe))
    )
    proc = as_nobody(driver)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert "not running as root" in report["refused"] and "allow_weaker" in report["refused"]
    inside = report["probe"]
    assert inside["uid"] == 1000 and inside["pids"] <= 3 and inside["ifaces"] == ["lo"]
    assert inside["cap"] == "0" * 16 and inside["seccomp"] == "2" and inside["nnp"] == "1"
    assert inside["loopback"] == "ConnectionRefusedError" and inside["write_usr"] == "OSError"
    assert report["tree"] == "timeout"
    assert report["memory"] == "MemoryError"  # RLIMIT_DATA, not a cgroup: no kill, an exception
    assert report["interrupt"] == ["timeout", "KeyboardInterrupt", False] and report["kept"] == "7"
    deadline = time.monotonic() + 30  # killed processes take a moment to go on a loaded host
    while nobody_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nobody_processes() == []  # the double-forked spinner and every sandbox are gone
