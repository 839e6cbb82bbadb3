"""The process manager: background commands and ptys, in a process of their own.

Init starts it next to the first kernel and hands the host its channel (docs/protocol.md,
"Process channel"). It is no part of the kernel, so processes keep running while a cell
runs and across kernel restarts (init and the host spare its tree), and the host can use
them while the kernel is busy. It is a subreaper (where the kernel has them: not gVisor):
whatever its processes start stays in its tree. One thread, one `select` loop: requests
from the host, the processes' output, their exits. Each process's output is kept in a
bounded buffer (the oldest bytes are dropped first, and a reader is told how many it
missed); the host polls it (`proc_read` with an offset). Standard library only, like everything in _inside/.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import struct
import subprocess
import termios
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import libc
from .protocol import PROTOCOL_VERSION, FrameReader, Message, ProtocolError, encode

READ_CHUNK = 64 * 1024
MAX_CHUNKS = 4096  # buffered chunks per process, whatever their sizes
MAX_READ = 1 << 20  # bytes of output one proc_read returns, at most
MAX_INPUT = 1 << 20  # bytes of stdin waiting for a process that does not read it
RETAIN_EXITED = 32  # exited processes kept for readers still to take their last output
MAX_ARG = 1 << 16  # bytes of a command, an argument, a variable, a path
KILL_WAIT_S = 1.0  # how long a SIGKILL's answer waits for the process to be gone


class Failure(Exception):
    """A request that cannot be served: `error` is the name the host maps."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error


class Proc:
    """One process started for the host: its pipes (or pty), its bounded output buffer."""

    def __init__(
        self, popen: subprocess.Popen[bytes], config: dict[str, Any], buffer_bytes: int
    ) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.config = config
        self.cap = max(1, buffer_bytes)
        self.master: int | None = None  # the pty's master end, if it has one
        self.stdin: int | None = None  # the write end of its stdin pipe, if it has one
        self.fds: dict[int, str] = {}  # readable descriptor -> "stdout" / "stderr" / "pty"
        self.chunks: deque[tuple[int, str, bytearray]] = deque()  # (offset, stream, bytes)
        self.first = 0  # offset of the oldest byte still held
        self.next = 0  # offset of the next byte to arrive
        self.pending_input = bytearray()
        self.close_input = False  # close stdin once pending_input is written
        self.status: int | None = None  # waitpid status once reaped
        self.exited_at = 0.0

    @property
    def running(self) -> bool:
        return self.status is None

    def add(self, stream: str, data: bytes) -> None:
        last = self.chunks[-1] if self.chunks else None
        if last is not None and last[1] == stream and len(last[2]) < READ_CHUNK:
            last[2].extend(data)
        else:
            self.chunks.append((self.next, stream, bytearray(data)))
        self.next += len(data)
        while self.chunks and (self.next - self.first > self.cap or len(self.chunks) > MAX_CHUNKS):
            offset, name, chunk = self.chunks[0]
            excess = self.next - self.first - self.cap
            if len(self.chunks) <= MAX_CHUNKS and 0 < excess < len(chunk):
                del chunk[:excess]  # keep the chunk's newest part
                self.chunks[0] = (offset + excess, name, chunk)
                self.first = offset + excess
                break
            self.chunks.popleft()
            self.first = self.chunks[0][0] if self.chunks else self.next

    def read(self, offset: int | None, max_bytes: int) -> dict[str, Any]:
        """Output from `offset` on (None: from now), at most `max_bytes`; `dropped` is what
        the reader missed because the buffer had let it go."""
        if offset is None or offset > self.next:
            offset = self.next
        dropped = max(0, self.first - offset)
        offset = max(offset, self.first)
        out: list[tuple[str, bytearray]] = []
        taken, at = 0, offset
        for start, stream, chunk in self.chunks:
            if start + len(chunk) <= at:
                continue
            piece = chunk[at - start : at - start + max_bytes - taken]
            if not piece:
                break
            if out and out[-1][0] == stream:
                out[-1][1].extend(piece)
            else:
                out.append((stream, bytearray(piece)))
            taken += len(piece)
            at += len(piece)
            if taken >= max_bytes:
                break
        return {
            "chunks": [[stream, base64.b64encode(data).decode()] for stream, data in out],
            "offset": offset,
            "next": at,
            "dropped": dropped,
            "running": self.running,
            **self.exit_fields(),
        }

    def exit_fields(self) -> dict[str, Any]:
        if self.status is None:
            return {"exit_code": None, "signal": None}
        if os.WIFSIGNALED(self.status):
            return {"exit_code": None, "signal": os.WTERMSIG(self.status)}
        return {"exit_code": os.waitstatus_to_exitcode(self.status), "signal": None}

    def info(self) -> dict[str, Any]:
        return {"pid": self.pid, **self.config, "running": self.running}


