"""Attacks on the cluster's new surfaces, on a real cluster (tests/test_cluster.py's fixture:
a Ray head, two sandbox nodes and a PostgreSQL on loopback, two real front ends): headers
the front end and a node would read differently, an E2B sandbox id that is no id, a batch
over one node's limit, secrets in the cluster's files, and the database going away under
the front end. Each refusal has its control: the same request, well-formed, goes through."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from codecage._cluster import local, postgres

from .cluster_kit import Running, wait_for
from .conftest import cli

ray = pytest.importorskip("ray", reason="Ray is not installed (make installs it)")


def test_headers_ids_and_batches_a_node_would_read_otherwise(cluster: Running) -> None:
    url = cluster.urls[0]
    alice = ("Authorization", f"Bearer {cluster.key}")
    bob = ("Authorization", f"Bearer {cluster.other_key}")

    def listing(who: tuple[str, str]) -> set[str]:
        answer = httpx.get(f"{url}/v1/sandboxes", headers=[who], timeout=30)
        assert answer.status_code == 200, answer.text
        return {s["id"] for s in answer.json()}

    # Two Authorization headers: the front end read the first (admitted, counted and
    # placed alice), the node the last (made bob's sandbox). Refused before any node.
    twice = httpx.post(f"{url}/v1/sandboxes", headers=[alice, bob], json={}, timeout=60)
    assert twice.status_code == 400, twice.text
    assert listing(bob) == set() and listing(alice) == set()
    # The control: the same create with one header is bob's.
    made = httpx.post(f"{url}/v1/sandboxes", headers=[bob], json={}, timeout=60)
    assert made.status_code in (200, 201), made.text
    sandbox_id = made.json()["id"]
    assert listing(bob) == {sandbox_id} and listing(alice) == set()
    prefix = sandbox_id[:8]  # a node's prefix: every id of that node shows it

    # An E2B sandbox id that is a node's prefix and junk after it: no key is needed to
    # send one, and each was asked of the node and kept (10,000 of them before the cache
    # was cleared). Now: not found at once, nothing asked (tests/unit/test_frontend.py
    # shows nothing kept). Headers of a megabyte are not read at all (a closed connection).
    junk = {"E2b-Sandbox-Id": prefix + "f" * (16 << 10), "E2b-Sandbox-Port": "49983"}
    answer = httpx.get(f"{url}/health", headers=junk, timeout=30)
    assert answer.status_code == 502 and len(answer.content) < 1000
    junk["E2b-Sandbox-Id"] = prefix + "f" * (1 << 20)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", headers=junk, timeout=30)
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200  # and it serves on
    # The control: a well-formed id of that node, not one of its sandboxes, is not found
    # either, and a sandbox E2B's API made is reached by its id and token.
    other = {"E2b-Sandbox-Id": prefix + "0" * 24, "E2b-Sandbox-Port": "49983"}
    assert httpx.get(f"{url}/health", headers=other, timeout=30).status_code == 502
    e2b = httpx.post(
        f"{url}/sandboxes", headers={"X-API-KEY": cluster.key}, json={"templateID": "base"},
        timeout=60,
    )  # fmt: skip
    assert e2b.status_code == 201, e2b.text
    e2b_id, token = e2b.json()["sandboxID"], e2b.json()["envdAccessToken"]
    ports = {"E2b-Sandbox-Id": e2b_id, "E2b-Sandbox-Port": "49983", "X-Access-Token": token}
    assert httpx.get(f"{url}/health", headers=ports, timeout=30).status_code in (200, 204)
    # ... and not with its id given twice (the second another sandbox's), nor its token.
    doubled = [*ports.items(), ("E2b-Sandbox-Id", sandbox_id)]
    assert httpx.get(f"{url}/health", headers=doubled, timeout=30).status_code == 400
    doubled = [*ports.items(), ("X-Access-Token", "guess")]
    assert httpx.get(f"{url}/health", headers=doubled, timeout=30).status_code == 400

    # A batch one over a node's limit: dealt out, each node's half passed (and a refused
    # half came back as a line per run). It is one batch: the node's own 422, whole.
    from codecage._service.app import MAX_BATCH

    over = {"codes": [""] * (MAX_BATCH + 1), "policy": {"memory_mb": 1 << 30}}
    answer = httpx.post(f"{url}/v1/batch", headers=[alice], json=over, timeout=120)
    assert answer.status_code == 422, answer.text[:500]
    deep = b'{"codes": ' + b"[" * 200_000 + b"}"
    answer = httpx.post(f"{url}/v1/batch", headers=[alice], content=deep, timeout=120)
    assert 400 <= answer.status_code < 500, answer.text[:500]
    # The control: a batch within the limit runs, over both nodes.
    answer = httpx.post(
        f"{url}/v1/batch", headers=[alice], json={"codes": ["print(1)", "print(2)"]}, timeout=120
    )
    lines = [json.loads(line) for line in answer.text.splitlines() if line.strip()]
    assert answer.status_code == 200 and lines[-1]["ok"] == 2, answer.text[:1000]

    httpx.delete(f"{url}/v1/sandboxes/{sandbox_id}", headers=[bob], timeout=60)
    httpx.delete(f"{url}/sandboxes/{e2b_id}", headers={"X-API-KEY": cluster.key}, timeout=60)

    # `codecage cluster status` says what runs (it raised NameError).
    status = json.loads(cli("cluster", "status", "--dir", cluster.cluster.directory))
    assert status["nodes"] == 2 and status["raylets"] == 3


def _secrets(running: Running) -> dict[str, str]:
    directory = Path(running.cluster.directory)
    return {
        "the database's password": (directory / "postgres" / "password").read_text().strip(),
        "Ray's token": (directory / "ray-token").read_text().strip(),
    }


def test_the_clusters_files_and_its_database_going_away(cluster: Running) -> None:
    directory = Path(cluster.cluster.directory)
    url = cluster.urls[0]
    alice = {"Authorization": f"Bearer {cluster.key}"}
    with cluster.client(0) as client:  # the nodes have served a run: their logs are written
        assert client.run("print(6 * 7)").logs.stdout == ["42\n"]
    secrets = _secrets(cluster)
    for name in ("ray-token", "cluster.json", "postgres/password"):
        mode = stat.S_IMODE((directory / name).stat().st_mode)
        assert mode == 0o600, f"{name} is {mode:o}"
    # No file another user of the machine may read holds a secret (Ray's logs and session
    # files, the front ends' logs, PostgreSQL's). The control: the secret files do.
    readable: list[Path] = []
    for path in directory.rglob("*"):
        with contextlib.suppress(OSError):
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o004 and st.st_size < 64 << 20:
                readable.append(path)
    assert readable  # Ray's own logs at least
    for path in readable:
        text = path.read_bytes()
        for what, secret in secrets.items():
            assert secret.encode() not in text, f"{path} (mode o+r) holds {what}"
    assert secrets["Ray's token"].encode() in (directory / "ray-token").read_bytes()

    # Listening addresses: Ray's ports on 127.0.0.2, PostgreSQL's on 127.0.0.1, none on
    # every address.
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=False)
    wide: list[str] = []
    if listening.returncode == 0:
        ours = {str(p) for p in local.raylets(directory)}
        for line in listening.stdout.splitlines():
            local_address = line.split()[3]
            mine = any(f"pid={pid}," in line for pid in ours)
            if mine and not local_address.startswith("127.0.0.2:"):
                wide.append(" ".join(line.split()))

    # The database stops: a request is a 503 in seconds (never a hang, never a 500) that
    # names neither the database's address nor its user; the front end's health still
    # answers; nothing reaches a log with the password. The key is one no one has used:
    # a key found in the last 5 s is kept (audit.IDENTITY_TTL_S), alice's would pass.
    fresh = {
        "Authorization": f"Bearer {cli('keys', 'create', '--tenant', 'carol', '--db', cluster.cluster.db)}"
    }
    postgres.stop(directory / "postgres")
    try:
        port = (directory / "postgres" / "port").read_text().strip()
        for path, headers in (("/v1/sandboxes", fresh), ("/v2/sandboxes", {"X-API-KEY": "x"})):
            began = time.monotonic()
            answer = httpx.get(url + path, headers=headers, timeout=60)
            took = time.monotonic() - began
            assert answer.status_code == 503, answer.text
            assert took < 15, f"{took:.1f} s"
            for leak in (port, "127.0.0.1", "postgresql://", "codecage:"):
                assert leak not in answer.text, answer.text
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    finally:
        postgres.start(directory / "postgres")
    # The control: the database back, the same request is answered.
    assert wait_for(
        lambda: httpx.get(f"{url}/v1/sandboxes", headers=alice, timeout=30).status_code == 200
    )
    for log in directory.glob("front*.log"):
        assert secrets["the database's password"] not in log.read_text(errors="replace")
    if wide:  # found by the review, not fixed: Ray takes no address for these (docs/cluster.md)
        pytest.xfail(f"a raylet listens on every address: {wide}")


def test_secret_files_are_never_readable_by_others() -> None:
    """Written and then chmod 0600 in a 0755 directory, the password (and Ray's token, and
    cluster.json) could be opened by anyone in between: here the chmod never happens."""
    try:
        postgres.binaries()
    except Exception as exc:
        pytest.skip(str(exc))
    script = r"""
import os, pathlib, stat, sys
from codecage._cluster import postgres
keep = pathlib.Path.chmod
def chmod(self, mode, **kw):  # only the directory's own chmod happens
    if self.is_dir():
        keep(self, mode, **kw)
pathlib.Path.chmod = chmod
os.umask(0o022)
where = pathlib.Path(sys.argv[1])
control = where / "control"
control.write_text("x")
control.chmod(0o600)
server = postgres.start(where / "pg")
try:
    print(oct(stat.S_IMODE(control.stat().st_mode)))
    print(oct(stat.S_IMODE((where / "pg" / "password").stat().st_mode)))
finally:
    postgres.stop(where / "pg")
"""
    where = Path(tempfile.mkdtemp(prefix="cc-pg-"))  # PostgreSQL's user must reach it
    where.chmod(0o755)
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        done = subprocess.run(
            [sys.executable, "-c", script, str(where)],
            capture_output=True, text=True, timeout=120, env=env, check=False,
        )  # fmt: skip
    finally:
        shutil.rmtree(where, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    control, password = done.stdout.split()
    assert control == "0o644"  # the control: the file was world-readable until its chmod
    assert password == "0o600"
