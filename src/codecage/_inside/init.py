"""PID 1 of a sandbox: starts the kernel, reaps orphans, restarts the kernel on request,
starts the process manager when the host first needs it.

Talks to the host over the supervisor channel (SOCK_SEQPACKET, one JSON object per
message). Each kernel generation gets a fresh stream socket, passed to the host with
SCM_RIGHTS, so a kernel killed mid-frame never corrupts the next one's stream.
If the host goes away, init kills everything in the sandbox and exits.

Where descriptors cannot cross the boundary (gVisor's sentry cannot pass its own sockets
to the host; a container gets none from it), the spec names `kernel_socket`, a host
listener bind-mounted into the sandbox: init connects to it for each generation and
writes a fresh random token first, which it also sends on the supervisor channel, so the
host takes the connection that presents it and nothing else that code inside may have
queued on the listener (at a restart every other process is dead before init connects).
The host side stays one protocol: the "kernel" message either carries the socket or
names the token of the connection to accept.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, NoReturn

from . import caps
from .messages import ExitEvent, InitEvent, KernelEvent, ProcmanEvent, SetupErrorEvent


def message(fields: KernelEvent | ProcmanEvent | ExitEvent | SetupErrorEvent | InitEvent) -> bytes:
    return json.dumps(fields).encode()


def run(spec: dict[str, Any], supervisor: socket.socket, ctx: dict[str, Any]) -> None:
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    generation = 0
    # init's own: the kernel must not inherit them (with the oom_score_adj descriptor, code
    # could give init the kernel's score, or its own a lower one than init's)
    ctx["init_fds"] = (wake_r, wake_w, ctx["oom_fd"])
    procman = -1  # started when the host first asks for it: most sandboxes never do
    kernel = _start_kernel(spec, supervisor, ctx, generation)
    while True:
        ready, _, _ = select.select([supervisor.fileno(), wake_r], [], [])
        if wake_r in ready:
            drain(wake_r)
            kernel, procman = _reap(supervisor, kernel, generation, procman)
        if supervisor.fileno() in ready:
            data = supervisor.recv(4096)
            if not data:  # the host is gone: nothing may outlive it
                _kill_all_and_exit()
            request = json.loads(data)
            if request.get("op") == "signal":  # where the host cannot signal our processes
                _signal_others(int(request.get("signal", signal.SIGKILL)), procman)
            if request.get("op") == "start_procman":
                # the host has none (never asked yet, or code inside killed the last one)
                if procman > 0:  # one the host lost: it cannot be reached any more
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(procman, signal.SIGKILL)
                procman = _start_procman(spec, supervisor, ctx)
            if request.get("op") == "restart":
                # every process but the process manager's tree (the user's background
                # processes outlive a kernel restart, as the kernel's own never do)
                procman = _kill_kernel_tree(procman)
                kernel = -1
                generation += 1
                kernel = _start_kernel(spec, supervisor, ctx, generation)


def _start_kernel(
    spec: dict[str, Any], supervisor: socket.socket, ctx: dict[str, Any], generation: int
) -> int:
    def run(channel: socket.socket) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from . import kernel

        kernel.main(channel, spec, ctx)

    return _spawn(spec, supervisor, ctx, KernelEvent(ev="kernel", generation=generation), run)


def _start_procman(spec: dict[str, Any], supervisor: socket.socket, ctx: dict[str, Any]) -> int:
    """The process manager (procman.py): background processes and ptys, outside the kernel.
    Its channel goes to the host as a kernel's does, announced by a "procman" message."""

    def run(channel: socket.socket) -> None:
        from . import procman

        procman.main(channel, spec)

    return _spawn(spec, supervisor, ctx, ProcmanEvent(ev="procman"), run)


