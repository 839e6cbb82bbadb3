"""The audit log against hostile input and growth: text that UTF-8 refuses, a writer that must
not die, bounded records, a free-space floor, retention, and export/list of more rows than
any page. Real SQLite files, and a real PostgreSQL on loopback for the tests of the `log`
fixture (they run on both); the service tests run a real service on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import codecage
from codecage._errors import AuditUnavailable
from codecage._service.audit import BATCH, AuditLog, _Write

from .conftest import Service, cli, start_service, stop_service


@pytest.fixture(params=["sqlite", "postgres"])
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuditLog]:
    target = tmp_path / "audit.db"
    if request.param == "postgres":
        target = request.getfixturevalue("postgres_url")
    audit = AuditLog(target)
    try:
        yield audit
    finally:
        audit.close()


def rows(db: Path | AuditLog) -> list[dict[str, Any]]:
    """The runs as stored (JSON columns as text): read with sqlite3 from a file, or through
    the log's own database."""
    if isinstance(db, AuditLog):
        return [dict(r) for r in db._read("SELECT rowid, * FROM runs ORDER BY rowid")]
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY rowid")]
    finally:
        conn.close()


def start(log: AuditLog, run_id: str, code: str = "1", tenant: str = "alice") -> None:
    log.start_run(run_id=run_id, tenant=tenant, sandbox_id=None, kind="run", code=code, policy={})


def raw_write(log: AuditLog, sql: str, params: tuple[Any, ...]) -> Future[None]:
    """A write queued as is, past start_run's cleaning: what the writer must survive."""
    done: Future[None] = Future()
    log._queue.put(_Write(sql, params, done))
    return done


# -- item 5: lone surrogates, and a writer that survives anything --------------------------


def test_sqlite_itself_refuses_a_lone_surrogate(tmp_path: Path) -> None:
    """The positive control: this is what would reach the writer."""
    conn = sqlite3.connect(tmp_path / "x.db")
    conn.execute("CREATE TABLE t (v TEXT)")
    with pytest.raises(UnicodeEncodeError):
        conn.execute("INSERT INTO t VALUES (?)", ("\ud800",))
    conn.close()


def test_lone_surrogates_are_made_valid_at_the_boundary(log: AuditLog) -> None:
    start(log, "r1", code="print('\ud800')")
    log.complete_run(
        "r1",
        outcome="error",
        error_name="E\udc00",
        output="out \ud83d\ude00 \ud800",  # a pair joins, a lone half is replaced
        files=[{"path": "\ud800"}],
        claims={"\udfff": 1},
    )
    (row,) = rows(log)
    assert row["code"] == "print('\ufffd')" and row["error_name"] == "E\ufffd"
    assert row["output"] == "out \U0001f600 \ufffd"
    assert json.loads(row["files"]) == [{"path": "\ufffd"}]
    assert json.loads(row["claims"]) == {"\ufffd": 1}
    # the digest is of what was sent, byte for byte
    sent = "print('\ud800')".encode("utf-8", "surrogatepass")
    assert row["code_sha256"] == hashlib.sha256(sent).hexdigest()


def test_the_writer_survives_any_exception(log: AuditLog) -> None:
    bad = raw_write(log, "INSERT INTO api_keys VALUES (?, 't', 0, 'client')", ("\ud800",))
    with pytest.raises(AuditUnavailable, match="UnicodeEncodeError"):
        bad.result(timeout=30)
    assert log._writer.is_alive()
    # one bad write among good ones fails alone, whether they share a commit or not
    sql = "INSERT INTO api_keys (key_sha256, tenant, created_at) VALUES (?, 't', 0)"
    futures = [raw_write(log, sql, (f"k{i}",) if i != 3 else ("\udc00",)) for i in range(8)]
    outcomes = [f.exception(timeout=30) for f in futures]
    assert [o is None for o in outcomes] == [i != 3 for i in range(8)]
    start(log, "after")  # and later writes go through
    assert [r["id"] for r in rows(log)] == ["after"]


def test_a_dead_writer_is_restarted(log: AuditLog) -> None:
    log._queue.put(None)  # the writer exits, as it would on any way out of its loop
    log._writer.join(timeout=30)
    assert not log._writer.is_alive()
    start(log, "r1")
    assert log._writer.is_alive() and rows(log)[0]["id"] == "r1"


# -- item 11: bounded records, a free-space floor, retention --------------------------------


