"""PID 1 of a full-VM guest (`isolation="vm"`, _jail/vm.py), after the initramfs has
switched into the read-only root (_jail/vmimage.py). Standard library only, like everything
in _inside/; the codecage package is the image's own copy.

    greet the host on the virtio-serial port (its kernel, its network interfaces, its root's
      mount options, its Landlock ABI: what the host checks it was given), one JSON line
    read the sandbox's limits, one JSON line from the host
    the guest's cgroup for the code (memory.max, pids.max), the relay's listeners
    fork init as PID 1 of new namespaces in that cgroup, exec _inside/oci.py: from there on
      the OCI backends' sequence, the spec from the host over the relay (the root built
      by init with the namespace jail's steps: binds of the read-only root, sized tmpfs)
    relay every stream over the port (vmrelay.Mux), answer the host's questions on the
      "agent" stream (the code's cgroup readings, whether a disk is full)
    power the guest off when init ends, the host goes away or breaks the relay's rules

The agent runs as the guest's root beside the sandbox's PID namespace; nothing of the code
runs in its cgroup or can reach its socket (in a directory of root's, 0700).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

PORT = "/dev/vport0p1"  # the guest's one virtio-serial port (vmimage.PORT)
RB_POWER_OFF = 0x4321FEDC
# The agent's tmpfs: on /mnt, empty in the image (its /run holds the codecage package)
RUN = "/mnt"
CHANNEL = f"{RUN}/codecage-channel"  # the relay's listeners for init
ROOT_MOUNTPOINT = f"{RUN}/codecage-root"  # init builds the sandbox's root here
AGENT_DIR = f"{RUN}/codecage-agent"
CGROUP = "/sys/fs/cgroup/sandbox"  # the code's (init, its kernels, their children)
MAX_LINE = 4096
MAX_REQUESTS = 64 << 10  # what the host's agent stream may have waiting, in bytes
DISKS = ("home/user", "tmp", "dev/shm")  # under init's root
FULL_BELOW = 64 * 1024  # as the host's StatvfsMounts: a disk with less free is full


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    if _libc().mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()):
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {fstype} on {target}: {os.strerror(errno)}")


def _prepare() -> dict[str, object]:
    """The guest's own filesystems, and what it was given: its network interfaces, its
    root's mount options, its Landlock ABI."""
    nosuid, nodev, noexec = 2, 4, 8
    _mount("proc", "/proc", "proc", nosuid | nodev | noexec)
    _mount("sysfs", "/sys", "sysfs", nosuid | nodev | noexec)
    with open("/proc/mounts") as f:
        root = [line.split()[3] for line in f if line.split()[1] == "/"]
    net = "/sys/class/net"
    facts: dict[str, object] = {
        "interfaces": sorted(os.listdir(net)) if os.path.isdir(net) else None,
        "root_options": root[-1] if root else None,
    }
    _mount("codecage-run", RUN, "tmpfs", nosuid | nodev | noexec, "size=1m,mode=0755")
    _mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid | nodev | noexec)
    # Allocations are not refused up front by the guest's small RAM (a MemoryError where
    # every other backend has the code's cgroup OOM-kill its kernel): its cgroup decides.
    _write("/proc/sys/vm/overcommit_memory", "1")
    return facts


