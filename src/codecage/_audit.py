"""The audit log: every run, who ran it and what happened (SQLite, WAL, synchronous=FULL).

A run is recorded before it starts and completed before its answer is sent; both wait
until their transaction is durable. One writer thread groups the writes of concurrent
callers into one transaction (group commit), so the log is not the bottleneck. If the log
cannot be written, callers get AuditUnavailable and the service refuses the work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import AuditUnavailable

OUTPUT_KEEP_BYTES = 64 * 1024

MIGRATIONS = [
    # 1: runs and API keys
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        sandbox_id TEXT,
        kind TEXT NOT NULL,
        started_at REAL NOT NULL,
        code TEXT NOT NULL,
        code_sha256 TEXT NOT NULL,
        policy TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'started',
        ended_at REAL,
        outcome TEXT,
        error_name TEXT,
        killed_by TEXT,
        limits_hit TEXT,
        duration_ms REAL,
        peak_memory_mb REAL,
        output TEXT,
        output_truncated INTEGER,
        files TEXT,
        claims TEXT
    );
    CREATE INDEX runs_tenant_time ON runs (tenant, started_at);
    CREATE INDEX runs_sandbox ON runs (sandbox_id);
    CREATE TABLE api_keys (
        key_sha256 TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 2: static-analysis findings, approval decisions, key roles
    """
    ALTER TABLE runs ADD COLUMN findings TEXT;
    ALTER TABLE runs ADD COLUMN approval TEXT;
    ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'client';
    CREATE TABLE approvals (
        id TEXT PRIMARY KEY,
        tenant TEXT,
        sandbox_id TEXT,
        run_id TEXT,
        client_ref TEXT,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        reasons TEXT NOT NULL,
        requested_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        decided_at REAL,
        approved INTEGER,
        decided_by TEXT,
        decided_key TEXT,
        reason TEXT
    );
    CREATE INDEX approvals_tenant_time ON approvals (tenant, requested_at);
    """,
]


@dataclass
class _Write:
    sql: str
    params: tuple[Any, ...]
    done: Future[None]


class AuditLog:
    """The log in one SQLite file. Writes go through one thread; reads open their own connection."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        self._migrate(conn)
        conn.close()
        self._queue: queue.Queue[_Write | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="codecage-audit", daemon=True)
        self._writer.start()
        self._local = threading.local()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.execute("BEGIN IMMEDIATE")
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")
            conn.execute("COMMIT")

    # -- writing ---------------------------------------------------------------------------

    def _write_loop(self) -> None:
        conn = self._connect()
        while True:
            item = self._queue.get()
            if item is None:
                conn.close()
                return
            batch = [item]
            while len(batch) < 512:  # everything that queued up meanwhile: one commit
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            self._commit(conn, batch)

    def _commit(self, conn: sqlite3.Connection, batch: list[_Write]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            for write in batch:
                conn.execute(write.sql, write.params)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            error = AuditUnavailable(f"the audit log cannot be written: {exc}")
            for write in batch:
                write.done.set_exception(error)
            return
        for write in batch:
            write.done.set_result(None)

    def _write(self, sql: str, params: tuple[Any, ...], timeout_s: float = 30.0) -> None:
        """Queue a write and wait until it is durable."""
        future: Future[None] = Future()
        self._queue.put(_Write(sql, params, future))
        try:
            future.result(timeout=timeout_s)
        except TimeoutError:
            raise AuditUnavailable("the audit log did not commit in time") from None

    def start_run(
        self,
        *,
        run_id: str,
        tenant: str,
        sandbox_id: str | None,
        kind: str,
        code: str,
        policy: dict[str, Any],
        findings: list[dict[str, Any]] | None = None,
    ) -> None:
        self._write(
            "INSERT INTO runs (id, tenant, sandbox_id, kind, started_at, code, code_sha256, policy,"
            " findings) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                tenant,
                sandbox_id,
                kind,
                time.time(),
                code,
                hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest(),
                json.dumps(policy, sort_keys=True),
                json.dumps(findings or []),
            ),
        )

    def complete_run(
        self,
        run_id: str,
        *,
        outcome: str,
        error_name: str | None = None,
        killed_by: str | None = None,
        limits_hit: list[str] | None = None,
        duration_ms: float | None = None,
        peak_memory_mb: float | None = None,
        output: str = "",
        output_truncated: bool = False,
        files: list[dict[str, Any]] | None = None,
        claims: dict[str, Any] | None = None,
        status: str = "completed",
    ) -> None:
        data = output.encode("utf-8", "replace")
        kept = data[:OUTPUT_KEEP_BYTES].decode("utf-8", "ignore")
        self._write(
            "UPDATE runs SET status=?, ended_at=?, outcome=?, error_name=?, killed_by=?, limits_hit=?,"
            " duration_ms=?, peak_memory_mb=?, output=?, output_truncated=?, files=?, claims=?"
            " WHERE id=?",
            (
                status,
                time.time(),
                outcome,
                error_name,
                killed_by,
                json.dumps(limits_hit or []),
                duration_ms,
                peak_memory_mb,
                kept,
                int(output_truncated or len(data) > OUTPUT_KEEP_BYTES),
                json.dumps(files or []),
                json.dumps(claims or {}),
                run_id,
            ),
        )

    def approval_requested(self, request: dict[str, Any]) -> None:
        """A request starts waiting; its run (if any) is pending until a decision."""
        self._write(
            "INSERT INTO approvals (id, tenant, sandbox_id, run_id, client_ref, kind, subject,"
            " reasons, requested_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                request["id"],
                request.get("tenant"),
                request.get("sandbox_id"),
                request.get("run_id"),
                request.get("client_ref"),
                request["kind"],
                str(request["subject"])[:OUTPUT_KEEP_BYTES],
                json.dumps(request["reasons"]),
                request["requested_at"],
                request["expires_at"],
            ),
        )
        if request.get("run_id"):
            self._write(
                "UPDATE runs SET status='pending_approval' WHERE id=?", (request["run_id"],)
            )

    def approval_decided(self, request: dict[str, Any], decision: dict[str, Any]) -> None:
        """Who decided, when and why; the run goes on (status back to started) or not."""
        self._write(
            "UPDATE approvals SET decided_at=?, approved=?, decided_by=?, decided_key=?, reason=?"
            " WHERE id=?",
            (
                decision["at"],
                int(decision["approved"]),
                decision["by"],
                decision.get("key"),
                decision["reason"],
                request["id"],
            ),
        )
        if request.get("run_id"):
            self._write(
                "UPDATE runs SET status='started', approval=? WHERE id=? AND status='pending_approval'",
                (json.dumps({"id": request["id"], **decision}), request["run_id"]),
            )

    def approvals(self, *, tenant: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM approvals", []
        if tenant is not None:
            sql += " WHERE tenant = ?"
            params.append(tenant)
        rows = self._reader().execute(sql + " ORDER BY requested_at LIMIT ?", (*params, limit))
        out = []
        for row in rows.fetchall():
            item = dict(row)
            item["reasons"] = json.loads(item["reasons"])
            item["approved"] = None if item["approved"] is None else bool(item["approved"])
            out.append(item)
        return out

    def mark_interrupted(self) -> int:
        """After a crash: runs that started and never completed are marked interrupted."""
        conn = self._connect()
        try:
            cur = conn.execute(
                "UPDATE runs SET status='interrupted', outcome='interrupted', ended_at=?"
                " WHERE status IN ('started', 'pending_approval')",
                (time.time(),),
            )
            conn.execute(
                "UPDATE approvals SET decided_at=?, approved=0, decided_by='service stopped',"
                " reason='the service stopped before an answer' WHERE decided_at IS NULL",
                (time.time(),),
            )
            return cur.rowcount
        finally:
            conn.close()

    # -- keys ------------------------------------------------------------------------------

    def add_key(self, key: str, tenant: str, role: str = "client") -> None:
        self._write(
            "INSERT INTO api_keys (key_sha256, tenant, created_at, role) VALUES (?, ?, ?, ?)",
            (_key_hash(key), tenant, time.time(), role),
        )

    def tenant_for(self, key: str) -> str | None:
        found = self.identity(key)
        return None if found is None else found[0]

    def identity(self, key: str) -> tuple[str, str, str] | None:
        """(tenant, role, key id) of an API key; the id is a prefix of its hash, for the log."""
        digest = _key_hash(key)
        row = (
            self._reader()
            .execute("SELECT tenant, role FROM api_keys WHERE key_sha256=?", (digest,))
            .fetchone()
        )
        return None if row is None else (str(row[0]), str(row[1]), digest[:12])

    # -- reading ---------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def runs(
        self,
        *,
        tenant: str | None = None,
        sandbox_id: str | None = None,
        outcome: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after_rowid: int = 0,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        clauses: list[str] = ["rowid > ?"]
        params: list[Any] = [after_rowid]
        for column, value in (("tenant", tenant), ("sandbox_id", sandbox_id), ("outcome", outcome)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            clauses.append("started_at >= ?")
            params.append(since)
        if until is not None:
            clauses.append("started_at < ?")
            params.append(until)
        sql = f"SELECT rowid, * FROM runs WHERE {' AND '.join(clauses)} ORDER BY rowid LIMIT ?"
        rows = self._reader().execute(sql, (*params, limit)).fetchall()
        return [_row(r) for r in rows]

    def run(self, run_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        sql, params = "SELECT rowid, * FROM runs WHERE id = ?", [run_id]
        if tenant is not None:
            sql += " AND tenant = ?"
            params.append(tenant)
        row = self._reader().execute(sql, params).fetchone()
        return None if row is None else _row(row)

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=30)


def _key_hash(key: str) -> str:
    # API keys are 256-bit random strings: a plain hash is enough, nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


def _row(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for column in ("policy", "limits_hit", "files", "claims", "findings", "approval"):
        if out.get(column):
            out[column] = json.loads(out[column])
    out["output_truncated"] = bool(out.get("output_truncated"))
    return out


@contextlib.contextmanager
def opened(path: str | Path) -> Iterator[AuditLog]:
    log = AuditLog(path)
    try:
        yield log
    finally:
        log.close()