def test_code_is_kept_up_to_a_bound_with_its_length_and_digest(tmp_path: Path) -> None:
    code = "# " + "é" * (1 << 20)  # 2 MiB of two-byte characters: the cut falls inside one
    with contextlib.closing(AuditLog(tmp_path / "a.db", code_keep_bytes=64 << 10)) as log:
        start(log, "big", code=code)
        start(log, "small", code="1 + 1")
    big, small = rows(tmp_path / "a.db")
    data = code.encode()
    assert big["code_bytes"] == len(data) and big["code_truncated"] == 1
    assert big["code_sha256"] == hashlib.sha256(data).hexdigest()
    assert code.startswith(big["code"]) and len(big["code"].encode()) in (65535, 65536)
    assert small["code"] == "1 + 1" and small["code_truncated"] == 0 and small["code_bytes"] == 5


def test_a_log_of_the_previous_schema_migrates_and_keeps_its_rows(tmp_path: Path) -> None:
    """A file written before runs had a language and a context (schema 3) opens, keeps
    its rows (with NULL for the two) and takes new rows with them."""
    from codecage._service.audit import MIGRATIONS

    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    for number, script in enumerate(MIGRATIONS[:3], start=1):
        conn.executescript(script)
        conn.execute(f"PRAGMA user_version={number}")
    conn.execute(
        "INSERT INTO runs (id, tenant, kind, started_at, code, code_sha256, policy)"
        " VALUES ('old', 'alice', 'execute', 1.0, 'x = 1', '', '{}')"
    )
    conn.commit()
    conn.close()
    with contextlib.closing(AuditLog(db)) as log:
        log.start_run(
            run_id="new",
            tenant="alice",
            sandbox_id="s",
            kind="execute",
            code="echo hi",
            policy={},
            language="bash",
            context_id="default-bash",
        )
        old, new = log.runs(tenant="alice")
    assert (old["id"], old["code"], old["language"], old["context_id"]) == (
        "old",
        "x = 1",
        None,
        None,
    )
    assert (new["language"], new["context_id"]) == ("bash", "default-bash")
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    conn.close()
    with contextlib.closing(AuditLog(db)) as log:  # opening a migrated file again: no change
        assert [r["id"] for r in log.runs()] == ["old", "new"]


def test_findings_are_bounded_with_their_count(log: AuditLog) -> None:
    many = [
        {"rule": "r", "severity": "low", "line": i, "col": 0, "message": "m"} for i in range(5000)
    ]
    log.start_run(
        run_id="r", tenant="t", sandbox_id=None, kind="run", code="x", policy={}, findings=many
    )
    (row,) = rows(log)
    assert row["findings_count"] == 5000 and len(json.loads(row["findings"])) == 256


def test_a_huge_policy_is_kept_as_its_length_and_digest(log: AuditLog) -> None:
    policy = {"modules_deny": [f"m{i}" for i in range(50000)]}  # a tenant may add to guards
    log.start_run(run_id="r", tenant="t", sandbox_id=None, kind="run", code="x", policy=policy)
    (row,) = rows(log)
    kept = json.loads(row["policy"])
    assert kept["truncated"] is True and kept["bytes"] > 64 << 10 and len(kept["sha256"]) == 64


def test_approvals_page_past_any_limit(log: AuditLog) -> None:
    now = time.time()
    for i in range(30):
        log.approval_requested(
            {"id": f"a{i:02d}", "tenant": "t", "kind": "run", "subject": "x", "reasons": ["r"],
             "requested_at": now, "expires_at": now + 60}
        )  # fmt: skip
    seen, after = [], 0
    while page := log.approvals(tenant="t", after_rowid=after, limit=7):
        seen += [r["id"] for r in page]
        after = page[-1]["rowid"]
    assert seen == [f"a{i:02d}" for i in range(30)]


