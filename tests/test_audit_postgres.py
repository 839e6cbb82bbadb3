"""The audit log in PostgreSQL: a real server on loopback (codecage._cluster.postgres), a
real service with `--db postgresql://...`. The same promises as SQLite's: the start row is
durable before the run, the completion before the answer, an unreachable database is a
503 with nothing run; rows carry their node, and a node's restart marks only its own."""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from codecage._cluster import postgres
from codecage._errors import AuditUnavailable
from codecage._service.audit import MIGRATIONS, AuditLog

from .conftest import cli, start_service, stop_service


def start(log: AuditLog, run_id: str, code: str = "1") -> None:
    log.start_run(run_id=run_id, tenant="alice", sandbox_id=None, kind="run", code=code, policy={})


@pytest.fixture
def own_server() -> Iterator[postgres.Server]:
    """A server of this test's own, to stop and start again."""
    where = Path(tempfile.mkdtemp(prefix="codecage-pg-"))
    try:
        yield postgres.start(where)
    finally:
        postgres.stop(where)
        shutil.rmtree(where, ignore_errors=True)


def test_the_schema_is_migrated_once_and_is_the_same(postgres_url: str) -> None:
    """Every migration applied (the version says so), the tables SQLite has, and a second
    opening (another front end) changes nothing; times keep their sub-second digits."""
    with contextlib.closing(AuditLog(postgres_url)) as log:
        start(log, "r1")
        (row,) = log.runs()
    with contextlib.closing(AuditLog(postgres_url)) as again:
        assert [r["id"] for r in again.runs()] == ["r1"]
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM codecage_schema").fetchall() == [
            (len(MIGRATIONS),)
        ]
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        }
        kind = conn.execute(
            "SELECT data_type FROM information_schema.columns"
            " WHERE table_name = 'runs' AND column_name = 'started_at'"
        ).fetchone()
    assert tables == {"runs", "api_keys", "approvals", "packages", "run_images", "codecage_schema"}
    assert kind == ("double precision",)  # REAL (4 bytes) would be minutes off
    assert abs(row["started_at"] - time.time()) < 60 and row["started_at"] % 1 != 0


