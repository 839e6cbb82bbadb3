"""File operations, performed by the kernel inside the jail (the host never opens a path
inside a sandbox): relative paths are under /home/user, absolute ones are the sandbox's."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import stat
from collections.abc import Callable, Mapping
from typing import Any

from .messages import (
    Entry,
    EntryInfo,
    EntryReply,
    EntryType,
    ListReply,
    MkdirReply,
    ReadReply,
    RemoveReply,
    StatReply,
    WalkReply,
)

WORKSPACE = "/home/user"
CHUNK = 4 << 20
READ_PIECE = 64 << 10
WALK_ENTRIES = 10000  # entries one `walk` reply holds at most


def resolve(path: str) -> str:
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError("a path must be a non-empty string without NUL bytes")
    return os.path.normpath(os.path.join(WORKSPACE, path))


def _entry(path: str, st: os.stat_result) -> Entry:
    kind: EntryType = (
        "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
    )
    if stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    return Entry(name=os.path.basename(path) or path, path=path, type=kind, size=st.st_size)


def read(path: str, offset: int = 0, length: int = CHUNK) -> ReadReply:
    full = resolve(path)
    with open(full, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if stat.S_ISDIR(os.fstat(f.fileno()).st_mode):
            raise IsADirectoryError(21, "is a directory", path)
        f.seek(offset)
        want, parts, got = min(length, CHUNK), [], 0
        while got < want:  # in pieces: /proc/sys answers a read of 4 MiB with ENOMEM
            piece = f.read(min(want - got, READ_PIECE))
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
    data = b"".join(parts)
    # A file of /proc or /sys says size 0: its end is where a read comes back short.
    eof = got < want or offset + got >= size
    return ReadReply(data=base64.b64encode(data).decode(), size=size, eof=eof)


def write(path: str, data: str, append: bool = False) -> Entry:
    full = resolve(path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    new = not os.path.lexists(full)
    with open(full, "ab" if append else "wb") as f:
        if new:  # as envd sets a new file's owner and mode: a watcher sees create, chmod, write
            os.fchmod(f.fileno(), stat.S_IMODE(os.fstat(f.fileno()).st_mode))
        f.write(base64.b64decode(data))
    return _entry(full, os.stat(full))


def listdir(path: str) -> ListReply:
    full = resolve(path)
    entries = []
    with os.scandir(full) as it:
        for item in it:
            entries.append(_entry(item.path, item.stat(follow_symlinks=False)))
    return ListReply(entries=sorted(entries, key=lambda e: e["name"]))


def info(path: str) -> StatReply:
    full = resolve(path)
    try:
        entry = _entry(full, os.stat(full))
    except FileNotFoundError:
        return StatReply(exists=False, path=full)
    return StatReply(exists=True, **entry)


def remove(path: str) -> RemoveReply:
    full = resolve(path)
    if os.path.isdir(full) and not os.path.islink(full):
        shutil.rmtree(full)
    else:
        os.remove(full)
    return RemoveReply(path=full)


def make_dir(path: str) -> MkdirReply:
    full = resolve(path)
    existed = os.path.isdir(full)
    os.makedirs(full, exist_ok=True)
    return MkdirReply(path=full, created=not existed)


def _name_of(table: str, number: int) -> str:
    """A uid's or gid's name in the sandbox's own /etc (imported here, on first use: the
    kernel's memory is the sandbox's)."""
    import grp
    import pwd

    lookup = pwd.getpwuid if table == "passwd" else grp.getgrgid
    try:
        return str(lookup(number)[0])
    except (KeyError, OverflowError):
        return str(number)


def _info(path: str) -> EntryInfo:
    """Everything E2B's EntryInfo holds: a symlink is described by what it points to
    (`is_symlink`, `symlink_target` the resolved path), a broken one by itself."""
    st = os.lstat(path)
    link = stat.S_ISLNK(st.st_mode)
    if link:
        with contextlib.suppress(OSError):
            st = os.stat(path)
    kind: EntryType = (
        "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
    )
    if stat.S_ISLNK(st.st_mode):
        kind = "symlink"  # a link that points nowhere
    return EntryInfo(
        metadata=_metadata(path),
        name=os.path.basename(path) or path,
        path=path,
        type=kind,
        size=st.st_size,
        mode=stat.S_IMODE(st.st_mode),
        permissions=stat.filemode(st.st_mode),
        owner=_name_of("passwd", st.st_uid),
        group=_name_of("group", st.st_gid),
        mtime=st.st_mtime,
        is_symlink=link,
        symlink_target=os.path.realpath(path) if link else None,
    )


METADATA = "user.e2b."  # E2B's file metadata: extended attributes in this namespace
METADATA_BYTES = 4096


def _metadata(path: str) -> dict[str, str]:
    """The file's `user.e2b.*` attributes, the prefix stripped (none where the
    filesystem keeps no user attributes)."""
    found: dict[str, str] = {}
    try:
        names = os.listxattr(path)
    except OSError:
        return found
    for name in names:
        if name.startswith(METADATA):
            with contextlib.suppress(OSError):
                found[name[len(METADATA) :]] = os.getxattr(path, name)[:METADATA_BYTES].decode(
                    "utf-8", "replace"
                )
    return found


def set_metadata(path: str, metadata: dict[str, str]) -> EntryReply:
    """Replace the file's `user.e2b.*` attributes with `metadata` (empty: remove them)."""
    full = resolve(path)
    if not isinstance(metadata, dict) or len(metadata) > 64:
        raise ValueError("metadata: a map of at most 64 keys")
    try:
        current = {n for n in os.listxattr(full) if n.startswith(METADATA)}
    except OSError:
        if metadata:
            raise
        current = set()  # a filesystem without user attributes has none to clear
    for name in current - {METADATA + str(k) for k in metadata}:
        os.removexattr(full, name)
    for key, value in metadata.items():
        os.setxattr(full, METADATA + str(key), str(value).encode())
    return EntryReply(entry=_info(full))


