"""The cluster's front end (codecage._cluster.frontend) over fake node hosts: routing by the
id's node prefix, a lost node's answers and log marks, merged listings, placement within
the tenant's quota over all nodes, admission before any node is asked, and a batch whose
node dies half-way (its runs once more elsewhere, then NodeLost). The real cluster runs in
tests/test_cluster.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import ray.exceptions

from codecage._cluster.frontend import Cluster, FrontEnd, Node
from codecage._service.config import Quotas, ServerConfig

A, B = "aaaaaaaa", "bbbbbbbb"
KEY = {"Authorization": "Bearer k"}

Reply = list[Any]  # (status, headers) then body chunks


class Stream:
    """What a Ray streaming generator gives: awaitables, one per item; `die` after that
    many items, the node is gone (RayActorError)."""

    def __init__(self, items: Reply, die: int | None = None) -> None:
        self.items, self.die, self.sent = list(items), die, 0

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        if self.die is not None and self.sent >= self.die:
            raise ray.exceptions.RayActorError()
        if not self.items:
            raise StopAsyncIteration
        self.sent += 1
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(self.items.pop(0))
        return done


class Method:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.calls = fn, 0

    def remote(self, *args: Any) -> Any:
        self.calls += 1
        return self.fn(*args)


def _ready(value: Any) -> Any:
    async def get() -> Any:
        return value

    return get()


class FakeHost:
    """A node host answering from `app(method, path, body) -> Reply`."""

    def __init__(
        self, app: Callable[[str, str, bytes], Reply], die: int | None = None, tenants: int = 0
    ) -> None:
        self.request = Method(lambda m, p, q, h, body, c: Stream(app(m, p, body), die))
        self.load = Method(
            lambda: _ready({"live": tenants, "tenants": {"alice": tenants}, "free_mb": 1000})
        )
        self.access = Method(lambda sandbox_id: _ready(("alice", "tok")))


class FakeAudit:
    def __init__(self) -> None:
        self.marked: list[str] = []

    def identity(self, key: str) -> tuple[str, str, str] | None:
        return ("alice", "client", "id") if key == "k" else None

    def mark_interrupted(self, node: str | None = None) -> int:
        self.marked.append(str(node))
        return 1


class FakeCluster(Cluster):
    def __init__(self, hosts: dict[str, FakeHost], quota: int = 20) -> None:
        config = ServerConfig(quotas=Quotas(live_sandboxes=quota))
        super().__init__(config, FakeAudit(), "fake")  # type: ignore[arg-type]
        self.nodes = {p: Node(p, h) for p, h in hosts.items()}


def json_reply(payload: Any, status: int = 200) -> Reply:
    return [(status, [(b"content-type", b"application/json")]), json.dumps(payload).encode()]


def named(name: str) -> Callable[[str, str, bytes], Reply]:
    return lambda method, path, body: json_reply({"node": name, "path": path})


def batch_app(name: str) -> Callable[[str, str, bytes], Reply]:
    def app(method: str, path: str, body: bytes) -> Reply:
        codes = json.loads(body)["codes"]
        lines = [
            json.dumps({"ev": "result", "index": i, "execution": {"code": c, "on": name}}).encode()
            + b"\n"
            for i, c in enumerate(codes)
        ]
        end = json.dumps({"ev": "end", "count": len(codes)}).encode() + b"\n"
        return [(200, [(b"content-type", b"application/x-ndjson")]), *lines, end]

    return app


def request(cluster: FakeCluster, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=FrontEnd(cluster.config, cluster))
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_a_call_goes_to_the_node_its_id_names() -> None:
    cluster = FakeCluster({A: FakeHost(named("a")), B: FakeHost(named("b"))})
    for prefix, name in ((A, "a"), (B, "b")):
        sandbox = prefix + "0" * 24
        answer = request(cluster, "POST", f"/v1/sandboxes/{sandbox}/execute", headers=KEY, json={})
        assert answer.json() == {"node": name, "path": f"/v1/sandboxes/{sandbox}/execute"}


def test_a_lost_nodes_sandbox_is_404_with_the_reason_and_its_runs_are_marked() -> None:
    cluster = FakeCluster({A: FakeHost(named("a")), B: FakeHost(named("b"), die=0)})
    answer = request(cluster, "GET", f"/v1/sandboxes/{B}{'1' * 24}", headers=KEY)
    assert answer.status_code == 404 and "lost with its node" in answer.json()["error"]["message"]
    assert cluster.audit.marked == [f"node-{B}"]  # type: ignore[attr-defined]
    assert B in cluster.lost and B not in cluster.nodes
    again = request(cluster, "GET", f"/v1/sandboxes/{B}{'2' * 24}", headers=KEY)
    assert "lost with its node" in again.json()["error"]["message"]  # known lost: no call
    never = request(cluster, "GET", f"/v1/sandboxes/{'c' * 32}", headers=KEY)
    assert never.status_code == 404 and "lost" not in never.json()["error"]["message"]
    assert (
        request(cluster, "GET", f"/v1/sandboxes/{A}{'3' * 24}", headers=KEY).json()["node"] == "a"
    )


def test_listings_are_every_nodes_together() -> None:
    cluster = FakeCluster(
        {
            A: FakeHost(lambda m, p, b: json_reply([{"id": 1}])),
            B: FakeHost(lambda m, p, b: json_reply([{"id": 2}, {"id": 3}])),
        }
    )
    assert request(cluster, "GET", "/v1/sandboxes", headers=KEY).json() == [
        {"id": 1},
        {"id": 2},
        {"id": 3},
    ]


def test_no_node_is_asked_before_the_key_is_checked() -> None:
    host = FakeHost(named("a"))
    cluster = FakeCluster({A: host})
    answer = request(cluster, "POST", f"/v1/sandboxes/{A}{'0' * 24}/execute", json={"code": "1"})
    assert answer.status_code == 401 and host.request.calls == 0
    control = request(cluster, "GET", "/v2/sandboxes", headers={"X-API-KEY": "wrong"})
    assert control.status_code == 401 and control.json() == {
        "code": 401,
        "message": "missing or invalid API key",
    }
    assert host.request.calls == 0
    request(cluster, "POST", f"/v1/sandboxes/{A}{'0' * 24}/execute", json={}, headers=KEY)
    assert host.request.calls == 1  # the control: with the key, the node is asked


def test_placement_counts_the_tenants_sandboxes_on_every_node() -> None:
    within = FakeCluster(
        {A: FakeHost(named("a"), tenants=2), B: FakeHost(named("b"), tenants=1)}, quota=4
    )
    assert request(within, "POST", "/v1/sandboxes", headers=KEY, json={}).json()["node"] == "b"
    full = FakeCluster(
        {A: FakeHost(named("a"), tenants=2), B: FakeHost(named("b"), tenants=2)}, quota=4
    )
    answer = request(full, "POST", "/v1/sandboxes", headers=KEY, json={})
    assert answer.status_code == 429 and answer.json()["error"]["type"] == "QuotaExceeded"


def _batch(cluster: FakeCluster, codes: list[str]) -> list[dict[str, Any]]:
    answer = request(cluster, "POST", "/v1/batch", headers=KEY, json={"codes": codes})
    assert answer.status_code == 200
    return [json.loads(line) for line in answer.text.splitlines() if line.strip()]


def test_a_batch_is_dealt_over_the_nodes_and_a_lost_nodes_runs_go_elsewhere_once() -> None:
    # node b answers two results (and the head), then dies
    cluster = FakeCluster({A: FakeHost(batch_app("a")), B: FakeHost(batch_app("b"), die=3)})
    codes = [f"c{i}" for i in range(10)]
    lines = _batch(cluster, codes)
    results, end = lines[:-1], lines[-1]
    assert sorted(r["index"] for r in results) == list(range(10))  # each once
    assert all(r["execution"]["code"] == codes[r["index"]] for r in results)
    on_b = [r for r in results if r["execution"]["on"] == "b"]
    retried = [r for r in results if r["attempt"] == 2]
    assert len(on_b) == 2 and len(retried) == 3 and {r["execution"]["on"] for r in retried} == {"a"}
    assert end == {"ev": "end", "count": 10, "ok": 10, "errors": 0}
    assert cluster.audit.marked == [f"node-{B}"]  # type: ignore[attr-defined]


def test_a_run_whose_node_is_lost_twice_is_node_lost() -> None:
    cluster = FakeCluster({A: FakeHost(batch_app("a"), die=1), B: FakeHost(batch_app("b"), die=1)})
    lines = _batch(cluster, ["x", "y", "z"])
    assert {r["error"]["type"] for r in lines[:-1]} == {"NodeLost"}
    assert lines[-1] == {"ev": "end", "count": 3, "ok": 0, "errors": 3}


@pytest.mark.parametrize("body", [b"not json", b'{"codes": []}', b'{"codes": "x"}'])
def test_a_bad_batch_gets_the_nodes_own_answer(body: bytes) -> None:
    cluster = FakeCluster(
        {A: FakeHost(lambda m, p, b: json_reply({"error": {"type": "ValidationError"}}, 422))}
    )
    answer = request(cluster, "POST", "/v1/batch", headers=KEY, content=body)
    assert answer.status_code == 422


# -- attacks on the front end (tests/test_cluster_attacks.py has the real cluster's) ----------


def batch_node(name: str) -> Callable[[str, str, bytes], Reply]:
    """A node's /v1/batch as the service's: a batch it cannot take is its own 4xx, whole."""
    from codecage._service.app import MAX_BATCH

    runs = batch_app(name)

    def app(method: str, path: str, body: bytes) -> Reply:
        try:
            codes = json.loads(body)["codes"]
        except (ValueError, RecursionError):
            return json_reply({"error": {"type": "ValidationError"}}, 422)
        if not isinstance(codes, list) or not 0 < len(codes) <= MAX_BATCH:
            return json_reply({"error": {"type": "ValidationError", "count": len(codes)}}, 422)
        if not all(isinstance(code, str) for code in codes):
            return json_reply({"error": {"type": "ValidationError"}}, 422)
        return runs(method, path, body)

    return app


def test_a_batch_over_one_nodes_limit_is_refused_whole_not_dealt_out() -> None:
    from codecage._service.app import MAX_BATCH

    hosts = {A: FakeHost(batch_node("a")), B: FakeHost(batch_node("b"))}
    cluster = FakeCluster(hosts)
    # The control: MAX_BATCH codes are dealt over both nodes and all run.
    lines = _batch(cluster, ["1"] * MAX_BATCH)
    assert lines[-1] == {"ev": "end", "count": MAX_BATCH, "ok": MAX_BATCH, "errors": 0}
    assert {r["execution"]["on"] for r in lines[:-1]} == {"a", "b"}
    # One more: each node's share would pass, the batch must not (it is one batch).
    over = request(
        cluster, "POST", "/v1/batch", headers=KEY, json={"codes": ["1"] * (MAX_BATCH + 1)}
    )
    assert over.status_code == 422 and over.json()["error"]["count"] == MAX_BATCH + 1
    # Empty codes (3 bytes each) by the million: one refusal, not a line per code.
    flood = request(cluster, "POST", "/v1/batch", headers=KEY, json={"codes": [""] * 1_000_000})
    assert flood.status_code == 422 and len(flood.content) < 1000
    # Not a list of strings, or JSON nested past Python's recursion: the node's 4xx, no 5xx.
    for body in (b'{"codes": [1, 2]}', b'{"codes": ' + b"[" * 100_000 + b"}"):
        answer = request(cluster, "POST", "/v1/batch", headers=KEY, content=body)
        assert answer.status_code == 422, answer.text


def front_request(front: FrontEnd, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=front)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_a_credential_or_routing_header_given_twice_is_refused_before_any_node() -> None:
    host = FakeHost(named("a"))
    cluster = FakeCluster({A: host})
    sandbox = A + "0" * 24
    twice: list[tuple[str, list[tuple[str, str]]]] = [
        ("/v1/sandboxes", [("Authorization", "Bearer k"), ("Authorization", "Bearer other")]),
        ("/v2/sandboxes", [("X-API-KEY", "k"), ("X-API-KEY", "other")]),
        ("/health", [("E2b-Sandbox-Id", sandbox), ("E2b-Sandbox-Id", B + "0" * 24)]),
        (
            "/health",
            [("E2b-Sandbox-Id", sandbox), ("X-Access-Token", "tok"), ("X-Access-Token", "other")],
        ),
    ]
    for path, headers in twice:
        answer = request(cluster, "GET", path, headers=headers)
        assert answer.status_code == 400, (path, headers, answer.text)
        assert "more than once" in answer.text
    assert host.request.calls == 0 and host.access.calls == 0
    # The controls: each header once, the request reaches the node.
    assert request(cluster, "GET", "/v1/sandboxes", headers=KEY).status_code == 200
    once = {"E2b-Sandbox-Id": sandbox, "X-Access-Token": "tok"}
    assert request(cluster, "GET", "/health", headers=once).status_code == 200
    assert host.request.calls == 2


def test_an_e2b_sandbox_id_that_is_no_id_asks_no_node_and_is_not_kept() -> None:
    host = FakeHost(named("a"))
    cluster = FakeCluster({A: host})
    front = FrontEnd(cluster.config, cluster)
    # A node's prefix (ids show it) and anything after it: every one a different id.
    for n in range(20):
        junk = A + f"{n}" + "x" * 100_000
        answer = front_request(front, "GET", "/health", headers={"E2b-Sandbox-Id": junk})
        assert answer.status_code == 502 and len(answer.content) < 1000
    assert host.access.calls == 0 and not front._access
    # The control: a well-formed id of that node is asked about (and kept a while).
    answer = front_request(
        front, "GET", "/health", headers={"E2b-Sandbox-Id": A + "0" * 24, "X-Access-Token": "tok"}
    )
    assert answer.status_code == 200 and host.access.calls == 1 and len(front._access) == 1


def test_an_unreachable_audit_log_is_503_without_its_address() -> None:
    from codecage._errors import AuditUnavailable

    class Down(FakeAudit):
        def identity(self, key: str) -> tuple[str, str, str] | None:
            raise AuditUnavailable(
                "the audit log (postgresql://codecage:***@10.1.2.3:5432/codecage) cannot be"
                ' read: connection to server at "10.1.2.3", port 5432 failed'
            )

    host = FakeHost(named("a"))
    cluster = FakeCluster({A: host})
    cluster.audit = Down()  # type: ignore[assignment]
    for path, headers in (("/v1/sandboxes", KEY), ("/v2/sandboxes", {"X-API-KEY": "k"})):
        answer = request(cluster, "GET", path, headers=headers)
        assert answer.status_code == 503, answer.text
        assert "10.1.2.3" not in answer.text and "postgresql" not in answer.text
    assert host.request.calls == 0


@pytest.mark.parametrize(
    "line",
    [b"not json", b"[1]", b'{"ev": "end"}', b'{"ev": "result", "index": -1}',
     b'{"ev": "result", "index": 5}', b'{"ev": "result", "index": "0"}',
     b'{"ev": "result", "index": true}'],
)  # fmt: skip
def test_a_nodes_batch_line_is_checked_before_it_is_a_result(line: bytes) -> None:
    """A node's stream is its word: a line that is not a result of its share (a negative
    index would pick another share's run) is no result; the control: a good one is."""
    from codecage._cluster.frontend import _node_line

    assert _node_line(line, 3) is None
    assert _node_line(b'{"ev": "result", "index": 2, "execution": {}}', 3) == {
        "ev": "result",
        "index": 2,
        "execution": {},
    }
