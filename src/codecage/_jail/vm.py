"""Backend `vm`: each sandbox is a whole virtual machine with its own Linux kernel (QEMU,
KVM where the host really has it, TCG otherwise), booted from `codecage vm build`'s images.

    host: host cgroups (memory, pids, cpu for QEMU) + channel dir (oci.Channel)
      JOIN: the cgroups, a fresh uid with no groups, no_new_privs -> exec qemu -sandbox on
        guest kernel -> initramfs -> read-only ext4 root -> PID 1: _inside/guest.py (agent)
          the code's cgroup (memory_mb, pids_max) -> init: PID 1 of new namespaces
            (_inside/oci.py: the OCI backends' sequence, the root built by the namespace
            jail's steps: binds of the read-only root, sized tmpfs) -> kernel
      HostRelay: the guest's streams over its one virtio-serial port (_inside/vmrelay.py)
        to the channel's listeners, and the agent's own stream (usage, disks)

What separates the code from the host is a kernel of its own: the guest has no network
device at all (`-nic none`), a read-only root, tmpfs disks of the policy's sizes, the
guest's own cgroup for memory and tasks, and inside it the same steps as every backend
(seccomp, Landlock where the guest kernel has it, no capabilities, uid 1000). QEMU itself
runs as a fresh host uid with no groups and no capabilities, under its own seccomp filter
(`-sandbox on`, no spawning, no privilege changes), in host cgroups of the guest's RAM plus
QEMU_OVERHEAD_MB, with no host files but the read-only images and its own directory.

The host's readings (memory peak, OOM kills, tasks refused, CPU) are the guest cgroup's,
asked of the agent (Agent); they are the guest's word: hostile input, bounded and
type-checked, used only for reporting a limit, never for granting anything. The limits
themselves are enforced twice: by the guest's cgroup and, whatever the guest says, by
the host's cgroups around QEMU.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .._errors import BackendUnavailable, SandboxError, TransportError
from .._inside import guest
from .._inside.messages import SignalRequest
from .._inside.vmrelay import Mux, RelayError
from .._models import KilledBy
from .._policy import Policy
from . import cgroups, features, oci, vmimage
from . import image as _image
from .cgroups import Usage
from .channel import readable
from .host import HostJail, uids
from .launcher import Launched
from .sandbox import HostSandbox
from .template import Runtime, state_dir
from .volumes import Attachment

START_TIMEOUT_S = 180.0  # a cold boot under TCG: ~20 s alone, several at once under load
GUEST_BASE_MB = 160  # the guest's RAM beyond memory_mb: its kernel, the agent, init
DEFAULT_MEMORY_MB = 1024  # the code's memory where the policy sets no limit
QEMU_OVERHEAD_MB = 256  # the host cgroup beyond the guest's RAM: QEMU, TCG's cache
QEMU_PIDS = 64  # QEMU's threads (a vCPU, its I/O and RCU threads, a worker pool)
AGENT_TIMEOUT_S = 10.0  # an agent's answer (a guest under TCG and a loaded host)
MAX_REPLY = 4096
LACKING = {
    "volumes": "a volume would be a disk of the guest's; not supported yet: use the "
    "namespace or bwrap backend",
    "io_limits": "volumes are not supported on this backend",
}
# QEMU under its host uid: the cgroups joined first, then the uid, then QEMU itself
# (`python -I -c JOIN UID GID PROCS... -- QEMU ARGS`).
JOIN = """
import ctypes, os, sys
at = sys.argv.index("--")
uid, gid, groups, procs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:at]
for path in procs:
    with open(path, "w") as f:
        f.write(str(os.getpid()))
os.setgroups([int(g) for g in groups.split(",") if g])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    sys.exit(125)
os.execv(sys.argv[at + 1], sys.argv[at + 1 :])  # an absolute path: no import past setresuid
"""


def probe() -> str | None:
    if shutil.which(vmimage.QEMU) is None:
        return f"{vmimage.QEMU} is not installed: scripts/install-backends (Debian qemu-system-x86)"
    if os.geteuid() != 0:
        return "QEMU guests run as a host uid of their own here, which takes root"
    if cgroups.detect_version() is None:
        return "no usable cgroups"
    if vmimage.current() is None:
        return "the VM image is not built: run `codecage vm build`"
    return None


def guest_memory_mb(policy: Policy) -> int:
    """The guest's RAM: the code's memory, and room for the guest's own kernel and agent."""
    return (policy.memory_mb or DEFAULT_MEMORY_MB) + GUEST_BASE_MB


