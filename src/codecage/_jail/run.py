"""One execution: send the request, pump the kernel's events, enforce the deadline and the
CPU budget, recover (interrupt, then kill and restart), and account for the outcome from
the host's own readings (killed_by, limits_hit, peak memory). It talks to the sandbox
(sandbox.HostSandbox) and its channel (channel.Channel) through their public methods.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .._errors import SandboxNotFound, TransportError
from .._inside.messages import ExecuteRequest
from .._inside.protocol import Message
from .._models import Execution, ExecutionError, KilledBy, Result
from .cgroups import Usage, io_throttled
from .channel import POLL_S, RUN_EVENTS

if TYPE_CHECKING:
    from .sandbox import HostSandbox

EventCallback = Callable[[Message], None]
# Looks at a kernel that claimed the end of a run before the host sleeps between looks:
# the kernel is usually back on its channel within tens of microseconds.
END_SPINS = 50


class Run:
    """One execution: send the request, pump events, enforce the deadline and CPU budget."""

    def __init__(self, sandbox: HostSandbox, on_event: EventCallback | None) -> None:
        self.sbx = sandbox
        self.on_event = on_event
        self.ex = Execution()
        self.budget = sandbox.policy.output_bytes
        self.results_budget = sandbox.policy.results_bytes
        self.errors = 0  # error events of this run: the first is free, the rest budgeted
        self.dropped = (
            0  # bytes refused after a budget ran out: a sandbox that keeps sending is ended
        )
        self.channel = sandbox.channel
        self.id = self.channel.issue(run=True)
        self.ended = False
        self.claimed_end: Message | None = None  # an "end" frame the host has not yet checked
        self.death: Message | None = None  # init's report of how the kernel died
        self.limit: float | None = None
        self.mode = "session"

    def go(
        self, code: str, mode: str, limit: float | None, envs: dict[str, str], recover: bool
    ) -> Execution:
        sbx, policy = self.sbx, self.sbx.policy
        sbx.reset_peak()
        before = sbx.usage()
        started = time.monotonic()
        deadline = None if limit is None else started + limit
        self.limit, self.mode = limit, mode
        request = ExecuteRequest(
            op="execute",
            id=self.id,
            code=code,
            mode=mode,
            envs=envs,
            output_bytes=policy.output_bytes,
            results_bytes=policy.results_bytes,
        )
        self.channel.start_budget()  # the run's own (what came between runs included)
        outcome = "end"
        try:
            self.channel.send(request)
            outcome = self._pump(deadline, before)
            self._check_alive()
            if recover and outcome != "end":
                outcome = self._recover(outcome, before)
        except (SandboxNotFound, TransportError):
            if sbx.ended_limit is None and not self._ended_by_memory(before):
                raise  # a protocol violation, kill(): no run to report
        if sbx.dying and sbx.ended_limit is not None:
            # A limit ended the sandbox during the run (the CPU watchdog may see it before
            # the run does): it is this run's value; the next call on the sandbox raises.
            outcome = sbx.ended_limit
            self.ex.state_lost = True
            if recover:
                sbx.kill()
        self.ex.duration_ms = (time.monotonic() - started) * 1000
        after = sbx.usage() if sbx.alive else sbx.last_usage
        self._account(before, after, outcome)
        return self.ex

    def _ended_by_memory(self, before: Usage) -> bool:
        """Whether the whole sandbox (init, gVisor's sentry) died of its memory limit during
        the run, by the host's own OOM count: then it is this run's value, not an error."""
        sbx = self.sbx
        if sbx.dying:
            return False  # ended by the host for a reason of its own
        try:
            after = sbx.usage()
        except OSError:
            return False
        if after.oom_kills <= before.oom_kills:
            return False
        sbx.end("its memory limit was hit and the sandbox ended", "memory_limit")
        return True

    def _check_alive(self) -> None:
        if self.sbx.dying:  # killed from outside (kill(), the watchdog, a protocol error)
            raise SandboxNotFound(f"sandbox {self.sbx.id} has ended: {self.sbx.ended_because}")

    def _recover(self, outcome: str, before: Usage) -> str:
        """Keep the session usable: interrupt first, then kill and restart the kernel."""
        sbx = self.sbx
        grace = sbx.policy.interrupt_grace_s
        if outcome == "cpu_limit":  # the budget is for the whole session: it is over
            sbx.end(f"it used its cpu_s={sbx.policy.cpu_s} budget", "cpu_limit")
            self.ex.state_lost = True
            return outcome
        if outcome == "timeout" and grace > 0:
            sbx.interrupt()
            if self._pump(time.monotonic() + grace, before) == "end":
                return "timeout"  # interrupted; the session's state is intact
            self._check_alive()
        if outcome != "died":
            sbx.kill_kernel()
        sbx.restart_kernel(time.monotonic() + 30)
        self.ex.state_lost = True
        return outcome

    def _pump(self, deadline: float | None, before: Usage) -> str:
        """Returns how the run ended: "end", "timeout", "cpu_limit" or "died"."""
        channel = self.channel
        next_cpu_check = time.monotonic() + 0.25
        look = 0.0002  # how soon to look again at a kernel that claimed the end, after
        spins = 0  # the first END_SPINS looks, which only yield the processor
        while not self.ended:
            while not self.ended and (frame := channel.next_pending()) is not None:
                self._handle(frame)
            if self.claimed_end is not None and channel.kernel_waiting() is not False:
                self._accept_end(self.claimed_end)  # the code stopped: the host saw it
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return "timeout"
            if now >= next_cpu_check:
                next_cpu_check = now + 0.25
                if self._over_cpu():
                    return "cpu_limit"
            wait = POLL_S if deadline is None else min(POLL_S, deadline - now)
            if self.claimed_end is not None:  # look again soon: the kernel is on its way back
                if spins < END_SPINS:
                    spins += 1  # it is microseconds away: yield, do not sleep
                    os.sched_yield()
                    continue
                if look < 0.002:
                    time.sleep(look)  # below poll()'s millisecond
                    wait = 0
                else:
                    wait = min(wait, look)
                look = min(look * 2, POLL_S)
            from_kernel, from_init = channel.wait(wait)
            if from_kernel and not channel.receive() and not channel.pending and channel.eof():
                # The kernel is gone; init's report says how (a signal, an exit code).
                status = channel.wait_exit_event(time.monotonic() + 2.0)
                if status is not None:
                    self._died(status)
                return "died"
            if from_init and not channel.pending:
                status = channel.exit_event()
                if status is not None:
                    self._died(status)
                    return "died"
        return "end"

    def _over_cpu(self) -> bool:
        cap = self.sbx.policy.cpu_s
        return cap is not None and self.sbx.usage().cpu_s > cap

    def _handle(self, frame: Message) -> None:
        ev = frame.get("ev")
        if not self.channel.frame_is_for(frame, self.id, RUN_EVENTS):
            return  # an earlier run's (a thread still printing): never taken as ours
        if ev in ("stdout", "stderr"):
            kept = self._stream(ev, frame.get("text"))
            if kept is None:
                return
            frame = {**frame, "text": kept}  # callbacks get what the budget kept, no more
        elif ev == "result":
            if not self._result(frame.get("data"), bool(frame.get("is_main_result"))):
                return
        elif ev == "error":
            error = ExecutionError(
                str(frame.get("name", "Error")),
                str(frame.get("value", "")),
                str(frame.get("traceback", "")),
            )
            self.ex.error = error  # one object: the last one is the run's error
            self.errors += 1
            if self.errors > 1:  # a kernel sends one; more are paid from the output budget
                size = sum(len(x.encode("utf-8", "replace")) for x in vars(error).values())
                if size > self.budget:
                    self._drop(size)
                    return
                self.budget -= size
        elif ev == "end":
            # The kernel's word only: the run ends once the host sees the kernel's main thread
            # back on its channel (code in the cell's process can send an "end" too).
            self.claimed_end = frame
            return
        if self.on_event is not None:
            self.on_event(frame)

    def _accept_end(self, frame: Message) -> None:
        self.ended = True
        count, code = frame.get("execution_count"), frame.get("exit_code")
        self.ex.execution_count = count if isinstance(count, int) else None
        self.ex.exit_code = code if isinstance(code, int) else None
        if frame.get("truncated") is True:
            self.ex.truncated = True
        if self.on_event is not None:
            self.on_event(frame)

    def _stream(self, name: str, text: object) -> str | None:
        """Keep what fits in the output budget; returns the kept text, or None."""
        if not isinstance(text, str) or not text:
            return None
        data = text.encode("utf-8", "replace")
        if len(data) > self.budget:
            self._drop(len(data) - self.budget)
            data = data[: self.budget]
            text = data.decode("utf-8", "ignore")
        self.budget -= len(data)
        if not text:
            return None
        (self.ex.logs.stdout if name == "stdout" else self.ex.logs.stderr).append(text)
        return text

    def _result(self, data: object, is_main: bool) -> bool:
        """Keep a MIME bundle if it fits in the results budget."""
        if not isinstance(data, dict):
            return False
        size = sum(len(v) if isinstance(v, str) else len(json.dumps(v)) for v in data.values())
        if size > self.results_budget:
            self._drop(size)
            return False
        self.results_budget -= size
        self.ex.results.append(Result.from_bundle(data, is_main))
        return True

    def _drop(self, size: int) -> None:
        self.ex.truncated = True
        self.dropped += size
        policy = self.sbx.policy
        if self.dropped > 64 * (1 << 20) + 4 * (policy.output_bytes + policy.results_bytes):
            self.sbx.terminate("it kept sending output far beyond its budget")

    def _died(self, status: Message) -> None:
        self.death = status
        sig = status.get("signal")
        if isinstance(sig, int):
            self.ex.killed_by = "seccomp" if sig == signal.SIGSYS else "signal"
            self.ex.exit_code = 128 + sig
        elif isinstance(status.get("code"), int):
            self.ex.exit_code = status["code"]

    def _account(self, before: Usage, after: Usage, outcome: str) -> None:
        sbx, ex = self.sbx, self.ex
        killed: dict[str, KilledBy] = {
            "timeout": "timeout",
            "cpu_limit": "cpu_limit",
            "memory_limit": "memory_limit",
        }
        ex.killed_by = killed.get(outcome, ex.killed_by)
        if after.oom_kills > before.oom_kills:
            ex.limits_hit.append("memory_limit")
            if outcome == "died" or ex.killed_by == "signal":
                ex.killed_by = "memory_limit"
        if ex.killed_by is not None and ex.killed_by not in ex.limits_hit:
            ex.limits_hit.append(ex.killed_by)
        if after.pids_max_events > before.pids_max_events:
            ex.limits_hit.append("pids_limit")
        if sbx.workspace_full():
            ex.limits_hit.append("disk_quota")
        if io_throttled(sbx.policy, before, after, ex.duration_ms / 1000):
            ex.limits_hit.append("volume_io_limit")
        if ex.truncated:
            ex.limits_hit.append("output_limit")
        if after.memory_peak_bytes is not None:
            ex.peak_memory_mb = after.memory_peak_bytes / (1 << 20)
        if (
            ex.killed_by is not None
            and ex.exit_code is None
            and (self.mode == "main" or ex.state_lost)
        ):
            ex.exit_code = (
                128 + signal.SIGKILL
            )  # a process was killed; an interrupted cell has none
        if outcome == "died" and ex.killed_by is None and ex.exit_code is None:
            ex.killed_by = "signal"
        if ex.killed_by is not None and (ex.error is None or ex.state_lost):
            ex.error = self._kill_error(ex.killed_by)
        elif outcome == "died" and self.mode == "session":
            # The cell ended the interpreter itself (os._exit, a C library's exit()): the
            # state is gone, and that is an error the caller can read, not a quiet exit code.
            ex.error = self._kill_error("exited")

    def _kill_error(self, killed_by: str) -> ExecutionError:
        policy, ex = self.sbx.policy, self.ex
        what = {
            "timeout": ("TimeoutError", f"the run exceeded its time limit ({self.limit} s)"),
            "memory_limit": (
                "MemoryLimitExceeded",
                f"the code exceeded memory_mb={policy.memory_mb}",
            ),
            "cpu_limit": ("CpuLimitExceeded", f"the sandbox used its cpu_s={policy.cpu_s} budget"),
            "seccomp": (
                "SeccompViolation",
                "a forbidden system call (non-native ABI) killed the process",
            ),
            "signal": ("KernelDied", f"the kernel died: {self._how_died()}"),
            "exited": ("KernelDied", f"the kernel exited: {self._how_died()}"),
        }[killed_by]
        after = ""
        if ex.state_lost:
            after = "; the kernel was restarted and its variables are lost"
            if not self.sbx.alive:
                after = "; the sandbox has ended and its state is lost"
        return ExecutionError(what[0], what[1] + after, "")

    def _how_died(self) -> str:
        """How the kernel died, from init's report (exit code or signal)."""
        return how_died(self.death or {}, self.ex.exit_code)


def how_died(status: Message, exit_code: int | None = None) -> str:
    """How a kernel died, from init's report of its exit (an exit code or a signal)."""
    sig, code = status.get("signal"), status.get("code")
    if isinstance(sig, int):
        with contextlib.suppress(ValueError):
            return f"killed by signal {sig} ({signal.Signals(sig).name})"
        return f"killed by signal {sig}"
    if isinstance(code, int):
        return f"exit code {code}"
    return f"exit status {exit_code}"
