"""E2B's front end above the jail, over the fake backend: the Connect codec, E2B's error
bodies, and the dispatch (control plane by X-API-KEY, a sandbox's ports by its id and
access token) on a real HTTP server on loopback. The real SDK's tests are tests/test_e2b*.py.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from codecage import FileNotFoundInSandbox, PolicyError, QuotaExceeded, SandboxNotFound
from codecage._errors import SandboxError
from codecage._service.e2b import ENVD_PORT, signature
from codecage._service.e2b import connect as c
from codecage._service.e2b.errors import status_of
from codecage.testing import fake as fakes
from tests.unit.test_service import KEYS, Service, serve

# -- the codec ---------------------------------------------------------------------------------


def test_an_envelope_round_trips() -> None:
    frame = c.envelope({"a": 1})
    assert frame[:5] == struct.pack(">BI", 0, len(frame) - 5)
    assert c.parse_envelope(frame) == {"a": 1}
    assert c.parse_envelope(struct.pack(">BI", 0, 0)) == {}  # every field at its default


def test_the_end_of_a_stream_carries_the_error_or_nothing() -> None:
    ok, failed = c.end_stream(), c.end_stream(c.ConnectError("not_found", "no such file"))
    assert ok[0] == c.END_STREAM and json.loads(ok[5:]) == {}
    assert failed[0] == c.END_STREAM
    assert json.loads(failed[5:]) == {"error": {"code": "not_found", "message": "no such file"}}


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "invalid_argument"),  # shorter than a header
        (b"\x00\x00\x00", "invalid_argument"),
        (struct.pack(">BI", 1, 2) + b"{}", "internal"),  # compressed, none agreed
        (struct.pack(">BI", 0x80, 2) + b"{}", "invalid_argument"),  # unknown flags
        (struct.pack(">BI", 0, 10) + b"{}", "invalid_argument"),  # length past the body
        (struct.pack(">BI", 0, 1) + b"{}", "invalid_argument"),  # bytes after it
        (struct.pack(">BI", 0, 2**31) + b"{}", "resource_exhausted"),  # claims 2 GiB
        (c.envelope({"a": 1})[:5] + b"[1,2,3]", "invalid_argument"),
        (struct.pack(">BI", 0, 2) + b"[]", "invalid_argument"),  # not an object
        (struct.pack(">BI", 0, 2) + b"\xff\xfe", "invalid_argument"),  # not UTF-8
    ],
)
def test_a_malformed_envelope_is_a_connect_error(data: bytes, code: str) -> None:
    with pytest.raises(c.ConnectError) as raised:
        c.parse_envelope(data)
    assert raised.value.code == code


def test_fields_are_read_by_either_name_and_checked() -> None:
    message = {"watcherId": "w1", "depth": "3", "recursive": True}
    assert c.field(message, "watcher_id", "str") == "w1"
    assert c.field({"watcher_id": "w2"}, "watcher_id", "str") == "w2"
    assert c.field(message, "depth", "int") == 3  # 64-bit numbers come as strings
    assert c.field(message, "recursive", "bool") is True
    assert c.field(message, "missing", "str", "x") == "x"
    for bad in ({"depth": -1}, {"depth": "1e9"}, {"depth": True}, {"depth": 2**64}):
        with pytest.raises(c.ConnectError, match="depth"):
            c.field(bad, "depth", "int")
    for bad_text in ({"path": 5}, {"path": "\ud800"}, {"path": ["a"]}):
        with pytest.raises(c.ConnectError, match="path"):
            c.field(bad_text, "path", "str")


def test_codecage_errors_map_to_connect_codes_and_statuses() -> None:
    cases: list[tuple[SandboxError, str]] = [
        (FileNotFoundInSandbox("x"), "not_found"),
        (PolicyError("x"), "invalid_argument"),
        (QuotaExceeded("x"), "resource_exhausted"),
        (SandboxError("x"), "unknown"),
    ]
    for exc, code in cases:
        assert c.from_sandbox_error(exc).code == code
    ended = c.from_sandbox_error(SandboxNotFound("gone"), "abc")
    assert ended.code == "unavailable" and "abc was not found" in ended.message
    assert c.CODES["not_found"] == 404 and c.CODES["unauthenticated"] == 401
    with pytest.raises(ValueError):
        c.ConnectError("nope", "x")


def test_rest_statuses_are_the_ones_e2b_clients_know() -> None:
    assert status_of(PolicyError("x")) == 400  # E2B has no 422
    assert status_of(SandboxNotFound("x")) == 404
    assert status_of(SandboxNotFound("x"), "envd") == 502  # the proxy's "not running"
    assert status_of(QuotaExceeded("x")) == 429


def test_the_signature_is_e2b_v1() -> None:
    # sha256("f.txt:read:user:tok"), base64 without padding, as E2B's SDK computes it
    import base64
    import hashlib

    digest = hashlib.sha256(b"f.txt:read:user:tok").digest()
    assert (
        signature("f.txt", "read", "user", "tok", None)
        == "v1_" + base64.b64encode(digest).rstrip(b"=").decode()
    )
    assert signature("f", "read", "", "t", 10) != signature("f", "read", "", "t", 11)


# -- the dispatch, on loopback over the fake ---------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with fakes.installed():
        yield from serve(tmp_path_factory.mktemp("e2b"), pool_size=0)


def api(service: Service, tenant: str | None = "alice") -> httpx.Client:
    headers = {"X-API-KEY": KEYS[tenant]} if tenant else {}
    return httpx.Client(base_url=service.url, headers=headers, timeout=30)


def envd(service: Service, sandbox_id: str, token: str | None, port: int = ENVD_PORT) -> Any:
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port)}
    if token is not None:
        headers["X-Access-Token"] = token
    return httpx.Client(base_url=service.url, headers=headers, timeout=30)


def create(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post("/v2/sandboxes", json={"templateID": "base", **body})
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_the_control_plane_needs_a_client_key(service: Service) -> None:
    with api(service, None) as anonymous:
        response = anonymous.get("/v2/sandboxes")
    assert response.status_code == 401 and response.json()["code"] == 401
    with httpx.Client(base_url=service.url, headers={"X-API-KEY": "nope"}) as wrong:
        assert wrong.get("/v2/sandboxes").json()["code"] == 401
    approver = {"X-API-KEY": "key-approver-0123456789"}
    with httpx.Client(base_url=service.url, headers=approver) as approving:
        response = approving.post("/v2/sandboxes", json={"templateID": "base"})
    assert response.status_code == 403 and set(response.json()) == {"code", "message"}
    with api(service) as http:  # positive control
        assert http.get("/v2/sandboxes").status_code == 200
        assert http.get("/v1/sandboxes").status_code == 401  # codecage's API wants its header


def test_a_sandbox_is_reached_by_its_id_and_token_only(service: Service) -> None:
    with api(service) as alice, api(service, "bob") as bob:
        made = create(alice, metadata={"k": "v"})
        sid, token = made["sandboxID"], made["envdAccessToken"]
        assert made["envdVersion"] and token
        try:
            with envd(service, sid, token) as good:
                assert good.get("/health").status_code == 204
            with envd(service, sid, "wrong") as wrong:
                response = wrong.get("/health")
                assert response.status_code == 401 and response.json()["code"] == 401
            with envd(service, sid, None) as missing:
                assert missing.get("/health").status_code == 401
            with envd(service, "0" * 32, token) as unknown:
                response = unknown.get("/health")
                assert response.status_code == 502 and "was not found" in response.json()["message"]
            with envd(service, sid, token, port=1234) as closed:
                response = closed.get("/health")
                assert response.status_code == 502 and "port is not open" in response.text
            theirs = bob.get(f"/sandboxes/{sid}")
            nothing = bob.get(f"/sandboxes/{'0' * 32}")
            assert theirs.status_code == nothing.status_code == 404
            assert bob.delete(f"/sandboxes/{sid}").status_code == 404
            assert [s["sandboxID"] for s in bob.get("/v2/sandboxes").json()] == []
            mine = alice.get("/v2/sandboxes", params={"metadata": "k=v"}).json()
            assert [s["sandboxID"] for s in mine] == [sid]
            assert alice.get("/v2/sandboxes", params={"metadata": "k=w"}).json() == []
        finally:
            assert alice.delete(f"/sandboxes/{sid}").status_code == 204
        with envd(service, sid, token) as after:
            assert after.get("/health").status_code == 502


def test_bad_control_plane_input_is_e2b_4xx(service: Service) -> None:
    with api(service) as http:
        unknown = http.post("/v2/sandboxes", json={"templateID": "no-such-template"})
        assert unknown.status_code == 404 and "not found" in unknown.json()["message"]
        for bad in ({}, {"templateID": 5}, {"templateID": "base", "timeout": -1}):
            response = http.post("/v2/sandboxes", json=bad)
            assert response.status_code == 400, bad
            assert set(response.json()) == {"code", "message"}
        response = http.post(
            "/v2/sandboxes", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        response = http.post("/v2/sandboxes", content=b"x" * (12 << 20))
        assert response.status_code == 413 and response.json()["code"] == 413
        assert http.post(f"/sandboxes/{'0' * 32}/pause", json={}).status_code == 404
        assert http.get("/v2/sandboxes", params={"state": "bogus"}).status_code == 400


def test_the_lifetime_ends_a_sandbox(service: Service) -> None:
    with api(service) as http:
        made = create(http, timeout=3600)
        sid, token = made["sandboxID"], made["envdAccessToken"]
        assert http.post(f"/sandboxes/{sid}/timeout", json={"timeout": 1}).status_code == 204
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if http.get(f"/sandboxes/{sid}").status_code == 404:
                break
            time.sleep(0.1)
        assert http.get(f"/sandboxes/{sid}").status_code == 404
        with envd(service, sid, token) as gone:
            assert gone.get("/health").status_code == 502


def test_connect_rpcs_refuse_bad_input(service: Service) -> None:
    with api(service) as http:
        made = create(http)
        sid, token = made["sandboxID"], made["envdAccessToken"]
        try:
            with envd(service, sid, token) as rpc:
                unknown = rpc.post(
                    "/nope.Nope/Do", content=b"{}", headers={"content-type": c.UNARY_TYPE}
                )
                assert unknown.status_code == 404 and unknown.json()["code"] == "unimplemented"
                method = rpc.post(
                    "/filesystem.Filesystem/Nope",
                    content=b"{}",
                    headers={"content-type": c.UNARY_TYPE},
                )
                assert method.json()["code"] == "unimplemented"
                stat, unary = "/filesystem.Filesystem/Stat", {"content-type": c.UNARY_TYPE}
                big = rpc.post(stat, content=b" " * (2 << 20) + b"{}", headers=unary)
                assert big.status_code == 429 and big.json()["code"] == "resource_exhausted"
                huge = rpc.post(stat, content=b"x" * (12 << 20), headers=unary)
                assert huge.status_code == 413 and huge.json()["code"] == 413  # the body limit
                assert rpc.post(stat, json={"path": "."}, headers=unary).status_code == 200
        finally:
            http.delete(f"/sandboxes/{sid}")


def test_hosted_addresses_and_signed_urls_reach_a_sandbox(service: Service) -> None:
    """`{port}-{id}.{domain}` routes as the headers do (behind a proxy for every such
    host); a signed /files URL needs no token, and an expired or wrong one is 401."""
    with api(service) as http:
        made = create(http)
        sid, token = made["sandboxID"], made["envdAccessToken"]
        try:
            host = {"Host": f"{ENVD_PORT}-{sid}.sandbox.test"}
            with httpx.Client(base_url=service.url, timeout=30) as plain:
                assert (
                    plain.get("/health", headers={**host, "X-Access-Token": token}).status_code
                    == 204
                )
                assert plain.get("/health", headers=host).status_code == 401  # no token
                unknown = {"Host": f"{ENVD_PORT}-{'0' * 32}.sandbox.test"}
                assert plain.get("/health", headers=unknown).status_code == 502
                assert (
                    plain.get("/healthz", headers={"Host": "api.sandbox.test"}).status_code == 200
                )
                upload = plain.post(
                    "/files",
                    params={"path": "signed.txt"},
                    content=b"signed",
                    headers={
                        **host,
                        "X-Access-Token": token,
                        "content-type": "application/octet-stream",
                    },
                )
                assert upload.status_code == 200, upload.text
                assert upload.json()[0]["path"] == "/home/user/signed.txt"
                later = int(time.time()) + 60
                good = {
                    "path": "signed.txt",
                    "signature": signature("signed.txt", "read", "", token, later),
                    "signature_expiration": str(later),
                }
                assert plain.get("/files", params=good, headers=host).content == b"signed"
                expired = dict(good, signature_expiration=str(int(time.time()) - 10))
                response = plain.get("/files", params=expired, headers=host)
                assert response.json() == {"code": 401, "message": "signature is already expired"}
                wrong = dict(good, signature="v1_nope")
                assert plain.get("/files", params=wrong, headers=host).status_code == 401
                write_sig = dict(good, signature=signature("signed.txt", "write", "", token, later))
                assert plain.get("/files", params=write_sig, headers=host).status_code == 401
        finally:
            http.delete(f"/sandboxes/{sid}")


def test_control_plane_operations_are_audited(service: Service) -> None:
    with api(service) as http:
        sid = create(http)["sandboxID"]
        assert http.post(f"/sandboxes/{sid}/timeout", json={"timeout": 60}).status_code == 204
        assert http.delete(f"/sandboxes/{sid}").status_code == 204
    kinds = [r["kind"] for r in service.audit.runs(tenant="alice", sandbox_id=sid)]
    assert kinds == ["sandbox_create", "sandbox_timeout", "sandbox_kill"]


def test_files_and_filesystem_over_the_fake(service: Service) -> None:
    """envd's /files and a few Filesystem calls, end to end over the fake's files."""
    with api(service) as http:
        made = create(http)
        sid, token = made["sandboxID"], made["envdAccessToken"]
        try:
            with envd(service, sid, token) as sbx:
                boundary = "b0und"
                body = (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                    f'filename="one.txt"\r\n\r\n1\r\n--{boundary}\r\nContent-Disposition: '
                    f'form-data; name="file"; filename="d/two.txt"\r\n\r\n22\r\n--{boundary}--\r\n'
                ).encode()
                response = sbx.post(
                    "/files",
                    content=body,
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"},
                )
                assert [e["path"] for e in response.json()] == [
                    "/home/user/one.txt",
                    "/home/user/d/two.txt",
                ]
                assert sbx.get("/files", params={"path": "d/two.txt"}).content == b"22"
                missing = sbx.get("/files", params={"path": "nope"})
                assert missing.status_code == 404 and missing.json()["code"] == 404
                unary = {"content-type": c.UNARY_TYPE}
                listed = sbx.post(
                    "/filesystem.Filesystem/ListDir", json={"path": ".", "depth": 2}, headers=unary
                )
                assert [e["name"] for e in listed.json()["entries"]] == ["d", "two.txt", "one.txt"]
                made_dir = sbx.post(
                    "/filesystem.Filesystem/MakeDir", json={"path": "d"}, headers=unary
                )
                assert made_dir.status_code == 409 and made_dir.json()["code"] == "already_exists"
                gone = sbx.post("/filesystem.Filesystem/Stat", json={"path": "nope"}, headers=unary)
                assert gone.status_code == 404 and gone.json()["code"] == "not_found"
                moved = sbx.post(
                    "/filesystem.Filesystem/Move",
                    json={"source": "one.txt", "destination": "e/one.txt"},
                    headers=unary,
                )
                assert moved.json()["entry"]["path"] == "/home/user/e/one.txt"
                assert (
                    sbx.post(
                        "/filesystem.Filesystem/Remove", json={"path": "nope"}, headers=unary
                    ).json()
                    == {}
                )
        finally:
            http.delete(f"/sandboxes/{sid}")
