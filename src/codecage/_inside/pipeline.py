"""The namespace jail as one ordered pipeline, like nsjail's contain.cc.

    template --fork--> setup --(cgroups, namespaces, root)--fork--> init (PID 1)
        init: /proc, pivot_root, rlimits, identity, Landlock, seccomp --fork--> kernel

`setup` runs on the host side of the new PID namespace and exits once init exists; init
re-forks the kernel when the host asks for a restart, so the workspace outlives it.

The spec (the sandbox's environment, uid, cgroups, limits) reaches `setup` from the host
over the sandbox's own supervisor channel, after the fork: never through the template,
whose memory every later sandbox inherits. `setup` answers with a pidfd on init.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import traceback
from typing import Any

from . import caps, init, landlock, libc, mounts, namespaces, seccomp
from .messages import InitEvent, SetupErrorEvent

MAX_SPEC = 1 << 20


def setup(supervisor: socket.socket, ctx: dict[str, Any]) -> None:
    """Runs in the forked child of the template; never returns."""
    try:
        data = supervisor.recv(MAX_SPEC)
        if not data:  # the host gave up on this sandbox before sending its spec
            os._exit(0)
        spec: dict[str, Any] = json.loads(data)
        namespaces.join_cgroups(spec["cgroup_procs"])
        namespaces.enter_namespaces(spec["userns"])
        mounts.build_root(spec["root_mountpoint"], spec)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
    except BaseException:
        supervisor.send(
            init.message(SetupErrorEvent(ev="error", message=traceback.format_exc()[-4000:]))
        )
        os._exit(1)
    if pid:
        try:
            # A pidfd, taken by init's parent before init may exit: the host's handle on it
            # can never name a reused pid. Sent before init says anything (it waits on go).
            pidfd = os.pidfd_open(pid)
            socket.send_fds(supervisor, [init.message(InitEvent(ev="init", pid=pid))], [pidfd])
            os.write(go_w, b"g")
        finally:
            os._exit(0)
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


def confine(spec: dict[str, Any], ctx: dict[str, Any]) -> None:
    """PID 1 of the new namespace: everything from the new root to seccomp, in order."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)  # as PID 1, default means: ignored
    libc.prctl(libc.PR_SET_PDEATHSIG, 0)
    mounts.enter_root(spec["root_mountpoint"])
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):  # never a host file, never the operator's terminal
        os.dup2(null, fd)
    os.close(null)
    caps.set_rlimits(spec["rlimits"])
    caps.set_oom_score_adj(0)  # init's own; each kernel it forks gets 1000 (init.run)
    close_descriptors(keep={ctx["supervisor_fd"], *ctx["template_fds"]})
    ctx["oom_fd"] = caps.open_oom_score_adj()  # before drop_privileges and Landlock
    caps.drop_privileges(spec["uid"], spec["gid"], userns=spec["userns"] is not None)
    if spec["landlock"]:
        landlock.restrict()
    seccomp.load(ctx["seccomp_program"])


def close_descriptors(keep: set[int]) -> None:
    """Close every inherited descriptor but those on the allowlist (never a blind close)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):  # the directory's own descriptor, already gone
                os.close(fd)
