"""File operations, performed by the kernel inside the jail (the host never opens a path
inside a sandbox): relative paths are under /home/user, absolute ones are the sandbox's."""

from __future__ import annotations

import base64
import os
import shutil
import stat
from collections.abc import Callable, Mapping
from typing import Any

from .messages import Entry, EntryType, ListReply, MkdirReply, ReadReply, RemoveReply, StatReply

WORKSPACE = "/home/user"
CHUNK = 4 << 20


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
        data = f.read(min(length, CHUNK))
    return ReadReply(
        data=base64.b64encode(data).decode(), size=size, eof=offset + len(data) >= size
    )


def write(path: str, data: str, append: bool = False) -> Entry:
    full = resolve(path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "ab" if append else "wb") as f:
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


# Each op's reply is messages.REPLIES[op].
OPS: dict[str, Callable[..., Mapping[str, Any]]] = {
    "read": read,
    "write": write,
    "list": listdir,
    "stat": info,
    "remove": remove,
    "mkdir": make_dir,
}
