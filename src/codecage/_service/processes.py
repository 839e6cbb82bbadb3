"""Background processes through the Manager: a durable start record before a process
starts, and an end record when it ends, whoever watches it (or nobody).

`ProcessRecords` holds the run id of every process the service started and a thread that
looks at the sandboxes holding them (every `POLL_S`): a process seen ended gets its
completion record (exit code or signal, duration, the output its buffer still held); a
sandbox that ended gets a `killed` one (ended with it), and a process manager that lost it
a `failed` one. The end record also says what was sent to the process (`observe`): how
many bytes of input and their sha256, the last 64 KiB of it (a terminal's keys), each
signal, whether its stdin was closed. A sandbox is swept once more before it is deleted, and at shutdown the
rest are recorded as killed before the audit log closes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._errors import ProcessNotFound, SandboxError, TransportError
from .._models import Execution, ExecutionError
from .._processes import call

if TYPE_CHECKING:
    from .._sandbox import Sandbox
    from .manager import Manager

POLL_S = 0.5
# A process manager stopped by code in its sandbox delays the others' records this long at
# most per sweep (its own are looked at again next time).
REPLY_S = 1.0
OUTPUT_BYTES = 64 << 10  # the tail of a process's output kept in its end record
INPUT_BYTES = 64 << 10  # and of its input (a terminal's keys)


@dataclass
class Watched:
    run_id: str
    sandbox: Sandbox
    pid: int
    started: float
    # What was sent to it: every byte of input counted and hashed (its tail kept), every
    # signal, the close of its stdin, in its end record.
    input_bytes: int = 0
    input_digest: Any = field(default_factory=hashlib.sha256)
    input_tail: bytearray = field(default_factory=bytearray)
    signals: list[int] = field(default_factory=list)
    stdin_closed: bool = False

    def sent(self) -> list[dict[str, Any]]:
        """The end record's account of what was sent to the process."""
        if not (self.input_bytes or self.signals or self.stdin_closed):
            return []
        return [
            {
                "stdin_bytes": self.input_bytes,
                "stdin_sha256": self.input_digest.hexdigest(),
                "stdin_tail": bytes(self.input_tail).decode("utf-8", "replace"),
                "signals": list(self.signals),
                "stdin_closed": self.stdin_closed,
            }
        ]