class VmJail(HostJail):
    """Backend `vm`: one QEMU guest per codecage sandbox."""

    name = "vm"
    enforces = features.ALL - frozenset(LACKING)
    why = dict(LACKING)

    def __init__(self, runtime: Runtime | None = None) -> None:
        why = probe()
        if why is not None:
            raise BackendUnavailable(f"vm: {why}")
        self.runtime = runtime or Runtime.default()
        self.image = _image.require(self.runtime)
        self.vm = vmimage.require()
        found = vmimage.accelerator(vm=self.vm)  # booted once per QEMU and guest, then kept
        if not found.ok:
            raise BackendUnavailable(f"vm: no guest boots here: {found.detail}")
        self.accel = found.accel
        self.landlock_abi = _count((found.hello or {}).get("landlock", 0))
        if self.landlock_abi < 1:
            self.enforces = self.enforces - {"landlock"}
            self.why = {**self.why, "landlock": "the guest's kernel has no Landlock"}
        self.cgroup_version = cgroups.detect_version() or 1
        self.owner = f"{cgroups.owner_name()}-vm"
        cgroups.claim_owner(self.cgroup_version, self.owner)
        cgroups.sweep(self.cgroup_version, self.owner)
        total = int(os.environ.get("CODECAGE_TOTAL_MEMORY_MB", 0)) or cgroups.default_total_mb()
        cgroups.cap_owner(self.cgroup_version, self.owner, total)
        self.total_memory_mb = total
        self.package = oci.staged_package(self.image)
        self._remove_stale()

    def spawn(
        self, policy: Policy, envs: dict[str, str], volumes: tuple[Attachment, ...] = ()
    ) -> HostSandbox:
        return HostSandbox(policy, lambda box: VmLauncher(self, box), envs, START_TIMEOUT_S)

    def close(self) -> None:
        super().close()
        cgroups.remove_owner(self.cgroup_version, self.owner)

    def _remove_stale(self) -> None:
        """The directories of guests whose owner is gone (their QEMU died with the cgroups'
        sweep)."""
        base = state_dir() / "vm"
        for entry in base.iterdir() if base.is_dir() else ():
            owner = entry / "owner"
            name = owner.read_text().strip() if owner.exists() else ""
            if name and name != self.owner and not cgroups.owner_alive(name):
                shutil.rmtree(entry, ignore_errors=True)


def _count(value: object) -> int:
    """A count the guest reported: a non-negative int, or the guest broke the protocol."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
        raise OSError(f"the guest reported {str(value)[:40]!r} where a count belongs")
    return value


class Agent:
    """The host's end of the guest agent's stream: one JSON line each way per question."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.pending = b""

    def call(self, op: str) -> dict[str, Any]:
        """The agent's answer to `op` (OSError: gone, silent, or no answer of this shape)."""
        with self.lock:
            self.sock.settimeout(AGENT_TIMEOUT_S)
            try:
                self.sock.sendall(json.dumps({"op": op}).encode() + b"\n")
                while b"\n" not in self.pending:
                    if len(self.pending) > MAX_REPLY:
                        raise OSError("the guest agent's answer is too long")
                    data = self.sock.recv(MAX_REPLY)
                    if not data:
                        raise OSError("the guest agent is gone")
                    self.pending += data
            except TimeoutError:
                raise OSError("the guest agent did not answer") from None
            line, _, self.pending = self.pending.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError:
            raise OSError("the guest agent's answer is not JSON") from None
        if not isinstance(reply, dict) or "error" in reply:
            raise OSError(f"the guest agent: {str(reply)[:200]}")
        return reply

    def close(self) -> None:
        self.sock.close()


class VmCgroups(cgroups.SandboxCgroups):
    """QEMU's host cgroups (the limits the host enforces, whatever the guest does), whose
    readings are the guest cgroup's, from its agent (the last ones once it is gone)."""

    agent: Agent | None = None
    _last: Usage | None = None
    _current = 0

    def guest(self) -> Usage | None:
        """The guest cgroup's readings, None before the agent answers."""
        if self.agent is not None:
            with contextlib.suppress(OSError):
                got = self.agent.call("usage")
                self._last = Usage(
                    memory_peak_bytes=_count(got.get("memory_peak")),
                    oom_kills=_count(got.get("oom_kills")),
                    pids_max_events=_count(got.get("pids_max_events")),
                    cpu_s=_count(got.get("cpu_usec")) / 1e6,
                )
                self._current = _count(got.get("memory_current"))
        return self._last

    def host_usage(self) -> Usage:
        return super().usage()

    def usage(self) -> Usage:
        return self.guest() or Usage(None, 0, 0, 0.0)

    def memory_current(self) -> int:
        self.guest()
        return self._current

    def reset_peak(self) -> None:
        if self.agent is not None:
            with contextlib.suppress(OSError):
                self.agent.call("reset_peak")


