"""The SDK above the jail: Sandbox and AsyncSandbox methods and their error values,
codecage.run, files and commands, callbacks, static analysis and approvals, the watchdog.
Scripted kernels (codecage.testing.fake) answer; nothing here tests isolation."""

from __future__ import annotations

import asyncio
import base64
import signal
import threading

import pytest

import codecage
from codecage import (
    ApprovalDenied,
    AsyncSandbox,
    CodeRejected,
    FileNotFoundInSandbox,
    OutputMessage,
    Policy,
    PolicyError,
    Result,
    Sandbox,
    SandboxError,
    SandboxNotFound,
    TransportError,
)
from codecage._approvals import ApprovalRequest, Decision, Gate
from codecage._sandbox import FILE_CHUNK, _registry
from codecage.testing import fake as f
from codecage.testing.fake import FakeJail

# -- runs --------------------------------------------------------------------------------------


def test_run_code_returns_the_main_results_text(fake: FakeJail) -> None:
    fake.on_code("1 + 1", f.result("2"))
    with Sandbox() as sbx:
        ex = sbx.run_code("1 + 1")
    assert ex.text == "2" and ex.error is None


def test_state_is_the_sessions_one_kernel(fake: FakeJail) -> None:
    with Sandbox() as sbx:
        sbx.run_code("x = 1")
        sbx.run_code("x")
        kernels = {b.generation for b in fake.sandboxes}
    assert fake.ran() == ["x = 1", "x"] and kernels == {0}


def test_callbacks_get_output_results_and_errors(fake: FakeJail) -> None:
    fake.on_code(
        "x", f.stdout("out\n"), f.stderr("err\n"), f.result("7"), f.error("ValueError", "bad")
    )
    got: dict[str, list[object]] = {"out": [], "err": [], "res": [], "exc": []}
    with Sandbox() as sbx:
        sbx.run_code(
            "x",
            on_stdout=got["out"].append,
            on_stderr=got["err"].append,
            on_result=got["res"].append,
            on_error=got["exc"].append,
        )
    out, err = got["out"][0], got["err"][0]
    assert isinstance(out, OutputMessage) and out.line == "out\n" and not out.error
    assert isinstance(err, OutputMessage) and err.error and str(err) == "err\n"
    result = got["res"][0]
    assert isinstance(result, Result) and result.text == "7" and result.is_main_result
    assert [e.name for e in got["exc"]] == ["ValueError"]  # type: ignore[attr-defined]


def test_a_users_exception_is_a_value_not_raised(fake: FakeJail) -> None:
    fake.on_code("1/0", f.error("ZeroDivisionError", "division by zero"))
    with Sandbox() as sbx:
        ex = sbx.run_code("1/0")
        assert ex.error is not None and ex.error.name == "ZeroDivisionError"
        assert sbx.alive


def test_the_timeout_argument_only_lowers_the_policys(fake: FakeJail) -> None:
    fake.on_code("loop", f.Hang())
    with Sandbox(Policy(timeout_s=0.1, interrupt_grace_s=0.05)) as sbx:
        ex = sbx.run_code("loop", timeout=60)
    assert ex.killed_by == "timeout"


def test_envs_of_a_run_reach_the_kernel(fake: FakeJail) -> None:
    with Sandbox() as sbx:
        sbx.run_code("x", envs={"TOKEN": "t"})
    assert fake.requests[-1]["envs"] == {"TOKEN": "t"}


@pytest.mark.parametrize("envs", [{"A=B": "1"}, {"": "1"}, {"A": "x\0y"}, {"A\0": "1"}])
def test_invalid_envs_are_refused_before_the_kernel(fake: FakeJail, envs: dict[str, str]) -> None:
    with Sandbox() as sbx, pytest.raises(PolicyError, match="envs"):
        sbx.run_code("x", envs=envs)
    assert fake.ran() == []


def test_sandbox_envs_are_the_sandboxs_own(fake: FakeJail) -> None:
    with Sandbox(envs={"A": "1"}):
        assert fake.sandboxes[-1].launcher.start_envs == {"A": "1"}


