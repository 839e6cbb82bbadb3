"""E2B's own SDK (`e2b`, unmodified) against a real `codecage serve` on loopback: the
control plane (create, connect, list with metadata, info, timeout, kill, tenants, keys,
templates), envd's files and the Filesystem service, and bad input on the sandbox's port
(Connect errors, never a 500). The sandboxes are real: jailed, on the default backend."""

from __future__ import annotations

import asyncio
import json
import struct
import time

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    FilesystemEventType,
    FileType,
    Sandbox,
    SandboxException,
    SandboxQuery,
)
from e2b.exceptions import FileNotFoundException, SandboxNotFoundException

from .conftest import Service
from .e2b_server import env_for, sandboxes_of

pytestmark = [pytest.mark.requires_root, pytest.mark.slow]


def envd(service: Service, sbx: Sandbox, token: str | None = "own") -> httpx.Client:
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
    if token == "own":
        token = sbx._envd_access_token
    if token is not None:
        headers["X-Access-Token"] = token
    return httpx.Client(base_url=service.url, headers=headers, timeout=60)


# -- the control plane --------------------------------------------------------------------------


def test_lifecycle(e2b_env: dict[str, str], e2b_service: Service) -> None:
    sbx = Sandbox.create(metadata={"suite": "lifecycle"}, envs={"GREETING": "hi"}, timeout=120)
    try:
        assert sbx.is_running()
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id and info.template_id == "base"
        assert info.metadata == {"suite": "lifecycle"} and info.state.value == "running"
        assert 100 < (info.end_at - info.started_at).total_seconds() <= 121
        listed = Sandbox.list(query=SandboxQuery(metadata={"suite": "lifecycle"})).next_items()
        assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
        assert Sandbox.list(query=SandboxQuery(metadata={"suite": "other"})).next_items() == []
        again = Sandbox.connect(sbx.sandbox_id)
        assert again.is_running() and again.files.exists(".")
        assert sbx.get_metrics()[0].mem_total > 0
        sbx.set_timeout(600)
        assert (sbx.get_info().end_at - info.end_at).total_seconds() > 400
    finally:
        sbx.kill()
    assert not sbx.is_running()
    assert Sandbox.kill(sbx.sandbox_id) is False  # already gone
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id)


def test_the_timeout_is_the_lifetime(e2b_env: dict[str, str], e2b_service: Service) -> None:
    sbx = Sandbox.create(timeout=300)
    sbx.set_timeout(1)
    deadline = time.monotonic() + 60
    while sbx.is_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not sbx.is_running()  # killed by the service, not by this test
    assert sbx.sandbox_id not in sandboxes_of(e2b_service)
    with pytest.raises(SandboxNotFoundException):
        sbx.get_info()


def test_tenants_keys_and_templates(e2b_env: dict[str, str], e2b_service: Service) -> None:
    sbx = Sandbox.create()
    try:
        bob = env_for(e2b_service, "bob")["E2B_API_KEY"]
        with pytest.raises(SandboxNotFoundException):
            Sandbox.get_info(sbx.sandbox_id, api_key=bob)
        assert Sandbox.kill(sbx.sandbox_id, api_key=bob) is False
        assert Sandbox.list(api_key=bob).next_items() == []
        with pytest.raises(SandboxNotFoundException):
            Sandbox.connect(sbx.sandbox_id, api_key=bob)
        with pytest.raises(AuthenticationException):
            Sandbox.create(api_key="cc_not_a_key")
        with pytest.raises(AuthenticationException):
            Sandbox.list(api_key="cc_not_a_key").next_items()
        with pytest.raises(SandboxException, match="template 'no-such' not found"):
            Sandbox.create("no-such")
        assert sbx.is_running()  # untouched by all that
    finally:
        sbx.kill()


# -- files ------------------------------------------------------------------------------------


