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
itself (cgroup v1, guest_oom.GuestOom): a usage threshold at memory_mb wakes the host, which
has init SIGKILL the guest's kernel; the hard limit stands GUEST_OOM_HEADROOM_MB above, room
for what the guest allocates while the kill is on its way (`oom_kill_disable`: the host
kernel pauses the sandbox there instead of killing the sentry). The run ends with
killed_by="memory_limit" and the next run finds a fresh kernel, as on every other level.

runsc always makes /dev/fuse and /dev/net/tun (and /dev/tty); each is masked by an empty
read-only file, so the guest sees the devices of oci.ALLOWED_DEVICES only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .._errors import BackendUnavailable, SandboxError
from .._inside.messages import SignalRequest
from .._models import KilledBy
from .._policy import Policy
from . import cgroups, features, guest_oom, oci
from . import image as _image
from .channel import readable
from .guest_oom import FlooredCgroups
from .host import HostJail
from .launcher import NO_MOUNTS, Launched, Mounts
from .sandbox import HostSandbox
from .template import Runtime, state_dir
from .volumes import Attachment

RUNSC_FLAGS = ("--network=none", "--host-uds=open", "--platform=ptrace")
START_TIMEOUT_S = 30.0
SENTRY_OOM_STUCK = {
    "slow": "the sandbox reached its memory limit and its gVisor kernel did not give the "
    f"memory back within {guest_oom.GUEST_OOM_SETTLE_S:g} s once the code was killed: the "
    "sandbox has ended",
}
SENTRY_OOM = (  # cgroup v2: the host's OOM killer picked it; v1: it died at the limit
    "the sandbox reached its memory limit and its gVisor kernel (the sentry) died there "
    "(gVisor has no OOM handling of its own): the sandbox has ended"
)
MASKED_DEVICES = ("/dev/fuse", "/dev/net/tun", "/dev/tty")  # runsc makes them always
LACKING = {
    "landlock": "the sentry has no Landlock; its root is read-only instead, so only "
    "/home/user, /tmp and /dev/shm are writable",
    "own_uid": "every sandbox's code runs as uid 1000 of its own sentry, and every sentry "
    "as the same host user; what separates sandboxes is a kernel each",
    "nosuid_mounts": "this runsc keeps no nosuid/nodev flag on the guest's mounts (its "
    "mountinfo shows none); instead the image holds no setuid/setgid file, no file "
    "capability and no device node, and the code runs with no_new_privs",
    "volumes": "runsc's gofer would serve the volume's files to the sentry from a host-side "
    "mount; not supported yet: use the namespace or bwrap backend",
    "io_limits": "volumes are not supported on this backend",
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
        cgroups.claim_owner(self.cgroup_version, self.owner)
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

    def spawn(
        self, policy: Policy, envs: dict[str, str], volumes: tuple[Attachment, ...] = ()
    ) -> HostSandbox:
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
        self.reaper: subprocess.Popen[bytes] | None = None

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
            command = self.jail.command("run", "--detach", f"--bundle={bundle}", self.id)
            self.reaper = proc = subprocess.Popen(
                [sys.executable, "-I", "-c", REAPER, *command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
            )
            try:
                supervisor = channel.accept_supervisor(deadline)
                env = oci.environment(self.jail.runtime, self.policy, envs)
                spec = oci.spec(self.policy, env, [], done=(*oci.RUNTIME_DONE, "identity"))
                if self.policy.pids_max is not None:  # the guest's own count, exactly
                    spec["rlimits"]["nproc"] = self.policy.pids_max
                supervisor.send(json.dumps(spec).encode())
                code = _exit_status(proc, deadline)
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

    def _guest_oom(self, give_up: guest_oom.GiveUp | None) -> None:
        """From GuestOom's thread: the guest reached memory_mb (None: end its kernel), or
        the handler gives up on it (why: end the sandbox)."""
        if give_up is None and self.box.channel.supervisor is not None:
            self.signal(signal.SIGKILL)
        else:  # a limit ended it: a run in progress returns that as its value
            self.box.terminate(SENTRY_OOM_STUCK[give_up or "slow"], "memory_limit")

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
        if self.reaper is not None:  # it ends once the sentry and the gofer are reaped
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.reaper.wait(timeout=10)
            if self.reaper.returncode is None:
                self.reaper.kill()
                self.reaper.wait()
            if self.reaper.stdout is not None:
                self.reaper.stdout.close()
        if self.oci_channel is not None:
            self.oci_channel.close()
        shutil.rmtree(state_dir() / "oci" / self.id, ignore_errors=True)


# `runsc run --detach` leaves the sandbox (the sentry) and the gofer orphans: the host's PID 1
# would reap them, and some reap only every second or two (1.5-1.8 s measured here, where
# PID 1 is a VM's init), which `runsc delete` waits for at every sandbox's end. So it runs
# under this subreaper, on the host (`python -I -c REAPER runsc ...`): it runs the command
# with stdout on /dev/null, writes the command's exit status on its own stdout, then reaps
# every orphan that comes to it, and exits when none is left.
REAPER = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit(125)
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status = os.waitpid(pid, 0)
os.write(1, b"%d\\n" % os.waitstatus_to_exitcode(status))
os.close(1)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def _exit_status(reaper: subprocess.Popen[bytes], deadline: float) -> int:
    """The exit status of the command the reaper runs (it goes on running, reaping)."""
    assert reaper.stdout is not None
    if not readable([reaper.stdout.fileno()], max(0.1, deadline - time.monotonic())):
        raise TimeoutError("runsc run did not return")
    line = reaper.stdout.readline()
    if not line.strip().lstrip(b"-").isdigit():
        raise SandboxError(f"the subreaper of runsc ended ({reaper.wait()})")
    return int(line)


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
