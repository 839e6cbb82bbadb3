"""Rootless stand-in for a sandbox's cgroups: its process tree, found from its init.

Without root there are no cgroups to create (unless a manager delegated some): limits fall
back to rlimits inside the sandbox, and killing relies on the PID namespace (SIGKILL to its
init takes every process in it). The readings a cgroup gives (peak memory, OOM kills, fork
failures) are unavailable here; CPU time is summed from /proc. See docs/threat-model.md.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Container
from pathlib import Path

from .._policy import Policy
from .cgroups import Usage

TICKS = os.sysconf("SC_CLK_TCK")


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