class Manager:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader()
        self.procs: dict[int, Proc] = {}
        self.by_fd: dict[int, Proc] = {}
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    # -- the loop ------------------------------------------------------------------------

    def serve(self) -> None:
        self.put({"ev": "hello", "protocol": PROTOCOL_VERSION, "pid": os.getpid()})
        while True:
            writers = [
                p.stdin for p in self.procs.values() if p.stdin is not None and p.pending_input
            ]
            try:
                readers: list[Any] = [self.sock, self.wake_r, *self.by_fd]
                ready, writable, _ = select.select(readers, writers, [], None)
            except InterruptedError:
                continue
            if self.wake_r in ready:
                _drain(self.wake_r)
                self.reap()
            for fd in ready:
                proc = self.by_fd.get(fd)
                if proc is not None:
                    self.pump(proc, fd)
            for fd in writable:
                for proc in list(self.procs.values()):
                    if proc.stdin == fd:
                        self.feed(proc)
            if self.sock in ready:
                data = self.sock.recv(1 << 18)
                if not data:
                    os._exit(0)  # the host is gone (init ends everything next)
                try:
                    requests = self.reader.feed(data)
                except ProtocolError:
                    os._exit(1)
                for request in requests:
                    self.dispatch(request)

    def put(self, message: dict[str, Any]) -> None:
        self.sock.sendall(encode(message))

    def dispatch(self, request: Message) -> None:
        rid, op = request.get("id"), request.get("op")
        handler = OPS.get(op) if isinstance(op, str) else None
        try:
            if handler is None:
                raise Failure("ProtocolError", f"unknown op {str(op)[:40]!r}")
            reply = handler(self, request)
        except Failure as exc:
            self.put({"ev": "failed", "id": rid, "error": exc.error, "message": str(exc)})
            return
        except (OSError, ValueError, TypeError, KeyError) as exc:
            name = type(exc).__name__
            self.put({"ev": "failed", "id": rid, "error": name, "message": str(exc)})
            return
        self.put({"ev": "done", "id": rid, **reply})

    # -- processes -----------------------------------------------------------------------

    def start(self, request: Message) -> dict[str, Any]:
        cmd = _text(request.get("cmd"), "cmd")
        args = [_text(a, "args") for a in _list(request.get("args"), "args")]
        envs = {_text(k, "envs"): _text(v, "envs") for k, v in _dict(request.get("envs")).items()}
        cwd = request.get("cwd")
        cwd = "/home/user" if cwd in (None, "") else _text(cwd, "cwd")
        tag = request.get("tag")
        tag = None if tag is None else _text(tag, "tag")
        size = request.get("pty")
        live = sum(p.running for p in self.procs.values())
        limit = int(request.get("max_procs", 32))
        if live >= limit:
            raise Failure("LimitError", f"{live} processes are running, the sandbox's limit")
        if not os.path.isdir(cwd):
            raise Failure("FileNotFoundError", f"cwd {cwd!r} is not a directory")
        env = dict(os.environ) | envs
        config: dict[str, Any] = {
            "cmd": cmd,
            "args": args,
            "envs": envs,
            "cwd": cwd,
            "tag": tag,
            "pty": None,
        }
        buffer_bytes = int(request.get("buffer_bytes", 1 << 20))
        if size is not None:
            rows, cols = _size(size)
            master, slave = os.openpty()
            _winsize(slave, rows, cols)
            try:
                popen = subprocess.Popen(
                    [cmd, *args],
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_controlling_tty,
                )
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            config["pty"] = {"rows": rows, "cols": cols}
            proc = Proc(popen, config, buffer_bytes)
            proc.master = master
            proc.stdin = master
            os.set_blocking(master, False)
            self.watch(proc, master, "pty")
        else:
            popen = subprocess.Popen(
                [cmd, *args],
                stdin=subprocess.PIPE if request.get("stdin") else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=env,
                start_new_session=True,  # its own process group: signals reach it whole
            )
            proc = Proc(popen, config, buffer_bytes)
            assert popen.stdout is not None and popen.stderr is not None
            if popen.stdin is not None:
                proc.stdin = popen.stdin.fileno()
                os.set_blocking(proc.stdin, False)
            for pipe, name in ((popen.stdout, "stdout"), (popen.stderr, "stderr")):
                os.set_blocking(pipe.fileno(), False)
                self.watch(proc, pipe.fileno(), name)
        self.procs[proc.pid] = proc
        self.forget_exited()
        return {"pid": proc.pid}

    def watch(self, proc: Proc, fd: int, stream: str) -> None:
        proc.fds[fd] = stream
        self.by_fd[fd] = proc

    def pump(self, proc: Proc, fd: int, drain: bool = False) -> None:
        """Take what the descriptor holds (all of it with `drain`, else one read)."""
        while True:
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:  # EIO: a pty whose other end is closed
                data = b""
            if not data:
                self.unwatch(proc, fd)
                return
            proc.add(proc.fds[fd], data)
            if not drain:
                return

    def unwatch(self, proc: Proc, fd: int) -> None:
        self.by_fd.pop(fd, None)
        proc.fds.pop(fd, None)
        if fd != proc.master:
            self.close_pipe(proc, fd)

    def close_pipe(self, proc: Proc, fd: int) -> None:
        """Close a descriptor of `proc` through its Popen file if it has one."""
        for f in (proc.popen.stdin, proc.popen.stdout, proc.popen.stderr):
            if f is not None and not f.closed and f.fileno() == fd:
                f.close()
                return
        with contextlib.suppress(OSError):
            os.close(fd)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.ended(pid, status)

    def ended(self, pid: int, status: int) -> None:
        """A child was reaped: if it is one of ours, take the rest of its output, close its
        descriptors and keep its exit (an orphan of one of ours is only reaped)."""
        proc = self.procs.get(pid)
        if proc is not None and proc.running:
            proc.status, proc.exited_at = status, time.monotonic()
            proc.popen.returncode = os.waitstatus_to_exitcode(status)
            for fd in list(proc.fds):  # what it wrote before it ended is all in there
                self.pump(proc, fd, drain=True)
            for fd in list(proc.fds):
                self.unwatch(proc, fd)
            self.end_input(proc)
            if proc.master is not None:
                os.close(proc.master)
                proc.master = None
        # exited processes' records stay for their readers, a bounded number of them

    def end_input(self, proc: Proc) -> None:
        proc.pending_input.clear()
        if proc.stdin is not None and proc.stdin != proc.master:
            self.close_pipe(proc, proc.stdin)
        proc.stdin = None

    def forget_exited(self) -> None:
        exited = sorted(
            (p for p in self.procs.values() if not p.running), key=lambda p: p.exited_at
        )
        for proc in exited[: max(0, len(exited) - RETAIN_EXITED)]:
            del self.procs[proc.pid]

    def find(self, request: Message, running: bool = False) -> Proc:
        pid = request.get("pid")
        proc = self.procs.get(pid) if isinstance(pid, int) else None
        if proc is None or (running and not proc.running):
            raise Failure("ProcessLookupError", f"no running process {str(pid)[:20]}")
        return proc

    def read(self, request: Message) -> dict[str, Any]:
        offset = request.get("offset")
        if offset is not None and (not isinstance(offset, int) or offset < 0):
            raise Failure("ValueError", "offset must be a non-negative integer or null")
        max_bytes = min(MAX_READ, max(1, int(request.get("max_bytes", MAX_READ))))
        return self.find(request).read(offset, max_bytes)

    def list(self, request: Message) -> dict[str, Any]:
        return {"processes": [p.info() for p in self.procs.values()]}

    def input(self, request: Message) -> dict[str, Any]:
        proc = self.find(request, running=True)
        try:
            data = base64.b64decode(str(request.get("data", "")), validate=True)
        except (binascii.Error, ValueError):
            raise Failure("ValueError", "data is not base64") from None
        if proc.stdin is None:
            raise Failure("ValueError", f"process {proc.pid} takes no input (stdin closed or off)")
        if len(proc.pending_input) + len(data) > MAX_INPUT:
            raise Failure("LimitError", f"process {proc.pid} is not reading its input")
        proc.pending_input += data
        self.feed(proc)
        return {}

    def feed(self, proc: Proc) -> None:
        """Write what the process's stdin takes now; the rest waits for the loop."""
        if proc.stdin is None:
            return
        while proc.pending_input:
            try:
                n = os.write(proc.stdin, proc.pending_input)
            except BlockingIOError:
                return
            except OSError:  # it closed its end: what it never read is lost
                self.end_input(proc)
                return
            del proc.pending_input[:n]
        if proc.close_input:
            self.end_input(proc)

    def close_stdin(self, request: Message) -> dict[str, Any]:
        proc = self.find(request, running=True)
        if proc.master is not None:
            raise Failure("ValueError", f"process {proc.pid} is a pty: send it EOF (ctrl-D)")
        proc.close_input = True
        self.feed(proc)
        return {}

    def signal(self, request: Message) -> dict[str, Any]:
        proc = self.find(request, running=True)
        sig = request.get("signal")
        if sig not in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP):
            raise Failure(
                "ValueError", f"signal {str(sig)[:20]} is not one of TERM, KILL, INT, HUP"
            )
        try:
            os.killpg(proc.pid, sig)  # its process group: a shell's children too
        except ProcessLookupError:
            os.kill(proc.pid, sig)
        if sig == signal.SIGKILL:  # gone (reaped) before the answer, as a kill is awaited
            deadline = time.monotonic() + KILL_WAIT_S
            while time.monotonic() < deadline:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)
                if pid:
                    self.ended(pid, status)
                    break
                time.sleep(0.001)
        return {}

    def resize(self, request: Message) -> dict[str, Any]:
        proc = self.find(request, running=True)
        if proc.master is None:
            raise Failure("ValueError", f"process {proc.pid} has no pty")
        rows, cols = _size(request.get("size"))
        _winsize(proc.master, rows, cols)
        proc.config["pty"] = {"rows": rows, "cols": cols}
        return {}


