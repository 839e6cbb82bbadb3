"""Service figures: HTTP execute latency, audit-log throughput (group commit)."""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from baselines import rate, timed

import codecage
from codecage._service.audit import AuditLog

Figures = dict[str, dict[str, float]]


def start(db: Path, pool_size: int = 0) -> tuple[subprocess.Popen[bytes], str, str]:
    key = subprocess.run(
        [sys.executable, "-m", "codecage", "keys", "create", "--tenant", "bench", "--db", str(db)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    config = db.with_suffix(".toml")
    config.write_text(  # the default ceiling with pids_max 64: 1000 x 64 must fit the total
        f"pool_size = {pool_size}\n[quotas]\nlive_sandboxes = 1000\nruns_per_minute = 10000000\n"
        "concurrent_requests = 64\n"
        "[ceiling]\nmemory_mb = 4096\ncpu_cores = 2.0\ncpu_s = 3600\npids_max = 64\n"
        "disk_mb = 4096\ntmp_mb = 1024\nshm_mb = 1024\ntimeout_s = 600\n"
        "idle_timeout_s = 3600\noutput_bytes = 16777216\n"
    )
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "codecage", "serve", "--db", str(db), "--port", str(port), "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # idle sandboxes use a few pids each: the benchmark declares its over-commit
        env={**os.environ, "CODECAGE_TOTAL_PIDS": "65536"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url, key
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the service did not start")


@contextlib.contextmanager
def running_service() -> Iterator[codecage.Client]:
    """A `codecage serve` in a scratch directory and a client of it; stopped afterwards."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        proc, url, key = start(Path(tmp) / "audit.db")
        try:
            with codecage.connect(url, key) as client:
                yield client
        finally:
            proc.terminate()
            proc.wait()


def http_figures(
    results: Figures, ratios: dict[str, float], measure: Callable[..., dict[str, float]], n: int
) -> None:
    print(
        "HTTP: execute 1+1 on a warm sandbox (audit records included), vs GET /healthz", flush=True
    )
    with running_service() as client, client.Sandbox() as sbx:
        for _ in range(50):
            sbx.run_code("1+1")
        results["http_execute_round_trip"] = measure(lambda: timed(lambda: sbx.run_code("1+1")), n)
        http = client._http
        results["baseline_http_empty_route"] = measure(
            lambda: timed(lambda: http.get("/healthz")), n
        )
        results["recorded_runs_per_second_8_clients"] = _throughput(client, 8, 6.0)
    ratios["http_execute_over_empty_route"] = (
        results["http_execute_round_trip"]["p50_ms"]
        / results["baseline_http_empty_route"]["p50_ms"]
    )


def service_at_scale(
    results: Figures, ratios: dict[str, float], measure: Callable[..., dict[str, float]], live: int
) -> None:
    """Is the service still responsive with `live` idle sandboxes? HTTP execute latency on
    one sandbox, with nothing else alive and then with `live` others alive."""
    print(f"service responsiveness: HTTP execute with 1 and with {live} live sandboxes", flush=True)
    with running_service() as client, client.Sandbox() as sbx:
        for _ in range(30):
            sbx.run_code("1+1")
        results["http_execute_1_live"] = measure(lambda: timed(lambda: sbx.run_code("1+1")), 200)
        idle = [client.Sandbox() for _ in range(live - 1)]
        for other in idle:
            other.run_code("print(1)")
        for _ in range(30):
            sbx.run_code("1+1")
        results[f"http_execute_{live}_live"] = measure(
            lambda: timed(lambda: sbx.run_code("1+1")), 200
        )
        results[f"http_healthz_{live}_live"] = measure(
            lambda: timed(lambda: client._http.get("/healthz")), 200
        )
        for other in idle:
            other.kill()
    ratios[f"http_execute_{live}_live_over_1_live"] = (
        results[f"http_execute_{live}_live"]["p50_ms"] / results["http_execute_1_live"]["p50_ms"]
    )


def _throughput(client: codecage.Client, clients: int, seconds: float) -> dict[str, float]:
    sandboxes = [client.Sandbox() for _ in range(clients)]
    try:
        runs = rate(lambda i: sandboxes[i].run_code("1+1"), clients, seconds)
    finally:
        for sbx in sandboxes:
            sbx.kill()
    return {"p50_ms": runs, "p99_ms": float("nan"), "n": round(runs * seconds)}


def audit_figures(results: Figures, ratios: dict[str, float]) -> None:
    print(
        "audit log: recorded runs per second, 16 writer threads, group commit vs one commit each",
        flush=True,
    )
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        log = AuditLog(Path(tmp) / "audit.db")
        grouped = _audit_rate(lambda i: _record(log, i), threads=16, seconds=4.0)
        log.close()
        plain = _audit_rate(_plain_writer(Path(tmp) / "plain.db"), threads=1, seconds=4.0)
    results["audit_runs_per_second_group_commit"] = {
        "p50_ms": grouped,
        "p99_ms": float("nan"),
        "n": 0,
    }
    results["baseline_audit_runs_per_second_commit_each"] = {
        "p50_ms": plain,
        "p99_ms": float("nan"),
        "n": 0,
    }
    ratios["audit_group_commit_over_commit_each"] = grouped / plain


def _record(log: AuditLog, i: int) -> None:
    run_id = f"{threading.get_ident()}-{i}"
    log.start_run(run_id=run_id, tenant="t", sandbox_id="s", kind="execute", code="1+1", policy={})
    log.complete_run(run_id, outcome="ok", output="2")


def _plain_writer(path: Path) -> Callable[[int], None]:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, status TEXT, output TEXT)")

    def write(i: int) -> None:  # the same two durable writes a run needs, one commit each
        conn.execute("INSERT INTO runs VALUES (?, 'started', '')", (str(i),))
        conn.execute("UPDATE runs SET status='completed', output='2' WHERE id=?", (str(i),))

    return write


def _audit_rate(record: Callable[[int], None], threads: int, seconds: float) -> float:
    ids = itertools.count()  # unique run ids across threads
    return rate(lambda _: record(next(ids)), threads, seconds)