def _landlock_abi() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from codecage._inside import landlock

    try:
        return landlock.abi_version()
    except OSError:
        return 0


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read_line(fd: int) -> bytes | None:
    """One line from the host, before the relay starts (a byte at a time: nothing past it
    is taken from the port). None if the host closed its end."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte or len(line) >= MAX_LINE:
            return None
        line += byte
    return bytes(line)


def _keyed(path: str) -> dict[str, int]:
    with open(path) as f:
        return {k: int(v) for k, v in (line.split() for line in f if line.strip())}


class Agent:
    """The guest's side of one sandbox (see the module's docstring)."""

    def __init__(self, port: int, limits: dict[str, Any]) -> None:
        from codecage._inside import vmrelay

        self.port = port
        self._cgroup(limits)
        os.makedirs(CHANNEL, mode=0o755)
        os.makedirs(ROOT_MOUNTPOINT, mode=0o755)
        os.makedirs(AGENT_DIR, mode=0o700)
        listeners = {
            "supervisor.sock": self._listen(f"{CHANNEL}/supervisor.sock", socket.SOCK_SEQPACKET),
            "kernel.sock": self._listen(f"{CHANNEL}/kernel.sock", socket.SOCK_STREAM),
            "agent": self._listen(f"{AGENT_DIR}/agent.sock", socket.SOCK_STREAM),
        }
        for name in ("supervisor.sock", "kernel.sock"):
            os.chmod(f"{CHANNEL}/{name}", 0o777)  # the sandbox's uid connects to these
        self.mux = vmrelay.Mux(port, listeners=listeners, once=("supervisor.sock", "agent"))
        # the agent's own stream to the host: connected now, accepted by the relay's first step
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.control.connect(f"{AGENT_DIR}/agent.sock")
        self.requests = bytearray()
        self.init_pid = self._start_init()
        self.init_fd = os.pidfd_open(self.init_pid)

    @staticmethod
    def _listen(path: str, kind: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, kind)
        sock.bind(path)
        sock.listen(8)
        sock.setblocking(False)
        return sock

    @staticmethod
    def _cgroup(limits: dict[str, Any]) -> None:
        _write("/sys/fs/cgroup/cgroup.subtree_control", "+memory +pids")
        os.mkdir(CGROUP)
        memory, pids = limits.get("memory_mb"), limits.get("pids_max")
        if memory is not None:
            _write(f"{CGROUP}/memory.max", str(int(memory) << 20))
            with contextlib.suppress(FileNotFoundError):
                _write(f"{CGROUP}/memory.swap.max", "0")
        _write(f"{CGROUP}/pids.max", "max" if pids is None else str(int(pids)))

    def _start_init(self) -> int:
        """Init: PID 1 of new namespaces, in the code's cgroup, _inside/oci.py's entry."""
        from codecage._inside import libc, namespaces

        package_root = str(Path(__file__).resolve().parents[2])
        bootstrap = (
            f"import sys; sys.path.insert(0, {package_root!r}); "
            "from codecage._inside.oci import main; main()"
        )
        argv = [sys.executable, "-I", "-c", bootstrap, f"{CHANNEL}/supervisor.sock"]
        pid = libc.fork_new_pid_namespace()
        if pid == 0:
            try:
                _write(f"{CGROUP}/cgroup.procs", "0")  # before its cgroup namespace
                namespaces.enter_namespaces(None, pid=False)
                os.execve(argv[0], argv, {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
            except BaseException:
                traceback.print_exc()
            os._exit(127)
        return pid

    def run(self) -> None:
        """Relay until init ends, or the port closes, or the host breaks the relay's rules."""
        from codecage._inside.vmrelay import RelayError

        try:
            while True:
                ready = self.mux.step(1.0, extra=(self.control.fileno(), self.init_fd))
                if "supervisor.sock" not in self.mux.listeners:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{CHANNEL}/supervisor.sock")
                if self.init_fd in ready:
                    os.waitpid(self.init_pid, 0)
                    return
                if self.control.fileno() in ready and not self._answer():
                    return
        except (EOFError, RelayError, OSError):
            traceback.print_exc()

    def _answer(self) -> bool:
        data = self.control.recv(MAX_LINE)
        if not data:
            return False
        self.requests += data
        if len(self.requests) > MAX_REQUESTS:
            return False
        while b"\n" in self.requests:
            line, _, rest = bytes(self.requests).partition(b"\n")
            self.requests = bytearray(rest)
            try:
                reply = self._reply(json.loads(line))
            except Exception as exc:  # the host is told; the agent goes on
                reply = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            self.control.sendall(json.dumps(reply).encode() + b"\n")
        return True

    def _reply(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "usage":
            memory = _keyed(f"{CGROUP}/memory.events")
            with open(f"{CGROUP}/memory.current") as f:
                current = int(f.read())
            peak = current
            with contextlib.suppress(FileNotFoundError), open(f"{CGROUP}/memory.peak") as f:
                peak = int(f.read())
            return {
                "memory_peak": peak,
                "memory_current": current,
                "oom_kills": memory.get("oom_kill", 0),
                "pids_max_events": _keyed(f"{CGROUP}/pids.events").get("max", 0),
                "cpu_usec": _keyed(f"{CGROUP}/cpu.stat").get("usage_usec", 0),
            }
        if op == "reset_peak":
            try:  # resettable since Linux 6.12; before, the peak is the sandbox's whole life
                _write(f"{CGROUP}/memory.peak", "0")
                return {"reset": True}
            except OSError:
                return {"reset": False}
        if op == "disks":
            root = f"/proc/{self.init_pid}/root"
            full = False
            for path in DISKS:
                st = os.statvfs(f"{root}/{path}")
                full = full or st.f_bavail * st.f_frsize < FULL_BELOW
            return {"full": full}
        return {"error": f"unknown op {op!r}"}


def main() -> None:
    try:
        facts = _prepare()
        port = os.open(PORT, os.O_RDWR | os.O_CLOEXEC)
        hello = {
            "ev": "hello",
            "pid": os.getpid(),
            "kernel": os.uname().release,
            "landlock": _landlock_abi(),
            **facts,
        }
        os.write(port, json.dumps(hello).encode() + b"\n")
        line = _read_line(port)  # the probe closes its end here
        if line is not None:
            Agent(port, json.loads(line)).run()
    except BaseException:
        traceback.print_exc()  # on the guest's console (the host's diagnostics)
    finally:
        os.sync()
        _libc().reboot(RB_POWER_OFF)


if __name__ == "__main__":
    main()
