"""PID 1 of an exec-based sandbox (bwrap; a container): the end of the pipeline.

Whatever started it (bubblewrap, a container runtime) already built the namespaces, the
root filesystem and the identity, and may have loaded the seccomp filter. This finishes
what pipeline.confine does in the namespace jail, with the same step functions, in the same
order, then runs the same init (init.run), so kernels, restarts and the protocol are
identical across backends:

    spec from the host -> stdio, rlimits -> close descriptors -> privileges -> preload
        -> Landlock -> seccomp (unless already loaded) -> init.run

Usage: python -I -c "...; from codecage._inside.entry import main; main()" SUPERVISOR_FD
The spec arrives as the first message on the supervisor channel (never in argv, which
other processes can read), so `envs` given at creation stay private.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import traceback
from typing import Any

from . import caps, init, landlock, libc, pipeline, seccomp, zygote
from .messages import SetupErrorEvent


def confine(spec: dict[str, Any], supervisor_fd: int) -> dict[str, Any]:
    """Returns init's context (its oom_score_adj descriptor)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)  # as PID 1, default means: ignored
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):  # never a host file, never the operator's terminal
        os.dup2(null, fd)
    os.close(null)
    caps.set_rlimits(spec["rlimits"])
    pipeline.close_descriptors(keep={supervisor_fd})
    ctx = {"oom_fd": caps.open_oom_score_adj()}  # before drop_privileges and Landlock
    if os.getuid() == 0:  # a runtime that starts us as root: drop to the sandbox's uid
        caps.drop_privileges(spec["uid"], spec["gid"])
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    libc.prctl(libc.PR_SET_DUMPABLE, 0)
    zygote.preload(spec.get("preload", []))
    if zygote.thread_count() != 1:
        raise RuntimeError("preload started threads; init must be single-threaded to fork")
    if spec["landlock"]:
        landlock.restrict()
    if spec.get("seccomp") == "load":
        seccomp.load(seccomp.build())
    return ctx


def main() -> None:
    supervisor_fd = int(sys.argv[1])
    supervisor = socket.socket(fileno=supervisor_fd)
    try:
        spec: dict[str, Any] = json.loads(supervisor.recv(1 << 20))
        ctx = confine(spec, supervisor_fd)
    except BaseException:
        supervisor.send(
            init.message(SetupErrorEvent(ev="error", message=traceback.format_exc()[-4000:]))
        )
        os._exit(1)
    init.run(spec, supervisor, ctx)


if __name__ == "__main__":
    main()