def test_new_runs_are_refused_below_the_free_space_floor(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    with contextlib.closing(AuditLog(tmp_path / "ok.db", min_free_bytes=1 << 20)) as log:
        start(log, "fine")  # positive control: a floor below what is free
    with contextlib.closing(AuditLog(tmp_path / "no.db", min_free_bytes=free + (1 << 40))) as log:
        with pytest.raises(AuditUnavailable, match="floor"):
            start(log, "refused")
        assert rows(tmp_path / "no.db") == []


def test_prune_deletes_finished_runs_before_a_time(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    with contextlib.closing(AuditLog(db)) as log:
        for i in range(5):
            start(log, f"done{i}")
            log.complete_run(f"done{i}", outcome="ok")
        start(log, "running")
        assert log.prune(time.time() - 3600) == 0  # nothing is that old
    out = subprocess.run(
        [sys.executable, "-m", "codecage", "audit", "prune", "--older-than", "0s", "--db", str(db)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "deleted 5 runs" in out.stderr
    assert [r["id"] for r in rows(db)] == ["running"]  # a run in progress is never pruned


def test_the_service_applies_its_retention_as_it_goes(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    with contextlib.closing(AuditLog(db, retain_s=1.0)) as log:
        start(log, "old")
        log.complete_run("old", outcome="ok")
        deadline = time.monotonic() + 60
        while rows(db) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rows(db) == []


# -- item 18: export and list of more rows than any page ------------------------------------


@pytest.fixture(scope="module")
def big_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("big") / "audit.db"
    total = 2500
    assert total > 2 * BATCH and total > 1000  # more than any page, and than the old cap
    with contextlib.closing(AuditLog(db)) as log, ThreadPoolExecutor(64) as pool:
        # concurrent callers: the writer groups them into few commits
        list(
            pool.map(
                lambda i: start(log, f"run{i:05d}", f"print({i})", ("alice", "bob")[i % 2]),
                range(total),
            )
        )
    return db


def audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "codecage", "audit", *args],
        capture_output=True,
        text=True,
        check=True,
    )


def test_export_writes_every_matching_run(big_log: Path) -> None:
    exported = [
        json.loads(line) for line in cli("audit", "export", "--db", str(big_log)).splitlines()
    ]
    assert len(exported) == 2500 and len({r["id"] for r in exported}) == 2500
    bobs = cli("audit", "export", "--db", str(big_log), "--tenant", "bob").splitlines()
    assert len(bobs) == 1250 and all(json.loads(line)["tenant"] == "bob" for line in bobs)


def test_list_pages_and_says_where_it_stopped(big_log: Path) -> None:
    first = audit_cli("list", "--db", str(big_log))
    assert len(first.stdout.splitlines()) == 1000
    assert "stopped after 1000 runs; more with --after 1000" in first.stderr
    rest = audit_cli("list", "--db", str(big_log), "--after", "1000", "--limit", "0")
    assert len(rest.stdout.splitlines()) == 1500 and "stopped" not in rest.stderr
    everything = audit_cli("list", "--db", str(big_log), "--limit", "0")
    assert len(everything.stdout.splitlines()) == 2500


# -- the service: item 5 end to end, item 12 metrics, item 11 floor -------------------------


@pytest.fixture
def own_service(tmp_path: Path) -> Iterator[Service]:
    svc = start_service(tmp_path / "audit.db", ("alice", "bob"))
    try:
        yield svc
    finally:
        stop_service(svc)


def http(service: Service, tenant: str | None) -> httpx.Client:
    from .openapi_check import validate

    headers = {"Authorization": f"Bearer {service.keys[tenant]}"} if tenant else {}
    return httpx.Client(
        base_url=service.url, headers=headers, timeout=120, event_hooks={"response": [validate]}
    )


# The code shares the kernel's process: it writes frames of its own on the kernel's channel,
# with this run's id, here with JSON escapes of lone surrogates (the kernel's own encoder
# would refuse them).
FORGE = (
    "import gc, json, struct\n"
    "ch = [o for o in gc.get_objects() if type(o).__name__ == 'Channel'][0]\n"
    "out = [o for o in gc.get_objects() if type(o).__name__ == 'Output'][0]\n"
    "def forge(**frame):\n"
    "    body = json.dumps({**frame, 'id': out.run_id}).encode()\n"
    "    with ch.lock:\n"
    "        ch.sock.sendall(struct.pack('>I', len(body)) + body)\n"
)


@pytest.mark.requires_root
def test_lone_surrogates_are_refused_and_the_log_survives(own_service: Service) -> None:
    with http(own_service, "alice") as alice, http(own_service, "bob") as bob:
        sid = alice.post("/v1/sandboxes", json={}).json()["id"]
        try:
            base = f"/v1/sandboxes/{sid}"
            probes: list[tuple[str, dict[str, Any]]] = [
                (f"{base}/commands", {"cmd": "echo X"}),
                (f"{base}/execute", {"code": "'X'"}),
                (f"{base}/execute", {"code": "1", "envs": {"A": "X"}}),
                (f"{base}/execute", {"code": "1", "envs": {"X": "1"}}),
                (f"{base}/files/mkdir", {"path": "dirX"}),
                ("/v1/run", {"code": "'X'"}),
                ("/v1/sandboxes", {"envs": {"A": "X"}}),
            ]
            for url, body in probes:
                good = json.loads(json.dumps(body).replace("X", "x"))
                answer = alice.post(url, json=good)  # positive control: the same, valid
                assert answer.status_code in (200, 201), (url, answer.text)
                if url == "/v1/sandboxes":
                    alice.delete(f"/v1/sandboxes/{answer.json()['id']}")
                bad = json.dumps(body).replace("X", "\\ud800")  # valid JSON, not valid UTF-8
                refused = alice.post(url, content=bad, headers={"content-type": "application/json"})
                assert refused.status_code == 400, (url, refused.text)
                assert refused.json()["error"]["type"] == "BadRequest"
            # the code itself makes an error name and output with lone surrogates
            made = alice.post(
                f"{base}/execute",
                json={
                    "code": FORGE
                    + "forge(ev='stdout', text='a\\ud800b')\n"
                    + "forge(ev='error', name='E\\udc00', value='v\\ud800', traceback='')\n"
                },
            )
            assert made.status_code == 200, made.text
            error = made.json()["error"]
            assert made.json()["logs"]["stdout"] == ["a\ufffdb"]
            assert error["name"] == "E\ufffd" and "\ufffd" in error["value"]
            # and every tenant's runs still go through (no dead writer, no 503)
            for _ in range(3):
                ok = bob.post("/v1/run", json={"code": "print(6 * 7)"})
                assert ok.status_code == 200 and ok.json()["logs"]["stdout"] == ["42\n"], ok.text
            assert alice.post(f"{base}/execute", json={"code": "1 + 1"}).json()["text"] == "2"
        finally:
            alice.delete(f"/v1/sandboxes/{sid}")
    recorded = [r for r in rows(own_service.db) if r["error_name"] == "E\ufffd"]
    assert len(recorded) == 1 and recorded[0]["outcome"] == "error"


@pytest.mark.requires_root
def test_metrics_name_tenants_only_to_operator_keys(own_service: Service) -> None:
    operator = cli(
        "keys", "create", "--tenant", "ops", "--role", "operator", "--db", str(own_service.db)
    )
    with own_service.client("alice") as client, client.Sandbox() as sbx:
        sbx.run_code("x = bytearray(8 << 20)")
        detailed = f'codecage_sandbox_memory_bytes{{sandbox="{sbx.id}",tenant="alice"}}'
        with http(own_service, None) as anonymous:
            text = anonymous.get("/metrics").text
        with http(own_service, "bob") as bob:
            as_client = bob.get("/metrics").text
        with httpx.Client(
            base_url=own_service.url, headers={"Authorization": f"Bearer {operator}"}
        ) as ops:
            as_operator = ops.get("/metrics").text
            # an operator key is not a client key
            assert ops.get("/v1/sandboxes").status_code == 403
            assert ops.get("/v1/approvals").status_code == 403
        with httpx.Client(
            base_url=own_service.url, headers={"Authorization": "Bearer cc_wrong"}
        ) as wrong:
            assert wrong.get("/metrics").status_code == 401
    assert detailed in as_operator  # positive control: the series exists, for an operator
    for public in (text, as_client):
        assert sbx.id not in public and "alice" not in public and "tenant=" not in public
        assert "codecage_sandboxes_memory_bytes " in public and "codecage_runs_total" in public


@pytest.mark.requires_root
def test_the_service_refuses_work_below_the_free_space_floor(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    free_mb = shutil.disk_usage(tmp_path).free >> 20
    config.write_text(f"audit_min_free_mb = {free_mb + (1 << 20)}\n")
    svc = start_service(tmp_path / "audit.db", ("alice",), config)
    try:
        with svc.client() as client, client.Sandbox() as sbx:
            with pytest.raises(codecage.AuditUnavailable, match="floor"):
                sbx.run_code("open('ran', 'w').write('x')")
            with pytest.raises(codecage.AuditUnavailable, match="floor"):
                sbx.files.exists("ran")  # a file operation is recorded work too
        assert sqlite3.connect(tmp_path / "audit.db").execute(
            "SELECT count(*) FROM runs"
        ).fetchone() == (0,)
    finally:
        stop_service(svc)
