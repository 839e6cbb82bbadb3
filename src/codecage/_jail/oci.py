"""What the OCI-based backends (`gvisor`, `container`) share: the image, the in-sandbox
init's entry point, and the host's listeners the sandbox connects to.

No descriptor crosses these boundaries (gVisor's sentry cannot hand its sockets to the
host; a container engine passes none in), so the host binds a per-sandbox directory into
the sandbox holding two listeners: `supervisor.sock` (SOCK_SEQPACKET, accepted once, then
closed and unlinked before any code runs) and `kernel.sock` (a stream per kernel
generation, taken by the token init announces on the supervisor channel). The rest of the
host protocol is the namespace jail's, unchanged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from .._errors import SandboxError, TransportError
from .._inside import steps
from .._inside.mounts import DEVICES
from .._inside.protocol import Message
from .._policy import Policy
from . import host
from .image import Image
from .launcher import BaseLauncher
from .template import package_dir, state_dir

CHANNEL_INSIDE = "/run/codecage-channel"  # where the channel directory appears in the sandbox
SANDBOX_UID = 1000
INIT_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # init's; the kernel's comes with the spec
TOKEN_BYTES = 32  # init's token: 16 random bytes, hex
# The device nodes a sandbox may see, on every backend (the namespace jail's set, its pty
# multiplexer included); a runtime's further devices are masked (see mask_file).
ALLOWED_DEVICES = (*(f"/dev/{name}" for name in DEVICES), "/dev/pts/ptmx")


def bootstrap(image: Image) -> list[str]:
    """The argv of the sandbox's PID 1 (its spec comes on the supervisor channel)."""
    code = (
        f"import sys; sys.path.insert(0, {image.package_root!r}); "
        "from codecage._inside.oci import main; main()"
    )
    return [image.python, "-I", "-c", code, f"{CHANNEL_INSIDE}/supervisor.sock"]


# The confinement steps an OCI runtime has done when init starts (_inside/steps.py): the
# cgroups, the namespaces and the root of the bundle or container. runsc also starts init
# as the sandbox's uid with no capabilities (the bundle's process.user), so its backend adds
# "identity"; a container engine starts it as root, to drop to a uid with no groups itself.
RUNTIME_DONE = ("cgroups", "namespaces", "root", "enter_root", "oom_score")


def spec(
    policy: Policy, env: dict[str, str], preload: list[str], *, done: tuple[str, ...]
) -> dict[str, Any]:
    """What init needs (see _inside/entry.py), sent as the supervisor channel's first message.
    `done`: the steps the runtime did (checked by steps.claim); the entry does the rest, the
    seccomp filter always (the runtime's own filter is no substitute for it)."""
    return {
        "env": env,
        "uid": SANDBOX_UID,
        "gid": SANDBOX_UID,
        "rlimits": rlimits(policy),
        "landlock": False,
        "done": steps.claim(*done),
        "preload": preload,
        "kernel_socket": f"{CHANNEL_INSIDE}/kernel.sock",
    }


environment, rlimits = host.environment, host.rlimits  # shared by every backend


class OciLauncher(BaseLauncher):
    """A sandbox whose init announces each kernel by token (see the module's docstring)."""

    oci_channel: Channel | None = None

    def handover(self, message: Message, fds: list[int]) -> list[int]:
        """The connection presenting the announced token stands in for the socket the
        namespace jail's init passes; the rest of the host protocol is unchanged."""
        token = message.get("token")
        if message.get("ev") in ("kernel", "procman") and not fds and isinstance(token, str):
            assert self.oci_channel is not None
            fds = [self.oci_channel.accept_kernel(token, time.monotonic() + 10).detach()]
        return fds


class Channel:
    """The host's listeners of one sandbox, in /run/codecage/oci/<id>/ (root only)."""

    def __init__(self, sandbox_id: str) -> None:
        self.dir = state_dir() / "oci" / sandbox_id / "channel"
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.supervisor_listener = self._listen("supervisor.sock", socket.SOCK_SEQPACKET)
        self.kernel_listener = self._listen("kernel.sock", socket.SOCK_STREAM)

    def _listen(self, name: str, kind: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, kind)
        sock.bind(str(self.dir / name))
        os.chmod(self.dir / name, 0o777)  # the sandbox's uid connects
        sock.listen(8)
        return sock

    def accept_supervisor(self, deadline: float) -> socket.socket:
        """The one supervisor connection: init's, made before any user code exists."""
        self.supervisor_listener.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            conn, _ = self.supervisor_listener.accept()
        except TimeoutError:
            raise TransportError("the sandbox's init did not connect") from None
        finally:
            self.supervisor_listener.close()
            with contextlib.suppress(FileNotFoundError):
                (self.dir / "supervisor.sock").unlink()
        return conn

    def accept_kernel(self, token: str, deadline: float) -> socket.socket:
        """The connection that presents `token`; any other queued one is dropped."""
        while True:
            self.kernel_listener.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                conn, _ = self.kernel_listener.accept()
            except TimeoutError:
                raise TransportError("the kernel did not connect") from None
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                got = _recv_exactly(conn, TOKEN_BYTES)
            except OSError:
                got = b""
            if got == token.encode():
                return conn
            conn.close()

    def close(self) -> None:
        self.supervisor_listener.close()
        self.kernel_listener.close()
        shutil.rmtree(self.dir.parent, ignore_errors=True)


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def staged_package(image: Image) -> Path:
    """The host's staged copy of the package the image holds (the same path inside)."""
    staged = package_dir(state_dir() / "pkg")
    if str(staged.parent) != image.package_root:
        raise SandboxError(f"the image holds another codecage version than {staged}")
    return staged


def mask_file() -> Path:
    """An empty read-only file of the host's, bound over each device node a runtime adds
    beyond ALLOWED_DEVICES (runsc always makes /dev/fuse and /dev/net/tun, engines /dev/tty):
    the path stays, and is no device."""
    path = state_dir() / "oci" / "mask"
    if not path.is_file() or path.stat().st_size or path.stat().st_mode & 0o222:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f"mask.{os.getpid()}")
        scratch.write_bytes(b"")
        scratch.chmod(0o444)
        scratch.replace(path)
    return path


def bundle_dir(sandbox_id: str) -> Path:
    path = state_dir() / "oci" / sandbox_id / "bundle"
    path.mkdir(parents=True, exist_ok=True)
    return path
