"""The Manager: a tenant's sandboxes, quotas, and the audit record of every operation, with
a real SQLite audit log in tmp_path and scripted kernels (codecage.testing.fake)."""

from __future__ import annotations

import hashlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from codecage import Policy
from codecage._errors import (
    ApprovalDenied,
    AuditUnavailable,
    CodeRejected,
    PolicyError,
    QuotaExceeded,
    SandboxBusy,
    SandboxError,
    SandboxNotFound,
)
from codecage._sandbox import FILE_CHUNK
from codecage._service.audit import AuditLog
from codecage._service.config import Quotas, ServerConfig
from codecage._service.manager import TRANSFER_BUFFER_MB, Manager
from codecage.testing import fake as f
from codecage.testing.fake import FakeJail


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.db")
    yield log
    log.close()


def manager_with(audit: AuditLog, **quotas: Any) -> Manager:
    config = ServerConfig(db=str(audit.path), pool_size=0, quotas=Quotas(**quotas))
    return Manager(config, audit)


@pytest.fixture
def manager(audit: AuditLog) -> Iterator[Manager]:
    m = manager_with(audit)
    yield m
    m.shutdown()


def run(m: Manager, tenant: str, sid: str, code: str, **kw: Any) -> Any:
    started = m.start_execute(tenant, sid, code)
    return started.run_id, m.carry_out(started, {}, **kw)


# -- sandboxes and tenants -------------------------------------------------------------------


def test_a_tenant_sees_only_its_own_sandboxes(manager: Manager) -> None:
    a = manager.create("alice", {}, {})
    manager.create("bob", {}, {})
    assert [e.sandbox.id for e in manager.entries("alice")] == [a.sandbox.id]
    with pytest.raises(SandboxNotFound, match="no sandbox"):
        manager.get("bob", a.sandbox.id)
    with pytest.raises(SandboxNotFound):
        manager.delete("bob", a.sandbox.id)
    assert a.sandbox.alive


def test_overrides_apply_within_the_ceiling(manager: Manager) -> None:
    entry = manager.create("alice", {"memory_mb": 1024}, {})
    assert entry.sandbox.policy.memory_mb == 1024
    with pytest.raises(PolicyError):
        manager.create("alice", {"memory_mb": 1 << 20}, {})


def test_delete_kills_the_sandbox(manager: Manager, fake: FakeJail) -> None:
    entry = manager.create("alice", {}, {})
    manager.delete("alice", entry.sandbox.id)
    assert not entry.sandbox.alive and entry.sandbox.id in fake.released
    with pytest.raises(SandboxNotFound):
        manager.get("alice", entry.sandbox.id)


def test_an_ended_sandbox_says_why_once(manager: Manager) -> None:
    entry = manager.create("alice", {}, {})
    entry.sandbox._jailed.end("it was idle for too long")
    with pytest.raises(SandboxNotFound, match="idle for too long"):
        manager.get("alice", entry.sandbox.id)
    with pytest.raises(SandboxNotFound, match="no sandbox"):
        manager.get("alice", entry.sandbox.id)


def test_shutdown_kills_every_sandbox(audit: AuditLog, fake: FakeJail) -> None:
    m = manager_with(audit)
    entries = [m.create(t, {}, {}) for t in ("a", "b", "c")]
    m.shutdown()
    assert not any(e.sandbox.alive for e in entries) and not fake.live()


# -- quotas ----------------------------------------------------------------------------------


def test_the_live_sandbox_quota(audit: AuditLog) -> None:
    m = manager_with(audit, live_sandboxes=2)
    try:
        m.create("alice", {}, {})
        m.create("alice", {}, {})
        with pytest.raises(QuotaExceeded, match="2 live sandboxes"):
            m.create("alice", {}, {})
        m.create("bob", {}, {})  # per tenant
    finally:
        m.shutdown()


def test_a_dead_sandbox_frees_its_place(audit: AuditLog) -> None:
    m = manager_with(audit, live_sandboxes=1)
    try:
        first = m.create("alice", {}, {})
        first.sandbox.kill()
        m.create("alice", {}, {})
    finally:
        m.shutdown()


