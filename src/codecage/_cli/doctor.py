"""`codecage doctor`: which protections this host supports, one line each, and what to do."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from dataclasses import dataclass

from .._inside import landlock
from .._jail import BACKENDS, available_backends, cgroups
from .._jail.template import Runtime


@dataclass
class Check:
    name: str
    status: str  # "ok", "missing", "weak"
    detail: str
    fix: str = ""
    required: bool = True

    def line(self) -> str:
        text = f"{self.status:<8} {self.name:<22} {self.detail}"
        return text + (f"  -> {self.fix}" if self.fix and self.status != "ok" else "")


def _capability(bit: int) -> bool:
    with open("/proc/self/status") as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def _vm() -> Check:
    """The full-VM level's accelerator: a guest booted once (KVM tried first) and kept."""
    from .._jail import vmimage

    if vmimage.current() is None:
        return Check("vm", "missing", "no guest images", "codecage vm build", required=False)
    found = vmimage.accelerator()
    if not found.ok:
        return Check("vm", "missing", f"no guest boots: {found.detail}", required=False)
    cost = "hardware virtualisation" if found.accel == "kvm" else "emulated (slow: no KVM)"
    detail = (
        f"{found.accel.upper()}, {cost}: a guest greets in {found.seconds:.1f} s; {found.detail}"
    )
    return Check("vm", "ok", detail, required=False)


def checks() -> list[Check]:
    out = []
    root = os.geteuid() == 0
    out.append(
        Check(
            "root",
            "ok" if root else "weak",
            f"running as uid {os.geteuid()}"
            + (
                ""
                if root
                else ": user-namespace mode, no cgroups (rlimits only), one host uid for all sandboxes"
            ),
            "run as root for cgroup limits and a uid per sandbox, or set allow_weaker=true",
            required=False,
        )
    )
    ns = (
        subprocess.run(
            [
                "unshare",
                "--mount",
                "--pid",
                "--net",
                "--ipc",
                "--uts",
                "--cgroup",
                "--fork",
                *([] if root else ["--user", "--map-user=1000"]),
                "true",
            ],
            capture_output=True,
        )
        if shutil.which("unshare")
        else None
    )
    out.append(
        Check(
            "namespaces",
            "ok" if ns and ns.returncode == 0 else "missing",
            "mount, pid, net, ipc, uts, cgroup" + ("" if root else ", user"),
            "a kernel with namespaces (and unprivileged user namespaces when not root)",
        )
    )
    version = cgroups.detect_version()
    out.append(
        Check(
            "cgroups",
            "ok" if version and root else "missing",
            (f"v{version} (memory, pids, cpu, freezer)" if version else "no usable controllers")
            + ("" if root else "; not usable without root"),
            "mount cgroup v1 controllers or enable them in cgroup v2; run as root",
            required=root,
        )
    )
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
        ver = "libseccomp present"
        del lib
        out.append(Check("seccomp", "ok", ver))
    except OSError:
        out.append(
            Check("seccomp", "missing", "libseccomp.so.2 not found", "apt-get install libseccomp2")
        )
    abi = landlock.abi_version()
    out.append(
        Check(
            "landlock",
            "ok" if abi else "missing",
            f"ABI {abi}" if abi else "not enabled",
            "boot with lsm=...,landlock (or set allow_weaker=true)",
        )
    )
    oom = _capability(24)
    out.append(
        Check(
            "oom priority",
            "ok" if oom else "weak",
            "CAP_SYS_RESOURCE: template protected from the OOM killer"
            if oom
            else "no CAP_SYS_RESOURCE: the template cannot lower its OOM score (sandbox kernels still go first)",
            "grant CAP_SYS_RESOURCE to the service",
            required=False,
        )
    )
    runtime = Runtime.default()
    out.append(
        Check(
            "runtime",
            "ok" if runtime.python.exists() else "missing",
            str(runtime.path),
            "make runtime (scripts/build-runtime)",
        )
    )
    out.append(_vm())
    for name, why in available_backends().items():
        out.append(
            Check(
                f"backend:{name}",
                "ok" if why is None else "missing",
                f"isolation={name!r}: {BACKENDS[name].summary}" if why is None else why,
                required=False,
            )
        )
    return out
