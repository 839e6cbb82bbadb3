"""The remote SDK: `codecage.connect(url, api_key)` gives sandboxes with exactly the
Sandbox / AsyncSandbox API, served by `codecage serve` (built on httpx)."""

from __future__ import annotations

import contextlib
import datetime
import json
import secrets
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, overload
from urllib.parse import quote

import httpx

from ._approvals import ApprovalRequest, Approver, Decision, answer
from ._async import AsyncSandbox, _in_thread
from ._errors import (
    CodeRejected,
    SandboxError,
    SandboxNotFound,
    TransportError,
    WatcherNotFound,
    from_wire,
)
from ._models import Execution, ExecutionError, Finding, Result
from ._policy import Policy
from ._processes import ProcessCommands, Pty, PtySize
from ._sandbox import (
    CommandResult,
    Context,
    EntryInfo,
    FilesystemEvent,
    OutputMessage,
    _context_id,
    _dispatcher,
)

NDJSON = "application/x-ndjson"


def _error(kind: str, message: str, findings: Any = None) -> SandboxError:
    """The exception the service named (its `WIRE` name), raised here as it was there."""
    cls = from_wire(kind)
    if cls is CodeRejected:
        return CodeRejected(message, [Finding(**f) for f in findings or []])
    return cls(message)


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        kind, message = str(error["type"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        kind, message, error = "HTTP", f"HTTP {response.status_code}", {}
    raise _error(kind, message, error.get("findings"))


def segment(value: str) -> str:
    """`value` as one segment of a URL's path: `/`, `?`, `#`, `%` and the dots of `.` and
    `..` escaped, so an id goes nowhere but where it is named (the service finds none)."""
    return quote(value, safe="").replace(".", "%2E")


def _overrides(policy: Policy | None) -> dict[str, Any]:
    """Only the fields the caller set: the service applies them to its own defaults."""
    return {} if policy is None else policy.model_dump(mode="json", exclude_unset=True)


class Client:
    """A connection to a codecage service."""

    def __init__(self, url: str, api_key: str, *, timeout_s: float = 660.0) -> None:
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(timeout_s, connect=10.0),
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise TransportError(f"{method} {path}: {exc}") from exc
        _raise_for(response)
        return response

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if not response.is_success:
                    response.read()
                    _raise_for(response)
                yield response
        except httpx.HTTPError as exc:
            raise TransportError(f"{method} {path}: {exc}") from exc

    def Sandbox(
        self,
        policy: Policy | None = None,
        *,
        envs: dict[str, str] | None = None,
        approver: Approver | None = None,
        snapshot: str | None = None,
        volumes: dict[str, str] | None = None,
    ) -> RemoteSandbox:
        """A new sandbox; from `snapshot` (an id or name: `create_snapshot`), its state;
        `volumes`: {mount path: name} of this tenant's volumes (docs/volumes.md)."""
        return RemoteSandbox(self, policy, envs, approver, snapshot=snapshot, volumes=volumes)

    create = Sandbox  # E2B's name

    def snapshots(self) -> list[dict[str, Any]]:
        """This tenant's snapshots (docs/fork.md): id, sandbox_id, names, size, ..."""
        return list(self.request("GET", "/v1/snapshots").json())

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.request("DELETE", f"/v1/snapshots/{segment(snapshot_id)}")

    # -- volumes (docs/volumes.md) -------------------------------------------------------

    def create_volume(self, name: str, size_mb: int, inodes: int | None = None) -> dict[str, Any]:
        body = {"name": name, "size_mb": size_mb, "inodes": inodes}
        return dict(self.request("POST", "/v1/volumes", json=body).json())

    def volumes(self) -> list[dict[str, Any]]:
        """This tenant's volumes: name, size_mb, inodes, created_at."""
        return list(self.request("GET", "/v1/volumes").json())

    def delete_volume(self, name: str) -> None:
        self.request("DELETE", f"/v1/volumes/{name}")

    def export_volume(self, name: str) -> Iterator[bytes]:
        """The volume's files as a tar stream."""
        with self.stream("GET", f"/v1/volumes/{name}/archive") as response:
            yield from response.iter_bytes()

    def import_volume(self, name: str, archive: bytes | Iterable[bytes]) -> int:
        """Unpack a tar archive into the volume (checked inside a jail); members unpacked."""
        headers = {"Content-Type": "application/octet-stream"}
        reply = self.request("PUT", f"/v1/volumes/{name}/archive", content=archive, headers=headers)
        return int(reply.json()["members"])

    def connect_sandbox(self, sandbox_id: str, *, resume: bool = True) -> RemoteSandbox:
        """A handle on a live sandbox of this tenant (made by another client, or before a
        restart of this one), resumed first if it is paused (E2B's `Sandbox.connect`)."""
        path = f"/v1/sandboxes/{segment(sandbox_id)}"
        data = self.request("POST" if resume else "GET", path + ("/resume" if resume else ""))
        return RemoteSandbox(self, None, None, attach=data.json())

    # -- approvals -------------------------------------------------------------------------

    def approvals(self) -> list[ApprovalRequest]:
        """This tenant's operations waiting for a person's yes."""
        pending = self.request("GET", "/v1/approvals").json()
        return [ApprovalRequest.from_dict(item) for item in pending]

    def approve(self, approval_id: str, reason: str = "", by: str = "") -> Decision:
        return self._decide(approval_id, "approve", reason, by)

    def deny(self, approval_id: str, reason: str = "", by: str = "") -> Decision:
        return self._decide(approval_id, "deny", reason, by)

    def _decide(self, approval_id: str, decision: str, reason: str, by: str) -> Decision:
        body = {"decision": decision, "reason": reason, "by": by}
        data = self.request("POST", f"/v1/approvals/{segment(approval_id)}", json=body).json()
        return Decision(**data)

    @contextmanager
    def _answering(self, approver: Approver | None) -> Iterator[dict[str, str]]:
        """While an operation is in flight, answer the approvals it raises with the SDK
        callback (the service holds the request; the callback runs here). The operation is
        sent with a fresh reference (the headers yielded); only requests carrying it are
        answered, never another client's."""
        if approver is None:
            yield {}
            return
        ref = secrets.token_hex(16)
        stop, seen = threading.Event(), set()

        def watch() -> None:
            while not stop.wait(0.1):
                with contextlib.suppress(SandboxError):
                    for request in self.approvals():
                        if request.id in seen or request.client_ref != ref:
                            continue
                        seen.add(request.id)
                        decision = answer(approver, request)
                        verdict = "approve" if decision.approved else "deny"
                        self._decide(request.id, verdict, decision.reason, decision.by)

        thread = threading.Thread(target=watch, name="codecage-approver", daemon=True)
        thread.start()
        try:
            yield {"X-Codecage-Ref": ref}
        finally:
            stop.set()
            thread.join()

    async def create_async(
        self, policy: Policy | None = None, *, envs: dict[str, str] | None = None
    ) -> AsyncSandbox:
        sandbox = await _in_thread(RemoteSandbox, self, policy, envs)
        return AsyncSandbox(sandbox)

    def run(
        self, code: str, policy: Policy | None = None, *, envs: dict[str, str] | None = None
    ) -> Execution:
        """A one-shot run on the service."""
        body = {"code": code, "policy": _overrides(policy), "envs": envs or {}}
        return Execution.from_dict(self.request("POST", "/v1/run", json=body).json())

    def map(
        self,
        codes: Iterable[str],
        policy: Policy | None = None,
        *,
        envs: dict[str, str] | None = None,
        concurrency: int | None = None,
        on_result: Callable[[int, Execution | SandboxError], None] | None = None,
    ) -> list[Execution | SandboxError]:
        """Many one-shot runs (`POST /v1/batch`), each a fresh sandbox, spread over the
        service's nodes: the results in the order of `codes`. A run that could not run is
        the error that refused it, in its place (as `asyncio.gather(...,
        return_exceptions=True)`); `on_result(index, result)` sees each as it finishes."""
        items = list(codes)
        body = {
            "codes": items,
            "policy": _overrides(policy),
            "envs": envs or {},
            "concurrency": concurrency,
        }
        results: list[Execution | SandboxError | None] = [None] * len(items)
        with self.stream(
            "POST", "/v1/batch", json=body, headers={"Accept": NDJSON}, timeout=None
        ) as response:
            for line in response.iter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("ev") == "end":
                    break
                if event.get("ev") != "result":
                    continue
                index = int(event["index"])
                error = event.get("error")
                item: Execution | SandboxError = (
                    Execution.from_dict(event["execution"])
                    if error is None
                    else _error(
                        str(error.get("type")), str(error.get("message")), error.get("findings")
                    )
                )
                results[index] = item
                if on_result is not None:
                    on_result(index, item)
            else:
                raise TransportError("the batch's stream ended before its end")
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise TransportError(f"the batch's stream has no result for {len(missing)} runs")
        return [r for r in results if r is not None]

    def audit(self, **filters: Any) -> list[dict[str, Any]]:
        """This tenant's audit records."""
        result: list[dict[str, Any]] = self.request("GET", "/v1/audit", params=filters).json()
        return result

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(url: str, api_key: str) -> Client:
    """Connect to `codecage serve`; `client.Sandbox(...)` then works like `codecage.Sandbox`."""
    return Client(url, api_key)


class RemoteSandbox:
    """The Sandbox API over HTTP."""

    def __init__(
        self,
        client: Client,
        policy: Policy | None,
        envs: dict[str, str] | None,
        approver: Approver | None = None,
        *,
        attach: dict[str, Any] | None = None,
        snapshot: str | None = None,
        volumes: dict[str, str] | None = None,
    ) -> None:
        self._client = client
        self._approver = approver
        data = attach
        if data is None:
            body = {
                "policy": _overrides(policy),
                "envs": envs or {},
                "snapshot": snapshot,
                "volumes": volumes or {},
            }
            with client._answering(approver) as headers:
                data = client.request("POST", "/v1/sandboxes", json=body, headers=headers).json()
        self._id: str = data["id"]
        self.policy = Policy(**data["policy"])
        self._alive = True
        self.files = RemoteFiles(self)
        self.commands = RemoteCommands(self)
        self.pty = Pty(self._open_pty, self._proc_call, self.policy.output_bytes)

    @property
    def id(self) -> str:
        return self._id

    @property
    def sandbox_id(self) -> str:
        return self._id

    @property
    def alive(self) -> bool:
        return self._alive

    def __enter__(self) -> RemoteSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"<RemoteSandbox {self._id}>"

    def fork(self) -> RemoteSandbox:
        """A new sandbox with this one's state and a copy of its workspace (docs/fork.md)."""
        made = self._client.request("POST", f"{self._base}/fork", json={"count": 1}).json()
        return RemoteSandbox(self._client, None, None, self._approver, attach=made[0])

    def create_snapshot(self, name: str | None = None, *, memory: bool = True) -> str:
        """Keep this sandbox's state and files for new sandboxes (`client.Sandbox(snapshot=)`);
        returns the snapshot's id. It runs on."""
        body = {"name": name, "memory": memory}
        return str(self._client.request("POST", f"{self._base}/snapshots", json=body).json()["id"])

    # -- pausing (docs/pause.md) -------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return bool(self._client.request("GET", self._base).json()["state"] == "paused")

    def pause(self) -> None:
        """Freeze the sandbox; it stays paused when this client goes away."""
        self._client.request("POST", f"{self._base}/pause")

    def resume(self) -> None:
        self._client.request("POST", f"{self._base}/resume")

    def _start_process(self, body: dict[str, Any]) -> int:
        with self._answering() as headers:
            reply = self._client.request(
                "POST", f"{self._base}/processes", json=body, headers=headers
            )
        return int(reply.json()["pid"])

    def _open_pty(self, size: PtySize, cwd: str | None, envs: dict[str, str]) -> int:
        pty = {"rows": size.rows, "cols": size.cols}
        return self._start_process({"pty": pty, "cwd": cwd, "envs": envs})

    def _proc_call(self, message: dict[str, Any]) -> dict[str, Any]:
        """A process manager request, as the service's process routes serve it."""
        op, base = message["op"], f"{self._base}/processes"
        http = self._client.request
        if op == "proc_list":
            found = http("GET", base).json()
            return {"processes": [{**p, "running": True} for p in found]}
        pid = int(message["pid"])
        if op == "proc_read":
            params = {} if message["offset"] is None else {"offset": message["offset"]}
            out = http("GET", f"{base}/{pid}/output", params=params).json()
            out["chunks"] = [[c["stream"], c["data"]] for c in out["chunks"]]
            return dict(out)
        if op == "proc_input":
            http("POST", f"{base}/{pid}/stdin", json={"data": message["data"]})
        elif op == "proc_close_stdin":
            http("POST", f"{base}/{pid}/close-stdin")
        elif op == "proc_signal":
            name = signal.Signals(message["signal"]).name
            http("POST", f"{base}/{pid}/signal", json={"signal": name})
        elif op == "proc_resize":
            http("POST", f"{base}/{pid}/resize", json=message["size"])
        else:
            raise SandboxError(f"unknown process operation {op!r}")
        return {}

    @property
    def _base(self) -> str:
        return f"/v1/sandboxes/{segment(self._id)}"

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
        language: str | None = None,
        context: Context | str | None = None,
    ) -> Execution:
        cell = {"language": language, "context": _context_id(context)}
        with self._answering() as headers:
            callbacks = (on_stdout, on_stderr, on_result, on_error)
            return self._run_code(code, timeout, envs, headers, *callbacks, cell=cell)

    # -- code contexts, as Sandbox's ----------------------------------------------------

    def create_code_context(self, cwd: str | None = None, language: str | None = None) -> Context:
        body = {"cwd": cwd, "language": language}
        return Context(**self._client.request("POST", f"{self._base}/contexts", json=body).json())

    def list_code_contexts(self) -> list[Context]:
        found = self._client.request("GET", f"{self._base}/contexts").json()
        return [Context(**c) for c in found]

    def restart_code_context(self, context: Context | str) -> None:
        cid = segment(str(_context_id(context)))
        self._client.request("POST", f"{self._base}/contexts/{cid}/restart")

    def remove_code_context(self, context: Context | str) -> None:
        cid = segment(str(_context_id(context)))
        self._client.request("DELETE", f"{self._base}/contexts/{cid}")

    def _answering(self) -> contextlib.AbstractContextManager[dict[str, str]]:
        return self._client._answering(self._approver)

    def _run_code(
        self,
        code: str,
        timeout: float | None,
        envs: dict[str, str] | None,
        headers: dict[str, str],
        *callbacks: Any,
        cell: dict[str, Any] | None = None,
    ) -> Execution:
        body = {"code": code, "timeout": timeout, "envs": envs or {}}
        body.update({k: v for k, v in (cell or {}).items() if v is not None})
        url = f"{self._base}/execute"
        if not any(callbacks):
            reply = self._client.request("POST", url, json=body, headers=headers)
            return Execution.from_dict(reply.json())
        dispatch = _dispatcher(*callbacks)
        with self._client.stream(
            "POST", url, json=body, headers={**headers, "Accept": NDJSON}
        ) as response:
            for line in response.iter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("ev") == "execution":
                    return Execution.from_dict(event["execution"])
                if event.get("ev") == "failed":
                    kind, message = str(event.get("type")), str(event.get("message"))
                    raise _error(kind, message, event.get("findings"))
                dispatch(event)
        raise TransportError("the stream ended without an execution")

    def kill(self) -> None:
        if self._alive:
            self._alive = False
            with contextlib.suppress(SandboxNotFound):  # already gone (idle timeout, elsewhere)
                self._client.request("DELETE", self._base)

    close = kill


class RemoteFiles:
    def __init__(self, sandbox: RemoteSandbox) -> None:
        self._sbx = sandbox

    def _url(self, suffix: str = "") -> str:
        return f"{self._sbx._base}/files{suffix}"

    @overload
    def read(self, path: str, format: Literal["bytes"] = "bytes") -> bytes: ...
    @overload
    def read(self, path: str, format: Literal["text"]) -> str: ...

    def read(self, path: str, format: Literal["bytes", "text"] = "bytes") -> bytes | str:
        with self._sbx._answering() as headers:
            params = {"path": path}
            data = self._sbx._client.request(
                "GET", self._url(), params=params, headers=headers
            ).content
        return data.decode("utf-8", "replace") if format == "text" else data

    def write(self, path: str, data: bytes | str) -> EntryInfo:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        info = self._sbx._client.request(
            "PUT",
            self._url(),
            params={"path": path},
            content=raw,
            headers={"Content-Type": "application/octet-stream"},
        ).json()
        return EntryInfo(**info)

    def list(self, path: str = ".", depth: int = 1) -> list[EntryInfo]:
        """A directory's entries, down to `depth` levels (1: its own), sorted by path."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError("depth should be at least 1")
        params = {"path": path, "depth": depth}
        entries = self._sbx._client.request("GET", self._url("/list"), params=params).json()
        return [_entry_info(e) for e in entries]

    def get_info(self, path: str) -> EntryInfo:
        """Everything about one file or directory (FileNotFoundInSandbox if missing)."""
        info = self._sbx._client.request("GET", self._url("/info"), params={"path": path})
        return _entry_info(info.json())

    def rename(self, old_path: str, new_path: str) -> EntryInfo:
        """Move a file or directory (the destination's parents are created)."""
        body = {"source": old_path, "destination": new_path}
        return _entry_info(
            self._sbx._client.request("POST", self._url("/rename"), json=body).json()
        )

    def watch_dir(self, path: str, recursive: bool = False) -> RemoteWatchHandle:
        """Watch a directory (and, `recursive`, those under it): `handle.get_new_events()`
        gives the changes since the last call, `handle.stop()` ends it."""
        body = {"path": path, "recursive": bool(recursive)}
        made = self._sbx._client.request("POST", self._url("/watchers"), json=body).json()
        return RemoteWatchHandle(self, str(made["id"]))

    def exists(self, path: str) -> bool:
        return bool(
            self._sbx._client.request("GET", self._url("/exists"), params={"path": path}).json()[
                "exists"
            ]
        )

    def remove(self, path: str) -> None:
        self._sbx._client.request("DELETE", self._url(), params={"path": path})

    def make_dir(self, path: str) -> bool:
        return bool(
            self._sbx._client.request("POST", self._url("/mkdir"), json={"path": path}).json()[
                "created"
            ]
        )


def _entry_info(data: dict[str, Any]) -> EntryInfo:
    fields: dict[str, Any] = {k: v for k, v in data.items() if k in EntryInfo.__dataclass_fields__}
    if isinstance(fields.get("modified_time"), str):
        fields["modified_time"] = datetime.datetime.fromisoformat(fields["modified_time"])
    return EntryInfo(**fields)


class RemoteWatchHandle:
    """A watcher of a directory in a remote sandbox (`RemoteFiles.watch_dir`): the
    service keeps it; each `get_new_events` asks for what happened since the last."""

    def __init__(self, files: RemoteFiles, watcher: str) -> None:
        self._files, self.id = files, watcher
        self.overflowed = False  # some events were lost (the sandbox's queue was full)

    def get_new_events(self) -> list[FilesystemEvent]:
        url = self._files._url(f"/watchers/{quote(self.id, safe='')}/events")
        reply = self._files._sbx._client.request("GET", url).json()
        self.overflowed = self.overflowed or bool(reply.get("overflowed"))
        return [FilesystemEvent(str(e["name"]), str(e["type"])) for e in reply["events"]]

    def stop(self) -> None:
        url = self._files._url(f"/watchers/{quote(self.id, safe='')}")
        with contextlib.suppress(WatcherNotFound):  # stopped already, or gone with its sandbox
            self._files._sbx._client.request("DELETE", url)


class RemoteCommands(ProcessCommands):
    def __init__(self, sandbox: RemoteSandbox) -> None:
        self._sbx = sandbox
        self._call = sandbox._proc_call
        self._output_bytes = sandbox.policy.output_bytes

    def _start(self, cmd: str, envs: dict[str, str], cwd: str | None, stdin: bool) -> int:
        return self._sbx._start_process({"cmd": cmd, "envs": envs, "cwd": cwd, "stdin": stdin})

    def _foreground(
        self, cmd: str, timeout: float | None, envs: dict[str, str] | None
    ) -> CommandResult:
        body = {"cmd": cmd, "timeout": timeout, "envs": envs or {}}
        with self._sbx._answering() as headers:
            url = f"{self._sbx._base}/commands"
            reply = self._sbx._client.request("POST", url, json=body, headers=headers)
        return CommandResult(**reply.json())
