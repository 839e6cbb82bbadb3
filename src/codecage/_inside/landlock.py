"""Landlock: writes only under the workspace, /tmp, /dev/shm and the character devices.

Reads are left to the mount layout (the jail's root holds nothing secret); Landlock is a
second, independent wall against writing anywhere else, e.g. if a read-only bind were
ever remounted.
"""

from __future__ import annotations

import ctypes
import os

from . import libc

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6
RULE_PATH_BENEATH = 1
CREATE_RULESET_VERSION = 1

WRITABLE_DIRS = ("/home/user", "/tmp", "/dev/shm")
WRITABLE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """The host's Landlock ABI, 0 if Landlock is unavailable."""
    result, _err = libc.raw_syscall(
        libc.SYS_landlock_create_ruleset, None, ctypes.c_size_t(0), CREATE_RULESET_VERSION
    )
    return max(result, 0)


def _write_access(abi: int) -> int:
    access = WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_CHAR | MAKE_DIR | MAKE_REG
    access |= MAKE_SOCK | MAKE_FIFO | MAKE_BLOCK | MAKE_SYM
    if abi >= 2:
        access |= REFER
    if abi >= 3:
        access |= TRUNCATE
    return access


def restrict(extra_dirs: tuple[str, ...] = ()) -> None:
    """Confine the calling thread (and its future children) to writing the allowed places."""
    abi = abi_version()
    if abi < 1:
        raise OSError("Landlock is not available on this kernel")
    handled = _write_access(abi)
    attr = _RulesetAttr(handled, 0, (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0)
    size = ctypes.sizeof(attr) if abi >= 6 else 8
    ruleset = libc.syscall(libc.SYS_landlock_create_ruleset, ctypes.byref(attr), size, 0)
    try:
        for path in (*WRITABLE_DIRS, *extra_dirs):
            _allow(ruleset, path, handled)
        for path in WRITABLE_DEVICES:
            _allow(ruleset, path, handled & (WRITE_FILE | TRUNCATE))
        _allow(ruleset, "/dev/pts", handled & (WRITE_FILE | TRUNCATE))
        libc.syscall(libc.SYS_landlock_restrict_self, ruleset, 0)
    finally:
        os.close(ruleset)


def _allow(ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        rule = _PathBeneath(access, fd)
        libc.syscall(libc.SYS_landlock_add_rule, ruleset, RULE_PATH_BENEATH, ctypes.byref(rule), 0)
    finally:
        os.close(fd)
