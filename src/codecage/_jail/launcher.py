"""What a backend provides: a `Launcher`, one per sandbox (docs/backends-internals.md).

The sandbox (sandbox.HostSandbox, one class for every backend) creates the launcher's tree,
calls `launch`, and from then on runs the whole kernel protocol itself; the launcher only
starts, signals, kills and frees what confines the sandbox, and answers a few questions the
generic code asks at fixed points (the hooks below). No backend overrides execution,
recovery or restart.

    tree                the Tree: limits, the host's own readings, signalling every process,
                        freezing and thawing them (pause, resume)
    tree_policy(p)      the limits the tree is created with (the policy's, or more room for
                        the backend's own processes charged to it)
    launch(envs)        start init, confined and charged to the tree: Launched
    signal(sig)         a signal to the kernel and all it started; init (PID 1) stays
    kill_tree()         SIGKILL every process of the sandbox (after init, by its pidfd)
    release(init_dead)  free what the backend holds, once the tree is dead
    diagnostics()       what the launcher said when a start failed, for the error
    open_mounts()       the host's own handles on the memory-backed filesystems (Mounts)
    prefault_at_start   run the uncounted first cell at start (its cost is start-up's)
    procman             whether its init can start a process manager (background processes)
  hooks:
    handover(m, fds)    the kernel socket of init's "kernel" message (a token to accept)
    init_hung_up()      whether init's hang-up is the kernel's death (gVisor's sentry died)
    ended_with_init()   then, the reason (and limit) the sandbox ends with at restart
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Container
from typing import TYPE_CHECKING, NamedTuple, Protocol

from .._inside.protocol import Message
from .._models import KilledBy
from .._policy import Policy
from .cgroups import Usage

if TYPE_CHECKING:
    from .sandbox import HostSandbox


class Tree(Protocol):
    """A sandbox's processes as the host sees them: cgroups.SandboxCgroups, or
    proctree.ProcessTree without root. Another backend brings its own (a container's cgroup)."""

    def create(self, policy: Policy) -> None: ...

    def usage(self) -> Usage: ...

    def memory_current(self) -> int | None: ...

    def reset_peak(self) -> None: ...

    def kill(
        self, spare: int | Container[int] | None = None, sig: int = signal.SIGKILL
    ) -> None: ...

    def remove(self, timeout_s: float = 5.0) -> None: ...

    def freeze(self, timeout_s: float = 5.0, abort: Callable[[], bool] = lambda: False) -> None:
        """Stop every process where it is (pause); OSError if it cannot be done in time or
        `abort()` turns true meanwhile (the sandbox is being ended: the freeze is undone),
        BackendUnavailable where there is no freezer."""
        ...

    def thaw(self) -> None: ...


class Launched(NamedTuple):
    """What `launch` returns: the supervisor channel to init, a pidfd on init (None where
    init is not a host process; then the channel's hang-up says it died), init's host pid
    (None likewise)."""

    supervisor: socket.socket
    init_pidfd: int | None
    init_pid: int | None


class Mounts(Protocol):
    """The sandbox's memory-backed filesystems as the host measures them."""

    def full(self) -> bool: ...

    def close(self) -> None: ...


class StatvfsMounts:
    """Descriptors on the sandbox's filesystems, opened before any code ran: the host's own
    statvfs says whether one is full."""

    def __init__(self, paths: list[str]) -> None:
        self.fds: list[int] = []
        try:
            for path in paths:
                self.fds.append(os.open(path, os.O_PATH | os.O_CLOEXEC))
        except BaseException:
            self.close()
            raise

    def full(self) -> bool:
        for fd in self.fds:
            st = os.fstatvfs(fd)
            if st.f_bavail * st.f_frsize < 64 * 1024:
                return True
        return False

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


NO_MOUNTS = StatvfsMounts([])  # where the host cannot look (another user namespace, gVisor)


class Launcher(Protocol):
    """A backend's part of one sandbox (see the module's docstring)."""

    @property
    def tree(self) -> Tree: ...

    @property
    def prefault_at_start(self) -> bool: ...

    @property
    def procman(self) -> bool: ...

    def tree_policy(self, policy: Policy) -> Policy: ...

    def launch(self, envs: dict[str, str]) -> Launched: ...

    def signal(self, sig: int) -> None: ...

    def kill_tree(self) -> None: ...

    def release(self, init_dead: bool) -> None: ...

    def diagnostics(self) -> str: ...

    def open_mounts(self) -> Mounts: ...

    def handover(self, message: Message, fds: list[int]) -> list[int]: ...

    def init_hung_up(self) -> bool: ...

    def ended_with_init(self) -> tuple[str, KilledBy | None]: ...


class BaseLauncher:
    """The defaults of a launcher whose init is a host process charged to `tree`: signals
    through the tree sparing init, statvfs through init's root. A backend subclasses it and
    implements `launch` (and `release`), or implements the Launcher protocol itself."""

    tree: Tree
    prefault_at_start = False
    procman = True

    def __init__(self, box: HostSandbox) -> None:
        self.box = box  # the sandbox (id, policy, init_pid, terminate): public members only

    def tree_policy(self, policy: Policy) -> Policy:
        return policy

    def launch(self, envs: dict[str, str]) -> Launched:
        raise NotImplementedError

    def signal(self, sig: int) -> None:
        """To every process but init, like Ctrl-C (or a kill) to a terminal's foreground."""
        keep = () if self.box.init_pid is None else (self.box.init_pid,)
        self.tree.kill(spare=self.box.spared(keep), sig=sig)

    def kill_tree(self) -> None:
        self.tree.kill()

    def release(self, init_dead: bool) -> None:
        pass

    def diagnostics(self) -> str:
        return ""

    def open_mounts(self) -> Mounts:
        """The workspace, /tmp and /dev/shm, opened through init's root."""
        root = f"/proc/{self.box.init_pid}/root"
        return StatvfsMounts([f"{root}/{path}" for path in ("home/user", "tmp", "dev/shm")])

    def handover(self, message: Message, fds: list[int]) -> list[int]:
        return fds  # init passed the kernel's socket itself (SCM_RIGHTS)

    def init_hung_up(self) -> bool:
        return False  # init's hang-up is the sandbox's end

    def ended_with_init(self) -> tuple[str, KilledBy | None]:
        return "its init died", None
