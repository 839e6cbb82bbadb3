"""Backend `gvisor`: each sandbox is a runsc sandbox (gVisor's user-space kernel, ptrace
platform) running an OCI bundle on the image of `codecage image build`.

    host: cgroups (created here; runsc joins them) + channel dir + bundle/config.json
      runsc --network=none --host-uds=open --platform=ptrace run --detach
        sentry (the guest's kernel) -> PID 1: _inside/oci.py -> init -> kernel

The sandbox's code talks to the sentry, not to the host kernel; the sentry runs under
runsc's own seccomp filter. Read-only root; tmpfs workspace, /tmp and /dev/shm with sizes;
no network interface but loopback; the cgroup limits cover the whole sandbox, sentry and
gofer included: memory counts gVisor's own overhead, and the host's pids.max counts the
sentry's threads, so it is raised to PIDS_FLOOR while the policy's pids_max is enforced by the
sentry on the guest's own tasks.

gVisor has no OOM handling of its own (google/gvisor#2520): at the cgroup's limit the host's
OOM killer would pick the sentry and end the whole sandbox. So the host handles the OOM
itself (cgroup v1: `oom_kill_disable` and an OOM eventfd, GuestOom): at memory_mb the
sandbox is paused by the host kernel, the limit is raised by GUEST_OOM_HEADROOM_MB so the
sentry can run again, the guest's kernel is SIGKILLed through init, and the limit comes
back once the sentry has given the memory back: the run ends with
killed_by="memory_limit" and the next run finds a fresh kernel, as on every other level.

runsc always makes /dev/fuse and /dev/net/tun (and /dev/tty); each is masked by an empty
read-only file, so the guest sees the devices of oci.ALLOWED_DEVICES only.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._errors import BackendUnavailable, SandboxError
from .._inside.messages import SignalRequest
from .._models import KilledBy
from .._policy import Policy
from . import cgroups, features, oci
from . import image as _image
from .channel import readable
from .host import HostJail
from .launcher import NO_MOUNTS, Launched, Mounts
from .sandbox import HostSandbox
from .template import Runtime, state_dir

PIDS_FLOOR = 256  # host tasks: below ~256 in its cgroup, runsc's sentry crashes (MEASURED.md)
RUNSC_FLAGS = ("--network=none", "--host-uds=open", "--platform=ptrace")
START_TIMEOUT_S = 30.0
SENTRY_OOM_STUCK = (
    "the sandbox reached its memory limit and its gVisor kernel did not give the memory "
    "back once the code was killed: the sandbox has ended"
)
SENTRY_OOM = (
    "the sandbox reached its memory limit and the host's OOM killer ended its gVisor kernel "
    "(gVisor has no OOM handling of its own): the sandbox has ended"
)
GUEST_OOM_HEADROOM_MB = 64  # above memory_mb, only while the guest's kernel is being ended
GUEST_OOM_MARGIN_MB = 32  # the limit comes back once usage is this far below it
GUEST_OOM_SETTLE_S = 10.0  # for the sentry to give the memory back, else the sandbox ends
MASKED_DEVICES = ("/dev/fuse", "/dev/net/tun", "/dev/tty")  # runsc makes them always
LACKING = {
    "landlock": "the sentry has no Landlock; its root is read-only instead, so only "
    "/home/user, /tmp and /dev/shm are writable",
    "own_uid": "every sandbox's code runs as uid 1000 of its own sentry, and every sentry "
    "as the same host user; what separates sandboxes is a kernel each",
    "nosuid_mounts": "this runsc keeps no nosuid/nodev flag on the guest's mounts (its "
    "mountinfo shows none); instead the image holds no setuid/setgid file, no file "
    "capability and no device node, and the code runs with no_new_privs",
}


def probe() -> str | None:
    if shutil.which("runsc") is None:
        return "runsc is not installed: scripts/install-backends (Debian package runsc)"
    if os.geteuid() != 0:
        return "runsc runs sandboxes as root here (cgroups, OCI bundles)"
    if cgroups.detect_version() is None:
        return "no usable cgroups"
    if _image.current() is None:
        return "the sandbox image is not built: run `codecage image build`"
    return None


class GvisorJail(HostJail):
    """Backend `gvisor`: one runsc sandbox per codecage sandbox."""

    name = "gvisor"
    enforces = features.ALL - frozenset(LACKING)
    why = dict(LACKING)

    def __init__(self, runtime: Runtime | None = None) -> None:
        why = probe()
        if why is not None:
            raise BackendUnavailable(f"gvisor: {why}")
        self.runtime = runtime or Runtime.default()
        self.image = _image.require(self.runtime)
        self.cgroup_version = cgroups.detect_version() or 1
        if self.cgroup_version != 1:
            self.enforces = self.enforces - {"kernel_oom"}
            self.why = {
                **self.why,
                "kernel_oom": "the host handles the guest's OOM on cgroup v1 only: at "
                "memory_mb the host's OOM killer ends the whole sandbox (gVisor has no OOM "
                "handling of its own)",
            }
        self.owner = f"{cgroups.owner_name()}-gvisor"
        cgroups.sweep(self.cgroup_version, self.owner)
        total = int(os.environ.get("CODECAGE_TOTAL_MEMORY_MB", 0)) or cgroups.default_total_mb()
        cgroups.cap_owner(self.cgroup_version, self.owner, total)
        self.total_memory_mb = total
        self.state_root = state_dir() / "runsc"
        self.state_root.mkdir(exist_ok=True)
        self._remove(lambda owner: owner != self.owner and not cgroups.owner_alive(owner))

    @property
    def package(self) -> Path:
        """The codecage package as sandboxes see it: the image holds it at the path where
        the namespace jail stages it, staged here too."""
        return oci.staged_package(self.image)

    def spawn(self, policy: Policy, envs: dict[str, str]) -> HostSandbox:
        return HostSandbox(policy, lambda box: GvisorLauncher(self, box), envs, START_TIMEOUT_S)

    def close(self) -> None:
        super().close()
        self._remove(lambda owner: owner == self.owner)
        cgroups.remove_owner(self.cgroup_version, self.owner)

    def _remove(self, which: Any) -> None:
        """runsc sandboxes (and their directories) of the owners `which` selects: this
        jail's at close; at start-up, those of processes that are gone."""
        base = state_dir() / "oci"
        for entry in base.iterdir() if base.is_dir() else ():
            owner_file = entry / "owner"
            owner = owner_file.read_text().strip() if owner_file.exists() else ""
            if not owner.endswith("-gvisor"):
                continue  # another backend's (or one being set up)
            if which(owner):
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    subprocess.run(
                        self.command("delete", "--force", entry.name),
                        capture_output=True,
                        timeout=30,
                    )
                shutil.rmtree(entry, ignore_errors=True)

    def command(self, *args: str) -> list[str]:
        return [shutil.which("runsc") or "runsc", f"--root={self.state_root}", *RUNSC_FLAGS, *args]


