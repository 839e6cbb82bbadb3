"""Background commands and ptys of a sandbox: the SDK over its process manager.

`sbx.commands.run(cmd, background=True)` and `sbx.pty.create(...)` give a `CommandHandle`;
the host polls the process manager inside the sandbox for output (docs/protocol.md,
"Process channel"), which never waits for the kernel: these work while a cell runs and
outlive kernel restarts. Names and shapes follow E2B's SDK where codecage has no reason
to differ. Every reply is the sandbox's claim and is checked here field by field.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, overload

from ._api import check_envs
from ._errors import (
    ExecutionTimeout,
    FileNotFoundInSandbox,
    PolicyError,
    ProcessNotFound,
    SandboxError,
    TransportError,
)

if TYPE_CHECKING:
    from ._jail.procs import ProcessManager
    from ._sandbox import CommandResult, Sandbox

STREAMS = frozenset({"stdout", "stderr", "pty"})
USERS = frozenset({"user", "root"})  # both the sandbox's one unprivileged uid
READ_BYTES = 1 << 20
POLL_MIN_S, POLL_MAX_S = 0.005, 0.05
# One request to a process manager (native: the sandbox's own; remote: through the service),
# answering with the fields of its `done` reply, or raising.
Caller = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class PtySize:
    rows: int = 24
    cols: int = 80


@dataclass
class ProcessInfo:
    """A running command or pty, as `sbx.commands.list()` gives it."""

    pid: int
    cmd: str
    args: list[str] = field(default_factory=list)
    envs: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    tag: str | None = None
    pty: PtySize | None = None


@dataclass
class Chunk:
    """Output of a process as the manager gave it: `stream` is stdout, stderr or pty;
    `dropped` counts the bytes before it the buffer let go (then `data` is empty)."""

    stream: str
    data: bytes
    dropped: int = 0


@dataclass
class Exit:
    exit_code: int | None
    signal: int | None

    @property
    def code(self) -> int:
        """The shell's convention: 128 + the signal for a killed process."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code if self.exit_code is not None else -1

    @property
    def error(self) -> str | None:
        if self.signal is None:
            return None
        try:
            name = signal.Signals(self.signal).name
        except ValueError:
            name = str(self.signal)
        return f"killed by signal {self.signal} ({name})"


def _marker(size: int, pty: bool) -> str | bytes:
    text = dropped_text(size)
    return text.encode() if pty else text


def dropped_text(size: int) -> str:
    return f"\n[codecage: {size} bytes of output dropped: the process's buffer is bounded]\n"


def check_user(user: str | None) -> None:
    if user is not None and user not in USERS:
        raise PolicyError(
            f"user {user!r}: a sandbox has one unprivileged identity, named 'user' or 'root'"
        )


