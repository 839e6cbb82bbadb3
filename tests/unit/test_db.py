"""The audit log's database seam (codecage._service.db) without a server: how SQLite's SQL
becomes PostgreSQL's, and what a URL shows. The real PostgreSQL runs in tests/test_audit*."""

from __future__ import annotations

from pathlib import Path

import pytest

from codecage._service.audit import MIGRATIONS
from codecage._service.db import (
    SQLite,
    is_postgres,
    open_database,
    postgres_ddl,
    redacted,
    statements,
)


def test_a_url_is_postgres_and_anything_else_a_file(tmp_path: Path) -> None:
    assert is_postgres("postgresql://u@h/db") and is_postgres("postgres://h/db")
    assert not is_postgres("postgresql.db") and not is_postgres(tmp_path / "postgresql://x")
    assert isinstance(open_database(tmp_path / "a.db"), SQLite)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://codecage:s3cr%40t@127.0.0.1:5432/db", "postgresql://codecage:***@127.0.0.1:5432/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://h/db?sslmode=require", "postgresql://h/db?sslmode=require"),
        ("postgresql://h/db?user=u&password=s3cr", "postgresql://h/db?user=u&password=***"),
        ("postgresql://u:s3cr@h/db?PASSWORD=s3cr", "postgresql://u:***@h/db?PASSWORD=***"),
    ],
)  # fmt: skip
def test_a_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redacted(url) == shown and "s3cr" not in redacted(url)


def test_every_table_gets_a_rowid_and_times_are_eight_bytes() -> None:
    ddl = [postgres_ddl(s) for script in MIGRATIONS for s in statements(script)]
    creates = [s for s in ddl if s.startswith("CREATE TABLE")]
    assert len(creates) == 5  # runs, api_keys, approvals, packages, run_images
    assert all("(rowid BIGSERIAL NOT NULL UNIQUE, " in s for s in creates)
    assert not any(" REAL" in s for s in ddl)
    assert "started_at DOUBLE PRECISION NOT NULL" in " ".join(ddl)
    # what is not a CREATE TABLE or a REAL column is left as written
    assert postgres_ddl("CREATE INDEX runs_time ON runs (started_at)") == (
        "CREATE INDEX runs_time ON runs (started_at)"
    )


def test_placeholders_and_rowid_in_postgres_words() -> None:
    from codecage._service.db import Postgres

    pg = Postgres.__new__(Postgres)  # its SQL words need no server
    assert pg.sql("SELECT rowid, * FROM runs WHERE id = ? AND rowid > ?") == (
        "SELECT * FROM runs WHERE id = %s AND rowid > %s"
    )
    assert pg.param("a\x00b") == "a\ufffdb" and pg.param(3) == 3
    assert SQLite.sql(SQLite.__new__(SQLite), "a = ?") == "a = ?"