def test_files(e2b_env: dict[str, str], e2b_service: Service) -> None:
    sbx = Sandbox.create()
    try:
        files = sbx.files
        info = files.write("notes/a.txt", "hello")
        assert (info.name, info.path, info.type) == (
            "a.txt",
            "/home/user/notes/a.txt",
            FileType.FILE,
        )
        assert files.read("notes/a.txt") == "hello"
        blob = bytes(range(256)) * 4096  # 1 MiB, every byte value
        files.write("blob.bin", blob)
        assert bytes(files.read("blob.bin", format="bytes")) == blob
        assert b"".join(files.read("blob.bin", format="stream")) == blob
        written = files.write_files(
            [{"path": "many/one.txt", "data": "1"}, {"path": "/tmp/two.txt", "data": b"22"}]
        )
        assert [w.path for w in written] == ["/home/user/many/one.txt", "/tmp/two.txt"]
        assert files.read("/tmp/two.txt") == "22"

        files.make_dir("tree/a/b")
        files.write("tree/a/b/deep.txt", "x")
        files.write("tree/top.txt", "y")
        assert [e.name for e in files.list("tree")] == ["a", "top.txt"]
        deep = files.list("tree", depth=3)
        assert [e.path for e in deep] == [
            "/home/user/tree/a",
            "/home/user/tree/a/b",
            "/home/user/tree/a/b/deep.txt",
            "/home/user/tree/top.txt",
        ]
        got = files.get_info("notes/a.txt")
        assert (got.type, got.size, got.mode, got.permissions) == (
            FileType.FILE,
            5,
            0o644,
            "-rw-r--r--",
        )
        assert got.modified_time is not None and got.modified_time.tzinfo is not None
        assert files.get_info("tree").type == FileType.DIR

        moved = files.rename("notes/a.txt", "moved/b.txt")
        assert moved.path == "/home/user/moved/b.txt"
        assert not files.exists("notes/a.txt") and files.exists("moved/b.txt")
        with pytest.raises(FileNotFoundException):
            files.rename("notes/a.txt", "x.txt")

        assert files.make_dir("fresh") is True and files.make_dir("fresh") is False
        files.remove("tree")
        assert not files.exists("tree/top.txt")
        files.remove("never-was.txt")  # not an error, as in E2B
        with pytest.raises(FileNotFoundException):
            files.read("never-was.txt")
        with pytest.raises(FileNotFoundException):
            files.get_info("never-was.txt")
    finally:
        sbx.kill()


def test_watch_dir(e2b_env: dict[str, str], e2b_service: Service) -> None:
    sbx = Sandbox.create()
    try:
        sbx.files.make_dir("watched")
        handle = sbx.files.watch_dir("watched", include_entry=True)
        sbx.files.write("watched/new.txt", "1")
        sbx.files.remove("watched/new.txt")
        events = handle.get_new_events()
        kinds = [(e.name, e.type) for e in events]
        assert ("new.txt", FilesystemEventType.CREATE) in kinds
        assert ("new.txt", FilesystemEventType.WRITE) in kinds
        assert ("new.txt", FilesystemEventType.REMOVE) in kinds
        assert handle.get_new_events() == []  # nothing happened since
        handle.stop()
        with pytest.raises(SandboxException):
            handle.get_new_events()
        with pytest.raises(FileNotFoundException):
            sbx.files.watch_dir("no-such-dir")
    finally:
        sbx.kill()


def test_watch_dir_streams_with_the_async_sdk(e2b_env: dict[str, str]) -> None:
    async def main() -> list[tuple[str, FilesystemEventType]]:
        sbx = await AsyncSandbox.create()
        try:
            await sbx.files.make_dir("w")
            seen: list[tuple[str, FilesystemEventType]] = []
            got = asyncio.Event()

            def on_event(event: object) -> None:
                seen.append((event.name, event.type))  # type: ignore[attr-defined]
                if event.type == FilesystemEventType.WRITE:  # type: ignore[attr-defined]
                    got.set()

            handle = await sbx.files.watch_dir("w", on_event, recursive=True)
            await sbx.files.write("w/sub/f.txt", "data")
            await asyncio.wait_for(got.wait(), 60)
            await handle.stop()
            return seen
        finally:
            await sbx.kill()

    seen = asyncio.run(main())
    assert ("sub", FilesystemEventType.CREATE) in seen
    assert ("sub/f.txt", FilesystemEventType.WRITE) in seen


