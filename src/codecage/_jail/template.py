"""The host's handle on the template process (the zygote every namespace sandbox is forked from).

The template is started with execve from the runtime environment's interpreter, with an
environment built from scratch: never a fork of this process, whose memory and
environment may hold the operator's secrets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import BackendUnavailable, SandboxError
from .._inside.messages import TemplateRequest

if TYPE_CHECKING:
    from .layers import Layer

DEFAULT_RUNTIME = "/var/lib/codecage/runtime"
DEFAULT_PRELOAD = ("numpy", "pandas", "matplotlib", "matplotlib.pyplot", "IPython")
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Runtime:
    """The sandbox's own Python environment (built by scripts/build-runtime)."""

    path: Path

    @classmethod
    def default(cls) -> Runtime:
        return cls(Path(os.environ.get("CODECAGE_RUNTIME", DEFAULT_RUNTIME)))

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def version(self) -> str:
        """Its Python's "3.11", from the venv's lib/pythonX.Y (the build's default if none)."""
        found = sorted(p.name for p in (self.path / "lib").glob("python3.*"))
        return found[0].removeprefix("python") if found else "3.11"

    @property
    def site_packages(self) -> Path:
        return self.path / "lib" / f"python{self.version}" / "site-packages"

    def check(self) -> None:
        if _shadowed(self.path.resolve()):
            raise BackendUnavailable(
                f"the sandbox runtime {self.path} lies under a path the jail mounts over "
                f"({', '.join(SHADOWED)}): build it elsewhere (CODECAGE_RUNTIME)"
            )
        if not self.python.exists():
            raise BackendUnavailable(
                f"no sandbox runtime at {self.path}: run `make runtime` "
                "(or scripts/build-runtime), or set CODECAGE_RUNTIME"
            )

    def base_env(self) -> dict[str, str]:
        """The environment every template and sandbox starts from: nothing of the host."""
        return {
            "PATH": f"{self.path}/bin:/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "MPLBACKEND": "Agg",
            "PYTHONDONTWRITEBYTECODE": "1",
        }


# Paths the jail mounts its own filesystems over: nothing it needs may live under them.
SHADOWED = ("/tmp", "/home", "/dev", "/proc", "/sys", "/run/codecage/root")


