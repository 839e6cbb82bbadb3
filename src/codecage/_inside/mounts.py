"""The sandbox's filesystem: a new root on tmpfs, read-only binds of the runtime, a
generated /etc, a minimal /dev, size-capped tmpfs for the workspace, /tmp and /dev/shm.

Run in the sandbox's own mount namespace, so nothing here is visible on the host and
everything disappears with the namespace.
"""

from __future__ import annotations

import os

from . import libc
from .libc import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT

DEVICES = ("null", "zero", "full", "random", "urandom")
# /root on every backend: a symlink (on the read-only root) to the workspace, so code written
# for E2B's root (`cwd="/root"`, `~root`) finds a home it can write, and no new writable place.
ROOT_HOME_TARGET = "home/user"
SAFE = MS_NOSUID | MS_NODEV


def build_root(root: str, spec: dict[str, object], volume_fds: list[int] | None = None) -> None:
    """Populate the new root at `root` (a host directory used as a mount point only).
    `volume_fds`: the host's detached volume mounts, one per spec["volumes"] entry."""
    libc.mount("none", "/", None, MS_REC | libc.MS_PRIVATE)
    libc.mount("codecage-root", root, "tmpfs", SAFE, "size=4m,mode=0755")
    binds = spec["ro_binds"]
    assert isinstance(binds, list)
    for path in binds:
        _bind_ro(path, root + path)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")):
        os.symlink(target, f"{root}/{link}")
    if os.path.isdir("/usr/lib64"):
        os.symlink("usr/lib64", f"{root}/lib64")
    # root and the sandbox user are one identity here: root's home is the one home
    os.symlink(ROOT_HOME_TARGET, f"{root}/root")
    uid, gid = int(str(spec["uid"])), int(str(spec["gid"]))
    _etc(root, uid, gid)
    _dev(root, int(str(spec["shm_mb"])), uid, gid)
    volumes = spec.get("volumes") or []
    assert isinstance(volumes, list)
    paths = [str(v["path"]) for v in volumes]
    if "/home/user" not in paths:
        _tmpfs(f"{root}/home/user", int(str(spec["workspace_mb"])), uid, gid, mode=0o700)
    _tmpfs(f"{root}/tmp", int(str(spec["tmp_mb"])), uid, gid, mode=0o1777)
    attach_volumes(root, paths, volume_fds or [])
    _cgroups(root, spec["cgroup_controllers"])
    os.makedirs(f"{root}/proc")


def attach_volumes(root: str, paths: list[str], fds: list[int]) -> None:
    """Move each volume's detached mount (the host made it nosuid,nodev and idmapped) to
    its path under the new root; the descriptors are closed once it is there."""
    if len(paths) != len(fds):
        raise OSError(f"{len(paths)} volumes in the spec but {len(fds)} mounts passed")
    for path, fd in zip(paths, fds, strict=True):
        target = root + path
        os.makedirs(target, mode=0o755, exist_ok=True)
        libc.move_mount(fd, target)
        os.close(fd)


def _bind_ro(source: str, target: str) -> None:
    os.makedirs(target, exist_ok=True)
    libc.mount(source, target, None, MS_BIND | MS_REC)
    # A bind ignores flags on the first call: read-only needs a second remount.
    libc.mount("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | SAFE)


def _tmpfs(target: str, size_mb: int, uid: int, gid: int, mode: int) -> None:
    os.makedirs(target, exist_ok=True)
    options = f"size={size_mb}m,mode={mode:o},uid={uid},gid={gid}"
    libc.mount("codecage", target, "tmpfs", SAFE, options)


def _etc(root: str, uid: int, gid: int) -> None:
    files = {
        "passwd": f"root:x:0:0:root:/root:/usr/sbin/nologin\nuser:x:{uid}:{gid}:sandbox:/home/user:/bin/sh\n",
        "group": f"root:x:0:\nuser:x:{gid}:\n",
        "hostname": "sandbox\n",
        "hosts": "127.0.0.1 localhost sandbox\n::1 localhost\n",
        "resolv.conf": "",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
    }
    os.makedirs(f"{root}/etc")
    for name, text in files.items():
        with open(f"{root}/etc/{name}", "w") as f:
            f.write(text)


def _dev(root: str, shm_mb: int, uid: int, gid: int) -> None:
    dev = f"{root}/dev"
    os.makedirs(dev)
    libc.mount("codecage-dev", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for name in DEVICES:
        open(f"{dev}/{name}", "w").close()
        libc.mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
        libc.mount("none", f"{dev}/{name}", None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NOEXEC)
    os.makedirs(f"{dev}/pts")
    # A private devpts instance: ptys for `!cmd`, never the operator's terminals.
    libc.mount(
        "devpts",
        f"{dev}/pts",
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    os.symlink("pts/ptmx", f"{dev}/ptmx")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0")):
        os.symlink(target, f"{dev}/{name}")
    os.symlink("/proc/self/fd/1", f"{dev}/stdout")
    os.symlink("/proc/self/fd/2", f"{dev}/stderr")
    _tmpfs(f"{dev}/shm", shm_mb, uid, gid, mode=0o1777)
    libc.mount("none", dev, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)


def _cgroups(root: str, controllers: object) -> None:
    """Read-only views of the sandbox's own cgroups (a cgroup namespace makes them its root)."""
    assert isinstance(controllers, list)
    if not controllers:
        return
    base = f"{root}/sys/fs/cgroup"
    os.makedirs(base)
    libc.mount("codecage-cgroup", base, "tmpfs", SAFE | MS_NOEXEC, "size=16k,mode=0755")
    for name in controllers:
        os.makedirs(f"{base}/{name}")
        if name == "unified":
            libc.mount("cgroup2", f"{base}/{name}", "cgroup2", SAFE | MS_NOEXEC | MS_RDONLY)
        else:
            libc.mount("cgroup", f"{base}/{name}", "cgroup", SAFE | MS_NOEXEC | MS_RDONLY, name)
    libc.mount("none", base, None, MS_REMOUNT | MS_RDONLY | SAFE | MS_NOEXEC)


def enter_root(root: str) -> None:
    """In the PID namespace's init: mount its /proc, pivot into the new root, detach the old."""
    libc.mount("proc", f"{root}/proc", "proc", SAFE | MS_NOEXEC)
    os.chdir(root)
    libc.pivot_root(".", ".")
    libc.umount2(".", libc.MNT_DETACH)
    os.chdir("/")
    libc.mount("none", "/", None, MS_REMOUNT | MS_RDONLY | SAFE)
