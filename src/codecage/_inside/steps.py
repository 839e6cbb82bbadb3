"""The confinement of every sandbox: one ordered list of named steps and one runner, like
nsjail's contain.cc. Every backend goes through it, in this order:

    phase "setup" (before init exists)   cgroups, namespaces, root
        -- the namespace jail forks init here (pipeline.setup) --
    phase "init" (PID 1 of the sandbox)  signals, enter_root, stdio, rlimits, oom_score,
                                         close_fds, oom_fd, identity, no_new_privs,
                                         preload, landlock, seccomp

What differs between backends is only what their runtime did before init's first
instruction: the spec's `done` names those steps (built and checked on the host by
`claim`), and the runner skips exactly them and runs every other step, in the one order.
The namespace jail's runtime is this list itself (its template only preloads); bwrap did
the namespaces, the root, the identity and seccomp; runsc and a container engine did the
cgroups, the namespaces and the root (runsc also the identity). A step with a cheap
check of its claim (identity, seccomp, namespaces, preload) has it run when it is skipped,
so a wrong claim ends the sandbox's start instead of leaving it less confined.

Fixed points, whatever `done` says: seccomp is the last step; the oom_score_adj descriptor
(oom_fd) is opened before identity and Landlock, which would close /proc/self to it; init is
single-threaded when it goes on to fork (the preload step's check).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from . import caps, landlock, mounts, namespaces, seccomp

Spec = dict[str, Any]
Ctx = dict[str, Any]
SETUP, INIT = "setup", "init"


class Step(NamedTuple):
    name: str
    phase: str  # SETUP or INIT
    run: Callable[[Spec, Ctx], None]
    check: Callable[[Spec, Ctx], None] | None = None  # verifies a runtime's claim


class StepError(RuntimeError):
    """A spec's `done` the runner refuses (an unknown step, one no runtime may claim) or a
    runtime's claim that does not hold."""


# -- the steps ------------------------------------------------------------------------------


def _cgroups(spec: Spec, ctx: Ctx) -> None:
    namespaces.join_cgroups(spec["cgroup_procs"])


def _namespaces(spec: Spec, ctx: Ctx) -> None:
    namespaces.enter_namespaces(spec["userns"], pid=not ctx.get("pid_namespace"))


def _check_namespaces(spec: Spec, ctx: Ctx) -> None:
    if os.getpid() != 1:
        raise StepError(f"namespaces claimed done, but init is pid {os.getpid()}, not 1")


def _root(spec: Spec, ctx: Ctx) -> None:
    mounts.build_root(spec["root_mountpoint"], spec, ctx.get("volume_fds"))


def _signals(spec: Spec, ctx: Ctx) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)  # as PID 1, default means: ignored


def _enter_root(spec: Spec, ctx: Ctx) -> None:
    mounts.enter_root(spec["root_mountpoint"])


def _stdio(spec: Spec, ctx: Ctx) -> None:
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):  # never a host file, never the operator's terminal
        os.dup2(null, fd)
    os.close(null)


def _rlimits(spec: Spec, ctx: Ctx) -> None:
    caps.set_rlimits(spec["rlimits"])


def _oom_score(spec: Spec, ctx: Ctx) -> None:
    # init's own, not the template's protected one; each kernel it forks gets 1000 (init.run)
    caps.set_oom_score_adj(0)


def _close_fds(spec: Spec, ctx: Ctx) -> None:
    # the supervisor channel, and in the namespace jail the descriptors the template held
    # once preloaded (template_fds: the preloaded modules' own, inherited with their memory)
    close_descriptors(keep={ctx["supervisor_fd"], *ctx.get("template_fds", ())})


def _oom_fd(spec: Spec, ctx: Ctx) -> None:
    ctx["oom_fd"] = caps.open_oom_score_adj()  # before identity and Landlock


def _identity(spec: Spec, ctx: Ctx) -> None:
    caps.drop_privileges(spec["uid"], spec["gid"], userns=spec.get("userns") is not None)


def _check_identity(spec: Spec, ctx: Ctx) -> None:
    uids, gids = os.getresuid(), os.getresgid()
    if set(uids) != {spec["uid"]} or set(gids) != {spec["gid"]}:
        raise StepError(f"identity claimed done, but init is uids {uids}, gids {gids}")


def _no_new_privs(spec: Spec, ctx: Ctx) -> None:
    caps.no_new_privs()


def _preload(spec: Spec, ctx: Ctx) -> None:
    from . import zygote  # imports this module's importers: not at the top

    zygote.preload(spec.get("preload", []))
    _check_preload(spec, ctx)


def _check_preload(spec: Spec, ctx: Ctx) -> None:
    from . import zygote

    if zygote.thread_count() != 1:
        raise StepError("preload started threads; init must be single-threaded to fork")


