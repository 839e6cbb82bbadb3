"""A scripted in-memory backend for unit tests (like httpx's MockTransport).

The fake replaces only what is below the jail seam (docs/backends-internals.md): it is a
launcher (`FakeLauncher`) whose `launch` gives the REAL host side (the one
`codecage._jail.sandbox.HostSandbox` of every backend: the supervisor channel, frame
validation, budgets, deadlines, recovery, accounting) a socket pair whose other end is a
scripted init and kernel, each in a thread, speaking the kernel protocol of docs/protocol.md;
its `Tree` hands out scripted readings (CPU seconds, peak memory, OOM kills, pids events).
`FakeJail.sandboxes` are the real HostSandboxes it created; `sandbox.launcher` is the
scripted side (its `files`, `requests`, `tree`).
Everything above the jail (the SDK, `codecage.run`, the Manager, the service, approvals,
tool and MCP rendering) then runs unchanged, without root, a runtime or a kernel.

    from codecage import Sandbox
    from codecage.testing import fake

    with fake.installed() as jail:
        jail.on_code("1 + 1", fake.result("2"))
        with Sandbox() as sbx:
            assert sbx.run_code("1 + 1").text == "2"

Nothing here isolates anything: a test using the fake tests the layers above the jail and
the host's accounting, never the jail. `Policy.isolation` is a closed set of names, so the
fake stands in for one (`installed(name="namespace")`, the default) for as long as it is
installed; it is never registered by importing codecage or codecage.testing.

A script is a list of steps, answered to the request it matches (`on_code`, `on_command`,
`on`): frames (`stdout`, `result`, `error`, `end`, `reply`, `failed`, `frame` with any
fields, a forged id included), raw bytes (`Raw`), readings of the tree (`Reading`), and
misbehaviour (`Die`, `Hang`, `Sleep`, `Flood`, `InitDies`). A run that sends no `end` (and
neither dies nor hangs) gets one; a file or command request that gets no reply is answered
by the fake's own: files live in a dict per sandbox, a command without a script exits 127.
"""

from __future__ import annotations

import base64
import contextlib
import errno as errnos
import json
import os
import posixpath
import secrets
import select
import signal
import socket
import threading
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._inside.protocol import PROTOCOL_VERSION, FrameReader, Message, ProtocolError, encode
from .._jail import BACKENDS, Backend, _jails, _lock, features, register
from .._jail.cgroups import Usage
from .._jail.host import HostJail
from .._jail.launcher import BaseLauncher, Launched, Mounts
from .._jail.sandbox import HostSandbox
from .._jail.volumes import Attachment
from .._models import KilledBy
from .._policy import Policy

__all__ = [
    "ID",
    "Die",
    "FakeJail",
    "FakeLauncher",
    "FakeTree",
    "Flood",
    "Frame",
    "Hang",
    "InitDies",
    "Raw",
    "Reading",
    "Sleep",
    "command_reply",
    "end",
    "error",
    "failed",
    "frame",
    "installed",
    "reply",
    "result",
    "stderr",
    "stdout",
]

ID = "<the request's id>"  # a frame field with this value gets the id of the request answered
INIT_PID = 1  # what the fake sandbox passes as `spare` to its tree: "every process but init"
HOME = "/home/user"


