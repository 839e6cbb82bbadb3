"""The channel to one sandbox: init's supervisor socket and the current kernel's socket.

It frames and validates what the kernel sends (size caps, no lone surrogates, the channel
budget), issues the ids of runs and requests and decides which frames belong to one, sends
requests without ever blocking for ever, reads init's exit reports, and looks at
/proc/PID/syscall for the evidence that the kernel is back on its channel. It knows nothing
of runs: run.py and the sandbox (sandbox.py) drive it. Everything it reads is hostile input.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, Protocol

from .._errors import SandboxError, SandboxNotFound, TransportError
from .._inside.messages import StartProcmanRequest
from .._inside.protocol import FrameReader, Message, ProtocolError, encode
from .._models import KilledBy
from .._policy import Policy
from .._text import valid_deep
from .proctree import KernelWatch

POLL_S = 0.05

# The only events a kernel may send, by what the host asked. Anything else (an unknown
# event, or one the host itself emits, such as "pending_approval") is a protocol violation.
RUN_EVENTS = frozenset({"stdout", "stderr", "result", "error", "end"})
REPLY_EVENTS = frozenset({"done", "failed"})
KERNEL_EVENTS = RUN_EVENTS | REPLY_EVENTS


def channel_budget(policy: Policy) -> int:
    """Bytes a kernel may send on its channel per run or request, whatever the frames say:
    the policy's output and results budgets with room for framing and JSON escapes."""
    return (64 << 20) + 4 * (policy.output_bytes + policy.results_bytes)


def readable(
    files: list[socket.socket | int], timeout_s: float | None, events: int = select.POLLIN
) -> set[int]:
    """The descriptors ready for `events` (or hung up) within the timeout. poll, not select:
    a service with hundreds of sandboxes holds descriptors far above select's 1024."""
    poller = select.poll()
    for f in files:
        poller.register(f, events)
    ms = None if timeout_s is None else max(0, int(timeout_s * 1000))
    return {fd for fd, _ in poller.poll(ms)}


class UnreadRequest(TransportError):
    """The kernel's socket was reset before anything came back: the kernel ended with
    what the host sent still unread, so none of it ran (HostSandbox.execute runs a cell
    that met this once more, in a fresh kernel)."""


class Owner(Protocol):
    """What the channel needs of its sandbox: to end it on a violation, and why it ended."""

    id: str
    ended_because: str

    @property
    def dying(self) -> bool: ...

    def terminate(self, reason: str, limit: KilledBy | None = None) -> None: ...

    def new_procman(self, sock: socket.socket) -> None: ...


