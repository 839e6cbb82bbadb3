"""A stateless front end: `codecage serve --cluster ADDRESS` (docs/cluster.md).

It joins a Ray cluster (`auto`: the Ray node this process runs on; `ray://HOST:10001`:
Ray Client; `HOST:PORT`: the head's GCS), places one NodeHost (node.py) on every sandbox
node it sees, and serves codecage's API and E2B's on its own port, holding no sandbox:

- **Admission here, before any body is read**: a Bearer key (codecage's API) or
  `X-API-KEY` (E2B's control plane) is checked against the audit log's database (shared
  by the cluster: PostgreSQL); a request for an E2B sandbox's ports, against the
  sandbox's access token, which its node tells (kept a few seconds). Each tenant's
  requests in flight are capped; a body over its limit is a 413, a body that stops
  arriving a 408.
- **Routing by id**: a sandbox's id begins with its node's prefix, so a call for it goes
  straight to that node (`/v1/sandboxes/{id}...`, `/sandboxes/{id}...`,
  `/v2/sandboxes/{id}...`, `E2b-Sandbox-Id`). A node the cluster lost answers 404 "lost
  with its node" (E2B's 502 "not found" on a sandbox's ports), and its unfinished runs
  are marked interrupted in the log.
- **Placement**: a create or a one-shot run goes to the node with the fewest live
  sandboxes, then the most free memory; the tenant's live sandboxes are counted over all
  nodes first (quotas.live_sandboxes holds cluster-wide).
- **Everything of all nodes**: a listing (`GET /v1/sandboxes`, `/v2/sandboxes`,
  `/sandboxes`, `/v1/approvals`) is every node's, together; an approval's answer goes to
  the node that holds it.
- **Batch** (`POST /v1/batch`): the runs are dealt round-robin over the live nodes and
  their results relayed as they finish; the runs of a node lost on the way are run again,
  once, on the others (each attempt is its own audit record; a result says its attempt).

Volumes, snapshots and templates are a node's own files: in cluster mode they answer 501.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .node import NAMESPACE, RESOURCE, NodeHost, actor_name, node_name, prefix_of

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from .._service.audit import AuditLog
    from .._service.config import ServerConfig

log = logging.getLogger("codecage.cluster")

RECONCILE_S = 1.0  # how often the front end looks at the cluster's nodes
LOAD_TTL_S = 0.5  # placement reads the nodes' loads at most this often
ACCESS_TTL_S = 5.0  # a sandbox's access token, as its node told it, is kept this long
NODE_START_TIMEOUT_S = 180.0
LOST_GRACE_S = 60.0  # a node lost by a failed call is not placed on again for this long
CALL_TIMEOUT_S = 30.0  # an answer's head from a node (the body streams without a limit)
SANDBOX_PATH = re.compile(r"^/(?:v1/|v2/)?sandboxes/([0-9a-f]{32})(?:/|$)")
SANDBOX_ID = re.compile(r"[0-9a-f]{32}")  # what a node's sandbox ids are (node.py)
# Headers the front end decides by (who asks, which sandbox) and the node reads again: given
# twice, the two could read different ones (the node's Bearer check takes the last, the
# front end the first), so the front end would admit, count and place one tenant while
# the node acts for another. Each may be given once.
ONCE = (b"authorization", b"x-api-key", b"e2b-sandbox-id", b"e2b-sandbox-port",
        b"x-access-token", b"e2b-traffic-access-token", b"host")  # fmt: skip
ACCESS_KEPT = 10_000  # sandboxes' access answers kept at most (then forgotten at once)
LISTS = {"/v1/sandboxes", "/v2/sandboxes", "/sandboxes", "/v1/approvals"}
PLACED = {("POST", "/v1/sandboxes"), ("POST", "/v2/sandboxes"), ("POST", "/v1/run")}
NODE_LOCAL = ("/v1/volumes", "/v1/snapshots", "/v1/templates", "/snapshots", "/templates")
LOST = "sandbox {} was lost with its node"


class NodeLost(Exception):
    """A node host died or left the cluster."""


@dataclass
class Node:
    prefix: str
    handle: Any
    load: dict[str, Any] = field(default_factory=dict)


def _ray_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    return (rex.RayActorError, rex.ActorUnavailableError, rex.GetTimeoutError)


class Cluster:
    """The nodes as this front end sees them: one NodeHost per sandbox node, placed here
    if it is not there yet; nodes that left are lost (their runs marked interrupted)."""

    def __init__(self, config: ServerConfig, audit: AuditLog, address: str) -> None:
        self.config, self.audit, self.address = config, audit, address
        self.nodes: dict[str, Node] = {}
        self.lost: dict[str, float] = {}
        self._starting: dict[str, tuple[Any, Any, float]] = {}  # node hosts on their way
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._loaded = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(
                address=self.address,
                namespace=NAMESPACE,
                log_to_driver=False,
                configure_logging=False,
            )
        # The nodes there are now, before the first request: each node host's start is
        # waited for (a node that is dying is given up on, and looked at again later).
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        self.reconcile()
        while self._starting and time.monotonic() < deadline:
            time.sleep(0.1)
            self.reconcile()
        self._thread = threading.Thread(target=self._loop, name="codecage-cluster", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(RECONCILE_S):
            try:
                self.reconcile()
            except Exception:  # the next pass tries again
                log.exception("cluster: looking at the nodes failed")

    def reconcile(self) -> None:
        """Place a NodeHost on every live sandbox node that has none, and take those whose
        start has answered; lose the nodes that are gone. Never waits for a node: one that
        is dying (Ray has not declared it dead yet) would hold every other up."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        listed: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
        seen = [n for n in listed if n.get("Resources", {}).get(RESOURCE)]
        alive = {prefix_of(n["NodeID"]): n for n in seen if n.get("Alive")}
        for prefix in [p for p in self.nodes if p not in alive]:
            self.lose(prefix)
        self._take_started(alive)
        config = self.config.model_dump_json()
        for prefix, info in alive.items():
            if prefix in self.nodes or prefix in self._starting:
                continue
            if time.time() - self.lost.get(prefix, 0.0) < LOST_GRACE_S:
                continue  # lost by a failed call; Ray has not seen it die yet
            host: Any = ray.remote(NodeHost)
            actor = host.options(
                name=actor_name(prefix),
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=0,
                max_concurrency=1000,
                num_cpus=0,
                resources={RESOURCE: 0.001},
                scheduling_strategy=NodeAffinitySchedulingStrategy(info["NodeID"], soft=False),
            )
            handle = actor.remote(config, prefix)
            self._starting[prefix] = (handle, handle.start.remote(), time.monotonic())

    def _take_started(self, alive: dict[str, Any]) -> None:
        """The node hosts whose start answered join; a failed or overdue start, or one on a
        node that left, is dropped (the next pass places it again if its node is there)."""
        import ray

        if not self._starting:
            return
        refs = [ref for _, ref, _ in self._starting.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for prefix, (handle, ref, since) in list(self._starting.items()):
            if ref in ready:
                del self._starting[prefix]
                try:
                    load: dict[str, Any] = ray.get(ref)
                except Exception as exc:
                    log.warning("cluster: node %s did not start: %s", prefix, exc)
                    continue
                with self._lock:
                    self.nodes[prefix] = Node(prefix, handle, load)
                    self.lost.pop(prefix, None)
            elif prefix not in alive or time.monotonic() - since > NODE_START_TIMEOUT_S:
                del self._starting[prefix]
                log.warning("cluster: node %s did not start in time", prefix)

    def lose(self, prefix: str) -> None:
        """The node is gone: its sandboxes are lost; its unfinished runs interrupted."""
        with self._lock:
            if self.nodes.pop(prefix, None) is None:
                return
            self.lost[prefix] = time.time()
        try:
            marked = self.audit.mark_interrupted(node=node_name(prefix))
        except Exception as exc:  # the next front end to see it marks them
            log.warning("cluster: node %s lost; its runs not marked yet: %s", prefix, exc)
        else:
            log.warning("cluster: node %s lost; %d unfinished runs interrupted", prefix, marked)

    def node(self, prefix: str) -> Node | None:
        with self._lock:
            return self.nodes.get(prefix)

    def all(self) -> list[Node]:
        with self._lock:
            return sorted(self.nodes.values(), key=lambda n: n.prefix)

    async def loads(self) -> list[Node]:
        """The nodes with fresh loads (at most LOAD_TTL_S old); a node that does not
        answer is lost."""
        nodes = self.all()
        if time.monotonic() - self._loaded > LOAD_TTL_S:
            self._loaded = time.monotonic()
            answers = await asyncio.gather(
                *(asyncio.wait_for(_await(n.handle.load.remote()), 5) for n in nodes),
                return_exceptions=True,
            )
            for node, answer in zip(nodes, answers, strict=True):
                if isinstance(answer, dict):
                    node.load = answer
                elif isinstance(answer, _ray_errors()):
                    await asyncio.to_thread(self.lose, node.prefix)
            nodes = self.all()
        return nodes

    async def place(self, tenant: str) -> Node:
        """The node for a new sandbox of `tenant`: QuotaExceeded past the tenant's quota
        over all nodes, BackendUnavailable with no node."""
        from .._errors import BackendUnavailable, QuotaExceeded

        nodes = await self.loads()
        if not nodes:
            raise BackendUnavailable("the cluster has no sandbox node (none with codecage_node)")
        live = sum(int(n.load.get("tenants", {}).get(tenant, 0)) for n in nodes)
        quota = self.config.quotas.live_sandboxes
        if live >= quota:
            raise QuotaExceeded(f"tenant already has {live} live sandboxes (quota)")
        best = min(nodes, key=lambda n: (n.load.get("live", 0), -n.load.get("free_mb", 0)))
        best.load["live"] = best.load.get("live", 0) + 1  # until the next reading
        tenants = best.load.setdefault("tenants", {})
        tenants[tenant] = tenants.get(tenant, 0) + 1
        return best


async def _await(ref: Any) -> Any:
    return await ref


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    chunks: AsyncIterator[bytes]


async def call(node: Node, scope: Scope, body: bytes) -> Answer:
    """The request on `node`: its answer's head, and its body as it comes. NodeLost if
    the node is gone."""
    client = scope.get("client")
    generator = node.handle.request.remote(
        scope["method"],
        scope["path"],
        scope.get("query_string", b""),
        list(scope.get("headers", [])),
        body,
        tuple(client) if client else None,
    )
    iterator = generator.__aiter__()
    try:
        first = await asyncio.wait_for(_await(await iterator.__anext__()), CALL_TIMEOUT_S)
    except _ray_errors() as exc:
        raise NodeLost(str(exc)) from None
    except StopAsyncIteration:
        raise NodeLost("the node answered nothing") from None
    status, headers, *whole_body = first  # (status, headers[, the whole body])

    async def chunks() -> AsyncIterator[bytes]:
        if whole_body:
            yield whole_body[0]
            return
        try:
            async for ref in iterator:
                yield await ref
        except _ray_errors():
            return  # the node died mid-answer: the body ends here

    return Answer(status, [(bytes(k), bytes(v)) for k, v in headers], chunks())


async def whole(answer: Answer) -> bytes:
    return b"".join([chunk async for chunk in answer.chunks])


class Refusal(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _refusal(exc: BaseException) -> Refusal:
    from .._errors import SandboxError, wire

    if isinstance(exc, Refusal):
        return exc
    if isinstance(exc, SandboxError):
        entry = wire(exc)
        return Refusal(entry.status, entry.name, str(exc))
    raise exc


OPEN = {"/openapi.json"}  # served by any node, unauthenticated (as the service serves it)


class FrontEnd:
    """The ASGI app of a front end (see the module's docstring)."""

    def __init__(self, config: ServerConfig, cluster: Cluster) -> None:
        self.config, self.cluster = config, cluster
        self.in_flight: dict[str, int] = {}
        self._access: dict[str, tuple[float, tuple[str, str | None] | None]] = {}

    # -- the ASGI entry ----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        from .._service.e2b import CONTROL_PREFIXES, _by_host, _header

        twice = _repeated(scope)
        scope = _by_host(scope)
        sandbox_id = _header(scope, b"e2b-sandbox-id")
        path = scope["path"]
        surface = (
            "sandbox"
            if sandbox_id is not None
            else "control"
            if any(path == p or path.startswith(p + "/") for p in CONTROL_PREFIXES)
            else "native"
        )
        if path == "/healthz":
            nodes = self.cluster.all()
            await self._json(send, 200, {"status": "ok", "nodes": len(nodes), "cluster": True})
            return
        try:
            if twice is not None:
                raise Refusal(400, "BadRequest", f"the {twice} header is given more than once")
            if path in OPEN:
                await self._relay(send, await self._any(scope, b""))
                return
            tenant = await self._identify(scope, surface, sandbox_id)
            cap = self.config.quotas.concurrent_requests
            if self.in_flight.get(tenant, 0) >= cap:
                raise Refusal(429, "QuotaExceeded", f"more than {cap} requests in flight (quota)")
        except Exception as exc:
            refusal = _refusal(exc)
            if refusal.kind == "AuditUnavailable":  # asked by anyone: the cause is the log's
                from .._service.app import AUDIT_DOWN

                log.warning("admission: %s", refusal.message)
                refusal = Refusal(503, refusal.kind, AUDIT_DOWN)
            await self._error(send, surface, refusal, early=True)
            return
        self.in_flight[tenant] = self.in_flight.get(tenant, 0) + 1
        try:
            body = await self._body(scope, receive, surface, send)
            if body is None:
                return
            try:
                await self._dispatch(scope, send, surface, sandbox_id, tenant, body)
            except Exception as exc:
                await self._error(send, surface, _refusal(exc))
        finally:
            self.in_flight[tenant] -= 1
            if not self.in_flight[tenant]:
                del self.in_flight[tenant]

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await asyncio.to_thread(self.cluster.start)
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.to_thread(self.cluster.stop)
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- admission -----------------------------------------------------------------------------

    async def _identify(self, scope: Scope, surface: str, sandbox_id: str | None) -> str:
        from .._service.e2b import _header, _signed

        audit = self.cluster.audit
        if surface == "sandbox":
            assert sandbox_id is not None
            access = await self._sandbox_access(sandbox_id)
            if access is None:
                raise Refusal(502, "NotFound", f"The sandbox {sandbox_id[:64]} was not found")
            tenant, wanted = access
            if wanted is None:
                raise Refusal(401, "Unauthorized", "this sandbox was not created through E2B's API")
            token = _header(scope, b"x-access-token") or _header(scope, b"e2b-traffic-access-token")
            if token is not None:
                if not hmac.compare_digest(token.encode(), wanted.encode()):
                    raise Refusal(401, "Unauthorized", "invalid access token")
            elif not _signed(scope, wanted):
                raise Refusal(401, "Unauthorized", "missing access token or URL signature")
            return tenant
        if surface == "control":
            key = _header(scope, b"x-api-key")
            who = await asyncio.to_thread(audit.identity, key.strip()) if key else None
            if who is not None and who[1] != "client":
                raise Refusal(403, "Forbidden", "this key may only answer approvals")
        else:
            scheme, _, key = (_header(scope, b"authorization") or "").partition(" ")
            ok = scheme.lower() == "bearer" and key
            who = await asyncio.to_thread(audit.identity, key.strip()) if ok else None
        if who is None:
            raise Refusal(401, "Unauthorized", "missing or invalid API key")
        return str(who[0])

    async def _sandbox_access(self, sandbox_id: str) -> tuple[str, str | None] | None:
        if SANDBOX_ID.fullmatch(sandbox_id) is None:  # no node has it: none is asked, none kept
            return None
        now = time.monotonic()
        kept = self._access.get(sandbox_id)
        if kept is not None and now - kept[0] < ACCESS_TTL_S:
            return kept[1]
        node = self.cluster.node(sandbox_id[:8])
        if node is None:
            return None
        try:
            access = await asyncio.wait_for(_await(node.handle.access.remote(sandbox_id)), 10)
        except _ray_errors():
            await asyncio.to_thread(self.cluster.lose, node.prefix)
            return None
        if len(self._access) >= ACCESS_KEPT:
            self._access.clear()
        self._access[sandbox_id] = (now, access)
        return access  # type: ignore[no-any-return]

    async def _body(self, scope: Scope, receive: Receive, surface: str, send: Send) -> bytes | None:
        """The request's body, within its limit and its time; None if refused (answered)."""
        path, method = scope["path"], scope["method"]
        upload = (method == "PUT" and path.endswith("/files")) or (
            surface == "sandbox" and method == "POST" and path == "/files"
        )
        limit = self.config.max_upload_bytes if upload else self.config.max_code_bytes + (1 << 20)
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.config.body_timeout_s)
            except TimeoutError:
                await self._error(send, surface, Refusal(408, "Timeout", "the body stopped"), True)
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._error(
                    send, surface, Refusal(413, "TooLarge", f"the body is over {limit} bytes"), True
                )
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    # -- routing -------------------------------------------------------------------------------

    async def _dispatch(
        self,
        scope: Scope,
        send: Send,
        surface: str,
        sandbox_id: str | None,
        tenant: str,
        body: bytes,
    ) -> None:
        path, method = scope["path"], scope["method"]
        found = SANDBOX_PATH.match(path)
        if sandbox_id is None and found is not None:
            sandbox_id = found.group(1)
        if sandbox_id is not None:
            await self._to_sandbox(scope, send, surface, sandbox_id, body)
        elif any(path == p or path.startswith(p + "/") for p in NODE_LOCAL):
            raise Refusal(501, "NotImplemented", f"{path}: a node's own files; not in cluster mode")
        elif (method, path) in PLACED:
            node = await self.cluster.place(tenant)
            try:
                await self._relay(send, await call(node, scope, body))
            except NodeLost:
                await asyncio.to_thread(self.cluster.lose, node.prefix)
                node = await self.cluster.place(tenant)  # once more, elsewhere
                await self._relay(send, await call(node, scope, body))
        elif method == "GET" and path in LISTS:
            await self._gather(scope, send, body)
        elif method == "POST" and path == "/v1/batch":
            await self._batch(scope, send, body, tenant)
        elif method == "POST" and path.startswith("/v1/approvals/"):
            await self._first_found(scope, send, body)
        else:
            await self._relay(send, await self._any(scope, body))

    async def _to_sandbox(
        self, scope: Scope, send: Send, surface: str, sandbox_id: str, body: bytes
    ) -> None:
        prefix = sandbox_id[:8]
        node = self.cluster.node(prefix)
        if node is not None:
            try:
                await self._relay(send, await call(node, scope, body))
                return
            except NodeLost:
                await asyncio.to_thread(self.cluster.lose, prefix)
        if prefix in self.cluster.lost:
            message = LOST.format(sandbox_id)
        else:
            message = f"no sandbox {sandbox_id!r}"
        if surface == "sandbox":
            raise Refusal(502, "NotFound", f"The sandbox {sandbox_id} was not found: {message}")
        raise Refusal(404, "SandboxNotFound", message)

    async def _any(self, scope: Scope, body: bytes) -> Answer:
        from .._errors import BackendUnavailable

        for node in self.cluster.all():
            try:
                return await call(node, scope, body)
            except NodeLost:
                await asyncio.to_thread(self.cluster.lose, node.prefix)
        raise BackendUnavailable("the cluster has no sandbox node (none with codecage_node)")

    async def _each(
        self, scope: Scope, body: bytes
    ) -> AsyncIterator[tuple[int, list[tuple[bytes, bytes]], bytes]]:
        """The request on every live node in turn: each one's whole answer."""
        for node in self.cluster.all():
            try:
                answer = await call(node, scope, body)
            except NodeLost:
                await asyncio.to_thread(self.cluster.lose, node.prefix)
                continue
            yield answer.status, answer.headers, await whole(answer)

    async def _gather(self, scope: Scope, send: Send, body: bytes) -> None:
        """A listing of every node, together (an answer that is not a list is passed on)."""
        merged: list[Any] = []
        async for status, headers, data in self._each(scope, body):
            if status != 200:
                await self._send(send, status, headers, data)
                return
            items = json.loads(data)
            if not isinstance(items, list):
                await self._send(send, status, headers, data)
                return
            merged.extend(items)
        await self._json(send, 200, merged)

    async def _first_found(self, scope: Scope, send: Send, body: bytes) -> None:
        """An approval's answer, to the node that holds the request."""
        last: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None
        async for last in self._each(scope, body):
            if last[0] != 404:
                break
        if last is None:
            raise Refusal(404, "ApprovalNotFound", "no pending approval by that id")
        await self._send(send, *last)

    # -- batch ---------------------------------------------------------------------------------

    async def _batch(self, scope: Scope, send: Send, body: bytes, tenant: str) -> None:
        from .._service.app import MAX_BATCH

        try:
            request = json.loads(body)
            codes = request["codes"]
            # What one node would refuse is refused whole, as one node refuses it: dealt
            # out, a batch over MAX_BATCH would pass (each node's share within it), and a
            # refused share is a line per run (millions, for a body of empty codes).
            if not isinstance(codes, list) or not 0 < len(codes) <= MAX_BATCH:
                raise ValueError
            if not all(isinstance(code, str) for code in codes):
                raise ValueError
        except (ValueError, KeyError, TypeError, RecursionError):
            await self._relay(send, await self._any(scope, body))  # the node's own 4xx
            return
        nodes = await self.cluster.loads()
        if not nodes:
            await self._relay(send, await self._any(scope, body))
            return
        lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        done: set[int] = set()

        async def deal(indexes: list[int], attempt: int) -> None:
            """`indexes` over the live nodes; the ones a lost node did not answer, again."""
            nodes = self.cluster.all()
            if not nodes:
                for i in indexes:
                    await lines.put(_lost(i, attempt))
                return
            share: dict[str, list[int]] = {n.prefix: [] for n in nodes}
            for k, i in enumerate(indexes):
                share[nodes[k % len(nodes)].prefix].append(i)
            orphans: list[int] = []

            async def on(node: Node, mine: list[int]) -> None:
                left = await self._sub_batch(scope, node, request, mine, attempt, lines, done)
                orphans.extend(left)

            await asyncio.gather(*(on(n, share[n.prefix]) for n in nodes if share[n.prefix]))
            if orphans:
                if attempt >= 2:
                    for i in orphans:
                        await lines.put(_lost(i, attempt))
                else:
                    await deal(orphans, attempt + 1)

        async def produce() -> None:
            try:
                await deal(list(range(len(codes))), 1)
            finally:
                await lines.put(None)

        task = asyncio.ensure_future(produce())
        headers = [(b"content-type", b"application/x-ndjson")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        ok = 0
        try:
            while (line := await lines.get()) is not None:
                if line.get("ev") == "result":
                    ok += "execution" in line
                await send(
                    {"type": "http.response.body", "body": json.dumps(line).encode() + b"\n",
                     "more_body": True}
                )  # fmt: skip
            end = {"ev": "end", "count": len(codes), "ok": ok, "errors": len(codes) - ok}
            await send({"type": "http.response.body", "body": json.dumps(end).encode() + b"\n"})
        finally:
            task.cancel()

    async def _sub_batch(
        self,
        scope: Scope,
        node: Node,
        request: dict[str, Any],
        mine: list[int],
        attempt: int,
        lines: asyncio.Queue[dict[str, Any] | None],
        done: set[int],
    ) -> list[int]:
        """`mine` of the batch on `node`: its results relayed (their index the batch's);
        returns those it did not answer (its node lost)."""
        sub = {**request, "codes": [request["codes"][i] for i in mine]}
        answered: set[int] = set()
        try:
            answer = await call(node, scope, json.dumps(sub).encode())
            if answer.status != 200:
                data = await whole(answer)
                try:
                    error = json.loads(data)["error"]
                except (ValueError, KeyError, TypeError):
                    error = {
                        "type": "SandboxError",
                        "message": data[:1000].decode("utf-8", "replace"),
                    }
                for i in mine:
                    await lines.put(
                        {"ev": "result", "index": i, "attempt": attempt, "error": error}
                    )
                return []
            buffer = b""
            async for chunk in answer.chunks:
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                for raw in complete:
                    if not raw.strip():
                        continue
                    event = _node_line(raw, len(mine))
                    if event is None:  # not a result of this share: a node's word, checked
                        continue
                    index = mine[event["index"]]
                    if index in done:
                        continue
                    done.add(index)
                    answered.add(index)
                    event.update(index=index, attempt=attempt, node=node_name(node.prefix))
                    await lines.put(event)
        except NodeLost:
            pass
        left = [i for i in mine if i not in answered and i not in done]
        if left:  # the stream ended early: its node is gone
            await asyncio.to_thread(self.cluster.lose, node.prefix)
        return left

    # -- answers -------------------------------------------------------------------------------

    async def _relay(self, send: Send, answer: Answer) -> None:
        await send(
            {"type": "http.response.start", "status": answer.status, "headers": answer.headers}
        )
        async for chunk in answer.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _send(
        self, send: Send, status: int, headers: list[tuple[bytes, bytes]], data: bytes
    ) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def _json(
        self, send: Send, status: int, payload: Any, *extra: tuple[bytes, bytes]
    ) -> None:
        data = json.dumps(payload).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            *extra,
        ]
        await self._send(send, status, headers, data)

    async def _error(self, send: Send, surface: str, refusal: Refusal, early: bool = False) -> None:
        """An error in the shape of the surface asked (codecage's, or E2B's)."""
        payload: Any = (
            {"error": {"type": refusal.kind, "message": refusal.message}}
            if surface == "native"
            else {"code": refusal.status, "message": refusal.message}
        )
        extra = []
        if early:
            extra.append((b"connection", b"close"))
        if refusal.status == 401 and surface == "native":
            extra.append((b"www-authenticate", b"Bearer"))
        with contextlib.suppress(Exception):  # an answer already begun cannot be replaced
            await self._json(send, refusal.status, payload, *extra)


def _repeated(scope: Scope) -> str | None:
    """The first of ONCE that the request gives more than once, if any."""
    seen: set[bytes] = set()
    for key, _ in scope.get("headers", []):
        if key in ONCE:
            if key in seen:
                return bytes(key).decode()
            seen.add(key)
    return None


def _node_line(raw: bytes, share: int) -> dict[str, Any] | None:
    """A result line of a node's batch stream, or None: what is not JSON, not a result, or
    names an index outside the node's share (0 <= index < share) is no result."""
    try:
        event = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("ev") != "result":
        return None
    index = event.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < share:
        return None
    return event


def _lost(index: int, attempt: int) -> dict[str, Any]:
    return {
        "ev": "result",
        "index": index,
        "attempt": attempt,
        "error": {"type": "NodeLost", "message": "the run's node was lost, and its retry's"},
    }


def serve(config: ServerConfig, address: str) -> None:
    """`codecage serve --cluster ADDRESS`: a front end on config.host:config.port."""
    from .._service.app import run_server

    audit = config.open_audit()
    cluster = Cluster(config, audit, address)
    try:
        run_server(FrontEnd(config, cluster), config)
    finally:
        audit.close()
