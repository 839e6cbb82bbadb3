"""Backend `container`: each sandbox is a container made through the Docker Engine API
(the official `docker` package), with the seed's DockerSandbox settings: no network, memory
and CPU limits, read-only root, size-capped tmpfs, a pids limit, every capability dropped,
no-new-privileges and a seccomp profile (the Docker-format rendering of _inside/seccomp.py's
deny list; init then loads the full filter itself). Tested against Podman's
Docker-compatible service with the runc runtime.

    host: channel dir + docker-py containers.create(...) -> engine -> runc
      PID 1: _inside/oci.py -> init -> kernel      (a fresh host uid per sandbox)

The image is `codecage image build`'s root filesystem, brought into the engine in two
layers: Debian + the runtime (imported once per runtime, ~35 s) and the codecage package
on top (a small build per codecage version).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from .._errors import BackendUnavailable, SandboxError
from .._inside import seccomp
from .._policy import Policy
from . import cgroups, features, oci
from . import image as _image
from .host import HostJail, uids
from .launcher import Launched
from .sandbox import HostSandbox
from .template import Runtime, state_dir
from .volumes import Attachment

DEFAULT_URL = "unix:///run/codecage/podman.sock"
START_TIMEOUT_S = 30.0
LABEL = "io.codecage.sandbox"
OWNER_LABEL = "io.codecage.owner"  # the process that made it: "<pid>-<start time>-container"
# The engine's cgroups live apart from the namespace jail's: it adds groups of its own
# (Podman's conmon) that the jail's sweep must not take for sandboxes.
ENGINE_PARENT = "codecage-engine"
# Podman on this host: the hard limits it would copy from the service exceed what runc
# may set here (measured: runc refuses them), so the sandbox's own are given explicitly.
NPROC_ULIMIT = 1024
# init's, dropped before any code of the sandbox exists (with the bounding set: SETPCAP)
INIT_CAPABILITIES = ("SETUID", "SETGID", "SETPCAP")
MASKED_DEVICES = ("/dev/tty",)  # the engine's, beyond oci.ALLOWED_DEVICES
# Podman (4.3, runc) mounts a container's root, its image, with neither nosuid nor nodev,
# and the Docker API has no option to ask for them: declared (LACKING). Every other mount
# is checked on each container (weak_mounts).
LACKING = {
    "nosuid_mounts": "the engine mounts the container's root (the image) without "
    "nosuid,nodev; instead the image holds no setuid/setgid file, no file capability and "
    "no device node, and the code runs with no_new_privs and no capabilities",
    "volumes": "the engine would need a host-side mount of the volume bound into the "
    "container; not supported yet: use the namespace or bwrap backend",
    "io_limits": "volumes are not supported on this backend",
}


def engine_url() -> str:
    return os.environ.get("CODECAGE_DOCKER_HOST", DEFAULT_URL)


def _client(timeout_s: int = 120) -> Any:
    try:
        import docker
    except ImportError:
        raise BackendUnavailable(
            "container: the `docker` package is not installed (pip install 'codecage[container]')"
        ) from None
    return docker.DockerClient(base_url=engine_url(), timeout=timeout_s)


def probe() -> str | None:
    try:
        import docker  # noqa: F401
    except ImportError:
        return "the `docker` package is missing: pip install 'codecage[container]'"
    if os.geteuid() != 0:
        return "the container backend reads its sandboxes' cgroups as root here"
    if _image.current() is None:
        return "the sandbox image is not built: run `codecage image build`"
    try:
        client = _client(timeout_s=5)  # a probe answers quickly, engine or not
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return (
            f"no Docker-compatible engine at {engine_url()} ({type(exc).__name__}); start "
            f"one, e.g. `podman --runtime runc system service --time=0 {DEFAULT_URL}`"
        )
    return None


def docker_seccomp_profile() -> dict[str, Any]:
    """_inside/seccomp.py's deny list in Docker's profile format (allow by default).

    Its argument rules are the same table (seccomp.ARG_RULES), each a masked compare at the
    width the kernel reads: in this format MASKED_EQ's `value` is the mask and `valueTwo`
    what the masked argument must equal; the args of one entry must all match."""
    eperm = {"action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM}
    rules: list[dict[str, Any]] = [{"names": list(seccomp.DENIED), **eperm}]
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS})
    for rule in seccomp.ARG_RULES:
        args = [
            {"index": index, "value": mask, "valueTwo": value, "op": "SCMP_CMP_MASKED_EQ"}
            for index, mask, value in rule.args
        ]
        action = {"action": "SCMP_ACT_ERRNO", "errnoRet": rule.error}
        rules.append({"names": [rule.syscall], **action, "args": args})
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": rules,
    }


class ContainerJail(HostJail):
    """Backend `container`: one engine container per sandbox."""

    name = "container"
    enforces = features.ALL - frozenset(LACKING)
    why: dict[str, str] = dict(LACKING)

    def __init__(self, runtime: Runtime | None = None) -> None:
        why = probe()
        if why is not None:
            raise BackendUnavailable(f"container: {why}")
        self.client = _client()
        self.runtime = runtime or Runtime.default()
        self.image = _image.require(self.runtime)
        self.tag = _image.ensure_engine_image(self.client, self.image, print)
        self.cgroup_version = cgroups.detect_version() or 1
        self.owner = f"{cgroups.owner_name()}-container"
        cgroups.claim_owner(self.cgroup_version, self.owner)  # what its sweeps look at
        self._sweep()
        total = int(os.environ.get("CODECAGE_TOTAL_MEMORY_MB", 0)) or cgroups.default_total_mb()
        self.total_memory_mb = total
        if self.cgroup_version == 1:  # all containers of this process: one memory cap
            parent = cgroups.ROOT / "memory" / ENGINE_PARENT / self.owner
            parent.mkdir(parents=True, exist_ok=True)
            (parent / "memory.limit_in_bytes").write_text(str(total << 20))
        self.profile = _profile_option(self.client)
        self.landlock = _landlock_abi() >= 1
        if not self.landlock:
            self.enforces = self.enforces - {"landlock"}
            self.why = {**self.why, "landlock": "this host has no Landlock"}

    @property
    def package(self) -> Path:
        """The codecage package as sandboxes see it: the image holds it at the path where
        the namespace jail stages it, staged here too."""
        return oci.staged_package(self.image)

    def spawn(
        self, policy: Policy, envs: dict[str, str], volumes: tuple[Attachment, ...] = ()
    ) -> HostSandbox:
        return HostSandbox(policy, lambda box: ContainerLauncher(self, box), envs, START_TIMEOUT_S)

    def close(self) -> None:
        super().close()
        self._remove(lambda owner: owner == self.owner)
        cgroups.remove_owner(self.cgroup_version, self.owner)
        self.client.close()

    def _sweep(self) -> None:
        """Start-up sweep: containers and cgroup parents left by processes that are gone."""
        self._remove(lambda owner: owner != self.owner and not cgroups.owner_alive(owner))

    def _remove(self, which: Any) -> None:
        with contextlib.suppress(Exception):  # an engine that went away has nothing to remove
            for found in self.client.containers.list(all=True, filters={"label": OWNER_LABEL}):
                if which(found.labels.get(OWNER_LABEL, "")):
                    found.remove(force=True)
        # the engine's own per-parent groups (Podman puts conmon in one), then the parent
        for base in engine_bases(self.cgroup_version):
            for parent in base.iterdir() if base.is_dir() else ():
                if parent.is_dir() and which(parent.name):
                    for leftover in ("conmon", ""):
                        with contextlib.suppress(OSError):
                            (parent / leftover).rmdir()


def _profile_option(client: Any) -> str:
    """Docker takes the profile's JSON in the option; Podman (its service runs on this
    host) takes a path, so the profile is written to the state directory."""
    profile = json.dumps(docker_seccomp_profile())
    components = client.version().get("Components") or []
    if not any("podman" in str(c.get("Name", "")).lower() for c in components):
        return profile
    path = state_dir() / f"seccomp-{hashlib.sha256(profile.encode()).hexdigest()[:16]}.json"
    if not path.exists():
        path.write_text(profile)
    return str(path)


def _landlock_abi() -> int:
    from .._inside import landlock

    try:
        return landlock.abi_version()
    except OSError:
        return 0


def engine_bases(version: int) -> list[Path]:
    if version == 1:
        return [cgroups.ROOT / c / ENGINE_PARENT for c in cgroups.V1_CONTROLLERS]
    unified = (
        cgroups.ROOT if (cgroups.ROOT / "cgroup.controllers").exists() else cgroups.ROOT / "unified"
    )
    return [unified / ENGINE_PARENT]


class EngineCgroups(cgroups.SandboxCgroups):
    """The cgroups the engine made for a container (under ENGINE_PARENT/<owner>): read and
    killed here, never created or limited here (the engine set the limits from the policy)."""

    def __init__(self, version: int, owner: str) -> None:
        super().__init__(version, "unset", owner)
        self.parents = dict(zip(self.dirs, (b / owner for b in engine_bases(version)), strict=True))

    def bind(self, leaf: str) -> None:
        self.dirs = {c: parent / leaf for c, parent in self.parents.items()}

    def create(self, policy: Policy) -> None:
        pass  # the engine creates them

    def remove(self, timeout_s: float = 5.0) -> None:
        self.close_files()  # the engine removes the directories with the container
        self._thaw()  # a paused container: its processes take their SIGKILL


class ContainerLauncher(oci.OciLauncher):
    """One container. Its processes are host processes (runc), so signals and the host's
    readings work as in the namespace jail."""

    def __init__(self, jail: ContainerJail, box: HostSandbox) -> None:
        super().__init__(box)
        self.id, self.policy = box.id, box.policy
        self.jail = jail
        self.uid = uids.take()
        self.tree: EngineCgroups = EngineCgroups(jail.cgroup_version, jail.owner)
        self._container: Any = None

    def launch(self, envs: dict[str, str]) -> Launched:
        deadline = time.monotonic() + START_TIMEOUT_S
        self.oci_channel = channel = oci.Channel(self.id)
        self._container = self.jail.client.containers.create(**self._settings(channel.dir))
        self._container.start()
        supervisor = channel.accept_supervisor(deadline)
        env = oci.environment(self.jail.runtime, self.policy, envs)
        spec = oci.spec(self.policy, env, [], done=oci.RUNTIME_DONE)
        spec |= {"uid": self.uid, "gid": self.uid, "landlock": self.jail.landlock}
        supervisor.send(json.dumps(spec).encode())
        self._container.reload()
        pid = int(self._container.attrs["State"]["Pid"])
        self.tree.bind(_cgroup_leaf(pid, self.jail.cgroup_version))
        root = Path(f"/proc/{pid}/root")
        weak = [m for m in weak_mounts(Path(f"/proc/{pid}/mountinfo").read_text(), root)]
        weak = [m for m in weak if not m.startswith("/ ")]  # the root: declared in LACKING
        if weak:  # the sandbox's kill() kills the bound cgroup; release removes the container
            supervisor.close()
            raise SandboxError(f"the container has mounts without nosuid,nodev: {weak}")
        return Launched(supervisor, os.pidfd_open(pid), pid)

    def _settings(self, channel: Path) -> dict[str, Any]:
        """The seed's DockerSandbox settings, from the policy."""
        from docker.types import Ulimit

        p = self.policy

        def tmpfs(size_mb: int, mode: str) -> str:
            # no uid=: Podman refuses it; the container has one uid, so the sticky bit suffices
            return f"rw,nosuid,nodev,size={size_mb}m,mode={mode}"

        settings: dict[str, Any] = {
            "image": self.jail.tag,
            "command": oci.bootstrap(self.jail.image),
            "entrypoint": [],
            # init starts as root with only the capabilities it needs to drop to `uid` with
            # no groups (entry.confine): an engine starting `uid:uid` itself adds the gid as a
            # supplementary group, which nothing inside could then drop
            "user": "0:0",
            "cap_add": list(INIT_CAPABILITIES),
            "environment": oci.INIT_ENV,
            "working_dir": "/",
            "hostname": "sandbox",
            "detach": True,
            "network_mode": "none",
            "read_only": True,
            "tmpfs": {"/home/user": tmpfs(p.disk_mb, "1777"), "/tmp": tmpfs(p.tmp_mb, "1777")},
            "shm_size": p.shm_mb << 20,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges", f"seccomp={self.jail.profile}"],
            "volumes": {
                str(channel): {"bind": oci.CHANNEL_INSIDE, "mode": "ro,nosuid,nodev,noexec"},
                # each device the engine adds beyond oci.ALLOWED_DEVICES: an empty file
                **{
                    str(oci.mask_file()): {"bind": device, "mode": "ro,nosuid,nodev,noexec"}
                    for device in MASKED_DEVICES
                },
            },
            "cgroup_parent": f"/{ENGINE_PARENT}/{self.jail.owner}",
            "ulimits": [
                Ulimit(name="nofile", soft=p.open_files_max, hard=p.open_files_max),
                Ulimit(name="nproc", soft=NPROC_ULIMIT, hard=NPROC_ULIMIT),
                Ulimit(name="core", soft=0, hard=0),
            ],
            "labels": {LABEL: self.id, OWNER_LABEL: self.jail.owner},
            "init": False,
        }
        if p.memory_mb is not None:
            settings["mem_limit"] = settings["memswap_limit"] = p.memory_mb << 20
        if p.cpu_cores is not None:
            settings["nano_cpus"] = int(p.cpu_cores * 1e9)
        if p.pids_max is not None:
            settings["pids_limit"] = p.pids_max
        return settings

    def release(self, init_dead: bool) -> None:
        if self._container is not None:
            _remove(self._container)
            _await_reaped(self.uid, time.monotonic() + 5)
        if self.oci_channel is not None:
            self.oci_channel.close()
        uids.give_back(self.uid)