def max_procs(pids_max: int | None) -> int:
    return max(1, (pids_max if pids_max is not None else 1024) // 4)


def manager(sbx: Sandbox) -> ProcessManager:
    return sbx._use().process_manager()


def call(
    sbx: Sandbox, message: dict[str, Any], touch: bool = True, timeout_s: float = 10.0
) -> dict[str, Any]:
    """One request to the sandbox's process manager; a `failed` reply is raised. It counts
    as the sandbox's activity (its idle timeout) unless `touch` is False."""
    procs = manager(sbx)
    observer = sbx.proc_observer
    if observer is not None and message.get("op") in OBSERVED:
        observer(message)  # before it is sent: a record never misses what the process got
    try:
        reply = procs.request(message, timeout_s)
    except TransportError:
        sbx._use()  # a sandbox ending meanwhile is said as such (its processes died with it)
        raise
    if touch:
        sbx.last_activity = time.monotonic()
    if reply.get("ev") == "failed":
        error, text = str(reply.get("error"))[:64], str(reply.get("message"))[:1000]
        if error == "ProcessLookupError":
            raise ProcessNotFound(text)
        if error == "FileNotFoundError":
            raise FileNotFoundInSandbox(text)
        if error in ("ValueError", "TypeError", "KeyError"):
            raise PolicyError(text)
        raise SandboxError(f"{error}: {text}")
    return reply


# What a process manager request does to a process that its audit record keeps (docs/service.md).
OBSERVED = frozenset({"proc_input", "proc_signal", "proc_close_stdin"})


def start_process(
    sbx: Sandbox,
    cmd: str,
    args: list[str],
    *,
    envs: dict[str, str] | None = None,
    cwd: str | None = None,
    tag: str | None = None,
    pty: PtySize | None = None,
    stdin: bool = False,
) -> int:
    """Start a process; its pid. The session's own environment comes first (a pooled
    sandbox's), the command's over it."""
    procs = manager(sbx)
    reply = call(
        sbx,
        {
            "op": "proc_start",
            "cmd": cmd,
            "args": args,
            "envs": {**procs.envs, **(envs or {})},
            "cwd": cwd,
            "tag": tag,
            "pty": None if pty is None else {"rows": pty.rows, "cols": pty.cols},
            "stdin": stdin,
            "buffer_bytes": max(1, sbx.policy.output_bytes),
            "max_procs": max_procs(sbx.policy.pids_max),
        },
    )
    pid = reply.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 1:
        raise TransportError("a malformed reply from the sandbox's process manager")
    return pid


def read(caller: Caller, pid: int, offset: int | None) -> tuple[list[Chunk], int, Exit | None]:
    """Output of `pid` from `offset` (None: from now on): the chunks, the next offset, and
    its exit once it ended and everything before it was read."""
    reply = caller({"op": "proc_read", "pid": pid, "offset": offset, "max_bytes": READ_BYTES})
    try:
        at, nxt, dropped = reply["offset"], reply["next"], reply["dropped"]
        running, raw = reply["running"], reply["chunks"]
        code, sig = reply.get("exit_code"), reply.get("signal")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (at, nxt, dropped)):
            raise ValueError("offsets")
        if not isinstance(running, bool) or not isinstance(raw, list) or len(raw) > 4096:
            raise ValueError("fields")
        if at < 0 or nxt < at or dropped < 0 or (offset is not None and at < offset):
            raise ValueError("offsets")
        if offset is not None and at != offset + dropped:
            raise ValueError("dropped")
        chunks = [Chunk("stderr", b"", dropped)] if dropped else []
        size = 0
        for item in raw:
            stream, text = item
            if stream not in STREAMS or not isinstance(text, str):
                raise ValueError("chunk")
            data = base64.b64decode(text, validate=True)
            size += len(data)
            chunks.append(Chunk(stream, data))
        if size != nxt - at or size > READ_BYTES:
            raise ValueError("sizes")
        for v in (code, sig):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ValueError("exit")
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise TransportError(
            "a malformed output reply from the sandbox's process manager"
        ) from None
    ended = None if running or size else Exit(code, sig)
    return chunks, nxt, ended


def signal_process(caller: Caller, pid: int, sig: int) -> bool:
    """Signal a running process's group; False if no such process runs."""
    try:
        caller({"op": "proc_signal", "pid": pid, "signal": int(sig)})
    except ProcessNotFound:
        return False
    return True


def send_input(caller: Caller, pid: int, data: str | bytes) -> None:
    raw = data.encode() if isinstance(data, str) else bytes(data)
    caller({"op": "proc_input", "pid": pid, "data": base64.b64encode(raw).decode()})


def listing(caller: Caller) -> list[ProcessInfo]:
    reply = caller({"op": "proc_list"})
    out: list[ProcessInfo] = []
    try:
        for p in reply["processes"][:4096]:
            if not p.get("running"):
                continue
            size = p.get("pty")
            out.append(
                ProcessInfo(
                    pid=int(p["pid"]),
                    cmd=str(p["cmd"]),
                    args=[str(a) for a in p.get("args") or []],
                    envs={str(k): str(v) for k, v in (p.get("envs") or {}).items()},
                    cwd=None if p.get("cwd") is None else str(p["cwd"]),
                    tag=None if p.get("tag") is None else str(p["tag"]),
                    pty=None if size is None else PtySize(int(size["rows"]), int(size["cols"])),
                )
            )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise TransportError(
            "a malformed process list from the sandbox's process manager"
        ) from None
    return out


