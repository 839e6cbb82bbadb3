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
GUEST_OOM_HEADROOM_MB = 64  # above memory_mb, only while the guest's kernel is being ended
# raised this many times at most, while the kill is on its way (on a loaded host the guest
# could allocate another GUEST_OOM_HEADROOM_MB before init had ended its kernel)
GUEST_OOM_STEPS = 3
GUEST_OOM_MARGIN_MB = 32  # the limit comes back once usage is this far below it
# for the sentry to give the memory back, else the sandbox ends (seconds on a loaded host)
GUEST_OOM_SETTLE_S = 30.0
# why the handler gives up on a sandbox: the memory was not given back in time ("slow"), or
# the guest reached every raised limit before its kernel could be ended ("grew")
GiveUp = Literal["slow", "grew"]


class FlooredCgroups(cgroups.SandboxCgroups):
    """The host cgroups of a runsc sandbox: pids.max counts runsc's own threads (the sentry,
    the gofer, the ptrace stubs), so it gets at least PIDS_FLOOR; the policy's pids_max is
    enforced inside, by the sentry, on the guest's tasks (RLIMIT_NPROC of the one guest uid).
    With a memory limit on cgroup v1, the OOM is the host's to handle (GuestOom); the kernels
    it ends count as the cgroup's OOM kills."""

    on_guest_oom: Callable[[GiveUp | None], None] | None = None
    guest_oom: GuestOom | None = None

    def create(self, policy: Policy) -> None:
        if policy.pids_max is not None and policy.pids_max < PIDS_FLOOR:
            policy = policy.model_copy(update={"pids_max": PIDS_FLOOR})
        super().create(policy)
        if self.version == 1 and policy.memory_mb is not None:
            try:
                self.guest_oom = GuestOom(self.dirs["memory"], policy.memory_mb, self._on_oom)
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

    `oom_kill_disable`: at the limit the host kernel pauses the sandbox's allocating tasks
    instead of killing one (it would pick the sentry). The OOM eventfd wakes this thread,
    which raises the limit by GUEST_OOM_HEADROOM_MB (the paused sentry runs again), asks for
    the guest's kernel to be killed (`on_oom(None)`), then brings the limit back as soon as
    the memory is given back. If the sandbox reaches the raised limit before the kill has
    landed, the limit is raised again, up to GUEST_OOM_STEPS times; if the memory is not
    given back within GUEST_OOM_SETTLE_S (`on_oom("slow")`), or the last raised limit is
    reached as well (`on_oom("grew")`), the sandbox is to be ended."""

    def __init__(
        self, memory_dir: Path, memory_mb: int, on_oom: Callable[[GiveUp | None], None]
    ) -> None:
        self.dir = memory_dir
        self.limit = memory_mb << 20
        self.on_oom = on_oom
        self.kills = 0
        cgroups._write(memory_dir / "memory.oom_control", "1")
        self.event = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        control = os.open(memory_dir / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        try:
            cgroups._write(memory_dir / "cgroup.event_control", f"{self.event} {control}")
        except OSError:
            self._close()
            raise
        finally:
            os.close(control)
        self.thread = threading.Thread(target=self._run, name="gvisor-oom", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while self._wait(None):
                if self._under_oom():
                    self._handle()
        except OSError:
            pass  # the cgroup is gone (removal also signals the eventfd)

    def _wait(self, timeout_s: float | None) -> bool:
        """Until the OOM event (True, counter consumed) or stop() (False)."""
        poller = select.poll()
        poller.register(self.event, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(None if timeout_s is None else timeout_s * 1000)}
        if self._stop_r in ready:
            return False
        if self.event in ready:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.event)
        return True

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

    def _handle(self) -> None:
        self.kills += 1
        steps = 1
        self._set_limit(self.limit + (GUEST_OOM_HEADROOM_MB << 20))  # wakes the paused tasks
        self.on_oom(None)
        # back once the killed kernel's pages are given back: well below the limit (else the
        # sandbox would pause again at once, before the sentry ever ends the kernel)
        settled = self.limit - min(GUEST_OOM_MARGIN_MB << 20, self.limit // 4)
        deadline = time.monotonic() + GUEST_OOM_SETTLE_S
        while time.monotonic() < deadline:
            if int((self.dir / "memory.usage_in_bytes").read_text()) <= settled:
                with contextlib.suppress(OSError):  # EBUSY: more came meanwhile; wait again
                    self._set_limit(self.limit)
                    return
            if not self._wait(0.05):
                return  # the sandbox is being removed
            if self._under_oom():  # the raised limit is reached too, before the kill landed
                if steps == GUEST_OOM_STEPS:
                    self.on_oom("grew")
                    return
                steps += 1
                self._set_limit(self.limit + steps * (GUEST_OOM_HEADROOM_MB << 20))
        self.on_oom("slow")

    def stop(self) -> None:
        if self._stop_w >= 0:
            os.write(self._stop_w, b"x")
            if self.thread is not threading.current_thread():
                self.thread.join(timeout=GUEST_OOM_SETTLE_S + 5)
            self._close()

    def _close(self) -> None:
        for fd in (self.event, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._stop_w = -1
