"""The cluster's figures, each beside its baseline measured in the same run:

- batch throughput (`client.map` of one-shot runs with the data stack importable) through a
  front end of a cluster of 1 node and of 2 nodes, against the single-node service's
  `POST /v1/batch` and against `python -c` with the same imports (the floor of a fresh
  interpreter per run); on this 2-core machine a second node is overhead, not scaling;
- the session round trip (`run_code("1")`) through a front end against the single-node
  service;
- the audit log in PostgreSQL against SQLite: recorded runs per second, 16 threads.

Runnable alone: `.venv/bin/python benchmarks/cluster.py [--quick]` (prints JSON).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from service import _audit_rate, _record, running_service

import codecage
from codecage._cluster import local, postgres
from codecage._service.audit import AuditLog

Figures = dict[str, dict[str, float]]
CELL = "import numpy, pandas\nprint(1 + 1)"  # a short cell, the data stack importable
CONFIG = (
    "[quotas]\nlive_sandboxes = 64\nruns_per_minute = 10000000\nconcurrent_requests = 64\n"
    "[ceiling]\npids_max = 64\n"
)


@contextlib.contextmanager
def front_end(nodes: int) -> Iterator[codecage.Client]:
    """A cluster of `nodes` sandbox nodes on this machine and a front end of it."""
    where = Path(tempfile.mkdtemp(prefix="ccb-"))
    proc = None
    try:
        cluster = local.up(nodes, where, cpus_per_node=2)
        key = subprocess.run(
            [sys.executable, "-m", "codecage", "keys", "create", "--tenant", "bench", "--db", cluster.db],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        (where / "service.toml").write_text(CONFIG)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "codecage", "serve", "--cluster", "local", "--cluster-dir",
             str(where), "--port", str(port), "--config", str(where / "service.toml")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        for _ in range(1800):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).json().get("nodes") == nodes:
                    break
            time.sleep(0.1)
        with codecage.connect(url, key) as client:
            yield client
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        local.down(where)
        shutil.rmtree(where, ignore_errors=True)


def batch_rate(client: codecage.Client, runs: int) -> float:
    client.map([CELL] * 8, concurrency=4)  # warm: the nodes' templates, the connection
    started = time.perf_counter()
    results = client.map([CELL] * runs, concurrency=4)
    elapsed = time.perf_counter() - started
    assert all(isinstance(r, codecage.Execution) and r.error is None for r in results)
    return runs / elapsed


def python_c_rate(runs: int) -> float:
    """Fresh interpreters of the sandbox runtime with the same imports, 4 at a time: the
    floor of a cold process per run."""
    from codecage._jail.template import Runtime

    runtime = Runtime.default()
    argv, env = [str(runtime.python), "-c", CELL], runtime.base_env()
    started = time.perf_counter()
    for _ in range(0, runs, 4):
        procs = [subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL) for _ in range(4)]
        assert all(p.wait() == 0 for p in procs)
    return runs / (time.perf_counter() - started)


def round_trip(client: codecage.Client, n: int) -> list[float]:
    sbx = client.Sandbox()
    try:
        sbx.run_code("1")
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            sbx.run_code("1")
            samples.append((time.perf_counter() - t) * 1000)
        return samples
    finally:
        sbx.kill()


def _rate(value: float) -> dict[str, float]:
    return {"p50_ms": value, "p99_ms": float("nan"), "n": 0}


def cluster_figures(
    results: Figures, ratios: dict[str, float], measure: Callable[..., dict[str, float]], n: int
) -> None:
    runs = 100 if n <= 10 else 400
    print(f"cluster: batch of {runs} one-shot runs, round trips, audit in PostgreSQL", flush=True)
    with running_service() as client:
        single = batch_rate(client, runs)
        rt_single = round_trip(client, n * 5)
    with front_end(1) as client:
        one = batch_rate(client, runs)
        rt_front = round_trip(client, n * 5)
    with front_end(2) as client:
        two = batch_rate(client, runs)
    floor = python_c_rate(runs // 2)
    results["batch_runs_per_second_single_node_service"] = _rate(single)
    results["batch_runs_per_second_cluster_1_node"] = _rate(one)
    results["batch_runs_per_second_cluster_2_nodes"] = _rate(two)
    results["baseline_python_c_same_imports_per_second"] = _rate(floor)
    ratios["batch_cluster_1_node_over_single_node"] = one / single
    ratios["batch_cluster_2_nodes_over_1_node"] = two / one
    ratios["batch_single_node_over_python_c"] = single / floor
    ratios["cluster_overhead_ms_per_run"] = 1000 / one - 1000 / single
    results["session_round_trip_front_end"] = _samples(rt_front)
    results["baseline_session_round_trip_single_node"] = _samples(rt_single)
    ratios["round_trip_front_end_over_single_node"] = (
        results["session_round_trip_front_end"]["p50_ms"]
        / results["baseline_session_round_trip_single_node"]["p50_ms"]
    )
    audit_postgres_figures(results, ratios)


def _samples(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": ordered[len(ordered) // 2],
        "p99_ms": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "n": len(ordered),
    }


def audit_postgres_figures(results: Figures, ratios: dict[str, float]) -> None:
    where = Path(tempfile.mkdtemp(prefix="ccpg-"))
    try:
        server = postgres.start(where)
        pg = AuditLog(server.url())
        on_pg = _audit_rate(lambda i: _record(pg, i), threads=16, seconds=4.0)
        pg.close()
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            lite = AuditLog(Path(tmp) / "audit.db")
            on_sqlite = _audit_rate(lambda i: _record(lite, i), threads=16, seconds=4.0)
            lite.close()
    finally:
        postgres.stop(where)
        shutil.rmtree(where, ignore_errors=True)
    results["audit_runs_per_second_postgres"] = _rate(on_pg)
    results["baseline_audit_runs_per_second_sqlite"] = _rate(on_sqlite)
    ratios["audit_postgres_over_sqlite"] = on_pg / on_sqlite


if __name__ == "__main__":
    figures: Figures = {}
    rates: dict[str, float] = {}
    cluster_figures(figures, rates, lambda *a, **k: {}, 10 if "--quick" in sys.argv else 40)
    print(json.dumps({"results": figures, "ratios": rates}, indent=2))
