"""The host side of the kernel protocol (codecage._jail.host), against scripted kernels:
frame validation, output and channel budgets, ids, deaths and restarts, and outcomes taken
from the tree's readings rather than the kernel's word. The fake stands in for the jail;
what is tested is the REAL HostSandbox above it."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest

from codecage import Policy
from codecage._errors import ExecutionTimeout, SandboxError, SandboxNotFound, TransportError
from codecage._jail.channel import channel_budget
from codecage._jail.sandbox import HostSandbox
from codecage.testing import fake as f
from codecage.testing.fake import FakeJail, FakeLauncher


@pytest.fixture
def box(fake: FakeJail) -> Iterator[HostSandbox]:
    sandbox = fake.create(Policy(interrupt_grace_s=0.05))
    assert isinstance(sandbox.launcher, FakeLauncher)
    yield sandbox
    sandbox.kill()


def make(fake: FakeJail, **fields: object) -> HostSandbox:
    sandbox = fake.create(Policy(**fields))  # type: ignore[arg-type]
    assert isinstance(sandbox.launcher, FakeLauncher)
    return sandbox


# -- the ordinary run ------------------------------------------------------------------------


def test_a_run_collects_stdout_stderr_and_the_main_result(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.stdout("a\n"), f.stderr("b\n"), f.result("42"))
    ex = box.execute("x")
    assert ex.logs.stdout == ["a\n"]
    assert ex.logs.stderr == ["b\n"]
    assert ex.text == "42"
    assert ex.error is None and ex.killed_by is None and ex.limits_hit == []


def test_the_request_carries_code_mode_envs_and_budgets(fake: FakeJail, box: HostSandbox) -> None:
    box.execute("print(1)", envs={"A": "1"})
    request = box.launcher.requests[-1]
    assert request["op"] == "execute" and request["code"] == "print(1)"
    assert request["mode"] == "session" and request["envs"] == {"A": "1"}
    assert request["output_bytes"] == box.policy.output_bytes
    assert request["results_bytes"] == box.policy.results_bytes


def test_each_request_gets_a_fresh_id(fake: FakeJail, box: HostSandbox) -> None:
    box.execute("a")
    box.execute("b")
    ids = [r["id"] for r in box.launcher.requests if r.get("op") == "execute"]
    assert len(set(ids)) == 2


def test_execution_count_is_the_kernels(fake: FakeJail, box: HostSandbox) -> None:
    assert [box.execute("x").execution_count for _ in range(3)] == [1, 2, 3]


def test_an_error_frame_is_the_runs_error_value(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("boom", f.error("ZeroDivisionError", "division by zero", "Traceback..."))
    ex = box.execute("boom")
    assert ex.error is not None
    assert (ex.error.name, ex.error.value, ex.error.traceback) == (
        "ZeroDivisionError",
        "division by zero",
        "Traceback...",
    )
    assert ex.killed_by is None


def test_extra_results_are_kept_with_the_main_one(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code(
        "plot",
        f.result({"image/png": "iVBOR", "text/plain": "<Figure>"}, main=False),
        f.result("1"),
    )
    ex = box.execute("plot")
    assert [r.is_main_result for r in ex.results] == [False, True]
    assert ex.results[0].png == "iVBOR"
    assert ex.text == "1"


def test_events_reach_the_callback_in_order(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.stdout("1"), f.result("2"), f.stderr("3"))
    seen: list[str] = []
    box.execute("x", on_event=lambda e: seen.append(str(e["ev"])))
    assert seen == ["stdout", "result", "stderr", "end"]


def test_main_mode_exit_code_is_the_programs(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("sys.exit(3)", f.end(exit_code=3))
    ex = box.execute("sys.exit(3)", mode="main")
    assert ex.exit_code == 3 and ex.error is None


def test_end_frame_truncated_marks_the_run_cut(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.stdout("a"), f.end(truncated=True))
    ex = box.execute("x")
    assert ex.truncated and "output_limit" in ex.limits_hit


def test_end_frame_cannot_claim_a_non_integer_count(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.frame("end", execution_count="7", exit_code=[1]))
    ex = box.execute("x")
    assert ex.execution_count is None and ex.exit_code is None


def test_non_string_text_is_ignored(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.frame("stdout", text=123), f.frame("stdout", text=""), f.stdout("ok"))
    assert box.execute("x").logs.stdout == ["ok"]


def test_a_result_that_is_not_a_bundle_is_dropped(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.frame("result", data="not a dict", is_main_result=True))
    assert box.execute("x").results == []


def test_lone_surrogates_from_the_kernel_are_replaced(fake: FakeJail, box: HostSandbox) -> None:
    body = b'{"ev":"stdout","id":"%s","text":"a\\ud800b"}'
    fake.on_code("x", lambda req, sbx: [f.Raw(_framed(body % req["id"].encode()))])
    ex = box.execute("x")
    assert ex.logs.stdout == ["a\ufffdb"]
    "".join(ex.logs.stdout).encode("utf-8")  # encodable: nothing breaks the answer


def _framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# -- budgets -----------------------------------------------------------------------------------


def test_stdout_beyond_output_bytes_is_cut_by_the_host(fake: FakeJail) -> None:
    box = make(fake, output_bytes=10)
    fake.on_code("x", f.stdout("0123456789ABCDEF"))  # the kernel ignores its budget
    ex = box.execute("x")
    assert "".join(ex.logs.stdout) == "0123456789"
    assert ex.truncated and "output_limit" in ex.limits_hit
    box.kill()


def test_the_budget_is_shared_by_stdout_and_stderr(fake: FakeJail) -> None:
    box = make(fake, output_bytes=6)
    fake.on_code("x", f.stdout("abcd"), f.stderr("efgh"), f.stdout("ijkl"))
    ex = box.execute("x")
    assert ex.logs.stdout == ["abcd"] and ex.logs.stderr == ["ef"]
    box.kill()


def test_the_callback_gets_only_what_the_budget_kept(fake: FakeJail) -> None:
    box = make(fake, output_bytes=3)
    fake.on_code("x", f.stdout("abcdef"), f.stdout("ghi"))
    seen: list[str] = []
    box.execute("x", on_event=lambda e: seen.append(e.get("text", e["ev"])))
    assert seen == ["abc", "end"]
    box.kill()


def test_the_cut_never_splits_a_character(fake: FakeJail) -> None:
    box = make(fake, output_bytes=5)
    fake.on_code("x", f.stdout("ééé"))  # 6 bytes in UTF-8
    assert box.execute("x").logs.stdout == ["éé"]
    box.kill()


def test_the_output_budget_is_per_run(fake: FakeJail) -> None:
    box = make(fake, output_bytes=4)
    fake.on_code("x", f.stdout("abcd"))
    assert not box.execute("x").truncated
    assert not box.execute("x").truncated
    box.kill()


def test_results_beyond_results_bytes_are_dropped(fake: FakeJail) -> None:
    box = make(fake, results_bytes=10)
    fake.on_code("x", f.result("small"), f.result({"text/plain": "y" * 100}, main=False))
    ex = box.execute("x")
    assert [r.text for r in ex.results] == ["small"]
    assert ex.truncated and "output_limit" in ex.limits_hit
    box.kill()


def test_a_kernel_flooding_far_past_its_budget_is_ended(fake: FakeJail) -> None:
    box = make(fake, output_bytes=0, results_bytes=0)
    fake.on_code("flood", f.Flood(total=80 << 20, chunk=1 << 20))
    with pytest.raises(SandboxNotFound, match="far beyond its budget"):
        box.execute("flood")
    assert not box.alive
    box.kill()


def test_the_channel_budget_counts_bytes_of_dropped_frames(fake: FakeJail) -> None:
    box = make(fake, output_bytes=0, results_bytes=0)
    assert channel_budget(box.policy) == 64 << 20

    def old_frames(req: dict[str, object], sbx: FakeLauncher) -> list[f.Step]:
        text = "z" * (1 << 20)
        return [f.Frame({"ev": "stdout", "id": None, "text": text}) for _ in range(70)]

    fake.on_code("x", old_frames)  # frames with no id are dropped, their bytes still count
    with pytest.raises(SandboxNotFound, match="control channel"):
        box.execute("x")
    box.kill()


# -- ids and events ------------------------------------------------------------------------


def test_a_forged_id_ends_the_sandbox(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.Frame({"ev": "stdout", "id": "f0f0f0f0", "text": "hi"}))
    with pytest.raises(SandboxNotFound, match="no run or request"):
        box.execute("x")
    assert not box.alive


def test_a_frame_without_id_is_dropped(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.Frame({"ev": "stdout", "id": None, "text": "stray"}), f.stdout("mine"))
    assert box.execute("x").logs.stdout == ["mine"]
    assert box.alive


def test_an_earlier_runs_frames_are_dropped(fake: FakeJail, box: HostSandbox) -> None:
    box.execute("first")
    first = box.launcher.requests[-1]["id"]
    fake.on_code("second", f.Frame({"ev": "stdout", "id": first, "text": "old"}), f.stdout("new"))
    assert box.execute("second").logs.stdout == ["new"]
    assert box.alive


def test_an_end_with_an_earlier_id_does_not_end_the_run(fake: FakeJail, box: HostSandbox) -> None:
    box.execute("first")
    first = box.launcher.requests[-1]["id"]
    fake.on_code("second", f.Frame({"ev": "end", "id": first}), f.stdout("after"))
    assert box.execute("second").logs.stdout == ["after"]


@pytest.mark.parametrize("ev", ["pending_approval", "hello", "done", "bogus", "exit"])
def test_an_event_a_run_never_takes_ends_the_sandbox(
    fake: FakeJail, box: HostSandbox, ev: str
) -> None:
    fake.on_code("x", f.frame(ev, text="t"))
    with pytest.raises(SandboxNotFound, match="broke the protocol"):
        box.execute("x")
    assert not box.alive


def test_an_unknown_event_of_an_earlier_run_ends_the_sandbox(
    fake: FakeJail, box: HostSandbox
) -> None:
    box.execute("first")
    first = box.launcher.requests[-1]["id"]
    fake.on_code("second", f.Frame({"ev": "pending_approval", "id": first}))
    with pytest.raises(SandboxNotFound):
        box.execute("second")


def test_a_malformed_frame_is_a_transport_error(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.Raw(_framed(b"not json")))
    with pytest.raises(TransportError, match="malformed frame"):
        box.execute("x")
    assert not box.alive


def test_a_frame_that_is_not_an_object_is_refused(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.Raw(_framed(b"[1, 2]")))
    with pytest.raises(TransportError):
        box.execute("x")


def test_a_frame_header_over_the_cap_is_refused(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.Raw(struct.pack(">I", (16 << 20) + 1)))
    with pytest.raises(TransportError, match="exceeds"):
        box.execute("x")


# -- deaths, timeouts, restarts ------------------------------------------------------------


def test_a_kernel_exiting_is_kernel_died_with_its_code(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("os._exit(3)", f.Die(code=3))
    ex = box.execute("os._exit(3)")
    assert ex.error is not None and ex.error.name == "KernelDied"
    assert "exit code 3" in ex.error.value and "restarted" in ex.error.value
    assert ex.exit_code == 3 and ex.state_lost and ex.killed_by is None


def test_a_kernel_killed_by_a_signal_is_named(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.Die(signal=signal.SIGSEGV))
    ex = box.execute("x")
    assert ex.killed_by == "signal" and ex.exit_code == 128 + signal.SIGSEGV
    assert ex.error is not None and "SIGSEGV" in ex.error.value


def test_sigsys_is_reported_as_seccomp(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.Die(signal=signal.SIGSYS))
    ex = box.execute("x")
    assert ex.killed_by == "seccomp" and ex.error is not None
    assert ex.error.name == "SeccompViolation"


def test_after_a_death_the_session_goes_on_in_a_new_kernel(
    fake: FakeJail, box: HostSandbox
) -> None:
    fake.on_code("die", f.Die(code=1))
    assert box.generation == 0
    box.execute("die")
    assert box.generation == 1 and box.alive
    assert box.execute("x").execution_count == 1  # a fresh kernel counts from one


def test_setup_requests_are_replayed_to_a_restarted_kernel(
    fake: FakeJail, box: HostSandbox
) -> None:
    box.set_envs({"K": "v"})
    fake.on_code("die", f.Die(code=1))
    box.execute("die")
    setenvs = [r for r in box.launcher.requests if r.get("op") == "setenv"]
    assert len(setenvs) == 2 and setenvs[1]["envs"] == {"K": "v"}


def test_main_mode_death_by_exit_code_is_not_an_error(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.Die(code=4))
    ex = box.execute("x", mode="main", recover=False)
    assert ex.exit_code == 4 and ex.error is None


def test_a_timeout_interrupts_and_keeps_the_session(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("loop", f.stdout("tick"), f.Hang())
    ex = box.execute("loop", timeout_s=0.1)
    assert ex.killed_by == "timeout" and "timeout" in ex.limits_hit
    assert not ex.state_lost and ex.logs.stdout == ["tick"]
    assert (None, signal.SIGINT) not in box.launcher.tree.kills  # init is spared
    assert (1, signal.SIGINT) in box.launcher.tree.kills
    assert box.generation == 0


def test_a_timeout_that_ignores_sigint_restarts_the_kernel(
    fake: FakeJail, box: HostSandbox
) -> None:
    fake.on_code("stuck", f.Hang(interruptible=False))
    ex = box.execute("stuck", timeout_s=0.1)
    assert ex.killed_by == "timeout" and ex.state_lost
    assert ex.error is not None and ex.error.name == "TimeoutError"
    assert "restarted" in ex.error.value
    assert box.generation == 1 and box.alive
    assert (1, signal.SIGKILL) in box.launcher.tree.kills


def test_without_recover_a_timeout_just_stops_waiting(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("stuck", f.Hang(interruptible=False))
    ex = box.execute("stuck", timeout_s=0.1, mode="main", recover=False)
    assert ex.killed_by == "timeout" and ex.exit_code == 128 + signal.SIGKILL
    assert box.generation == 0


def test_the_policy_timeout_caps_a_longer_one(fake: FakeJail) -> None:
    box = make(fake, timeout_s=0.1, interrupt_grace_s=0.05)
    fake.on_code("loop", f.Hang())
    ex = box.execute("loop", timeout_s=100)
    assert ex.killed_by == "timeout" and ex.error is not None
    box.kill()


def test_a_request_past_its_deadline_restarts_the_kernel(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_command("sleep", f.Hang(interruptible=False))
    with pytest.raises(ExecutionTimeout, match="restarted"):
        box.request({"op": "command", "cmd": "sleep"}, 0.1)
    assert box.generation == 1 and box.alive


def test_a_kernel_dying_during_a_request_is_a_transport_error(
    fake: FakeJail, box: HostSandbox
) -> None:
    fake.on_command("crash", f.Die(signal=signal.SIGKILL))
    with pytest.raises(TransportError, match="died during command"):
        box.request({"op": "command", "cmd": "crash"}, 5)
    assert box.alive and box.generation == 1


def test_a_request_drops_run_events_of_its_id(fake: FakeJail, box: HostSandbox) -> None:
    fake.on("prefault", None, f.stdout("warming"), f.reply())
    box.prefault()
    assert box.alive


def test_a_request_reply_with_an_earlier_id_is_not_taken(fake: FakeJail, box: HostSandbox) -> None:
    box.execute("x")
    old = box.launcher.requests[-1]["id"]
    fake.on_command("c", f.Frame({"ev": "done", "id": old, "exit_code": 9}))
    reply = box.request({"op": "command", "cmd": "c"}, 5)
    assert reply["exit_code"] == 127  # the fake's own answer, not the stale one


def test_init_dying_ends_the_run_with_a_transport_error(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.InitDies())
    with pytest.raises((TransportError, SandboxNotFound)):
        box.execute("x")
    assert box.dead()


def test_init_dying_of_its_memory_limit_is_the_runs_value(fake: FakeJail, box: HostSandbox) -> None:
    # gVisor's sentry taken by the host's OOM killer: the whole sandbox dies in the run.
    fake.on_code("x", f.Reading(oom_kills=1), f.InitDies())
    ex = box.execute("x")
    assert ex.killed_by == "memory_limit" and "memory_limit" in ex.limits_hit
    assert ex.state_lost and ex.error is not None and ex.error.name == "MemoryLimitExceeded"
    with pytest.raises(SandboxNotFound, match="memory limit"):
        box.execute("1 + 1")  # the next call on the ended sandbox is the error


@pytest.mark.parametrize(
    ("limit", "killed_by", "error"),
    [(None, "signal", "KernelDied"), ("memory_limit", "memory_limit", "MemoryLimitExceeded")],
)
def test_a_launcher_taking_inits_hang_up_for_the_kernels_death_ends_the_run_as_a_value(
    fake: FakeJail, limit: str | None, killed_by: str, error: str
) -> None:
    # The generic code's hooks for gVisor (its sentry dying): one exit event stands in for
    # init's report, the restart ends the sandbox with the launcher's reason, and the run's
    # error says so. Positive control: test_init_dying_ends_the_run_with_a_transport_error.
    fake.init_death = ("its fake sentry died", limit)  # type: ignore[assignment]
    box = make(fake)
    try:
        fake.on_code("x", f.InitDies())
        ex = box.execute("x")
        assert ex.killed_by == killed_by and ex.state_lost
        assert ex.error is not None and ex.error.name == error
        assert ex.error.value.endswith("; its fake sentry died")
        assert not box.alive and box.ended_because == "its fake sentry died"
        with pytest.raises(SandboxNotFound, match="its fake sentry died"):
            box.execute("1 + 1")
    finally:
        box.kill()


def test_a_kernel_announced_by_token_is_handed_over_by_the_launcher(fake: FakeJail) -> None:
    # The OCI backends' path (no descriptor crosses into the host): init names a token, the
    # launcher's handover gives the socket; restarts go the same way.
    fake.kernel_by_token = True
    box = make(fake)
    try:
        fake.on_code("die", f.Die(signal=9))
        assert box.execute("x").execution_count == 1
        box.execute("die")
        assert box.generation == 1 and box.alive
        assert box.execute("x").execution_count == 1  # the restarted kernel's, by token too
    finally:
        box.kill()


def test_a_killed_sandbox_refuses_runs(fake: FakeJail, box: HostSandbox) -> None:
    box.kill()
    with pytest.raises(SandboxNotFound, match="it was killed"):
        box.execute("x")
    with pytest.raises(SandboxNotFound):
        box.request({"op": "stat", "args": {"path": "."}}, 1)
    assert not box.alive and box.id in fake.released


def test_kill_is_idempotent_and_removes_the_tree(fake: FakeJail, box: HostSandbox) -> None:
    box.kill()
    box.kill()
    assert box.launcher.tree.removed and fake.released.count(box.id) == 1


def test_end_reports_its_reason_later(fake: FakeJail, box: HostSandbox) -> None:
    box.end("it was idle too long")
    with pytest.raises(SandboxNotFound, match="idle too long"):
        box.execute("x")


# -- outcomes from the host's readings ---------------------------------------------------------


def test_an_oom_kill_makes_a_death_a_memory_limit(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x = b'x' * 10**10", f.Reading(oom_kills=1), f.Die(signal=signal.SIGKILL))
    ex = box.execute("x = b'x' * 10**10")
    assert ex.killed_by == "memory_limit" and "memory_limit" in ex.limits_hit
    assert ex.error is not None and ex.error.name == "MemoryLimitExceeded"
    assert "memory_mb=512" in ex.error.value


def test_an_oom_kill_of_a_child_is_reported_without_killing(
    fake: FakeJail, box: HostSandbox
) -> None:
    fake.on_code("x", f.Reading(oom_kills=1), f.stdout("still here"))
    ex = box.execute("x")
    assert ex.killed_by is None and ex.limits_hit == ["memory_limit"]


def test_a_kernel_claiming_memory_limit_is_not_believed(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.error("MemoryLimitExceeded", "trust me"), f.Die(signal=signal.SIGKILL))
    ex = box.execute("x")
    assert ex.killed_by == "signal" and "memory_limit" not in ex.limits_hit


def test_pids_events_are_the_pids_limit(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("fork", f.Reading(pids_max_events=3))
    assert box.execute("fork").limits_hit == ["pids_limit"]


def test_older_pids_events_do_not_count(fake: FakeJail, box: HostSandbox) -> None:
    box.launcher.tree.pids_max_events = 5
    assert box.execute("x").limits_hit == []


def test_a_full_workspace_is_the_disk_quota(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("fill", f.Reading(workspace_full=True))
    assert "disk_quota" in box.execute("fill").limits_hit


def test_peak_memory_is_the_trees_reading(fake: FakeJail, box: HostSandbox) -> None:
    fake.on_code("x", f.Reading(memory_peak_bytes=300 << 20))
    assert box.execute("x").peak_memory_mb == 300


def test_the_peak_is_reset_before_each_run(fake: FakeJail, box: HostSandbox) -> None:
    box.launcher.tree.memory_peak_bytes = 900 << 20
    box.launcher.tree.memory_now = 10 << 20
    assert box.execute("x").peak_memory_mb == 10


def test_unknown_peak_memory_stays_unknown(fake: FakeJail, box: HostSandbox) -> None:
    box.launcher.tree.memory_peak_bytes = None
    assert box.execute("x").peak_memory_mb is None


def test_cpu_over_the_budget_ends_the_sandbox(fake: FakeJail) -> None:
    box = make(fake, cpu_s=1.0)
    fake.on_code("spin", f.Reading(cpu_s=5.0), f.Hang(interruptible=False))
    ex = box.execute("spin")
    assert ex.killed_by == "cpu_limit" and "cpu_limit" in ex.limits_hit
    assert ex.state_lost and not box.alive
    assert ex.error is not None and ex.error.name == "CpuLimitExceeded"
    assert "sandbox has ended" in ex.error.value
    with pytest.raises(SandboxNotFound, match=r"cpu_s=1\.0"):
        box.execute("x")
    box.kill()


def test_startup_cpu_is_not_the_sessions(fake: FakeJail) -> None:
    box = make(fake)
    box.launcher.tree.cpu_s = 3.0
    box.prefault()  # the pool's uncounted cell moves the base
    assert box.usage().cpu_s == 0.0
    box.launcher.tree.cpu_s = 4.5
    assert box.usage().cpu_s == 1.5
    box.kill()


def test_memory_current_is_the_trees(fake: FakeJail, box: HostSandbox) -> None:
    box.launcher.tree.memory_now = 1234
    assert box.memory_current() == 1234


# -- set-up ------------------------------------------------------------------------------------


def test_a_setup_error_from_init_fails_the_create(fake: FakeJail) -> None:
    fake.start_error = "no /dev/null"
    with pytest.raises(SandboxError, match="no /dev/null"):
        fake.create(Policy())
    assert fake.sandboxes[-1].launcher.tree.removed


def test_a_kernel_that_does_not_greet_fails_the_create(fake: FakeJail) -> None:
    fake.hello = {"ev": "stdout", "text": "hi"}
    with pytest.raises(TransportError, match="did not greet"):
        fake.create(Policy())
    assert not fake.live()


def test_an_import_guard_is_sent_before_any_code(fake: FakeJail) -> None:
    box = make(fake, modules_deny=("socket",))
    assert box.launcher.requests[0]["op"] == "guard"
    assert box.launcher.requests[0]["modules_deny"] == ["socket"]
    box.kill()


def test_a_policy_for_another_backend_is_refused(fake: FakeJail) -> None:
    from codecage._errors import PolicyError

    with pytest.raises(PolicyError, match="isolation"):
        fake.create(Policy(isolation="bwrap"))


def test_a_backend_lacking_a_feature_refuses_the_policy(fake: FakeJail) -> None:
    from codecage._errors import PolicyError

    fake.enforces = frozenset(fake.enforces - {"memory"})
    fake.why = {"memory": "no memory controller here"}
    with pytest.raises(PolicyError, match="no memory controller here"):
        fake.create(Policy())
    box = fake.create(Policy(allow_weaker=True))
    box.kill()


def test_a_frame_of_millions_of_tiny_values_is_refused_before_it_is_parsed() -> None:
    import json

    from codecage._inside import protocol

    many = json.dumps({"ev": "stdout", "pad": [{}] * (protocol.MAX_VALUES + 1)}).encode()
    with pytest.raises(protocol.ProtocolError, match="JSON values"):
        protocol.decode(many)
    # Commas and brackets inside strings are not values: a long string of them is taken.
    text = ",[{" * (protocol.MAX_VALUES + 1) + '\\"'
    assert protocol.decode(json.dumps({"ev": "stdout", "text": text}).encode())["text"] == text
    records = json.dumps({"ev": "result", "data": [{"a": 1}] * 100_000}).encode()
    assert len(protocol.decode(records)["data"]) == 100_000


def test_the_kernel_watch_tells_a_reading_that_works_from_one_that_does_not() -> None:
    """The host drops to taking a run's end on the kernel's word only when it cannot read
    /proc/PID/syscall at all, never because the kernel is busy (it gave up after 5 s on a
    loaded host once, and a forged end was taken)."""
    from codecage._jail.proctree import KernelWatch

    watch = KernelWatch()
    assert not watch.readable()  # watching nothing
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # busy: "running"
    try:
        watch._syscall_fd = os.open(f"/proc/{child.pid}/syscall", os.O_RDONLY)
        watch.pid, watch.fd = child.pid, 3
        assert watch.readable() and watch.waiting() is False
        child.kill()
        child.wait()
        assert not watch.readable()  # the process is gone: nothing to read
    finally:
        child.kill()
        child.wait()
        watch.stop()