def test_an_upload_over_the_limit_is_refused(e2b_env: dict[str, str], e2b_service: Service) -> None:
    sbx = Sandbox.create()
    try:
        too_big = b"x" * ((100 << 20) + 1)  # the service's max_upload_bytes, plus one
        # 413 before the body is read, and the connection closed: the SDK sees the 413 or,
        # still sending, the connection reset
        with pytest.raises((SandboxException, httpx.HTTPError)):
            sbx.files.write("big.bin", too_big)
        assert not sbx.files.exists("big.bin")
        sbx.files.write("small.bin", b"x" * 1024)  # positive control
        assert sbx.files.get_info("small.bin").size == 1024
    finally:
        sbx.kill()


# -- bad input on the sandbox's port ------------------------------------------------------------


def test_bad_requests_to_a_sandbox(e2b_env: dict[str, str], e2b_service: Service) -> None:
    sbx = Sandbox.create()
    try:
        with envd(e2b_service, sbx, "wrong") as wrong:
            response = wrong.get("/health")
            assert response.status_code == 401 and response.json()["code"] == 401
        with envd(e2b_service, sbx, None) as anonymous:
            assert anonymous.get("/files", params={"path": "x"}).status_code == 401
        with envd(e2b_service, sbx) as http:
            assert http.get("/health").status_code == 204  # positive control
            stat = "/filesystem.Filesystem/Stat"
            unary = {"content-type": "application/json"}
            ok = http.post(stat, json={"path": "."}, headers=unary)
            assert ok.status_code == 200 and ok.json()["entry"]["type"] == "FILE_TYPE_DIRECTORY"
            cases = [
                (stat, b"{nope", unary, 400, "invalid_argument"),
                (stat, b"[]", unary, 400, "invalid_argument"),
                (stat, json.dumps({"path": 5}).encode(), unary, 400, "invalid_argument"),
                (stat, b'{"path": "a\\u0000b"}', unary, 400, "invalid_argument"),
                (stat, b"{}", {"content-type": "application/proto"}, 415, "invalid_argument"),
                ("/filesystem.Filesystem/Nope", b"{}", unary, 404, "unimplemented"),
                ("/nothing.Here/Stat", b"{}", unary, 404, "unimplemented"),
            ]
            for path, body, headers, status, code in cases:
                response = http.post(path, content=body, headers=headers)
                assert (response.status_code, response.json()["code"]) == (status, code), body
            stream = {"content-type": "application/connect+json"}
            watch = "/filesystem.Filesystem/WatchDir"
            for frame in (
                b"\x00\x00",  # a header cut short
                struct.pack(">BI", 0, 99) + b"{}",  # a length past the body
                struct.pack(">BI", 1, 2) + b"{}",  # compressed, none agreed
                struct.pack(">BI", 0, 4) + b"nope",
            ):
                response = http.post(watch, content=frame, headers=stream)
                assert response.status_code == 200
                flags, length = struct.unpack(">BI", response.content[:5])
                end = json.loads(response.content[5 : 5 + length])
                assert flags == 2 and end["error"]["code"] in ("invalid_argument", "internal")
            missing = http.post(
                watch,
                content=struct.pack(">BI", 0, 18) + b'{"path": "nopeee"}',
                headers=stream,
            )
            end = json.loads(missing.content[5:])
            assert end["error"]["code"] == "not_found"
            assert http.get("/files", params={"path": ""}).status_code == 400
            assert http.get("/files", params={"path": "a\0b"}).status_code == 400
            response = http.post(
                "/files", params={"path": "x"}, content=b"x", headers={"content-type": "text/html"}
            )
            assert response.status_code == 400 and set(response.json()) == {"code", "message"}
            response = http.post(
                "/files",
                params={"path": "x"},
                content=b"not gzip",
                headers={"content-type": "application/octet-stream", "content-encoding": "gzip"},
            )
            assert response.status_code == 400
            assert not sbx.files.exists("x")
    finally:
        sbx.kill()


