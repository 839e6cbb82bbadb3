"""The Sandbox SDK: a persistent Python session in the jail (close to E2B's code interpreter).

One implementation, synchronous and without a thread or event-loop hop per call;
`AsyncSandbox` (in _async.py) is derived from it.
"""

from __future__ import annotations

import base64
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, overload

from ._api import check_envs, prepare_code
from ._approvals import Approver, Gate, with_envs
from ._errors import FileNotFoundInSandbox, SandboxError, SandboxNotFound, TransportError
from ._inside.messages import CommandRequest, ReplyRequest
from ._jail import Jailed, get_jail
from ._models import Execution, ExecutionError, Finding, KilledBy, Result
from ._policy import Policy, effective_timeout

FILE_CHUNK = 4 << 20


@dataclass
class OutputMessage:
    """One chunk of stdout or stderr, as passed to on_stdout / on_stderr."""

    line: str
    timestamp: float
    error: bool = False

    def __str__(self) -> str:
        return self.line


@dataclass
class EntryInfo:
    name: str
    path: str
    type: str  # "file", "dir", "symlink" or "other"
    size: int


@dataclass
class CommandResult:
    stdout: str
    stderr: str
    exit_code: int
    error: str | None = None
    truncated: bool = False
    # The host's verdict when a limit ended the sandbox during the command ("cpu_limit"):
    # the command's value; the next call on the sandbox is the error.
    killed_by: KilledBy | None = None


class Sandbox:
    """A live sandbox. `with Sandbox() as sbx: sbx.run_code("1 + 1").text  # "2"`."""

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        envs: dict[str, str] | None = None,
        approver: Approver | None = None,
        gate: Gate | None = None,
        defaults: Policy | None = None,
    ) -> None:
        """`approver(request) -> bool | Decision` answers the approvals the policy asks for
        (see docs/policy.md); without one, requests wait in `codecage.approvals` until
        answered or until `approval_window_s` passes (a no). `gate` and `defaults` are the
        service's: its broker and tenant, and the limits above which a yes is needed."""
        self.policy = policy or Policy()
        self._gate = gate or Gate(approver=approver)
        self._lock = threading.RLock()
        self._gate.limits(self.policy, defaults)
        jail = get_jail(self.policy.isolation)
        self._jailed: Jailed = jail.create(self.policy, check_envs(envs))
        self.last_activity = time.monotonic()
        self.busy = False
        self.files = Files(self)
        self.commands = Commands(self)
        _registry.add(self)

    @classmethod
    def create(
        cls,
        policy: Policy | None = None,
        *,
        envs: dict[str, str] | None = None,
        approver: Approver | None = None,
    ) -> Sandbox:
        return cls(policy, envs=envs, approver=approver)

    @property
    def id(self) -> str:
        return self._jailed.id

    @property
    def sandbox_id(self) -> str:
        return self._jailed.id

    @property
    def alive(self) -> bool:
        return self._jailed.alive

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} {'alive' if self.alive else 'ended'}>"

    def _use(self) -> Jailed:
        if not self._jailed.alive:
            raise SandboxNotFound(f"sandbox {self.id} has ended: {self._jailed.ended_because}")
        return self._jailed

    def run_code(
        self,
        code: str,
        *,
        on_stdout: Callable[[OutputMessage], Any] | None = None,
        on_stderr: Callable[[OutputMessage], Any] | None = None,
        on_result: Callable[[Result], Any] | None = None,
        on_error: Callable[[ExecutionError], Any] | None = None,
        timeout: float | None = None,
        envs: dict[str, str] | None = None,
    ) -> Execution:
        """Run a cell. The last expression is the main result; state persists between calls.
        `timeout` can only lower the policy's `timeout_s`. Runs on one sandbox are serialized."""
        callbacks = (on_stdout, on_stderr, on_result, on_error)
        on_event = _dispatcher(*callbacks) if any(callbacks) else None
        return self._run(code, timeout=timeout, envs=envs, on_event=on_event)

    def _run(
        self,
        code: str,
        *,
        timeout: float | None = None,
        envs: dict[str, str] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        findings: list[Finding] | None = None,
        run_id: str | None = None,
    ) -> Execution:
        """run_code with the raw protocol events (for the service's NDJSON stream). The
        static-analysis verdict and any approval come first: blocked or denied code never
        reaches the sandbox."""
        return self._run_prepared(
            prepare_code(code),
            timeout=timeout,
            envs=envs,
            on_event=on_event,
            findings=findings,
            run_id=run_id,
        )

    def _run_prepared(
        self,
        text: str,
        *,
        timeout: float | None = None,
        envs: dict[str, str] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        findings: list[Finding] | None = None,
        run_id: str | None = None,
    ) -> Execution:
        """`_run` of code already through `prepare_code` (and, with `findings`, analysed)."""
        envs = check_envs(envs)
        findings = self._gate.code(
            self.policy,
            text,
            findings,
            sandbox_id=self.id,
            run_id=run_id,
            on_event=on_event,
            envs=envs,
        )
        with self._lock:
            jailed = self._use()
            self.busy = True
            try:
                ex = jailed.execute(
                    text, mode="session", timeout_s=timeout, envs=envs, on_event=on_event
                )
                ex.findings = findings
                return ex
            finally:
                self.busy = False
                self.last_activity = time.monotonic()
                if not jailed.alive:  # ended meanwhile (kill(), the watchdog): release the rest
                    jailed.kill()

    def _request(
        self, message: ReplyRequest | dict[str, Any], timeout_s: float | None = None
    ) -> dict[str, Any]:
        with self._lock:
            jailed = self._use()
            self.busy = True
            try:
                limit = self.policy.timeout_s if timeout_s is None else timeout_s
                return jailed.request(message, limit)
            finally:
                self.busy = False
                self.last_activity = time.monotonic()
                if not jailed.alive:  # ended meanwhile (kill(), the watchdog): release the rest
                    jailed.kill()

    def kill(self) -> None:
        """End the sandbox: every process, its cgroups and its workspace are gone. Never
        waits for a run in progress: its processes die first, then the run returns."""
        self._jailed.terminate("it was killed")
        with self._lock:
            self._jailed.kill()
        _registry.discard(self)

    close = kill


