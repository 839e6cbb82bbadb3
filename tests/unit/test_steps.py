"""The one confinement list (codecage._inside.steps): its order, the runner that skips
exactly the steps a backend's runtime did (`done`), and the checks of `done` on the host
(steps.claim) and inside (steps.run). The real steps run in the root suite, on every
backend (tests/test_jail.py, tests/test_attacks.py, tests/test_bwrap.py, tests/test_gvisor.py);
here they are stand-ins that record their calls."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from codecage._inside import libc, steps
from codecage._inside.steps import INIT, SETUP, Step, StepError
from codecage._jail import oci
from codecage._jail.bwrap import BwrapLauncher
from codecage._jail.namespace import NamespaceLauncher
from codecage._policy import Policy

# What each path ran before the one list (the old pipeline.setup + confine, entry.confine):
# the list must keep these sequences exactly.
NAMESPACE_SETUP = ["cgroups", "namespaces", "root"]
NAMESPACE_INIT = [
    *("signals", "enter_root", "stdio", "rlimits", "oom_score", "close_fds", "oom_fd"),
    *("identity", "no_new_privs", "landlock", "seccomp"),
]
EXEC = [
    *("signals", "stdio", "rlimits", "close_fds", "oom_fd", "no_new_privs", "preload"),
    *("landlock",),
]


class Recorder:
    """The real table's names, phases and order, with stand-in functions."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.checked: list[str] = []
        self.table = [
            step._replace(
                run=self._record(self.ran, step.name),
                check=None if step.check is None else self._record(self.checked, step.name),
            )
            for step in steps.STEPS
        ]

    @staticmethod
    def _record(into: list[str], name: str) -> Any:
        return lambda spec, ctx: into.append(name)


def run(done: list[str], phases: list[str]) -> Recorder:
    recorder = Recorder()
    steps.run({"done": done}, {}, phases, recorder.table)
    return recorder


def test_the_list_is_in_one_order_with_seccomp_last() -> None:
    names = list(steps.NAMES)
    assert names[-1] == "seccomp"
    assert names[:3] == NAMESPACE_SETUP and {s.phase for s in steps.STEPS[:3]} == {SETUP}
    assert {s.phase for s in steps.STEPS[3:]} == {INIT}
    assert len(set(names)) == len(names)
    # the descriptor on oom_score_adj: opened after the close, before identity and Landlock
    order = names.index
    assert order("close_fds") < order("oom_fd") < order("identity") < order("landlock")
    assert order("identity") < order("no_new_privs") < order("preload") < order("landlock")


def test_nothing_done_runs_every_step_in_order_phase_by_phase() -> None:
    setup = run([], [SETUP])
    assert setup.ran == NAMESPACE_SETUP and setup.checked == []
    init = run([], [INIT])
    assert init.ran == [n for n in steps.NAMES if n not in NAMESPACE_SETUP]
    both = run([], [SETUP, INIT])
    assert both.ran == list(steps.NAMES)


def test_the_namespace_jail_skips_only_the_templates_preload() -> None:
    done = steps.claim("preload")
    assert run(done, [SETUP]).ran == NAMESPACE_SETUP
    init = run(done, [INIT])
    assert init.ran == NAMESPACE_INIT
    assert init.checked == ["preload"]  # the claim's check: init is single-threaded


def test_bwrap_skips_exactly_what_bwrap_did_and_checks_the_claims() -> None:
    done = bwrap_spec()["done"]
    assert done == [
        *("cgroups", "namespaces", "root", "enter_root", "oom_score", "identity", "seccomp"),
    ]
    recorder = run(done, [SETUP, INIT])
    assert recorder.ran == EXEC
    assert recorder.checked == ["namespaces", "identity", "seccomp"]


def test_oci_runtimes_skip_what_they_did() -> None:
    gvisor = run(steps.claim(*oci.RUNTIME_DONE, "identity"), [SETUP, INIT])
    assert gvisor.ran == [*EXEC, "seccomp"]  # the entry loads the filter: runsc's is its own
    assert gvisor.checked == ["namespaces", "identity"]
    container = run(steps.claim(*oci.RUNTIME_DONE), [SETUP, INIT])
    assert container.ran == [*EXEC[:5], "identity", *EXEC[5:], "seccomp"]  # starts as root


def test_a_step_in_done_is_skipped_and_no_other() -> None:
    for name in steps.CLAIMABLE:
        recorder = run([name], [SETUP, INIT])
        assert recorder.ran == [n for n in steps.NAMES if n != name], name


@pytest.mark.parametrize(
    ("done", "why"),
    [
        (["mounts"], "unknown confinement step 'mounts'"),
        (["landlock"], "cannot be done by a runtime"),
        (["close_fds"], "cannot be done by a runtime"),
        (["no_new_privs"], "cannot be done by a runtime"),
        ("seccomp", "not a list of step names"),
        ([1], "not a list of step names"),
        (None, "not a list of step names"),
    ],
)
def test_a_bad_done_is_refused_inside_before_any_step(done: object, why: str) -> None:
    recorder = Recorder()
    with pytest.raises(StepError, match=why):
        steps.run({"done": done}, {}, [SETUP, INIT], recorder.table)
    assert recorder.ran == []


def test_a_spec_without_done_is_refused_never_read_as_nothing_done() -> None:
    recorder = Recorder()
    with pytest.raises(StepError, match="not a list"):
        steps.run({}, {}, [INIT], recorder.table)
    assert recorder.ran == []