# -- steps ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One frame on the kernel channel. `id` is the request's unless the fields set one
    (None: a frame with no id; any string: a forged one)."""

    fields: Message


@dataclass(frozen=True)
class Raw:
    """Bytes written as they are on the kernel channel (a malformed frame, a huge header)."""

    data: bytes


@dataclass(frozen=True)
class Reading:
    """Change the tree's readings (the host's own, in a real backend): `cpu_s`, `oom_kills`
    and `pids_max_events` are added; `memory_peak_bytes`, `memory_current` and
    `workspace_full` are set when given."""

    cpu_s: float = 0.0
    oom_kills: int = 0
    pids_max_events: int = 0
    memory_peak_bytes: int | None = None
    memory_current: int | None = None
    workspace_full: bool | None = None


@dataclass(frozen=True)
class Die:
    """The kernel ends (by `signal`, or exiting with `code`); init reports it to the host."""

    signal: int | None = None
    code: int | None = None


@dataclass(frozen=True)
class Hang:
    """The request never finishes by itself. A SIGINT (the host's interrupt) ends it with
    KeyboardInterrupt and `end` if `interruptible`; a kill ends it in any case."""

    interruptible: bool = True


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Flood:
    """`total` bytes of output, in frames of `chunk` characters (until the host stops it)."""

    total: int
    chunk: int = 1 << 16
    stream: str = "stdout"


@dataclass(frozen=True)
class InitDies:
    """The sandbox's init exits: the kernel goes with it, the supervisor channel hangs up."""


Step = Frame | Raw | Reading | Die | Hang | Sleep | Flood | InitDies
Responder = Callable[[Message, "FakeLauncher"], Sequence[Step]]


def frame(ev: str, **fields: Any) -> Frame:
    return Frame({"ev": ev, "id": ID, **fields})


def stdout(text: str) -> Frame:
    return frame("stdout", text=text)


def stderr(text: str) -> Frame:
    return frame("stderr", text=text)


def result(data: str | dict[str, Any], main: bool = True) -> Frame:
    """A result: a MIME bundle, or a string as its text/plain."""
    bundle = {"text/plain": data} if isinstance(data, str) else data
    return frame("result", data=bundle, is_main_result=main)


def error(name: str, value: str = "", traceback: str = "") -> Frame:
    return frame("error", name=name, value=value, traceback=traceback or f"{name}: {value}")


def end(
    execution_count: int | None = None, exit_code: int | None = None, truncated: bool = False
) -> Frame:
    """A run's last frame (`execution_count` None: the kernel's own count)."""
    fields: dict[str, Any] = {"truncated": truncated, "duration_ms": 1.0}
    if execution_count is not None:
        fields["execution_count"] = execution_count
    if exit_code is not None:
        fields["exit_code"] = exit_code
    return frame("end", **fields)


def reply(**fields: Any) -> Frame:
    """A file or command request's answer ("done")."""
    return frame("done", **fields)


def failed(error: str = "OSError", errno: int | None = None, message: str = "") -> Frame:
    return frame("failed", error=error, errno=errno, message=message or error)


def command_reply(
    stdout: str = "",
    stderr: str = "",
    exit_code: int = 0,
    timed_out: bool = False,
    truncated: bool = False,
) -> Frame:
    return reply(
        stdout=stdout,
        stderr=stderr,
        exit_code=exit_code,
        timed_out=timed_out,
        truncated=truncated,
    )


# -- the tree: the host's readings, scripted -----------------------------------------------


class FakeTree:
    """The `host.Tree` of a fake sandbox. Its readings change only by `Reading` steps (or a
    test setting them); `kill` reaches the fake's init and kernel as signals would."""

    def __init__(self, box: FakeLauncher) -> None:
        self._box = box
        self.policy: Policy | None = None
        self.cpu_s = 0.0
        self.oom_kills = 0
        self.pids_max_events = 0
        self.memory_peak_bytes: int | None = 0
        self.memory_now: int | None = 0
        self.workspace_full = False
        self.kills: list[tuple[int | Container[int] | None, int]] = []  # (spare, signal)
        self.removed = False
        self.frozen = False  # paused: the host's freezer (the fake's kernel does not stop)

    def apply(self, reading: Reading) -> None:
        self.cpu_s += reading.cpu_s
        self.oom_kills += reading.oom_kills
        self.pids_max_events += reading.pids_max_events
        if reading.memory_peak_bytes is not None:
            self.memory_peak_bytes = reading.memory_peak_bytes
        if reading.memory_current is not None:
            self.memory_now = reading.memory_current
        if reading.workspace_full is not None:
            self.workspace_full = reading.workspace_full

    def create(self, policy: Policy) -> None:
        self.policy = policy

    def usage(self) -> Usage:
        if self.removed:
            raise FileNotFoundError("the fake tree was removed")
        return Usage(self.memory_peak_bytes, self.oom_kills, self.pids_max_events, self.cpu_s)

    def memory_current(self) -> int | None:
        if self.removed:
            raise FileNotFoundError("the fake tree was removed")
        return self.memory_now

    def reset_peak(self) -> None:
        if self.memory_peak_bytes is not None:
            self.memory_peak_bytes = self.memory_now

    def kill(self, spare: int | Container[int] | None = None, sig: int = signal.SIGKILL) -> None:
        self.kills.append((spare, sig))
        if spare is None:
            self._box._end_all()
        else:
            self._box._signal_kernel(sig)

    def freeze(self, timeout_s: float = 5.0, abort: Callable[[], bool] = lambda: False) -> None:
        self.frozen = True

    def thaw(self) -> None:
        self.frozen = False

    def remove(self, timeout_s: float = 5.0) -> None:
        self._box._join(timeout_s)
        self.removed = True


# -- the sandbox: a scripted init and kernel ------------------------------------------------


class _Kernel:
    """One kernel generation: a thread serving its end of a stream socket pair."""

    def __init__(self, box: FakeLauncher, generation: int) -> None:
        self.box, self.generation = box, generation
        self.host_end, self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(0.05)
        self.killed = threading.Event()
        self.interrupted = threading.Event()
        self.status: tuple[int | None, int | None] | None = None  # (signal, code) when ended
        self.report = True  # init reports its end (not after a restart or the tree's kill)
        self.finished = False
        self.count = 0
        self.thread = threading.Thread(
            target=self._main, name=f"codecage-fake-kernel-{box.id[:8]}-{generation}", daemon=True
        )

    # sending: never blocks for ever, gives up once killed
    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.killed.is_set():
                raise _Gone
            try:
                sent = self.sock.send(view)
            except TimeoutError:
                continue
            except OSError:
                raise _Gone from None
            view = view[sent:]

    def send_frame(self, fields: Message, rid: object) -> None:
        message = {k: (rid if v == ID else v) for k, v in fields.items()}
        self.send(encode(message))

    def deliver(self, sig: int) -> None:
        if sig == signal.SIGINT:
            self.interrupted.set()
        elif sig in (signal.SIGKILL, signal.SIGTERM):
            self.kill(sig)

    def kill(self, sig: int = signal.SIGKILL, report: bool = True) -> None:
        if self.status is None:
            self.status = (sig, None)
        self.report = self.report and report
        self.killed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _main(self) -> None:
        try:
            hello = self.box.jail.hello or {"ev": "hello", "protocol": PROTOCOL_VERSION}
            self.send_frame({**hello, "pid": 2, "fd": 3} if "pid" not in hello else hello, None)
            reader = FrameReader()
            while not self.killed.is_set():
                try:
                    data = self.sock.recv(1 << 16)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                try:
                    requests = reader.feed(data)
                except ProtocolError:
                    break
                for request in requests:
                    self.interrupted.clear()  # a SIGINT between requests interrupts nothing
                    self.box._log(request)
                    self._answer(request)
        except _Gone:
            pass
        except Exception as exc:  # a bug of the fake or its script: the test must fail
            self.box.jail.errors.append(f"kernel {self.generation}: {exc!r}")
            raise
        finally:
            if self.status is None:
                self.status = (None, 0)
            with contextlib.suppress(OSError):
                self.sock.close()
            self.finished = True
            self.box._wake()

    def _answer(self, request: Message) -> None:
        op, rid = request.get("op"), request.get("id")
        if op == "shutdown":
            raise _Exit(0)
        if op == "execute" and request.get("mode", "session") == "session":
            self.count += 1
        steps = self.box.jail._script_for(request, self.box)
        finished = False
        for step in steps:
            finished = self._step(step, request) or finished
            if self.killed.is_set():
                raise _Gone
        if not finished:
            if op == "execute":
                self._end(request)
            else:
                self.send_frame({"id": ID, **self.box._builtin(request)}, rid)

    def _end(self, request: Message) -> None:
        fields = end().fields
        if request.get("mode", "session") == "session":
            fields = {**fields, "execution_count": self.count}
        else:
            fields = {**fields, "exit_code": 0}
        self.send_frame(fields, request.get("id"))

    def _step(self, step: Step, request: Message) -> bool:
        """Perform one step; True if it finished the request (an end or reply was sent)."""
        rid = request.get("id")
        if isinstance(step, Frame):
            fields = step.fields
            ev = fields.get("ev")
            if ev == "end" and "execution_count" not in fields and request.get("op") == "execute":
                fields = {**fields, "execution_count": self.count}
            self.send_frame(fields, rid)
            return ev in ("end", "done", "failed") and fields.get("id", ID) == ID
        if isinstance(step, Raw):
            self.send(step.data)
        elif isinstance(step, Reading):
            self.box.tree.apply(step)
        elif isinstance(step, Sleep):
            self.killed.wait(step.seconds)
        elif isinstance(step, Flood):
            sent = 0
            while sent < step.total:
                text = "x" * min(step.chunk, step.total - sent)
                self.send_frame({"ev": step.stream, "id": ID, "text": text}, rid)
                sent += len(text)
        elif isinstance(step, Die):
            self.status = (step.signal, step.code)
            raise _Gone
        elif isinstance(step, InitDies):
            self.report = False
            self.box._init_dies.set()
            self.box._wake()
            raise _Gone
        elif isinstance(step, Hang):
            while not self.killed.wait(0.01):
                if self.interrupted.is_set():
                    self.interrupted.clear()
                    if step.interruptible:
                        trace = "KeyboardInterrupt: "
                        self.send_frame(error("KeyboardInterrupt", "", trace).fields, rid)
                        if request.get("op") == "execute":
                            self._end(request)
                        else:
                            self.send_frame(failed("KeyboardInterrupt").fields, rid)
                        return True
            raise _Gone
        return False


class _Gone(Exception):
    """The kernel stops (killed, died by script, or its channel broke)."""


class _Exit(_Gone):
    pass


class _ScriptedMounts:
    """The tree's scripted `workspace_full` stands in for the host's statvfs."""

    def __init__(self, tree: FakeTree) -> None:
        self.tree = tree

    def full(self) -> bool:
        return self.tree.workspace_full

    def close(self) -> None:
        pass


class FakeLauncher(BaseLauncher):
    """The launcher of a sandbox whose init and kernel are threads of this process. `files`
    maps paths inside the sandbox to their bytes; `requests` is every request its kernels
    received."""

    procman = False  # its init starts none: background processes are refused at once

    def __init__(self, jail: FakeJail, box: HostSandbox, envs: dict[str, str]) -> None:
        super().__init__(box)
        self.id = box.id
        self.jail = jail
        self.tree: FakeTree = FakeTree(self)
        self.files: dict[str, bytes] = {}
        self.metadata: dict[str, dict[str, str]] = {}  # set_metadata's, by path
        self.dirs: set[str] = {"/", "/home", HOME, "/tmp", "/dev", "/dev/shm"}
        self.start_envs = dict(envs)
        self.requests: list[Message] = []
        self.kernels: list[_Kernel] = []
        self._klock = threading.Lock()
        self._all_dead = threading.Event()
        self._init_dies = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._init: threading.Thread | None = None
        self._announced: dict[str, socket.socket] = {}  # kernel_by_token: token -> socket
        jail.sandboxes.append(box)  # before it starts: a failed start is seen too

    # -- the seam -------------------------------------------------------------------------

    def launch(self, envs: dict[str, str]) -> Launched:
        host, inside = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._init = threading.Thread(
            target=self._init_main, args=(inside,), name=f"codecage-fake-init-{self.id[:8]}"
        )
        self._init.daemon = True
        self._init.start()
        return Launched(host, None, None)

    def open_mounts(self) -> Mounts:
        """No filesystems to look at: `workspace_full()` is the tree's scripted reading."""
        return _ScriptedMounts(self.tree)

    def signal(self, sig: int) -> None:
        self.tree.kill(spare=INIT_PID, sig=sig)

    def handover(self, message: Message, fds: list[int]) -> list[int]:
        """With `kernel_by_token`, the socket init announced by token (as the OCI backends'
        init does); an unknown token hands over nothing (init's message is then no kernel)."""
        token = message.get("token")
        if message.get("ev") == "kernel" and not fds and isinstance(token, str):
            with self._klock:
                announced = self._announced.pop(token, None)
            return [] if announced is None else [announced.detach()]
        return fds

    def init_hung_up(self) -> bool:
        return self.jail.init_death is not None

    def ended_with_init(self) -> tuple[str, KilledBy | None]:
        assert self.jail.init_death is not None
        return self.jail.init_death

    def release(self, init_dead: bool) -> None:
        self.jail.released.append(self.id)

    # -- init -------------------------------------------------------------------------------

    def _init_main(self, sup: socket.socket) -> None:
        try:
            if self.jail.start_error is not None:
                sup.send(json.dumps({"ev": "error", "message": self.jail.start_error}).encode())
            else:
                self._start_kernel(sup, 0)
            while not self._all_dead.is_set() and not self._init_dies.is_set():
                ready, _, _ = select.select([sup.fileno(), self._wake_r], [], [], 0.1)
                if self._wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    self._report(sup)
                if sup.fileno() in ready:
                    data = sup.recv(4096)
                    if not data:
                        break  # the host is gone: nothing outlives it
                    request = json.loads(data)
                    if request.get("op") == "signal":
                        self._signal_kernel(int(request.get("signal", signal.SIGKILL)))
                    elif request.get("op") == "restart":
                        self._restart(sup)
        except OSError:
            pass
        finally:
            with self._klock:
                kernels = list(self.kernels)
            for kernel in kernels:
                kernel.kill(report=False)
            for kernel in kernels:
                kernel.thread.join(5)
                with contextlib.suppress(OSError):
                    kernel.host_end.close()
            sup.close()

    def _start_kernel(self, sup: socket.socket, generation: int) -> None:
        kernel = _Kernel(self, generation)
        with self._klock:
            self.kernels.append(kernel)
        kernel.thread.start()
        if self.jail.kernel_by_token:  # announced, handed over by the launcher (handover)
            token = secrets.token_hex(16)
            with self._klock:
                self._announced[token] = kernel.host_end
            sup.send(
                json.dumps({"ev": "kernel", "generation": generation, "token": token}).encode()
            )
            return
        message = json.dumps({"ev": "kernel", "generation": generation}).encode()
        socket.send_fds(sup, [message], [kernel.host_end.fileno()])
        kernel.host_end.close()

    def _restart(self, sup: socket.socket) -> None:
        with self._klock:
            current = self.kernels[-1] if self.kernels else None
        generation = 0
        if current is not None:
            current.kill(report=False)
            current.thread.join(5)
            generation = current.generation + 1
        self._start_kernel(sup, generation)

    def _report(self, sup: socket.socket) -> None:
        with self._klock:
            kernels = list(self.kernels)
        for kernel in kernels:
            if kernel.finished and kernel.report:
                kernel.report = False
                sig, code = kernel.status or (None, 0)
                message = {"ev": "exit", "generation": kernel.generation}
                sup.send(json.dumps({**message, "signal": sig, "code": code}).encode())

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _current(self) -> _Kernel | None:
        with self._klock:
            return self.kernels[-1] if self.kernels else None

    def _signal_kernel(self, sig: int) -> None:
        kernel = self._current()
        if kernel is not None:
            kernel.deliver(sig)

    def _end_all(self) -> None:
        self._all_dead.set()
        with self._klock:
            kernels = list(self.kernels)
        for kernel in kernels:
            kernel.kill(report=False)
        self._wake()

    def _join(self, timeout_s: float) -> None:
        self._end_all()
        if self._init is not None and self._init is not threading.current_thread():
            self._init.join(timeout_s)
        for kernel in self.kernels:
            if kernel.thread is not threading.current_thread():
                kernel.thread.join(timeout_s)
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def _log(self, request: Message) -> None:
        self.requests.append(request)
        self.jail.requests.append(request)

    # -- the built-in answers: setup requests, files, commands -------------------------------

    def _builtin(self, request: Message) -> Message:
        op = request.get("op")
        args = request.get("args") or {}
        try:
            if op in ("setenv", "guard", "prefault"):
                return {"ev": "done"}
            if op == "command":
                return command_reply(
                    stderr=f"fake: no script for {request.get('cmd')!r}\n", exit_code=127
                ).fields
            if op in ("read", "write", "list", "stat", "remove", "mkdir", "entry", "walk"):
                return {"ev": "done", **getattr(self, f"_file_{op}")(self.path(args["path"]), args)}
            if op == "rename":
                return {"ev": "done", **self._file_rename(args)}
            if op == "set_metadata":
                path = self.path(args["path"])
                self._file_entry(path, args)  # its error
                self.metadata[path] = dict(args.get("metadata") or {})
                return {"ev": "done", "entry": self.info(path)}
        except OSError as exc:
            name = type(exc).__name__
            return {"ev": "failed", "error": name, "errno": exc.errno, "message": str(exc)}
        return {"ev": "failed", "error": "ValueError", "errno": None, "message": f"unknown op {op}"}

    @staticmethod
    def path(path: str) -> str:
        """A path as the kernel resolves it: relative ones are under /home/user."""
        return posixpath.normpath(posixpath.join(HOME, path))

    def entry(self, path: str) -> dict[str, Any]:
        if path in self.dirs:
            return {"name": posixpath.basename(path), "path": path, "type": "dir", "size": 0}
        return {
            "name": posixpath.basename(path),
            "path": path,
            "type": "file",
            "size": len(self.files[path]),
        }

    def _missing(self, path: str) -> OSError:
        return FileNotFoundError(errnos.ENOENT, "No such file or directory", path)

    def _file_read(self, path: str, args: Message) -> Message:
        if path in self.dirs:
            raise IsADirectoryError(errnos.EISDIR, "Is a directory", path)
        if path not in self.files:
            raise self._missing(path)
        data = self.files[path]
        offset, length = int(args.get("offset", 0)), int(args.get("length", 4 << 20))
        chunk = data[offset : offset + length]
        eof = offset + len(chunk) >= len(data)
        return {"data": base64.b64encode(chunk).decode(), "size": len(data), "eof": eof}

    def _file_write(self, path: str, args: Message) -> Message:
        if path in self.dirs:
            raise IsADirectoryError(errnos.EISDIR, "Is a directory", path)
        parent = posixpath.dirname(path)
        while parent not in self.dirs:
            if parent in self.files:
                raise NotADirectoryError(errnos.ENOTDIR, "Not a directory", parent)
            self.dirs.add(parent)
            parent = posixpath.dirname(parent)
        data = base64.b64decode(args.get("data", ""))
        self.files[path] = (self.files.get(path, b"") if args.get("append") else b"") + data
        return self.entry(path)

    def _file_list(self, path: str, args: Message) -> Message:
        if path not in self.dirs:
            if path in self.files:
                raise NotADirectoryError(errnos.ENOTDIR, "Not a directory", path)
            raise self._missing(path)
        children = sorted(
            p for p in (*self.dirs, *self.files) if p != path and posixpath.dirname(p) == path
        )
        return {"entries": [self.entry(p) for p in children]}

    def _file_stat(self, path: str, args: Message) -> Message:
        if path in self.dirs or path in self.files:
            return {"exists": True, **self.entry(path)}
        return {"exists": False}

    def _file_remove(self, path: str, args: Message) -> Message:
        if path in self.files:
            del self.files[path]
        elif path in self.dirs:
            inside = path.rstrip("/") + "/"
            self.dirs = {d for d in self.dirs if d != path and not d.startswith(inside)}
            self.files = {f: v for f, v in self.files.items() if not f.startswith(inside)}
        else:
            raise self._missing(path)
        return {}

    def info(self, path: str) -> dict[str, Any]:
        """The kernel's full entry (messages.EntryInfo), as a fresh sandbox's would be."""
        directory = path in self.dirs
        return {
            **self.entry(path),
            "mode": 0o755 if directory else 0o644,
            "permissions": "drwxr-xr-x" if directory else "-rw-r--r--",
            "owner": "user",
            "group": "user",
            "mtime": 1_700_000_000.0,
            "is_symlink": False,
            "symlink_target": None,
            "metadata": dict(self.metadata.get(path, {})),
        }

    def _file_entry(self, path: str, args: Message) -> Message:
        if path not in self.dirs and path not in self.files:
            raise self._missing(path)
        return {"entry": self.info(path)}

    def _file_walk(self, path: str, args: Message) -> Message:
        self._file_list(path, args)  # its errors
        depth, inside = int(args.get("depth", 1)), path.rstrip("/") + "/"
        found = sorted(
            p
            for p in (*self.dirs, *self.files)
            if p.startswith(inside) and p[len(inside) :].count("/") < depth
        )
        return {"entries": [self.info(p) for p in found], "truncated": False}

    def _file_rename(self, args: Message) -> Message:
        src, dst = self.path(args["source"]), self.path(args["destination"])
        if src in self.files:
            self.files[dst] = self.files.pop(src)
        elif src in self.dirs:
            inside = src.rstrip("/") + "/"
            self.dirs = {
                dst + d[len(src) :] if d == src or d.startswith(inside) else d for d in self.dirs
            }
            self.files = {
                (dst + f[len(src) :] if f.startswith(inside) else f): v
                for f, v in self.files.items()
            }
        else:
            raise self._missing(src)
        self.dirs.add(posixpath.dirname(dst))
        return {"entry": self.info(dst)}

    def _file_mkdir(self, path: str, args: Message) -> Message:
        if path in self.files:
            raise FileExistsError(errnos.EEXIST, "File exists", path)
        created = path not in self.dirs
        while path not in self.dirs:
            self.dirs.add(path)
            path = posixpath.dirname(path)
        return {"created": created}


# -- the jail ---------------------------------------------------------------------------------


Match = str | Callable[[Message], bool] | None


@dataclass
class _Script:
    op: str
    match: Match
    steps: Sequence[Step] | Responder
    times: int | None  # how many more requests it answers (None: every one)


@dataclass
class FakeJail(HostJail):
    """The fake backend. Scripts are shared by every sandbox it creates; the newest script
    matching a request answers it. `requests` is every request of every fake kernel."""

    enforces: frozenset[str] = features.ALL
    why: dict[str, str] = field(default_factory=dict)
    start_error: str | None = None  # init reports this set-up error instead of a kernel
    hello: Message | None = None  # the kernel's first frame instead of its hello
    # Init's hang-up is the kernel's death (as gVisor's sentry dying is): the run ends as a
    # value, then the sandbox ends with this reason and limit instead of restarting.
    init_death: tuple[str, KilledBy | None] | None = None
    kernel_by_token: bool = False  # init announces each kernel by a token, no descriptor
    scripts: list[_Script] = field(default_factory=list)
    sandboxes: list[HostSandbox] = field(default_factory=list)
    requests: list[Message] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # exceptions in the fake's own threads

    name = "fake"

    def spawn(
        self, policy: Policy, envs: dict[str, str], volumes: tuple[Attachment, ...] = ()
    ) -> HostSandbox:
        return HostSandbox(policy, lambda box: FakeLauncher(self, box, envs), envs)

    def on(self, op: str, match: Match, *steps: Step | Responder, times: int | None = None) -> None:
        """Answer requests `op` whose key (code, cmd or path) equals `match` (a string), or
        for which `match(request)` is true (a function), or all (None), with `steps`, or
        with what one function of (request, sandbox) returns."""
        if len(steps) == 1 and callable(steps[0]) and not isinstance(steps[0], Step):
            self.scripts.append(_Script(op, match, steps[0], times))
        else:
            self.scripts.append(
                _Script(op, match, [s for s in steps if isinstance(s, Step)], times)
            )

    def on_code(self, code: Match, *steps: Step | Responder, times: int | None = None) -> None:
        self.on("execute", code, *steps, times=times)

    def on_command(self, cmd: Match, *steps: Step | Responder, times: int | None = None) -> None:
        self.on("command", cmd, *steps, times=times)

    def ran(self) -> list[str]:
        """The code of every execute request the fake kernels received, in order."""
        return [str(r.get("code")) for r in list(self.requests) if r.get("op") == "execute"]

    def ops(self) -> list[str]:
        return [str(r.get("op")) for r in list(self.requests)]

    def _script_for(self, request: Message, box: FakeLauncher) -> Sequence[Step]:
        op = request.get("op")
        key = request.get("code") if op == "execute" else request.get("cmd")
        if key is None:
            key = (request.get("args") or {}).get("path")
        for script in reversed(self.scripts):
            if script.op != op or script.times == 0:
                continue
            match = script.match
            if match is None or (match == key if isinstance(match, str) else match(request)):
                if script.times is not None:
                    script.times -= 1
                steps = script.steps
                return steps(request, box) if callable(steps) else steps
        return ()

    def live(self) -> list[HostSandbox]:
        """The sandboxes not yet killed (their launcher not released)."""
        return [b for b in self.sandboxes if b.id not in self.released]

    def threads(self) -> list[threading.Thread]:
        """The fake's threads still running (none once every sandbox was killed)."""
        return [t for t in threading.enumerate() if t.name.startswith("codecage-fake-")]


@contextlib.contextmanager
def installed(name: str = "namespace", jail: FakeJail | None = None) -> Iterator[FakeJail]:
    """Make backend `name` the fake for the duration: `get_jail(name)` (and so every layer
    above: Sandbox, codecage.run, the Manager, the service) gets this FakeJail, also after
    the service's shutdown closed its jails. The backend that was registered is restored."""
    fake = jail or FakeJail()
    fake.name = name  # the policy's isolation, which the jail checks
    previous = BACKENDS.get(name)
    with _lock:
        before = _jails.pop(name, None)
    register(Backend(name, "fake: a scripted in-memory backend (tests only)", lambda: fake, _ok))
    try:
        yield fake
    finally:
        fake.close()  # its warm pools, if a test started any
        for box in fake.live():
            box.kill()
        with _lock:
            if _jails.get(name) is fake:
                del _jails[name]
            if before is not None:
                _jails[name] = before
        if previous is not None:
            BACKENDS[name] = previous
        else:
            BACKENDS.pop(name, None)


def _ok() -> str | None:
    return None