def test_one_shot_runs_count_as_live_sandboxes(audit: AuditLog) -> None:
    m = manager_with(audit, live_sandboxes=1)
    try:
        with m.oneshot("alice"):
            with pytest.raises(QuotaExceeded):
                m.create("alice", {}, {})
            with pytest.raises(QuotaExceeded), m.oneshot("alice"):
                pass
        m.create("alice", {}, {})
    finally:
        m.shutdown()


def test_the_runs_per_minute_quota(audit: AuditLog) -> None:
    m = manager_with(audit, runs_per_minute=2)
    try:
        sid = m.create("alice", {}, {}).sandbox.id
        run(m, "alice", sid, "a")
        run(m, "alice", sid, "b")
        with pytest.raises(QuotaExceeded, match="runs per minute"):
            m.begin("alice", sid, "execute", "c", Policy())
        m.begin("bob", None, "run", "c", Policy())  # per tenant
    finally:
        m.shutdown()


def test_the_sandbox_queue_is_short(audit: AuditLog) -> None:
    m = manager_with(audit, sandbox_queue=2)
    try:
        entry = m.create("alice", {}, {})
        m.enter(entry)
        m.enter(entry)
        with pytest.raises(SandboxBusy, match="sandbox_queue"):
            m.enter(entry)
        m.leave(entry)
        m.enter(entry)
    finally:
        m.shutdown()


def test_transfer_buffers_are_a_tenant_quota(audit: AuditLog) -> None:
    m = manager_with(audit, transfer_buffer_mb=TRANSFER_BUFFER_MB)
    try:
        sid = m.create("alice", {}, {}).sandbox.id
        m.upload("alice", sid, "a", b"1")  # one at a time fits
        with m.uploading("alice", sid, "b") as sink:
            sink.write(b"2")
            with pytest.raises(QuotaExceeded, match="transfer_buffer_mb"):
                m.upload("alice", sid, "c", b"3")
    finally:
        m.shutdown()


def test_file_operations_go_through_the_manager(manager: Manager) -> None:
    entry = manager.create("alice", {}, {})
    sid, seen = entry.sandbox.id, []
    listing = entry.sandbox.files.list

    def watched(path: str, depth: int = 1) -> Any:
        seen.append((entry.queued, manager._busy))  # a queue place, and a shutdown waits
        return listing(path, depth=depth)

    entry.sandbox.files.list = watched  # type: ignore[method-assign]
    assert manager.make_dir("alice", sid, "d") is True
    manager.upload("alice", sid, "d/a", b"1")
    assert manager.exists("alice", sid, "d/a") is True
    assert [e.name for e in manager.list_files("alice", sid, "d")] == ["a"]
    manager.remove("alice", sid, "d/a")
    assert manager.exists("alice", sid, "d/a") is False
    assert seen == [(1, 1)] and entry.queued == 0 and manager._busy == 0
    with pytest.raises(SandboxNotFound):
        manager.list_files("bob", sid, "d")


# -- the audit record ------------------------------------------------------------------------


def test_a_run_is_recorded_with_the_hosts_outcome(manager: Manager, fake: FakeJail) -> None:
    fake.on_code("x", f.stdout("hi\n"), f.Reading(memory_peak_bytes=64 << 20))
    sid = manager.create("alice", {}, {}).sandbox.id
    run_id, _ = run(manager, "alice", sid, "x")
    row = manager.audit.run(run_id)
    assert row is not None
    assert (row["tenant"], row["sandbox_id"], row["kind"], row["code"]) == (
        "alice",
        sid,
        "execute",
        "x",
    )
    assert row["code_sha256"] == hashlib.sha256(b"x").hexdigest()
    assert row["status"] == "completed" and row["outcome"] == "ok"
    assert row["output"] == "hi\n" and row["peak_memory_mb"] == 64
    assert row["policy"]["memory_mb"] == 512