def test_bytes_code_must_be_utf8(fake: FakeJail) -> None:
    with Sandbox() as sbx, pytest.raises(PolicyError, match="UTF-8"):
        sbx.run_code(b"\xff\xfe")  # type: ignore[arg-type]
    assert fake.ran() == []


def test_a_killed_sandbox_raises_sandbox_not_found(fake: FakeJail) -> None:
    sbx = Sandbox()
    sbx.kill()
    assert not sbx.alive and "ended" in repr(sbx)
    with pytest.raises(SandboxNotFound, match="it was killed"):
        sbx.run_code("x")
    with pytest.raises(SandboxNotFound):
        sbx.files.list()


def test_the_id_is_the_sandboxes(fake: FakeJail) -> None:
    with Sandbox() as sbx:
        assert sbx.id == sbx.sandbox_id == fake.sandboxes[-1].id
        assert sbx.id in repr(sbx) and "alive" in repr(sbx)


def test_a_protocol_violation_ends_the_sandbox_for_the_caller(fake: FakeJail) -> None:
    fake.on_code("evil", f.Frame({"ev": "stdout", "id": "forged", "text": "x"}))
    with Sandbox() as sbx:
        with pytest.raises(SandboxNotFound):
            sbx.run_code("evil")
        assert not sbx.alive
        with pytest.raises(SandboxNotFound, match="broke the protocol"):
            sbx.run_code("x")


def test_kill_during_a_run_returns_it(fake: FakeJail) -> None:
    sbx = Sandbox()
    started = threading.Event()
    fake.on_code("loop", lambda req, box: (started.set(), [f.Hang(interruptible=False)])[1])
    out: list[object] = []
    worker = threading.Thread(target=lambda: out.append(_catch(lambda: sbx.run_code("loop"))))
    worker.start()
    started.wait(5)
    sbx.kill()
    worker.join(10)
    assert not worker.is_alive() and isinstance(out[0], SandboxNotFound)


def _catch(fn: object) -> object:
    try:
        return fn()  # type: ignore[operator]
    except Exception as exc:
        return exc


