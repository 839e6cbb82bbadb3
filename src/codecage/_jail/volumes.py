"""A volume's host side (docs/volumes.md): an ext4 image made only by the host, attached on
a loop device and handed to one sandbox as a detached, idmapped `nosuid,nodev` mount.

- `make_image` formats a new image (mkfs.ext4: a hard size and a hard inode count, the
  root directory owned by VOLUME_UID); nothing a tenant built is ever mounted: import and
  export go as archives unpacked inside a jail (codecage._volumes).
- `Mounted.open` checks the image (`e2fsck -p`), binds it to a free loop device with
  LOOP_CONFIGURE and autoclear, mounts it with the new mount API (fsopen, fsmount) as a
  detached mount, idmaps VOLUME_UID to the sandbox's own host uid (a user namespace made for
  that only), and gives the mount's descriptor. The sandbox's set-up moves it into its own
  mount namespace; once the host closes its descriptors, that namespace holds the only
  reference, so a sandbox that dies in any way unmounts the filesystem and frees the loop
  device (autoclear): nothing is left mounted on the host.
- `attached_loop` is the kernel's word on whether an image is in use (a loop device backed
  by it), which survives a crash of this process: the store refuses a second attachment by it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import itertools
import os
import re
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .._errors import PolicyError, SandboxError
from . import cgroups

VOLUME_UID = 1000  # the owner of every file the sandbox makes, as the image stores it

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long

# x86_64 system call numbers (the new mount API)
SYS_fsopen, SYS_fsconfig, SYS_fsmount, SYS_mount_setattr = 430, 431, 432, 442
FSOPEN_CLOEXEC, FSMOUNT_CLOEXEC = 1, 1
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_IDMAP = 0x2, 0x4, 0x100000
AT_EMPTY_PATH = 0x1000
CLONE_NEWUSER = 0x10000000
LOOP_CTL_GET_FREE, LOOP_CONFIGURE, LOOP_SET_BLOCK_SIZE = 0x4C82, 0x4C0A, 0x4C09
LO_FLAGS_AUTOCLEAR = 4
_LOOP_INFO64 = "<5Q4I64s64s32s2Q"  # struct loop_info64
_LOOP_CONFIG = "<II" + _LOOP_INFO64[1:] + "8Q"  # struct loop_config


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _sys(number: int, *args: object) -> int:
    result = _libc.syscall(number, *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syscall {number}: {os.strerror(err)}")
    return int(result)


def tools() -> str | None:
    """Why this host cannot make volumes (a missing tool), None if it can."""
    for tool in ("mkfs.ext4", "e2fsck"):
        if shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
            return f"{tool} is not installed (e2fsprogs)"
    if not os.path.exists("/dev/loop-control"):
        return "this host has no loop devices (/dev/loop-control)"
    return None


def _run(
    argv: list[str], what: str, ok: tuple[int, ...] = (0,)
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/sbin:/usr/bin:/bin", "LC_ALL": "C"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    if done.returncode not in ok:
        raise SandboxError(
            f"{what} failed ({done.returncode}): {(done.stderr or done.stdout)[-400:]}"
        )
    return done


def make_image(path: Path, size_mb: int, inodes: int) -> None:
    """A new ext4 image of `size_mb` MiB (its blocks allocated on the host now, so a full host
    disk cannot turn a write into an I/O error later) with `inodes` inodes, owned 1000."""
    with open(path, "xb") as f:
        os.fchmod(f.fileno(), 0o600)
        os.posix_fallocate(f.fileno(), 0, size_mb << 20)
    _run(
        [
            "mkfs.ext4", "-q", "-F", "-N", str(inodes), "-m", "0", "-b", "4096",
            "-E", f"root_owner={VOLUME_UID}:{VOLUME_UID},lazy_itable_init=0,lazy_journal_init=0",
            "-O", "^resize_inode", "-L", "codecage", str(path),
        ],
        "mkfs.ext4",
    )  # fmt: skip
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_image(path: Path, repair: bool = True) -> str:
    """e2fsck the image: `-p` (the safe repairs, a journal replayed) or `-n` (read-only).
    Raises SandboxError when it holds errors `-p` may not fix; returns e2fsck's summary."""
    argv = ["e2fsck", "-p", str(path)] if repair else ["e2fsck", "-n", "-f", str(path)]
    done = _run(argv, "e2fsck", ok=(0, 1))
    return done.stdout.strip()