def _remove(container: Any) -> None:
    """Remove the engine's container; a removal refused for a moment (on a loaded host the
    engine can still be ending the container, seen as a container left listed) is tried
    again, a few times."""
    import docker.errors

    for attempt in range(4):
        try:
            container.remove(force=True)
            return
        except docker.errors.NotFound:
            return
        except Exception:  # an engine that went away has nothing to remove
            time.sleep(0.25 * (attempt + 1))


def _await_reaped(uid: int, deadline: float) -> None:
    """Wait (bounded) until no host process runs as the sandbox's uid, zombies included:
    the engine's removal returns once init is dead, while the engine's reaper may still
    hold the zombies of init's children a moment longer (seen on a loaded host)."""
    while time.monotonic() < deadline:
        with os.scandir("/proc") as entries:
            if not any(_owned_by(entry, uid) for entry in entries if entry.name.isdigit()):
                return
        time.sleep(0.02)


def _owned_by(entry: os.DirEntry[str], uid: int) -> bool:
    """By the real uid in its status (a non-dumpable process's /proc entry is root's)."""
    try:
        with open(f"{entry.path}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1]) == uid
    except (OSError, ValueError, IndexError):
        pass
    return False


def weak_mounts(mountinfo: str, root: Path) -> list[str]:
    """The mounts of a /proc/<pid>/mountinfo (the sandbox's root at `root`) without nosuid,
    or without nodev where no allowed device node is (/dev, /dev/pts, a bind of an allowed
    device). The engine's masks of /proc and /sys paths (read-only and empty) hold nothing
    and are not counted."""
    device_mounts = {"/dev", "/dev/pts", *oci.ALLOWED_DEVICES}
    devices = {d.removeprefix("/dev") for d in oci.ALLOWED_DEVICES}
    weak = []
    top = {line.split()[4]: line for line in mountinfo.splitlines()}  # the last hides others
    for line in top.values():
        fields = line.split()
        source_root, target, flags = fields[3], fields[4], set(fields[5].split(","))
        device = target in device_mounts or source_root in devices
        if "nosuid" in flags and ("nodev" in flags or device):
            continue
        inside = root / target.lstrip("/")
        with contextlib.suppress(OSError):
            if "ro" in flags and inside.is_dir() and not any(inside.iterdir()):
                continue
        weak.append(f"{target} {fields[5]}")
    return weak


def _cgroup_leaf(pid: int, version: int) -> str:
    """The last component of a process's cgroup (the engine's name for the container's)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (version == 1 and "memory" in controllers.split(",")) or (
            version == 2 and controllers == ""
        ):
            return path.rstrip("/").rsplit("/", 1)[-1]
    raise SandboxError(f"no memory cgroup for the container's init ({pid})")
