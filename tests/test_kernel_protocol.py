"""The kernel shares its process with user code, so code can read the run id and write any
frame on the kernel's channel. The host must still decide for itself when a run ended,
never take a host-only event from a kernel, budget every byte it reads, and report a dead
kernel or a limit hit mid-run as a value. Each probe has a positive control: the same
forged frame, of a kind the host does take from a kernel, is taken (so the run id and the
channel the code found are the real ones)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

import codecage
from codecage import Policy, Sandbox, SandboxNotFound
from codecage.testing import policy
from codecage.tools import render

from .conftest import Service

pytestmark = [pytest.mark.requires_root, pytest.mark.every_backend]

# What any cell can find in its own process: the kernel's channel and the current run id.
FIND = (
    "import gc, threading, time\n"
    "objs = gc.get_objects()\n"
    "ch = [o for o in objs if type(o).__name__ == 'Channel'][0]\n"
    "rid = [o for o in objs if type(o).__name__ == 'Output'][0].run_id\n"
    "del objs\n"
)
CONTROL = "ch.send(ev='stdout', id=rid, text='forged-but-taken\\n')\n"


def events_of(sbx: Sandbox, code: str) -> tuple[codecage.Execution, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    return sbx._run(code, on_event=seen.append), seen


# -- item: the end of a run is the host's finding -------------------------------------------


# Conformance: on every backend where the host can read the kernel's /proc/PID/syscall (on
# gvisor the sentry hides the guest, and the end is the sandbox's claim: docs/threat-model.md).
WHERE_THE_HOST_LOOKS = pytest.mark.backends("namespace", "bwrap", "container")


@WHERE_THE_HOST_LOOKS
@pytest.mark.usefixtures("backend")
def test_a_forged_end_from_the_main_thread_does_not_end_the_run() -> None:
    with Sandbox(policy(timeout_s=30)) as sbx:
        ex, seen = events_of(
            sbx,
            FIND + CONTROL + "ch.send(ev='end', id=rid, execution_count=99, exit_code=0,"
            " truncated=False)\n"
            "t0 = time.monotonic()\nwhile time.monotonic() - t0 < 1.5: pass\n"
            "print('real work done')\n'final'",
        )
        assert "forged-but-taken\n" in ex.logs.stdout  # control: id and channel are real
        assert "real work done\n" in ex.logs.stdout and ex.text == "'final'"
        assert ex.duration_ms >= 1500 and ex.execution_count == 1
        assert [e["ev"] for e in seen].count("end") == 1 and seen[-1]["ev"] == "end"
        assert sbx.run_code("1 + 1").text == "2"


@WHERE_THE_HOST_LOOKS
@pytest.mark.usefixtures("backend")
def test_a_forged_end_from_a_thread_does_not_end_the_run_nor_move_killed_by() -> None:
    with Sandbox(policy(timeout_s=2, interrupt_grace_s=0.5)) as sbx:
        # the imports and the object walk once before the timed run (a loaded host took
        # more than its 2 s to reach the control)
        assert sbx.run_code(FIND + "len([rid])").text == "1"
        started = time.monotonic()
        ex = sbx.run_code(
            FIND + CONTROL + "def forge():\n"
            "    for _ in range(20):\n"
            "        ch.send(ev='end', id=rid, execution_count=1, exit_code=0, truncated=False)\n"
            "        time.sleep(0.05)\n"
            "threading.Thread(target=forge).start()\n"
            "time.sleep(10**6)"
        )
        assert "forged-but-taken\n" in ex.logs.stdout
        assert time.monotonic() - started >= 2 and ex.killed_by == "timeout"  # this run's
        innocent = sbx.run_code("1 + 1")
        assert innocent.text == "2" and innocent.killed_by is None and innocent.error is None


def test_a_forged_pending_approval_never_reaches_the_callbacks() -> None:
    sbx = Sandbox(Policy(timeout_s=30))
    try:
        ex, seen = events_of(sbx, FIND + CONTROL)
        assert ex.logs.stdout == ["forged-but-taken\n"]  # the control: a kernel event is taken
        seen.clear()
        with pytest.raises(SandboxNotFound, match="broke the protocol"):
            sbx._run(
                FIND + "ch.send(ev='pending_approval', id=rid, approval={'id': 'fake'})\n"
                "time.sleep(5)",
                on_event=seen.append,
            )
        assert all(e.get("ev") != "pending_approval" for e in seen)
        with pytest.raises(SandboxNotFound):
            sbx.run_code("1")
    finally:
        sbx.kill()


def test_a_forged_pending_approval_never_reaches_the_ndjson_stream(
    service: Service, alice: codecage.Client
) -> None:
    with alice.Sandbox(Policy(timeout_s=30)) as sbx:
        for code, forged in ((FIND + CONTROL, False), (FIND + "ch.send(ev='pending_approval',"
                             " id=rid, approval={'id': 'fake'})\ntime.sleep(5)", True)):  # fmt: skip
            with alice._http.stream(
                "POST",
                f"/v1/sandboxes/{sbx.id}/execute",
                json={"code": code},
                headers={"Accept": "application/x-ndjson"},
                timeout=90,
            ) as response:
                lines = [json.loads(line) for line in response.iter_lines() if line]
            assert all(line["ev"] != "pending_approval" for line in lines)
            if forged:
                assert lines[-1]["ev"] == "failed" and "protocol" in lines[-1]["message"]
            else:  # control: the stream carries what the kernel may send
                assert {"ev": "stdout", "text": "forged-but-taken\n"} in lines


# -- item: every byte on the channel is budgeted ---------------------------------------------


def test_a_frame_for_no_run_of_the_host_ends_the_sandbox() -> None:
    sbx = Sandbox(Policy(timeout_s=30))
    try:
        ex = sbx.run_code(FIND + CONTROL)
        assert ex.logs.stdout == ["forged-but-taken\n"]
        with pytest.raises(SandboxNotFound, match="no run or request"):
            sbx.run_code(
                FIND + "ch.send(ev='stdout', id='0123456789abcdef', text='x')\ntime.sleep(5)"
            )
        assert not sbx.alive
    finally:
        sbx.kill()


@pytest.mark.parametrize("ev", ["error", "nonsense"])
def test_frames_the_host_does_not_keep_still_count(ev: str) -> None:
    """Error frames (only the last is kept) and unknown events cost the host a parse each:
    either the first ends the sandbox (an event a kernel never sends) or the budget does."""
    sbx = Sandbox(Policy(output_bytes=1000, results_bytes=1000, timeout_s=120))
    try:
        ex = sbx.run_code(
            FIND + "ch.send(ev='error', id=rid, name='Forged', value='', traceback='')"
        )
        assert ex.error is not None and ex.error.name == "Forged"  # control: it is taken
        with pytest.raises(SandboxNotFound, match=r"far beyond its budget|broke the protocol"):
            sbx.run_code(
                FIND + "blob = 'e' * 60000\n"
                f"while True:\n    ch.send(ev={ev!r}, id=rid, name='E', value=blob, traceback='')\n"
            )
        assert not sbx.alive
    finally:
        sbx.kill()


def test_frames_of_an_ended_run_count_against_the_next() -> None:
    sbx = Sandbox(Policy(output_bytes=1000, results_bytes=1000, timeout_s=120))
    try:
        sbx.run_code(
            FIND + "def flood(rid=rid):\n"  # the id of this run, stale once it ended
            "    blob = 'x' * 60000\n"
            "    while True:\n        ch.send(ev='stdout', id=rid, text=blob)\n"
            "threading.Thread(target=flood, daemon=True).start()"
        )
        with pytest.raises(SandboxNotFound, match="far beyond its budget"):
            sbx.run_code("import time\ntime.sleep(100)")  # the host reads, and counts, it all
        assert not sbx.alive
    finally:
        sbx.kill()


# -- item: a dead kernel is an error value ---------------------------------------------------


def test_a_cell_that_ends_the_interpreter_is_an_error() -> None:
    with Sandbox() as sbx:
        sbx.run_code("x = 1")
        ex = sbx.run_code("import os\nos._exit(3)")
        assert ex.error is not None and ex.error.name == "KernelDied"
        assert "exit code 3" in ex.error.value and "lost" in ex.error.value
        assert ex.exit_code == 3 and ex.state_lost and ex.killed_by is None
        out = render(ex)
        assert out.is_error and "KernelDied" in out.text and "exit code 3" in out.text
        ex = sbx.run_code("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
        assert ex.error is not None and ex.error.name == "KernelDied"
        assert "SIGSEGV" in ex.error.value and ex.killed_by == "signal"
        ex = sbx.run_code("x")  # the state is gone, as the error said
        assert ex.error is not None and ex.error.name == "NameError"


def test_a_program_that_exits_is_its_exit_code_not_an_error() -> None:
    ex = codecage.run("import os\nos._exit(3)")  # main mode: a program's own exit status
    assert ex.exit_code == 3 and ex.error is None


def test_a_dead_kernel_is_an_error_in_the_service(service: Service, alice: codecage.Client) -> None:
    with alice.Sandbox() as sbx:
        ex = sbx.run_code("import os\nos._exit(3)")  # the JSON answer
        assert ex.error is not None and ex.error.name == "KernelDied" and ex.state_lost
        assert "exit code 3" in ex.error.value
        with alice._http.stream(
            "POST",
            f"/v1/sandboxes/{sbx.id}/execute",
            json={"code": "import os\nos._exit(4)"},
            headers={"Accept": "application/x-ndjson"},
            timeout=90,
        ) as response:
            lines = [json.loads(line) for line in response.iter_lines() if line]
        error = lines[-1]["execution"]["error"]
        assert error["name"] == "KernelDied" and "exit code 4" in error["value"]


# -- item: a limit hit mid-run is a value on that run ----------------------------------------

SPIN = (
    "import threading, time\n"
    "def spin():\n    while True: pass\n"
    "threading.Thread(target=spin, daemon=True).start()\n"
    "time.sleep(60)"
)


def test_a_cpu_budget_spent_by_a_thread_is_a_value_then_the_sandbox_has_ended() -> None:
    sbx = Sandbox(Policy(cpu_s=1, timeout_s=120))
    try:
        ex = sbx.run_code(SPIN)
        assert ex.killed_by == "cpu_limit" and "cpu_limit" in ex.limits_hit
        assert ex.error is not None and ex.error.name == "CpuLimitExceeded" and ex.state_lost
        with pytest.raises(SandboxNotFound, match="cpu_s"):
            sbx.run_code("1")
    finally:
        sbx.kill()


def test_the_watchdog_ending_a_sandbox_mid_run_is_the_runs_value() -> None:
    """Under load the watchdog (every 0.5 s) may see the budget spent before the run's own
    check does: it ends the sandbox from its thread, and the run must still return."""
    from codecage._sandbox import _registry

    sbx = Sandbox(Policy(cpu_s=1, timeout_s=120))
    try:
        result: list[codecage.Execution] = []
        runner = threading.Thread(target=lambda: result.append(sbx.run_code(SPIN)))
        runner.start()
        while runner.is_alive() and sbx._jailed.alive:
            if sbx._jailed.usage().cpu_s > 1:
                _registry.check(sbx)  # what the watchdog does, now
            time.sleep(0.01)
        runner.join(60)
        [ex] = result
        assert ex.killed_by == "cpu_limit" and ex.error is not None
        assert ex.error.name == "CpuLimitExceeded"
        with pytest.raises(SandboxNotFound):
            sbx.run_code("1")
    finally:
        sbx.kill()


def test_a_limit_ending_the_sandbox_during_a_run_is_returned() -> None:
    """The class of it: whatever ends the sandbox for a limit while a run waits (here the
    run's code only sleeps, so only the outside can end it), the run returns the limit."""
    sbx = Sandbox(Policy(timeout_s=120))
    try:
        result: list[codecage.Execution] = []
        running = threading.Event()
        code = "import time\nprint('a')\ntime.sleep(60)"
        runner = threading.Thread(
            target=lambda: result.append(sbx.run_code(code, on_stdout=lambda m: running.set()))
        )
        runner.start()
        assert running.wait(60)
        sbx._jailed.terminate("it used its cpu_s budget", "cpu_limit")
        runner.join(60)
        [ex] = result
        assert ex.killed_by == "cpu_limit" and ex.state_lost
        with pytest.raises(SandboxNotFound):
            sbx.run_code("1")
    finally:
        sbx.kill()


@pytest.mark.usefixtures("backend")
def test_an_interrupt_outside_the_cells_code_still_ends_the_run_as_a_run() -> None:
    """A SIGINT can land in the kernel's own code around a cell (flushing, sending its
    end): the run ends with KeyboardInterrupt, and the kernel never answers a run with a
    request's `failed` reply, which the host would take for a protocol violation."""
    with Sandbox(policy(timeout_s=30)) as sbx:
        ex = sbx.run_code(
            FIND + CONTROL + "real = ch.put\n"
            "def put(message):\n"
            "    if message.get('ev') == 'end':\n"
            "        ch.put = real  # once: as if the interrupt came while the end was sent\n"
            "        raise KeyboardInterrupt\n"
            "    real(message)\n"
            "ch.put = put\n"
        )
        assert ex.logs.stdout == ["forged-but-taken\n"]  # control: the kernel's own channel
        assert ex.error is not None and ex.error.name == "KeyboardInterrupt", ex.error
        assert sbx.alive and sbx.run_code("1 + 1").text == "2"


@pytest.mark.usefixtures("backend")
def test_forged_error_events_are_paid_from_the_output_budget() -> None:
    """A kernel sends one error per run; code that writes thousands on the kernel's channel
    gets them past the callbacks only within the output budget (the first is free)."""
    with Sandbox(policy(timeout_s=60, output_bytes=10_000)) as sbx:
        seen: list[int] = []
        ex = sbx._run(
            FIND + CONTROL + "for i in range(2000):\n"
            "    ch.send(ev='error', id=rid, name='Forged', value=str(i) + 'x' * 1000, traceback='')\n",
            on_event=lambda e: seen.append(len(str(e))) if e.get("ev") == "error" else None,
        )
        assert ex.logs.stdout == ["forged-but-taken\n"]  # control: the kernel's own channel
        assert 1 <= len(seen) <= 11, len(seen)  # the first, then what 10,000 bytes pay for
        assert ex.truncated and "output_limit" in ex.limits_hit
        assert sbx.run_code("1 + 1").text == "2"