def attached_loop(path: Path) -> str | None:
    """The loop device backed by this image (`loopN`), None if there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    sys_block = Path("/sys/block")
    for dev in sys_block.glob("loop*"):
        with contextlib.suppress(OSError, ValueError):
            backing = (dev / "loop" / "backing_file").read_text().strip()
            if backing.endswith(" (deleted)"):
                continue
            other = os.stat(backing)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return dev.name
    return None


def wait_detached(path: Path, timeout_s: float = 5.0) -> bool:
    """Wait for a sandbox's end to free the image's loop device (the kernel unmounts a
    dead mount namespace's filesystems shortly after its last process): True once free."""
    deadline = time.monotonic() + timeout_s
    delay = 0.0005
    while attached_loop(path) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True


def _loop(image_fd: int) -> tuple[int, str]:
    """A free loop device bound to the image, autoclear: (its descriptor, /dev/loopN)."""
    control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(16):  # another process may take the free one first
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            name = f"/dev/loop{number}"
            fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
            info = struct.pack(
                _LOOP_INFO64, 0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_AUTOCLEAR, b"", b"", b"", 0, 0
            )
            config = struct.pack("<II", image_fd, 0) + info + bytes(64)
            try:
                fcntl.ioctl(fd, LOOP_CONFIGURE, config)
            except OSError as exc:
                os.close(fd)
                if exc.errno == 16:  # EBUSY: taken meanwhile
                    continue
                raise
            return fd, name
    finally:
        os.close(control)
    raise SandboxError("no free loop device could be bound")


def _userns(uid: int, gid: int) -> int:
    """A user namespace mapping VOLUME_UID to (uid, gid), for the mount's idmap: a child
    unshares it, the host writes its maps and keeps a descriptor on it."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(ready_r)
            os.close(done_w)
            if _libc.unshare(CLONE_NEWUSER) == 0:
                os.write(ready_w, b"u")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"u":
            raise SandboxError("could not make a user namespace for a volume's idmap")
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(f"{VOLUME_UID} {uid} 1\n")
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(f"{VOLUME_UID} {gid} 1\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


def _fsmount(device: str) -> int:
    fs = _sys(SYS_fsopen, b"ext4", FSOPEN_CLOEXEC)
    try:
        _sys(SYS_fsconfig, fs, FSCONFIG_SET_STRING, b"source", device.encode(), 0)
        _sys(SYS_fsconfig, fs, FSCONFIG_SET_STRING, b"errors", b"remount-ro", 0)
        _sys(SYS_fsconfig, fs, FSCONFIG_CMD_CREATE, None, None, 0)
        return _sys(SYS_fsmount, fs, FSMOUNT_CLOEXEC, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    finally:
        os.close(fs)


class Mounted:
    """One image, checked, on its loop device, as a detached mount for one sandbox
    (`fd`). `close()` drops the host's references; the sandbox's mount keeps it."""

    def __init__(self, image: Path, uid: int, gid: int) -> None:
        self.image = image
        self.loop_fd = -1
        self.fd = -1
        check_image(image)
        image_fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.loop_fd, self.device = _loop(image_fd)
        finally:
            os.close(image_fd)
        try:
            self.fd = _fsmount(self.device)
            userns = _userns(uid, gid)
            try:
                attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns)
                _sys(
                    SYS_mount_setattr, self.fd, b"", AT_EMPTY_PATH,
                    ctypes.byref(attr), ctypes.sizeof(attr),
                )  # fmt: skip
            finally:
                os.close(userns)
        except BaseException:
            self.close()
            raise

    @property
    def rdev(self) -> str:
        """The loop device's `major:minor` (for the blkio and io.max limits)."""
        st = os.fstat(self.loop_fd)
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"

    def close(self) -> None:
        for fd in (self.fd, self.loop_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self.loop_fd = -1


def mount_all(attachments: tuple[Attachment, ...], uid: int, gid: int) -> list[Mounted]:
    """Each attachment's image as a detached mount for a sandbox of this uid (all, or none:
    the ones made are closed again if one fails)."""
    mounted: list[Mounted] = []
    try:
        for attachment in attachments:
            m = Mounted(attachment.image, uid, gid)
            attachment.device = m.device
            mounted.append(m)
    except BaseException:
        for m in mounted:
            m.close()
        raise
    return mounted


SYS_move_mount, MOVE_MOUNT_F_EMPTY_PATH, AT_FDCWD = 429, 0x4, -100


def move_mount(fd: int, target: str) -> None:
    """Attach a detached mount at `target` in this process's mount namespace."""
    _sys(SYS_move_mount, fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH)


def detach_host_mount(target: Path) -> None:
    """Lazily unmount a staged volume from the host (a sandbox's copy of it lives on) and
    remove its directory."""
    with contextlib.suppress(OSError):
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        if _libc.umount2(str(target).encode(), 2) < 0:  # MNT_DETACH
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):
                raise OSError(err, os.strerror(err))
    with contextlib.suppress(OSError):
        target.rmdir()


def sweep_staged(base: Path, owner: str) -> None:
    """The staged mounts a crashed process left (their directory is named by the jail's
    owner: gone as cgroups.sweep judges it, by the owner's lock), detached from the host."""
    if not base.is_dir():
        return
    for stale in base.iterdir():
        if stale.name == owner or cgroups.owner_alive(stale.name):
            continue
        for sandbox in stale.glob("*"):
            for target in sandbox.glob("*"):
                detach_host_mount(target)
            with contextlib.suppress(OSError):
                sandbox.rmdir()
        with contextlib.suppress(OSError):
            stale.rmdir()


def largest_bytes(attachments: tuple[Attachment, ...]) -> int:
    """The largest image's size: the sandbox's file-size rlimit must let a file fill it."""
    return max((os.stat(a.image).st_size for a in attachments), default=0)


# -- paths in the sandbox -------------------------------------------------------------------

# First components a volume may not be mounted under: the runtime, the system, /tmp.
SYSTEM_DIRS = frozenset(
    [
        "bin",
        "boot",
        "dev",
        "etc",
        "lib",
        "lib32",
        "lib64",
        "libx32",
        "proc",
        "root",
        "run",
        "sbin",
        "sys",
        "tmp",
        "usr",
        "var",
    ]
)
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_VOLUMES = 8  # per sandbox (the set-up takes no more descriptors than this)


def check_paths(paths: list[str]) -> list[str]:
    """The mount paths, checked: absolute, normal (no `.`, `..`, `//`, trailing `/`), of
    plain names, not in the system's directories nor /tmp, none inside another. Sorted."""
    if len(paths) > MAX_VOLUMES:
        raise PolicyError(f"at most {MAX_VOLUMES} volumes per sandbox, not {len(paths)}")
    for path in paths:
        if not isinstance(path, str) or not path.startswith("/") or len(path) > 256:
            raise PolicyError(f"a volume's mount path must be absolute: {str(path)[:80]!r}")
        parts = path[1:].split("/")
        if not all(_COMPONENT.fullmatch(p) and p not in (".", "..") for p in parts):
            raise PolicyError(
                f"a volume's mount path must be a normal path of plain names: {path[:80]!r}"
            )
        if parts[0] in SYSTEM_DIRS or path == "/home":
            raise PolicyError(
                f"a volume cannot be mounted at {path[:80]!r}: inside a system directory "
                f"(not under /{', /'.join(sorted(SYSTEM_DIRS))}); use /home/user or e.g. /data"
            )
    ordered = sorted(paths)
    for a, b in itertools.pairwise(ordered):
        if a == b or b.startswith(a + "/"):
            raise PolicyError(f"volume mount paths overlap: {a!r} and {b!r}")
    return ordered


# -- one attachment -------------------------------------------------------------------------


@dataclass
class Attachment:
    """A volume given to one sandbox at `path`: the store's lock on it is held until
    `detach` (called when the sandbox has ended), which waits for the kernel to free its
    loop device and then tells `on_detach` (the audit record)."""

    path: str
    name: str
    image: Path
    lock_fd: int
    on_detach: list[Callable[[Attachment], None]] = field(default_factory=list)
    device: str | None = None  # /dev/loopN once mounted
    sandbox_id: str | None = None  # the sandbox it is attached to
    attached_at: float = field(default_factory=time.monotonic)
    detach_s: float | None = None
    freed: bool = False
    _done: bool = False
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def when_detached(self, callback: Callable[[Attachment], None]) -> None:
        """Tell `callback` of the detach (at once, if it has happened already)."""
        with self._guard:
            if not self._done:
                self.on_detach.append(callback)
                return
        callback(self)

    def detach(self) -> None:
        with self._guard:
            if self._done:
                return
            self._done = True
        started = time.monotonic()
        # If it is not freed in time, the lock goes with the loop device still bound: the
        # store's next attach sees that (attached_loop) and refuses, never mounts it twice.
        self.freed = wait_detached(self.image)
        self.detach_s = time.monotonic() - started
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)
        for callback in self.on_detach:
            with contextlib.suppress(Exception):
                callback(self)
