"""The seccomp filter: built once with libseccomp in the template, loaded in each sandbox.

A deny list on top of an allow-by-default filter, at least as strict as Docker's default
profile for an unprivileged container (DESIGN.md section 4, step 6). Building costs
milliseconds; loading the precompiled BPF program costs microseconds.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

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
SCMP_CMP_EQ = 4
# The highest x86_64 system call number the filter answers for: any number libseccomp
# cannot name (a kernel newer than the library) answers ENOSYS instead of running unfiltered.
MAX_SYSCALL = 1023
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
TIOCSTI = 0x5412  # push bytes into a terminal's input queue: typing into the operator's shell
TIOCLINUX = 0x541C  # the virtual console's selection paste, same effect
S_IFMT, S_IFCHR, S_IFBLK = 0o170000, 0o020000, 0o060000


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
    # clone() with any namespace flag would hand the code a new user namespace with
    # every capability in it; plain fork/thread clones stay allowed.
    for bit in range(64):
        flag = 1 << bit
        if NAMESPACE_FLAGS & flag:
            _rule(lib, ctx, eperm, "clone", _ArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory that BPF cannot read: answer ENOSYS so that
    # glibc falls back to clone(), which the rule above can inspect.
    _rule(lib, ctx, SCMP_ACT_ERRNO(errno.ENOSYS), "clone3")
    # vsock ignores network namespaces (it reaches the hypervisor and host services), and
    # kernel uevents are broadcast into every network namespace of the host's user namespace.
    _rule(lib, ctx, eperm, "socket", _ArgCmp(0, SCMP_CMP_EQ, AF_VSOCK, 0))
    _rule(
        lib,
        ctx,
        eperm,
        "socket",
        _ArgCmp(0, SCMP_CMP_EQ, AF_NETLINK, 0),
        _ArgCmp(2, SCMP_CMP_EQ, NETLINK_KOBJECT_UEVENT, 0),
    )
    for request in (TIOCSTI, TIOCLINUX):
        _rule(lib, ctx, eperm, "ioctl", _ArgCmp(1, SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, request))
    # Device nodes: the kernel refuses them without CAP_MKNOD, but gVisor's sentry (the
    # Debian 2022 build) creates them in its tmpfs for an unprivileged user; refuse them here
    # for every backend alike (FIFOs and sockets stay allowed).
    for name, mode_arg in (("mknod", 1), ("mknodat", 2)):
        for kind in (S_IFCHR, S_IFBLK):
            _rule(lib, ctx, eperm, name, _ArgCmp(mode_arg, SCMP_CMP_MASKED_EQ, S_IFMT, kind))
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