def test_metadata_and_signed_urls(e2b_env: dict[str, str], e2b_service: Service) -> None:
    import urllib.error
    import urllib.request

    sbx = Sandbox.create()
    try:
        info = sbx.files.write("m.txt", "content", metadata={"author": "me", "stage": "1"})
        assert info.metadata == {"author": "me", "stage": "1"}
        assert sbx.files.get_info("m.txt").metadata == {"author": "me", "stage": "1"}
        assert sbx.files.rename("m.txt", "n.txt").metadata == {"author": "me", "stage": "1"}
        assert sbx.files.write("n.txt", "again").metadata is None  # an upload replaces it
        assert sbx.files.get_info("n.txt").metadata is None
        # a plain HTTP client, no headers: the signature finds the sandbox
        with urllib.request.urlopen(sbx.download_url("n.txt", use_signature_expiration=60)) as r:
            assert r.read() == b"again"
            # a tenant's file on the service's origin is bytes, never a script (the console)
            assert r.headers["X-Content-Type-Options"] == "nosniff"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(sbx.download_url("n.txt", use_signature_expiration=-60))
        assert refused.value.code == 401
        refused.value.close()
        other = Sandbox.create()
        try:  # a URL signed with another sandbox's token is that sandbox's: no n.txt there
            with pytest.raises(urllib.error.HTTPError) as elsewhere:
                urllib.request.urlopen(other.download_url("n.txt"))
            assert elsewhere.value.code == 404
            elsewhere.value.close()
        finally:
            other.kill()
    finally:
        sbx.kill()


def test_a_watch_stream_the_client_drops_frees_its_watcher(
    e2b_env: dict[str, str], e2b_service: Service
) -> None:
    """The kernel holds 16 watchers: 20 streams opened and dropped one after the other
    leave none behind (each is stopped when its client goes), so the next one works."""
    sbx = Sandbox.create()
    try:
        sbx.files.make_dir("w")
        body = json.dumps({"path": "w"}).encode()
        frame = struct.pack(">BI", 0, len(body)) + body
        headers = {"content-type": "application/connect+json"}
        with envd(e2b_service, sbx) as http:
            for _ in range(20):
                with http.stream(
                    "POST", "/filesystem.Filesystem/WatchDir", content=frame, headers=headers
                ) as stream:
                    first = next(stream.iter_raw())
                    assert json.loads(first[5:]) == {"start": {}}
                # dropped here: the service sees the client gone and stops the watcher
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # wait until it is released
                    try:
                        handle = sbx.files.watch_dir("w")
                    except SandboxException:
                        time.sleep(0.1)
                        continue
                    handle.stop()
                    break
                else:
                    raise AssertionError("the dropped stream's watcher was never released")
    finally:
        sbx.kill()


def test_a_quiet_watch_stream_sends_keepalives(
    e2b_env: dict[str, str], e2b_service: Service
) -> None:
    sbx = Sandbox.create()
    try:
        body = json.dumps({"path": "."}).encode()
        headers = {"content-type": "application/connect+json", "keepalive-ping-interval": "1"}
        with (
            envd(e2b_service, sbx) as http,
            http.stream(
                "POST",
                "/filesystem.Filesystem/WatchDir",
                content=struct.pack(">BI", 0, len(body)) + body,
                headers=headers,
            ) as stream,
        ):
            assert stream.headers["content-type"] == "application/connect+json"
            held, messages = b"", []
            for chunk in stream.iter_raw():
                held += chunk
                while len(held) >= 5 and len(held) >= 5 + struct.unpack(">I", held[1:5])[0]:
                    length = struct.unpack(">I", held[1:5])[0]
                    messages.append((held[0], json.loads(held[5 : 5 + length])))
                    held = held[5 + length :]
                if any(m == {"keepalive": {}} for _, m in messages):
                    break
            assert messages[0] == (0, {"start": {}})
            assert (0, {"keepalive": {}}) in messages
    finally:
        sbx.kill()


def test_a_proc_file_of_size_zero_reads_whole(e2b_env: dict[str, str]) -> None:
    # /proc/sys answers a read of 4 MiB with ENOMEM, and says size 0 (E2B's own tests read
    # the boot id this way)
    sbx = Sandbox.create(timeout=60)
    try:
        path = "/proc/sys/kernel/random/boot_id"
        read = sbx.files.read(path)
        assert read == sbx.commands.run(f"cat {path}").stdout and len(read) == 37
    finally:
        sbx.kill()