def test_an_error_is_recorded_by_name(manager: Manager, fake: FakeJail) -> None:
    fake.on_code("1/0", f.error("ZeroDivisionError", "division by zero"))
    sid = manager.create("alice", {}, {}).sandbox.id
    run_id, _ = run(manager, "alice", sid, "1/0")
    row = manager.audit.run(run_id)
    assert row is not None and (row["outcome"], row["error_name"]) == ("error", "ZeroDivisionError")


def test_a_kill_is_recorded_with_the_limit(manager: Manager, fake: FakeJail) -> None:
    fake.on_code("big", f.Reading(oom_kills=1), f.Die(signal=signal.SIGKILL))
    sid = manager.create("alice", {}, {}).sandbox.id
    run_id, _ = run(manager, "alice", sid, "big")
    row = manager.audit.run(run_id)
    assert row is not None
    assert (row["outcome"], row["killed_by"]) == ("killed", "memory_limit")
    assert row["limits_hit"] == ["memory_limit"]


def test_the_kernels_claims_are_kept_apart(manager: Manager, fake: FakeJail) -> None:
    fake.on_code("x", f.end(execution_count=41))
    sid = manager.create("alice", {}, {}).sandbox.id
    run_id, _ = run(manager, "alice", sid, "x")
    row = manager.audit.run(run_id)
    assert row is not None and row["claims"] == {"execution_count": 41, "exit_code": None}


def test_truncated_output_is_recorded(manager: Manager, fake: FakeJail) -> None:
    fake.on_code("x", f.stdout("y" * 50))
    sid = manager.create("alice", {"output_bytes": 10}, {}).sandbox.id
    run_id, _ = run(manager, "alice", sid, "x")
    row = manager.audit.run(run_id)
    assert row is not None and row["output"] == "y" * 10 and row["output_truncated"]


def test_a_run_that_raises_is_recorded_as_failed(manager: Manager, fake: FakeJail) -> None:
    fake.on_code("evil", f.Frame({"ev": "stdout", "id": "forged", "text": ""}))
    sid = manager.create("alice", {}, {}).sandbox.id
    started = manager.start_execute("alice", sid, "evil")
    run_id = started.run_id
    with pytest.raises(SandboxNotFound):
        manager.carry_out(started, {})
    row = manager.audit.run(run_id)
    assert row is not None and (row["outcome"], row["error_name"]) == ("failed", "SandboxNotFound")


def test_blocked_code_is_recorded_as_rejected(manager: Manager, fake: FakeJail) -> None:
    sid = manager.create("alice", {"analysis_block_at": "high"}, {}).sandbox.id
    started = manager.start_execute("alice", sid, "import subprocess")
    run_id = started.run_id
    with pytest.raises(CodeRejected):
        manager.carry_out(started, {})
    row = manager.audit.run(run_id)
    assert row is not None and row["outcome"] == "rejected" and fake.ran() == []


def test_a_denied_run_is_recorded_with_its_approval(manager: Manager, fake: FakeJail) -> None:
    sid = manager.create("alice", {"approval_findings_at": "high"}, {}).sandbox.id
    started = manager.start_execute("alice", sid, "import subprocess")
    run_id = started.run_id
    worker, raised = in_thread(manager.carry_out, started, {})
    try:
        while not manager.approvals.pending("alice"):
            threading.Event().wait(0.005)
        pending = manager.approvals.pending("alice")[0]
        assert pending.run_id == run_id and pending.tenant == "alice"
        manager.approvals.decide(pending.id, False, "ops", "no", "alice")
    finally:
        manager.approvals.deny_all("test", "over")
        worker.join(10)
    assert isinstance(raised[0], ApprovalDenied)
    row = manager.audit.run(run_id)
    assert row is not None and row["outcome"] == "denied" and fake.ran() == []
    decided = manager.audit.approvals(tenant="alice")
    assert (decided[-1]["approved"], decided[-1]["decided_by"]) == (False, "ops")
    assert decided[-1]["run_id"] == run_id and row["approval"]["by"] == "ops"


