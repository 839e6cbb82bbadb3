"""A node host: one Ray actor per sandbox node, owning what the service owns on one machine.

A Ray node started with the resource `{"codecage_node": 1}` is a sandbox node. Front ends
(frontend.py) place one NodeHost on each: a named, detached actor pinned to its node
(`codecage-node-<prefix>`, in Ray namespace `codecage`), running codecage's whole service
app in its own process (the Manager: templates, pools, live sandboxes, quotas, its audit
writer), driven as an ASGI app, not over a socket. Its sandboxes' ids begin with its prefix
(8 hex digits of its Ray node id), so any front end routes a call by the id alone.

A front end hands it requests (`request`: the scope's method, path, query and headers, and
the whole body) and relays what the app sends as it comes: first the status and headers,
then the body's chunks (a Ray streaming generator). The node's app does everything it does
on one machine: authentication (the API keys are in the shared audit database), quotas,
analysis, approvals, the audit record of every operation (rows name this node).

If the node's process dies, its sandboxes die with it (each init sees its channel close),
and front ends answer their ids "lost with its node" and mark the node's unfinished runs
interrupted (frontend.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

NAMESPACE = "codecage"
RESOURCE = "codecage_node"
PREFIX_DIGITS = 8
ACTOR_PREFIX = "codecage-node-"
# The headers a front end passes on (hop-by-hop ones stay with the connection).
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer"}


def prefix_of(ray_node_id: str) -> str:
    return ray_node_id[:PREFIX_DIGITS].lower()


def actor_name(prefix: str) -> str:
    return ACTOR_PREFIX + prefix


def node_name(prefix: str) -> str:
    """The node's name in the audit log's rows."""
    return f"node-{prefix}"


class NodeHost:
    """The actor's class (`ray.remote(NodeHost)` where it is placed: importing this module
    needs no Ray). `config` is the service's ServerConfig as JSON."""

    def __init__(self, config: str, prefix: str) -> None:
        from .._jail import sandbox
        from .._service.app import create_app
        from .._service.config import ServerConfig

        sandbox.ID_PREFIX = prefix
        data = json.loads(config)
        data["node"] = node_name(prefix)
        base = Path(data.get("node_dir") or f"/var/lib/codecage/nodes/{prefix}")
        data.pop("node_dir", None)
        # Two nodes of one machine (a cluster on one machine) keep their own files.
        data["snapshot_dir"] = data.get("snapshot_dir") or str(base / "snapshots")
        data["volume_dir"] = data.get("volume_dir") or str(base / "volumes")
        self.config = ServerConfig(**data)
        self.prefix = prefix
        self.app = create_app(self.config)
        self._lifespan: Any = None  # the app's lifespan, entered by start()

    async def start(self) -> dict[str, Any]:
        """Start the node's app (its Manager, warm pool and audit writer); its facts."""
        if self._lifespan is None:
            from .._service.app import check_machine

            check_machine(self.config)
            lifespan = self.app.router.lifespan_context(self.app)
            await lifespan.__aenter__()
            self._lifespan = lifespan
        return await self.load()

    async def load(self) -> dict[str, Any]:
        """What placement weighs: live sandboxes and the memory the node has free."""
        manager = self.app.state.codecage.get("manager")
        live = manager.live() if manager is not None else 0
        tenants = manager.live_by_tenant() if manager is not None else {}
        free_mb = 0
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    free_mb = int(line.split()[1]) // 1024
        return {
            "prefix": self.prefix,
            "node": node_name(self.prefix),
            "pid": os.getpid(),
            "live": live,
            "tenants": tenants,
            "free_mb": free_mb,
        }

    async def access(self, sandbox_id: str) -> tuple[str, str | None] | None:
        """(tenant, E2B access token) of a live sandbox of this node, for a front end's
        admission of a request to its E2B ports; None: no such sandbox."""
        manager = self.app.state.codecage.get("manager")
        entry = manager.find(sandbox_id) if manager is not None else None
        return None if entry is None else (entry.tenant, entry.access_token)

    async def request(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        client: tuple[str, int] | None = None,
    ) -> AsyncIterator[Any]:
        """One HTTP request through the node's app: yields (status, headers) first, then
        the body's chunks as the app sends them; an answer whose whole body comes in its
        first message is one item, (status, headers, body): one hop, not two."""
        if self._lifespan is None:
            await self.start()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": [(k, v) for k, v in headers if k not in HOP_BY_HOP],
            "client": client,
            "server": ("codecage-node", 0),
        }
        sent: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        delivered = False
        gone = asyncio.Event()

        async def receive() -> Any:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()  # the app waits for a disconnect only when it has answered
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            await sent.put(message)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                await sent.put(None)

        task = asyncio.ensure_future(run())
        try:
            head: tuple[int, list[Any]] | None = None
            while (message := await sent.get()) is not None:
                if message["type"] == "http.response.start":
                    head = (int(message["status"]), list(message.get("headers", [])))
                    continue
                if head is not None and message["type"] == "http.response.body":
                    if not message.get("more_body"):
                        yield (*head, bytes(message.get("body", b"")))
                        break
                    yield head
                    head = None
                if message["type"] == "http.response.body":
                    if message.get("body"):
                        yield bytes(message["body"])
                    if not message.get("more_body"):
                        break
            if head is not None:  # a head and no body message: an empty answer
                yield (*head, b"")
            await task
        finally:
            gone.set()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def stop(self) -> None:
        """End the node's app: its sandboxes are killed, its audit log closed."""
        if self._lifespan is not None:
            lifespan, self._lifespan = self._lifespan, None
            await lifespan.__aexit__(None, None, None)