class GvisorLauncher(oci.OciLauncher):
    """One runsc sandbox. Signals reach the code through init (the guest's processes are
    not host processes); its death shows as the sentry's exit."""

    # The kernel's first cell imports IPython through the gofer (~1.2 s of CPU here): the
    # sandbox's start-up, not the session's cpu_s (a pool's prefault repeats it cheaply).
    prefault_at_start = True

    def __init__(self, jail: GvisorJail, box: HostSandbox) -> None:
        super().__init__(box)
        self.id, self.policy = box.id, box.policy
        self.jail = jail
        self.tree: FlooredCgroups = FlooredCgroups(jail.cgroup_version, self.id, jail.owner)
        self.tree.on_guest_oom = self._guest_oom
        self._started = False

    def launch(self, envs: dict[str, str]) -> Launched:
        deadline = time.monotonic() + START_TIMEOUT_S
        self.oci_channel = channel = oci.Channel(self.id)
        bundle = oci.bundle_dir(self.id)
        (bundle.parent / "owner").write_text(self.jail.owner)  # for the start-up sweep
        config = bundle_config(self.jail.image, self.policy, str(channel.dir), self.tree)
        (bundle / "config.json").write_text(json.dumps(config))
        self._started = True
        # init connects while `runsc run` is still starting it: accept before waiting.
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(
                self.jail.command("run", "--detach", f"--bundle={bundle}", self.id),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            try:
                supervisor = channel.accept_supervisor(deadline)
                env = oci.environment(self.jail.runtime, self.policy, envs)
                spec = oci.spec(self.policy, env, [])
                if self.policy.pids_max is not None:  # the guest's own count, exactly
                    spec["rlimits"]["nproc"] = self.policy.pids_max
                supervisor.send(json.dumps(spec).encode())
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except BaseException:
                proc.kill()
                proc.wait()
                log.seek(0)
                raise SandboxError(
                    f"runsc could not start the sandbox: {log.read().decode()[-2000:]}"
                ) from None
            if code != 0:
                log.seek(0)
                raise SandboxError(
                    f"runsc could not start the sandbox: {log.read().decode()[-2000:]}"
                )
        pidfd = os.pidfd_open(_sandbox_pid(self.jail, self.id))
        return Launched(supervisor, pidfd, None)

    # -- the whole sandbox dying (gVisor has no OOM handling of its own) -------------------

    def init_hung_up(self) -> bool:
        """When the sentry itself dies (the host's OOM killer picks it: gVisor has no OOM
        handling inside, google/gvisor#2520), the kernel's death is reported like init would,
        once, so the run ends as a value; restarting then ends the sandbox."""
        # the channel's hang-up can come a moment before the sentry's exit is visible
        pidfd = self.box.init_pidfd
        return pidfd is not None and bool(readable([pidfd], 2.0))

    def ended_with_init(self) -> tuple[str, KilledBy | None]:
        if self.tree.usage().oom_kills > 0:
            return SENTRY_OOM, "memory_limit"
        return "its gVisor kernel (the sentry) died", None

    def _guest_oom(self, give_up: bool) -> None:
        """From GuestOom's thread: the guest reached memory_mb (give_up=False: end its
        kernel), or the sentry did not give the memory back (give_up=True: end the
        sandbox)."""
        if not give_up and self.box.channel.supervisor is not None:
            self.signal(signal.SIGKILL)
        else:  # a limit ended it: a run in progress returns that as its value
            self.box.terminate(SENTRY_OOM_STUCK, "memory_limit")

    def signal(self, sig: int) -> None:
        """Through init: the guest's processes are not the host's."""
        with contextlib.suppress(OSError):
            self.box.channel.tell_init(SignalRequest(op="signal", signal=int(sig)))

    def open_mounts(self) -> Mounts:
        return NO_MOUNTS  # the guest's tmpfs lives in the sentry's memory: no host statvfs

    def release(self, init_dead: bool) -> None:
        if self._started:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    self.jail.command("delete", "--force", self.id), capture_output=True, timeout=30
                )
        if self.oci_channel is not None:
            self.oci_channel.close()
        shutil.rmtree(state_dir() / "oci" / self.id, ignore_errors=True)