def entry(path: str) -> EntryReply:
    return EntryReply(entry=_info(resolve(path)))


def walk(path: str, depth: int = 1) -> WalkReply:
    """A directory's entries down to `depth` levels (1: its own), sorted by path; symlinks
    to directories are not followed. At most WALK_ENTRIES (`truncated` then)."""
    full = resolve(path)
    if not os.path.isdir(full):
        os.scandir(full).close()  # the error a missing path or a file gives
    depth = max(1, int(depth))
    found: list[EntryInfo] = []
    truncated = False

    def visit(directory: str, level: int) -> None:
        nonlocal truncated
        with os.scandir(directory) as it:
            items = sorted(it, key=lambda e: e.name)
        for item in items:
            if len(found) >= WALK_ENTRIES:
                truncated = True
                return
            try:
                found.append(_info(item.path))
            except FileNotFoundError:
                continue  # gone meanwhile
            if level < depth and item.is_dir(follow_symlinks=False):
                with contextlib.suppress(PermissionError):
                    visit(item.path, level + 1)

    visit(full, 1)
    return WalkReply(entries=sorted(found, key=lambda e: e["path"]), truncated=truncated)


def rename(source: str, destination: str) -> EntryReply:
    """Move a file or directory (creating the destination's parents)."""
    src, dst = resolve(source), resolve(destination)
    os.lstat(src)  # FileNotFoundError before any directory is made
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.rename(src, dst)
    return EntryReply(entry=_info(dst))


def _watch(name: str) -> Callable[..., Mapping[str, Any]]:
    """A watcher op of watch.py, imported on first use (ctypes: memory a sandbox that never
    watches would pay for)."""

    def call(**args: Any) -> Mapping[str, Any]:
        from . import watch

        op: Callable[..., Mapping[str, Any]] = getattr(watch, name)
        return op(**args)

    return call


# Each op's reply is messages.REPLIES[op].
OPS: dict[str, Callable[..., Mapping[str, Any]]] = {
    "read": read,
    "write": write,
    "list": listdir,
    "stat": info,
    "remove": remove,
    "mkdir": make_dir,
    "entry": entry,
    "walk": walk,
    "rename": rename,
    "watch": _watch("start"),
    "watch_events": _watch("events"),
    "unwatch": _watch("stop"),
    "set_metadata": set_metadata,
}
