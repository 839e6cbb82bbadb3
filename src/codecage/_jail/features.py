"""What a backend can enforce, and the check that refuses a policy asking for more.

Each backend declares a frozenset of features it enforces on this host. A policy needs a
feature when it sets the field that the feature enforces (memory_mb=None needs no memory
limit); the baseline protections every policy needs are named after `isolation`. A backend
missing a needed feature refuses the policy with a PolicyError naming the field, the
feature and the backend, unless `allow_weaker` is set: never silently weaker.
"""

from __future__ import annotations

from collections.abc import Mapping

from .._errors import PolicyError
from .._policy import Policy
from .cgroups import IO_FIELDS

# feature -> the policy field it enforces
FEATURES: dict[str, str] = {
    "memory": "memory_mb",  # a hard memory limit (tmpfs pages included), OOM kills seen by the host
    "pids": "pids_max",
    "cpu_quota": "cpu_cores",
    "cpu_budget": "cpu_s",
    "workspace_size": "disk_mb",
    "tmp_size": "tmp_mb",
    "shm_size": "shm_mb",
    "network_none": "network",  # an empty network namespace (loopback only)
    "seccomp": "isolation",  # the deny list of _inside/seccomp.py
    "landlock": "isolation",  # writes only to the workspace, /tmp, /dev/shm
    "own_uid": "isolation",  # a fresh unprivileged host uid per sandbox
    "no_capabilities": "isolation",  # all capabilities dropped, bounding set included
    "pid_namespace": "isolation",  # its own PID 1; the host's processes invisible
    # every mount nosuid, and nodev but where the allowed device nodes are (mountinfo shows it)
    "nosuid_mounts": "isolation",
    # reaching memory_mb ends the kernel, not the sandbox: the next run gets a fresh kernel
    "kernel_oom": "memory_mb",
    # persistent volumes (docs/volumes.md): not a policy field but the create's `volumes`
    "volumes": "volumes",
    # read/write bandwidth and IOPS caps on the sandbox's volumes (blkio or io.max)
    "io_limits": "volume_read_bytes_per_s",
}
ALL = frozenset(FEATURES)


def needed(policy: Policy) -> set[str]:
    """The features this policy asks for."""
    out = {f for f, name in FEATURES.items() if name == "isolation"}
    out |= {"workspace_size", "tmp_size", "shm_size", "network_none"}
    for feature, name in (
        ("memory", "memory_mb"),
        ("kernel_oom", "memory_mb"),
        ("pids", "pids_max"),
        ("cpu_quota", "cpu_cores"),
        ("cpu_budget", "cpu_s"),
    ):
        if getattr(policy, name) is not None:
            out.add(feature)
    if any(getattr(policy, name) is not None for name in IO_FIELDS):
        out.add("io_limits")
    return out


def check(
    backend: str, enforces: frozenset[str], policy: Policy, why: Mapping[str, str] | None = None
) -> None:
    """Raise PolicyError if `backend` cannot give `policy` what it asks (see module doc)."""
    if policy.isolation != backend:
        raise PolicyError(
            f"policy field 'isolation': this backend is {backend!r}, not {policy.isolation!r}"
        )
    missing = sorted(needed(policy) - enforces)
    if not missing or policy.allow_weaker:
        return
    why = why or {}
    parts = [
        f"policy field {FEATURES[f]!r}: backend {backend!r} cannot enforce {f} on this host"
        + (f" ({why[f]})" if f in why else "")
        for f in missing
    ]
    raise PolicyError(
        "; ".join(parts) + "; set allow_weaker=true to accept that, or choose another "
        "isolation (see docs/backends.md)"
    )
