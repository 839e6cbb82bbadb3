"""The template (zygote): imports the preload list once, then forks sandboxes on request.

Started by the host with execve and an environment built from an allowlist, never
forked from the service: its memory holds no secret of the host. It never runs user
code and never sees tenant data; it is single-threaded when it forks.

Whatever the template receives stays in the memory of every later fork, so it receives
nothing of any sandbox: a spawn request carries no spec. The forked child gets its spec
(environment, uid, cgroups, limits) from the host over its own supervisor channel, after
the fork (pipeline.setup). Requests are read into one buffer that is zeroed after each.

Requests arrive on a SOCK_SEQPACKET socket, one JSON object each:
    {"op": "spawn"} -> {"ok": true, "setup_pid": N} + [supervisor]
    {"op": "ping"}  -> {"ok": true, "threads": N, "pid": N}
    {"op": "reap"}  -> {"ok": true}
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

from . import caps, init, landlock, libc, pipeline, seccomp

MAX_REQUEST = 4096  # requests name an operation, nothing more
FIELDS = {"op", "rid"}  # a request with anything else is refused, never kept


def preload(modules: list[str]) -> None:
    for name in modules:
        importlib.import_module(name)
        if name == "matplotlib":
            importlib.import_module("matplotlib").use("Agg")
        if threading.active_count() != 1 or thread_count() != 1:
            raise RuntimeError(f"preload {name!r} started threads: a template forks, so never")
    _warm()
    gc.collect()
    gc.freeze()  # keep copy-on-write pages shared: the collector never touches them again
    huge_pages()


HUGE = 2 << 20  # a transparent huge page (x86_64)
HUGE_FILLED = 0.5  # a 2 MiB span at least this full is made one huge page


def huge_pages() -> int:
    """Back the template's anonymous memory with huge pages where it is dense (its heap,
    the preloaded modules' objects): a fork then copies one page-table entry per 2 MiB
    instead of 512, and an exit drops as few, so every sandbox starts and ends for less
    CPU. A sandbox's first write to a shared huge page splits it and copies only the 4 KiB
    page written. Sparse spans are left alone (collapsing would fill them: memory for
    nothing). Returns the bytes collapsed; where the kernel has no MADV_COLLAPSE (Linux
    before 6.1) or no transparent huge pages, nothing changes."""
    done = 0
    with open("/proc/self/maps") as f:
        maps = f.read().splitlines()
    for line in maps:
        fields = line.split()
        name = fields[5] if len(fields) > 5 else ""
        if fields[1] != "rw-p" or name not in ("", "[heap]"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        for lo in range((start + HUGE - 1) & ~(HUGE - 1), end & ~(HUGE - 1), HUGE):
            if libc.resident(lo, HUGE) < HUGE_FILLED:
                continue
            try:
                libc.madvise(lo, HUGE, libc.MADV_HUGEPAGE)
                libc.madvise(lo, HUGE, libc.MADV_COLLAPSE)
            except OSError:
                continue  # a span the kernel will not collapse (MADV_NOHUGEPAGE, locked)
            done += HUGE
    return done


def _warm() -> None:
    """Do once here what the first run in every sandbox would otherwise pay for."""
    from . import kernel

    if "IPython" in sys.modules:
        from . import shell

        shell.warm(shell.make_shell())

    executor = kernel.Executor()
    executor.run("x = 1\nx + 1", "session")
    try:
        raise ValueError("warm")
    except ValueError as exc:
        kernel._error(exc)


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def serve(sock: socket.socket, ctx: dict[str, Any]) -> None:
    libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    own = {sock.fileno(), wake_r, wake_w}
    ctx["template_fds"] = sorted(set(map(int, os.listdir("/proc/self/fd"))) - own - {0, 1, 2})
    buffer = bytearray(MAX_REQUEST)  # the only place a request's bytes ever are
    while True:
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in ready:
            _reap(wake_r)
        if sock.fileno() in ready:
            size = sock.recv_into(buffer)
            if not size:  # the host is gone: its sandboxes' inits see it too and exit
                _reap_all(deadline_s=10.0)
                return
            try:
                request = _parse(memoryview(buffer)[:size])
            finally:
                buffer[:size] = bytes(size)  # wiped before anything is forked
            _handle(sock, request, ctx)


def _parse(data: memoryview) -> dict[str, Any]:
    """A request: an operation and a request id, nothing else (no sandbox's data)."""
    try:
        request = json.loads(data.tobytes())
    except ValueError:
        return {"op": None}
    if not isinstance(request, dict) or set(request) - FIELDS:
        rid = request.get("rid") if isinstance(request, dict) else None
        return {"op": "refuse", "rid": rid if isinstance(rid, int) else None}
    return request


def _reap(wake_r: int) -> None:
    init.drain(wake_r)
    _reap_dead()


def _reap_dead() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _reap_all(deadline_s: float) -> None:
    """Wait for every child before exiting, so none is left a zombie of the host's PID 1."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)


def _handle(sock: socket.socket, request: dict[str, Any], ctx: dict[str, Any]) -> None:
    op, rid = request.get("op"), request.get("rid")
    if op == "reap":
        # Reap every dead child without blocking: never wait on a pid that may be reused.
        _reap_dead()
        sock.send(json.dumps({"ok": True, "rid": rid}).encode())
    elif op == "ping":
        reply = {"ok": True, "threads": thread_count(), "pid": os.getpid(), "rid": rid}
        sock.send(json.dumps(reply).encode())
    elif op == "refuse":
        error = "a request to the template carries only op and rid: no sandbox's data"
        sock.send(json.dumps({"ok": False, "error": error, "rid": rid}).encode())
    elif op == "spawn":
        try:
            fds, reply = _spawn(ctx)
        except Exception as exc:
            sock.send(json.dumps({"ok": False, "error": str(exc), "rid": rid}).encode())
            return
        try:
            socket.send_fds(sock, [json.dumps({**reply, "rid": rid}).encode()], fds)
        finally:
            for fd in fds:
                os.close(fd)
    else:
        sock.send(json.dumps({"ok": False, "error": f"unknown op {op!r}", "rid": rid}).encode())


def _spawn(ctx: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
    """Fork the set-up process of a new sandbox, which reads its own spec from the host."""
    if thread_count() != 1:
        raise RuntimeError("the template has more than one thread; refusing to fork")
    host_end, sandbox_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # As root, straight into a new PID namespace: set-up is then init (pipeline.py)
    pid = libc.fork_new_pid_namespace() if ctx["pid_namespace"] else os.fork()
    if pid == 0:
        try:
            host_end.close()
            ctx["supervisor_fd"] = sandbox_end.fileno()
            pipeline.setup(sandbox_end, ctx)
        finally:
            os._exit(1)
    sandbox_end.close()
    fd = os.dup(host_end.fileno())
    host_end.close()
    return [fd], {"ok": True, "setup_pid": pid}


def _vm_data() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    config = json.loads(sys.argv[2])
    # The template is among the last the OOM killer picks, where the host lets it lower its
    # score (CAP_SYS_RESOURCE); either way the host learns which it got (`codecage doctor`).
    oom_protected = caps.set_oom_score_adj(-900)
    if not oom_protected:
        print("template: oom_score_adj not lowered (no CAP_SYS_RESOURCE)", file=sys.stderr)
    try:
        preload(config["preload"])
        ctx: dict[str, Any] = {
            "seccomp_program": seccomp.build(),
            "landlock_abi": landlock.abi_version(),
            # rootless, the PID namespace is made with the user namespace, by set-up
            "pid_namespace": os.geteuid() == 0,
        }
    except BaseException:
        sock.send(json.dumps({"ok": False, "error": traceback.format_exc()}).encode())
        raise
    if threading.active_count() != 1 or thread_count() != 1:
        sock.send(json.dumps({"ok": False, "error": "preload started threads"}).encode())
        return
    ready = {
        "ok": True,
        "pid": os.getpid(),
        "landlock_abi": ctx["landlock_abi"],
        "data_bytes": _vm_data(),
        "oom_protected": oom_protected,
    }
    sock.send(json.dumps(ready).encode())
    serve(sock, ctx)


if __name__ == "__main__":
    main()
