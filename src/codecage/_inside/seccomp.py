"""The seccomp filter: built once with libseccomp in the template, loaded in each sandbox.

A deny list on top of an allow-by-default filter, at least as strict as Docker's default
profile for an unprivileged container. Building costs
milliseconds; loading the precompiled BPF program costs microseconds.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from . import libc

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
SCMP_FLTATR_ACT_BADARCH = 2
SECCOMP_SET_MODE_FILTER = 1


def SCMP_ACT_ERRNO(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


# Denied outright with EPERM: namespaces and mounts, kernel keyrings, BPF and perf,
# tracing other processes, io_uring (its own syscall surface), modules, clocks, swap,
# reboot, and the rest that Docker's default profile refuses without capabilities.
DENIED = [
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "process_madvise",
    "pidfd_getfd",
    "kcmp",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "query_module",
    "get_kernel_syms",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "stime",
    "lookup_dcookie",
    "nfsservctl",
    "open_by_handle_at",
    "name_to_handle_at",
    "syslog",
    "vhangup",
    "iopl",
    "ioperm",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "vm86",
    "vm86old",
    "fanotify_init",
    "mbind",
    "set_mempolicy",
    "migrate_pages",
    "move_pages",
    "get_mempolicy",
    "personality",
]

NAMESPACE_FLAGS = (
    libc.CLONE_NEWNS
    | libc.CLONE_NEWCGROUP
    | libc.CLONE_NEWUTS
    | libc.CLONE_NEWIPC
    | libc.CLONE_NEWUSER
    | libc.CLONE_NEWPID
    | libc.CLONE_NEWNET
)
AF_NETLINK, AF_VSOCK = 16, 40
NETLINK_KOBJECT_UEVENT = 15
# The highest x86_64 system call number the filter answers for: any number libseccomp
# cannot name (a kernel newer than the library) answers ENOSYS instead of running unfiltered.
MAX_SYSCALL = 1023
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
TIOCSTI = 0x5412  # push bytes into a terminal's input queue: typing into the operator's shell
TIOCLINUX = 0x541C  # the virtual console's selection paste, same effect
S_IFMT, S_IFCHR, S_IFBLK = 0o170000, 0o020000, 0o060000

# seccomp sees each argument as the whole 64-bit register, while the kernel reads many of
# them narrower: `socket((1 << 32) | AF_VSOCK, ...)` is an AF_VSOCK socket to the kernel but
# not `== AF_VSOCK` to the filter. So every argument rule is a masked compare, and its mask
# lies within the bits the kernel really reads: the width of each argument, as the kernel's
# own SYSCALL_DEFINE declares it (x86_64), is below. A rule whose mask reaches beyond that
# width is refused when the filter is built (a compare the kernel does not make).
ARG_BITS: dict[tuple[str, int], int] = {
    ("socket", 0): 32,  # int family
    ("socket", 2): 32,  # int protocol
    ("ioctl", 1): 32,  # unsigned int cmd (glibc passes an unsigned long: truncated)
    ("mknod", 1): 16,  # umode_t mode
    ("mknodat", 2): 16,  # umode_t mode
    # unsigned long clone_flags, but kernel_clone() keeps only lower_32_bits() of them (the
    # upper half is clone3's); each rule tests one namespace bit, which lies in the lower half.
    ("clone", 0): 32,
}
WIDTH = {bits: (1 << bits) - 1 for bits in (16, 32, 64)}


@dataclass(frozen=True)
class ArgRule:
    """Refuse `syscall` with the errno `error` when, for every (index, mask, value) of `args`,
    (argument[index] & mask) == value."""

    syscall: str
    args: tuple[tuple[int, int, int], ...]
    error: int = errno.EPERM


def _arg_rules() -> tuple[ArgRule, ...]:
    rules = []
    # clone() with any namespace flag would hand the code a new user namespace with
    # every capability in it; plain fork/thread clones stay allowed.
    for bit in range(64):
        if NAMESPACE_FLAGS & (1 << bit):
            rules.append(ArgRule("clone", ((0, 1 << bit, 1 << bit),)))
    # vsock ignores network namespaces (it reaches the hypervisor and host services), and
    # kernel uevents are broadcast into every network namespace of the host's user namespace.
    rules.append(ArgRule("socket", ((0, WIDTH[32], AF_VSOCK),)))
    rules.append(
        ArgRule("socket", ((0, WIDTH[32], AF_NETLINK), (2, WIDTH[32], NETLINK_KOBJECT_UEVENT)))
    )
    for request in (TIOCSTI, TIOCLINUX):
        rules.append(ArgRule("ioctl", ((1, WIDTH[32], request),)))
    # Device nodes: the kernel refuses them without CAP_MKNOD, but gVisor's sentry (the
    # Debian 2022 build) creates them in its tmpfs for an unprivileged user; refuse them here
    # for every backend alike (FIFOs and sockets stay allowed).
    for name, mode_arg in (("mknod", 1), ("mknodat", 2)):
        for kind in (S_IFCHR, S_IFBLK):
            rules.append(ArgRule(name, ((mode_arg, S_IFMT, kind),)))
    for rule in rules:
        for index, mask, value in rule.args:
            width = WIDTH[ARG_BITS[(rule.syscall, index)]]
            if mask & ~width or value & ~mask:
                raise ValueError(f"seccomp rule {rule}: compares bits the kernel does not read")
    return tuple(rules)


# Every rule that looks at an argument, for the BPF filter and the container engine's
# profile alike (_jail/container.py renders the same table).
ARG_RULES = _arg_rules()


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
    lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p  # char*, freed by us
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def build() -> bytes:
    """Compile the filter to a BPF program (an array of struct sock_filter)."""
    lib = _lib()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        return _build(lib, ctx)
    finally:
        lib.seccomp_release(ctx)


def _rule(lib: ctypes.CDLL, ctx: int, action: int, name: str, *cmps: _ArgCmp) -> None:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr == -1:
        raise OSError(f"seccomp: libseccomp does not know the system call {name!r}")
    if nr < 0:  # a pseudo number: not a system call of this architecture
        return
    array = (_ArgCmp * len(cmps))(*cmps) if cmps else None
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
    if rc < 0:
        raise OSError(-rc, f"seccomp rule for {name}: {os.strerror(-rc)}")


def _build(lib: ctypes.CDLL, ctx: int) -> bytes:
    # Anything but the native ABI (x32, i386 via int 0x80) kills the process.
    lib.seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS)
    eperm = SCMP_ACT_ERRNO(errno.EPERM)
    for name in DENIED:
        _rule(lib, ctx, eperm, name)
    # clone3 passes its flags in memory that BPF cannot read: answer ENOSYS so that
    # glibc falls back to clone(), which the argument rules can inspect.
    _rule(lib, ctx, SCMP_ACT_ERRNO(errno.ENOSYS), "clone3")
    for rule in ARG_RULES:
        cmps = [_ArgCmp(index, SCMP_CMP_MASKED_EQ, mask, value) for index, mask, value in rule.args]
        _rule(lib, ctx, SCMP_ACT_ERRNO(rule.error), rule.syscall, *cmps)
    read_fd, write_fd = os.pipe()
    try:
        rc = lib.seccomp_export_bpf(ctx, write_fd)
        if rc < 0:
            raise OSError(-rc, "seccomp_export_bpf")
        os.close(write_fd)
        write_fd = -1
        chunks = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
        return _unknown_prefix(_highest_known(lib) + 1) + b"".join(chunks)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def _highest_known(lib: ctypes.CDLL) -> int:
    libc_free = ctypes.CDLL(None).free
    libc_free.argtypes = [ctypes.c_void_p]
    arch, highest = lib.seccomp_arch_native(), 0
    for nr in range(MAX_SYSCALL + 1):
        name = lib.seccomp_syscall_resolve_num_arch(arch, nr)
        if name:
            libc_free(name)
            highest = nr
    return highest


def _unknown_prefix(first_unknown: int) -> bytes:
    """BPF run before libseccomp's program: a native call numbered above everything this
    libseccomp can name answers ENOSYS, so a newer kernel's calls (listmount, open_tree_attr,
    ...) never run unfiltered. Other ABIs and x32 numbers fall through to libseccomp."""
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    insns = [
        (ld_abs, 0, 0, 4),  # A = seccomp_data.arch
        (jeq, 0, 4, AUDIT_ARCH_X86_64),  # another ABI: straight to libseccomp (kills it)
        (ld_abs, 0, 0, 0),  # A = seccomp_data.nr
        (jge, 2, 0, X32_SYSCALL_BIT),  # x32: to libseccomp
        (jge, 0, 1, first_unknown),
        (ret, 0, 0, SCMP_ACT_ERRNO(errno.ENOSYS)),
    ]
    return b"".join(struct.pack("=HBBI", *insn) for insn in insns)


def load(program: bytes) -> None:
    """Install a compiled filter on the calling thread (no_new_privs must be set)."""
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc.syscall(libc.SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(fprog))
