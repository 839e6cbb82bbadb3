"""A sandbox's state, carried into another sandbox (docs/fork.md): `pack` in the sandbox
forked from, `unpack` in the new one; the host only moves the bytes between them.

The stream is a tar archive (streamed: nothing is held whole): first `state.pkl`, the
default Python context's variables (cloudpickle: functions and classes defined in cells go
by value, modules by name), the kernel's environment, working directory and execution
count; then the workspace (/home/user) as `workspace/...`, symlinks as symlinks. What
cannot be carried is refused, never dropped: a variable that does not pickle (an open
file, a lock, a thread, a generator) is named in the error, as are other code contexts
and running background processes (the host checks those).

The archive is unpacked inside the new sandbox's jail, each member checked first (a
relative name under the workspace, no `..`, nothing written through a symlink or a hard
link to outside it, no device, no setuid bit: `_check`), and the state is unpickled
there: whatever the archive holds can do no more than code run in that sandbox.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import re
import secrets
import tarfile
import threading
from typing import Any

from .contexts import DEFAULT, HOME

PIECE = 1 << 20  # the packer's unit: chunks of the stream are made of these
QUEUED = 4  # pieces the packer may be ahead of the host
STATE = "state.pkl"
ROOT = "workspace"
# IPython's own names in the namespace (output caches, history, helpers): never carried.
_IPYTHON = re.compile(r"_+|_i+|_i\d+|_\d+|_[iod]h|In|Out|exit|quit|get_ipython")


def carried_names(shell: Any) -> dict[str, Any]:
    hidden = getattr(shell, "user_ns_hidden", {})
    return {
        name: value
        for name, value in shell.user_ns.items()
        if name not in hidden and not _IPYTHON.fullmatch(name) and not name.startswith("__")
    }


def dump_state(shell: Any, cwd: str, memory: bool = True) -> bytes:
    """The session's state, pickled; ValueError naming each variable that cannot be.
    Without `memory`, no variable: the environment and the working directory only."""
    import cloudpickle

    names = carried_names(shell) if memory else {}
    state = {
        "names": names,
        "env": dict(os.environ),
        "cwd": cwd,
        "execution_count": int(getattr(shell, "execution_count", 1)),
    }
    try:
        return bytes(cloudpickle.dumps(state))
    except Exception:
        pass
    refused = []
    for name, value in names.items():
        try:
            cloudpickle.dumps(value)
        except Exception as exc:
            refused.append(f"{name} ({type(value).__name__}: {str(exc)[:80]})")
    if not refused:
        raise ValueError("the session's state cannot be pickled as a whole")
    raise ValueError(
        "these variables cannot be carried to another sandbox: "
        + "; ".join(refused[:20])
        + ("; ..." if len(refused) > 20 else "")
        + " (del them, or keep what they hold in files)"
    )


class _Sink(io.RawIOBase):
    """tarfile's output: pieces of PIECE bytes into a bounded queue (blocking when full)."""

    def __init__(
        self, out: queue.Queue[bytes | BaseException | None], cancelled: threading.Event
    ) -> None:
        self.out, self.cancelled, self.buffer = out, cancelled, bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.cancelled.is_set():
            raise OSError("the pack was abandoned")
        self.buffer += data
        while len(self.buffer) >= PIECE:
            self.out.put(bytes(self.buffer[:PIECE]))
            del self.buffer[:PIECE]
        return len(data)

    def finish(self) -> None:
        if self.buffer:
            self.out.put(bytes(self.buffer))
            self.buffer.clear()


class Packer:
    """One pack in progress: a thread writes the stream, `take` hands it out in chunks."""

    def __init__(self, state: bytes | None) -> None:
        """`state` None: a plain archive of the workspace (a volume's export), its members
        named relative to it, no state."""
        self.out: queue.Queue[bytes | BaseException | None] = queue.Queue(QUEUED)
        self.pending = b""
        self.done = False
        self.cancelled = threading.Event()
        self._thread = threading.Thread(
            target=self._write, args=(state,), name="codecage-fork-pack", daemon=True
        )
        self._thread.start()

    def _write(self, state: bytes | None) -> None:
        sink = _Sink(self.out, self.cancelled)
        try:
            with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                if state is not None:
                    info = tarfile.TarInfo(STATE)
                    info.size = len(state)
                    tar.addfile(info, io.BytesIO(state))
                prefix = f"{ROOT}/" if state is not None else ""
                for entry in sorted(os.listdir(HOME)):
                    if state is None and entry == "lost+found":  # a volume's own
                        continue
                    tar.add(os.path.join(HOME, entry), arcname=prefix + entry, filter=_plain)
            sink.finish()
            self.out.put(None)
        except BaseException as exc:  # said to the host at its next take
            self.out.put(exc)

    def cancel(self) -> None:
        """Stop the writer (a pack the host gave up on): it ends at its next write."""
        self.cancelled.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.out.get(timeout=0.05)

    def take(self, size: int) -> tuple[bytes, bool]:
        """Up to `size` bytes of the stream, and whether it has ended."""
        data = self.pending
        while len(data) < size and not self.done:
            item = self.out.get()
            if item is None:
                self.done = True
            elif isinstance(item, BaseException):
                self.done = True
                raise item
            else:
                data += item
        self.pending = data[size:]
        return data[:size], self.done and not self.pending


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """What a workspace may hold and a sandbox may unpack: files, directories, links."""
    if not (info.isfile() or info.isdir() or info.issym() or info.islnk()):
        return None  # a fifo or a device: nothing a copy can carry
    info.uid = info.gid = 1000
    info.uname = info.gname = ""
    return info