def test_another_tenant_cannot_answer_an_approval(manager: Manager) -> None:
    from codecage._errors import ApprovalNotFound

    sid = manager.create("alice", {"approval_commands": True}, {}).sandbox.id
    worker, raised = in_thread(manager.command, "alice", sid, "ls", None, {})
    try:
        while not manager.approvals.pending("alice"):
            threading.Event().wait(0.005)
        pending = manager.approvals.pending("alice")[0]
        assert manager.approvals.pending("bob") == []
        with pytest.raises(ApprovalNotFound):
            manager.approvals.decide(pending.id, True, "mallory", tenant="bob")
    finally:
        manager.approvals.deny_all("test", "over")
        worker.join(10)
    assert isinstance(raised[0], ApprovalDenied)  # denied at the end, never approved
    assert manager.audit.runs(tenant="alice")[-1]["outcome"] == "denied"


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, list[BaseException | None]]:
    raised: list[BaseException | None] = []

    def call() -> None:
        try:
            fn(*args)
            raised.append(None)
        except BaseException as exc:
            raised.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    return worker, raised


def test_a_command_is_recorded(manager: Manager, fake: FakeJail) -> None:
    fake.on_command("ls", f.command_reply(stdout="a\n", exit_code=3))
    sid = manager.create("alice", {}, {}).sandbox.id
    result = manager.command("alice", sid, "ls", None, {})
    assert result.exit_code == 3
    row = manager.audit.runs(tenant="alice", sandbox_id=sid)[-1]
    assert (row["kind"], row["code"], row["output"]) == ("command", "ls", "a\n")
    assert row["claims"]["exit_code"] == 3


def test_a_command_timeout_is_a_limit_in_the_record(manager: Manager, fake: FakeJail) -> None:
    fake.on_command("sleep", f.command_reply(exit_code=124, timed_out=True))
    sid = manager.create("alice", {}, {}).sandbox.id
    manager.command("alice", sid, "sleep", 1, {})
    assert manager.audit.runs(tenant="alice")[-1]["limits_hit"] == ["timeout"]


