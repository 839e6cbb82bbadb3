"""The kernel: runs code in a persistent namespace and streams events to the host.

Requests and events are described in docs/protocol.md. Output is capped here (and again
on the host, which does not trust this count).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import linecache
import os
import random
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Mapping
from typing import Any

from . import commands, contexts, files, libc, packages
from .messages import (
    DoneEvent,
    EndEvent,
    ErrorEvent,
    Event,
    FailedEvent,
    HelloEvent,
    ResultEvent,
    StderrEvent,
    StdoutEvent,
)
from .protocol import PROTOCOL_VERSION, FrameReader, Message, encode

CHUNK = 64 * 1024


class Channel:
    """The kernel's end of its stream to the host; writes are whole frames under a lock."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.reader = FrameReader()
        self.pending: list[Message] = []

    def send(self, **message: Any) -> None:
        self.put(message)

    def put(self, message: Event | Mapping[str, Any]) -> None:
        """Send one message (messages.py types the kernel's events)."""
        data = encode(message)
        with self.lock:
            self.sock.sendall(data)

    def recv(self) -> Message | None:
        while not self.pending:
            data = self.sock.recv(CHUNK)
            if not data:
                return None
            self.pending.extend(self.reader.feed(data))
        return self.pending.pop(0)


class Output:
    """Per-run output budget shared by stdout, stderr and descriptor-level output."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.lock = threading.Lock()
        self.remaining = 0
        self.results_remaining = 0
        self.truncated = False
        self.run_id: Any = None

    def reset(self, budget: int, results_budget: int, run_id: Any) -> None:
        with self.lock:
            self.remaining, self.truncated = budget, False
            self.results_remaining, self.run_id = results_budget, run_id

    def take_result(self, size: int) -> bool:
        with self.lock:
            if size > self.results_remaining:
                self.truncated = True
                return False
            self.results_remaining -= size
            return True

    def emit(self, stream: str, text: str) -> None:
        data = text.encode("utf-8", "replace")
        with self.lock:
            if len(data) > self.remaining:
                data = data[: self.remaining]
                self.truncated = True
            self.remaining -= len(data)
        text = data.decode("utf-8", "ignore")  # a character cut at the budget's edge
        step = CHUNK // 4  # at most 4 bytes a character: a frame stays under CHUNK
        for start in range(0, len(text), step):
            chunk = text[start : start + step]
            if stream == "stdout":
                self.channel.put(StdoutEvent(ev="stdout", id=self.run_id, text=chunk))
            else:
                self.channel.put(StderrEvent(ev="stderr", id=self.run_id, text=chunk))


class Stream(io.TextIOBase):
    """sys.stdout / sys.stderr, line-buffered: a line is an event as soon as it ends, so a
    long cell streams; the rest goes at flush() (end of a cell, or an explicit flush)."""

    def __init__(self, output: Output, name: str) -> None:
        self.output, self._name = output, name
        self._buf: list[str] = []
        self._size = 0

    @property
    def name(self) -> str:
        return f"<{self._name}>"

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if s:
            self._buf.append(s)
            self._size += len(s)
            if "\n" in s or self._size >= CHUNK:
                self.flush()
        return len(s)

    def flush(self) -> None:
        if self._buf:
            text = "".join(self._buf)
            self._buf.clear()
            self._size = 0
            self.output.emit(self._name, text)

    def isatty(self) -> bool:
        return False


class DescriptorCapture:
    """Output written to descriptors 1 and 2 (C code, subprocesses) forwarded as events."""

    def __init__(self, output: Output) -> None:
        self.output = output
        self.done = {1: threading.Event(), 2: threading.Event()}
        self.tokens: dict[int, bytes] = {}
        self.pipes: dict[int, int] = {}
        for fd in (1, 2):
            r, w = os.pipe2(os.O_CLOEXEC)
            os.dup2(w, fd)
            os.close(w)
            self.pipes[r] = fd
        for r, fd in self.pipes.items():
            threading.Thread(target=self._pump, args=(r, fd), daemon=True).start()

    def _pump(self, r: int, fd: int) -> None:
        # An interrupt must reach the main thread, or a blocking call there never sees it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        name = "stdout" if fd == 1 else "stderr"
        while data := os.read(r, CHUNK):
            token = self.tokens.get(fd, b"")
            if token and data.endswith(token):
                data = data[: -len(token)]
                if data:
                    self.output.emit(name, data.decode("utf-8", "replace"))
                self.done[fd].set()
                continue
            self.output.emit(name, data.decode("utf-8", "replace"))

    def flush(self) -> None:
        """Wait until everything written to descriptors 1 and 2 so far has been forwarded."""
        for fd in (1, 2):
            self.tokens[fd] = b"\0codecage-" + secrets.token_hex(8).encode() + b"\0"
            self.done[fd].clear()
            os.write(fd, self.tokens[fd])
        for fd in (1, 2):
            self.done[fd].wait(1.0)
            self.tokens[fd] = b""


class Executor:
    """Runs cells in one namespace; the last expression of a cell is its result."""

    def __init__(self) -> None:
        self.module = types.ModuleType("__main__")
        self.module.__dict__["__builtins__"] = __builtins__
        sys.modules["__main__"] = self.module
        self.execution_count = 0

    def run(self, code: str, mode: str) -> tuple[Message | None, Message | None, int]:
        """Returns (result bundle, error, exit code)."""
        self.execution_count += 1
        filename = f"<cell {self.execution_count}>"
        # Registered so that tracebacks show the cell's source lines.
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        try:
            tree = ast.parse(code, filename=filename, mode="exec")
            last = None
            if mode == "session" and tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)  # type: ignore[attr-defined]
            exec(compile(tree, filename, "exec"), self.module.__dict__)
            if last is not None:
                value = eval(compile(last, filename, "eval"), self.module.__dict__)
                if value is not None:
                    self.module.__dict__["_"] = value
                    return {"text/plain": repr(value)}, None, 0
            return None, None, 0
        except SystemExit as exc:
            return None, None, _exit_code(exc)
        except BaseException as exc:
            return None, _error(exc), 1


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    sys.stderr.write(f"{exc.code}\n")
    return 1


def _error(exc: BaseException) -> Message:
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next  # hide the kernel's own frames
    lines = traceback.format_exception(type(exc), exc, tb)
    return {"name": type(exc).__name__, "value": str(exc), "traceback": "".join(lines)}


def _reseed() -> None:
    # Python reseeds `random` after fork, numpy does not: never share randomness.
    random.seed(os.urandom(32))
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(int.from_bytes(os.urandom(4), "little"))


def _environment(spec: dict[str, Any]) -> None:
    os.environ.clear()
    os.environ.update(spec["env"])


def main(sock: socket.socket, spec: dict[str, Any], ctx: dict[str, Any]) -> None:
    # Its OOM score (caps.KERNEL_OOM_SCORE_ADJ) was given by init at the fork: Landlock
    # refuses the kernel's own writes under /proc.
    libc.prctl(libc.PR_SET_DUMPABLE, 1)  # init is not dumpable; the kernel needs its own /proc/self
    _environment(spec)
    try:
        os.chdir("/home/user")
    except OSError:  # code may have made its workspace unusable; the kernel must still start
        os.chdir("/")
    if "" not in sys.path:  # as in Jupyter: modules written into the workspace import
        sys.path.insert(0, "")
    packages.on_path()  # what `pip install` put in the workspace imports too
    _reseed()
    Kernel(Channel(sock)).serve()


class Kernel:
    """Dispatches requests; one at a time, in order."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.output = Output(channel)
        self.capture = DescriptorCapture(self.output)
        sys.stdout = Stream(self.output, "stdout")
        sys.stderr = Stream(self.output, "stderr")
        sys.stdin = io.StringIO("")
        self.executor = Executor()
        self.shell: Any = None
        self.contexts = contexts.Contexts(self.session_shell, self._context_shell)
        self.forks: Any = None  # fork.Forks, on the first pack or unpack
        # pid and fd let the host find this process and its channel in /proc (it checks
        # both): it accepts a run's end only once this main thread waits on that descriptor.
        channel.put(
            HelloEvent(
                ev="hello", protocol=PROTOCOL_VERSION, pid=os.getpid(), fd=channel.sock.fileno()
            )
        )

    def serve(self) -> None:
        while True:
            try:
                request = self.channel.recv()
            except KeyboardInterrupt:
                continue  # an interrupt that arrived between runs
            if request is None or request.get("op") == "shutdown":
                os._exit(0)
            self.dispatch(request)

    def dispatch(self, request: Message) -> None:
        """Answer one request through HANDLERS; an unknown op is a `failed` reply."""
        op = request.get("op")
        handler = HANDLERS.get(op) if isinstance(op, str) else None
        try:
            if handler is None:
                self.channel.put(
                    FailedEvent(
                        ev="failed",
                        id=request.get("id"),
                        error="ProtocolError",
                        message=f"unknown op {op!r}",
                    )
                )
            else:
                handler(self, request)
        except KeyboardInterrupt:
            if op == "execute":
                # An interrupt that landed outside the cell's code (flushing its output,
                # sending its end): a run still ends as a run, never with a request's reply.
                self.interrupted_run(request.get("id"))
                return
            self.channel.put(
                FailedEvent(
                    ev="failed",
                    id=request.get("id"),
                    error="KeyboardInterrupt",
                    message="interrupted",
                )
            )

    def interrupted_run(self, run_id: Any) -> None:
        self.channel.put(
            ErrorEvent(
                ev="error", id=run_id, name="KeyboardInterrupt", value="interrupted", traceback=""
            )
        )
        self.channel.put(
            EndEvent(
                ev="end",
                id=run_id,
                execution_count=int(getattr(self.shell, "execution_count", 0) or 0),
                exit_code=None,
                truncated=self.output.truncated,
                duration_ms=0.0,
            )
        )

    def done(self, request: Message, reply: Mapping[str, Any] | None = None) -> None:
        self.channel.put({**DoneEvent(ev="done", id=request.get("id")), **(reply or {})})

    def failed(self, request: Message, exc: BaseException) -> None:
        """A request's failure, named by its exception (and errno, for an OSError)."""
        self.channel.put(
            FailedEvent(
                ev="failed",
                id=request.get("id"),
                error=type(exc).__name__,
                errno=getattr(exc, "errno", None),
                message=str(exc),
            )
        )

    def setenv(self, request: Message) -> None:
        os.environ.update({str(k): str(v) for k, v in (request.get("envs") or {}).items()})
        self.done(request)

    def guard(self, request: Message) -> None:
        from . import imports

        allow = request.get("modules_allow")
        imports.install(
            None if allow is None else [str(m) for m in allow],
            [str(m) for m in request.get("modules_deny") or ()],
        )
        self.done(request)

    def file_op(self, request: Message) -> None:
        op, args = str(request["op"]), dict(request.get("args") or {})
        try:
            reply = files.OPS[op](**args)
        except (OSError, ValueError, TypeError) as exc:
            self.failed(request, exc)
            return
        self.done(request, reply)

    def fork_op(self, request: Message) -> None:
        """pack (this sandbox's state, streamed) and unpack (into this one): fork.py."""
        import base64

        from . import fork

        if self.forks is None:
            self.forks = fork.Forks()
        op, args = str(request["op"]), dict(request.get("args") or {})
        try:
            if op == "pack":
                size = min(int(args.get("size", files.CHUNK)), files.CHUNK)
                shell, every = self.session_shell(), self.contexts.all
                memory = args.get("memory") is not False
                plain = args.get("plain") is True
                out = self.forks.pack(shell, every, args.get("cursor"), size, memory, plain)
                reply = {**out, "data": base64.b64encode(out["data"]).decode()}
            else:
                data = base64.b64decode(str(args.get("data", "")), validate=True)
                last = bool(args.get("last"))
                plain = args.get("plain") is True
                reply = self.forks.unpack(
                    self.session_shell(), self.contexts.all, data, last, plain
                )
        except Exception as exc:  # a variable that does not pickle, a bad archive
            self.failed(request, exc)
            return
        self.done(request, reply)

    def prefault(self, request: Message) -> None:
        """Take the path a first cell takes (IPython, output streams, the descriptor flush,
        events), then forget it: a fresh fork pays its copy-on-write page faults here, in the
        pool, not on the user's first run, whose execution_count is still 1."""
        run = {"id": request.get("id"), "code": "print(end='')\nNone", "mode": "session"}
        self.execute({**run, "output_bytes": 1024, "results_bytes": 1024})
        shell = self.session_shell()
        shell.reset(new_session=False)
        shell.execution_count = 1
        self.done(request)

    def command(self, request: Message) -> None:
        timeout = request.get("timeout_s")
        reply = commands.run(
            str(request.get("cmd", "")),
            float(timeout) if timeout is not None else None,
            {str(k): str(v) for k, v in (request.get("envs") or {}).items()},
            int(request.get("output_bytes", 1 << 20)),
        )
        self.done(request, reply)

    def session_shell(self) -> Any:
        if self.shell is None:
            from . import shell

            self.shell = shell.make_shell()
        return self.shell

    def _context_shell(self) -> Any:
        from . import shell

        return shell.make_context_shell()

    def context_op(self, request: Message) -> None:
        """context_create, _list, _restart, _remove, _select (docs/protocol.md)."""
        op, registry = str(request["op"]), self.contexts
        try:
            if op == "context_create":
                made = registry.create(
                    request.get("context_id"), request.get("language"), request.get("cwd")
                )
                reply: dict[str, Any] = _reply(made.describe())
            elif op == "context_list":
                reply = {"contexts": [c.describe() for c in registry.all.values()]}
            elif op == "context_select":
                chosen = registry.select(request.get("context_id"), request.get("language"))
                reply = _reply(chosen.describe())
            elif op == "context_restart":
                registry.get(request.get("context_id")).restart()
                reply = {}
            else:
                registry.remove(request.get("context_id"))
                reply = {}
        except (OSError, ValueError, LookupError) as exc:
            self.failed(request, exc)
            return
        self.done(request, reply)

    def execute(self, request: Message) -> None:
        run_id = request.get("id")
        self.output.reset(
            int(request.get("output_bytes", 1 << 20)),
            int(request.get("results_bytes", 16 << 20)),
            run_id,
        )
        saved = dict(os.environ)
        os.environ.update({str(k): str(v) for k, v in (request.get("envs") or {}).items()})
        packages.refresh()
        started = time.perf_counter()
        code, mode = str(request.get("code", "")), str(request.get("mode"))
        exit_code: int | None = None
        try:
            if mode == "session":
                count, error, exit_code = self._cell(run_id, code, request.get("envs") or {}, saved)
            else:
                result, error, exit_code = self.executor.run(code, mode)
                count = self.executor.execution_count
                if result is not None:
                    self.channel.put(
                        ResultEvent(ev="result", id=run_id, data=result, is_main_result=True)
                    )
            if error is not None:
                self.channel.put({"ev": "error", "id": run_id, **error})
        finally:
            os.environ.clear()
            os.environ.update(saved)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):  # user code may have replaced them
                    stream.flush()
            self.capture.flush()
        self.channel.put(
            EndEvent(
                ev="end",
                id=run_id,
                execution_count=count,
                exit_code=exit_code,
                truncated=self.output.truncated,
                duration_ms=(time.perf_counter() - started) * 1000,
            )
        )

    def _cell(
        self, run_id: Any, code: str, envs: Mapping[str, str], base: Mapping[str, str]
    ) -> tuple[int, Message | None, int | None]:
        """A cell in the selected context (context_select), else in the default one."""

        def sink(kind: str, payload: dict[str, Any]) -> None:
            for stream in (sys.stdout, sys.stderr):  # output printed before a result comes first
                with contextlib.suppress(Exception):
                    stream.flush()
            data = payload.get("data") or {}
            # counted as the host counts it, so a result the host would refuse is not sent
            size = sum(len(v) if isinstance(v, str) else len(json.dumps(v)) for v in data.values())
            if self.output.take_result(size):
                self.channel.put({"ev": kind, "id": run_id, **payload})

        context = self.contexts.take()
        clean = {str(k): str(v) for k, v in envs.items()}
        try:
            return context.run(code, clean, sink, base)
        except Exception as exc:  # the context's own machinery failed: the cell's error
            return 0, {"name": type(exc).__name__, "value": str(exc), "traceback": ""}, None


def _reply(info: dict[str, str]) -> dict[str, str]:
    """A context as a reply's fields: its id as `context_id` (`id` is the request's)."""
    return {"context_id": info["id"], "language": info["language"], "cwd": info["cwd"]}


# The kernel's requests, by op (docs/protocol.md); `shutdown` is the serve loop's own.
HANDLERS: dict[str, Callable[[Kernel, Message], None]] = {
    "execute": Kernel.execute,
    **{op: Kernel.file_op for op in files.OPS},
    "command": Kernel.command,
    "setenv": Kernel.setenv,
    "guard": Kernel.guard,
    "prefault": Kernel.prefault,
    **{op: Kernel.context_op for op in contexts.OPS},
    "pack": Kernel.fork_op,
    "unpack": Kernel.fork_op,
}
