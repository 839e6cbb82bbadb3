"""codecage on a real Ray cluster on this machine (codecage._cluster.local: a head, two
sandbox nodes, a PostgreSQL, all on loopback, Ray's token authentication on), through
real front ends (`codecage serve --cluster local`) on loopback: sessions on both nodes
through either front end, E2B's SDK through one, a front end killed with SIGKILL, a node
killed with SIGKILL mid-run, and a batch of 2,000 runs with a node killed halfway."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import codecage
from codecage._cluster import local

from .cluster_kit import Running, runs_of, start_front, wait_for

ray = pytest.importorskip("ray", reason="Ray is not installed (make installs it)")


def test_sessions_on_both_nodes_through_two_front_ends(cluster: Running) -> None:
    """Placement spreads sandboxes over both nodes; the second front end reaches every
    one of them by its id alone (no table shared) with its state; listings are the
    cluster's; the rows name both nodes; E2B's SDK works through a front end."""
    with cluster.client(0) as a, cluster.client(1) as b:
        made = [a.Sandbox() for _ in range(4)]
        prefixes = {s.sandbox_id[:8] for s in made}
        assert len(prefixes) == 2  # both nodes
        for n, sbx in enumerate(made):
            sbx.run_code(f"x = {n}")
        for n, sbx in enumerate(made):
            again = b.connect_sandbox(sbx.sandbox_id)
            assert again.run_code("x * 10").text == str(n * 10)
        listed = {s["id"] for s in b.request("GET", "/v1/sandboxes").json()}
        assert listed == {s.sandbox_id for s in made}
        made[0].files.write("data.txt", b"over the cluster")
        assert b.connect_sandbox(made[0].sandbox_id).files.read("data.txt") == b"over the cluster"
        for sbx in made:
            sbx.kill()
        assert b.request("GET", "/v1/sandboxes").json() == []
    with contextlib.closing(cluster.audit()) as audit:
        nodes = {r["node"] for r in runs_of(audit, kind="execute")}
    assert nodes == {f"node-{p}" for p in prefixes}

    from e2b_code_interpreter import Sandbox as E2BSandbox

    env = {"E2B_API_URL": cluster.urls[1], "E2B_SANDBOX_URL": cluster.urls[1],
           "E2B_API_KEY": cluster.key}  # fmt: skip
    with _env(env):
        sbx = E2BSandbox.create(timeout=120)
        try:
            assert sbx.run_code("6 * 7").text == "42"
            sbx.files.write("e2b.txt", "through a front end")
            assert sbx.files.read("e2b.txt") == "through a front end"
            assert sbx.sandbox_id[:8] in prefixes
        finally:
            sbx.kill()


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_the_front_end_admits_before_it_reads(cluster: Running) -> None:
    """The front end is a new surface: keys, tenants, E2B's tokens and body bounds hold
    there before a node sees the request. Each refusal has its control that passes."""
    url = cluster.urls[0]
    alice = {"Authorization": f"Bearer {cluster.key}"}
    with cluster.client(0) as client:
        sbx = client.Sandbox()
        try:
            path = f"/v1/sandboxes/{sbx.sandbox_id}/execute"
            assert httpx.post(url + path, json={"code": "1"}, headers=alice).status_code == 200
            no_key = httpx.post(url + path, json={"code": "1"})
            assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "Unauthorized"
            bad = httpx.post(url + path, json={"code": "1"}, headers={"Authorization": "Bearer x"})
            assert bad.status_code == 401
            # another tenant's sandbox is the same 404 as one that never was
            bob = {"Authorization": f"Bearer {cluster.other_key}"}
            theirs = httpx.post(url + path, json={"code": "1"}, headers=bob)
            never = sbx.sandbox_id[:8] + "0" * 24
            none = httpx.post(
                url + f"/v1/sandboxes/{never}/execute", json={"code": "1"}, headers=bob
            )
            assert theirs.status_code == none.status_code == 404
            assert (
                theirs.json()["error"]["type"] == none.json()["error"]["type"] == "SandboxNotFound"
            )
            # E2B's control plane: its key header and its error shape
            e2b = httpx.get(url + "/v2/sandboxes", headers={"X-API-KEY": "nope"})
            assert e2b.status_code == 401 and e2b.json()["code"] == 401
            ok = httpx.get(url + "/v2/sandboxes", headers={"X-API-KEY": cluster.key})
            assert ok.status_code == 200
            # a sandbox's E2B ports: an unknown id is the proxy's 502, no token a 401
            ports = {"E2b-Sandbox-Id": never, "E2b-Sandbox-Port": "49983"}
            assert httpx.get(url + "/health", headers=ports).status_code == 502
            ports["E2b-Sandbox-Id"] = sbx.sandbox_id  # made through codecage's API: no token
            assert httpx.get(url + "/health", headers=ports).status_code == 401
            # a body is never read before its key is checked (no body sent: no wait for it)
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=10) as raw:
                raw.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {10 << 30}\r\n\r\n".encode()
                )
                assert raw.recv(4096).startswith(b"HTTP/1.1 401")
            # with the key, a body over the limit is a 413 (the control: it is read, and cut)
            big = {"code": "x" * (11 << 20)}
            over = httpx.post(url + path, json=big, headers=alice, timeout=60)
            assert over.status_code == 413
            assert httpx.get(url + "/v1/volumes", headers=alice).status_code == 501
        finally:
            sbx.kill()


def test_a_front_end_killed_with_sigkill_loses_nothing(cluster: Running) -> None:
    """A run in flight through a front end (one of this test's own) when it is killed:
    the run goes on on its node and is recorded; every acknowledged run is in the log; the
    session lives on, whole, through another front end."""
    front, url = start_front(cluster.cluster, Path(cluster.cluster.directory) / "front-kill.log")
    with codecage.connect(url, cluster.key) as a, cluster.client(1) as b:
        sbx = a.Sandbox()
        for n in range(5):
            sbx.run_code(f"x = {n}")
        in_flight = threading.Thread(
            target=_swallow, args=(sbx.run_code, "import time; time.sleep(2); y = 'done'")
        )
        in_flight.start()
        with contextlib.closing(cluster.audit()) as audit:
            assert wait_for(lambda: runs_of(audit, status="started"), 10)
            front.send_signal(signal.SIGKILL)
            front.wait()
            in_flight.join()
            same = b.connect_sandbox(sbx.sandbox_id)
            assert wait_for(lambda: same.run_code("y").text == "'done'", 20)
            assert same.run_code("x").text == "4"
            records = runs_of(audit, sandbox_id=sbx.sandbox_id)
        assert [r["status"] for r in records if r["kind"] == "execute"] == ["completed"] * len(
            [r for r in records if r["kind"] == "execute"]
        )
        assert any("time.sleep(2)" in r["code"] for r in records)
        same.kill()


def _swallow(fn: Any, *args: Any) -> None:
    with contextlib.suppress(Exception):
        fn(*args)


def test_a_node_killed_mid_run_affects_only_its_own(cluster: Running) -> None:
    """SIGKILL of a node's raylet and every process it started, while a run is in flight
    on it: that run's caller hears 'lost with its node', its sandboxes answer 404 with the
    reason, its unfinished run is `interrupted` and its acknowledged ones are kept; the
    other nodes' sandboxes go on, and new ones are placed there. The node killed is one
    this test adds (the shared cluster's two go on for the next test)."""
    raylet = cluster.add_node()
    doomed = cluster.prefix_of(raylet)
    with cluster.client(0) as client:
        made = [client.Sandbox() for _ in range(4)]  # the new node, the least loaded, first
        theirs = [s for s in made if s.sandbox_id[:8] == doomed]
        ours = [s for s in made if s.sandbox_id[:8] != doomed]
        assert theirs and ours
        for sbx in made:
            sbx.run_code("state = 'kept'")
        outcome: dict[str, Any] = {}

        def long_run() -> None:
            try:
                outcome["result"] = theirs[0].run_code("import time; time.sleep(30)")
            except codecage.SandboxError as exc:
                outcome["result"] = exc

        thread = threading.Thread(target=long_run)
        thread.start()
        with contextlib.closing(cluster.audit()) as audit:
            assert wait_for(lambda: runs_of(audit, status="started"), 10)
            local.kill_node(raylet)
            thread.join(timeout=60)
            assert isinstance(outcome["result"], codecage.SandboxNotFound)
            assert "lost with its node" in str(outcome["result"])
            for sbx in theirs:
                with pytest.raises(codecage.SandboxNotFound, match="lost with its node"):
                    sbx.run_code("state")
            for sbx in ours:
                assert sbx.run_code("state").text == "'kept'"
            records = runs_of(audit, node=f"node-{doomed}")
            assert [r["code"] for r in records if r["status"] == "interrupted"] == [
                "import time; time.sleep(30)"
            ]
            kept = [r for r in records if r["code"] == "state = 'kept'"]
            assert len(kept) == len(theirs) and {r["status"] for r in kept} == {"completed"}
        fresh = client.Sandbox()
        assert fresh.sandbox_id[:8] != doomed
        for sbx in [*ours, fresh]:
            sbx.kill()
    assert local.sweep() >= 0
    cluster.settle()


@pytest.mark.timeout(900)  # 2,000 sandboxes: about a minute here, a slower CI machine more
def test_a_batch_of_2000_runs_survives_a_node_killed_halfway(cluster: Running) -> None:
    """client.map over the nodes; one node (this test's own) is killed with SIGKILL when
    half the results are in: every run is accounted for, those of the lost node run again
    on the others (attempt 2), and each attempt is a row of the log."""
    codes = [f"print({i} * 3)" for i in range(2000)]
    seen: list[int] = []
    killed = threading.Event()
    victim: dict[str, int] = {}

    def on_result(index: int, result: Any) -> None:
        seen.append(index)
        if len(seen) == 1000 and not killed.is_set():
            killed.set()
            local.kill_node(victim["raylet"])

    victim["raylet"] = cluster.add_node()
    lost = cluster.prefix_of(victim["raylet"])
    with cluster.client(0) as client:
        results = client.map(codes, concurrency=4, on_result=on_result)
    assert killed.is_set()
    assert len(results) == 2000
    failed = [i for i, r in enumerate(results) if not isinstance(r, codecage.Execution)]
    assert failed == [], [results[i] for i in failed[:3]]
    assert all(r.logs.stdout == [f"{i * 3}\n"] for i, r in enumerate(results))  # type: ignore[union-attr]
    with contextlib.closing(cluster.audit()) as audit:
        rows = runs_of(audit, kind="run")
    done = {r["code"] for r in rows if r["status"] == "completed"}
    assert set(codes) <= done  # every run recorded as completed, once it ran
    on_lost = [r for r in rows if r["node"] == f"node-{lost}"]
    assert on_lost and not [r for r in on_lost if r["status"] == "started"]
    assert local.sweep() >= 0
    cluster.settle()