def test_a_table_whose_last_step_is_not_seccomp_is_refused() -> None:
    recorder = Recorder()
    table = [*recorder.table[:-2], recorder.table[-1], recorder.table[-2]]
    with pytest.raises(StepError, match="seccomp must be the last"):
        steps.run({"done": []}, {}, [INIT], table)
    assert recorder.ran == []


def test_a_claim_whose_check_fails_stops_the_run() -> None:
    ran: list[str] = []

    def wrong(spec: dict[str, Any], ctx: dict[str, Any]) -> None:
        raise StepError("not done")

    table = [
        Step("identity", INIT, lambda s, c: ran.append("identity"), wrong),
        Step("seccomp", INIT, lambda s, c: ran.append("seccomp")),
    ]
    with pytest.raises(StepError, match="not done"):
        steps.run({"done": ["identity"]}, {}, [INIT], table)
    assert ran == []
    steps.run({"done": []}, {}, [INIT], table)  # the positive control
    assert ran == ["identity", "seccomp"]


def test_the_host_refuses_a_bad_claim() -> None:
    with pytest.raises(ValueError, match="unknown confinement step 'mount'"):
        steps.claim("mount")
    with pytest.raises(ValueError, match="no runtime does the confinement step 'landlock'"):
        steps.claim("namespaces", "landlock")
    with pytest.raises(ValueError, match="no runtime does the confinement step 'oom_fd'"):
        steps.claim("oom_fd")
    with pytest.raises(ValueError, match="named twice"):
        steps.claim("root", "root")
    for program in (None, b"", b"\x00" * 7, "program"):
        with pytest.raises(ValueError, match="seccomp claimed done without the filter"):
            steps.claim("seccomp", seccomp_program=program)  # type: ignore[arg-type]
    # the positive controls: known, claimable, in the list's order whatever the call's
    assert steps.claim() == []
    assert steps.claim("identity", "cgroups") == ["cgroups", "identity"]
    assert steps.claim("seccomp", seccomp_program=b"\x00" * 16) == ["seccomp"]


def test_every_backends_spec_says_what_its_runtime_did() -> None:
    assert namespace_spec()["done"] == ["preload"]
    assert "seccomp" not in namespace_spec() and "seccomp" not in bwrap_spec()
    gvisor = oci.spec(Policy(), {}, [], done=(*oci.RUNTIME_DONE, "identity"))
    assert gvisor["done"] == [*oci.RUNTIME_DONE, "identity"]
    assert oci.RUNTIME_DONE == ("cgroups", "namespaces", "root", "enter_root", "oom_score")
    container = oci.spec(Policy(), {}, [], done=oci.RUNTIME_DONE)
    assert "identity" not in container["done"] and "seccomp" not in container["done"]
    with pytest.raises(ValueError, match="'landlock'"):
        oci.spec(Policy(), {}, [], done=("landlock",))
    with pytest.raises(ValueError, match="seccomp claimed done"):
        oci.spec(Policy(), {}, [], done=("seccomp",))  # an OCI runtime gets no filter of ours


def test_the_identity_claim_is_checked() -> None:
    me = {"uid": os.getuid(), "gid": os.getgid()}
    steps._check_identity(me, {})  # the positive control
    with pytest.raises(StepError, match="identity claimed done"):
        steps._check_identity({**me, "uid": me["uid"] + 1}, {})
    with pytest.raises(StepError, match="identity claimed done"):
        steps._check_identity({**me, "gid": me["gid"] + 1}, {})


def test_the_seccomp_claim_is_checked() -> None:
    """In a child: without a filter the claim is refused; with one (loaded by the child
    itself, as bwrap does before the entry runs) it holds."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if steps.seccomp_mode() == 0:
                try:
                    steps._check_seccomp({}, {})
                except StepError:
                    # without CAP_SYS_ADMIN (not root) a filter needs no_new_privs first
                    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
                    steps.seccomp.load(steps.seccomp.build())
                    steps._check_seccomp({}, {})
                    code = 0
            else:  # this test process is itself under a filter (a container): no control
                code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 2:
        pytest.skip("the test process already runs under a seccomp filter")
    assert code == 0


# -- the real spec builders, on stand-in sandboxes ---------------------------------------------


def runtime() -> SimpleNamespace:
    return SimpleNamespace(base_env=dict, path=Path("/opt/runtime"), version="3.11")


def namespace_spec() -> dict[str, Any]:
    template = SimpleNamespace(
        package=Path("/pkg"), root_mountpoint="/root", landlock_abi=1, data_bytes=0, layer=None
    )
    sandbox = SimpleNamespace(
        policy=Policy(),
        id="s",
        uid=20000,
        jail=SimpleNamespace(runtime=runtime(), rootless=False),
        template=template,
        tree=SimpleNamespace(procs_files=list, mount_names=[]),
        box=SimpleNamespace(volumes=()),
    )
    return NamespaceLauncher._spec(sandbox, {})  # type: ignore[arg-type]


def bwrap_spec() -> dict[str, Any]:
    jail = SimpleNamespace(
        runtime=runtime(), landlock=True, preload=("json",), seccomp_program=b"\x00" * 8
    )
    sandbox = SimpleNamespace(
        policy=Policy(),
        id="s",
        uid=20000,
        jail=jail,
        layer=None,
        box=SimpleNamespace(volumes=()),
    )
    return BwrapLauncher._spec(sandbox, {})  # type: ignore[arg-type]