def test_runs_on_one_sandbox_are_serialized(fake: FakeJail) -> None:
    counter = iter(range(100))

    def slow(req: dict[str, object], box: object) -> list[f.Step]:
        n = next(counter)
        return [f.stdout(f"start {n}"), f.Sleep(0.02), f.stdout(f"stop {n}")]

    fake.on_code("slow", slow)
    outs: list[list[str]] = []
    with Sandbox() as sbx:
        threads = [
            threading.Thread(target=lambda: outs.append(sbx.run_code("slow").logs.stdout))
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert sorted(outs) == [[f"start {n}", f"stop {n}"] for n in range(4)]


# -- one-shot runs -------------------------------------------------------------------------


def test_run_is_main_mode_in_a_fresh_sandbox_destroyed_after(fake: FakeJail) -> None:
    fake.on_code("print(1)", f.stdout("1\n"), f.end(exit_code=0))
    ex = codecage.run("print(1)")
    assert ex.logs.stdout == ["1\n"] and ex.exit_code == 0
    assert fake.requests[-1]["mode"] == "main"
    assert not fake.live() and len(fake.released) == 1


def test_run_reports_exit_codes(fake: FakeJail) -> None:
    fake.on_code("sys.exit(5)", f.Die(code=5))
    ex = codecage.run("sys.exit(5)")
    assert ex.exit_code == 5 and ex.error is None


def test_run_never_restarts_after_a_timeout(fake: FakeJail) -> None:
    fake.on_code("loop", f.Hang(interruptible=False))
    ex = codecage.run("loop", Policy(timeout_s=0.1))
    assert ex.killed_by == "timeout" and ex.exit_code == 128 + signal.SIGKILL
    assert fake.sandboxes[-1].generation == 0 and not fake.live()


def test_run_memory_limit_from_the_readings(fake: FakeJail) -> None:
    fake.on_code("big", f.Reading(oom_kills=1), f.Die(signal=signal.SIGKILL))
    ex = codecage.run("big", Policy(memory_mb=64))
    assert ex.killed_by == "memory_limit"
    assert ex.error is not None and "memory_mb=64" in ex.error.value


def test_run_passes_events_on(fake: FakeJail) -> None:
    fake.on_code("x", f.stdout("a"))
    events: list[str] = []
    codecage.run("x", on_event=lambda e: events.append(e["ev"]))
    assert events == ["stdout", "end"]


def test_run_kills_the_sandbox_even_when_the_run_raises(fake: FakeJail) -> None:
    fake.on_code("x", f.Raw(b"\x00\x00\x00\x03abc"))
    with pytest.raises(TransportError):
        codecage.run("x")
    assert not fake.live()


# -- static analysis and approvals -------------------------------------------------------------


def test_blocked_code_never_reaches_the_kernel(fake: FakeJail) -> None:
    with Sandbox(Policy(analysis_block_at="high")) as sbx, pytest.raises(CodeRejected) as caught:
        sbx.run_code("import subprocess")
    assert [x.rule for x in caught.value.findings] == ["CC101"]
    assert fake.ran() == []


def test_findings_below_the_block_level_run_and_are_returned(fake: FakeJail) -> None:
    with Sandbox(Policy(analysis_block_at="high")) as sbx:
        ex = sbx.run_code("import socket")
    assert {x.rule for x in ex.findings} == {"CC201"}
    assert fake.ran() == ["import socket"]


def test_an_approved_run_goes_on(fake: FakeJail) -> None:
    asked: list[ApprovalRequest] = []

    def yes(request: ApprovalRequest) -> bool:
        asked.append(request)
        return True

    with Sandbox(Policy(approval_findings_at="high"), approver=yes) as sbx:
        sbx.run_code("import subprocess")
    assert asked[0].kind == "execute" and asked[0].subject == "import subprocess"
    assert "static analysis" in asked[0].reasons[0]
    assert fake.ran() == ["import subprocess"]


def test_a_denied_run_never_reaches_the_kernel(fake: FakeJail) -> None:
    with Sandbox(Policy(approval_findings_at="high"), approver=lambda r: False) as sbx:
        with pytest.raises(ApprovalDenied):
            sbx.run_code("import subprocess")
        assert sbx.alive
    assert fake.ran() == []


def test_a_decision_object_carries_who_and_why(fake: FakeJail) -> None:
    no = Decision(False, by="ops", reason="not today")
    with (
        Sandbox(Policy(approval_findings_at="high"), approver=lambda r: no) as sbx,
        pytest.raises(ApprovalDenied, match="not today") as caught,
    ):
        sbx.run_code("import subprocess")
    assert caught.value.decision.by == "ops"


def test_no_answer_within_the_window_is_a_no(fake: FakeJail) -> None:
    broker = codecage._approvals.Approvals()
    gate = Gate(broker)
    with (
        Sandbox(Policy(approval_findings_at="high", approval_window_s=0.05), gate=gate) as sbx,
        pytest.raises(ApprovalDenied),
    ):
        sbx.run_code("import subprocess")
    assert broker.pending() == [] and fake.ran() == []


def test_an_approval_waits_for_a_decision_from_elsewhere(fake: FakeJail) -> None:
    broker = codecage._approvals.Approvals()
    with Sandbox(Policy(approval_findings_at="high"), gate=Gate(broker)) as sbx:
        worker = threading.Thread(target=sbx.run_code, args=("import subprocess",))
        worker.start()
        try:
            while not broker.pending():
                threading.Event().wait(0.005)
            decision = broker.decide(broker.pending()[0].id, True, by="me")
        finally:
            broker.deny_all("test", "the test is over")
            worker.join(10)
    assert decision.by == "me" and fake.ran() == ["import subprocess"]
    with pytest.raises(codecage.ApprovalNotFound, match="already"):
        broker.decide(decision_id_of(broker, decision), True, by="me")


def decision_id_of(broker: codecage._approvals.Approvals, decision: Decision) -> str:
    return next(i for i, (_, d) in broker._decided.items() if d is decision)


def test_the_pending_approval_event_reaches_the_stream(fake: FakeJail) -> None:
    events: list[str] = []
    with Sandbox(Policy(approval_findings_at="high"), approver=lambda r: True) as sbx:
        sbx._run("import subprocess", on_event=lambda e: events.append(e["ev"]))
    assert events[0] == "pending_approval" and events[-1] == "end"


def test_run_envs_are_a_reason_to_ask_when_approving(fake: FakeJail) -> None:
    asked: list[ApprovalRequest] = []
    with Sandbox(
        Policy(approval_findings_at="high"), approver=lambda r: asked.append(r) or True
    ) as sbx:
        sbx.run_code("import subprocess", envs={"SECRET": "s"})
    assert any("SECRET" in reason for reason in asked[0].reasons)


def test_commands_ask_when_the_policy_says_so(fake: FakeJail) -> None:
    fake.on_command("ls", f.command_reply(stdout="a\n"))
    with (
        Sandbox(Policy(approval_commands=True), approver=lambda r: False) as sbx,
        pytest.raises(ApprovalDenied),
    ):
        sbx.commands.run("ls")
    assert "command" not in fake.ops()


def test_a_large_download_asks_first(fake: FakeJail) -> None:
    asked: list[ApprovalRequest] = []
    with Sandbox(
        Policy(approval_download_mb=0.000001), approver=lambda r: asked.append(r) or False
    ) as sbx:
        sbx.files.write("big.bin", b"x" * 100)
        with pytest.raises(ApprovalDenied):
            sbx.files.read("big.bin")
    assert asked[0].kind == "download" and asked[0].subject == "big.bin"
    assert "read" not in fake.ops()


def test_limits_above_the_defaults_ask_at_create(fake: FakeJail) -> None:
    with pytest.raises(ApprovalDenied):
        Sandbox(
            Policy(memory_mb=2048, approval_limits_above_default=True),
            approver=lambda r: False,
            defaults=Policy(),
        )
    assert fake.sandboxes == []


# -- files -----------------------------------------------------------------------------------


def test_write_then_read_round_trips(fake: FakeJail) -> None:
    with Sandbox() as sbx:
        info = sbx.files.write("data/a.txt", "héllo")
        assert (info.name, info.path, info.type, info.size) == (
            "a.txt",
            "/home/user/data/a.txt",
            "file",
            6,
        )
        assert sbx.files.read("data/a.txt") == "héllo".encode()
        assert sbx.files.read("data/a.txt", format="text") == "héllo"
        assert fake.sandboxes[-1].launcher.files["/home/user/data/a.txt"] == "héllo".encode()


def test_a_large_write_goes_in_chunks(fake: FakeJail) -> None:
    data = bytes(range(256)) * ((FILE_CHUNK + 10) // 256 + 1)
    with Sandbox() as sbx:
        sbx.files.write("big", data)
        writes = [r for r in fake.requests if r.get("op") == "write"]
        assert [w["args"]["append"] for w in writes] == [False, True]
        assert sbx.files.read("big") == data


def test_an_empty_file_is_written(fake: FakeJail) -> None:
    with Sandbox() as sbx:
        assert sbx.files.write("empty", b"").size == 0
        assert sbx.files.read("empty") == b""


def test_list_exists_remove_make_dir(fake: FakeJail) -> None:
    with Sandbox() as sbx:
        assert sbx.files.make_dir("d/e") is True
        assert sbx.files.make_dir("d/e") is False
        sbx.files.write("d/f.txt", "1")
        assert [(e.name, e.type) for e in sbx.files.list("d")] == [("e", "dir"), ("f.txt", "file")]
        assert sbx.files.exists("d/f.txt") and not sbx.files.exists("nope")
        sbx.files.remove("d")
        assert not sbx.files.exists("d/f.txt")


def test_a_missing_file_is_file_not_found(fake: FakeJail) -> None:
    with Sandbox() as sbx:
        with pytest.raises(FileNotFoundInSandbox, match=r"missing\.txt"):
            sbx.files.read("missing.txt")
        with pytest.raises(FileNotFoundError):  # also the builtin
            sbx.files.get_info("missing.txt")
        sbx.files.remove("missing.txt")  # as in E2B: nothing to remove is not an error


def test_other_failures_are_sandbox_errors(fake: FakeJail) -> None:
    with Sandbox() as sbx:
        with pytest.raises(SandboxError, match="Is a directory") as caught:
            sbx.files.read("/tmp")
        assert not isinstance(caught.value, FileNotFoundInSandbox)


def test_a_kernel_sending_more_than_the_stated_size_is_refused(fake: FakeJail) -> None:
    fake.on("read", "f", f.reply(data=base64.b64encode(b"x" * 100).decode(), size=10, eof=True))
    with Sandbox() as sbx, pytest.raises(TransportError, match="more than the file's size"):
        sbx.files.read("f")


def test_a_file_of_size_zero_brings_one_chunk_at_most(fake: FakeJail) -> None:
    # /proc and /sys files say size 0 and have content: one chunk of it, never more.
    small = base64.b64encode(b"boot-id\n").decode()
    fake.on("read", "/proc/x", f.reply(data=small, size=0, eof=True))
    over = base64.b64encode(b"x" * (FILE_CHUNK + 1)).decode()
    fake.on("read", "/proc/y", f.reply(data=over, size=0, eof=False))
    with Sandbox() as sbx:
        assert sbx.files.read("/proc/x") == b"boot-id\n"
        with pytest.raises(TransportError, match="more than the file's size"):
            sbx.files.read("/proc/y")


def test_a_kernel_sending_past_the_disk_sizes_is_refused(fake: FakeJail) -> None:
    big = base64.b64encode(b"x" * (3 << 20)).decode()
    fake.on("read", "f", f.reply(data=big, size=1 << 40, eof=False))
    with Sandbox(Policy(disk_mb=1, tmp_mb=1, shm_mb=1)) as sbx, pytest.raises(TransportError):
        sbx.files.read("f")


@pytest.mark.parametrize(
    "answer",
    [
        {"data": "!!notbase64", "size": 3, "eof": True},
        {"data": "", "eof": True},
        {"data": "", "size": "big", "eof": True},
    ],
)
def test_malformed_read_replies_are_transport_errors(
    fake: FakeJail, answer: dict[str, object]
) -> None:
    fake.on("read", "f", f.reply(**answer))
    with Sandbox() as sbx, pytest.raises(TransportError, match="malformed"):
        sbx.files.read("f")


def test_a_malformed_entry_is_a_transport_error(fake: FakeJail) -> None:
    fake.on("walk", None, f.reply(entries=[{"name": "x"}]))
    with Sandbox() as sbx, pytest.raises(TransportError, match="malformed file entry"):
        sbx.files.list()


def test_chunks_yield_the_file_piece_by_piece(fake: FakeJail) -> None:
    data = b"y" * (FILE_CHUNK + 5)
    with Sandbox() as sbx:
        sbx.files.write("f", data)
        pieces = list(sbx.files.chunks("f"))
    assert [len(p) for p in pieces] == [FILE_CHUNK, 5]


# -- commands --------------------------------------------------------------------------------


def test_a_command_returns_its_output_and_code(fake: FakeJail) -> None:
    fake.on_command("ls -l", f.command_reply(stdout="a\n", stderr="w\n", exit_code=2))
    with Sandbox() as sbx:
        result = sbx.commands.run("ls -l")
    assert (result.stdout, result.stderr, result.exit_code, result.error) == ("a\n", "w\n", 2, None)


def test_a_command_timeout_is_reported(fake: FakeJail) -> None:
    fake.on_command("sleep 9", f.command_reply(exit_code=124, timed_out=True))
    with Sandbox() as sbx:
        result = sbx.commands.run("sleep 9", timeout=1)
    assert result.exit_code == 124 and result.error == "timed out after 1 s"
    request = next(r for r in fake.requests if r.get("op") == "command")
    assert request["timeout_s"] == 1 and request["output_bytes"] == 1 << 20


def test_command_output_is_capped_by_the_host(fake: FakeJail) -> None:
    fake.on_command("yes", f.command_reply(stdout="y" * 100, truncated=True))
    with Sandbox(Policy(output_bytes=10)) as sbx:
        result = sbx.commands.run("yes")
    assert result.stdout == "y" * 10 and result.truncated


def test_a_command_reply_without_exit_code_is_malformed(fake: FakeJail) -> None:
    fake.on_command("x", f.reply(stdout=""))
    with Sandbox() as sbx, pytest.raises(TransportError, match="malformed command reply"):
        sbx.commands.run("x")


def test_a_failed_command_is_a_sandbox_error(fake: FakeJail) -> None:
    fake.on_command("x", f.failed("OSError", 7, "argument list too long"))
    with Sandbox() as sbx, pytest.raises(SandboxError, match="argument list too long"):
        sbx.commands.run("x")


def test_command_envs_are_checked(fake: FakeJail) -> None:
    with Sandbox() as sbx, pytest.raises(PolicyError):
        sbx.commands.run("x", envs={"A=": "1"})
    assert "command" not in fake.ops()


# -- the watchdog ----------------------------------------------------------------------------


def test_the_watchdog_ends_an_idle_sandbox(fake: FakeJail) -> None:
    sbx = Sandbox(Policy(idle_timeout_s=0.01))
    sbx.last_activity -= 1
    _registry.check(sbx)
    assert not sbx.alive
    with pytest.raises(SandboxNotFound, match="idle"):
        sbx.run_code("x")
    sbx.kill()


def test_the_watchdog_ends_a_sandbox_over_its_cpu_between_runs(fake: FakeJail) -> None:
    sbx = Sandbox(Policy(cpu_s=1.0))
    fake.sandboxes[-1].launcher.tree.cpu_s = 2.0  # a thread left spinning after the run
    _registry.check(sbx)
    assert not sbx.alive and fake.sandboxes[-1].ended_limit == "cpu_limit"
    sbx.kill()


def test_the_watchdog_leaves_a_busy_sandbox_under_budget(fake: FakeJail) -> None:
    with Sandbox(Policy(idle_timeout_s=0.01, cpu_s=10)) as sbx:
        sbx.busy = True
        sbx.last_activity -= 1
        _registry.check(sbx)
        assert sbx.alive


# -- AsyncSandbox ------------------------------------------------------------------------------


def test_async_sandbox_runs_code_and_files(fake: FakeJail) -> None:
    fake.on_code("1 + 1", f.result("2"))

    async def main() -> tuple[str | None, bytes]:
        sbx = await AsyncSandbox.create()
        try:
            ex = await sbx.run_code("1 + 1")
            await sbx.files.write("a", b"z")
            return ex.text, await sbx.files.read("a")
        finally:
            await sbx.kill()

    assert asyncio.run(main()) == ("2", b"z")


def test_async_callbacks_may_be_coroutines(fake: FakeJail) -> None:
    fake.on_code("x", f.stdout("a"), f.stdout("b"))
    seen: list[str] = []

    async def on_stdout(msg: OutputMessage) -> None:
        seen.append(msg.line)

    async def main() -> None:
        sbx = await AsyncSandbox.create()
        try:
            await sbx.run_code("x", on_stdout=on_stdout)
        finally:
            await sbx.kill()

    asyncio.run(main())
    assert seen == ["a", "b"]


def test_async_errors_are_the_same_exceptions(fake: FakeJail) -> None:
    async def main() -> None:
        sbx = await AsyncSandbox.create()
        await sbx.kill()
        await sbx.run_code("x")

    with pytest.raises(SandboxNotFound):
        asyncio.run(main())
