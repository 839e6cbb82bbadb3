"""The remote SDK's files API against a real `codecage serve` on loopback: `get_info`,
`rename`, `list(depth=)` and `watch_dir` as the native SDK has them, each a row of the
audit log; another tenant's sandbox and watchers stay out of reach. Also the audit rows of
cells: their language and code context."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import codecage
from codecage import FileNotFoundInSandbox, SandboxNotFound, WatcherNotFound

from .conftest import Service

pytestmark = pytest.mark.requires_root


def runs(db: Path, sandbox_id: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        sql = "SELECT * FROM runs WHERE sandbox_id = ? ORDER BY rowid"
        return [dict(r) for r in conn.execute(sql, (sandbox_id,))]
    finally:
        conn.close()


def wait_events(handle: Any, want: int = 1) -> list[codecage.FilesystemEvent]:
    events: list[codecage.FilesystemEvent] = []
    deadline = time.monotonic() + 10
    while len(events) < want and time.monotonic() < deadline:
        events += handle.get_new_events()
        time.sleep(0.05)
    return events


def test_a_download_is_bytes_never_a_page(alice: codecage.Client, service: Service) -> None:
    """A tenant's file, served on the service's origin (the console's too), is never
    sniffed into a page or a script; the control: its bytes come back whole."""
    with alice.Sandbox() as sbx:
        sbx.files.write("x.html", "<script>alert(1)</script>")
        answer = alice.request(
            "GET", f"/v1/sandboxes/{sbx.sandbox_id}/files", params={"path": "x.html"}
        )
        assert answer.content == b"<script>alert(1)</script>"
        assert answer.headers["content-type"] == "application/octet-stream"
        assert answer.headers["x-content-type-options"] == "nosniff"


def test_info_rename_and_deep_listing_match_the_native_sdk(
    alice: codecage.Client, service: Service
) -> None:
    with alice.Sandbox() as sbx:
        sbx.files.write("a/b/c/deep.txt", "deep")
        sbx.files.write("a/top.txt", "top")
        info = sbx.files.get_info("a/top.txt")
        assert (info.name, info.path, info.type, info.size) == (
            "top.txt",
            "/home/user/a/top.txt",
            "file",
            3,
        )
        assert info.permissions and info.permissions.startswith("-") and info.mode
        assert info.modified_time is not None and info.modified_time.tzinfo is not None
        assert sbx.files.get_info("a").type == "dir"
        with pytest.raises(FileNotFoundInSandbox):
            sbx.files.get_info("missing")

        one = [e.path for e in sbx.files.list("a")]
        assert one == ["/home/user/a/b", "/home/user/a/top.txt"]
        deep = [e.path for e in sbx.files.list("a", depth=2)]
        assert "/home/user/a/b/c" in deep and "/home/user/a/b/c/deep.txt" not in deep
        deeper = sbx.files.list("a", depth=3)
        assert "/home/user/a/b/c/deep.txt" in [e.path for e in deeper]
        assert all(e.modified_time is not None for e in deeper)  # full entries
        with pytest.raises(ValueError):
            sbx.files.list("a", depth=0)

        moved = sbx.files.rename("a/top.txt", "z/moved.txt")  # parents are created
        assert moved.path == "/home/user/z/moved.txt" and moved.size == 3
        assert sbx.files.read("z/moved.txt") == b"top" and not sbx.files.exists("a/top.txt")
        with pytest.raises(FileNotFoundInSandbox):
            sbx.files.rename("gone", "elsewhere")

        rows = runs(service.db, sbx.id)
        kinds = [(r["kind"], r["code"], r["outcome"]) for r in rows]
        assert ("file_stat", "a/top.txt", "ok") in kinds
        assert ("file_stat", "missing", "failed") in kinds
        assert ("file_list", "a", "ok") in kinds
        assert ("file_rename", "a/top.txt -> z/moved.txt", "ok") in kinds


def test_watch_dir_polls_events_and_stops(alice: codecage.Client, service: Service) -> None:
    with alice.Sandbox() as sbx:
        sbx.files.make_dir("w/sub")
        flat = sbx.files.watch_dir("w")
        deep = sbx.files.watch_dir("w", recursive=True)
        sbx.files.write("w/one.txt", "1")
        sbx.files.write("w/sub/two.txt", "2")
        deep_names = {e.name for e in wait_events(deep, 2)}
        assert {"one.txt", "sub/two.txt"} <= deep_names
        names = {(e.name, e.type) for e in wait_events(flat)} | {
            (e.name, e.type) for e in flat.get_new_events()
        }
        assert ("one.txt", "create") in names and "sub/two.txt" not in {n for n, _ in names}
        assert not flat.overflowed
        flat.stop()
        flat.stop()  # stopping twice is no error
        with pytest.raises(WatcherNotFound):
            flat.get_new_events()
        deep.stop()
        with pytest.raises(FileNotFoundInSandbox):
            sbx.files.watch_dir("no-such-dir")
        watches = [r for r in runs(service.db, sbx.id) if r["kind"] == "file_watch"]
        assert [r["code"] for r in watches] == ["w", "w", "no-such-dir"]  # polls are no rows


def test_the_async_remote_sdk_has_them_too(alice: codecage.Client) -> None:
    import asyncio

    async def main() -> tuple[str, list[str]]:
        sbx = await alice.create_async()
        try:
            await sbx.files.write("x.txt", "x")
            info = await sbx.files.get_info("x.txt")
            await sbx.files.rename("x.txt", "y.txt")
            return info.path, [e.name for e in await sbx.files.list(".", depth=1)]
        finally:
            await sbx.kill()

    path, names = asyncio.run(main())
    assert path == "/home/user/x.txt" and "y.txt" in names and "x.txt" not in names


def test_watchers_are_per_sandbox_and_tenant(alice: codecage.Client, service: Service) -> None:
    """Attack: another tenant (or another sandbox of the same tenant) cannot poll or stop a
    watcher by its id; the owner can (positive control)."""
    with alice.Sandbox() as one, alice.Sandbox() as two:
        handle = one.files.watch_dir(".")
        one.files.write("seen.txt", "x")
        base = "/v1/sandboxes/{}/files/watchers/" + handle.id
        bob = httpx.Client(
            base_url=service.url, headers={"Authorization": f"Bearer {service.keys['bob']}"}
        )
        with bob:
            r = bob.get(base.format(one.id) + "/events")
            assert r.status_code == 404 and r.json()["error"]["type"] == "SandboxNotFound"
            assert bob.delete(base.format(one.id)).status_code == 404
            for call in (
                bob.get(f"/v1/sandboxes/{one.id}/files/info", params={"path": "seen.txt"}),
                bob.post(
                    f"/v1/sandboxes/{one.id}/files/rename",
                    json={"source": "seen.txt", "destination": "x"},
                ),
            ):
                assert call.status_code == 404
        other = alice.request  # the same tenant, the wrong sandbox
        with pytest.raises(WatcherNotFound):
            other("GET", base.format(two.id) + "/events")
        names = [e.name for e in wait_events(handle)]  # still the owner's, untouched
        assert "seen.txt" in names and one.files.exists("seen.txt")
        handle.stop()
    with pytest.raises(SandboxNotFound):
        alice.request("GET", base.format(one.id) + "/events")


def test_a_service_keeps_at_most_its_watchers_per_sandbox(alice: codecage.Client) -> None:
    from codecage._service.manager import WATCHERS

    with alice.Sandbox() as sbx:
        handles = [sbx.files.watch_dir(".") for _ in range(WATCHERS)]
        with pytest.raises(codecage.QuotaExceeded):
            sbx.files.watch_dir(".")
        handles.pop().stop()
        handles.append(sbx.files.watch_dir("."))  # room again once one stopped
        for h in handles:
            h.stop()


def test_bad_input_on_the_new_routes(alice: codecage.Client, service: Service) -> None:
    with alice.Sandbox() as sbx:
        http = httpx.Client(
            base_url=f"{service.url}/v1/sandboxes/{sbx.id}/files",
            headers={"Authorization": f"Bearer {service.keys['alice']}"},
        )
        with http:
            for r in (
                http.get("/info", params={"path": ""}),
                http.get("/info", params={"path": "a\0b"}),
                http.get("/list", params={"path": ".", "depth": 0}),
                http.get("/list", params={"path": ".", "depth": 10**9}),
                http.post("/rename", json={"source": "a"}),
                http.post("/rename", json={"source": "", "destination": "b"}),
                http.post("/watchers", json={"path": "x" * 5000}),
                http.post("/watchers", json={"recursive": True}),
            ):
                assert 400 <= r.status_code < 500, (r.status_code, r.text)
                assert "error" in r.json()


def test_rename_cannot_write_outside_the_jails_writable_places(alice: codecage.Client) -> None:
    """Attack: moving a file onto the read-only system (or out of it) fails inside the
    jail; within the workspace the same move works (positive control)."""
    with alice.Sandbox() as sbx:
        sbx.files.write("evil.txt", "root::0:0::/:/bin/sh\n")
        for target in ("/etc/passwd", "/usr/bin/evil", "/evil.txt"):
            with pytest.raises(codecage.SandboxError):
                sbx.files.rename("evil.txt", target)
        with pytest.raises(codecage.SandboxError):
            sbx.files.rename("/etc/hostname", "stolen")
        assert sbx.files.rename("evil.txt", "tmp-ok.txt").path == "/home/user/tmp-ok.txt"
        assert "root::0" not in sbx.files.read("/etc/passwd", format="text")


def test_cells_are_audited_with_their_language_and_context(
    alice: codecage.Client, service: Service
) -> None:
    with alice.Sandbox() as sbx:
        ctx = sbx.create_code_context(language="bash")
        py = sbx.create_code_context()
        sbx.run_code("x = 1")
        sbx.run_code("echo hi", language="bash")
        sbx.run_code("cd /tmp", context=ctx)
        sbx.run_code("import os  # flagged? no matter", context=py)
        cells = [
            (r["code"], r["language"], r["context_id"])
            for r in runs(service.db, sbx.id)
            if r["kind"] == "execute"
        ]
        assert cells == [
            ("x = 1", "python", "default"),
            ("echo hi", "bash", "default-bash"),
            ("cd /tmp", "bash", ctx.id),
            ("import os  # flagged? no matter", "python", py.id),
        ]
        shown = alice.audit(sandbox_id=sbx.id)
        assert [(r["language"], r["context_id"]) for r in shown if r["kind"] == "execute"] == [
            (lang, cid) for _, lang, cid in cells
        ]
        others = [r for r in shown if r["kind"] != "execute"]
        assert others and all(r["language"] is None for r in others)
