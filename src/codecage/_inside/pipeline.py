"""The namespace jail's path through the confinement steps (steps.py), like nsjail's:

    template --fork--> setup --(steps' "setup" phase: cgroups, namespaces, root)--fork-->
        init (PID 1): the "init" phase (/proc, pivot_root, rlimits, identity, Landlock,
        seccomp, ...) --fork--> kernel

`setup` runs on the host side of the new PID namespace and exits once init exists; init
re-forks the kernel when the host asks for a restart, so the workspace outlives it.
Where the template may make PID namespaces (as root), it forks the set-up process straight
into a new one (`ctx["pid_namespace"]`): set-up is then init itself, one fork of the
template's image less per sandbox; the steps are the same, in the same order.

The spec (the sandbox's environment, uid, cgroups, limits, `done`) reaches `setup` from the
host over the sandbox's own supervisor channel, after the fork: never through the template,
whose memory every later sandbox inherits. `setup` answers with a pidfd on init.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
from typing import Any

from . import init, libc, steps
from .messages import InitEvent, SetupErrorEvent

MAX_SPEC = 1 << 20
MAX_VOLUMES = 8


def setup(supervisor: socket.socket, ctx: dict[str, Any]) -> None:
    """Runs in the forked child of the template; never returns."""
    try:
        # the spec, and the host's detached mount of each of its volumes (docs/volumes.md)
        data, fds, _flags, _addr = socket.recv_fds(supervisor, MAX_SPEC, MAX_VOLUMES)
        if not data:  # the host gave up on this sandbox before sending its spec
            os._exit(0)
        spec: dict[str, Any] = json.loads(data)
        ctx["volume_fds"] = fds
        steps.run(spec, ctx, [steps.SETUP])
        if ctx.get("pid_namespace"):  # the template made this process PID 1 already
            _announce(supervisor, os.getpid())
            pid = -1
        else:
            go_r, go_w = os.pipe2(os.O_CLOEXEC)
            pid = os.fork()
    except BaseException:
        supervisor.send(
            init.message(SetupErrorEvent(ev="error", message=traceback.format_exc()[-4000:]))
        )
        os._exit(1)
    if pid > 0:
        try:
            _announce(supervisor, pid)  # before init says anything: it waits on go
            os.write(go_w, b"g")
        finally:
            os._exit(0)
    if pid == 0:
        os.close(go_w)
        if os.read(go_r, 1) != b"g":  # set-up could not tell the host: nobody would own us
            os._exit(1)
        os.close(go_r)
    try:
        confine(spec, ctx)
    except BaseException:
        supervisor.send(
            init.message(SetupErrorEvent(ev="error", message=traceback.format_exc()[-4000:]))
        )
        os._exit(1)
    init.run(spec, supervisor, ctx)


def _announce(supervisor: socket.socket, pid: int) -> None:
    """Hand the host a pidfd on init, taken while init cannot have exited (by its parent, or
    by init itself): the host's handle on it can never name a reused pid, and the host asks
    the kernel whom it names."""
    pidfd = os.pidfd_open(pid)
    try:
        socket.send_fds(supervisor, [init.message(InitEvent(ev="init", pid=pid))], [pidfd])
    finally:
        os.close(pidfd)


def confine(spec: dict[str, Any], ctx: dict[str, Any]) -> None:
    """PID 1 of the new namespace: the steps' "init" phase, from the new root to seccomp."""
    libc.prctl(libc.PR_SET_PDEATHSIG, 0)
    steps.run(spec, ctx, [steps.INIT])
