"""The host cgroups of a runsc sandbox, and the host's handling of its guest's OOM.

gVisor has no OOM handling of its own (google/gvisor#2520): at the cgroup's limit the host's
OOM killer would pick the sentry and end the whole sandbox. So the host handles the OOM
itself (cgroup v1: `oom_kill_disable` and an OOM eventfd, GuestOom); see gvisor.py.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from .._policy import Policy
from . import cgroups

PIDS_FLOOR = 256  # host tasks: below ~256 in its cgroup, runsc's sentry crashes (measured)
# The hard limit stands this far above memory_mb, where the guest's kernel is ended: room
# for what the guest allocates while the kill is on its way (a single bytearray(400 << 20)
# went 65 MiB past memory_mb in the 70 ms a kill took on a loaded host), and for its init.
# At the hard limit itself a charge outside a page fault (the sentry filling the guest's
# memory file) fails instead of waiting: the guest's allocations fail there, init's too, and
# init dying ends the sandbox.
GUEST_OOM_HEADROOM_MB = 256
CACHE_POLL_S = 0.05  # while usage is over memory_mb but not the guest's: page cache
GUEST_OOM_MARGIN_MB = 32  # the memory is given back once held this far below memory_mb
# for the sentry to give the memory back, else the sandbox ends (seconds on a loaded host)
GUEST_OOM_SETTLE_S = 30.0
# why the handler gives up on a sandbox: the memory was not given back in time
GiveUp = Literal["slow"]


class FlooredCgroups(cgroups.SandboxCgroups):
    """The host cgroups of a runsc sandbox: pids.max counts runsc's own threads (the sentry,
    the gofer, the ptrace stubs), so it gets at least PIDS_FLOOR; the policy's pids_max is
    enforced inside, by the sentry, on the guest's tasks (RLIMIT_NPROC of the one guest uid).
    With a memory limit on cgroup v1, the OOM is the host's to handle (GuestOom); the kernels
    it ends count as the cgroup's OOM kills."""

    on_guest_oom: Callable[[GiveUp | None], None] | None = None
    guest_oom: GuestOom | None = None
    settle_s = GUEST_OOM_SETTLE_S

    def create(self, policy: Policy) -> None:
        if policy.pids_max is not None and policy.pids_max < PIDS_FLOOR:
            policy = policy.model_copy(update={"pids_max": PIDS_FLOOR})
        super().create(policy)
        if self.version == 1 and policy.memory_mb is not None:
            try:
                self.guest_oom = GuestOom(
                    self.dirs["memory"], policy.memory_mb, self._on_oom, self.settle_s
                )
            except OSError:
                self.remove()
                raise

    def _on_oom(self, give_up: GiveUp | None) -> None:
        if self.on_guest_oom is not None:
            self.on_guest_oom(give_up)

    def usage(self) -> cgroups.Usage:
        usage = super().usage()
        if self.guest_oom is not None:
            usage.oom_kills += self.guest_oom.kills
        return usage

    def close_files(self) -> None:
        if self.guest_oom is not None:
            self.guest_oom.stop()
        super().close_files()