class CommandHandle:
    """A running command or pty: its `pid`, its output as it comes (`wait`, iteration),
    `kill`, `send_stdin`, `close_stdin`. The process runs on whatever the handle does;
    `disconnect` only stops this handle (reconnect with `sbx.commands.connect(pid)`)."""

    def __init__(self, caller: Caller, pid: int, output_bytes: int, offset: int | None = 0) -> None:
        self._call = caller
        self.pid = pid
        self._offset = offset
        self._limit = output_bytes
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._kept = 0
        self.truncated = False
        self._decoders = {
            s: codecs.getincrementaldecoder("utf-8")(errors="replace") for s in ("stdout", "stderr")
        }
        self._exit: Exit | None = None
        self._disconnected = False
        self._pty = False  # output seen on a pty: markers go there
        self.dropped = 0  # bytes the process manager's bounded buffer let go unread

    @property
    def stdout(self) -> str:
        return "".join(self._stdout)

    @property
    def stderr(self) -> str:
        """What the process wrote to stderr (within the policy's output_bytes), and a note
        of how much output was dropped unread, if any was."""
        text = "".join(self._stderr)
        return text + dropped_text(self.dropped) if self.dropped else text

    @property
    def exit_code(self) -> int | None:
        """None while it runs (as far as this handle has read)."""
        return None if self._exit is None else self._exit.code

    def __iter__(self) -> Iterator[tuple[str | None, str | None, bytes | None]]:
        """(stdout, stderr, pty) triples as output arrives, one of them set; ends with it."""
        for stream, value in self._events(None):
            if stream == "stdout":
                yield value, None, None  # type: ignore[misc]
            elif stream == "stderr":
                yield None, value, None  # type: ignore[misc]
            else:
                yield None, None, value  # type: ignore[misc]

    def _events(self, deadline: float | None) -> Iterator[tuple[str, str | bytes]]:
        delay = POLL_MIN_S
        while self._exit is None and not self._disconnected:
            chunks, self._offset, ended = read(self._call, self.pid, self._offset)
            for chunk in chunks:
                if chunk.dropped:
                    self.truncated = True
                    self.dropped += chunk.dropped
                    yield ("pty" if self._pty else "stderr"), _marker(chunk.dropped, self._pty)
                elif chunk.stream == "pty":
                    self._pty = True
                    yield "pty", chunk.data
                else:
                    yield from self._text(
                        chunk.stream, self._decoders[chunk.stream].decode(chunk.data)
                    )
            if ended is not None:
                for name, decoder in self._decoders.items():
                    yield from self._text(name, decoder.decode(b"", final=True))
                self._exit = ended
                return
            delay = POLL_MIN_S if chunks else min(delay * 2, POLL_MAX_S)
            if deadline is not None and time.monotonic() + delay > deadline:
                raise ExecutionTimeout(f"process {self.pid} did not end in time")
            time.sleep(delay)

    def _text(self, stream: str, text: str) -> Iterator[tuple[str, str]]:
        if not text:
            return
        keep = text[: max(0, self._limit - self._kept)]
        if len(keep) < len(text):
            self.truncated = True
        if keep:
            self._kept += len(keep)
            (self._stdout if stream == "stdout" else self._stderr).append(keep)
        yield stream, text

    def wait(
        self,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        on_pty: Callable[[bytes], Any] | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        """Wait for the end; callbacks get output as it comes. Past `timeout` the process
        is killed and the result says so (exit code 124, as a foreground command's)."""
        from ._sandbox import CommandResult

        deadline = None if timeout is None else time.monotonic() + timeout
        callbacks: dict[str, Callable[[Any], Any] | None] = {
            "stdout": on_stdout,
            "stderr": on_stderr,
            "pty": on_pty,
        }
        try:
            for stream, value in self._events(deadline):
                callback = callbacks[stream]
                if callback is not None:
                    callback(value)
        except ExecutionTimeout:
            self.kill()
            return CommandResult(
                self.stdout, self.stderr, 124, f"timed out after {timeout} s", self.truncated
            )
        if self._exit is None:
            raise SandboxError(f"process {self.pid}: the handle was disconnected")
        return CommandResult(
            self.stdout, self.stderr, self._exit.code, self._exit.error, self.truncated
        )

    def kill(self) -> bool:
        """SIGKILL to its process group; False if it had already ended."""
        return signal_process(self._call, self.pid, signal.SIGKILL)

    def send_stdin(self, data: str | bytes) -> None:
        send_input(self._call, self.pid, data)

    def close_stdin(self) -> None:
        self._call({"op": "proc_close_stdin", "pid": self.pid})

    def disconnect(self) -> None:
        self._disconnected = True


class Pty:
    """Pseudo-terminals in the sandbox (`sbx.pty`): an interactive bash on a pty. `opener`
    starts one (the pty's size, cwd, envs) and gives its pid; `caller` serves the rest."""

    def __init__(
        self,
        opener: Callable[[PtySize, str | None, dict[str, str]], int],
        caller: Caller,
        output_bytes: int,
    ) -> None:
        self._open, self._call, self._output_bytes = opener, caller, output_bytes

    def create(
        self,
        size: PtySize | None = None,
        *,
        user: str | None = None,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
    ) -> CommandHandle:
        check_user(user)
        envs = {**PTY_ENVS, **(envs or {})}
        pid = self._open(size or PtySize(), cwd, envs)
        return CommandHandle(self._call, pid, self._output_bytes)

    def connect(self, pid: int) -> CommandHandle:
        return connect(self._call, pid, self._output_bytes)

    def resize(self, pid: int, size: PtySize) -> None:
        self._call(
            {"op": "proc_resize", "pid": pid, "size": {"rows": size.rows, "cols": size.cols}}
        )

    def send_stdin(self, pid: int, data: bytes) -> None:
        send_input(self._call, pid, data)

    def kill(self, pid: int) -> bool:
        return signal_process(self._call, pid, signal.SIGKILL)


class ProcessCommands:
    """What `sbx.commands` offers on background processes, native or remote: a subclass
    sets `_call` and `_output_bytes`."""

    _call: Caller
    _output_bytes: int

    @overload
    def run(
        self,
        cmd: str,
        background: Literal[False] = False,
        envs: dict[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        stdin: bool = False,
        timeout: float | None = None,
    ) -> CommandResult: ...
    @overload
    def run(
        self,
        cmd: str,
        background: Literal[True],
        envs: dict[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        stdin: bool = False,
        timeout: float | None = None,
    ) -> CommandHandle: ...

    def run(
        self,
        cmd: str,
        background: bool = False,
        envs: dict[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        stdin: bool = False,
        timeout: float | None = None,
    ) -> CommandResult | CommandHandle:
        """Run a shell command. In the foreground, its result; with `background=True`, a
        handle (`wait()`, `kill()`, `send_stdin()`; `stdin=True` gives it a stdin pipe).
        `timeout` bounds a foreground command (the policy's `timeout_s` caps it); a
        background one runs until it ends or the sandbox does."""
        check_user(user)
        if not background and on_stdout is None and on_stderr is None and cwd is None:
            return self._foreground(cmd, timeout, envs)
        pid = self._start(cmd, check_envs(envs), cwd, stdin)
        handle = CommandHandle(self._call, pid, self._output_bytes)
        if background:
            return handle
        return handle.wait(on_stdout=on_stdout, on_stderr=on_stderr, timeout=self._limit(timeout))

    def _start(self, cmd: str, envs: dict[str, str], cwd: str | None, stdin: bool) -> int:
        raise NotImplementedError

    def _limit(self, timeout: float | None) -> float | None:
        return timeout

    def _foreground(
        self, cmd: str, timeout: float | None, envs: dict[str, str] | None
    ) -> CommandResult:
        raise NotImplementedError

    def list(self) -> list[ProcessInfo]:
        """The running background commands and ptys."""
        return listing(self._call)

    def connect(self, pid: int) -> CommandHandle:
        """A handle on a running process: its output from now on."""
        return connect(self._call, pid, self._output_bytes)

    def kill(self, pid: int) -> bool:
        """SIGKILL to a process's group; False if no such process runs."""
        return signal_process(self._call, pid, signal.SIGKILL)

    def send_stdin(self, pid: int, data: str | bytes) -> None:
        send_input(self._call, pid, data)

    def close_stdin(self, pid: int) -> None:
        self._call({"op": "proc_close_stdin", "pid": pid})


def connect(caller: Caller, pid: int, output_bytes: int) -> CommandHandle:
    """A handle on a running process: its output from now on."""
    if not any(p.pid == pid for p in listing(caller)):
        raise ProcessNotFound(f"no running process {pid}")
    return CommandHandle(caller, pid, output_bytes, offset=None)


PTY_ENVS = {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