def test_front_ends_that_start_at_once_migrate_once(postgres_url: str) -> None:
    """Several processes opening a new database together: one migrates, the others wait
    for it (an advisory lock), none fails."""
    errors: list[BaseException] = []
    logs: list[AuditLog] = []

    def open_one() -> None:
        try:
            logs.append(AuditLog(postgres_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    assert errors == [] and len(logs) == 6


def test_text_postgres_cannot_hold_is_stored_replaced(postgres_url: str) -> None:
    """PostgreSQL refuses NUL in text (the positive control); the log stores U+FFFD."""
    with psycopg.connect(postgres_url) as conn, pytest.raises(psycopg.DataError):
        conn.execute("SELECT %s::text", ("a\x00b",))
    with contextlib.closing(AuditLog(postgres_url)) as log:
        start(log, "r1", code="print('\x00')")
        log.complete_run("r1", outcome="ok", output="a\x00b", error_name="E\x00")
        (row,) = log.runs()
    assert row["code"] == "print('\ufffd')" and row["output"] == "a\ufffdb"
    assert row["status"] == "completed" and row["error_name"] == "E\ufffd"


def test_a_nodes_restart_marks_only_its_own_runs(postgres_url: str) -> None:
    """Two nodes write one log; node a restarts: only a's unfinished run is interrupted
    (and its undecided approval refused); b's go on. The cluster marks a dead node's by
    name."""
    now = time.time()
    with (
        contextlib.closing(AuditLog(postgres_url, node="a")) as a,
        contextlib.closing(AuditLog(postgres_url, node="b")) as b,
    ):
        start(a, "a-running")
        start(a, "a-done")
        a.complete_run("a-done", outcome="ok")
        start(b, "b-running")
        for log, name in ((a, "ap-a"), (b, "ap-b")):
            log.approval_requested(
                {"id": name, "tenant": "alice", "kind": "run", "subject": "x", "reasons": [],
                 "requested_at": now, "expires_at": now + 60}
            )  # fmt: skip
        assert a.mark_interrupted() == 1
        status = {r["id"]: (r["node"], r["status"]) for r in a.runs()}
        assert status == {
            "a-running": ("a", "interrupted"),
            "a-done": ("a", "completed"),
            "b-running": ("b", "started"),
        }
        decided = {r["id"]: r["decided_by"] for r in a.approvals()}
        assert decided == {"ap-a": "service stopped", "ap-b": None}
        assert b.mark_interrupted(node="b") == 1  # what the cluster does for a lost node
        assert {r["id"]: r["status"] for r in b.runs()}["b-running"] == "interrupted"


def test_an_unreachable_database_is_unavailable_and_the_log_comes_back(
    own_server: postgres.Server,
) -> None:
    """The server stops: a write and a read are AuditUnavailable (never a hang, never a
    crash of the writer); it starts again: both work on new connections."""
    with contextlib.closing(AuditLog(own_server.url())) as log:
        start(log, "before")
        log.add_key("k", "alice")
        log.add_key("k2", "bob")
        assert log.identity("k") is not None
        postgres.stop(own_server.directory)
        with pytest.raises(AuditUnavailable):
            start(log, "while-down")
        with pytest.raises(AuditUnavailable):
            log.identity("k2")  # not asked before: the database must answer
        assert log.identity("k") is not None  # found a moment ago: kept (keys never change)
        postgres.start(own_server.directory)
        start(log, "after")
        assert log.identity("k2") is not None
        assert [r["id"] for r in log.runs()] == ["before", "after"]


def test_a_service_on_postgres_records_every_run(postgres_url: str, tmp_path: Path) -> None:
    svc = start_service(postgres_url, ("alice",), log_file=tmp_path / "service.log")
    try:
        with svc.client() as client:
            sbx = client.Sandbox()
            assert sbx.run_code("6 * 7").text == "42"
            sbx.kill()
    finally:
        stop_service(svc)
    with contextlib.closing(AuditLog(postgres_url)) as log:
        (row,) = [r for r in log.runs() if r["kind"] == "execute"]
    assert row["code"] == "6 * 7" and row["status"] == "completed"
    assert row["outcome"] == "ok" and row["node"]
    listed = cli("audit", "list", "--db", postgres_url)  # the CLI reads the same log
    (line,) = [x for x in listed.splitlines() if row["id"][:12] in x]
    assert f"{row['language']}/{row['context_id']}" in line and row["node"][:16] in line


def test_the_service_answers_503_and_runs_nothing_while_its_database_is_down(
    own_server: postgres.Server, tmp_path: Path
) -> None:
    svc = start_service(own_server.url(), ("alice",), log_file=tmp_path / "service.log")
    try:
        with svc.client() as client:
            sbx = client.Sandbox()
            assert sbx.run_code("1 + 1").text == "2"
            postgres.stop(own_server.directory)
            answer = httpx.post(
                f"{svc.url}/v1/sandboxes/{sbx.sandbox_id}/execute",
                json={"code": "open('ran', 'w').write('1')"},
                headers={"Authorization": f"Bearer {svc.keys['alice']}"},
                timeout=60,
            )
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["type"] == "AuditUnavailable"
            postgres.start(own_server.directory)
            assert sbx.run_code("import os; os.path.exists('ran')").text == "False"
            sbx.kill()
    finally:
        stop_service(svc)


def test_kill_9_of_a_service_on_postgres_loses_no_acknowledged_record(
    postgres_url: str, tmp_path: Path
) -> None:
    """Acknowledged runs are all there, completed; the one in flight is `interrupted` once
    the node comes back (its restart marks its own)."""
    log_file = tmp_path / "service.log"
    svc = start_service(postgres_url, ("alice",), log_file=log_file)
    acknowledged: list[str] = []
    with svc.client() as client, contextlib.closing(AuditLog(postgres_url)) as log:
        sbx = client.Sandbox()
        for i in range(5):
            sbx.run_code(f"print({i})")
            acknowledged.append(f"print({i})")

        def sleeper() -> None:
            with contextlib.suppress(Exception):  # its service is killed under it
                sbx.run_code("import time; time.sleep(30)")

        in_flight = threading.Thread(target=sleeper)
        in_flight.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(r["status"] == "started" for r in log.runs()):
            time.sleep(0.05)
        svc.process.send_signal(signal.SIGKILL)
        svc.process.wait()
        in_flight.join()
        again = start_service(postgres_url, (), log_file=log_file)
        try:
            records = log.runs()
        finally:
            stop_service(again)
    done = [r["code"] for r in records if r["status"] == "completed"]
    assert all(code in done for code in acknowledged)
    assert [r["code"] for r in records if r["status"] == "interrupted"] == [
        "import time; time.sleep(30)"
    ]


def test_a_wrong_password_is_a_clear_error(postgres_server: postgres.Server) -> None:
    wrong = postgres_server.url().replace(postgres_server.password, "not-it")
    with pytest.raises(AuditUnavailable, match="cannot be opened") as caught:
        AuditLog(wrong)
    assert "not-it" not in str(caught.value)  # the URL is shown without its password
