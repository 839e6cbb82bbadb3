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


def enter_namespaces() -> None:
    """New mount, PID (for children), network, IPC, UTS and cgroup namespaces; no terminal."""
    os.setsid()
    libc.unshare(SANDBOX_NAMESPACES)
    socket.sethostname("sandbox")
    _loopback_up()


def _loopback_up() -> None:
    # A new network namespace has only `lo`, and it is down.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