class Unpacker:
    """One unpack in progress: chunks go down a pipe to a thread that extracts them."""

    def __init__(self, plain: bool = False) -> None:
        """`plain`: an archive of files only (a volume's import), members named relative to
        the workspace, no state."""
        read_end, self._write_end = os.pipe()
        self.plain = plain
        self.state: bytes | None = None
        self.error: BaseException | None = None
        self.files = 0
        self._thread = threading.Thread(
            target=self._extract, args=(read_end,), name="codecage-fork-unpack", daemon=True
        )
        self._thread.start()

    def _extract(self, read_end: int) -> None:
        with os.fdopen(read_end, "rb") as stream:
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for member in tar:
                        if self.plain:
                            member.name = member.name.removeprefix("./")
                            if member.name in ("", "."):
                                continue  # the archive's own top directory
                            _check(member)
                            tar.extract(member, HOME)
                            self.files += 1
                            continue
                        if member.name == STATE and member.isfile() and self.state is None:
                            extracted = tar.extractfile(member)
                            self.state = extracted.read() if extracted else b""
                            continue
                        if not member.name.startswith(ROOT + "/"):
                            raise ValueError(
                                f"an archive member outside the workspace: {member.name!r}"
                            )
                        member.name = member.name[len(ROOT) + 1 :]
                        _check(member)
                        tar.extract(member, HOME)
                        self.files += 1
            except BaseException as exc:
                self.error = exc
                while stream.read(PIECE):  # the rest is drained, so the writer never blocks
                    pass

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._write_end, view) :]

    def finish(self) -> tuple[bytes, int]:
        os.close(self._write_end)
        self._thread.join()
        if self.error is not None:
            raise ValueError(f"the archive could not be unpacked: {self.error}")
        if self.plain:
            return b"", self.files
        if self.state is None:
            raise ValueError("the fork's archive holds no state")
        return self.state, self.files

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._write_end)


def _inside(path: str) -> bool:
    return path == HOME or path.startswith(HOME + "/")


def _check(member: tarfile.TarInfo) -> None:
    """What tarfile's `data` filter does (this Python has none): the member lands in the
    workspace and nowhere else, as a plain file, directory or link, without special bits."""
    name = member.name
    parts = name.split("/")
    if not name or name.startswith("/") or "\0" in name or ".." in parts:
        raise ValueError(f"an archive member outside the workspace: {name[:200]!r}")
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise ValueError(f"an archive member that is no file, directory or link: {name[:200]!r}")
    target = os.path.join(HOME, name)
    if not _inside(os.path.realpath(os.path.dirname(target))):
        raise ValueError(f"an archive member through a link out of the workspace: {name[:200]!r}")
    if member.islnk():
        link = member.linkname
        if (
            link.startswith("/")
            or ".." in link.split("/")
            or not _inside(os.path.realpath(os.path.join(HOME, link)))
        ):
            raise ValueError(f"a hard link out of the workspace: {name[:200]!r}")
    if not member.isdir() and os.path.islink(target):
        os.unlink(target)  # a file never written through a link an earlier member made
    member.mode &= 0o777
    member.uid = member.gid = 1000


def load_state(shell: Any, default: Any, data: bytes) -> int:
    """Put a packed state into the session (`default`: its context, whose working directory
    the next cell starts in); returns how many variables it held."""
    import cloudpickle

    state = cloudpickle.loads(data)
    names = state["names"]
    shell.user_ns.update(names)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in state["env"].items()})
    default.cwd = str(state["cwd"])
    shell.execution_count = int(state["execution_count"])
    return len(names)


class Forks:
    """The kernel's packs and unpack (one of each at a time: the host sends one request at
    a time, and forks a sandbox under its lock)."""

    def __init__(self) -> None:
        self.packer: tuple[str, Packer] | None = None
        self.unpacker: Unpacker | None = None

    def pack(
        self,
        shell: Any,
        contexts: dict[str, Any],
        cursor: Any,
        size: int,
        memory: bool = True,
        plain: bool = False,
    ) -> dict[str, Any]:
        if cursor is None:
            if self.packer is not None:  # one the host gave up on
                self.packer[1].cancel()
                self.packer = None
            if plain:  # the workspace's files only (a volume's export)
                self.packer = (secrets.token_hex(8), Packer(None))
                return self.pack(shell, contexts, self.packer[0], size)
            others = sorted(c for c in contexts if c != DEFAULT)
            if others:
                raise ValueError(
                    "a fork carries the default Python context only; this sandbox has "
                    f"others ({', '.join(others[:8])}): remove them first"
                )
            state = dump_state(shell, contexts[DEFAULT].cwd, memory)
            self.packer = (secrets.token_hex(8), Packer(state))
        elif self.packer is None or self.packer[0] != cursor:
            raise ValueError("no pack in progress by that cursor")
        cid, packer = self.packer
        try:
            data, eof = packer.take(size)
        except BaseException:
            self.packer = None
            raise
        if eof:
            self.packer = None
        return {"cursor": cid, "data": data, "eof": eof}

    def unpack(
        self, shell: Any, contexts: dict[str, Any], data: bytes, last: bool, plain: bool = False
    ) -> dict[str, Any]:
        if self.unpacker is None:
            self.unpacker = Unpacker(plain)
        unpacker = self.unpacker
        try:
            unpacker.feed(data)
            if not last:
                return {"names": 0, "files": 0}
            state, files = unpacker.finish()
        except BaseException:
            unpacker.abandon()
            self.unpacker = None
            raise
        self.unpacker = None
        if unpacker.plain:
            return {"names": 0, "files": files}
        return {"names": load_state(shell, contexts[DEFAULT], state), "files": files}
