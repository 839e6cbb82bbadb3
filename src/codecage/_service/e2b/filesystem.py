"""envd's `filesystem.Filesystem` Connect service (port 49983), on the kernel's file
requests (docs/protocol.md: `entry`, `walk`, `rename`, `mkdir`, `remove`, `watch`,
`watch_events`, `unwatch`) through the Manager: each takes a place in the sandbox's queue
and is a row of the audit log (`file_stat`, `file_list`, `file_mkdir`, `file_rename`,
`file_remove`, `file_watch`), but a watcher's polls for its events.

Watchers: `WatchDir` streams a watcher's events (polled from the kernel's inotify queue
every POLL_S; keepalives when asked for); `CreateWatcher` / `GetWatcherEvents` /
`RemoveWatcher` keep one on the sandbox's Manager entry (manager.WATCHERS at most), gone with it.
`allowNetworkMounts` changes nothing here: a sandbox has no network mounts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from ..._errors import FileNotFoundInSandbox, QuotaExceeded, SandboxError, WatcherNotFound
from ..._sandbox import EntryInfo, FilesystemEvent, Sandbox, WatchHandle
from ..app import MAX_LIST_DEPTH, _check_path
from .connect import Call, ConnectError, Service, field

service = Service("filesystem.Filesystem")
POLL_S = 0.2  # a WatchDir stream asks the kernel for new events this often
ENTRIES_PER_POLL = 100  # events given their entry (includeEntry) per poll
T = TypeVar("T")

FILE_TYPES = {
    "file": "FILE_TYPE_FILE",
    "dir": "FILE_TYPE_DIRECTORY",
    "symlink": "FILE_TYPE_SYMLINK",
}
EVENT_TYPES = {
    "create": "EVENT_TYPE_CREATE",
    "write": "EVENT_TYPE_WRITE",
    "remove": "EVENT_TYPE_REMOVE",
    "rename": "EVENT_TYPE_RENAME",
    "chmod": "EVENT_TYPE_CHMOD",
}
# The kernel's error names (a failed file request) as Connect codes.
REASONS = {
    "FileExistsError": "already_exists",
    "IsADirectoryError": "invalid_argument",
    "NotADirectoryError": "invalid_argument",
    "PermissionError": "permission_denied",
    "UnknownWatcher": "not_found",
    "ValueError": "invalid_argument",
}


def entry_json(entry: EntryInfo) -> dict[str, Any]:
    """E2B's EntryInfo in protobuf's JSON form (int64 as a string, enums by name)."""
    out: dict[str, Any] = {
        "name": entry.name,
        "type": FILE_TYPES.get(entry.type, "FILE_TYPE_UNSPECIFIED"),
        "path": entry.path,
        "size": str(entry.size),
        "mode": entry.mode or 0,
        "permissions": entry.permissions or "",
        "owner": entry.owner or "",
        "group": entry.group or "",
    }
    if entry.modified_time is not None:
        out["modifiedTime"] = (
            entry.modified_time.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")
        )
    if entry.symlink_target is not None:  # a link: its target's type, and where it points
        out["symlinkTarget"] = entry.symlink_target  # (no isSymlink: E2B's tests want the type)
    if entry.metadata:
        out["metadata"] = dict(entry.metadata)
    return out


def _path(message: dict[str, Any], name: str = "path") -> str:
    path = field(message, name, "str", "")
    try:
        _check_path(path)
    except Exception as exc:
        raise ConnectError("invalid_argument", f"{name}: {exc}") from None
    return str(path)


def _mapped(exc: SandboxError) -> Exception:
    if isinstance(exc, FileNotFoundInSandbox):
        return ConnectError("not_found", str(exc))
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return ConnectError("resource_exhausted", f"not enough disk space: {exc}")
    code = REASONS.get(str(getattr(exc, "reason", "")))
    return ConnectError(code, str(exc)) if code else exc


async def _call(call: Call, kind: str, subject: str, op: Callable[[Sandbox], T]) -> T:
    """One recorded file operation (the audit log's `kind`, with its paths)."""
    access = call.access
    try:
        return await run_in_threadpool(
            access.manager.file_call, access.tenant, access.sandbox_id, kind, subject, op
        )
    except SandboxError as exc:
        raise _mapped(exc) from None


async def _poll(call: Call, op: Callable[[Sandbox], T]) -> T:
    """A watcher's poll (not a row of the audit log each time: its start is)."""
    access = call.access
    try:
        return await run_in_threadpool(
            access.manager.file_poll, access.tenant, access.sandbox_id, op
        )
    except SandboxError as exc:
        raise _mapped(exc) from None


@service.unary("Stat")
async def stat(call: Call, message: dict[str, Any]) -> dict[str, Any]:
    path = _path(message)
    info = await _call(call, "file_stat", path, lambda sbx: sbx.files.get_info(path))
    return {"entry": entry_json(info)}


@service.unary("MakeDir")
async def make_dir(call: Call, message: dict[str, Any]) -> dict[str, Any]:
    path = _path(message)

    def work(sbx: Sandbox) -> EntryInfo | None:
        return sbx.files.get_info(path) if sbx.files.make_dir(path) else None

    made = await _call(call, "file_mkdir", path, work)
    if made is None:
        raise ConnectError("already_exists", f"directory '{path}' already exists")
    return {"entry": entry_json(made)}


@service.unary("Move")
async def move(call: Call, message: dict[str, Any]) -> dict[str, Any]:
    source, destination = _path(message, "source"), _path(message, "destination")
    moved = await _call(
        call,
        "file_rename",
        f"{source} -> {destination}",
        lambda sbx: sbx.files.rename(source, destination),
    )
    return {"entry": entry_json(moved)}


@service.unary("ListDir")
async def list_dir(call: Call, message: dict[str, Any]) -> dict[str, Any]:
    path = _path(message)
    depth = min(max(1, field(message, "depth", "int", 1)), MAX_LIST_DEPTH)
    entries = await _call(call, "file_list", path, lambda sbx: sbx.files.list(path, depth=depth))
    return {"entries": [entry_json(e) for e in entries]}


@service.unary("Remove")
async def remove(call: Call, message: dict[str, Any]) -> dict[str, Any]:
    path = _path(message)
    await _call(call, "file_remove", path, lambda sbx: sbx.files.remove(path))
    return {}


# -- watchers ----------------------------------------------------------------------------


async def _events(
    call: Call, handle: WatchHandle, root: str, include_entry: bool
) -> list[dict[str, Any]]:
    """A watcher's new events as E2B's FilesystemEvent messages."""
    events: list[FilesystemEvent] = await _poll(call, lambda sbx: handle.get_new_events())
    out = []
    for number, event in enumerate(events):
        item: dict[str, Any] = {"name": event.name, "type": EVENT_TYPES[event.type]}
        if include_entry and number < ENTRIES_PER_POLL and event.type != "remove":
            where = f"{root.rstrip('/')}/{event.name}" if event.name else root
            try:
                info = await _poll(call, lambda sbx, where=where: sbx.files.get_info(where))  # type: ignore[misc]
                item["entry"] = entry_json(info)
            except ConnectError:
                pass  # gone meanwhile: an event without its entry, as envd sends it
        out.append(item)
    return out


def _watch_args(message: dict[str, Any]) -> tuple[str, bool, bool]:
    path = _path(message)
    recursive = bool(field(message, "recursive", "bool", False))
    include_entry = bool(field(message, "include_entry", "bool", False))
    field(message, "allow_network_mounts", "bool", False)  # checked; nothing to allow here
    return path, recursive, include_entry


async def _start(call: Call, message: dict[str, Any]) -> tuple[WatchHandle, str, bool]:
    path, recursive, include_entry = _watch_args(message)

    def work(sbx: Sandbox) -> tuple[WatchHandle, str]:
        handle = sbx.files.watch_dir(path, recursive=recursive)
        return handle, sbx.files.get_info(path).path

    handle, root = await _call(call, "file_watch", path, work)
    return handle, root, include_entry


async def _stop(call: Call, handle: WatchHandle) -> None:
    with contextlib.suppress(ConnectError, SandboxError):  # gone with its sandbox or kernel
        await _poll(call, lambda sbx: handle.stop())


@service.stream("WatchDir", keepalive={"keepalive": {}})
async def watch_dir(call: Call, message: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    handle, root, include_entry = await _start(call, message)
    try:
        yield {"start": {}}
        while True:
            for event in await _events(call, handle, root, include_entry):
                yield {"filesystem": event}
            await asyncio.sleep(POLL_S)
    finally:
        await asyncio.shield(_stop(call, handle))


@service.unary("CreateWatcher")
async def create_watcher(call: Call, message: dict[str, Any]) -> dict[str, Any]:
    path, recursive, include_entry = _watch_args(message)
    access = call.access
    try:
        watcher_id = await run_in_threadpool(
            access.manager.watch_dir,
            access.tenant,
            access.sandbox_id,
            path,
            recursive,
            include_entry,
        )
    except QuotaExceeded as exc:
        raise ConnectError("resource_exhausted", str(exc)) from None
    except SandboxError as exc:
        raise _mapped(exc) from None
    return {"watcherId": watcher_id}


def _watcher(call: Call, message: dict[str, Any]) -> tuple[str, tuple[WatchHandle, str, bool]]:
    watcher_id = field(message, "watcher_id", "str", "")
    found = call.access.entry.watchers.get(watcher_id)
    if found is None:
        raise ConnectError("not_found", f"watcher '{watcher_id[:64]}' not found")
    return watcher_id, found


@service.unary("GetWatcherEvents")
async def get_watcher_events(call: Call, message: dict[str, Any]) -> dict[str, Any]:
    _, (handle, root, include_entry) = _watcher(call, message)
    return {"events": await _events(call, handle, root, include_entry)}


@service.unary("RemoveWatcher")
async def remove_watcher(call: Call, message: dict[str, Any]) -> dict[str, Any]:
    watcher_id, _ = _watcher(call, message)
    access = call.access
    with contextlib.suppress(WatcherNotFound):  # stopped meanwhile by another call
        await run_in_threadpool(
            access.manager.unwatch, access.tenant, access.sandbox_id, watcher_id
        )
    return {}


router = service.router()
