"""A real cluster for the tests (codecage._cluster.local): a Ray head, two sandbox nodes and
a PostgreSQL on loopback, two real front ends. One per test process (the `cluster` fixture
in tests/conftest.py: a start costs ~15 s); a test that kills a node adds a node of its own
first (`Running.add_node`) and kills that one, so the cluster goes on for the next test."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

import codecage
from codecage._cluster import local
from codecage._service.audit import AuditLog

from .conftest import cli, free_port, stop_process


@dataclass
class Running:
    cluster: local.Cluster
    key: str
    other_key: str  # tenant bob's
    fronts: list[subprocess.Popen[bytes]]
    urls: list[str]

    def client(self, front: int = 0) -> codecage.Client:
        return codecage.connect(self.urls[front], self.key)

    def audit(self) -> AuditLog:
        return AuditLog(self.cluster.db)

    def live_nodes(self) -> int:
        """Sandbox nodes whose raylet runs (the head's is the other)."""
        return len(local.raylets(self.cluster.directory)) - 1

    def settle(self) -> None:
        """Wait until every front end counts the nodes that run (a killed one dropped)."""
        want = self.live_nodes()
        for url in self.urls:
            assert wait_for(lambda url=url: _nodes(url) == want, 60), f"{url}: not {want} nodes"

    def add_node(self) -> int:
        """A sandbox node of the calling test's own, seen by every front end: its raylet's
        pid (a test kills that one, never the two the others share)."""
        before = set(local.raylets(self.cluster.directory))
        local.add_node(self.cluster, 2)
        (raylet,) = set(local.raylets(self.cluster.directory)) - before
        self.settle()
        return raylet

    @staticmethod
    def prefix_of(raylet: int) -> str:
        argv = Path(f"/proc/{raylet}/cmdline").read_bytes().split(b"\0")
        (node_id,) = [a for a in argv if a.startswith(b"--node_id=")]
        return node_id.split(b"=", 1)[1][:8].decode()

    def raylet_of(self, sandbox_id: str) -> int:
        """The raylet of the node a sandbox is on (its node host is that raylet's child)."""
        prefix = sandbox_id[:8]
        for pid in local.raylets(self.cluster.directory):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            if f"--node_id={prefix}".encode() in argv:
                return pid
        raise AssertionError(f"no raylet for node {prefix}")


# Room for a batch of 2,000 one-shot runs in well under a minute (the default quota is
# 600 runs per minute), with a ceiling whose processes fit the quota (check_fits).
CONFIG = """
[quotas]
runs_per_minute = 100000
live_sandboxes = 32
[ceiling]
pids_max = 64
"""


def start_front(cluster: local.Cluster, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = Path(cluster.directory) / "service.toml"
    config.write_text(CONFIG)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "codecage", "serve", "--cluster", "local",
             "--cluster-dir", cluster.directory, "--port", str(port), "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=out,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if _nodes(url) == len(local.raylets(cluster.directory)) - 1:  # every live node
                return process, url
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    process.wait()
    raise RuntimeError(f"the front end did not start: {log.read_text()[-3000:]}")


@contextlib.contextmanager
def running_cluster() -> Iterator[Running]:
    """Start a cluster and its front ends; stop them all."""
    where = Path(tempfile.mkdtemp(prefix="cc-"))  # short: Ray's socket paths are bounded
    fronts: list[subprocess.Popen[bytes]] = []
    try:
        running = local.up(2, where, cpus_per_node=2)
        key = cli("keys", "create", "--tenant", "alice", "--db", running.db)
        other = cli("keys", "create", "--tenant", "bob", "--db", running.db)
        urls = []
        for n in range(2):
            front, url = start_front(running, where / f"front{n}.log")
            fronts.append(front)
            urls.append(url)
        yield Running(running, key, other, fronts, urls)
    finally:
        for front in fronts:
            stop_process(front)
        local.down(where)
        shutil.rmtree(where, ignore_errors=True)


def _nodes(url: str) -> int | None:
    """The sandbox nodes a front end counts (None: it does not answer)."""
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        answer = httpx.get(f"{url}/healthz", timeout=2)
        if answer.status_code == 200:
            return int(answer.json()["nodes"])
    return None


def runs_of(audit: AuditLog, **where: Any) -> list[dict[str, Any]]:
    return [r for r in audit.iter_runs() if all(r[k] == v for k, v in where.items())]


def wait_for(predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()