class ProcessRecords:
    def __init__(self, manager: Manager) -> None:
        self._manager = manager
        self._lock = threading.Lock()
        self._watched: dict[tuple[str, int], Watched] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def add(self, run_id: str, sandbox: Sandbox, pid: int) -> None:
        with self._lock:
            self._watched[(sandbox.id, pid)] = Watched(run_id, sandbox, pid, time.monotonic())
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="codecage-process-records", daemon=True
                )
                self._thread.start()

    def observe(self, sandbox_id: str, message: dict[str, Any]) -> None:
        """An input, signal or stdin close sent to a process (Sandbox.proc_observer)."""
        pid = message.get("pid")
        with self._lock:
            w = self._watched.get((sandbox_id, pid)) if isinstance(pid, int) else None
            if w is None:
                return
            op = message.get("op")
            if op == "proc_input":
                with contextlib.suppress(ValueError, TypeError, binascii.Error):
                    data = base64.b64decode(str(message.get("data", "")), validate=True)
                    w.input_bytes += len(data)
                    w.input_digest.update(data)
                    w.input_tail += data
                    del w.input_tail[:-INPUT_BYTES]
            elif op == "proc_signal" and len(w.signals) < 64:
                w.signals.append(int(message.get("signal", 0)))
            elif op == "proc_close_stdin":
                w.stdin_closed = True

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.sweep()
            except Exception:  # an audit write that failed (a full disk, a slow commit):
                continue  # the thread goes on, or no process's end would be recorded again

    def sweep(self, sandbox_id: str | None = None) -> None:
        """Record every watched process (of one sandbox, or all) that has ended. Those of a
        sandbox that has ended were killed with it."""
        with self._lock:
            by_sandbox: dict[str, list[Watched]] = {}
            for w in self._watched.values():
                if sandbox_id is None or w.sandbox.id == sandbox_id:
                    by_sandbox.setdefault(w.sandbox.id, []).append(w)
        for watched in by_sandbox.values():
            sandbox = watched[0].sandbox
            if not sandbox.alive:
                for w in watched:
                    self._killed(w, f"the sandbox ended: {sandbox._jailed.ended_because}")
                continue
            try:
                reply = call(sandbox, {"op": "proc_list"}, touch=False, timeout_s=REPLY_S)
                running = {
                    p.get("pid") for p in reply.get("processes") or [] if p.get("running") is True
                }
            except (SandboxError, AttributeError, TypeError):
                continue  # looked at again next time (or its sandbox has ended by then)
            for w in watched:
                if w.pid not in running:
                    self._end(w)

    def _end(self, w: Watched) -> None:
        try:
            reply = call(
                w.sandbox,
                {"op": "proc_read", "pid": w.pid, "offset": 0, "max_bytes": 1 << 20},
                touch=False,  # watching is not using: the sandbox's idle timeout still runs
                timeout_s=REPLY_S,
            )
        except ProcessNotFound:
            self._fail(w, ProcessNotFound("its sandbox's process manager lost it"))
            return
        except (SandboxError, TransportError):
            return  # looked at again next time
        if reply.get("running") is not False:
            return
        ex = Execution(duration_ms=(time.monotonic() - w.started) * 1000)
        code, sig = reply.get("exit_code"), reply.get("signal")
        ex.exit_code = code if isinstance(code, int) and not isinstance(code, bool) else None
        if isinstance(sig, int) and not isinstance(sig, bool):
            ex.exit_code, ex.killed_by = 128 + sig, "signal"
            ex.error = ExecutionError("ProcessKilled", f"killed by signal {sig}", "")
        out, err = _tail(reply.get("chunks"))
        ex.logs.stdout, ex.logs.stderr = [out], [err]
        dropped = reply.get("dropped")
        ex.truncated = isinstance(dropped, int) and dropped > 0
        self._manager.finish(w.run_id, "process", ex, w.sent())
        self._forget(w)  # once recorded: a record that failed is tried again next time

    def _killed(self, w: Watched, why: str) -> None:
        """A process that died with its sandbox (its last output is gone with it)."""
        ex = Execution(duration_ms=(time.monotonic() - w.started) * 1000, exit_code=137)
        ex.killed_by, ex.error = "signal", ExecutionError("SandboxEnded", why[:1000], "")
        self._forget(w)
        self._manager.finish(w.run_id, "process", ex, w.sent())

    def _fail(self, w: Watched, exc: BaseException) -> None:
        self._forget(w)
        self._manager.fail(w.run_id, "process", exc)

    def _forget(self, w: Watched) -> None:
        with self._lock:
            self._watched.pop((w.sandbox.id, w.pid), None)

    def close(self) -> None:
        """At shutdown (every sandbox killed): the processes still watched were killed."""
        self._stop.set()
        with self._lock:
            rest = list(self._watched.values())
        for w in rest:
            self._killed(w, "the service shut down")


def _tail(chunks: object) -> tuple[str, str]:
    """The last OUTPUT_BYTES of a process's buffered output, by stream (pty as stdout)."""
    out, err = bytearray(), bytearray()
    if isinstance(chunks, list):
        for item in chunks[-4096:]:
            try:
                stream, text = item
                data = base64.b64decode(str(text), validate=True)
            except (ValueError, TypeError, binascii.Error):
                continue
            (err if stream == "stderr" else out).extend(data)
    return (
        bytes(out[-OUTPUT_BYTES:]).decode("utf-8", "replace"),
        bytes(err[-OUTPUT_BYTES:]).decode("utf-8", "replace"),
    )
