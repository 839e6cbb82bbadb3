"""PID 1 of an exec-based sandbox (bwrap; a container): the end of the pipeline.

Whatever started it (bubblewrap, a container runtime) already did some of the confinement
steps (steps.py): the spec's `done` names them (bwrap: the cgroups, namespaces, root,
identity and seccomp). This runs the rest of the one list, with the same step functions in
the same order as the namespace jail's init, then the same init (init.run), so kernels,
restarts and the protocol are identical across backends:

    spec from the host -> steps.run (skipping `done`): signals, stdio, rlimits, close
        descriptors, oom fd, [identity], no_new_privs, preload, Landlock, [seccomp]
        -> init.run

Usage: python -I -c "...; from codecage._inside.entry import main; main()" SUPERVISOR_FD
The spec arrives as the first message on the supervisor channel (never in argv, which
other processes can read), so `envs` given at creation stay private.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from typing import Any

from . import init, steps
from .messages import SetupErrorEvent


def confine(spec: dict[str, Any], supervisor_fd: int) -> dict[str, Any]:
    """Every step of the one list its runtime did not do; returns init's context (its
    oom_score_adj descriptor)."""
    ctx: dict[str, Any] = {"supervisor_fd": supervisor_fd}
    steps.run(spec, ctx, [steps.SETUP, steps.INIT])
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
