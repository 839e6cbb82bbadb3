"""PID 1 of a sandbox: starts the kernel, reaps orphans, restarts the kernel on request.

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
from typing import Any, NoReturn

from . import caps
from .messages import ExitEvent, InitEvent, KernelEvent, SetupErrorEvent


def message(fields: KernelEvent | ExitEvent | SetupErrorEvent | InitEvent) -> bytes:
    return json.dumps(fields).encode()


def run(spec: dict[str, Any], supervisor: socket.socket, ctx: dict[str, Any]) -> None:
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    generation = 0
    # init's own: the kernel must not inherit them (with the oom_score_adj descriptor, code
    # could give init the kernel's score, or its own a lower one than init's)
    ctx["init_fds"] = (wake_r, wake_w, ctx["oom_fd"])
    kernel = _start_kernel(spec, supervisor, ctx, generation)
    while True:
        ready, _, _ = select.select([supervisor.fileno(), wake_r], [], [])
        if wake_r in ready:
            drain(wake_r)
            kernel = _reap(supervisor, kernel, generation)
        if supervisor.fileno() in ready:
            data = supervisor.recv(4096)
            if not data:  # the host is gone: nothing may outlive it
                _kill_all_and_exit()
            request = json.loads(data)
            if request.get("op") == "signal":  # where the host cannot signal our processes
                _signal_others(int(request.get("signal", signal.SIGKILL)))
            if request.get("op") == "restart":
                _kill_others()
                _reap_all_children()  # no zombie of the old kernel outlives the restart
                kernel = -1
                generation += 1
                kernel = _start_kernel(spec, supervisor, ctx, generation)


def _start_kernel(
    spec: dict[str, Any], supervisor: socket.socket, ctx: dict[str, Any], generation: int
) -> int:
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
            signal.signal(signal.SIGINT, signal.default_int_handler)
            supervisor.close()
            if host_end is not None:
                host_end.close()
            from . import kernel

            kernel.main(kernel_end, spec, ctx)
        finally:
            os._exit(70)
    try:
        caps.write_oom_score_adj(ctx["oom_fd"], baseline)
    except OSError as exc:
        _fail(supervisor, f"init cannot take back its own OOM score: {exc}")
    kernel_end.close()
    if host_end is None:
        supervisor.send(message(KernelEvent(ev="kernel", generation=generation, token=token)))
        return pid
    announce = message(KernelEvent(ev="kernel", generation=generation))
    socket.send_fds(supervisor, [announce], [host_end.fileno()])
    host_end.close()
    return pid


def _fail(supervisor: socket.socket, why: str) -> NoReturn:
    """Report a set-up failure to the host (which ends the sandbox with it), then end."""
    with contextlib.suppress(OSError):
        supervisor.send(message(SetupErrorEvent(ev="error", message=why)))
    _kill_all_and_exit()


def _reap(supervisor: socket.socket, kernel: int, generation: int) -> int:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return kernel
        if pid == 0:
            return kernel
        if pid == kernel:
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            supervisor.send(
                message(ExitEvent(ev="exit", generation=generation, signal=sig, code=code))
            )
            kernel = -1


def _reap_all_children() -> None:
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def drain(fd: int) -> None:
    """Empty a non-blocking signal wake-up pipe."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _signal_others(sig: int) -> None:
    # From PID 1, kill(-1) reaches every other process of the namespace.
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, sig)


def _kill_others() -> None:
    # From PID 1, kill(-1) reaches every other process of the namespace.
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)


def _kill_all_and_exit() -> NoReturn:
    _kill_others()
    os._exit(0)
