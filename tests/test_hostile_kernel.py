"""A sandbox that attacks the host through its own control channel (the code shares the
kernel's process, so it can write anything there) must not hurt the host: bounded memory,
no hang, no early end of a run, a clean error. From an independent review of the jail."""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
import sys
import threading
import time

import pytest

import codecage
from codecage import Policy, Sandbox, SandboxNotFound, TransportError

pytestmark = pytest.mark.requires_root

FIND_CHANNEL = "import gc\nch = [o for o in gc.get_objects() if type(o).__name__ == 'Channel'][0]\n"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_forged_end_frame_does_not_end_the_run() -> None:
    with Sandbox(Policy(timeout_s=2, interrupt_grace_s=0.5)) as sbx:
        started = time.monotonic()
        ex = sbx.run_code(
            FIND_CHANNEL + "ch.send(ev='end', execution_count=1, exit_code=0, truncated=False)\n"
            "import time\ntime.sleep(10**6)"
        )
        assert time.monotonic() - started >= 2 and ex.killed_by == "timeout"
        assert sbx.run_code("1 + 1").text == "2"


def test_a_results_flood_is_bounded_on_the_host() -> None:
    before = rss_mb()
    with Sandbox(Policy(results_bytes=4 << 20)) as sbx:
        ex = sbx.run_code(
            "from IPython.display import display\nblob = 'A' * (8 << 20)\n"
            "for i in range(60):\n    display({'text/plain': blob}, raw=True)\n"
            "for i in range(3):\n    display({'text/plain': 'small'}, raw=True)"
        )
        assert ex.truncated and "output_limit" in ex.limits_hit
        assert [r.text for r in ex.results] == ["small"] * 3  # what fits is kept
    assert rss_mb() - before < 200


def test_a_channel_flood_past_every_budget_ends_the_sandbox() -> None:
    sbx = Sandbox(Policy(output_bytes=1000, results_bytes=1000, timeout_s=60))
    try:
        code = (
            FIND_CHANNEL + "import inspect\n"
            "rid = [f.frame.f_locals['run_id'] for f in inspect.stack() if 'run_id' in f.frame.f_locals][0]\n"
            "while True:\n    ch.send(ev='stdout', id=rid, text='x' * 60000)\n"
        )
        with pytest.raises(SandboxNotFound, match="far beyond its budget"):
            sbx.run_code(code)
        assert not sbx.alive
    finally:
        sbx.kill()


def test_callbacks_get_no_more_than_the_budget() -> None:
    seen: list[str] = []
    with Sandbox(Policy(output_bytes=1000)) as sbx:
        ex = sbx.run_code("print('y' * 1_000_000)", on_stdout=lambda m: seen.append(m.line))
    assert sum(len(s) for s in seen) <= 1000 and ex.truncated


def test_a_lying_file_read_is_bounded() -> None:
    before = rss_mb()
    with Sandbox(Policy(disk_mb=16, tmp_mb=16, shm_mb=16)) as sbx:
        sbx.run_code(
            "import codecage._inside.files as F, base64\nblob = base64.b64encode(b'B' * (4 << 20)).decode()\n"
            "F.OPS['read'] = lambda path, offset=0, length=0: {'data': blob, 'size': 1 << 40, 'eof': False}"
        )
        started = time.monotonic()
        with pytest.raises(TransportError):
            sbx.files.read("x")
        assert time.monotonic() - started < 20
    assert rss_mb() - before < 200


def test_kill_does_not_wait_for_a_blocked_request() -> None:
    sbx = Sandbox(Policy(timeout_s=60))
    sbx.run_code("import threading, time\nthreading.Thread(target=lambda: None).start()")
    stuck = threading.Thread(
        target=lambda: _swallow(
            sbx.run_code,
            "import signal, time\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\ntime.sleep(10**6)",
        ),
        daemon=True,
    )
    stuck.start()
    time.sleep(0.5)
    started = time.monotonic()
    sbx.kill()
    assert time.monotonic() - started < 60 and not sbx.alive  # not the 10**6 s sleep
    stuck.join(10)
    assert not stuck.is_alive()


@pytest.mark.parametrize("payload", ["[" * 200_000, "not json"])
def test_malformed_frames_end_only_that_sandbox(payload: str) -> None:
    sbx = Sandbox()
    other = Sandbox()
    try:
        code = FIND_CHANNEL + (
            f"import struct\nbody = {payload!r}.encode()\n"
            "ch.sock.sendall(struct.pack('>I', len(body)) + body)\nimport time; time.sleep(5)"
        )
        with pytest.raises(TransportError):
            sbx.run_code(code)
        with pytest.raises(SandboxNotFound):
            sbx.run_code("1")
        assert other.run_code("1 + 1").text == "2"
    finally:
        sbx.kill()
        other.kill()


def test_a_kernel_that_cannot_start_again_costs_no_host_cpu() -> None:
    with Sandbox() as sbx:
        cpu = time.process_time()
        ex = sbx.run_code("import os\nos.chmod('/home/user', 0)\nos._exit(3)")
        assert ex.exit_code == 3 and ex.state_lost
        assert sbx.run_code("1 + 1").text == "2"  # the new kernel starts in / instead
        assert time.process_time() - cpu < 5


def test_bad_envs_are_refused_up_front() -> None:
    for envs in ({"A": "x\0y"}, {"A=B": "x"}, {"": "x"}):
        with pytest.raises(codecage.PolicyError):
            Sandbox(envs=envs)
        with pytest.raises(codecage.PolicyError):
            codecage.run("1", envs=envs)


PROBE = r"""
import ctypes, errno, json, socket
libc = ctypes.CDLL(None, use_errno=True)
out = {}
for nr in (457, 458, 467):  # statmount, listmount, open_tree_attr: newer than libseccomp 2.5
    r = libc.syscall(nr, 0, 0, 0, 0, 0)
    out[str(nr)] = errno.errorcode.get(ctypes.get_errno()) if r < 0 else "ran"
for name, args in (("vsock", (40, 1, 0)), ("uevent", (16, 3, 15)), ("netlink_route", (16, 3, 0))):
    try:
        socket.socket(*args).close(); out[name] = "ok"
    except OSError as exc:
        out[name] = errno.errorcode[exc.errno]
print(json.dumps(out))
"""


def test_sockets_and_system_calls_the_deny_list_adds() -> None:
    host = json.loads(
        subprocess.run(
            [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
        ).stdout
    )
    # Positive control: on the host the calls exist (EFAULT/EINVAL on bad arguments, not
    # ENOSYS) and the sockets open.
    assert all(host[nr] != "ENOSYS" for nr in ("457", "458", "467")), host
    assert host["vsock"] == host["uevent"] == host["netlink_route"] == "ok", host
    ex = codecage.run(PROBE)
    inside = json.loads(ex.logs.stdout[-1])
    assert inside["457"] == inside["458"] == inside["467"] == "ENOSYS"
    assert inside["vsock"] == inside["uevent"] == errno.errorcode[errno.EPERM]
    assert inside["netlink_route"] == "ok"  # ordinary netlink (e.g. for `ip addr`) still works


def _swallow(fn: object, *args: object) -> None:
    with contextlib.suppress(codecage.SandboxError):
        fn(*args)  # type: ignore[operator]