class GuestMounts:
    """Whether a disk of the guest is full: the agent's statvfs, through init's root."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def full(self) -> bool:
        try:
            return self.agent.call("disks").get("full") is True
        except OSError:
            return False

    def close(self) -> None:
        pass


class HostRelay:
    """The host's side of the guest's port: the greeting, the sandbox's limits, then the
    relay (on a thread of its own) to the channel's listeners and to the agent."""

    def __init__(self, channel_dir: Path, on_broken: Any) -> None:
        self.channel_dir = channel_dir
        self.on_broken = on_broken  # called with why, if the guest breaks the relay's rules
        self.agent: Agent | None = None
        self.agent_ready = threading.Event()
        self.stopping = False
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def start(
        self,
        qemu: subprocess.Popen[bytes],
        path: Path,
        limits: dict[str, Any],
        deadline: float,
    ) -> dict[str, object]:
        opened = vmimage.open_channel(qemu, path, deadline)
        if opened is None:
            raise TransportError("the guest did not greet the host on its channel")
        self.sock, hello, rest = opened
        self.sock.sendall(json.dumps(limits).encode() + b"\n")
        mux = Mux(self.sock.fileno(), connect=self._connect)
        self.thread = threading.Thread(
            target=self._run, args=(mux, rest), name="codecage-vm-relay", daemon=True
        )
        self.thread.start()
        return hello

    def _connect(self, name: str) -> socket.socket | None:
        if name in ("supervisor.sock", "kernel.sock"):
            kind = socket.SOCK_SEQPACKET if name == "supervisor.sock" else socket.SOCK_STREAM
            sock = socket.socket(socket.AF_UNIX, kind)
            try:
                sock.connect(str(self.channel_dir / name))
            except OSError:  # the supervisor's listener is gone once init connected
                sock.close()
                return None
            return sock
        if name == "agent" and self.agent is None:
            ours, theirs = socket.socketpair()
            self.agent = Agent(ours)
            self.agent_ready.set()
            return theirs
        return None

    def _run(self, mux: Mux, rest: bytes) -> None:
        try:
            mux.feed(rest)
            mux.run(lambda: self.stopping)
        except (RelayError, OSError) as exc:
            if not self.stopping:
                self.on_broken(f"the guest broke the relay's rules ({exc}): the sandbox has ended")
        finally:
            mux.close()

    def stop(self) -> None:
        self.stopping = True
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.sock is not None:
            self.sock.close()
        if self.agent is not None:
            self.agent.close()


