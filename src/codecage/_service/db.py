"""The audit log's database, behind one seam: SQLite (a file) or PostgreSQL (psycopg 3).

`open_database(target)`: a `postgresql://` (or `postgres://`) URL is PostgreSQL, anything
else is the path of an SQLite file. The audit log (audit.py) writes its SQL once, in
SQLite's words; a database says how it differs:

- placeholders are `?` (psycopg's `%s` in PostgreSQL);
- every table has a `rowid`: SQLite's own, a `BIGSERIAL` column in PostgreSQL (so the
  pages of a listing are read by it alike), and `SELECT rowid, *` is `SELECT *` there;
- `REAL` in a migration is `DOUBLE PRECISION` in PostgreSQL (its `REAL` is 4 bytes: a
  Unix time in it is off by minutes);
- a write transaction is `BEGIN IMMEDIATE` in SQLite (one writer at a time), `BEGIN` in
  PostgreSQL; both commit durably (SQLite `synchronous=FULL`, PostgreSQL's default
  `synchronous_commit=on`);
- the schema's version is SQLite's `user_version`, a one-row table `codecage_schema` in
  PostgreSQL, migrated under an advisory lock (several front ends start at once);
- PostgreSQL's text cannot hold NUL: a NUL in a text parameter is stored as U+FFFD;
- failing to reach the database is `errors` (the audit log makes it AuditUnavailable:
  a 503, and nothing runs).

Reads take a connection with `reading()`: a connection per thread for SQLite; for
PostgreSQL, at most READERS at once (a front end's threads would otherwise hold a server
connection each), kept between reads and checked when one has been idle a while (a server
that restarted closed it), else opened anew: a server that is back is used at once.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
CONNECT_TIMEOUT_S = 5  # a database that does not answer is unavailable, not a hang
STATEMENT_TIMEOUT_MS = 30_000
READERS = 4  # PostgreSQL connections reading at once, per process
IDLE_CHECK_S = 1.0  # a kept connection idle longer is checked before it is used
MIGRATION_LOCK = 0x636F6465  # pg_advisory_xact_lock's key for migrations ("code")


def is_postgres(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


def open_database(target: str | Path) -> Database:
    return Postgres(str(target)) if is_postgres(target) else SQLite(Path(target))


def redacted(url: str) -> str:
    """A database URL as it may be shown: without its password (in its user part, or as
    libpq's `password=` parameter of its query)."""
    parts = urllib.parse.urlsplit(url)
    if parts.query:
        query = [
            (k, "***" if k.lower() == "password" else v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urllib.parse.urlencode(query, safe="*"))
    if parts.password is not None:
        netloc = parts.netloc.rpartition("@")[2]
        user = urllib.parse.quote(parts.username or "", safe="")
        parts = parts._replace(netloc=f"{user}:***@{netloc}")
    return urllib.parse.urlunsplit(parts)


class Database:
    """What the audit log needs of a database. Connections are DB-API-like: `execute(sql,
    params)` returns a cursor with `fetchone`, `fetchall` and `rowcount`; reading ones give
    rows that `dict()` takes."""

    label: str  # for messages and `codecage doctor`: a path, or a URL without its password
    errors: tuple[type[BaseException], ...]
    local_dir: Path | None = None  # the directory whose free space bounds the log, if any

    def connect(self) -> Any:
        """A connection of its own (the writer's, a maintenance pass): autocommit, explicit
        transactions."""
        raise NotImplementedError

    def reading(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def sql(self, text: str) -> str:
        return text

    def param(self, value: Any) -> Any:
        return value

    def begin(self, conn: Any) -> None:
        raise NotImplementedError

    def in_transaction(self, conn: Any) -> bool:
        raise NotImplementedError

    def migrate(self, migrations: list[str]) -> None:
        raise NotImplementedError

    def usable(self, conn: Any) -> bool:
        """False once a connection is known lost: the writer opens another."""
        return True

    def alive(self, conn: Any) -> bool:
        """Whether a connection idle for a while still reaches the database (a server that
        restarted closed it): asked before a write, so that the write is not the one to
        find out."""
        return True

    def close(self) -> None:
        """Let go of the readers' connections."""


class SQLite(Database):
    errors = (sqlite3.Error,)

    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = str(path)
        self.local_dir = path.parent
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    @contextlib.contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self.connect()
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        yield conn

    def begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def in_transaction(self, conn: sqlite3.Connection) -> bool:
        return conn.in_transaction

    def migrate(self, migrations: list[str]) -> None:
        conn = self.connect()
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(migrations[version:], start=version + 1):
                conn.execute("BEGIN IMMEDIATE")
                for statement in statements(script):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={number}")
                conn.execute("COMMIT")
        finally:
            conn.close()


def statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


_CREATE_TABLE = re.compile(r"^CREATE TABLE (\w+) \(", re.IGNORECASE)
_REAL = re.compile(r"\bREAL\b")


def postgres_ddl(statement: str) -> str:
    """One statement of a migration in PostgreSQL's words: a `rowid` column on every table,
    8-byte floats."""
    statement = _CREATE_TABLE.sub(r"CREATE TABLE \1 (rowid BIGSERIAL NOT NULL UNIQUE, ", statement)
    return _REAL.sub("DOUBLE PRECISION", statement)


class Postgres(Database):
    def __init__(self, url: str) -> None:
        import psycopg

        self.url = url
        self.label = redacted(url)
        self.errors = (psycopg.Error, OSError)  # TimeoutError (no reader free) is an OSError
        self._idle: list[tuple[float, psycopg.Connection[Any]]] = []
        self._idle_lock = threading.Lock()
        self._readers = threading.BoundedSemaphore(READERS)

    def _kwargs(self) -> dict[str, Any]:
        return {
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT_S,
            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            "application_name": f"codecage-{os.getpid()}",
        }

    def connect(self) -> psycopg.Connection[Any]:
        import psycopg

        return psycopg.connect(self.url, **self._kwargs())

    @contextlib.contextmanager
    def reading(self) -> Iterator[psycopg.Connection[Any]]:
        from psycopg.rows import dict_row

        if not self._readers.acquire(timeout=CONNECT_TIMEOUT_S):
            raise TimeoutError(f"all {READERS} readers of the audit log are busy")
        try:
            conn = None
            with self._idle_lock:
                if self._idle:
                    used, conn = self._idle.pop()
            if conn is not None and (
                not self.usable(conn)
                or (time.monotonic() - used > IDLE_CHECK_S and not self.alive(conn))
            ):
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
            if conn is None:
                conn = self.connect()
                conn.row_factory = dict_row
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.close()
                raise
            if self.usable(conn):
                with self._idle_lock:
                    self._idle.append((time.monotonic(), conn))
        finally:
            self._readers.release()

    def sql(self, text: str) -> str:
        return text.replace("rowid, *", "*").replace("?", "%s")

    def param(self, value: Any) -> Any:
        return value.replace("\x00", "\ufffd") if isinstance(value, str) else value

    def begin(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("BEGIN")

    def in_transaction(self, conn: psycopg.Connection[Any]) -> bool:
        from psycopg.pq import TransactionStatus

        return conn.info.transaction_status != TransactionStatus.IDLE

    def usable(self, conn: psycopg.Connection[Any]) -> bool:
        return not (conn.closed or conn.broken)

    def alive(self, conn: psycopg.Connection[Any]) -> bool:
        try:
            conn.execute("SELECT 1")
        except self.errors:
            return False
        return True

    def migrate(self, migrations: list[str]) -> None:
        with self.connect() as conn:
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS codecage_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM codecage_schema").fetchone()
            if row is None:
                conn.execute("INSERT INTO codecage_schema VALUES (0)")
            version = 0 if row is None else int(row[0])
            for script in migrations[version:]:
                for statement in statements(script):
                    conn.execute(postgres_ddl(statement))
            if version < len(migrations):  # a newer schema (a newer front end) stays
                conn.execute("UPDATE codecage_schema SET version = %s", (len(migrations),))
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for _, conn in idle:
            with contextlib.suppress(Exception):
                conn.close()