def _landlock(spec: Spec, ctx: Ctx) -> None:
    if spec["landlock"]:  # the host's decision (this host's ABI), never a silent skip
        landlock.restrict(tuple(str(v["path"]) for v in spec.get("volumes") or ()))


def _seccomp(spec: Spec, ctx: Ctx) -> None:
    # the namespace jail's template built the program once; elsewhere it is built here
    program = ctx.get("seccomp_program") or seccomp.build()
    seccomp.load(program)


def _check_seccomp(spec: Spec, ctx: Ctx) -> None:
    if seccomp_mode() != 2:
        raise StepError("seccomp claimed done, but this process has no seccomp filter")


def seccomp_mode() -> int | None:
    """The `Seccomp:` field of /proc/self/status (2: a filter is loaded), None if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return None


def close_descriptors(keep: set[int]) -> None:
    """Close every inherited descriptor but those on the allowlist (never a blind close)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):  # the directory's own descriptor, already gone
                os.close(fd)


STEPS: tuple[Step, ...] = (
    Step("cgroups", SETUP, _cgroups),
    Step("namespaces", SETUP, _namespaces, _check_namespaces),
    Step("root", SETUP, _root),
    Step("signals", INIT, _signals),
    Step("enter_root", INIT, _enter_root),
    Step("stdio", INIT, _stdio),
    Step("rlimits", INIT, _rlimits),
    Step("oom_score", INIT, _oom_score),
    Step("close_fds", INIT, _close_fds),
    Step("oom_fd", INIT, _oom_fd),
    Step("identity", INIT, _identity, _check_identity),
    Step("no_new_privs", INIT, _no_new_privs),
    Step("preload", INIT, _preload, _check_preload),
    Step("landlock", INIT, _landlock),
    Step("seccomp", INIT, _seccomp, _check_seccomp),
)
NAMES = tuple(step.name for step in STEPS)

# What a runtime may have done before init's first instruction. The others are init's own:
# no runtime knows which descriptors to keep or opens init's oom_score_adj descriptor, and
# none applies this Landlock ruleset (Landlock is never claimed: nothing on the host could
# tell it was applied). no_new_privs stays init's because the step also makes init
# undumpable, which no runtime does; stdio and rlimits are cheap to do again.
# oom_score is claimed by every backend whose init is not a fork of the template: its score
# is the one its launcher gave it, with no protected template score to undo.
CLAIMABLE = frozenset(
    {"cgroups", "namespaces", "root", "enter_root", "oom_score", "identity", "preload", "seccomp"}
)


def claim(*names: str, seccomp_program: bytes | None = None) -> list[str]:
    """The spec's `done`, built on the host: the steps `names` its runtime does before init
    runs, in the list's order. Refuses an unknown step, one named twice, one no runtime may
    claim (Landlock, init's own steps), and seccomp unless `seccomp_program` is the filter
    handed to the runtime to load (a non-empty BPF program)."""
    for name in names:
        if name not in NAMES:
            raise ValueError(f"unknown confinement step {name!r} (the steps: {', '.join(NAMES)})")
        if name not in CLAIMABLE:
            raise ValueError(f"no runtime does the confinement step {name!r}: init does it")
    if len(set(names)) != len(names):
        raise ValueError(f"a confinement step is named twice: {list(names)}")
    if "seccomp" in names and not (
        isinstance(seccomp_program, bytes) and seccomp_program and len(seccomp_program) % 8 == 0
    ):
        raise ValueError("seccomp claimed done without the filter the runtime loads")
    return [name for name in NAMES if name in names]


def parse_done(done: object, table: Sequence[Step] = STEPS) -> frozenset[str]:
    """The spec's `done`, checked inside: a list of known step names a runtime may claim."""
    if not isinstance(done, list) or not all(isinstance(name, str) for name in done):
        raise StepError(f"the spec's `done` is not a list of step names: {done!r}")
    known = {step.name for step in table}
    for name in done:
        if name not in known:
            raise StepError(f"unknown confinement step {name!r} in the spec's `done`")
        if name not in CLAIMABLE:
            raise StepError(f"the confinement step {name!r} cannot be done by a runtime")
    return frozenset(done)


def run(spec: Spec, ctx: Ctx, phases: Iterable[str], table: Sequence[Step] = STEPS) -> None:
    """Run `phases` of the list, in its order, skipping exactly the steps in spec["done"]
    (checking the claim where a check exists). A spec without `done` is refused: nothing
    is ever skipped for want of a field."""
    done = parse_done(spec.get("done"), table)
    wanted = set(phases)
    if table[-1].name != "seccomp":
        raise StepError("seccomp must be the last confinement step")
    for step in table:
        if step.phase not in wanted:
            continue
        if step.name in done:
            if step.check is not None:
                step.check(spec, ctx)
            continue
        step.run(spec, ctx)
