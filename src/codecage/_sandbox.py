"""The Sandbox SDK: a persistent Python session in the jail (close to E2B's code interpreter).

One implementation, synchronous and without a thread or event-loop hop per call;
`AsyncSandbox` (in _async.py) is derived from it.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import os
import secrets
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

from . import _state
from ._api import check_envs, prepare_code
from ._approvals import Approver, Gate, _pending_event, current_run, with_envs
from ._errors import (
    ContextNotFound,
    FileNotFoundInSandbox,
    PackageRefused,
    SandboxBusy,
    SandboxError,
    SandboxNotFound,
    SandboxPaused,
    TransportError,
    UnsupportedLanguage,
)
from ._inside import contexts as _contexts
from ._inside.messages import CommandRequest, ContextCreateRequest, ReplyRequest
from ._jail import Jailed, get_jail
from ._jail.template import Runtime
from ._jail.volumes import Attachment
from ._models import Execution, ExecutionError, Finding, KilledBy, Result
from ._policy import Policy, effective_timeout
from ._processes import (
    ProcessCommands,
    Pty,
    PtySize,
    call,
    start_process,
)
from ._volumes import Volumes
from ._wheelhouse import (
    FIND_LINKS,
    REQUIREMENT,
    Wheel,
    Wheelhouse,
    canonical,
    requested,
    site_dir,
)

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
class Context:
    """A code context: an interpreter state of its own in the sandbox (E2B's Context).
    `language` is "python" or "bash"; `cwd` is where its cells start."""

    id: str
    language: str
    cwd: str


@dataclass
class EntryInfo:
    """A file or directory in the sandbox. `list`, `get_info` and `rename` fill every
    field (as E2B's EntryInfo); `write` the first four. A symlink is described by what it
    points to, with `symlink_target` its resolved path."""

    name: str
    path: str
    type: str  # "file", "dir", "symlink" (a broken link) or "other"
    size: int
    mode: int | None = None  # the permission bits, 0o644
    permissions: str | None = None  # as `ls -l` shows them, "-rw-r--r--"
    owner: str | None = None
    group: str | None = None
    modified_time: datetime.datetime | None = None  # aware, UTC
    symlink_target: str | None = None
    metadata: dict[str, str] | None = None  # E2B's file metadata (user.e2b.* attributes)


@dataclass
class FilesystemEvent:
    """A change in a watched directory: `name` relative to it; `type` one of "create",
    "write", "remove", "rename", "chmod"."""

    name: str
    type: str


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
        template: str | None = None,
        wheelhouse: str | os.PathLike[str] | None = None,
        volumes: dict[str, str] | None = None,
        volume_store: Volumes | None = None,
        on_volume: Callable[[str, Attachment], None] | None = None,
    ) -> None:
        """`approver(request) -> bool | Decision` answers the approvals the policy asks for
        (see docs/policy.md); without one, requests wait in `codecage.approvals` until
        answered or until `approval_window_s` passes (a no). `gate` and `defaults` are the
        service's: its broker and tenant, and the limits above which a yes is needed.
        `template`: a built template's name (the policy's `template`; docs/templates.md).
        `wheelhouse`: the directory of wheels a `pip install` inside may take from
        (default $CODECAGE_WHEELHOUSE, else /var/lib/codecage/wheelhouse; docs/packages.md).
        `volumes`: `{mount path: volume name}` of `volume_store` (default: the local store,
        codecage.Volumes()), each attached to this sandbox alone until it ends
        (docs/volumes.md); `on_volume("attach" | "detach", attachment)` is told of each."""
        self.policy = policy or Policy()
        if template is not None:
            self.policy = Policy(**(self.policy.model_dump() | {"template": template}))
        self._wheelhouse_path = None if wheelhouse is None else Path(wheelhouse)
        self._wheelhouse: Wheelhouse | None = None
        # The wheels handed in so far (their records, in order; by file name), and who is
        # told of each batch before the install runs (the service's audit log).
        self.packages: list[dict[str, Any]] = []
        self._handed: dict[str, Wheel] = {}
        self.package_observer: Callable[[str | None, list[dict[str, Any]]], None] | None = None
        self._gate = gate or Gate(approver=approver)
        self._lock = threading.RLock()
        self._pausing = threading.Lock()  # a pause and a resume take turns
        self._gate.limits(self.policy, defaults)
        jail = get_jail(self.policy.isolation)
        self._envs = check_envs(envs)
        self._defaults = defaults
        attached: tuple[Attachment, ...] = ()
        if volumes:
            store = volume_store if volume_store is not None else Volumes()
            on_volume = on_volume or store.on_volume
            attached = store.attach_all(volumes)
        try:
            self._jailed: Jailed = jail.create(self.policy, self._envs, attached)
        except BaseException:
            for attachment in attached:  # nothing was mounted, or the sandbox is gone
                attachment.detach()
            raise
        self.volumes = {a.path: a.name for a in attached}
        if on_volume is not None:  # told once it runs; its detach follows, whatever ends it
            report = on_volume
            for attachment in attached:
                report("attach", attachment)
                attachment.when_detached(lambda a: report("detach", a))
        self.last_activity = time.monotonic()
        self.paused_at: float | None = None  # time.monotonic() of the pause, while paused
        # Told of each input, signal and stdin close for a process as it is sent (the
        # service's audit records of processes).
        self.proc_observer: Callable[[dict[str, Any]], None] | None = None
        self.busy = False
        self.files = Files(self)
        self.commands = Commands(self)
        self.pty = Pty(self._open_pty, self._proc_call, self.policy.output_bytes)
        _registry.add(self)

    @classmethod
    def create(
        cls,
        policy: Policy | None = None,
        *,
        envs: dict[str, str] | None = None,
        approver: Approver | None = None,
        template: str | None = None,
        volumes: dict[str, str] | None = None,
        volume_store: Volumes | None = None,
    ) -> Sandbox:
        return cls(
            policy,
            envs=envs,
            approver=approver,
            template=template,
            volumes=volumes,
            volume_store=volume_store,
        )

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
        if self._jailed.paused:
            raise SandboxPaused(f"sandbox {self.id} is paused: resume() it first")
        return self._jailed

    # -- forking (docs/fork.md) ---------------------------------------------------------------

    def fork(self) -> Sandbox:
        """A new, independent sandbox with this one's interpreter state (the default
        context's variables, its environment and working directory) and a copy of its
        workspace (/home/user), under the same policy, with its own uid, cgroups and limits:
        nothing is shared afterwards. Refused with a clear error, never partly carried: a
        variable that does not pickle (an open file, a thread, a lock) is named; other code
        contexts and running background processes must be gone first. SandboxBusy while
        code or a request runs here."""
        children: list[Sandbox] = []

        def into_child(chunks: Iterator[bytes]) -> None:
            first = next(chunks)  # a variable that does not pickle: before any sandbox
            child = Sandbox(
                self.policy,
                envs=self._envs,
                gate=self._gate,
                defaults=self._defaults,
                wheelhouse=self._wheelhouse_path,
            )
            child._handed = dict(self._handed)  # installed in the workspace it carries
            children.append(child)
            child.import_state(itertools.chain([first], chunks))

        try:
            self.export_state(into_child)
        except BaseException:
            for child in children:
                child.kill()
            raise
        return children[0]

    def export_state(
        self, consume: Callable[[Iterator[bytes]], None], *, memory: bool = True
    ) -> None:
        """This sandbox's state (docs/fork.md) as a stream of chunks, to `consume` (which
        reads them while this sandbox is held: no code runs in it meanwhile). `memory`:
        the interpreter's variables too, else only the workspace, the environment and the
        working directory. What cannot be carried raises before the first chunk."""
        if not self._lock.acquire(blocking=False):
            raise SandboxBusy(
                f"sandbox {self.id} is running code or a request: try once that has ended"
            )
        try:
            jailed = self._use()
            if jailed.procs is not None and not jailed.procs.closed:
                running = [p.pid for p in self.commands.list()]
                if running:
                    raise SandboxError(
                        f"its running processes cannot be carried (pids {running[:8]}): "
                        "kill them or wait for them first"
                    )
            self.busy = True
            consume(_state.packed(jailed, self.policy, memory))
        finally:
            self.busy = False
            self.last_activity = time.monotonic()
            self._lock.release()

    def import_state(self, chunks: Iterable[bytes]) -> None:
        """Unpack a state that `export_state` made (another sandbox's, or one saved) into
        this sandbox, inside its jail: its workspace gets the files, its default context
        the variables."""
        with self._lock:
            _state.unpack(self._use(), chunks)
            self.last_activity = time.monotonic()

    # -- pausing (docs/pause.md) -------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._jailed.paused

    def pause(self) -> None:
        """Freeze the sandbox where it is: every process stops (background ones too), no
        CPU is used, memory stays charged, and its clocks stop (the idle timeout and the CPU
        budget; `paused_timeout_s` runs instead). Nothing can run in it until `resume()`.
        SandboxBusy if code or a request is running in it now; SandboxPaused if paused."""
        with self._pausing:
            if not self._lock.acquire(blocking=False):
                raise SandboxBusy(
                    f"sandbox {self.id} is running code or a request: pause it once that has ended"
                )
            try:
                self._use().pause()
                self.paused_at = time.monotonic()
                _registry.hold(self)  # kept (and killed at exit) even if dropped meanwhile
            finally:
                self._lock.release()

    def resume(self) -> float:
        """Thaw a paused sandbox (a running one is left as it is); returns how long it was
        paused, in seconds. Its idle clock goes on from where the pause stopped it. Waits
        for a pause in progress: then it thaws what that pause froze."""
        with self._pausing:
            paused_for = self._jailed.resume()
            self.paused_at = None
            self.last_activity += paused_for
            _registry.release(self)
            return paused_for

    def run_code(
        self,
        code: str,
        *,
        language: str | None = None,
        context: Context | str | None = None,
        on_stdout: Callable[[OutputMessage], Any] | None = None,
        on_stderr: Callable[[OutputMessage], Any] | None = None,
        on_result: Callable[[Result], Any] | None = None,
        on_error: Callable[[ExecutionError], Any] | None = None,
        timeout: float | None = None,
        envs: dict[str, str] | None = None,
    ) -> Execution:
        """Run a cell. The last expression is the main result; state persists between calls.
        `language` ("python", the default, or "bash") runs it in that language's default
        context; `context` (one of create_code_context's) in that one, not both.
        `timeout` can only lower the policy's `timeout_s`. Runs on one sandbox are serialized."""
        callbacks = (on_stdout, on_stderr, on_result, on_error)
        on_event = _dispatcher(*callbacks) if any(callbacks) else None
        return self._run(
            code,
            timeout=timeout,
            envs=envs,
            on_event=on_event,
            context=_context_id(context),
            language=language,
        )

    # -- code contexts (E2B's names) ------------------------------------------------------

    def create_code_context(self, cwd: str | None = None, language: str | None = None) -> Context:
        """A new context: its own variables (python) or shell state (bash), starting in
        `cwd` (default /home/user; relative paths are under it). It lives until removed or
        until the sandbox ends; a kernel restart (a timeout, a crash) empties it."""
        name = check_language(language)
        if cwd is not None and (not isinstance(cwd, str) or "\0" in cwd or len(cwd) > 4096):
            raise SandboxError("a context's cwd must be a path without NUL bytes")
        message = ContextCreateRequest(
            op="context_create",
            context_id=secrets.token_hex(16),
            language=name,
            cwd=cwd or _contexts.HOME,
        )
        with self._lock:
            jailed = self._use()
            if sum(1 for m in jailed.setups if m.get("op") == "context_create") >= (
                _contexts.MAX_CONTEXTS - 2
            ):
                raise SandboxError(f"a sandbox holds at most {_contexts.MAX_CONTEXTS} contexts")
            reply = self._context_reply(self._request(message), message["context_id"])
            jailed.record_setup(message)  # created again, empty, after a kernel restart
        return reply

    def list_code_contexts(self) -> list[Context]:
        """Every context, in creation order; the default python one first."""
        reply = self._request({"op": "context_list"})
        _context_failed(reply, None)
        items = reply.get("contexts")
        if not isinstance(items, list) or len(items) > _contexts.MAX_CONTEXTS:
            raise TransportError("a malformed context list from the sandbox")
        return [_context(item) for item in items]

    def restart_code_context(self, context: Context | str) -> None:
        """Empty a context's state (variables, shell state) and put it back in its cwd."""
        cid = _context_id(context)
        _context_failed(self._request({"op": "context_restart", "context_id": cid}), cid)

    def remove_code_context(self, context: Context | str) -> None:
        """End a context (the default one cannot be removed)."""
        cid = _context_id(context)
        with self._lock:
            jailed = self._use()
            _context_failed(self._request({"op": "context_remove", "context_id": cid}), cid)
            jailed.forget_setup(
                lambda m: m.get("op") == "context_create" and m.get("context_id") == cid
            )

    def _is_bash(self, context: str | None, language: str) -> bool:
        """Whether a cell runs in a bash context (as the host created it: its own record)."""
        if context is None:
            return language == "bash"
        if context == _contexts.DEFAULT_BASH:
            return True
        return any(
            m.get("op") == "context_create"
            and m.get("context_id") == context
            and m.get("language") == "bash"
            for m in self._jailed.setups
        )

    def _cell_context(self, context: str | None, language: str | None) -> tuple[str, str]:
        """The language and the code context's id a cell runs in (for its audit record)."""
        bash = self._is_bash(context, check_language(language))
        default = _contexts.DEFAULT_BASH if bash else _contexts.DEFAULT
        return ("bash" if bash else "python"), context or default

    def _context_reply(self, reply: dict[str, Any], cid: str | None) -> Context:
        _context_failed(reply, cid)
        return _context(reply)

    def _run(
        self,
        code: str,
        *,
        timeout: float | None = None,
        envs: dict[str, str] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        findings: list[Finding] | None = None,
        run_id: str | None = None,
        context: str | None = None,
        language: str | None = None,
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
            context=context,
            language=language,
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
        context: str | None = None,
        language: str | None = None,
    ) -> Execution:
        """`_run` of code already through `prepare_code` (and, with `findings`, analysed)."""
        envs = check_envs(envs)
        if context is not None and language is not None:
            raise SandboxError("give a context or a language, not both")
        lang = check_language(language)
        bash = self._is_bash(context, lang)
        if bash:  # shell code: Python's analysis says nothing of it; a command's approval
            findings = []
            if self.policy.approval_commands:
                reasons = with_envs(["approval_commands=true (a bash cell)"], envs)
                self._gate.check(
                    self.policy,
                    "command",
                    reasons,
                    text,
                    sandbox_id=self.id,
                    run_id=run_id,
                    notify=None if on_event is None else _pending_event(on_event),
                )
        findings = self._gate.code(
            self.policy,
            text,
            findings,
            sandbox_id=self.id,
            run_id=run_id,
            on_event=on_event,
            envs=envs,
        )
        self._packages(text, shell=bash, run_id=run_id, on_event=on_event)
        with self._lock:
            jailed = self._use()
            self.busy = True
            try:
                if context is not None or lang != "python":
                    # The kernel runs the next cell there (then the default context again).
                    select = {"op": "context_select", "context_id": context, "language": lang}
                    _context_failed(jailed.request(select, 30), context)
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

    def _proc_call(self, message: dict[str, Any]) -> dict[str, Any]:
        return call(self, message)

    def _open_pty(self, size: PtySize, cwd: str | None, envs: dict[str, str]) -> int:
        self._gate_command("/bin/bash -i -l (a pty)", envs)
        return start_process(self, "/bin/bash", ["-i", "-l"], envs=envs, cwd=cwd, pty=size)

    def _gate_command(self, cmd: str, envs: dict[str, str]) -> None:
        """The policy's approval for commands (`approval_commands`), if it asks for one;
        then the wheels of any `pip install` in it."""
        if self.policy.approval_commands:
            reasons = with_envs(["approval_commands=true"], envs)
            self._gate.check(self.policy, "command", reasons, cmd, sandbox_id=self.id)
        self._packages(cmd, shell=True)

    # -- packages from the operator's wheelhouse (docs/packages.md) ---------------------------

    def _packages(
        self,
        text: str,
        *,
        shell: bool,
        run_id: str | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Before code or a command runs: the wheels its `pip install` needs, resolved on
        the host against the wheelhouse, checked against the policy (refused, or waiting
        for a yes), recorded, then written into the sandbox, where its pip finds them."""
        wanted = requested(text, shell)
        if not wanted:
            return
        policy = self.policy
        allow = (
            None if policy.packages_allow is None else {canonical(n) for n in policy.packages_allow}
        )
        house = self._house()
        have = house.installed() | {w.name for w in self._handed.values()}
        asks = []
        for req in wanted:
            match = REQUIREMENT.fullmatch(req)
            assert match is not None  # requested() returns only these
            name = canonical(match["name"])
            if req == match["name"] and name in have:
                continue  # installed already: the sandbox's pip says so, offline
            if allow is not None and name not in allow and name not in house.installed():
                raise PackageRefused(
                    f"{match['name']}: not allowed by the policy (packages_allow="
                    f"{sorted(allow)}); nothing was run"
                )
            asks.append(req)
        if not asks:
            return
        wheels = [w for w in house.resolve(asks) if w.wheel not in self._handed]
        for wheel in wheels:
            if wheel.requested and allow is not None and wheel.name not in allow:
                raise PackageRefused(
                    f"{wheel.name}: not allowed by the policy (packages_allow={sorted(allow)});"
                    " nothing was run"
                )
        if not wheels:
            return
        if policy.approval_packages:
            listed = "\n".join(str(w) for w in wheels)
            self._gate.check(
                policy,
                "packages",
                [f"approval_packages=true: {len(wheels)} package(s) from the wheelhouse"],
                listed,
                sandbox_id=self.id,
                run_id=run_id,
                notify=None if on_event is None else _pending_event(on_event),
            )
        handed = [self._hand_in(house, w) for w in wheels]
        records = [w.to_dict() for w in handed]
        if self.package_observer is not None:  # recorded before the install can run
            self.package_observer(run_id or current_run(), records)
        for wheel in handed:
            self._handed[wheel.wheel] = wheel
        self.packages.extend(records)

    def _house(self) -> Wheelhouse:
        if self._wheelhouse is None:
            runtime = Runtime.default()
            self._wheelhouse = Wheelhouse(
                self._wheelhouse_path, runtime.python, runtime.site_packages
            )
        return self._wheelhouse

    def _hand_in(self, house: Wheelhouse, wheel: Wheel) -> Wheel:
        """Write one wheel into the sandbox (under a temporary name, renamed whole), hashing
        the bytes as they go: the record is of what the sandbox was given."""
        digest, size = hashlib.sha256(), 0
        part = f"{FIND_LINKS}/.{wheel.wheel}.part"
        for chunk in house.open(wheel):
            self.files._write_chunk(part, chunk, append=size > 0)
            digest.update(chunk)
            size += len(chunk)
        if size == 0:
            self.files._write_chunk(part, b"", append=False)
        self.files.rename(part, f"{FIND_LINKS}/{wheel.wheel}")
        self.files.make_dir(site_dir(house.version))
        return dataclasses.replace(wheel, sha256=digest.hexdigest(), size=size)

    def kill(self) -> None:
        """End the sandbox: every process, its cgroups and its workspace are gone. Never
        waits for a run in progress: its processes die first, then the run returns."""
        self._jailed.terminate("it was killed")
        with self._lock:
            self._jailed.kill()
        _registry.discard(self)

    close = kill


def check_language(language: object) -> str:
    """ "python" (also for None) or "bash"; anything else is UnsupportedLanguage."""
    try:
        return _contexts.check_language(language)
    except ValueError as exc:
        raise UnsupportedLanguage(str(exc)) from None


def _context_id(context: Context | str | None) -> str | None:
    if context is None or isinstance(context, str):
        return context
    if isinstance(context, Context):
        return context.id
    raise SandboxError(f"a context is a Context or its id, not {type(context).__name__}")


def _context(data: object) -> Context:
    if not isinstance(data, dict):
        raise TransportError("a malformed context from the sandbox")
    fields = [data.get("context_id", data.get("id")), data.get("language"), data.get("cwd")]
    if not all(isinstance(f, str) and len(f) <= 4096 for f in fields):
        raise TransportError("a malformed context from the sandbox")
    return Context(*[str(f) for f in fields])


def _context_failed(reply: dict[str, Any], cid: str | None) -> None:
    """A context request's `failed` reply as the error it stands for."""
    if reply.get("ev") != "failed":
        return
    message = str(reply.get("message"))[:500]
    kind = reply.get("error")
    if kind == "LookupError":
        raise ContextNotFound(f"no code context {cid!r} in this sandbox")
    if kind == "ValueError" and "unsupported language" in message:
        raise UnsupportedLanguage(message)
    if kind in ("FileNotFoundError", "NotADirectoryError"):
        raise FileNotFoundInSandbox(message)
    raise SandboxError(message)


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
    error = SandboxError(message)
    error.reason = str(reply.get("error"))[:64]  # type: ignore[attr-defined]  # the kernel's name for it
    code = reply.get("errno")
    error.errno = code if isinstance(code, int) else None  # type: ignore[attr-defined]
    raise error


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
    @overload
    def read(self, path: str, format: Literal["stream"]) -> Iterator[bytes]: ...

    def read(
        self, path: str, format: Literal["bytes", "text", "stream"] = "bytes"
    ) -> bytes | str | Iterator[bytes]:
        """Read a file: its bytes, its text (UTF-8, invalid bytes replaced) or, with
        "stream", an iterator of chunks (`chunks`). The kernel's replies are untrusted: the
        size it states first bounds the transfer, as do the sandbox's own disk sizes and
        one deadline for the whole."""
        if format == "stream":
            return self.chunks(path)
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
            # A file of /proc or /sys says size 0 and has content: one chunk, at most.
            bound = min(size or FILE_CHUNK, limit)
            if offset + len(chunk) > bound or time.monotonic() > deadline:
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

    def write_files(self, files: Iterable[dict[str, Any]]) -> list[EntryInfo]:
        """Write several files (`[{"path": ..., "data": ...}]`), in order."""
        return [self.write(str(f["path"]), f["data"]) for f in files]

    def list(self, path: str = ".", depth: int = 1) -> list[EntryInfo]:
        """A directory's entries, down to `depth` levels (1: its own), sorted by path."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError("depth should be at least 1")
        return [_full_entry(e) for e in self._op("walk", path, depth=depth).get("entries", [])]

    def get_info(self, path: str) -> EntryInfo:
        """Everything about one file or directory (FileNotFoundInSandbox if missing)."""
        return _full_entry(self._op("entry", path).get("entry"))

    def rename(self, old_path: str, new_path: str) -> EntryInfo:
        """Move a file or directory (the destination's parents are created)."""
        reply = self._sbx._request(
            {"op": "rename", "args": {"source": old_path, "destination": new_path}}
        )
        _failed(reply, old_path)
        return _full_entry(reply.get("entry"))

    def set_metadata(self, path: str, metadata: dict[str, str]) -> EntryInfo:
        """Replace a file's metadata (E2B's: `user.e2b.*` extended attributes; `{}`
        removes it). Keys and values: printable ASCII; at most 4096 bytes in all."""
        check_metadata(metadata)
        return _full_entry(self._op("set_metadata", path, metadata=dict(metadata)).get("entry"))

    def exists(self, path: str) -> bool:
        return bool(self._op("stat", path).get("exists"))

    def remove(self, path: str) -> None:
        """Remove a file, or a directory with everything in it; a missing path is not an
        error (as in E2B)."""
        with contextlib.suppress(FileNotFoundInSandbox):
            self._op("remove", path)

    def watch_dir(self, path: str, recursive: bool = False) -> WatchHandle:
        """Watch a directory (and, `recursive`, those under it): `handle.get_new_events()`
        gives the changes since the last call, `handle.stop()` ends it. The kernel keeps
        the events queued between calls; a kernel restart ends the watcher."""
        reply = self._op("watch", path, recursive=bool(recursive))
        watcher = reply.get("watcher")
        if not isinstance(watcher, str) or len(watcher) > 64:
            raise TransportError("a malformed watch reply from the sandbox")
        return WatchHandle(self, watcher)

    def make_dir(self, path: str) -> bool:
        """Create a directory (and its parents); False if it already existed."""
        return bool(self._op("mkdir", path).get("created"))


def _entry(data: dict[str, Any]) -> EntryInfo:
    try:
        return EntryInfo(str(data["name"]), str(data["path"]), str(data["type"]), int(data["size"]))
    except (KeyError, TypeError, ValueError):
        raise TransportError("a malformed file entry from the sandbox") from None


def _full_entry(data: Any) -> EntryInfo:
    """The kernel's full entry (messages.EntryInfo), checked: it is the sandbox's claim."""
    if not isinstance(data, dict):
        raise TransportError("a malformed file entry from the sandbox")
    entry = _entry(data)
    try:
        target = data.get("symlink_target")
        entry.mode = int(data["mode"]) & 0o7777
        entry.permissions = str(data["permissions"])[:16]
        entry.owner, entry.group = str(data["owner"])[:256], str(data["group"])[:256]
        entry.modified_time = datetime.datetime.fromtimestamp(float(data["mtime"]), datetime.UTC)
        entry.symlink_target = None if target is None else str(target)
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict) or len(metadata) > 64:
            raise TypeError("metadata")
        entry.metadata = {str(k)[:256]: str(v)[:4096] for k, v in metadata.items()} or None
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        raise TransportError("a malformed file entry from the sandbox") from None
    return entry


def check_metadata(metadata: dict[str, str]) -> None:
    """E2B's rules for file metadata: keys and values printable US-ASCII, keys of at most
    246 bytes, at most 4096 bytes in all (each key counted with its `user.e2b.` prefix)."""
    if not isinstance(metadata, dict):
        raise ValueError("metadata: a map of strings")
    total = 0
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError("metadata: keys and values are strings")
        if not key or len(key) > 246 or not all(" " < c <= "~" for c in key):
            raise ValueError(f"metadata: a key is 1-246 printable ASCII characters: {key[:50]!r}")
        if not all(" " <= c <= "~" for c in value):
            raise ValueError(f"metadata: the value of {key!r} is not printable ASCII")
        total += len("user.e2b.") + len(key) + len(value)
    if total > 4096:
        raise ValueError("metadata: at most 4096 bytes in all")


EVENT_TYPES = ("create", "write", "remove", "rename", "chmod")


class WatchHandle:
    """A watcher of a directory in the sandbox (`Files.watch_dir`)."""

    def __init__(self, files: Files, watcher: str) -> None:
        self._files, self.id = files, watcher
        self.overflowed = False  # some events were lost (the kernel's queue was full)

    def get_new_events(self) -> list[FilesystemEvent]:
        reply = self._files._sbx._request({"op": "watch_events", "args": {"watcher": self.id}})
        _failed(reply, self.id)
        events = reply.get("events")
        if not isinstance(events, list):
            raise TransportError("a malformed watch reply from the sandbox")
        self.overflowed = self.overflowed or bool(reply.get("overflow"))
        out = []
        for event in events[:1000]:
            if not isinstance(event, dict) or event.get("type") not in EVENT_TYPES:
                raise TransportError("a malformed watch event from the sandbox")
            out.append(FilesystemEvent(str(event.get("name", ""))[:4096], str(event["type"])))
        return out

    def stop(self) -> None:
        reply = self._files._sbx._request({"op": "unwatch", "args": {"watcher": self.id}})
        if reply.get("ev") == "failed" and reply.get("error") != "UnknownWatcher":
            _failed(reply, self.id)


class Commands(ProcessCommands):
    """Shell commands inside the same sandbox. A foreground command without callbacks, cwd
    or user runs through the kernel (`/bin/sh -c`, the policy's timeout); background ones,
    and foreground ones with any of those, run under the process manager as E2B's do
    (`/bin/bash -l -c`), so they work while a cell runs and outlive kernel restarts."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sbx = sandbox
        self._call = sandbox._proc_call
        self._output_bytes = sandbox.policy.output_bytes

    def _start(self, cmd: str, envs: dict[str, str], cwd: str | None, stdin: bool) -> int:
        self._sbx._gate_command(cmd, envs)
        return start_process(
            self._sbx, "/bin/bash", ["-l", "-c", cmd], envs=envs, cwd=cwd, stdin=stdin
        )

    def _limit(self, timeout: float | None) -> float | None:
        return effective_timeout(self._sbx.policy, timeout)

    def _foreground(
        self, cmd: str, timeout: float | None, envs: dict[str, str] | None
    ) -> CommandResult:
        return self._run_in_kernel(cmd, timeout, envs)

    def _run_in_kernel(
        self, cmd: str, timeout: float | None, envs: dict[str, str] | None
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
        self._sbx._gate_command(cmd, envs)
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
    (a thread left spinning between runs counts). A paused one is held even when its
    owner drops it, until it is resumed or killed (its paused_timeout_s, or this process's
    exit): frozen, its init cannot see the host go, so nothing else would end it."""

    def __init__(self) -> None:
        self._live: weakref.WeakSet[Sandbox] = weakref.WeakSet()
        self._paused: set[Sandbox] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._at_exit = False

    def hold(self, sandbox: Sandbox) -> None:
        with self._lock:
            self._paused.add(sandbox)
            if not self._at_exit:
                self._at_exit = True
                atexit.register(self.kill_paused)

    def release(self, sandbox: Sandbox) -> None:
        with self._lock:
            self._paused.discard(sandbox)

    def kill_paused(self) -> None:
        """At exit: kill the paused sandboxes still held (a running one ends by itself
        when this process goes: its init sees the channel close)."""
        with self._lock:
            paused = list(self._paused)
        for sandbox in paused:
            with contextlib.suppress(Exception):
                sandbox.kill()

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
            self._paused.discard(sandbox)

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            self._round()

    def _round(self) -> None:
        """One look at each (its own frame: nothing of it names a sandbox afterwards)."""
        with self._lock:
            live = list(self._live)
        for sandbox in live:
            self.check(sandbox)

    def check(self, sandbox: Sandbox) -> None:
        policy, jailed = sandbox.policy, sandbox._jailed
        if not jailed.alive:
            return
        limit: KilledBy | None = None
        paused_at = sandbox.paused_at
        if jailed.paused and paused_at is not None:  # its clocks stand still, but this one
            if policy.paused_timeout_s is None:
                return
            if time.monotonic() - paused_at <= policy.paused_timeout_s:
                return
            reason = f"it was paused for more than paused_timeout_s={policy.paused_timeout_s}"
            jailed.terminate(reason)
            jailed.kill()  # nothing runs in a paused sandbox: its lock is free or soon is
            self.discard(sandbox)
            return
        idle = time.monotonic() - sandbox.last_activity
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
