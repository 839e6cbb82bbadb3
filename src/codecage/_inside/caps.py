"""Identity and privileges: rlimits, an unprivileged uid/gid, no capabilities, no_new_privs."""

from __future__ import annotations

import os
import resource

from . import libc


def set_rlimits(limits: dict[str, int]) -> None:
    """`limits` maps RLIMIT_* names (without the prefix) to a hard=soft value."""
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, f"RLIMIT_{name.upper()}"), (value, value))


KERNEL_OOM_SCORE_ADJ = 1000  # the kernel is the OOM killer's first pick in its sandbox


def set_oom_score_adj(value: int) -> bool:
    """Set this process's OOM score adjustment, before Landlock (which refuses writes under
    /proc) and before drop_privileges (a non-dumpable process's /proc files are root's).
    Returns False only where lowering the score is refused for want of CAP_SYS_RESOURCE
    (some hosts withhold it even from root); any other failure raises."""
    fd = open_oom_score_adj()
    try:
        before = read_oom_score_adj(fd)
        try:
            write_oom_score_adj(fd, value)
        except PermissionError:
            if value >= before:
                raise  # raising the score needs no privilege: this is not the known case
            return False
    finally:
        os.close(fd)
    return True


def open_oom_score_adj() -> int:
    """A descriptor on this process's own oom_score_adj. Opened while /proc/self is still
    writable, it stays usable after Landlock and drop_privileges: init keeps one to give
    each kernel it forks the score KERNEL_OOM_SCORE_ADJ (oom_score_adj is inherited)."""
    return os.open("/proc/self/oom_score_adj", os.O_RDWR | os.O_CLOEXEC)


def read_oom_score_adj(fd: int) -> int:
    return int(os.pread(fd, 32, 0))


def write_oom_score_adj(fd: int, value: int) -> None:
    """Raises OSError if the kernel refuses; checks that the value took."""
    os.pwrite(fd, str(value).encode(), 0)
    got = read_oom_score_adj(fd)
    if got != value:
        raise OSError(f"oom_score_adj is {got} after writing {value}")


def drop_privileges(uid: int, gid: int, userns: bool = False) -> None:
    """Become `uid`:`gid` with no groups and no capabilities (bounding set and ambient
    included). no_new_privs follows (the next step): no way to gain any back."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        libc.prctl(libc.PR_CAPBSET_DROP, cap)
    if not userns:  # a user namespace denies setgroups; the service's own groups remain
        os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    libc.capset_zero()
    libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL)


def no_new_privs() -> None:
    """No privilege gained by exec (no_new_privs), and not dumpable, so /proc/<pid>/mem and
    the other owner-only files of /proc stay closed to the sandbox's own uid."""
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    libc.prctl(libc.PR_SET_DUMPABLE, 0)