def state_dir() -> Path:
    """Where the staged package and the (empty) root mount point live: /run/codecage for
    root; for anyone else a private directory of theirs that the jail does not hide."""
    if os.geteuid() == 0:
        path = Path("/run/codecage")
        path.mkdir(parents=True, exist_ok=True)
        return path
    path = Path(f"/var/tmp/codecage-{os.geteuid()}")
    path.mkdir(mode=0o700, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise BackendUnavailable(f"{path} is not a private directory of this user")
    return path


def _shadowed(path: Path) -> bool:
    return any(path == Path(p) or Path(p) in path.parents for p in SHADOWED)


PACKAGE_SOURCE = Path(__file__).resolve().parent.parent  # the codecage package's own files


def package_digest() -> str:
    """The content hash of the codecage package (its staged path, the OCI image's key)."""
    digest = hashlib.sha256()
    for path in sorted(
        p for p in PACKAGE_SOURCE.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    ):
        digest.update(str(path.relative_to(PACKAGE_SOURCE)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def package_dir(stage: Path) -> Path:
    """The `codecage` package as the template imports it and every sandbox sees it (bound
    read-only at the same path). A copy staged under /run/codecage/pkg/<content hash>, so
    that the checkout may live anywhere, /tmp included, which the jail hides behind its own."""
    source = PACKAGE_SOURCE
    target = stage / package_digest()[:20] / "codecage"
    if not target.exists():
        stage.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=stage))
        shutil.copytree(source, scratch / "codecage", ignore=shutil.ignore_patterns("__pycache__"))
        try:
            (scratch / "codecage").parent.rename(target.parent)  # atomic: racing copies are equal
        except OSError:
            shutil.rmtree(scratch)
    return target


class Template:
    """One template process. spawn() is serialized: the template forks one sandbox at a time."""

    def __init__(
        self,
        runtime: Runtime,
        preload: tuple[str, ...] = DEFAULT_PRELOAD,
        layer: Layer | None = None,
    ) -> None:
        """`layer`: a custom template's (docs/templates.md): its site directory goes on
        sys.path, its environment into the template's, and its preload list is `preload`."""
        runtime.check()
        self.runtime = runtime
        self.preload = preload
        self.layer = layer
        self.last_used = time.monotonic()
        self._lock = threading.Lock()
        self._rid = 0
        self.started = time.monotonic()
        self.live = 0  # sandboxes forked from this template and not yet killed
        self.retired = False
        self._closed = False
        self._sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = runtime.base_env() | {
            "HOME": "/home/user",
            "MPLCONFIGDIR": str(runtime.path / "share" / "mplconfig"),
        }
        if layer is not None:
            env = layer.environment(env)
        state = state_dir()
        self.package = package_dir(state / "pkg")
        self.root_mountpoint = state / "root"
        self.root_mountpoint.mkdir(exist_ok=True)
        paths = [str(self.package.parent)] + ([str(layer.site)] if layer is not None else [])
        bootstrap = (
            f"import sys; sys.path[0:0] = {paths!r}; "
            "from codecage._inside.zygote import main; main()"
        )
        config = json.dumps({"preload": list(preload)})
        # The template's own diagnostics; sandboxes never inherit it (init points 0-2 at /dev/null).
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the template
        self.process = subprocess.Popen(
            [str(runtime.python), "-I", "-c", bootstrap, str(child.fileno()), config],
            env=env,
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
            cwd="/",
        )
        child.close()
        self._sock.settimeout(START_TIMEOUT_S)
        try:
            ready = self._recv()
        except (TimeoutError, SandboxError):
            self.close()
            raise
        if not ready.get("ok"):
            self.close()
            raise BackendUnavailable(f"the template failed to start: {ready.get('error')}")
        self.pid: int = ready["pid"]
        self.landlock_abi: int = ready.get("landlock_abi", 0)
        self.data_bytes: int = ready.get("data_bytes", 0)  # the template's own data segment
        self.oom_protected: bool = ready.get("oom_protected", False)  # its -900 took

    def _recv(self, fds: int = 0, rid: int | None = None) -> dict[str, Any]:
        """The reply to request `rid`; late replies to requests that timed out are dropped."""
        while True:
            data, received, _flags, _addr = socket.recv_fds(self._sock, 1 << 20, fds)
            if not data:
                raise SandboxError(f"the template exited: {self.diagnostics()}")
            reply: dict[str, Any] = json.loads(data)
            if rid is None or reply.get("rid") == rid:
                reply["_fds"] = received
                return reply
            for fd in received:
                os.close(fd)

    def _call(self, request: TemplateRequest, timeout_s: float, fds: int = 0) -> dict[str, Any]:
        with self._lock:
            self._rid += 1
            self._sock.settimeout(timeout_s)
            self._sock.send(json.dumps({**request, "rid": self._rid}).encode())
            return self._recv(fds, self._rid)

    def spawn(self, timeout_s: float = 30.0) -> socket.socket:
        """Fork a sandbox's set-up process. Returns its supervisor socket: the sandbox's spec
        goes over it, never to the template (whose memory every later fork inherits)."""
        reply = self._call(TemplateRequest(op="spawn"), timeout_s, fds=1)
        fds: list[int] = reply["_fds"]
        if not reply.get("ok") or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise SandboxError(f"could not start a sandbox: {reply.get('error')}")
        return socket.socket(fileno=fds[0])

    def acquire(self) -> None:
        with self._lock:
            self.live += 1

    def release(self) -> None:
        with self._lock:
            self.live -= 1

    def reap(self) -> None:
        """Have the template reap its dead children (a sandbox's init), so no zombie remains.
        Names no pid: nothing of a sandbox goes to the template."""
        self._call(TemplateRequest(op="reap"), 10)

    def ping(self) -> dict[str, Any]:
        return self._call(TemplateRequest(op="ping"), 10)

    def diagnostics(self) -> str:
        """The end of the template's stderr, for error messages."""
        with contextlib.suppress(OSError, ValueError):
            self._log.seek(0, os.SEEK_END)
            self._log.seek(max(0, self._log.tell() - 2000))
            return self._log.read().decode(errors="replace").strip()
        return ""

    def close(self) -> None:
        """Closing the channel tells the template to reap its children and exit. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
