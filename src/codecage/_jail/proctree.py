"""Rootless stand-in for a sandbox's cgroups: its process tree, found from its init.

Without root there are no cgroups to create (unless a manager delegated some): limits fall
back to rlimits inside the sandbox, and killing relies on the PID namespace (SIGKILL to its
init takes every process in it). The readings a cgroup gives (peak memory, OOM kills, fork
failures) are unavailable here; CPU time is summed from /proc. See docs/threat-model.md.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
from collections.abc import Callable, Container
from pathlib import Path

from .._errors import BackendUnavailable
from .._policy import Policy
from .cgroups import Usage

TICKS = os.sysconf("SC_CLK_TCK")

# System calls in which a kernel waiting for its next request blocks on its channel
# (Channel.recv: a blocking recv, which glibc issues as recvfrom), by machine.
_WAITING_SYSCALLS = {
    "x86_64": frozenset({0, 19, 45, 47}),  # read, readv, recvfrom, recvmsg
    "aarch64": frozenset({63, 65, 207, 212}),
}.get(platform.machine())


class ProcessTree:
    """The same surface as SandboxCgroups, for a sandbox whose init is known by pid."""

    version = 0
    mount_names: list[str] = []

    def __init__(self) -> None:
        self.init_pid: int | None = None

    def procs_files(self) -> list[str]:
        return []

    def create(self, policy: Policy) -> None:
        pass

    def attach(self, init_pid: int) -> None:
        self.init_pid = init_pid

    def pids(self) -> list[int]:
        """init and all its descendants (host pids)."""
        if self.init_pid is None:
            return []
        found, todo = [], [self.init_pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
        return found

    def usage(self) -> Usage:
        cpu = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu += sum(int(x) for x in fields[11:15]) / TICKS  # utime stime cutime cstime
        return Usage(memory_peak_bytes=None, oom_kills=0, pids_max_events=0, cpu_s=cpu)

    def memory_current(self) -> int | None:
        return None

    def reset_peak(self) -> None:
        pass

    def kill(self, spare: int | Container[int] | None = None, sig: int = signal.SIGKILL) -> None:
        """Signal through pidfds, and only processes still inside a nested PID namespace:
        there is no freezer here, so a pid read a moment ago may have been reused."""
        keep: Container[int] = {spare} if isinstance(spare, int) else (spare or ())
        for pid in self.pids():
            if pid in keep:
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if _nested(pid):  # checked after the pidfd pins the process
                    signal.pidfd_send_signal(pidfd, sig)
            except OSError:
                pass
            finally:
                os.close(pidfd)

    def freeze(self, timeout_s: float = 5.0, abort: Callable[[], bool] = lambda: False) -> None:
        raise BackendUnavailable(
            "pausing a sandbox needs the cgroup freezer: a jail started without root has none"
        )

    def thaw(self) -> None:
        pass  # never frozen

    def remove(self, timeout_s: float = 5.0) -> None:
        pass

    def close_files(self) -> None:
        pass


def _nested(pid: int) -> bool:
    """Whether `pid` lives in a PID namespace below ours, as every sandbox process does."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return len(line.split()) > 2
    return False


def _children(pid: int) -> list[int]:
    """The host pids of a process's children (every thread's), from /proc."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return out


def _nspid(pid: int) -> int | None:
    """A process's pid in its innermost pid namespace."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class KernelWatch:
    """The host's own look at a kernel generation: its /proc/PID/syscall says whether its
    main thread is blocked reading its channel (the evidence that a run's code stopped)."""

    def __init__(self) -> None:
        self.pid: int | None = None  # the kernel's host pid, where the host can look
        self.fd: int | None = None  # its channel's descriptor number inside
        # /proc/PID/syscall of that kernel, kept open: a pread is cheaper than an open, and a
        # descriptor names the process itself, never a later one given the same pid.
        self._syscall_fd: int | None = None

    def find(self, init_pid: int | None, ns_pid: object, fd: object) -> None:
        """Watch the kernel that greeted with pid `ns_pid` and channel `fd`. The hello is
        sent before any code of this kernel generation ran; the host checks it against
        /proc: a child of init whose innermost pid is `ns_pid`, holding a socket at `fd`.
        Nothing to watch where the host cannot look (init is not a host process: gVisor)."""
        self.stop()
        if init_pid is None or _WAITING_SYSCALLS is None:
            return
        if not isinstance(ns_pid, int) or not isinstance(fd, int) or fd < 0:
            return
        todo, looked = [init_pid], 0
        while todo and looked < 64:
            pid, looked = todo.pop(0), looked + 1
            for child in _children(pid):
                if _nspid(child) == ns_pid:
                    try:
                        if not os.readlink(f"/proc/{child}/fd/{fd}").startswith("socket:"):
                            return
                        watched = os.open(f"/proc/{child}/syscall", os.O_RDONLY)
                    except OSError:
                        return
                    try:
                        os.pread(watched, 256, 0)  # readable by the host, not only openable
                    except OSError:
                        os.close(watched)
                        return
                    self._syscall_fd, self.pid, self.fd = watched, child, fd
                    return
                todo.append(child)

    def waiting(self) -> bool | None:
        """Whether the kernel's main thread is blocked reading its channel (the host's own
        reading of /proc/PID/syscall). None where the host cannot look, and then a run's
        end is the sandbox's claim."""
        if self._syscall_fd is None or _WAITING_SYSCALLS is None:
            return None
        try:
            fields = os.pread(self._syscall_fd, 256, 0).split()
            nr, first = int(fields[0]), int(fields[1], 16)
        except (OSError, ValueError, IndexError):  # "running", or gone
            return False
        return nr in _WAITING_SYSCALLS and first == self.fd

    def readable(self) -> bool:
        """Whether the host's reading works: /proc/PID/syscall answers, with `running` or a
        syscall's line (a kernel that is busy, or slow to get back on its channel under
        load, is still looked at)."""
        if self._syscall_fd is None:
            return False
        try:
            fields = os.pread(self._syscall_fd, 256, 0).split()
        except OSError:
            return False
        return bool(fields) and (fields[0] == b"running" or fields[0].lstrip(b"-").isdigit())

    def stop(self) -> None:
        """Watch nothing (the kernel is gone, or cannot be looked at)."""
        if self._syscall_fd is not None:
            os.close(self._syscall_fd)
        self._syscall_fd = None
        self.pid = self.fd = None
