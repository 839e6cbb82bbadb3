"""The host side of every backend: one implementation of the kernel protocol.

`HostSandbox` owns what is the same whatever isolates the sandbox: the supervisor channel
(init hands over each kernel generation's socket with SCM_RIGHTS), frame validation, output
budgets, deadlines, the CPU budget, interrupt/kill/restart recovery, and file and command
requests. A backend subclasses it and fills in a small seam (see docs/backends-internals.md):

    _launch(envs)     start the sandbox's init; return its supervisor socket, pidfd and pid
    _release(dead)    free what the backend holds once the tree is dead (uid, template, dirs)
    cgroups           the Tree: limits, the host's own readings, signalling every process
    workspace_full()  the host's own statvfs of the sandbox's memory-backed filesystems

Everything read from a sandbox is untrusted: frames are size-capped and validated, and
outcomes (killed_by, limits_hit, peak memory, duration) come from the host's own timer
and cgroup readings, never from the kernel's word.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import resource
import secrets
import select
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .._errors import (
    ExecutionTimeout,
    PolicyError,
    SandboxError,
    SandboxNotFound,
    TransportError,
)
from .._inside.messages import (
    ExecuteRequest,
    GuardRequest,
    PrefaultRequest,
    ReplyRequest,
    RestartRequest,
    SetenvRequest,
)
from .._inside.protocol import FrameReader, Message, ProtocolError, encode
from .._models import Execution, ExecutionError, KilledBy, Result
from .._policy import Policy
from .._text import valid_deep
from . import features
from .cgroups import Usage

if TYPE_CHECKING:
    from .pool import Pool
    from .procs import ProcessManager
    from .template import Runtime

EventCallback = Callable[[Message], None]
POLL_S = 0.05
# Looks at a kernel that claimed the end of a run before the host sleeps between looks:
# the kernel is usually back on its channel within tens of microseconds.
END_SPINS = 50

# The only events a kernel may send, by what the host asked. Anything else (an unknown
# event, or one the host itself emits, such as "pending_approval") is a protocol violation.
RUN_EVENTS = frozenset({"stdout", "stderr", "result", "error", "end"})
REPLY_EVENTS = frozenset({"done", "failed"})
KERNEL_EVENTS = RUN_EVENTS | REPLY_EVENTS

# System calls in which a kernel waiting for its next request blocks on its channel
# (Channel.recv: a blocking recv, which glibc issues as recvfrom), by machine.
_WAITING_SYSCALLS = {
    "x86_64": frozenset({0, 19, 45, 47}),  # read, readv, recvfrom, recvmsg
    "aarch64": frozenset({63, 65, 207, 212}),
}.get(platform.machine())


def channel_budget(policy: Policy) -> int:
    """Bytes a kernel may send on its channel per run or request, whatever the frames say:
    the policy's output and results budgets with room for framing and JSON escapes."""
    return (64 << 20) + 4 * (policy.output_bytes + policy.results_bytes)


UID_BASE, UID_SPAN = 1 << 20, (1 << 31) - (1 << 21)


@dataclass
class _Uids:
    lock: threading.Lock = field(default_factory=threading.Lock)
    used: set[int] = field(default_factory=set)

    def take(self) -> int:
        with self.lock:
            while True:
                uid = UID_BASE + secrets.randbelow(UID_SPAN)
                if uid not in self.used:
                    self.used.add(uid)
                    return uid

    def give_back(self, uid: int) -> None:
        with self.lock:
            self.used.discard(uid)


uids = _Uids()  # one pool of host uids for every backend of this process


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


_readable = readable


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