OPS: dict[str, Callable[[Manager, Message], dict[str, Any]]] = {
    "proc_start": Manager.start,
    "proc_read": Manager.read,
    "proc_list": Manager.list,
    "proc_input": Manager.input,
    "proc_close_stdin": Manager.close_stdin,
    "proc_signal": Manager.signal,
    "proc_resize": Manager.resize,
}


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_ARG or "\0" in value:
        raise Failure("ValueError", f"{what}: a string without NUL of at most {MAX_ARG} bytes")
    return value


def _list(value: object, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > 4096:
        raise Failure("ValueError", f"{what}: a list of at most 4096 items")
    return value


def _dict(value: object) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 4096:
        raise Failure("ValueError", "envs: an object of at most 4096 variables")
    return value


def _size(value: object) -> tuple[int, int]:
    if not isinstance(value, dict):
        raise Failure("ValueError", "pty size: {rows, cols}")
    rows, cols = value.get("rows"), value.get("cols")
    if not all(isinstance(v, int) and 1 <= v <= 4096 for v in (rows, cols)):
        raise Failure("ValueError", "pty size: rows and cols between 1 and 4096")
    assert isinstance(rows, int) and isinstance(cols, int)
    return rows, cols


def _winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _controlling_tty() -> None:
    """In the child, after setsid: the pty on descriptor 0 becomes its controlling tty."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


def _become_subreaper() -> bool:
    """Keep what the processes start in this tree. gVisor does not implement
    PR_SET_CHILD_SUBREAPER (EINVAL): there a process's orphans go to init, which reaps
    them, and a kernel restart or an interrupt reaches them as it reaches the kernel's own
    (docs/protocol.md, "Process channel"). Any other failure is no kernel's lack: it ends
    the process manager."""
    try:
        libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    return True


def main(sock: socket.socket, spec: dict[str, Any]) -> None:
    """Procman's life, in init's fresh child (see init.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host's interrupt is the kernel's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _become_subreaper()
    os.environ.clear()
    os.environ.update(spec["env"])
    with contextlib.suppress(OSError):
        os.chdir("/home/user")
    Manager(sock).serve()
