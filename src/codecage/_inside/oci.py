"""PID 1 of an OCI-based sandbox (`gvisor`, `container`): the process the runtime starts.

The runtime (runsc, or a container engine) has already made the namespaces, the read-only
root, the tmpfs mounts, the cgroups, the uid and the capability set from the bundle's
config. No descriptor can cross its boundary, so init connects to the host's supervisor
listener, bind-mounted into the sandbox at the path given in argv; the spec arrives as the
first message there (never in argv, which other processes can read). From then on it is
_inside/entry.py's sequence, the same as every exec-based backend's.

    python -I -c "<bootstrap>" /run/codecage/supervisor.sock
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from typing import Any

from . import entry, init
from .messages import SetupErrorEvent


def main() -> None:
    supervisor = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    supervisor.connect(sys.argv[1])
    try:
        spec: dict[str, Any] = json.loads(supervisor.recv(1 << 20))
        ctx = entry.confine(spec, supervisor.fileno())
    except BaseException:
        supervisor.send(
            init.message(SetupErrorEvent(ev="error", message=traceback.format_exc()[-4000:]))
        )
        os._exit(1)
    init.run(spec, supervisor, ctx)
