"""The audit log: every run, who ran it and what happened (SQLite or PostgreSQL: db.py).

A run is recorded before it starts and completed before its answer is sent; both wait
until their transaction is durable. One writer thread groups the writes of concurrent
callers into one transaction (group commit), so the log is not the bottleneck. If the log
cannot be written, callers get AuditUnavailable and the service refuses the work.

The writer thread survives any exception: it fails that batch's callers and goes on (and a
dead writer is restarted by the next write). Every text is made valid UTF-8 on its way in
(a lone surrogate becomes U+FFFD). What one run may add is bounded: code is kept up to
`code_keep_bytes` with its full length and sha256, output up to OUTPUT_KEEP_BYTES. New runs
are refused while the log's filesystem has less than `min_free_bytes` free (an SQLite
file's; a PostgreSQL server keeps its own disk), and runs older than `retain_s` (if set)
are deleted as the log goes.

Every run and approval names the node that wrote it (`node`): a node's restart, or the
cluster seeing it dead, marks only that node's unfinished runs `interrupted`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import AuditUnavailable
from .._text import valid, valid_deep
from .db import IDLE_CHECK_S, Database, open_database

OUTPUT_KEEP_BYTES = 64 * 1024
CODE_KEEP_BYTES = 64 * 1024  # the default bound on the code kept per run
POLICY_KEEP_BYTES = 64 * 1024  # a policy's JSON over this is kept as its length and sha256
FINDINGS_KEEP = 256  # findings kept per run (findings_count has them all)
IMAGES_KEEP = 8  # PNG/JPEG results kept per run, the first ones
IMAGE_KEEP_BYTES = 1 << 20  # their bytes together at most (decoded); a larger one is left out
NAME_KEEP_BYTES = 1024  # an error's name: the kernel's word (a class can be named anything)
BATCH = 512  # writes per commit; also rows per page when reading
PRUNE_CHUNK = 2000  # rows deleted per transaction, so that writers are not held up
PRUNE_EVERY_S = 600.0
IDENTITY_TTL_S = 5.0  # a key found in a database server is kept this long (identity())
IDENTITIES_KEPT = 10_000

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
    # 3: bounded records (code kept up to a bound, with its full length), retention by time
    """
    ALTER TABLE runs ADD COLUMN code_bytes INTEGER;
    ALTER TABLE runs ADD COLUMN code_truncated INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN findings_count INTEGER;
    CREATE INDEX runs_time ON runs (started_at);
    """,
    # 4: the wheels handed in to a sandbox's `pip install` (docs/packages.md)
    """
    CREATE TABLE packages (
        run_id TEXT,
        tenant TEXT NOT NULL,
        sandbox_id TEXT,
        at REAL NOT NULL,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        wheel TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        requested INTEGER NOT NULL
    );
    CREATE INDEX packages_sandbox ON packages (sandbox_id);
    CREATE INDEX packages_time ON packages (at);
    """,
    # 5: a cell's language and code context (NULL for what is not a cell)
    """
    ALTER TABLE runs ADD COLUMN language TEXT;
    ALTER TABLE runs ADD COLUMN context_id TEXT;
    """,
    # 6: the node that wrote a run or an approval (NULL: before clusters)
    """
    ALTER TABLE runs ADD COLUMN node TEXT;
    ALTER TABLE approvals ADD COLUMN node TEXT;
    CREATE INDEX runs_status ON runs (status);
    """,
    # 7: the images a run showed (PNG/JPEG results, bounded), for the console's run page
    """
    CREATE TABLE run_images (
        run_id TEXT NOT NULL,
        at REAL NOT NULL,
        idx INTEGER NOT NULL,
        mime TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX run_images_run ON run_images (run_id);
    """,
]


@dataclass
class _Write:
    sql: str
    params: tuple[Any, ...]
    done: Future[None]


_IDLE = _Write("", (), Future())  # the writer woke up with nothing queued (retention's turn)


def _resolve(write: _Write) -> None:
    if not write.done.done():
        write.done.set_result(None)


def _fail(batch: list[_Write], exc: BaseException) -> None:
    error = AuditUnavailable(f"the audit log cannot be written: {type(exc).__name__}: {exc}")
    for write in batch:
        if not write.done.done():
            write.done.set_exception(error)


def _cut(text: str, keep: int) -> str:
    """`text` made valid, and cut to at most `keep` bytes of UTF-8 (at a character)."""
    data = valid(text).encode("utf-8")
    return data[:keep].decode("utf-8", "ignore") if len(data) > keep else valid(text)


def _json(value: Any) -> str:
    """JSON text with every string valid (a lone surrogate becomes U+FFFD)."""
    return json.dumps(valid_deep(json.loads(json.dumps(value))), sort_keys=True)


def _reasons(reasons: list[Any]) -> list[str]:
    """An approval's reasons as recorded: together at most OUTPUT_KEEP_BYTES (they quote the
    request's environment overrides, which a tenant sizes), with a last line saying what
    was cut. The approver is shown them whole; the log keeps a bounded record."""
    kept: list[str] = []
    left, total = OUTPUT_KEEP_BYTES, 0
    for reason in map(str, reasons):
        size = len(valid(reason).encode("utf-8"))
        total += size
        if left > 0:
            kept.append(_cut(reason, left))
            left -= min(size, left)
    if total > OUTPUT_KEEP_BYTES:
        kept.append(f"[reasons cut to {OUTPUT_KEEP_BYTES} of {total} bytes]")
    return kept


def _policy_json(policy: dict[str, Any]) -> str:
    text = _json(policy)
    if len(text) <= POLICY_KEEP_BYTES:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()
    return json.dumps({"truncated": True, "bytes": len(text), "sha256": digest})


def _prune_chunk(db: Database, conn: Any, before: float) -> int:
    """Delete up to PRUNE_CHUNK finished runs (and decided approvals) started before
    `before`, in one transaction. Returns the runs deleted."""
    db.begin(conn)
    try:
        cur = conn.execute(
            db.sql(
                "DELETE FROM runs WHERE rowid IN (SELECT rowid FROM runs WHERE started_at < ?"
                " AND status NOT IN ('started', 'pending_approval') LIMIT ?)"
            ),
            (before, PRUNE_CHUNK),
        )
        conn.execute(
            db.sql(
                "DELETE FROM approvals WHERE rowid IN (SELECT rowid FROM approvals WHERE"
                " requested_at < ? AND decided_at IS NOT NULL LIMIT ?)"
            ),
            (before, PRUNE_CHUNK),
        )
        conn.execute(
            db.sql(
                "DELETE FROM run_images WHERE rowid IN"
                " (SELECT rowid FROM run_images WHERE at < ? LIMIT ?)"
            ),
            (before, PRUNE_CHUNK),
        )
        conn.execute(
            db.sql(
                "DELETE FROM packages WHERE rowid IN"
                " (SELECT rowid FROM packages WHERE at < ? LIMIT ?)"
            ),
            (before, PRUNE_CHUNK),
        )
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            conn.execute("ROLLBACK")
        raise
    return int(cur.rowcount)


class AuditLog:
    """The log in an SQLite file or a PostgreSQL database (`target`: a path, or a
    `postgresql://` URL). Writes go through one thread; reads take a connection of their
    own. `node` names this node in the rows it writes (default: the host's name)."""

    def __init__(
        self,
        target: str | Path,
        *,
        code_keep_bytes: int = CODE_KEEP_BYTES,
        min_free_bytes: int = 0,
        retain_s: float | None = None,
        node: str | None = None,
    ) -> None:
        self.db = open_database(target)
        self.path: Path | None = getattr(self.db, "path", None)  # an SQLite file's
        self.node = node or socket.gethostname()
        self.code_keep_bytes = code_keep_bytes
        self.min_free_bytes = min_free_bytes
        self.retain_s = retain_s
        try:
            self.db.migrate(MIGRATIONS)
        except self.db.errors as exc:
            raise AuditUnavailable(
                f"the audit log ({self.db.label}) cannot be opened: {exc}"
            ) from None
        self._queue: queue.Queue[_Write | None] = queue.Queue()
        self._writer_lock = threading.Lock()
        self._closed = False
        self._next_prune = 0.0  # monotonic time of the next retention pass (if retain_s)
        self._writer = self._start_writer()
        self._identities: dict[str, tuple[float, tuple[str, str, str]]] = {}

    def _start_writer(self) -> threading.Thread:
        writer = threading.Thread(target=self._write_loop, name="codecage-audit", daemon=True)
        writer.start()
        return writer

    def _ensure_writer(self) -> None:
        """A writer that died (it should not) is replaced, so that writes never just wait."""
        if self._writer.is_alive():
            return
        with self._writer_lock:
            if not self._writer.is_alive() and not self._closed:
                self._writer = self._start_writer()

    def _connect(self) -> Any:
        try:
            return self.db.connect()
        except self.db.errors as exc:
            raise AuditUnavailable(
                f"the audit log ({self.db.label}) cannot be reached: {exc}"
            ) from None

    # -- writing ---------------------------------------------------------------------------

    def _write_loop(self) -> None:
        conn: Any = None
        used = 0.0  # when conn last committed (monotonic)
        while True:
            batch: list[_Write] = []
            try:
                item = self._queue.get(timeout=self._idle_wait())
            except queue.Empty:
                item = None if self._closed else _IDLE
            if item is None:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                return
            try:
                idle = conn is not None and time.monotonic() - used > IDLE_CHECK_S
                if idle and not self.db.alive(conn):  # e.g. the database server restarted
                    with contextlib.suppress(Exception):
                        conn.close()
                    conn = None
                if conn is None:
                    conn = self._connect()
                used = time.monotonic()
                if item is not _IDLE:
                    batch = [item]
                    while len(batch) < BATCH:  # what queued up meanwhile: one commit
                        try:
                            nxt = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if nxt is None:
                            self._queue.put(None)
                            break
                        batch.append(nxt)
                    self._commit(conn, batch)
                self._retention(conn)
            except BaseException as exc:  # the writer must outlive any failure
                _fail(batch, exc)
                self._next_prune = max(self._next_prune, time.monotonic() + 5.0)  # no busy loop
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None

    def _idle_wait(self) -> float | None:
        if self.retain_s is None:
            return None
        return max(0.0, min(60.0, self._next_prune - time.monotonic()))

    def _commit(self, conn: Any, batch: list[_Write]) -> None:
        """One transaction for the batch. If it fails, each write is tried on its own, so
        that one bad write fails only its own caller. A connection lost on the way fails
        the batch and is replaced (the writer's loop opens another)."""
        error = self._transaction(conn, batch)
        if error is None:
            for write in batch:
                _resolve(write)
            return
        if not self.db.usable(conn):
            raise error
        if len(batch) == 1:
            _fail(batch, error)
            return
        for write in batch:
            alone = self._transaction(conn, [write])
            if alone is None:
                _resolve(write)
            else:
                _fail([write], alone)

    def _transaction(self, conn: Any, batch: list[_Write]) -> Exception | None:
        db = self.db
        try:
            db.begin(conn)
            for write in batch:
                conn.execute(db.sql(write.sql), tuple(map(db.param, write.params)))
            conn.execute("COMMIT")
        except Exception as exc:  # the database's errors, and e.g. UnicodeEncodeError on bad text
            with contextlib.suppress(Exception):
                if db.in_transaction(conn):
                    conn.execute("ROLLBACK")
            return exc
        return None

    def _retention(self, conn: Any) -> None:
        """A chunk of runs older than retain_s, deleted between batches of writes."""
        if self.retain_s is None or time.monotonic() < self._next_prune:
            return
        # The next pass is scheduled first: a pass that fails (a full disk) is not retried in
        # a busy loop.
        self._next_prune = time.monotonic() + min(PRUNE_EVERY_S, max(1.0, self.retain_s / 10))
        if _prune_chunk(self.db, conn, time.time() - self.retain_s) == PRUNE_CHUNK:
            self._next_prune = 0.0  # more to delete: the next chunk after the next batch

    def _write(self, sql: str, params: tuple[Any, ...], timeout_s: float = 30.0) -> None:
        """Queue a write and wait until it is durable."""
        self._write_all([(sql, params)], timeout_s)

    def _write_all(
        self, writes: list[tuple[str, tuple[Any, ...]]], timeout_s: float = 30.0
    ) -> None:
        """Queue writes together (one group commit, as a rule) and wait until all are durable."""
        futures: list[Future[None]] = []
        self._ensure_writer()
        for sql, params in writes:
            futures.append(Future())
            clean = tuple(valid(p) if isinstance(p, str) else p for p in params)
            self._queue.put(_Write(sql, clean, futures[-1]))
        try:
            for future in futures:
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
        language: str | None = None,
        context_id: str | None = None,
    ) -> None:
        """Record a run before it starts: refused (AuditUnavailable) while the log's disk is
        below its free-space floor. Code over code_keep_bytes is kept as its first
        code_keep_bytes, with its full length and its sha256. A cell names its language
        and the code context it runs in."""
        self.check_space()
        raw = code.encode("utf-8", "surrogatepass")
        kept = _cut(code, self.code_keep_bytes)
        findings = findings or []
        self._write(
            "INSERT INTO runs (id, tenant, sandbox_id, kind, started_at, code, code_sha256, policy,"
            " findings, code_bytes, code_truncated, findings_count, language, context_id, node)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                tenant,
                sandbox_id,
                kind,
                time.time(),
                kept,
                hashlib.sha256(raw).hexdigest(),
                _policy_json(policy),
                _json(findings[:FINDINGS_KEEP]),
                len(raw),
                int(len(raw) > self.code_keep_bytes),
                len(findings),
                None if language is None else _cut(language, NAME_KEEP_BYTES),
                None if context_id is None else _cut(context_id, NAME_KEEP_BYTES),
                self.node,
            ),
        )

    def check_space(self) -> None:
        """AuditUnavailable while the log's filesystem has less than min_free_bytes free
        (an SQLite file's: a database server's disk is the server's to watch)."""
        if self.min_free_bytes <= 0 or self.db.local_dir is None:
            return
        try:
            st = os.statvfs(self.db.local_dir)
        except OSError as exc:
            raise AuditUnavailable(f"the audit log's disk cannot be read: {exc}") from None
        free = st.f_bavail * st.f_frsize
        if free < self.min_free_bytes:
            raise AuditUnavailable(
                f"the audit log's disk has {free >> 20} MiB free, under its floor of "
                f"{self.min_free_bytes >> 20} MiB: no new work until there is room"
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
        images: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """The run's end. `images` are (MIME type, bytes) of the images it showed: the first
        IMAGES_KEEP of them, within IMAGE_KEEP_BYTES together, are kept (`images()`)."""
        data = valid(output).encode("utf-8")
        kept = _cut(output, OUTPUT_KEEP_BYTES)
        self._write_all([*_image_rows(run_id, images or []), self._completion(
            run_id, status, outcome, error_name, killed_by, limits_hit, duration_ms,
            peak_memory_mb, kept, output_truncated or len(data) > OUTPUT_KEEP_BYTES, files, claims,
        )])  # fmt: skip

    @staticmethod
    def _completion(
        run_id: str,
        status: str,
        outcome: str,
        error_name: str | None,
        killed_by: str | None,
        limits_hit: list[str] | None,
        duration_ms: float | None,
        peak_memory_mb: float | None,
        kept: str,
        truncated: bool,
        files: list[dict[str, Any]] | None,
        claims: dict[str, Any] | None,
    ) -> tuple[str, tuple[Any, ...]]:
        return (
            "UPDATE runs SET status=?, ended_at=?, outcome=?, error_name=?, killed_by=?, limits_hit=?,"
            " duration_ms=?, peak_memory_mb=?, output=?, output_truncated=?, files=?, claims=?"
            " WHERE id=?",
            (
                status,
                time.time(),
                outcome,
                None if error_name is None else _cut(error_name, NAME_KEEP_BYTES),
                killed_by,
                _json(limits_hit or []),
                duration_ms,
                peak_memory_mb,
                kept,
                int(truncated),
                _json(files or []),
                _json(claims or {}),
                run_id,
            ),
        )

    def images(self, run_id: str) -> list[dict[str, Any]]:
        """The images kept of a run: idx, mime (as the sandbox declared it), size, sha256,
        data (bytes). What they really are is the reader's to check."""
        rows = self._read(
            "SELECT idx, mime, size, sha256, data FROM run_images WHERE run_id=? ORDER BY idx",
            (run_id,),
        )
        return [{**dict(r), "data": base64.b64decode(r["data"])} for r in rows]

    def packages_installed(
        self,
        *,
        run_id: str | None,
        tenant: str,
        sandbox_id: str | None,
        wheels: list[dict[str, Any]],
    ) -> None:
        """The wheels the host handed in to a sandbox's `pip install` (as the host read
        them: name, version, file name, size, sha256), durable before the install runs."""
        now = time.time()
        for w in wheels:
            self._write(
                "INSERT INTO packages (run_id, tenant, sandbox_id, at, name, version, wheel,"
                " sha256, size, requested) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    tenant,
                    sandbox_id,
                    now,
                    _cut(str(w["name"]), NAME_KEEP_BYTES),
                    _cut(str(w["version"]), NAME_KEEP_BYTES),
                    _cut(str(w["wheel"]), NAME_KEEP_BYTES),
                    str(w["sha256"]),
                    int(w["size"]),
                    int(bool(w["requested"])),
                ),
            )

    def packages(
        self, tenant: str | None = None, sandbox_id: str | None = None
    ) -> list[dict[str, Any]]:
        """The wheels handed in, oldest first (a tenant's, a sandbox's, or all)."""
        sql, params = "SELECT * FROM packages WHERE 1=1", list[str]()
        if tenant is not None:
            sql, params = sql + " AND tenant = ?", [*params, tenant]
        if sandbox_id is not None:
            sql, params = sql + " AND sandbox_id = ?", [*params, sandbox_id]
        rows = self._read(sql + " ORDER BY at, rowid", params)
        out = [{**dict(r), "requested": bool(r["requested"])} for r in rows]
        for r in out:
            r.pop("rowid", None)  # PostgreSQL's rowid is a column; SQLite's is not in *
        return out

    def approval_requested(self, request: dict[str, Any]) -> None:
        """A request starts waiting; its run (if any) is pending until a decision."""
        self._write(
            "INSERT INTO approvals (id, tenant, sandbox_id, run_id, client_ref, kind, subject,"
            " reasons, requested_at, expires_at, node) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                request["id"],
                request.get("tenant"),
                request.get("sandbox_id"),
                request.get("run_id"),
                request.get("client_ref"),
                request["kind"],
                _cut(str(request["subject"]), OUTPUT_KEEP_BYTES),
                _json(_reasons(request["reasons"])),
                request["requested_at"],
                request["expires_at"],
                self.node,
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
                (_json({"id": request["id"], **decision}), request["run_id"]),
            )

    def approvals(
        self, *, tenant: str | None = None, after_rowid: int = 0, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """A page of approval requests, oldest first: go on with after_rowid = the last
        page's last `rowid`."""
        sql = "SELECT rowid, * FROM approvals WHERE rowid > ?"
        params: list[Any] = [after_rowid]
        if tenant is not None:
            sql += " AND tenant = ?"
            params.append(tenant)
        out = []
        for row in self._read(sql + " ORDER BY rowid LIMIT ?", (*params, limit)):
            item = dict(row)
            item["reasons"] = json.loads(item["reasons"])
            item["approved"] = None if item["approved"] is None else bool(item["approved"])
            out.append(item)
        return out

    def decided_approvals(
        self, *, since: float, tenant: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        """Approvals decided since `since`, the latest first (the console's "just decided")."""
        sql = "SELECT rowid, * FROM approvals WHERE decided_at >= ?"
        params: list[Any] = [since]
        if tenant is not None:
            sql += " AND tenant = ?"
            params.append(tenant)
        rows = self._read(sql + " ORDER BY decided_at DESC LIMIT ?", (*params, limit))
        return [
            {**dict(r), "reasons": json.loads(r["reasons"]), "approved": bool(r["approved"])}
            for r in rows
        ]

    def mark_interrupted(self, node: str | None = None) -> int:
        """After a crash: the runs of `node` (this node by default) that started and never
        completed are marked interrupted, and its undecided approvals refused; so are rows
        from before nodes were recorded. Other nodes' runs are theirs. Returns the runs."""
        node = self.node if node is None else node
        db, conn, now = self.db, self._connect(), time.time()
        mine = " AND (node = ? OR node IS NULL)"
        try:
            db.begin(conn)
            cur = conn.execute(
                db.sql(
                    "UPDATE runs SET status='interrupted', outcome='interrupted', ended_at=?"
                    " WHERE status IN ('started', 'pending_approval')" + mine
                ),
                (now, node),
            )
            conn.execute(
                db.sql(
                    "UPDATE approvals SET decided_at=?, approved=0, decided_by='service stopped',"
                    " reason='the service stopped before an answer' WHERE decided_at IS NULL" + mine
                ),
                (now, node),
            )
            conn.execute("COMMIT")
            return int(cur.rowcount)
        except db.errors as exc:
            raise AuditUnavailable(f"the audit log ({db.label}) cannot be written: {exc}") from None
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
        """(tenant, role, key id) of an API key; the id is a prefix of its hash, for the log.
        From a database server, a key found is kept IDENTITY_TTL_S (every request asks: a
        cluster's front end and then its node); keys are never revoked, so nothing kept
        can go stale (one that is not found is asked again)."""
        digest = _key_hash(key)
        remote = self.db.local_dir is None
        if remote:
            kept = self._identities.get(digest)
            if kept is not None and time.monotonic() - kept[0] < IDENTITY_TTL_S:
                return kept[1]
        rows = self._read("SELECT tenant, role FROM api_keys WHERE key_sha256=?", (digest,))
        found = None if not rows else (str(rows[0]["tenant"]), str(rows[0]["role"]), digest[:12])
        if remote and found is not None:
            if len(self._identities) >= IDENTITIES_KEPT:
                self._identities.clear()
            self._identities[digest] = (time.monotonic(), found)
        return found

    # -- reading ---------------------------------------------------------------------------

    def _read(self, sql: str, params: Any = ()) -> list[Any]:
        """The rows of a query (they take dict()); AuditUnavailable if the database cannot
        be reached."""
        db = self.db
        try:
            with db.reading() as conn:
                return list(conn.execute(db.sql(sql), tuple(map(db.param, params))).fetchall())
        except db.errors as exc:
            raise AuditUnavailable(f"the audit log ({db.label}) cannot be read: {exc}") from None

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
        killed_by: str | None = None,
        before_rowid: int | None = None,
    ) -> list[dict[str, Any]]:
        """A page of runs, oldest first from `after_rowid`; with `before_rowid`, the page
        before that row, newest first (the console's order)."""
        clauses: list[str] = ["rowid > ?"]
        params: list[Any] = [after_rowid]
        if before_rowid is not None:
            clauses.append("rowid < ?")
            params.append(before_rowid)
        filters = (
            ("tenant", tenant),
            ("sandbox_id", sandbox_id),
            ("outcome", outcome),
            ("killed_by", killed_by),
        )
        for column, value in filters:
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(valid(value))  # e.g. an undecodable argv byte: no match, no crash
        if since is not None:
            clauses.append("started_at >= ?")
            params.append(since)
        if until is not None:
            clauses.append("started_at < ?")
            params.append(until)
        order = "rowid DESC" if before_rowid is not None else "rowid"
        sql = f"SELECT rowid, * FROM runs WHERE {' AND '.join(clauses)} ORDER BY {order} LIMIT ?"
        return [_row(r) for r in self._read(sql, (*params, limit))]

    def run(self, run_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        sql, params = "SELECT rowid, * FROM runs WHERE id = ?", [run_id]
        if tenant is not None:
            sql += " AND tenant = ?"
            params.append(tenant)
        rows = self._read(sql, params)
        return _row(rows[0]) if rows else None

    def iter_runs(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every run that matches `filters` (those of runs()), in order, a page at a time:
        nothing is held in memory but one page."""
        after = int(filters.pop("after_rowid", 0))
        while True:
            page = self.runs(after_rowid=after, limit=BATCH, **filters)
            yield from page
            if len(page) < BATCH:
                return
            after = page[-1]["rowid"]

    def prune(self, before: float) -> int:
        """Delete finished runs (and decided approvals) started before `before` (Unix
        time), a chunk per transaction. Returns how many runs were deleted. The file keeps
        its size (SQLite reuses the pages); VACUUM gives them back."""
        conn = self._connect()
        try:
            total = 0
            while (deleted := _prune_chunk(self.db, conn, before)) > 0:
                total += deleted
            return total
        finally:
            conn.close()

    def vacuum(self) -> None:
        conn = self._connect()
        try:
            conn.execute("VACUUM")
        finally:
            conn.close()

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._writer.join(timeout=30)
        self.db.close()


def _image_rows(run_id: str, images: list[tuple[str, bytes]]) -> list[tuple[str, tuple[Any, ...]]]:
    """The run_images rows of a run's images, within IMAGES_KEEP and IMAGE_KEEP_BYTES."""
    rows: list[tuple[str, tuple[Any, ...]]] = []
    budget, now = IMAGE_KEEP_BYTES, time.time()
    for mime, data in images:
        if len(rows) == IMAGES_KEEP:
            break
        if len(data) > budget:
            continue
        budget -= len(data)
        digest = hashlib.sha256(data).hexdigest()
        encoded = base64.b64encode(data).decode()
        rows.append(
            (
                "INSERT INTO run_images (run_id, at, idx, mime, size, sha256, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, now, len(rows), mime, len(data), digest, encoded),
            )
        )
    return rows


def _key_hash(key: str) -> str:
    # API keys are 256-bit random strings: a plain hash is enough, nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


def _row(row: Any) -> dict[str, Any]:
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