def raise_nofile() -> None:
    """Each sandbox holds about a dozen descriptors here: use all the host allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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


class Launched(NamedTuple):
    """What `_launch` returns: the supervisor channel to init, a pidfd on init (None where
    init is not a host process; then the channel's hang-up says it died), init's host pid
    (None likewise)."""

    supervisor: socket.socket
    init_pidfd: int | None
    init_pid: int | None


def environment(runtime: Runtime, policy: Policy, envs: dict[str, str]) -> dict[str, str]:
    """A sandbox's environment, for every backend: the runtime's, the paths inside the jail,
    the host variables the policy names, then the sandbox's own."""
    env = runtime.base_env() | {
        "HOME": "/home/user",
        "MPLCONFIGDIR": "/home/user/.config/matplotlib",
        "IPYTHONDIR": "/home/user/.ipython",
        "TMPDIR": "/tmp",
        "PYTHONUNBUFFERED": "1",
    }
    env |= {k: os.environ[k] for k in policy.env_allowlist if k in os.environ}
    return {**env, **envs}


def rlimits(policy: Policy) -> dict[str, int]:
    """The rlimits every backend's init sets."""
    return {
        "nofile": policy.open_files_max,
        "core": 0,
        "stack": 8 << 20,
        "fsize": max(policy.disk_mb, policy.tmp_mb, policy.shm_mb) << 20,
    }


def import_guard(policy: Policy) -> GuardRequest | None:
    """The kernel request that puts the policy's module rules in place, if it has any."""
    if policy.modules_allow is None and not policy.modules_deny:
        return None
    allow = policy.modules_allow
    return GuardRequest(
        op="guard",
        modules_allow=None if allow is None else list(allow),
        modules_deny=list(policy.modules_deny),
    )


class HostJail:
    """A backend: checks policies against what it enforces, creates sandboxes (from a warm
    pool of that policy when one is running), keeps the pools. Subclasses set `name`,
    `enforces` (and `why`, the reason for each feature they lack) and implement `spawn`."""

    name: str = ""
    enforces: frozenset[str] = features.ALL
    why: dict[str, str] = {}
    pools: tuple[Pool, ...] = ()  # replaced whole under _pools_lock, read without it
    renewals = 0  # template renewals so far (a pool drops forks of a renewed template)
    _pools_lock = threading.Lock()

    def check(self, policy: Policy) -> None:
        features.check(self.name, self.enforces, policy, self.why)

    def spawn(self, policy: Policy, envs: dict[str, str]) -> HostSandbox:
        """Start a sandbox cold (the pool calls this too)."""
        raise NotImplementedError

    def create(self, policy: Policy, envs: dict[str, str] | None = None) -> HostSandbox:
        self.check(policy)
        pool = self.pool_for(policy)
        pooled = pool.take(policy) if pool is not None else None
        if pooled is not None and envs:
            pooled.set_envs(envs)
        sandbox = pooled or self.spawn(policy, envs or {})
        guard = import_guard(policy)
        if guard is not None:
            try:
                sandbox.setup(guard)
            except BaseException:
                sandbox.kill()
                raise
        return sandbox

    def pool_for(self, policy: Policy) -> Pool | None:
        """The running pool that serves exactly this policy, if any."""
        return next((p for p in self.pools if p.policy == policy), None)

    def start_pool(
        self,
        size: int,
        policy: Policy,
        refill_per_s: float = 50.0,
        template_max_age_s: float = 3600.0,
    ) -> Pool:
        """Keep `size` sandboxes of `policy` started, prefaulted and waiting. One pool per
        policy: a second for the same policy is refused (stop the first)."""
        from .pool import Pool

        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise PolicyError(f"a pool's size must be an integer of at least 1, not {size!r}")
        self.check(policy)
        with self._pools_lock:
            if self.pool_for(policy) is not None:
                raise SandboxError(
                    f"a warm pool for this policy is already running on backend {self.name!r}:"
                    " stop it first (Pool.stop() or codecage.stop_pool(policy))"
                )
            pool = Pool(self, size, policy, refill_per_s, template_max_age_s)
            self.pools = (*self.pools, pool)
        return pool

    def forget_pool(self, pool: Pool) -> None:
        """A stopped pool serves no more creates."""
        with self._pools_lock:
            self.pools = tuple(p for p in self.pools if p is not pool)

    def renew_if_older(self, max_age_s: float) -> bool:
        """Re-execute whatever sandboxes are forked from, if older than `max_age_s`; True
        if it did (every pool then replaces its waiting sandboxes). Nothing to renew here."""
        return False

    def close(self) -> None:
        for pool in self.pools:
            pool.stop()


class HostSandbox:
    """One live sandbox: its tree, its init (PID 1) and the current kernel's channel.
    A subclass's __init__ calls super().__init__, sets `self.cgroups`, then `_start()`."""

    cgroups: Tree

    def __init__(self, policy: Policy) -> None:
        self.id = secrets.token_hex(16)
        self.policy = policy
        self._closed = False
        self._dying = False
        self._mount_fds: list[int] = []
        self.ended_because = "it was killed"
        self.last_usage = Usage(0, 0, 0, 0.0)
        self.generation = -1
        self.init_pid: int | None = None
        self._init_pidfd: int | None = None
        self._supervisor: socket.socket | None = None
        self._kernel: socket.socket | None = None
        self._reader = FrameReader()
        self._pending: list[Message] = []
        self._setup: list[ReplyRequest] = []
        self._cpu_base = 0.0
        self.ended_limit: str | None = None  # the limit that ended it ("cpu_limit"), if one did
        self._full_at_end = False
        self._received = 0  # bytes read from the kernel's channel in this run or request
        self._issued: deque[str] = deque(maxlen=256)  # ids sent to this kernel generation
        self._last_run: str | None = None  # the kernel's output between runs carries it
        self._kernel_pid: int | None = None  # the kernel's host pid, where the host can look
        self._kernel_fd: int | None = None  # its channel's descriptor number inside
        # /proc/PID/syscall of that kernel, kept open: a pread is cheaper than an open, and a
        # descriptor names the process itself, never a later one given the same pid.
        self._syscall_fd: int | None = None
        self.procs: ProcessManager | None = None  # background processes (procs.py)

    @property
    def _channel(self) -> socket.socket:
        assert self._supervisor is not None
        return self._supervisor

    # -- the seam: what each backend provides -------------------------------------------

    def _launch(self, envs: dict[str, str]) -> Launched:
        """Start the sandbox's init, already confined and charged to `self.cgroups`."""
        raise NotImplementedError

    def _release(self, init_dead: bool) -> None:
        """Free what the backend holds for this sandbox (and reap what it must): its processes
        were killed (init confirmed dead if `init_dead`). Called once, from kill(), before
        the tree is removed."""

    def _tree_policy(self) -> Policy:
        """The limits the tree is created with: the policy's, unless the backend's own
        processes share the tree and must not eat into them."""
        return self.policy

    def _kill_tree(self) -> None:
        """SIGKILL every process of the sandbox (terminate() then also kills init by pidfd)."""
        self.cgroups.kill()

    def _start(self, envs: dict[str, str], timeout_s: float = 30.0) -> None:
        """Create the tree, launch init and wait for the first kernel: the subclass's
        __init__ calls it last. On any failure everything started is killed."""
        try:
            self.cgroups.create(self._tree_policy())
            self._supervisor, self._init_pidfd, self.init_pid = self._launch(envs)
            self._await_kernel(time.monotonic() + timeout_s)
            self._open_mounts()
            self._cpu_base = self.cgroups.usage().cpu_s  # start-up is not the session's
        except OSError as exc:  # e.g. init died before it could report why
            self.kill()
            why = self._diagnostics()
            raise SandboxError(
                f"sandbox set-up failed: {exc}" + (f": {why}" if why else "")
            ) from None
        except BaseException:
            self.kill()
            raise

    def _diagnostics(self) -> str:
        """What the launcher said when a start failed (after kill()), for the error."""
        return ""

    # -- supervisor channel -------------------------------------------------------------

    def _supervisor_message(self) -> tuple[Message, list[int]]:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self._channel, 65536, 1)
        except ConnectionError:  # reset: the other end is gone, as at end of file
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            if self._dying:  # we killed it: say why, not how the channel looked
                raise SandboxNotFound(f"sandbox {self.id} has ended: {self.ended_because}")
            raise TransportError("the sandbox's init exited")
        try:
            message = json.loads(data)
            if not isinstance(message, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError) as exc:
            for fd in fds:
                os.close(fd)
            self.terminate("its init sent a malformed message")
            raise TransportError(
                f"bad message from the sandbox's init: {type(exc).__name__}"
            ) from None
        return message, fds

    def _await_kernel(self, deadline: float) -> None:
        """Wait for init to hand over a new kernel's channel, then for the kernel's hello."""
        self._channel.settimeout(max(0.001, deadline - time.monotonic()))
        while True:
            message, fds = self._supervisor_message()
            if message.get("ev") == "error":
                raise SandboxError(f"sandbox set-up failed: {message.get('message')}")
            if message.get("ev") == "kernel" and len(fds) == 1:
                break
            if message.get("ev") == "procman" and len(fds) == 1:  # before a kernel
                self._new_procman(socket.socket(fileno=fds[0]))
                continue
            for fd in fds:
                os.close(fd)
        self._channel.setblocking(False)
        if self._kernel is not None:
            self._kernel.close()
        self._kernel = socket.socket(fileno=fds[0])
        self._kernel.setblocking(False)
        self._reader, self._pending = FrameReader(), []
        self._received = 0
        self._issued.clear()
        self._last_run = None
        self.generation = int(message.get("generation", 0))
        hello = self._next_frame(deadline)
        if hello is None or hello.get("ev") != "hello":
            raise TransportError(f"the kernel did not greet: {hello!r}")
        self._kernel_pid, self._kernel_fd = self._find_kernel(hello.get("pid"), hello.get("fd"))
        self._watch_kernel()
        # The host's reading must work here, or every run would wait for an end it never
        # accepts: the fresh kernel goes to read its first request right after its hello.
        look, until = 0.0005, min(deadline, time.monotonic() + 5)
        while self.kernel_waiting() is False:
            if time.monotonic() >= until:
                self._kernel_pid = self._kernel_fd = None  # cannot look: the end is a claim
                self._watch_kernel()
                break
            time.sleep(look)
            look = min(look * 2, POLL_S)

    def _new_procman(self, sock: socket.socket) -> None:
        """A (new) process manager's channel: init starts one with the sandbox, and again
        at a kernel restart if code inside killed the last one."""
        from .procs import ProcessManager

        envs = {}
        if self.procs is not None:
            envs = self.procs.envs
            self.procs.close()
        self.procs = ProcessManager(sock, self.terminate, self.init_pid)
        self.procs.envs = envs

    def _find_kernel(self, ns_pid: object, fd: object) -> tuple[int | None, int | None]:
        """The kernel's host pid and channel descriptor, for `kernel_waiting`. The hello is
        sent before any code of this kernel generation ran; the host checks it against
        /proc: a child of init whose innermost pid is `ns_pid`, holding a socket at `fd`.
        (None, None) where the host cannot look (init is not a host process: gVisor)."""
        if self.init_pid is None or _WAITING_SYSCALLS is None:
            return None, None
        if not isinstance(ns_pid, int) or not isinstance(fd, int) or fd < 0:
            return None, None
        todo, looked = [self.init_pid], 0
        while todo and looked < 64:
            pid, looked = todo.pop(0), looked + 1
            for child in _children(pid):
                if _nspid(child) == ns_pid:
                    try:
                        if not os.readlink(f"/proc/{child}/fd/{fd}").startswith("socket:"):
                            return None, None
                        with open(f"/proc/{child}/syscall") as f:
                            f.read()
                    except OSError:
                        return None, None
                    return child, fd
                todo.append(child)
        return None, None

    def _watch_kernel(self) -> None:
        """Open (or drop) the kernel's /proc/PID/syscall for `kernel_waiting`."""
        if self._syscall_fd is not None:
            os.close(self._syscall_fd)
            self._syscall_fd = None
        if self._kernel_pid is not None:
            try:
                self._syscall_fd = os.open(f"/proc/{self._kernel_pid}/syscall", os.O_RDONLY)
            except OSError:
                self._kernel_pid = self._kernel_fd = None  # gone already: nothing to look at

    def kernel_waiting(self) -> bool | None:
        """Whether the kernel's main thread is blocked reading its channel (the host's own
        reading of /proc/PID/syscall): the evidence that a run's code stopped. None where
        the host cannot look, and then a run's end is the sandbox's claim."""
        if self._syscall_fd is None or _WAITING_SYSCALLS is None:
            return None
        try:
            fields = os.pread(self._syscall_fd, 256, 0).split()
            nr, first = int(fields[0]), int(fields[1], 16)
        except (OSError, ValueError, IndexError):  # "running", or gone
            return False
        return nr in _WAITING_SYSCALLS and first == self._kernel_fd

    def _issue(self) -> str:
        """A fresh id for a run or request; frames with ids never issued are violations."""
        rid = secrets.token_hex(8)
        self._issued.append(rid)
        return rid

    def _frame_is_for(self, frame: Message, own: str, allowed: frozenset[str]) -> bool:
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
        self.terminate(f"its kernel broke the protocol ({why})")
        raise SandboxNotFound(f"sandbox {self.id} has ended: {self.ended_because}")

    def _next_frame(self, deadline: float) -> Message | None:
        assert self._kernel is not None
        while not self._pending:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return None
            if _readable([self._kernel], timeout):
                frames = self._read_kernel()
                if not frames and self._eof():
                    raise TransportError("the kernel exited before it greeted")
                self._pending.extend(frames)
        return self._pending.pop(0)

    def _eof(self) -> bool:
        assert self._kernel is not None
        try:
            return self._kernel.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _read_kernel(self) -> list[Message]:
        assert self._kernel is not None
        try:
            data = self._kernel.recv(1 << 18)
        except BlockingIOError:
            return []
        except OSError as exc:
            raise TransportError(f"kernel channel: {exc}") from None
        if not data:
            return []
        self._received += len(data)  # every byte counts, whatever frame it belongs to
        if self._received > channel_budget(self.policy):
            self.terminate("its kernel sent far beyond its budget on its control channel")
            raise SandboxNotFound(f"sandbox {self.id} has ended: {self.ended_because}")
        try:
            return [valid_deep(m) for m in self._reader.feed(data)]  # no lone surrogates
        except ProtocolError as exc:
            self.terminate("its control stream was malformed")
            raise TransportError(f"malformed frame from the sandbox: {exc}") from None

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
        if self._closed or self._dying:
            raise SandboxNotFound(f"sandbox {self.id} has ended: {self.ended_because}")
        run = _Run(self, on_event)
        limit = self.policy.timeout_s
        if timeout_s is not None:
            limit = timeout_s if limit is None else min(limit, timeout_s)
        return run.go(code, mode, limit, envs or {}, recover)

    def request(
        self, message: ReplyRequest | Mapping[str, Any], timeout_s: float | None
    ) -> Message:
        """Send a file or command request and wait for its reply ("done" or "failed").

        If the kernel dies meanwhile it is restarted and TransportError is raised; past the
        deadline the kernel is interrupted, then killed and restarted."""
        if self._closed or self._dying:
            raise SandboxNotFound(f"sandbox {self.id} has ended: {self.ended_because}")
        message = {**message, "id": self._issue()}  # sent as built, with a fresh id
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._received = 0  # the request's own channel budget
        self.send(message)
        while True:
            while self._pending:
                frame = self._pending.pop(0)
                # a prefault runs a cell under the request's id: its run events are dropped
                if (
                    self._frame_is_for(frame, message["id"], KERNEL_EVENTS)
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
            assert self._kernel is not None
            ready = _readable([self._kernel, self._channel], wait)
            if self._kernel.fileno() in ready:
                self._pending.extend(self._read_kernel())
            if self._channel.fileno() in ready and not self._pending:
                status = self._exit_event()
                if status is not None:
                    self.restart_kernel(time.monotonic() + 30)
                    raise TransportError(
                        f"the kernel died during {message.get('op')} ({status}); it was restarted"
                    )

    def wait_exit_event(self, deadline: float) -> Message | None:
        """Wait for init's report that the kernel ended."""
        while time.monotonic() < deadline:
            if _readable([self._channel], deadline - time.monotonic()):
                status = self._exit_event()
                if status is not None:
                    return status
        return None

    def _exit_event(self) -> Message | None:
        """A kernel-exit report from init, if one is waiting."""
        try:
            message, fds = self._supervisor_message()
        except BlockingIOError:
            return None
        for fd in fds:
            os.close(fd)
        return message if message.get("ev") == "exit" else None

    def prefault(self) -> None:
        """The pool's first, uncounted cell: not the session's CPU either."""
        self.request(PrefaultRequest(op="prefault"), 30)
        self._cpu_base = self.cgroups.usage().cpu_s

    def set_envs(self, envs: dict[str, str]) -> None:
        """A pooled sandbox's own environment, set when it is handed out (no code ran yet)."""
        self.setup(SetenvRequest(op="setenv", envs=envs))
        if self.procs is not None:
            self.procs.envs.update(envs)

    def setup(self, message: ReplyRequest) -> None:
        """A request that configures the session (environment, import guard): sent now, and
        again to every kernel a restart brings, before any code runs there."""
        self.request(message, 30)
        self._setup.append(message)

    def dead(self) -> bool:
        """Whether the sandbox died on its own (its init, or the channel to it, is gone)."""
        if self._dying or self._closed:
            return True
        if self._init_pidfd is not None:
            return bool(_readable([self._init_pidfd], 0))
        return bool(_readable([self._channel], 0, 0))  # events 0: hang-up or error only

    def restart_kernel(self, deadline: float) -> None:
        try:
            self._channel.send(json.dumps(RestartRequest(op="restart")).encode())
            self._channel.setblocking(True)
            self._await_kernel(deadline)
            for message in self._setup:
                self.request(message, max(deadline - time.monotonic(), 1.0))
        except (OSError, SandboxError) as exc:
            self.terminate(f"its kernel could not be restarted ({exc})")
            raise SandboxNotFound(f"sandbox {self.id} has ended: {self.ended_because}") from None

    def kill_kernel(self) -> None:
        """Kill the kernel and everything it started; init (PID 1) stays. A backend whose
        init is not a host process overrides this and interrupt(). The process manager's
        tree (background processes) is spared, as init spares it at the restart."""
        self.cgroups.kill(spare=self._spared())

    def interrupt(self) -> None:
        """SIGINT to every process but init (and the process manager's tree), like Ctrl-C
        to a terminal's foreground group."""
        self.cgroups.kill(spare=self._spared(), sig=signal.SIGINT)

    def _spared(self) -> Container[int]:
        return self._with_procman(() if self.init_pid is None else (self.init_pid,))

    def _with_procman(self, keep: tuple[int, ...]) -> Container[int]:
        """`keep`, and the process manager's tree if there is one."""
        if self.procs is None or self.procs.closed:
            return keep
        return self.procs.spared(keep)

    def send(self, message: Mapping[str, Any], timeout_s: float = 30.0) -> None:
        """Send a request; a kernel that stops reading cannot block the host for ever."""
        assert self._kernel is not None
        data = memoryview(encode(message))
        deadline = time.monotonic() + timeout_s
        while data:
            if self._dying:
                raise SandboxNotFound(f"sandbox {self.id} has ended: {self.ended_because}")
            wait = min(POLL_S * 4, deadline - time.monotonic())
            if not _readable([self._kernel], wait, select.POLLOUT):
                if time.monotonic() >= deadline:
                    self.terminate("its kernel stopped reading requests")
                    raise TransportError(
                        "the kernel stopped reading requests; the sandbox was ended"
                    )
                continue
            try:
                sent = self._kernel.send(data)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise TransportError(f"kernel channel: {exc}") from None
            data = data[sent:]

    def usage(self) -> Usage:
        """The host's readings; CPU counted from when the sandbox was handed out (its
        start-up, a cold import of the data stack on exec backends, is not the session's)."""
        usage = self.cgroups.usage()
        return dataclasses.replace(usage, cpu_s=max(0.0, usage.cpu_s - self._cpu_base))

    def workspace_full(self) -> bool:
        """Whether a memory-backed filesystem of the sandbox is full (the host's own statvfs
        on descriptors it opened when the sandbox started, before any code ran); once the
        sandbox is killed, what it was then."""
        return self._full_at_end if self._closed else self._mounts_full()

    def _mounts_full(self) -> bool:
        for fd in self._mount_fds:
            st = os.fstatvfs(fd)
            if st.f_bavail * st.f_frsize < 64 * 1024:
                return True
        return False

    def _open_mounts(self) -> None:
        """Descriptors on the workspace, /tmp and /dev/shm for workspace_full(), opened
        through init's root before any code ran. Backends whose init is not a host process
        (or whose root is closed to the host) override it, or workspace_full()."""
        for path in ("home/user", "tmp", "dev/shm"):
            self._mount_fds.append(
                os.open(f"/proc/{self.init_pid}/root/{path}", os.O_PATH | os.O_CLOEXEC)
            )

    def memory_current(self) -> int | None:
        """Memory charged to the sandbox now (the host's reading), None where unknown."""
        return self.cgroups.memory_current()

    # -- ending -------------------------------------------------------------------------

    def terminate(self, reason: str, limit: str | None = None) -> None:
        """Kill every process of the sandbox now, from any thread, without waiting for a run
        in progress (it sees its kernel die and returns); kill() then releases the rest.
        `limit` names the limit that ended it ("cpu_limit"): a run in progress then returns
        it as a value (killed_by) instead of raising."""
        if self._dying:
            return
        with contextlib.suppress(OSError):
            self.last_usage = self.cgroups.usage()
        self.ended_because, self.ended_limit = reason, limit
        self._dying = True
        if self._init_pidfd is not None:  # PID 1 first: its namespace dies with it
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._init_pidfd, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self._kill_tree()

    def end(self, reason: str, limit: str | None = None) -> None:
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
        if self._init_pidfd is not None:
            dead = bool(_readable([self._init_pidfd], 5.0))
            os.close(self._init_pidfd)
        if self._supervisor is not None:
            self._supervisor.close()
        if self._kernel is not None:
            self._kernel.close()
        if self.procs is not None:
            self.procs.close()
        self._kernel_pid = None
        self._watch_kernel()
        with contextlib.suppress(OSError):
            self._full_at_end = self._mounts_full()
        for fd in self._mount_fds:
            os.close(fd)
        self._mount_fds = []
        try:
            self._release(dead)
        finally:
            self.cgroups.remove()

    @property
    def alive(self) -> bool:
        return not self._closed and not self._dying


class _Run:
    """One execution: send the request, pump events, enforce the deadline and CPU budget."""

    def __init__(self, sandbox: HostSandbox, on_event: EventCallback | None) -> None:
        self.sbx = sandbox
        self.on_event = on_event
        self.ex = Execution()
        self.budget = sandbox.policy.output_bytes
        self.results_budget = sandbox.policy.results_bytes
        self.dropped = (
            0  # bytes refused after a budget ran out: a sandbox that keeps sending is ended
        )
        self.id = sandbox._last_run = sandbox._issue()
        self.ended = False
        self.claimed_end: Message | None = None  # an "end" frame the host has not yet checked
        self.death: Message | None = None  # init's report of how the kernel died
        self.limit: float | None = None
        self.mode = "session"

    def go(
        self, code: str, mode: str, limit: float | None, envs: dict[str, str], recover: bool
    ) -> Execution:
        sbx, policy = self.sbx, self.sbx.policy
        sbx.cgroups.reset_peak()
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
        sbx._received = 0  # the run's own channel budget (what came between runs included)
        outcome = "end"
        try:
            sbx.send(request)
            outcome = self._pump(deadline, before)
            self._check_alive()
            if recover and outcome != "end":
                outcome = self._recover(outcome, before)
        except (SandboxNotFound, TransportError):
            if sbx.ended_limit is None and not self._ended_by_memory(before):
                raise  # a protocol violation, kill(): no run to report
        if sbx._dying and sbx.ended_limit is not None:
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
        if sbx._dying:
            return False  # ended by the host for a reason of its own
        try:
            after = sbx.cgroups.usage()
        except OSError:
            return False
        if after.oom_kills <= before.oom_kills:
            return False
        sbx.end("its memory limit was hit and the sandbox ended", "memory_limit")
        return True

    def _check_alive(self) -> None:
        if self.sbx._dying:  # killed from outside (kill(), the watchdog, a protocol error)
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
        sbx = self.sbx
        assert sbx._kernel is not None
        next_cpu_check = time.monotonic() + 0.25
        look = 0.0002  # how soon to look again at a kernel that claimed the end, after
        spins = 0  # the first END_SPINS looks, which only yield the processor
        while not self.ended:
            while sbx._pending and not self.ended:
                self._handle(sbx._pending.pop(0))
            if self.claimed_end is not None and sbx.kernel_waiting() is not False:
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
            ready = _readable([sbx._kernel, sbx._channel], wait)
            if sbx._kernel.fileno() in ready:
                frames = sbx._read_kernel()
                sbx._pending.extend(frames)
                if not frames and not sbx._pending and sbx._eof():
                    # The kernel is gone; init's report says how (a signal, an exit code).
                    status = sbx.wait_exit_event(time.monotonic() + 2.0)
                    if status is not None:
                        self._died(status)
                    return "died"
            if sbx._channel.fileno() in ready and not sbx._pending:
                status = self.sbx._exit_event()
                if status is not None:
                    self._died(status)
                    return "died"
        return "end"

    def _over_cpu(self) -> bool:
        cap = self.sbx.policy.cpu_s
        return cap is not None and self.sbx.usage().cpu_s > cap

    def _handle(self, frame: Message) -> None:
        ev = frame.get("ev")
        if not self.sbx._frame_is_for(frame, self.id, RUN_EVENTS):
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
            self.ex.error = ExecutionError(
                str(frame.get("name", "Error")),
                str(frame.get("value", "")),
                str(frame.get("traceback", "")),
            )
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
        status = self.death or {}
        sig, code = status.get("signal"), status.get("code")
        if isinstance(sig, int):
            with contextlib.suppress(ValueError):
                return f"killed by signal {sig} ({signal.Signals(sig).name})"
            return f"killed by signal {sig}"
        if isinstance(code, int):
            return f"exit code {code}"
        return f"exit status {self.ex.exit_code}"
