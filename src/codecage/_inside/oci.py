"""PID 1 of an OCI-based sandbox (`gvisor`, `container`): the process the runtime starts.

The runtime (runsc, or a container engine) has already made the namespaces, the read-only
root, the tmpfs mounts, the cgroups, the uid and the capability set from the bundle's
config. What is left is ours: connect to the host's supervisor listener (bind-mounted into
the sandbox; no descriptor crosses a gVisor or container boundary), close what we do not
need, load the same seccomp filter as the namespace jail, and become the same init.

    python -I -c "<bootstrap>" '<spec as JSON>'
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import traceback
from typing import Any

from . import caps, init, landlock, libc, pipeline, seccomp


def main() -> None:
    spec: dict[str, Any] = json.loads(sys.argv[1])
    supervisor = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    supervisor.connect(spec["supervisor_socket"])
    try:
        confine(spec, supervisor.fileno())
    except BaseException:
        supervisor.send(init.message(ev="error", message=traceback.format_exc()[-4000:]))
        os._exit(1)
    init.run(spec, supervisor, {})


def confine(spec: dict[str, Any], supervisor_fd: int) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)  # as PID 1, default means: ignored
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):  # never a host file
        os.dup2(null, fd)
    os.close(null)
    caps.set_oom_score_adj(0)
    pipeline.close_descriptors(keep={supervisor_fd})
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    libc.prctl(libc.PR_SET_DUMPABLE, 0)  # code running as our uid must not read init's memory
    if spec.get("landlock"):
        landlock.restrict()
    seccomp.load(seccomp.build())