class FlooredCgroups(cgroups.SandboxCgroups):
    """The host cgroups of a runsc sandbox: pids.max counts runsc's own threads (the sentry,
    the gofer, the ptrace stubs), so it gets at least PIDS_FLOOR; the policy's pids_max is
    enforced inside, by the sentry, on the guest's tasks (RLIMIT_NPROC of the one guest uid).
    With a memory limit on cgroup v1, the OOM is the host's to handle (GuestOom); the kernels
    it ends count as the cgroup's OOM kills."""

    on_guest_oom: Callable[[bool], None] | None = None
    guest_oom: GuestOom | None = None

    def create(self, policy: Policy) -> None:
        if policy.pids_max is not None and policy.pids_max < PIDS_FLOOR:
            policy = policy.model_copy(update={"pids_max": PIDS_FLOOR})
        super().create(policy)
        if self.version == 1 and policy.memory_mb is not None:
            try:
                self.guest_oom = GuestOom(self.dirs["memory"], policy.memory_mb, self._on_oom)
            except OSError:
                self.remove()
                raise

    def _on_oom(self, give_up: bool) -> None:
        if self.on_guest_oom is not None:
            self.on_guest_oom(give_up)

    def usage(self) -> cgroups.Usage:
        usage = super().usage()
        if self.guest_oom is not None:
            usage.oom_kills += self.guest_oom.kills
        return usage

    def close_files(self) -> None:
        if self.guest_oom is not None:
            self.guest_oom.stop()
        super().close_files()