def _dispatcher(
    on_stdout: Callable[[OutputMessage], Any] | None,
    on_stderr: Callable[[OutputMessage], Any] | None,
    on_result: Callable[[Result], Any] | None,
    on_error: Callable[[ExecutionError], Any] | None,
) -> Callable[[dict[str, Any]], None]:
    def on_event(event: dict[str, Any]) -> None:
        ev = event.get("ev")
        if ev == "stdout" and on_stdout and isinstance(event.get("text"), str):
            on_stdout(OutputMessage(event["text"], time.time()))
        elif ev == "stderr" and on_stderr and isinstance(event.get("text"), str):
            on_stderr(OutputMessage(event["text"], time.time(), error=True))
        elif ev == "result" and on_result and isinstance(event.get("data"), dict):
            on_result(Result.from_bundle(event["data"], bool(event.get("is_main_result"))))
        elif ev == "error" and on_error:
            on_error(
                ExecutionError(
                    str(event.get("name")), str(event.get("value")), str(event.get("traceback"))
                )
            )

    return on_event


def _failed(reply: dict[str, Any], path: str) -> None:
    if reply.get("ev") != "failed":
        return
    message = f"{path}: {reply.get('message')}"
    if reply.get("error") == "FileNotFoundError":
        raise FileNotFoundInSandbox(message)
    raise SandboxError(message)