class GuestOom:
    """The OOM handler of one runsc sandbox's memory cgroup (v1), on a thread of its own.

    The guest's kernel is ended at memory_mb, before the sandbox meets a hard limit: the
    hard limit stands GUEST_OOM_HEADROOM_MB above it, and a usage threshold at memory_mb
    wakes this thread, which asks for the guest's kernel to be killed (`on_oom(None)`) once
    the memory that reclaim cannot take back (the sentry's anonymous and shared memory: the
    guest's pages live in its memory file) reaches memory_mb. Page cache over memory_mb is
    not the guest's: the hard limit reclaims it, and it ends nothing.

    If the sandbox meets the hard limit before the kill has landed, `oom_kill_disable`
    makes the host kernel pause it there (its OOM killer would pick the sentry), and the
    kill is asked for if it was not yet. If the memory is not given back within settle_s,
    the sandbox is to be ended (`on_oom("slow")`)."""

    def __init__(
        self,
        memory_dir: Path,
        memory_mb: int,
        on_oom: Callable[[GiveUp | None], None],
        settle_s: float = GUEST_OOM_SETTLE_S,
    ) -> None:
        self.dir = memory_dir
        self.limit = memory_mb << 20  # where the guest's kernel is ended
        self.hard = self.limit + (GUEST_OOM_HEADROOM_MB << 20)  # where the sandbox waits
        self.on_oom = on_oom
        self.settle_s = settle_s
        self.kills = 0
        self._fds: list[int] = []
        self._stop_w = -1
        try:
            cgroups._write(memory_dir / "memory.oom_control", "1")
            self._set_limit(self.hard)
            self.oom_event = self._listen("memory.oom_control", "")
            self.usage_event = self._listen("memory.usage_in_bytes", f" {self.limit}")
            self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
            self._fds += [self._stop_r, self._stop_w]
        except OSError:
            self._close()
            raise
        self.thread = threading.Thread(target=self._run, name="gvisor-oom", daemon=True)
        self.thread.start()

    def _listen(self, name: str, argument: str) -> int:
        """An eventfd the cgroup signals on `name`'s event (cgroup.event_control)."""
        event = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(event)
        control = os.open(self.dir / name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            cgroups._write(self.dir / "cgroup.event_control", f"{event} {control}{argument}")
        finally:
            os.close(control)
        return event

    def _run(self) -> None:
        # the kill is a race against the guest's allocations: ahead of the host's other work
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
        try:
            while self._wait(None if self._usage() < self.limit else CACHE_POLL_S):
                if self._under_oom() or self._held() >= self.limit:
                    self.kills += 1
                    self.on_oom(None)
                    if not self._settle():
                        return
        except OSError:
            pass  # the cgroup is gone (removal also signals the eventfds)

    def _settle(self) -> bool:
        """After the kill was asked for: until the memory is given back (True); False:
        stopped, or the sandbox is to be ended."""
        settled = self.limit - min(GUEST_OOM_MARGIN_MB << 20, self.limit // 4)
        deadline = time.monotonic() + self.settle_s
        while time.monotonic() < deadline:
            if self._held() <= settled and not self._under_oom():
                return True
            if not self._wait(0.05):
                return False  # the sandbox is being removed
        self.on_oom("slow")
        return False

    def _wait(self, timeout_s: float | None) -> bool:
        """Until an event (True, counters consumed), the timeout (True) or stop() (False)."""
        poller = select.poll()
        for fd in (self.oom_event, self.usage_event, self._stop_r):
            poller.register(fd, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(None if timeout_s is None else timeout_s * 1000)}
        if self._stop_r in ready:
            return False
        for fd in ready:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)
        return True

    def _usage(self) -> int:
        return int((self.dir / "memory.usage_in_bytes").read_text())

    def _held(self) -> int:
        """What reclaim cannot take back: anonymous memory and shmem (no swap here)."""
        stat = cgroups._keyed((self.dir / "memory.stat").read_text())
        return stat.get("total_rss", 0) + stat.get("total_shmem", 0)

    def _under_oom(self) -> bool:
        text = (self.dir / "memory.oom_control").read_text()
        return cgroups._keyed(text).get("under_oom", 0) == 1

    def _set_limit(self, value: int) -> None:
        """memory.limit_in_bytes (and memsw, which must stay >= it, where swap is counted)."""
        memsw = self.dir / "memory.memsw.limit_in_bytes"
        order = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
        current = int((self.dir / "memory.limit_in_bytes").read_text())
        for name in reversed(order) if value > current else order:
            if name == order[1] and not memsw.exists():
                continue
            cgroups._write(self.dir / name, str(value))

    def stop(self) -> None:
        if self._stop_w >= 0:
            os.write(self._stop_w, b"x")
            if self.thread is not threading.current_thread():
                self.thread.join(timeout=GUEST_OOM_SETTLE_S + 5)
            self._close()

    def _close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        self._stop_w = -1