class Hooks(Protocol):
    """The launcher's part in the channel (launcher.Launcher has both)."""

    def handover(self, message: Message, fds: list[int]) -> list[int]: ...

    def init_hung_up(self) -> bool: ...


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class Channel:
    """The supervisor socket to init and the socket of init's current kernel generation."""

    def __init__(self, owner: Owner, policy: Policy, hooks: Hooks) -> None:
        self.owner, self.policy, self.hooks = owner, policy, hooks
        self.supervisor: socket.socket | None = None
        self.kernel: socket.socket | None = None
        self.init_pid: int | None = None
        self.generation = -1
        self.init_died = False  # the launcher turned init's hang-up into a kernel's exit
        self._reader = FrameReader()
        self._pending: deque[Message] = deque()
        self._received = 0  # bytes read from the kernel's channel in this run or request
        self._issued: deque[str] = deque(maxlen=256)  # ids sent to this kernel generation
        self._last_run: str | None = None  # the kernel's output between runs carries it
        # exit reports read by await_procman (init sends one per kernel generation)
        self._exits: deque[Message] = deque(maxlen=16)
        self._procman_asked = False
        self.watch = KernelWatch()  # the host's own look at the kernel, in /proc

    def attach(self, supervisor: socket.socket, init_pid: int | None) -> None:
        self.supervisor, self.init_pid = supervisor, init_pid

    @property
    def _sup(self) -> socket.socket:
        assert self.supervisor is not None
        return self.supervisor

    def _ended(self) -> NoReturn:
        raise SandboxNotFound(f"sandbox {self.owner.id} has ended: {self.owner.ended_because}")

    def violation(self, reason: str) -> NoReturn:
        """End the sandbox for what its kernel did, and raise that it has ended."""
        self.owner.terminate(reason)
        self._ended()

    # -- supervisor channel -------------------------------------------------------------

    def supervisor_message(self) -> tuple[Message, list[int]]:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self._sup, 65536, 1)
        except ConnectionError:  # reset: the other end is gone, as at end of file
            data, fds = b"", []
        if not data:
            _close(fds)
            if self.owner.dying:  # we killed it: say why, not how the channel looked
                self._ended()
            if not self.init_died and self.hooks.init_hung_up():
                # The whole sandbox died with its kernel (gVisor's sentry): reported once as
                # the kernel's death, so the run ends as a value.
                self.init_died = True
                return {"ev": "exit", "generation": self.generation, "signal": 9, "code": None}, []
            raise TransportError("the sandbox's init exited")
        try:
            message = json.loads(data)
            if not isinstance(message, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError) as exc:
            _close(fds)
            self.owner.terminate("its init sent a malformed message")
            raise TransportError(
                f"bad message from the sandbox's init: {type(exc).__name__}"
            ) from None
        fds = self.hooks.handover(message, fds)
        if message.get("ev") == "procman":  # whoever reads it hands it on, if it was asked
            if self._procman_asked and len(fds) == 1:
                self._procman_asked = False
                self.owner.new_procman(socket.socket(fileno=fds[0]))
                return message, []
            _close(fds)  # one nobody asked for is never taken
            return message, []
        return message, fds

    def ask_procman(self) -> None:
        """Ask init for a process manager; the next one it hands over is taken, no other."""
        self._procman_asked = True
        self.tell_init(StartProcmanRequest(op="start_procman"))

    def await_procman(self, started: Callable[[], bool], deadline: float) -> None:
        """Read init's messages until the process manager asked for is handed over (any
        reader of the channel hands it on: `started` says when it has been); an exit
        report read meanwhile is kept for the run or request that waits for it."""
        while not started():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError("the sandbox's init did not start its process manager")
            if not readable([self._sup], min(left, POLL_S)):
                continue
            try:
                message, fds = self.supervisor_message()
            except BlockingIOError:
                continue  # another reader took it
            _close(fds)
            if message.get("ev") == "exit":
                self._exits.append(message)

    def tell_init(self, request: Mapping[str, Any]) -> None:
        """A request to init (restart, signal) on the supervisor channel."""
        self._sup.send(json.dumps(request).encode())

    def _init_ready(self, timeout_s: float) -> bool:
        """Whether init's report is there: kept by await_procman, or waiting on the channel."""
        return bool(self._exits) or bool(readable([self._sup], timeout_s))

    def exit_event(self) -> Message | None:
        """A kernel-exit report from init, if one is waiting."""
        if self._exits:
            return self._exits.popleft()
        try:
            message, fds = self.supervisor_message()
        except BlockingIOError:
            return None
        _close(fds)
        return message if message.get("ev") == "exit" else None

    def wait_exit_event(self, deadline: float) -> Message | None:
        """Wait for init's report that the kernel ended."""
        while time.monotonic() < deadline:
            if self._init_ready(deadline - time.monotonic()):
                status = self.exit_event()
                if status is not None:
                    return status
        return None

    def kernel_exited(self) -> Message | None:
        """init's report that the current kernel exited, if it did (between runs: nothing
        waits on the channel then); None while it lives. Waits for the report only when the
        kernel's channel has hung up and it is not there yet."""
        for _ in range(64):  # init's messages waiting (others are handed over as they come)
            if not self._init_ready(0):
                break
            status = self.exit_event()
            if status is not None and status.get("generation") == self.generation:
                return status
        if self.kernel is not None and readable([self.kernel], 0, 0):  # hung up, no report yet
            return self.wait_exit_event(time.monotonic() + 2.0)
        return None

    def hung_up(self) -> bool:
        """Whether the supervisor channel hung up or failed (events 0: nothing else)."""
        return bool(readable([self._sup], 0, 0))

    # -- a kernel generation ------------------------------------------------------------

    def await_kernel(self, deadline: float) -> None:
        """Wait for init to hand over a new kernel's channel, then for the kernel's hello."""
        self._sup.settimeout(max(0.001, deadline - time.monotonic()))
        while True:
            message, fds = self.supervisor_message()
            if message.get("ev") == "error":
                raise SandboxError(f"sandbox set-up failed: {message.get('message')}")
            if message.get("ev") == "kernel" and len(fds) == 1:
                break
            if message.get("ev") == "procman":  # handed on by supervisor_message
                continue
            _close(fds)
        self._sup.setblocking(False)
        if self.kernel is not None:
            self.kernel.close()
        self.kernel = socket.socket(fileno=fds[0])
        self.kernel.setblocking(False)
        self._reader, self._pending = FrameReader(), deque()
        self._received = 0
        self._issued.clear()
        self._last_run = None
        self.generation = int(message.get("generation", 0))
        hello = self._next_frame(deadline)
        if hello is None or hello.get("ev") != "hello":
            raise TransportError(f"the kernel did not greet: {hello!r}")
        self.watch.find(self.init_pid, hello.get("pid"), hello.get("fd"))
        # The host's reading must work here, or every run would wait for an end it never
        # accepts: the fresh kernel goes to read its first request right after its hello.
        # Only a reading that does not work (or a kernel never seen back on its channel
        # before the start's deadline) makes the end a claim; a slow one, on a loaded host,
        # is waited for (it gave up after 5 s once, and a forged end was then taken).
        look = 0.0005
        while self.watch.waiting() is False:
            if time.monotonic() >= deadline or not self.watch.readable():
                self.watch.stop()  # cannot look: the end is a claim
                break
            time.sleep(look)
            look = min(look * 2, POLL_S)

    def kernel_waiting(self) -> bool | None:
        """Whether the kernel is blocked reading its channel (proctree.KernelWatch): the
        host's evidence that a run's code stopped; None where the host cannot look."""
        return self.watch.waiting()

    # -- ids ----------------------------------------------------------------------------

    def issue(self, run: bool = False) -> str:
        """A fresh id for a run (`run`: the kernel's output between runs carries the last
        run's) or a request; frames with ids never issued are violations."""
        rid = secrets.token_hex(8)
        self._issued.append(rid)
        if run:
            self._last_run = rid
        return rid

    def start_budget(self) -> None:
        """A run's or request's own channel budget (what came between runs included)."""
        self._received = 0

    def frame_is_for(self, frame: Message, own: str, allowed: frozenset[str]) -> bool:
        """Whether `frame` belongs to the run or request `own` (then its event must be one
        of `allowed`); False for a frame of an earlier one of this kernel (or of none yet:
        output between runs), which is dropped. Anything else ends the sandbox."""
        fid, ev = frame.get("id"), frame.get("ev")
        if fid == own:
            if ev in allowed:
                return True
            why = f"an event {str(ev)[:40]!r} the host never takes from a kernel"
        elif fid is None or fid == self._last_run or (isinstance(fid, str) and fid in self._issued):
            if ev in KERNEL_EVENTS:
                return False
            why = f"an event {str(ev)[:40]!r} the host never takes from a kernel"
        else:
            why = "a frame for no run or request of the host's"
        self.violation(f"its kernel broke the protocol ({why})")

    # -- frames -------------------------------------------------------------------------

    def next_pending(self) -> Message | None:
        """The oldest frame read and not yet handled, if any."""
        return self._pending.popleft() if self._pending else None

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def _next_frame(self, deadline: float) -> Message | None:
        assert self.kernel is not None
        while not self._pending:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return None
            if readable([self.kernel], timeout) and not self.receive() and self.eof():
                raise TransportError("the kernel exited before it greeted")
        return self._pending.popleft()

    def wait(self, timeout_s: float) -> tuple[bool, bool]:
        """Wait until the kernel or init has something: (kernel readable, init readable)."""
        assert self.kernel is not None
        ready = readable([self.kernel, self._sup], 0 if self._exits else timeout_s)
        return self.kernel.fileno() in ready, bool(self._exits) or self._sup.fileno() in ready

    def eof(self) -> bool:
        assert self.kernel is not None
        try:
            return self.kernel.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def receive(self) -> int:
        """Read what the kernel sent and queue its frames; how many came."""
        assert self.kernel is not None
        try:
            data = self.kernel.recv(1 << 18)
        except BlockingIOError:
            return 0
        except ConnectionResetError as exc:  # it closed with what was sent still unread
            error = UnreadRequest if self._received == 0 else TransportError
            raise error(f"kernel channel: {exc}") from None
        except OSError as exc:
            raise TransportError(f"kernel channel: {exc}") from None
        if not data:
            return 0
        self._received += len(data)  # every byte counts, whatever frame it belongs to
        if self._received > channel_budget(self.policy):
            self.violation("its kernel sent far beyond its budget on its control channel")
        try:
            frames = [valid_deep(m) for m in self._reader.feed(data)]  # no lone surrogates
        except ProtocolError as exc:
            self.owner.terminate("its control stream was malformed")
            raise TransportError(f"malformed frame from the sandbox: {exc}") from None
        self._pending.extend(frames)
        return len(frames)

    def send(self, message: Mapping[str, Any], timeout_s: float = 30.0) -> None:
        """Send a request; a kernel that stops reading cannot block the host for ever."""
        assert self.kernel is not None
        data = memoryview(encode(message))
        deadline = time.monotonic() + timeout_s
        while data:
            if self.owner.dying:
                self._ended()
            wait = min(POLL_S * 4, deadline - time.monotonic())
            if not readable([self.kernel], wait, select.POLLOUT):
                if time.monotonic() >= deadline:
                    self.owner.terminate("its kernel stopped reading requests")
                    raise TransportError(
                        "the kernel stopped reading requests; the sandbox was ended"
                    )
                continue
            try:
                sent = self.kernel.send(data)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise TransportError(f"kernel channel: {exc}") from None
            data = data[sent:]

    def close(self) -> None:
        if self.supervisor is not None:
            self.supervisor.close()
        if self.kernel is not None:
            self.kernel.close()
        self.watch.stop()