class VmLauncher(oci.OciLauncher):
    """One QEMU guest. Signals reach the code through init (the guest's processes are not
    the host's); the sandbox's death shows as QEMU's exit."""

    # The kernel's first cell imports IPython in the guest (seconds under TCG): the
    # sandbox's start-up, not the session's cpu_s.
    prefault_at_start = True

    def __init__(self, jail: VmJail, box: HostSandbox) -> None:
        super().__init__(box)
        self.id, self.policy = box.id, box.policy
        self.jail = jail
        self.tree: VmCgroups = VmCgroups(jail.cgroup_version, self.id, jail.owner)
        self.uid: int | None = None
        self.qemu: subprocess.Popen[bytes] | None = None
        self.relay: HostRelay | None = None
        self.dir = state_dir() / "vm" / self.id

    def tree_policy(self, policy: Policy) -> Policy:
        """QEMU's host limits: the guest's RAM and QEMU's own; its threads, not the code's
        tasks (those the guest's cgroup counts)."""
        memory = guest_memory_mb(policy) + QEMU_OVERHEAD_MB
        return policy.model_copy(update={"memory_mb": memory, "pids_max": QEMU_PIDS})

    def launch(self, envs: dict[str, str]) -> Launched:
        deadline = time.monotonic() + START_TIMEOUT_S
        jail, policy = self.jail, self.policy
        self.oci_channel = channel = oci.Channel(self.id)
        self.uid = uid = uids.take()
        self.dir.mkdir(parents=True)
        (self.dir / "owner").write_text(jail.owner)  # for the start-up sweep
        os.chown(self.dir, uid, uid)
        os.chmod(self.dir, 0o700)
        port, console = self.dir / "channel.sock", self.dir / "console.log"
        qemu = vmimage.boot_argv(jail.vm, port, console, jail.accel, guest_memory_mb(policy))
        groups = ""
        if jail.accel == "kvm":  # /dev/kvm: its group's, the one group QEMU keeps
            groups = str(os.stat("/dev/kvm").st_gid)
        join = [sys.executable, "-I", "-c", JOIN, str(uid), str(uid), groups]
        with open(self.dir / "qemu.log", "wb") as log:
            self.qemu = proc = subprocess.Popen(
                [
                    *join,
                    *self.tree.procs_files(),
                    "--",
                    shutil.which(qemu[0]) or qemu[0],
                    *qemu[1:],
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        pidfd = os.pidfd_open(proc.pid)
        try:
            self.relay = HostRelay(channel.dir, self._broken)
            limits = {"memory_mb": policy.memory_mb, "pids_max": policy.pids_max}
            hello = self.relay.start(proc, port, limits, deadline)
            if hello.get("interfaces") != ["lo"]:  # what QEMU gave the guest: no NIC at all
                raise SandboxError(f"the guest sees network devices: {hello.get('interfaces')}")
            supervisor = channel.accept_supervisor(deadline)
            supervisor.send(json.dumps(self._spec(envs)).encode())
            if not self.relay.agent_ready.wait(max(0.0, deadline - time.monotonic())):
                raise TransportError("the guest's agent did not connect")
            self.tree.agent = self.relay.agent
        except BaseException:
            os.close(pidfd)
            raise
        return Launched(supervisor, pidfd, None)

    def _spec(self, envs: dict[str, str]) -> dict[str, Any]:
        """init's spec: the OCI backends' (env, uid 1000, rlimits, the kernel's token
        socket), and what the namespace jail's root step needs, in the guest's terms."""
        policy, image = self.policy, self.jail.image
        env = oci.environment(self.jail.runtime, policy, envs)
        spec = oci.spec(policy, env, [], done=("cgroups", "namespaces", "oom_score"))
        binds = ["/usr", str(image.runtime), image.package_root, guest.CHANNEL]
        return {
            **spec,
            "userns": None,
            "landlock": self.jail.landlock_abi >= 1,
            "kernel_socket": f"{guest.CHANNEL}/kernel.sock",
            "root_mountpoint": guest.ROOT_MOUNTPOINT,
            "ro_binds": list(dict.fromkeys(binds)),
            "workspace_mb": policy.disk_mb,
            "tmp_mb": policy.tmp_mb,
            "shm_mb": policy.shm_mb,
            "cgroup_controllers": [],
            "volumes": [],
        }

    def _broken(self, why: str) -> None:
        self.box.terminate(why)

    def signal(self, sig: int) -> None:
        """Through init: the guest's processes are not the host's."""
        with contextlib.suppress(OSError):
            self.box.channel.tell_init(SignalRequest(op="signal", signal=int(sig)))

    def init_hung_up(self) -> bool:
        """QEMU ended (its guest powered off when init died, or its host limit was hit):
        the kernel's death is reported like init would, once; restarting ends the sandbox."""
        pidfd = self.box.init_pidfd
        return pidfd is not None and bool(readable([pidfd], 2.0))

    def ended_with_init(self) -> tuple[str, KilledBy | None]:
        with contextlib.suppress(OSError):
            if self.tree.host_usage().oom_kills > 0:
                return "the VM reached its host memory limit and ended", "memory_limit"
        return "its VM ended (the guest's init or kernel died)", None

    def open_mounts(self) -> GuestMounts:
        assert self.relay is not None and self.relay.agent is not None
        return GuestMounts(self.relay.agent)

    def diagnostics(self) -> str:
        out = []
        for name in ("qemu.log", "console.log"):
            with contextlib.suppress(OSError):
                text = (self.dir / name).read_text(errors="replace").strip()
                if text:
                    out.append(f"{name}: {text[-1500:]}")
        return "; ".join(out)

    def release(self, init_dead: bool) -> None:
        if self.relay is not None:
            self.relay.stop()
        if self.qemu is not None:
            if self.qemu.poll() is None:
                self.qemu.send_signal(signal.SIGKILL)
            self.qemu.wait()
        if self.oci_channel is not None:
            self.oci_channel.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.uid is not None:
            uids.give_back(self.uid)