class Files:
    """Files inside the sandbox: relative paths are under /home/user. The kernel inside the
    jail performs every operation, so the jail confines them."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sbx = sandbox

    def _op(self, op: str, path: str, **args: Any) -> dict[str, Any]:
        reply = self._sbx._request({"op": op, "args": {"path": path, **args}})
        _failed(reply, path)
        return reply

    @overload
    def read(self, path: str, format: Literal["bytes"] = "bytes") -> bytes: ...
    @overload
    def read(self, path: str, format: Literal["text"]) -> str: ...

    def read(self, path: str, format: Literal["bytes", "text"] = "bytes") -> bytes | str:
        """Read a file. The kernel's replies are untrusted: the size it states first bounds
        the transfer, as do the sandbox's own disk sizes and one deadline for the whole."""
        data = b"".join(self.chunks(path))
        return data.decode("utf-8", "replace") if format == "text" else data

    def chunks(self, path: str) -> Iterator[bytes]:
        """A file, one chunk (at most FILE_CHUNK bytes) at a time: the host holds one chunk
        at a time, however large the file. Bounded as `read` is."""
        policy = self._sbx.policy
        limit = (policy.disk_mb + policy.tmp_mb + policy.shm_mb) << 20
        if policy.approval_download_mb is not None:
            stated = self._op("stat", path).get("size")
            if not isinstance(stated, int) or stated < 0:
                raise FileNotFoundInSandbox(f"{path}: not a file")
            if stated > policy.approval_download_mb * (1 << 20):
                why = f"a download of {stated} bytes, over approval_download_mb={policy.approval_download_mb:g}"
                self._sbx._gate.check(policy, "download", [why], path, sandbox_id=self._sbx.id)
            limit = min(limit, stated)  # what was approved (or let through) is all that comes
        deadline = time.monotonic() + (policy.timeout_s or 600)
        offset, size = 0, None
        while True:
            reply = self._op("read", path, offset=offset, length=FILE_CHUNK)
            try:
                chunk = base64.b64decode(str(reply.pop("data", "")), validate=True)
                stated = int(reply["size"])
                eof = reply.get("eof") is not False
            except (ValueError, KeyError, TypeError):
                raise TransportError(f"{path}: a malformed reply from the sandbox") from None
            del reply  # the base64 text is gone before the chunk goes on
            size = stated if size is None else size
            if offset + len(chunk) > min(size, limit) or time.monotonic() > deadline:
                raise TransportError(f"{path}: the sandbox sent more than the file's size or limit")
            offset += len(chunk)
            last = eof or not chunk or offset >= size
            yield chunk
            if last:
                return

    def write(self, path: str, data: bytes | str) -> EntryInfo:
        """Write a file, creating its parent directories."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        info = None
        for start in range(0, max(len(raw), 1), FILE_CHUNK):
            info = self._write_chunk(path, raw[start : start + FILE_CHUNK], append=start > 0)
        assert info is not None
        return info

    def _write_chunk(self, path: str, chunk: bytes, append: bool) -> EntryInfo:
        """One piece of a file (at most FILE_CHUNK bytes): the first replaces the file, the
        following ones append to it."""
        return _entry(self._op("write", path, data=base64.b64encode(chunk).decode(), append=append))

    def list(self, path: str = ".") -> list[EntryInfo]:
        return [_entry(e) for e in self._op("list", path).get("entries", [])]

    def exists(self, path: str) -> bool:
        return bool(self._op("stat", path).get("exists"))

    def remove(self, path: str) -> None:
        self._op("remove", path)

    def make_dir(self, path: str) -> bool:
        """Create a directory (and its parents); False if it already existed."""
        return bool(self._op("mkdir", path).get("created"))


def _entry(data: dict[str, Any]) -> EntryInfo:
    try:
        return EntryInfo(str(data["name"]), str(data["path"]), str(data["type"]), int(data["size"]))
    except (KeyError, TypeError, ValueError):
        raise TransportError("a malformed file entry from the sandbox") from None


class Commands:
    """Shell commands inside the same sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sbx = sandbox

    def run(
        self, cmd: str, *, timeout: float | None = None, envs: dict[str, str] | None = None
    ) -> CommandResult:
        limit = effective_timeout(self._sbx.policy, timeout)
        envs = check_envs(envs)
        message = CommandRequest(
            op="command",
            cmd=cmd,
            timeout_s=limit,
            envs=envs,
            output_bytes=self._sbx.policy.output_bytes,
        )
        policy = self._sbx.policy
        if policy.approval_commands:
            reasons = with_envs(["approval_commands=true"], envs)
            self._sbx._gate.check(policy, "command", reasons, cmd, sandbox_id=self._sbx.id)
        started_alive = self._sbx._jailed.alive  # ended before: the call is the error
        # The kernel enforces the timeout; the host waits a little longer as a backstop.
        jailed = self._sbx._jailed
        try:
            reply = self._sbx._request(message, None if limit is None else limit + 5)
        except SandboxNotFound:
            hit = jailed.ended_limit
            if hit is None or not started_alive:
                raise
            because = jailed.ended_because
            return CommandResult(
                stdout="",
                stderr="",
                exit_code=128 + signal.SIGKILL,
                error=f"{hit}: the sandbox has ended ({because}); its state is lost",
                killed_by=hit,
            )
        _failed(reply, cmd)
        code = reply.get("exit_code")
        if not isinstance(code, int):
            raise TransportError("a malformed command reply from the sandbox")
        return CommandResult(
            stdout=str(reply.get("stdout", ""))[: self._sbx.policy.output_bytes],
            stderr=str(reply.get("stderr", ""))[: self._sbx.policy.output_bytes],
            exit_code=code,
            error=f"timed out after {limit} s" if reply.get("timed_out") else None,
            truncated=bool(reply.get("truncated")),
        )


class _Registry:
    """Live sandboxes of this process, watched for idle time and for their CPU budget
    (a thread left spinning between runs counts)."""

    def __init__(self) -> None:
        self._live: weakref.WeakSet[Sandbox] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, sandbox: Sandbox) -> None:
        with self._lock:
            self._live.add(sandbox)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, name="codecage-watchdog", daemon=True
                )
                self._thread.start()

    def discard(self, sandbox: Sandbox) -> None:
        with self._lock:
            self._live.discard(sandbox)

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            with self._lock:
                live = list(self._live)
            for sandbox in live:
                self.check(sandbox)

    def check(self, sandbox: Sandbox) -> None:
        policy, jailed = sandbox.policy, sandbox._jailed
        if not jailed.alive:
            return
        idle = time.monotonic() - sandbox.last_activity
        limit: KilledBy | None = None
        if not sandbox.busy and policy.idle_timeout_s is not None and idle > policy.idle_timeout_s:
            reason = f"idle for more than idle_timeout_s={policy.idle_timeout_s}"
        else:  # busy or not: a sandbox's CPU budget covers everything it ever ran
            try:
                used = jailed.usage().cpu_s
            except OSError:
                return
            if policy.cpu_s is None or used <= policy.cpu_s:
                return
            reason, limit = f"it used its cpu_s={policy.cpu_s} budget", "cpu_limit"
        jailed.terminate(reason, limit)  # never waits: a run in progress returns the limit
        if sandbox._lock.acquire(blocking=False):
            try:
                jailed.kill()
            finally:
                sandbox._lock.release()
        self.discard(sandbox)


_registry = _Registry()
