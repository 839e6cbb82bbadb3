"""One live sandbox, the same class for every backend: its lifecycle over a Launcher.

`HostSandbox` composes the backend's launcher (launcher.py: the tree, init's launch,
signals, release) and the channel to init and the kernel (channel.py). It starts the
sandbox, runs code (run.py) and requests, restarts, interrupts and kills the kernel, takes
the host's readings, and ends the sandbox. Outcomes come from the host's own timer and
readings, never from the kernel's word.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Container, Mapping
from typing import TYPE_CHECKING, Any

from .._errors import (
    ExecutionTimeout,
    SandboxError,
    SandboxNotFound,
    SandboxPaused,
    TransportError,
)
from .._inside.messages import PrefaultRequest, ReplyRequest, RestartRequest, SetenvRequest
from .._inside.protocol import Message
from .._models import Execution, ExecutionError, KilledBy
from .._policy import Policy, effective_timeout
from .cgroups import Usage
from .channel import KERNEL_EVENTS, POLL_S, REPLY_EVENTS, Channel, UnreadRequest, readable
from .launcher import NO_MOUNTS, Launcher, Mounts
from .run import EventCallback, Run, how_died

if TYPE_CHECKING:
    from .procs import ProcessManager
    from .volumes import Attachment


# A node of a cluster (codecage._cluster.node) names its sandboxes with its own prefix (an
# even number of hex digits): a front end routes a sandbox's calls by its id alone. The id
# stays 32 hex digits; what is not the prefix is random.
ID_PREFIX = ""
PROCMAN_START_S = 10.0  # init forks it at once; past this the sandbox is stuck


class HostSandbox:
    """One live sandbox: its launcher (what confines it), its init (PID 1) and the channel
    to the current kernel. `make(sandbox)` builds the launcher; the sandbox starts at once
    (on any failure everything started is killed)."""

    def __init__(
        self,
        policy: Policy,
        make: Callable[[HostSandbox], Launcher],
        envs: dict[str, str],
        timeout_s: float = 30.0,
        volumes: tuple[Attachment, ...] = (),
    ) -> None:
        self.id = ID_PREFIX + secrets.token_hex(16 - len(ID_PREFIX) // 2)
        self.policy = policy
        self.volumes = volumes  # mounted at set-up; detached when it has ended (volumes.py)
        for volume in volumes:
            volume.sandbox_id = self.id
        self._closed = False
        self._dying = False
        self.ended_because = "it was killed"
        self.ended_limit: KilledBy | None = (
            None  # the limit that ended it ("cpu_limit"), if one did
        )
        self.last_usage = Usage(0, 0, 0, 0.0)
        self.init_pid: int | None = None
        self.init_pidfd: int | None = None
        self._mounts: Mounts = NO_MOUNTS
        self._setup: list[ReplyRequest] = []
        self._cpu_base = 0.0
        self._full_at_end = False
        # background processes (procs.py): started when first needed (process_manager)
        self.procs: ProcessManager | None = None
        self._procs_envs: dict[str, str] = {}  # the session's own environment, for it
        self._procs_lock = threading.Lock()
        self.paused_at: float | None = None  # time.monotonic() of the pause, while paused
        # A pause's start and a kill's thaw take turns (never for long: a kill never waits
        # for a freeze): a freeze in progress when the sandbox is ended is undone at once.
        self._freeze_lock = threading.Lock()
        self._freezing = False
        # How the kernel died between runs, once restarted, until the next run reports it.
        self._lost: str | None = None
        self.launcher = make(self)
        self.channel = Channel(self, policy, self.launcher)
        self._start(envs, timeout_s)

    @property
    def generation(self) -> int:
        """The current kernel's generation (0 first; each restart adds one)."""
        return self.channel.generation

    @property
    def dying(self) -> bool:
        """Ended or being ended (its processes are killed; kill() releases the rest)."""
        return self._dying

    @property
    def alive(self) -> bool:
        return not self._closed and not self._dying

    def _start(self, envs: dict[str, str], timeout_s: float) -> None:
        launcher = self.launcher
        try:
            launcher.tree.create(launcher.tree_policy(self.policy))
            supervisor, self.init_pidfd, self.init_pid = launcher.launch(envs)
            self.channel.attach(supervisor, self.init_pid)
            self.channel.await_kernel(time.monotonic() + timeout_s)
            self._mounts = launcher.open_mounts()
            self._cpu_base = launcher.tree.usage().cpu_s  # start-up is not the session's
        except OSError as exc:  # e.g. init died before it could report why
            self.kill()
            why = launcher.diagnostics()
            raise SandboxError(
                f"sandbox set-up failed: {exc}" + (f": {why}" if why else "")
            ) from None
        except BaseException:
            self.kill()
            raise
        if launcher.prefault_at_start:
            # A first cell whose cost is the sandbox's start-up, not the session's cpu_s
            # (gVisor: the kernel's first import through the gofer).
            try:
                self.prefault()
            except BaseException:
                self.kill()
                raise

    def _ended(self) -> SandboxNotFound:
        return SandboxNotFound(f"sandbox {self.id} has ended: {self.ended_because}")

    def check_alive(self) -> None:
        if self._closed or self._dying:
            raise self._ended()
        if self.paused_at is not None:
            raise SandboxPaused(f"sandbox {self.id} is paused: resume it first")

    # -- pausing ------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self.paused_at is not None and self.alive

    def pause(self) -> None:
        """Freeze every process of the sandbox (init, the kernel, background processes)
        where it is: nothing runs and no CPU is used, memory stays charged, the channels
        stay open. The caller makes sure no run or request is in flight. A kill meanwhile
        undoes the freeze at once (the pause then raises SandboxNotFound)."""
        self.check_alive()
        with self._freeze_lock:
            if self._dying:
                raise self._ended()
            self._freezing = True
        try:
            self.launcher.tree.freeze(abort=lambda: self._dying)
        except OSError as exc:
            with self._freeze_lock:
                self._freezing = False
            if self._dying:
                raise self._ended() from None
            raise SandboxError(f"sandbox {self.id} could not be paused: {exc}") from None
        with self._freeze_lock:
            self._freezing = False
            ended = self._dying
            if not ended:
                self.paused_at = time.monotonic()
        if ended:  # ended as the freeze completed: its processes take their SIGKILL
            with contextlib.suppress(OSError):
                self.launcher.tree.thaw()
            raise self._ended()

    def resume(self) -> float:
        """Thaw the sandbox; returns how long it was paused (seconds)."""
        if self._closed or self._dying:
            raise self._ended()
        if self.paused_at is None:
            return 0.0
        try:
            self.launcher.tree.thaw()
        except OSError as exc:
            self.terminate(f"it could not be resumed ({exc})")
            raise self._ended() from None
        paused_for, self.paused_at = time.monotonic() - self.paused_at, None
        return paused_for

    # -- running code -------------------------------------------------------------------

    def execute(
        self,
        code: str,
        *,
        mode: str = "session",
        timeout_s: float | None = None,
        envs: dict[str, str] | None = None,
        on_event: EventCallback | None = None,
        recover: bool = True,
    ) -> Execution:
        """Run code in the kernel. With `recover`, a timeout interrupts (SIGINT) and, after
        the policy's grace, kills and restarts the kernel; a dead kernel is restarted. Without
        it (one-shot runs, whose sandbox is destroyed next), the run just stops waiting."""
        self.check_alive()
        self._revive()
        if self._lost is not None:  # the state this code may need is gone: it does not run
            return self._lost_execution()
        limit = effective_timeout(self.policy, timeout_s)
        try:
            ex = Run(self, on_event).go(code, mode, limit, envs or {}, recover)
        except UnreadRequest:
            # The kernel died as the cell was sent (killed a moment before): it never read
            # it, so nothing of it ran; a fresh kernel takes the next call.
            if not recover or not self._revive():
                raise
            return self._lost_execution()
        if self.channel.init_died and ex.error is not None:
            # The whole sandbox died with the kernel: the error says why it ended.
            value = f"{ex.error.value.split(';')[0]}; {self.ended_because}"
            ex.error = ExecutionError(ex.error.name, value, "")
        return ex

    def request(
        self, message: ReplyRequest | Mapping[str, Any], timeout_s: float | None
    ) -> Message:
        """Send a file or command request and wait for its reply ("done" or "failed").

        If the kernel dies meanwhile it is restarted and TransportError is raised; past the
        deadline the kernel is interrupted, then killed and restarted. A kernel that died
        since the last call is restarted first (the next run reports the loss); a request
        the kernel died without reading is sent once more, to the fresh kernel."""
        self.check_alive()
        self._revive()
        try:
            return self._request(message, timeout_s)
        except UnreadRequest:
            if not self._revive():
                raise
            return self._request(message, timeout_s)

    def _request(
        self, message: ReplyRequest | Mapping[str, Any], timeout_s: float | None
    ) -> Message:
        channel = self.channel
        message = {**message, "id": channel.issue()}  # sent as built, with a fresh id
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        channel.start_budget()  # the request's own channel budget
        channel.send(message)
        while True:
            while (frame := channel.next_pending()) is not None:
                # a prefault runs a cell under the request's id: its run events are dropped
                if (
                    channel.frame_is_for(frame, message["id"], KERNEL_EVENTS)
                    and frame.get("ev") in REPLY_EVENTS
                ):
                    return frame
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self.kill_kernel()
                self.restart_kernel(time.monotonic() + 30)
                raise ExecutionTimeout(
                    f"{message.get('op')} did not finish within {timeout_s} s; the kernel was restarted"
                )
            wait = POLL_S if deadline is None else min(POLL_S, deadline - now)
            from_kernel, from_init = channel.wait(wait)
            if from_kernel:
                channel.receive()
            if from_init and not channel.pending:
                status = channel.exit_event()
                if status is not None:
                    self.restart_kernel(time.monotonic() + 30)
                    raise TransportError(
                        f"the kernel died during {message.get('op')} ({status}); it was restarted"
                    )

    def _revive(self) -> bool:
        """Restart a kernel that died since the last run or request (code of the user's that
        ends it later: a thread calling os._exit, a process of the sandbox killing it), by
        init's report of its exit, before anything is sent to it; whether it did. The next
        run reports the loss of its state (`execute`); the sandbox ends if init died with
        it."""
        status = self.channel.kernel_exited()
        if status is None:
            return False
        self.restart_kernel(time.monotonic() + 30)
        if not self.alive:
            raise self._ended()
        self._lost = how_died(status)
        return True

    def _lost_execution(self) -> Execution:
        """The answer to the first run after the kernel died between calls: its code did not
        run, since the state it may need is gone."""
        how, self._lost = self._lost, None
        value = (
            f"the kernel died after the last run ({how}); it was restarted and its "
            "variables are lost: this code did not run"
        )
        return Execution(error=ExecutionError("KernelDied", value, ""), state_lost=True)

    def prefault(self) -> None:
        """The pool's first, uncounted cell: not the session's CPU either."""
        self.request(PrefaultRequest(op="prefault"), 30)
        self._cpu_base = self.launcher.tree.usage().cpu_s

    def set_envs(self, envs: dict[str, str]) -> None:
        """A pooled sandbox's own environment, set when it is handed out (no code ran yet)."""
        self.setup(SetenvRequest(op="setenv", envs=envs))
        self._procs_envs.update(envs)
        if self.procs is not None:
            self.procs.envs.update(envs)

    def setup(self, message: ReplyRequest) -> None:
        """A request that configures the session (environment, import guard, a code
        context): sent now, and again to every kernel a restart brings, before any code runs
        there."""
        self.request(message, 30)
        self._setup.append(message)

    def record_setup(self, message: ReplyRequest) -> None:
        """A set-up request already sent (and answered) by the caller, for restarts only."""
        self._setup.append(message)

    @property
    def setups(self) -> tuple[ReplyRequest, ...]:
        """The session's set-up requests, in the order a restart sends them again."""
        return tuple(self._setup)

    def forget_setup(self, drop: Callable[[ReplyRequest], bool]) -> None:
        """No longer send the set-up requests `drop` picks to a restarted kernel."""
        self._setup = [m for m in self._setup if not drop(m)]

    def process_manager(self) -> ProcessManager:
        """The sandbox's process manager, started now if it has none yet (most sandboxes
        never need one: a fork less at every start) or its last one is gone (code inside
        killed it)."""
        with self._procs_lock:
            procs = self.procs
            if procs is not None and not procs.closed and not procs.hung_up():
                return procs
            self.check_alive()
            if not self.launcher.procman:
                raise SandboxError("this sandbox has no process manager (its backend starts none)")
            self.channel.ask_procman()
            self.channel.await_procman(
                lambda: self.procs is not procs, time.monotonic() + PROCMAN_START_S
            )
            assert self.procs is not None
            return self.procs

    def new_procman(self, sock: socket.socket) -> None:
        """A process manager's channel, handed over by init when the host asked for one."""
        from .procs import ProcessManager

        if self.procs is not None:
            self.procs.close()
        self.procs = ProcessManager(sock, self.terminate, self.init_pid)
        self.procs.envs = dict(self._procs_envs)

    def spared(self, keep: tuple[int, ...]) -> Container[int]:
        """`keep` (init, a launcher's own processes), and the process manager's tree if there
        is one: a kernel's kill or interrupt spares them, as init does at a restart."""
        if self.procs is None or self.procs.closed:
            return keep
        return self.procs.spared(keep)

    def restart_kernel(self, deadline: float) -> None:
        """A fresh kernel from init, configured like the last; the sandbox ends if none
        comes (or if the whole sandbox died with the kernel: then the launcher says why)."""
        if self.channel.init_died:
            self.terminate(*self.launcher.ended_with_init())
            return
        try:
            self.channel.tell_init(RestartRequest(op="restart"))
            self.channel.await_kernel(deadline)
            for message in self._setup:
                self._request(message, max(deadline - time.monotonic(), 1.0))
        except (OSError, SandboxError) as exc:
            self.terminate(f"its kernel could not be restarted ({exc})")
            raise self._ended() from None

    def kill_kernel(self) -> None:
        """Kill the kernel and everything it started; init (PID 1) stays."""
        self.launcher.signal(signal.SIGKILL)

    def interrupt(self) -> None:
        """SIGINT to every process but init, like Ctrl-C to a terminal's foreground group."""
        self.launcher.signal(signal.SIGINT)

    # -- readings -----------------------------------------------------------------------

    def usage(self) -> Usage:
        """The host's readings; CPU counted from when the sandbox was handed out (its
        start-up, a cold import of the data stack on exec backends, is not the session's)."""
        usage = self.launcher.tree.usage()
        return dataclasses.replace(usage, cpu_s=max(0.0, usage.cpu_s - self._cpu_base))

    def reset_peak(self) -> None:
        self.launcher.tree.reset_peak()

    def memory_current(self) -> int | None:
        """Memory charged to the sandbox now (the host's reading), None where unknown."""
        return self.launcher.tree.memory_current()

    def workspace_full(self) -> bool:
        """Whether a memory-backed filesystem of the sandbox is full (the host's own statvfs
        on descriptors it opened when the sandbox started, before any code ran); once the
        sandbox is killed, what it was then."""
        return self._full_at_end if self._closed else self._mounts.full()

    def dead(self) -> bool:
        """Whether the sandbox died on its own (its init, or the channel to it, is gone)."""
        if self._dying or self._closed:
            return True
        if self.init_pidfd is not None:
            return bool(readable([self.init_pidfd], 0))
        return self.channel.hung_up()

    # -- ending -------------------------------------------------------------------------

    def terminate(self, reason: str, limit: KilledBy | None = None) -> None:
        """Kill every process of the sandbox now, from any thread, without waiting for a run
        in progress (it sees its kernel die and returns); kill() then releases the rest.
        `limit` names the limit that ended it ("cpu_limit"): a run in progress then returns
        it as a value (killed_by) instead of raising."""
        if self._dying:
            return
        with contextlib.suppress(OSError):
            self.last_usage = self.launcher.tree.usage()
        self.ended_because, self.ended_limit = reason, limit
        self._dying = True
        if self.init_pidfd is not None:  # PID 1 first: its namespace dies with it
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.launcher.kill_tree()
        with self._freeze_lock:  # a frozen process takes its SIGKILL once thawed
            frozen = self._freezing or self.paused_at is not None
        if frozen:  # paused, or being paused: never wait for a freeze to complete
            with contextlib.suppress(OSError):
                self.launcher.tree.thaw()

    def end(self, reason: str, limit: KilledBy | None = None) -> None:
        """Kill the sandbox for a reason that later calls will report."""
        self.terminate(reason, limit)
        self.kill()

    def kill(self) -> None:
        """Stop the whole tree (SIGKILL, never a freeze) and remove the cgroups. Idempotent."""
        if self._closed:
            return
        self.terminate(self.ended_because)
        self._closed = True
        dead = False
        if self.init_pidfd is not None:
            dead = bool(readable([self.init_pidfd], 5.0))
            os.close(self.init_pidfd)
        self.channel.close()
        if self.procs is not None:
            self.procs.close()
        with contextlib.suppress(OSError):
            self._full_at_end = self._mounts.full()
        self._mounts.close()
        try:
            self.launcher.release(dead)
        finally:
            self.launcher.tree.remove()
            for volume in self.volumes:  # its mount namespace is gone: the loop device frees
                volume.detach()
