"""Identity and privileges: rlimits, an unprivileged uid/gid, no capabilities, no_new_privs."""

from __future__ import annotations

import os
import resource

from . import libc


def set_rlimits(limits: dict[str, int]) -> None:
    """`limits` maps RLIMIT_* names (without the prefix) to a hard=soft value."""
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, f"RLIMIT_{name.upper()}"), (value, value))


def set_oom_score_adj(value: int) -> bool:
    """Best effort: lowering the score needs CAP_SYS_RESOURCE, which some hosts withhold
    even from root. Returns whether it took effect; raising always works."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except PermissionError:
        return False
    return True


def drop_privileges(uid: int, gid: int, userns: bool = False) -> None:
    """Become `uid`:`gid` with no groups, no capabilities (bounding set included) and
    no way to gain any back (no_new_privs; not dumpable, so /proc/<pid>/mem stays closed)."""
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
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    libc.prctl(libc.PR_SET_DUMPABLE, 0)
