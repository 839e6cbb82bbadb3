"""Cgroup membership, namespaces, hostname and loopback: the first steps after the fork."""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from . import libc

SANDBOX_NAMESPACES = (
    libc.CLONE_NEWNS
    | libc.CLONE_NEWPID
    | libc.CLONE_NEWNET
    | libc.CLONE_NEWIPC
    | libc.CLONE_NEWUTS
    | libc.CLONE_NEWCGROUP
)
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def join_cgroups(procs_files: list[str]) -> None:
    """Join the sandbox's cgroups first, so that everything after is charged and counted."""
    for path in procs_files:
        with open(path, "w") as f:
            f.write("0")


def enter_namespaces(userns: dict[str, int] | None, pid: bool = True) -> None:
    """New mount, PID (for children; `pid` False: this process is PID 1 of its own already),
    network, IPC, UTS and cgroup namespaces; no terminal.

    Not root: a new user namespace too, in which the caller's uid and gid become 1000 (the
    only ids it may map) and it holds, inside that namespace only, the capabilities the
    rest of the pipeline needs."""
    os.setsid()
    flags = SANDBOX_NAMESPACES if pid else SANDBOX_NAMESPACES & ~libc.CLONE_NEWPID
    if userns is None:
        libc.unshare(flags)
    else:
        libc.unshare(flags | libc.CLONE_NEWUSER)
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"1000 {userns['uid']} 1")
        _write("/proc/self/gid_map", f"1000 {userns['gid']} 1")
    socket.sethostname("sandbox")
    _loopback_up()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _loopback_up() -> None:
    # A new network namespace has only `lo`, and it is down.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
