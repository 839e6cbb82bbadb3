"""The system calls Python 3.11 lacks (unshare, mount, pivot_root, prctl, capset), via ctypes.

Everything under ``codecage._inside`` runs in the template and in the jail: it imports
the standard library only, never pydantic or anything of the service.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# x86_64 system call numbers used by raw syscall() below.
SYS_pivot_root = 155
SYS_capset = 126
SYS_seccomp = 317
SYS_landlock_create_ruleset = 444
SYS_landlock_add_rule = 445
SYS_landlock_restrict_self = 446
SYS_move_mount = 429
SYS_clone = 56
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25

_libc.syscall.restype = ctypes.c_long
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(
    source: str, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def move_mount(fd: int, target: str) -> None:
    """Attach the detached mount `fd` (fsmount's, passed by the host) at `target`."""
    _check(
        _libc.syscall(SYS_move_mount, fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH),
        f"move_mount {target}",
    )


def pivot_root(new_root: str, put_old: str) -> None:
    _check(
        _libc.syscall(SYS_pivot_root, new_root.encode(), put_old.encode()),
        "pivot_root",
    )


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def capset_zero() -> None:
    """Clear the effective, permitted and inheritable sets (version 3: two 32-bit words)."""
    header = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(SYS_capset, ctypes.byref(header), ctypes.byref(data)), "capset")


def syscall(number: int, *args: object) -> int:
    return _check(_libc.syscall(number, *args), f"syscall {number}")


def raw_syscall(number: int, *args: object) -> tuple[int, int]:
    """Return (result, errno) without raising: for probes that expect failure."""
    result = _libc.syscall(number, *args)
    return result, ctypes.get_errno() if result < 0 else 0


def madvise(start: int, length: int, advice: int) -> None:
    _check(_libc.madvise(start, length, advice), f"madvise({advice})")


def resident(start: int, length: int) -> float:
    """The share of the pages of [start, start + length) in memory (mincore), 0 if unknown."""
    pages = length // os.sysconf("SC_PAGE_SIZE")
    vec = ctypes.create_string_buffer(pages)
    if _libc.mincore(start, length, vec) != 0:
        return 0.0
    return sum(b & 1 for b in vec.raw) / pages


# The interpreter's own library, called with the GIL held (a fork must not release it).
_py = ctypes.PyDLL(None, use_errno=True)
_py.syscall.restype = ctypes.c_long


def fork_new_pid_namespace() -> int:
    """os.fork(), with the child PID 1 of a new PID namespace (clone(CLONE_NEWPID), which
    Python 3.11 lacks), the interpreter prepared and restored around it as os.fork does
    (PyOS_BeforeFork and the after-fork hooks). For a single-threaded caller only. The
    child's libc still holds the parent's thread id for its main thread (glibc's fork would
    have set it): it must not use raise() or thread-id-owned mutexes; the processes it forks
    with os.fork are whole again."""
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _py.syscall(SYS_clone, CLONE_NEWPID | 17, 0, 0, 0, 0)  # 17: SIGCHLD at its exit
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return int(pid)