def _spawn(
    spec: dict[str, Any],
    supervisor: socket.socket,
    ctx: dict[str, Any],
    announce: KernelEvent | ProcmanEvent,
    run: Callable[[socket.socket], None],
) -> int:
    """Fork a child with a fresh stream socket to the host, announced on the supervisor
    channel with the host's end (or, on the OCI backends, the token it presents)."""
    token = None
    if spec.get("kernel_socket"):
        token = os.urandom(16).hex()
        kernel_end = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        kernel_end.connect(spec["kernel_socket"])
        kernel_end.sendall(token.encode())
        host_end = None
    else:
        host_end, kernel_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        baseline = caps.read_oom_score_adj(ctx["oom_fd"])
        # oom_score_adj is inherited at fork, and the kernel cannot write its own (Landlock
        # refuses writes under /proc): init takes the kernel's score for the fork, then
        # goes back to its own. Raising never needs privilege, and going back down to a
        # value init already had is always allowed (oom_score_adj_min is at most that).
        caps.write_oom_score_adj(ctx["oom_fd"], caps.KERNEL_OOM_SCORE_ADJ)
    except OSError as exc:
        _fail(supervisor, f"cannot give the kernel its OOM score: {exc}")
    pid = os.fork()
    if pid == 0:
        try:
            signal.set_wakeup_fd(-1)
            for fd in ctx.get("init_fds", ()):
                os.close(fd)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            supervisor.close()
            if host_end is not None:
                host_end.close()
            run(kernel_end)
        finally:
            os._exit(70)
    try:
        caps.write_oom_score_adj(ctx["oom_fd"], baseline)
    except OSError as exc:
        _fail(supervisor, f"init cannot take back its own OOM score: {exc}")
    kernel_end.close()
    if host_end is None:
        announce["token"] = token
        supervisor.send(message(announce))
        return pid
    socket.send_fds(supervisor, [message(announce)], [host_end.fileno()])
    host_end.close()
    return pid


def _fail(supervisor: socket.socket, why: str) -> NoReturn:
    """Report a set-up failure to the host (which ends the sandbox with it), then end."""
    with contextlib.suppress(OSError):
        supervisor.send(message(SetupErrorEvent(ev="error", message=why)))
    _kill_all_and_exit()


def _reap(supervisor: socket.socket, kernel: int, generation: int, procman: int) -> tuple[int, int]:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return kernel, procman
        if pid == 0:
            return kernel, procman
        if pid == procman:
            procman = -1  # the host's next request for one starts a new one
        if pid == kernel:
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            supervisor.send(
                message(ExitEvent(ev="exit", generation=generation, signal=sig, code=code))
            )
            kernel = -1


def drain(fd: int) -> None:
    """Empty a non-blocking signal wake-up pipe."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _signal_others(sig: int, procman: int = -1) -> None:
    """Signal every process but init and the process manager's tree."""
    if procman <= 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, sig)  # from PID 1, kill(-1) reaches every other process
        return
    for pid in _outside_tree(procman):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _kill_kernel_tree(procman: int, timeout_s: float = 10.0) -> int:
    """SIGKILL every process but init and the process manager's tree, and reap them (no
    zombie of the old kernel outlives a restart). Listed again until none is left: one
    forked meanwhile is a child of one listed, and killed in the next round. Returns the
    process manager's pid, or -1 if it died meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        procman = _reap_others(procman)
        victims = _outside_tree(procman) if procman > 0 else _others()
        if not victims or time.monotonic() > deadline:
            return procman
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.001)


def _reap_others(procman: int) -> int:
    """Reap every dead child; -1 if the process manager was one of them."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return procman
        if pid == 0:
            return procman
        if pid == procman:
            procman = -1


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process of the namespace but init (its /proc)."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or name == "1":
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            out[int(name)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return out


def _others() -> list[int]:
    return list(_parents())


def _outside_tree(root: int) -> list[int]:
    """Every process but init that is not `root` or one of its descendants (zombies too:
    a killed process stays listed until reaped)."""
    parents = _parents()
    inside: dict[int, bool] = {root: True}

    def within(pid: int) -> bool:
        seen = []
        while pid not in inside:
            seen.append(pid)
            parent = parents.get(pid)
            if parent is None or parent <= 1 or len(seen) > 4096:
                for p in seen:
                    inside[p] = False
                return False
            pid = parent
        verdict = inside[pid]
        for p in seen:
            inside[p] = verdict
        return verdict

    return [pid for pid in parents if not within(pid)]


def _kill_others() -> None:
    # From PID 1, kill(-1) reaches every other process of the namespace.
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)


def _kill_all_and_exit() -> NoReturn:
    _kill_others()
    os._exit(0)
