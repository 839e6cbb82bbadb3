"""Persistent volumes (docs/volumes.md): a store of ext4 images, one per volume, that
sandboxes mount (`Sandbox(volumes={"/home/user": "NAME"})`) one at a time.

Layout: <root>/<owner digest>/<name>.img (the image, 0600), <name>.json (its metadata,
written to a temporary name, fsynced and renamed) and <name>.lock (the attachment lock).
The owner is a tenant of the service, or "local" for the in-process SDK, whose store is
CODECAGE_VOLUME_DIR or /var/lib/codecage/volumes. A volume of another owner is the same
VolumeNotFound as a missing one: the owner's digest is part of every path.

One attachment at a time: `attach` takes an exclusive flock on the lock file (held until
the sandbox has ended and the kernel has freed the image's loop device) and refuses an
image some loop device still backs (a sandbox of another process, or of a process that
crashed and whose sandbox has not ended yet): VolumeBusy, never a second mount.

Export and import are tar archives made and unpacked inside a jail: a sandbox with the
volume at /home/user packs or unpacks it with the checks forks use (_inside/fork.py), so
the host never parses what a tenant sent, and never mounts an image a tenant made.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ._errors import PolicyError, QuotaExceeded, VolumeBusy, VolumeNotFound
from ._jail import volumes as _host
from ._jail.volumes import Attachment

if TYPE_CHECKING:
    from ._sandbox import Sandbox

DEFAULT_DIR = "/var/lib/codecage/volumes"
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
MIN_MB, MAX_MB = 8, 1 << 20
BYTES_PER_INODE = 16 << 10  # the default inode count: one per 16 KiB


@dataclass
class Volume:
    name: str
    size_mb: int
    inodes: int
    created_at: float


def default_dir() -> Path:
    return Path(os.environ.get("CODECAGE_VOLUME_DIR") or DEFAULT_DIR)


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise PolicyError(
            f"a volume's name is 1-63 of a-z, 0-9, '_', '.', '-' starting with a letter or "
            f"digit, not {str(name)[:80]!r}"
        )
    return name


_busy_lock = threading.Lock()
_exporting: set[str] = set()  # images an export or import of this process holds


class Volumes:
    """The volumes of one owner. `max_count` and `max_mb` bound them (None: no bound)."""

    def __init__(
        self,
        root: str | Path | None = None,
        owner: str = "local",
        max_count: int | None = None,
        max_mb: int | None = None,
        on_volume: Callable[[str, Attachment], None] | None = None,
    ) -> None:
        """`on_volume("attach" | "detach", attachment)` is told of every attachment of
        these volumes (the service's audit log), its sandboxes' and its exports' alike."""
        self.on_volume = on_volume
        self.root = Path(root) if root is not None else default_dir()
        self.owner = owner
        self.max_count, self.max_mb = max_count, max_mb
        self.dir = self.root / hashlib.sha256(owner.encode()).hexdigest()[:24]
        self._lock = threading.Lock()

    def _paths(self, name: str) -> tuple[Path, Path, Path]:
        check_name(name)
        return (self.dir / f"{name}.img", self.dir / f"{name}.json", self.dir / f"{name}.lock")

    # -- the catalogue ---------------------------------------------------------------------

    def create(self, name: str, size_mb: int, inodes: int | None = None) -> Volume:
        """A new, empty volume of `size_mb` MiB and `inodes` files at most (hard limits: a
        write past either is ENOSPC in the sandbox). QuotaExceeded past the owner's quota."""
        image, meta, _ = self._paths(name)
        if (
            isinstance(size_mb, bool)
            or not isinstance(size_mb, int)
            or not MIN_MB <= size_mb <= MAX_MB
        ):
            raise PolicyError(f"a volume's size_mb is {MIN_MB} to {MAX_MB}, not {size_mb!r}")
        if inodes is None:
            inodes = max(256, (size_mb << 20) // BYTES_PER_INODE)
        if (
            isinstance(inodes, bool)
            or not isinstance(inodes, int)
            or not 16 <= inodes <= (size_mb << 20) // 1024
        ):
            raise PolicyError(
                f"a volume's inodes is 16 to one per KiB of its size ({(size_mb << 20) // 1024}),"
                f" not {inodes!r}"
            )
        why = _host.tools()
        if why is not None:
            raise PolicyError(f"this host cannot make volumes: {why}")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dir.mkdir(exist_ok=True, mode=0o700)
        with self._lock:
            held = self.list()
            if any(v.name == name for v in held):
                raise VolumeBusy(f"a volume {name!r} exists already")
            if self.max_count is not None and len(held) >= self.max_count:
                raise QuotaExceeded(
                    f"{len(held)} volumes already (quotas.volumes={self.max_count}): delete one"
                )
            used = sum(v.size_mb for v in held)
            if self.max_mb is not None and used + size_mb > self.max_mb:
                raise QuotaExceeded(
                    f"{size_mb} MiB more would pass quotas.volume_mb={self.max_mb} "
                    f"({used} MiB in volumes already)"
                )
            temporary = self.dir / f".{name}.img.tmp"
            temporary.unlink(missing_ok=True)
            try:
                _host.make_image(temporary, size_mb, inodes)
                os.rename(temporary, image)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
            volume = Volume(name, size_mb, inodes, time.time())
            staged = self.dir / f".{name}.json.tmp"
            with open(staged, "w") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(json.dumps(asdict(volume)))
                f.flush()
                os.fsync(f.fileno())
            os.rename(staged, meta)
            fsync_dir(self.dir)
        return volume

    def list(self) -> list[Volume]:
        found = []
        for meta in sorted(self.dir.glob("*.json")):
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                volume = Volume(**json.loads(meta.read_text()))
                if NAME.fullmatch(volume.name) and (self.dir / f"{volume.name}.img").exists():
                    found.append(volume)
        return found

    def get(self, name: str) -> Volume:
        """The volume by that name, else VolumeNotFound (another owner's is the same)."""
        image, meta, _ = self._paths(name)
        try:
            volume = Volume(**json.loads(meta.read_text()))
        except (OSError, ValueError, TypeError):
            raise VolumeNotFound(f"no volume {name!r}") from None
        if volume.name != name or not image.exists():
            raise VolumeNotFound(f"no volume {name!r}")
        return volume

    def delete(self, name: str) -> None:
        """Delete the volume and everything on it; VolumeBusy while it is attached."""
        self.get(name)
        image, meta, lock = self._paths(name)
        with self._held(name, "deleted"):
            meta.unlink()
            image.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
            fsync_dir(self.dir)

    def check(self, name: str) -> str:
        """`e2fsck -n` of a volume not attached: its summary, or SandboxError on errors."""
        self.get(name)
        image, _, _ = self._paths(name)
        with self._held(name, "checked"):
            return _host.check_image(image, repair=False)

    # -- attaching -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _held(self, name: str, doing: str) -> Iterator[int]:
        fd = self._lock_fd(name, doing)
        try:
            yield fd
        finally:
            os.close(fd)

    def _lock_fd(self, name: str, doing: str) -> int:
        image, _, lock = self._paths(name)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise VolumeBusy(
                    f"volume {name!r} is attached to a sandbox (one at a time): it cannot be "
                    f"{doing} until that sandbox has ended"
                ) from None
            raise
        if _host.attached_loop(image) is not None and not _host.wait_detached(image, 1.0):
            os.close(fd)
            raise VolumeBusy(
                f"volume {name!r} is still mounted by a sandbox that has not ended (one "
                f"attachment at a time): it cannot be {doing} until it has"
            )
        return fd

    def attach(
        self, name: str, path: str, on_detach: Callable[[Attachment], None] | None = None
    ) -> Attachment:
        """The volume, locked for one sandbox at `path` (given to Jail.create); its lock
        is released when that sandbox has ended (Attachment.detach)."""
        self.get(name)
        image, _, _ = self._paths(name)
        fd = self._lock_fd(name, "attached again")
        return Attachment(path, name, image, fd, [on_detach] if on_detach else [])

    def attach_all(
        self, mounts: dict[str, str], on_detach: Callable[[Attachment], None] | None = None
    ) -> tuple[Attachment, ...]:
        """`{path: name}` attached (all or none); the paths are checked first."""
        if not isinstance(mounts, dict):
            raise PolicyError("volumes is a mapping of mount path to volume name")
        _host.check_paths(list(mounts))
        names = list(mounts.values())
        for name in names:
            check_name(name)
        if len(set(names)) != len(names):
            raise VolumeBusy("a volume can be attached once at a time: it is named twice")
        attached: list[Attachment] = []
        try:
            for path in sorted(mounts):
                attached.append(self.attach(mounts[path], path, on_detach))
        except BaseException:
            for attachment in attached:
                attachment.on_detach.clear()
                attachment.detach()
            raise
        return tuple(attached)

    # -- export and import: archives, made and unpacked in a jail ---------------------------

    def export(self, name: str) -> Iterator[bytes]:
        """The volume's files as a tar stream, packed inside a sandbox that has it at
        /home/user (the volume is attached meanwhile: VolumeBusy if it is already)."""
        volume = self.get(name)
        sandbox = self._helper(volume)
        try:
            from ._state import packed

            yield from packed(sandbox._jailed, sandbox.policy, memory=False, plain=True)
        finally:
            sandbox.kill()

    def import_(self, name: str, chunks: Iterable[bytes]) -> int:
        """Unpack a tar stream into the volume, inside a sandbox that has it at /home/user,
        each member checked there (nothing outside it, no device, no setuid bit). Returns
        how many members it unpacked. The volume's quotas hold (ENOSPC is the error)."""
        volume = self.get(name)
        sandbox = self._helper(volume)
        try:
            from ._state import unpack

            return unpack(sandbox._jailed, chunks, plain=True)
        finally:
            sandbox.kill()

    def _helper(self, volume: Volume) -> Sandbox:
        from ._policy import Policy
        from ._sandbox import Sandbox

        # the pack's bound is memory_mb + disk_mb: room for the files and their headers
        disk = volume.size_mb + (volume.inodes * 2048 >> 20) + 16
        policy = Policy(disk_mb=min(disk, 1 << 20), timeout_s=None)
        return Sandbox(policy, volumes={"/home/user": volume.name}, volume_store=self)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
