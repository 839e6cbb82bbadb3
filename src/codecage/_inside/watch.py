"""Directory watchers for the kernel's `watch` requests: inotify through ctypes, no thread.

The kernel's inotify queue holds the events until the host asks for them
(`watch_events`), so nothing runs between requests; a recursive watcher adds a watch for
each directory created under it as it reads the events. Bounded: WATCHERS watchers per
kernel, WATCHES directories per watcher, EVENTS events per reply (the rest stay queued);
the kernel's own queue limit drops events past it, and the reply says so (`overflow`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import os
import struct

from .messages import WatchEvent, WatchEventsReply, WatchEventType, WatchReply

IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
IN_MODIFY, IN_ATTRIB = 0x2, 0x4
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR, IN_ISDIR = 0x4000, 0x8000, 0x01000000, 0x40000000
MASK = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)
WATCHERS, WATCHES, EVENTS = 16, 1024, 1000
_KINDS: tuple[
    tuple[int, WatchEventType], ...
] = (  # inotify's bits as E2B's event types (envd's fsnotify does the same)
    (IN_CREATE | IN_MOVED_TO, "create"),
    (IN_MODIFY, "write"),
    (IN_DELETE | IN_DELETE_SELF, "remove"),
    (IN_MOVED_FROM, "rename"),
    (IN_ATTRIB, "chmod"),
)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_ids = itertools.count(1)


class Watcher:
    def __init__(self, root: str, recursive: bool) -> None:
        self.root, self.recursive = root, recursive
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd
        self.dirs: dict[int, str] = {}  # watch descriptor -> its directory, relative to root
        self.overflow = False
        self.pending: list[WatchEvent] = []
        try:
            self._add("")
            if recursive:
                for top, subdirs, _ in os.walk(root):
                    for name in subdirs:
                        self._add(os.path.relpath(os.path.join(top, name), root))
        except BaseException:
            os.close(fd)
            raise

    def _add(self, relative: str) -> None:
        if len(self.dirs) >= WATCHES:
            raise OSError(errno.ENOSPC, f"a watcher watches at most {WATCHES} directories")
        path = os.path.join(self.root, relative) if relative else self.root
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), MASK | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        self.dirs[wd] = relative

    def drain(self) -> WatchEventsReply:
        while len(self.pending) < EVENTS:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                break
            self._parse(data)
        out, self.pending = self.pending[:EVENTS], self.pending[EVENTS:]
        overflow, self.overflow = self.overflow, False
        return WatchEventsReply(events=out, overflow=overflow)

    def _parse(self, data: bytes) -> None:
        offset = 0
        while offset + HEADER.size <= len(data):
            wd, mask, _cookie, length = HEADER.unpack_from(data, offset)
            raw = data[offset + HEADER.size : offset + HEADER.size + length]
            offset += HEADER.size + length
            if mask & IN_Q_OVERFLOW:
                self.overflow = True
                continue
            if mask & IN_IGNORED:
                self.dirs.pop(wd, None)
                continue
            base = self.dirs.get(wd)
            if base is None:
                continue
            name = os.fsdecode(raw.rstrip(b"\0"))
            relative = os.path.join(base, name) if base and name else base or name
            for bits, kind in _KINDS:
                if mask & bits:
                    self.pending.append(WatchEvent(name=relative, type=kind))
            if self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                self._adopt(relative)

    def _adopt(self, relative: str) -> None:
        """A directory that appeared under a recursive watcher: watched from now on, and
        what it already holds (made before the watch could see it) reported as created
        (and written, for a file with content)."""
        try:
            self._add(relative)
            for top, subdirs, names in os.walk(os.path.join(self.root, relative)):
                for name in subdirs:
                    inner = os.path.relpath(os.path.join(top, name), self.root)
                    self._add(inner)
                    self.pending.append(WatchEvent(name=inner, type="create"))
                for name in names:
                    inner = os.path.relpath(os.path.join(top, name), self.root)
                    self.pending.append(WatchEvent(name=inner, type="create"))
                    if os.path.getsize(os.path.join(top, name)):
                        self.pending.append(WatchEvent(name=inner, type="write"))
        except OSError:
            self.overflow = True  # a directory it cannot watch: say events are missing

    def close(self) -> None:
        os.close(self.fd)


_watchers: dict[str, Watcher] = {}


def start(path: str, recursive: bool = False) -> WatchReply:
    from .files import resolve

    if len(_watchers) >= WATCHERS:
        raise OSError(errno.EMFILE, f"at most {WATCHERS} watchers at once")
    full = resolve(path)
    if not os.path.isdir(full):
        if not os.path.exists(full):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", full)
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", full)
    watcher = Watcher(full, bool(recursive))
    watcher_id = f"w{next(_ids)}"
    _watchers[watcher_id] = watcher
    return WatchReply(watcher=watcher_id, path=full)


class UnknownWatcher(ValueError):
    pass


def _get(watcher: str) -> Watcher:
    found = _watchers.get(watcher) if isinstance(watcher, str) else None
    if found is None:
        raise UnknownWatcher(f"no watcher {watcher!r} (stopped, or the kernel restarted)")
    return found


def events(watcher: str) -> WatchEventsReply:
    return _get(watcher).drain()


def stop(watcher: str) -> dict[str, object]:
    _get(watcher).close()
    del _watchers[watcher]
    return {}