def test_an_upload_is_recorded_as_the_host_saw_it(manager: Manager, fake: FakeJail) -> None:
    sid = manager.create("alice", {}, {}).sandbox.id
    data = b"z" * (FILE_CHUNK + 3)
    info = manager.upload("alice", sid, "up.bin", data)
    assert info.size == len(data)
    assert fake.sandboxes[-1].launcher.files["/home/user/up.bin"] == data
    row = manager.audit.runs(tenant="alice", sandbox_id=sid)[-1]
    assert row["kind"] == "file_upload"
    assert row["files"] == [
        {
            "direction": "upload",
            "path": "up.bin",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    ]


def test_an_aborted_upload_leaves_no_partial_file(manager: Manager, fake: FakeJail) -> None:
    sid = manager.create("alice", {}, {}).sandbox.id
    with pytest.raises(RuntimeError), manager.uploading("alice", sid, "part") as sink:
        sink.write(b"x" * (FILE_CHUNK + 1))  # one chunk already sent
        raise RuntimeError("client went away")
    assert "/home/user/part" not in fake.sandboxes[-1].launcher.files
    assert manager.audit.runs(tenant="alice")[-1]["outcome"] == "failed"


def test_a_download_is_recorded_with_its_digest(manager: Manager, fake: FakeJail) -> None:
    sid = manager.create("alice", {}, {}).sandbox.id
    fake.sandboxes[-1].launcher.files["/home/user/out.txt"] = b"result"
    assert b"".join(manager.download("alice", sid, "out.txt")) == b"result"
    row = manager.audit.runs(tenant="alice", sandbox_id=sid)[-1]
    assert row["files"][0]["sha256"] == hashlib.sha256(b"result").hexdigest()
    assert row["outcome"] == "ok"


def test_a_download_closed_early_is_recorded_failed(manager: Manager, fake: FakeJail) -> None:
    sid = manager.create("alice", {}, {}).sandbox.id
    fake.sandboxes[-1].launcher.files["/home/user/big"] = b"q" * (2 * FILE_CHUNK)
    chunks = manager.download("alice", sid, "big")
    next(chunks)
    chunks.close()
    assert manager.audit.runs(tenant="alice")[-1]["outcome"] == "failed"


def test_a_missing_download_is_recorded_failed(manager: Manager) -> None:
    from codecage._errors import FileNotFoundInSandbox

    sid = manager.create("alice", {}, {}).sandbox.id
    with pytest.raises(FileNotFoundInSandbox):
        next(manager.download("alice", sid, "nope"))
    row = manager.audit.runs(tenant="alice")[-1]
    assert (row["outcome"], row["error_name"]) == ("failed", "FileNotFoundInSandbox")


def test_a_one_shot_run_is_recorded(manager: Manager, fake: FakeJail) -> None:
    fake.on_code("print(2)", f.stdout("2\n"))
    started = manager.start_run("alice", "print(2)", {})
    run_id = started.run_id
    ex = manager.carry_out(started, {})
    assert ex.exit_code == 0
    row = manager.audit.run(run_id)
    assert row is not None and (row["kind"], row["sandbox_id"], row["output"]) == (
        "run",
        None,
        "2\n",
    )
    assert not fake.live()


def samples(registry: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_runs_by_outcome(manager: Manager, fake: FakeJail) -> None:
    fake.on_code("1/0", f.error("ZeroDivisionError"))
    sid = manager.create("alice", {}, {}).sandbox.id
    run(manager, "alice", sid, "x")
    run(manager, "alice", sid, "1/0")
    got = samples(manager.metrics.registry)
    labels = {"kind": "execute", "killed_by": ""}
    assert got["codecage_runs_total", frozenset({**labels, "outcome": "ok"}.items())] == 1
    assert got["codecage_runs_total", frozenset({**labels, "outcome": "error"}.items())] == 1
    assert got["codecage_sandboxes_live", frozenset()] == 1


def test_memory_metrics_are_the_trees_readings(manager: Manager, fake: FakeJail) -> None:
    entry = manager.create("alice", {}, {})
    manager.create("alice", {}, {})
    fake.sandboxes[0].launcher.tree.memory_now = 5 << 20
    fake.sandboxes[1].launcher.tree.memory_now = 1 << 20
    assert (
        samples(manager.metrics.registry)["codecage_sandboxes_memory_bytes", frozenset()] == 6 << 20
    )
    each = samples(manager.metrics.detail)
    key = frozenset({"sandbox": entry.sandbox.id, "tenant": "alice"}.items())
    assert each["codecage_sandbox_memory_bytes", key] == 5 << 20


def test_the_code_size_rule_is_the_services_own(audit: AuditLog, fake: FakeJail) -> None:
    """`max_code_bytes` bounds the code itself (UTF-8 bytes), for cells and one-shot runs
    alike, not only the body that carries it."""
    config = ServerConfig(db=str(audit.path), pool_size=0, max_code_bytes=10)
    m = Manager(config, audit)
    try:
        sid = m.create("alice", {}, {}).sandbox.id
        m.carry_out(m.start_execute("alice", sid, "x = 12345"), {})  # 9 bytes: fits
        with pytest.raises(PolicyError, match="11 bytes, more than the 10"):
            m.start_execute("alice", sid, "x = 1234é.")  # é is two bytes
        with pytest.raises(PolicyError, match="more than the 10"):
            m.start_run("alice", "print(123456)", {})
        assert len(m.audit.runs(tenant="alice")) == 1  # the refused ones never began
    finally:
        m.shutdown()


def test_every_file_operation_is_recorded(manager: Manager) -> None:
    sid = manager.create("alice", {}, {}).sandbox.id
    manager.upload("alice", sid, "a.txt", b"hi")
    assert [e.name for e in manager.list_files("alice", sid, ".")] == ["a.txt"]
    assert manager.exists("alice", sid, "a.txt")
    assert manager.make_dir("alice", sid, "d")
    manager.remove("alice", sid, "a.txt")
    with pytest.raises(SandboxError):
        manager.list_files("alice", sid, "a.txt/x")
    rows = manager.audit.runs(tenant="alice")
    got = [(r["kind"], r["code"], r["outcome"]) for r in rows]
    assert got == [
        ("file_upload", "a.txt", "ok"),
        ("file_list", ".", "ok"),
        ("file_exists", "a.txt", "ok"),
        ("file_mkdir", "d", "ok"),
        ("file_remove", "a.txt", "ok"),
        ("file_list", "a.txt/x", "failed"),
    ]


def test_below_the_audit_floor_nothing_reaches_the_kernel(tmp_path: Path, fake: FakeJail) -> None:
    log = AuditLog(tmp_path / "audit.db", min_free_bytes=1 << 62)
    m = Manager(ServerConfig(db=str(log.path), pool_size=0), log)
    try:
        sid = m.create("alice", {}, {}).sandbox.id
        with pytest.raises(AuditUnavailable, match="floor"):
            m.start_execute("alice", sid, "open('ran', 'w').write('x')")
        with pytest.raises(AuditUnavailable, match="floor"):
            m.exists("alice", sid, "ran")
        assert fake.ran() == [] and m.audit.runs(tenant="alice") == []
    finally:
        m.shutdown()
        log.close()


# -- pause and resume (docs/pause.md) ----------------------------------------------------------


def test_a_pause_stops_the_lifetime_and_counts_against_the_paused_quota(audit: AuditLog) -> None:
    import time

    from codecage._errors import SandboxPaused

    m = manager_with(audit, paused_sandboxes=1)
    try:
        one = m.create("alice", {}, {}, lifetime_s=30)
        two = m.create("alice", {}, {})
        bobs = m.create("bob", {}, {})
        ends = one.expires_at
        m.pause("alice", one.sandbox.id)
        assert one.sandbox.paused and one.sandbox._jailed.launcher.tree.frozen  # type: ignore[attr-defined]
        assert not one.expired(time.time() + 60)  # its lifetime stands still
        with pytest.raises(SandboxPaused):
            m.pause("alice", one.sandbox.id)
        with pytest.raises(QuotaExceeded, match="paused_sandboxes"):
            m.pause("alice", two.sandbox.id)
        m.pause("bob", bobs.sandbox.id)  # another tenant's quota is its own
        with pytest.raises(SandboxNotFound):
            m.resume("bob", one.sandbox.id)  # another tenant's: the same as none
        time.sleep(0.2)
        entry, resumed = m.resume("alice", one.sandbox.id)
        assert resumed and not entry.sandbox.paused
        assert entry.expires_at is not None and ends is not None
        assert entry.expires_at - ends >= 0.2  # moved on by the time it was paused
        assert m.resume("alice", one.sandbox.id)[1] is False  # running: nothing to do
        kinds = [r["kind"] for r in audit.runs(sandbox_id=one.sandbox.id)]
        assert kinds == ["sandbox_pause", "sandbox_resume"]
    finally:
        m.shutdown()


def test_auto_pause_pauses_at_the_lifetimes_end_and_a_resume_gives_it_again(
    manager: Manager,
) -> None:
    import time

    entry = manager.create("alice", {}, {}, lifetime_s=0.3)
    entry.on_timeout = "pause"
    deadline = time.monotonic() + 5
    while entry.paused_at is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert entry.paused_at is not None and entry.sandbox.alive  # paused, not killed
    assert manager.get("alice", entry.sandbox.id) is entry  # still there to be resumed
    manager.resume("alice", entry.sandbox.id)
    assert entry.expires_at is not None and entry.expires_at > time.time()  # a new lifetime
    plain = manager.create("alice", {}, {}, lifetime_s=0.3)
    deadline = time.monotonic() + 5
    while plain.sandbox.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not plain.sandbox.alive  # positive control: without autoPause the end kills it