class GuestOom:
    """The OOM handler of one runsc sandbox's memory cgroup (v1), on a thread of its own.

    `oom_kill_disable`: at the limit the host kernel pauses the sandbox's allocating tasks
    instead of killing one (it would pick the sentry). The OOM eventfd wakes this thread,
    which raises the limit by GUEST_OOM_HEADROOM_MB (the paused sentry runs again), asks for
    the guest's kernel to be killed (`on_oom(False)`), then brings the limit back as soon as
    the memory is given back; if it is not within GUEST_OOM_SETTLE_S, or the sandbox reaches
    the raised limit as well, `on_oom(True)` ends the sandbox."""

    def __init__(self, memory_dir: Path, memory_mb: int, on_oom: Callable[[bool], None]) -> None:
        self.dir = memory_dir
        self.limit = memory_mb << 20
        self.on_oom = on_oom
        self.kills = 0
        cgroups._write(memory_dir / "memory.oom_control", "1")
        self.event = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        control = os.open(memory_dir / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        try:
            cgroups._write(memory_dir / "cgroup.event_control", f"{self.event} {control}")
        except OSError:
            self._close()
            raise
        finally:
            os.close(control)
        self.thread = threading.Thread(target=self._run, name="gvisor-oom", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while self._wait(None):
                if self._under_oom():
                    self._handle()
        except OSError:
            pass  # the cgroup is gone (removal also signals the eventfd)

    def _wait(self, timeout_s: float | None) -> bool:
        """Until the OOM event (True, counter consumed) or stop() (False)."""
        poller = select.poll()
        poller.register(self.event, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(None if timeout_s is None else timeout_s * 1000)}
        if self._stop_r in ready:
            return False
        if self.event in ready:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.event)
        return True

    def _under_oom(self) -> bool:
        text = (self.dir / "memory.oom_control").read_text()
        return cgroups._keyed(text).get("under_oom", 0) == 1

    def _set_limit(self, value: int) -> None:
        """memory.limit_in_bytes (and memsw, which must stay >= it, where swap is counted)."""
        memsw = self.dir / "memory.memsw.limit_in_bytes"
        order = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
        current = int((self.dir / "memory.limit_in_bytes").read_text())
        for name in reversed(order) if value > current else order:
            if name == order[1] and not memsw.exists():
                continue
            cgroups._write(self.dir / name, str(value))

    def _handle(self) -> None:
        self.kills += 1
        self._set_limit(self.limit + (GUEST_OOM_HEADROOM_MB << 20))  # wakes the paused tasks
        self.on_oom(False)
        # back once the killed kernel's pages are given back: well below the limit (else the
        # sandbox would pause again at once, before the sentry ever ends the kernel)
        settled = self.limit - min(GUEST_OOM_MARGIN_MB << 20, self.limit // 4)
        deadline = time.monotonic() + GUEST_OOM_SETTLE_S
        while time.monotonic() < deadline:
            if int((self.dir / "memory.usage_in_bytes").read_text()) <= settled:
                with contextlib.suppress(OSError):  # EBUSY: more came meanwhile; wait again
                    self._set_limit(self.limit)
                    return
            if not self._wait(0.05):
                return  # the sandbox is being removed
            if self._under_oom():
                break  # the raised limit is reached too
        self.on_oom(True)

    def stop(self) -> None:
        if self._stop_w >= 0:
            os.write(self._stop_w, b"x")
            if self.thread is not threading.current_thread():
                self.thread.join(timeout=GUEST_OOM_SETTLE_S + 5)
            self._close()

    def _close(self) -> None:
        for fd in (self.event, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._stop_w = -1


def _sandbox_pid(jail: GvisorJail, sandbox_id: str) -> int:
    result = subprocess.run(jail.command("state", sandbox_id), capture_output=True, timeout=10)
    try:
        return int(json.loads(result.stdout)["pid"])
    except (ValueError, KeyError, TypeError):
        raise SandboxError(f"runsc state: {result.stderr.decode()[-500:]}") from None


def _cgroups_path(groups: cgroups.SandboxCgroups) -> str:
    """The OCI cgroupsPath of cgroups created here (the same under every v1 controller)."""
    leaf = next(iter(groups.dirs.values()))
    mount = cgroups.ROOT / leaf.relative_to(cgroups.ROOT).parts[0]
    return "/" + str(leaf.relative_to(mount if groups.version == 1 else leaf.parents[2]))


def bundle_config(
    image: _image.Image, policy: Policy, channel: str, groups: cgroups.SandboxCgroups
) -> dict[str, Any]:
    """The OCI runtime spec of one sandbox, from its policy."""
    uid = oci.SANDBOX_UID
    limits = oci.rlimits(policy)

    def tmpfs(target: str, size_mb: int, mode: str) -> dict[str, Any]:
        options = [
            "nosuid",
            "nodev",
            f"size={size_mb}m",
            f"mode={mode}",
            f"uid={uid}",
            f"gid={uid}",
        ]
        return {"destination": target, "type": "tmpfs", "source": "tmpfs", "options": options}

    return {
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": uid, "gid": uid},
            "args": oci.bootstrap(image),
            "env": [f"{k}={v}" for k, v in oci.INIT_ENV.items()],
            "cwd": "/",
            "noNewPrivileges": True,
            "capabilities": {k: [] for k in ("bounding", "effective", "permitted", "ambient")},
            "rlimits": [
                {"type": f"RLIMIT_{k.upper()}", "hard": v, "soft": v} for k, v in limits.items()
            ],
        },
        "root": {"path": str(image.root), "readonly": True},
        "hostname": "sandbox",
        "mounts": [
            {
                "destination": "/proc",
                "type": "proc",
                "source": "proc",
                "options": ["nosuid", "nodev", "noexec"],
            },
            tmpfs("/home/user", policy.disk_mb, "0700"),
            tmpfs("/tmp", policy.tmp_mb, "1777"),
            tmpfs("/dev/shm", policy.shm_mb, "1777"),
            {
                "destination": oci.CHANNEL_INSIDE,
                "type": "bind",
                "source": channel,
                "options": ["bind", "ro", "nosuid", "nodev", "noexec"],
            },
            *(
                {
                    "destination": device,
                    "type": "bind",
                    "source": str(oci.mask_file()),
                    "options": ["bind", "ro", "nosuid", "nodev", "noexec"],
                }
                for device in MASKED_DEVICES
            ),
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "cgroupsPath": _cgroups_path(groups),
        },
    }
