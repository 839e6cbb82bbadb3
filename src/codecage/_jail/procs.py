"""The host's handle on a sandbox's process manager (`_inside/procman.py`).

Init starts it when the host first asks (`start_procman`: most sandboxes never need one) and
announces its channel on the supervisor channel as it announces a kernel's ("procman",
docs/protocol.md). The channel is request/reply: one request at a
time under a lock, answered at once (the host polls output with `proc_read`), so it is
usable while a cell runs on the kernel's channel. Every reply is the sandbox's claim: a
frame is size-capped, must carry the id of the request waiting for it and a reply event;
anything else ends the sandbox. Replies are checked field by field by their users.
"""

from __future__ import annotations

import contextlib
import secrets
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .._errors import SandboxNotFound, TransportError
from .._inside.messages import ProcRequest
from .._inside.protocol import FrameReader, Message, ProtocolError, encode
from .._text import valid_deep

# proc_read returns at most 1 MiB of output: base64 and JSON make that under 1.5 MiB
MAX_REPLY = 4 << 20
REPLY_S = 10.0  # the process manager answers at once; past this it is stuck


class ProcessManager:
    """One sandbox's process manager. `terminate(reason)` ends the sandbox on a protocol
    violation; `init_pid` (None where init is not a host process) finds the manager's
    host pid for `spared`."""

    def __init__(
        self, sock: socket.socket, terminate: Callable[[str], None], init_pid: int | None
    ) -> None:
        self._sock = sock
        self._sock.setblocking(False)
        self._terminate = terminate
        self._init_pid = init_pid
        self._reader = FrameReader(MAX_REPLY)
        self._pending: list[Message] = []
        self._lock = threading.Lock()
        self._issued: deque[str] = deque(maxlen=64)
        self._greeted = False
        self.closed = False
        self.ns_pid: int | None = None  # its pid inside the sandbox, from its hello
        self._host_pid: int | None = None
        self.envs: dict[str, str] = {}  # the session's own environment (a pooled sandbox)

    def close(self) -> None:
        """Never waits long for a request in flight: the socket is shut down first, which
        wakes it (it then fails); the descriptor is closed by whichever comes last."""
        self.closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._lock.acquire(timeout=REPLY_S):
            try:
                self._sock.close()
            finally:
                self._lock.release()

    def hung_up(self) -> bool:
        """Whether the process manager is gone (its channel at end of file; between requests
        nothing else may be waiting there). A request in flight says it is not."""
        from .channel import readable

        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self.closed or not readable([self._sock], 0):
                return self.closed
            try:
                gone = self._sock.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                return False
            except OSError:
                gone = True
            if gone:
                self.closed = True
                self._sock.close()
            return gone
        finally:
            self._lock.release()

    def request(self, message: ProcRequest | dict[str, Any], timeout_s: float = REPLY_S) -> Message:
        """Send one request and return its reply (`done` or `failed`)."""
        with self._lock:
            if self.closed:
                raise TransportError("the sandbox's process manager has ended")
            deadline = time.monotonic() + timeout_s
            if not self._greeted:
                self._greet(deadline)
            rid = secrets.token_hex(8)
            self._issued.append(rid)
            self._send(encode({**message, "id": rid}), deadline)
            while True:
                frame = self._next(deadline)
                fid, ev = frame.get("id"), frame.get("ev")
                if fid == rid and ev in ("done", "failed"):
                    return frame
                if fid in self._issued and ev in ("done", "failed"):
                    continue  # the late reply of a request that timed out
                self._violation(f"a frame for no request of the host's ({str(ev)[:40]!r})")

    def _greet(self, deadline: float) -> None:
        hello = self._next(deadline)
        pid = hello.get("pid")
        if hello.get("ev") != "hello" or not isinstance(pid, int) or pid < 1:
            self._violation("no hello")
        self.ns_pid, self._greeted = pid, True

    def _violation(self, why: str) -> None:
        self.closed = True
        self._sock.close()
        reason = f"its process manager broke the protocol ({why})"
        self._terminate(reason)
        raise SandboxNotFound(f"the sandbox has ended: {reason}")

    def _send(self, data: bytes, deadline: float) -> None:
        from .channel import readable

        view = memoryview(data)
        while view:
            if not readable([self._sock], deadline - time.monotonic(), select.POLLOUT):
                if time.monotonic() >= deadline:
                    raise TransportError("the sandbox's process manager stopped reading")
                continue
            try:
                view = view[self._sock.send(view) :]
            except BlockingIOError:
                continue
            except OSError as exc:
                self._gone(exc)

    def _next(self, deadline: float) -> Message:
        from .channel import readable

        while not self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError("the sandbox's process manager did not answer in time")
            if not readable([self._sock], left):
                continue
            try:
                data = self._sock.recv(1 << 18)
            except BlockingIOError:
                continue
            except OSError as exc:
                self._gone(exc)
            if not data:
                self._gone(None)
            try:
                self._pending.extend(valid_deep(m) for m in self._reader.feed(data))
            except ProtocolError as exc:
                self._violation(f"malformed frame: {exc}")
        return self._pending.pop(0)

    def _gone(self, exc: OSError | None) -> None:
        self.closed = True
        self._sock.close()
        why = f": {exc}" if exc else ""
        raise TransportError(
            "the sandbox's process manager has ended (killed from inside the sandbox?); "
            f"the next request starts a new one{why}"
        )

    # -- which host processes are its own -------------------------------------------------

    def host_pid(self) -> int | None:
        """The manager's host pid, found among init's children by the pid its hello gave."""
        if self._host_pid is not None or self._init_pid is None or self.closed:
            return self._host_pid
        if not self._greeted:
            try:
                self.request({"op": "proc_list"}, 2.0)
            except (TransportError, SandboxNotFound):
                return None
        from .proctree import _children, _nspid

        for child in _children(self._init_pid):
            if _nspid(child) == self.ns_pid:
                self._host_pid = child
        return self._host_pid

    def spared(self, keep: tuple[int, ...]) -> Spared:
        return Spared(frozenset(keep), self.host_pid())


class Spared:
    """Host pids a kernel kill or interrupt leaves alone: `keep` (init, a backend's own
    monitor), and the process manager with its whole tree (a process's ancestry is read
    from /proc when it is asked about, so a child forked during the kill is judged too)."""

    def __init__(self, keep: frozenset[int], root: int | None) -> None:
        self.keep, self.root = keep, root

    def __contains__(self, pid: object) -> bool:
        if not isinstance(pid, int):
            return False
        if pid in self.keep:
            return True
        if self.root is None:
            return False
        for _ in range(4096):
            if pid == self.root:
                return True
            if pid in self.keep or pid <= 1:
                return False
            parent = _parent(pid)
            if parent is None:
                return False
            pid = parent
        return False


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return None
