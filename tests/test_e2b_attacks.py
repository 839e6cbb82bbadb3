"""Attacks on the E2B surfaces of a real `codecage serve` (tests/e2b_server.py), with E2B's
own SDK for the legitimate side and raw httpx for the attacker. Each attack has its
positive control: the same request, made as it should be, succeeds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox, TimeoutException

from .conftest import Service
from .test_e2b import envd
from .test_processes import wait_until

pytestmark = [pytest.mark.requires_root, pytest.mark.slow]


def audit_rows(db: Path, sandbox_id: str, kind: str) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT code FROM runs WHERE sandbox_id = ? AND kind = ? ORDER BY rowid",
            (sandbox_id, kind),
        ).fetchall()
    finally:
        conn.close()
    return [r[0] for r in rows]


# -- signed /files URLs ------------------------------------------------------------------------


def test_a_signed_download_url_reads_only_its_own_path(
    e2b_env: dict[str, str], e2b_service: Service
) -> None:
    sbx = Sandbox.create()
    try:
        sbx.files.write("public.txt", "shared on purpose")
        sbx.files.write("secret.txt", "never shared")
        url = sbx.download_url("public.txt", use_signature_expiration=120)
        with httpx.Client(timeout=60) as http:
            control = http.get(url)  # the URL as it was given: the file it names
            assert control.status_code == 200 and control.text == "shared on purpose"
            # a second `path` after the signed one: the route would read the last one
            for extra in ("&path=secret.txt", "&path=/home/user/secret.txt"):
                attack = http.get(url + extra)
                assert attack.status_code == 401, attack.text
                assert "never shared" not in attack.text
            # and before it: the signature would be checked against the first one
            base, _, query = url.partition("?")
            attack = http.get(f"{base}?path=secret.txt&{query}")
            assert attack.status_code == 401 and "never shared" not in attack.text
            # a duplicated signature or expiration is refused as well
            for name in ("signature", "signature_expiration"):
                value = httpx.URL(url).params[name]
                assert http.get(f"{url}&{name}={value}").status_code == 401
            # the same, addressed to the sandbox by headers (no token), is refused too
            headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
            assert http.get(url, headers=headers).status_code == 200
            attack = http.get(url + "&path=secret.txt", headers=headers)
            assert attack.status_code == 401 and "never shared" not in attack.text
    finally:
        sbx.kill()


def test_a_signed_upload_url_writes_only_its_own_path(
    e2b_env: dict[str, str], e2b_service: Service
) -> None:
    sbx = Sandbox.create()
    try:
        sbx.files.write("keep.txt", "original")
        url = sbx.upload_url("drop.txt", use_signature_expiration=120)
        raw = {"Content-Type": "application/octet-stream"}
        with httpx.Client(timeout=60) as http:
            control = http.post(url, content=b"dropped", headers=raw)
            assert control.status_code == 200, control.text
            assert sbx.files.read("drop.txt") == "dropped"
            attack = http.post(url + "&path=keep.txt", content=b"overwritten", headers=raw)
            assert attack.status_code == 401, attack.text
        assert sbx.files.read("keep.txt") == "original"
    finally:
        sbx.kill()


def test_a_signed_url_is_no_key_to_another_sandbox(
    e2b_env: dict[str, str], e2b_service: Service
) -> None:
    one, two = Sandbox.create(), Sandbox.create()
    try:
        one.files.write("f.txt", "one's")
        two.files.write("f.txt", "two's")
        url = one.download_url("f.txt")
        with httpx.Client(timeout=60) as http:
            assert http.get(url).text == "one's"  # control: its own sandbox
            for sandbox_id in (two.sandbox_id, "0" * 32):
                headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983"}
                attack = http.get(url, headers=headers)
                assert attack.status_code in (401, 502) and "two's" not in attack.text
            # a hosted-style Host naming the other sandbox: its token did not sign this
            host = f"49983-{two.sandbox_id}.sandbox.example.com"
            attack = http.get(url, headers={"Host": host})
            assert attack.status_code == 401 and "two's" not in attack.text
            # a Host naming the signer works (the control of the same path)
            host = f"49983-{one.sandbox_id}.sandbox.example.com"
            assert http.get(url, headers={"Host": host}).text == "one's"
    finally:
        one.kill()
        two.kill()


def test_tokens_name_their_own_sandbox_only(e2b_env: dict[str, str], e2b_service: Service) -> None:
    one, two = Sandbox.create(), Sandbox.create()
    try:
        with envd(e2b_service, one) as own:
            assert own.get("/files", params={"path": ".bashrc"}).status_code in (200, 404)
        # one's token on two's id, and no credential at all: refused before any work
        with envd(e2b_service, two, token=one._envd_access_token) as crossed:
            assert crossed.get("/files", params={"path": ".bashrc"}).status_code == 401
        with envd(e2b_service, two, token=None) as bare:
            assert bare.get("/files", params={"path": ".bashrc"}).status_code == 401
            listing = bare.post(
                "/filesystem.Filesystem/ListDir",
                json={"path": "/"},
                headers={"Content-Type": "application/json"},
            )
            assert listing.status_code == 401
    finally:
        one.kill()
        two.kill()


# -- the audit log ---------------------------------------------------------------------------


def test_a_connect_that_extends_the_lifetime_is_audited(
    e2b_env: dict[str, str], e2b_service: Service
) -> None:
    sbx = Sandbox.create(timeout=60)
    try:
        Sandbox.connect(sbx.sandbox_id, timeout=30)  # within the lifetime: nothing changes
        assert audit_rows(e2b_service.db, sbx.sandbox_id, "sandbox_timeout") == []
        sbx.set_timeout(90)  # control: a timeout change is a row
        assert audit_rows(e2b_service.db, sbx.sandbox_id, "sandbox_timeout") == ["timeout=90"]
        Sandbox.connect(sbx.sandbox_id, timeout=900)  # a longer life, through connect
        rows = audit_rows(e2b_service.db, sbx.sandbox_id, "sandbox_timeout")
        assert rows == ["timeout=90", "connect timeout=900"]
        assert (sbx.get_info().end_at - sbx.get_info().started_at).total_seconds() > 800
    finally:
        sbx.kill()


# -- resource bounds ---------------------------------------------------------------------------


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def test_process_deadlines_pile_up_no_threads(
    e2b_env: dict[str, str], e2b_service: Service
) -> None:
    from .test_e2b_process import STREAM, frame, frames

    sbx = Sandbox.create()
    count = 40
    try:
        with envd(e2b_service, sbx) as client:

            def start(headers: dict[str, str]) -> None:
                answer = client.post(
                    "/process.Process/Start",
                    content=frame({"process": {"cmd": "/bin/true"}}),
                    headers={"Content-Type": STREAM, **headers},
                )
                events = [m for _, m in frames(answer.content)]
                assert any("end" in e.get("event", {}) for e in events), answer.content

            for _ in range(count):  # warm the service's worker threads up
                start({})
            before = _threads(e2b_service.process.pid)
            for _ in range(count):  # each with an hour's deadline, each over at once
                start({"Connect-Timeout-Ms": "3600000"})
            grown = _threads(e2b_service.process.pid) - before
            assert grown < count // 2, f"{grown} threads more after {count} short processes"
        # control: a deadline still kills a process that outlives it
        with pytest.raises(TimeoutException):
            sbx.commands.run("sleep 30", timeout=1)
        wait_until(lambda: not any("sleep 30" in " ".join(p.args) for p in sbx.commands.list()))
    finally:
        sbx.kill()


def _run_over(db: Path, sandbox_id: str, code: str) -> bool:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute(
            "SELECT ended_at FROM runs WHERE sandbox_id = ? AND kind = 'execute' AND code = ?",
            (sandbox_id, code),
        ).fetchone()
    finally:
        conn.close()
    return row is not None and row[0] is not None


def test_a_client_that_does_not_read_holds_the_host_to_a_bound(
    e2b_env: dict[str, str], e2b_service: Service
) -> None:
    import json

    from e2b_code_interpreter import Sandbox as Interpreter

    sbx = Interpreter.create()
    headers = {
        "E2b-Sandbox-Id": sbx.sandbox_id,
        "E2b-Sandbox-Port": "49999",
        "X-Access-Token": sbx._envd_access_token or "",
    }
    try:
        with httpx.Client(base_url=e2b_service.url, headers=headers, timeout=300) as http:
            # control: a client that reads gets every line
            small = http.post("/execute", json={"code": "for i in range(2000):\n    print(i % 10)"})
            lines = [json.loads(line) for line in small.text.splitlines()]
            out = "".join(line["text"] for line in lines if line["type"] == "stdout")
            assert out.count("\n") == 2000 and "dropped" not in small.text
            # a line each for 120000 lines (what they cost the host held is ~60 MiB: twice
            # its bound), and a client that reads none until the run is over
            code = "for i in range(120000):\n    print(i % 10)"
            with http.stream("POST", "/execute", json={"code": code}) as response:
                wait_until(lambda: _run_over(e2b_service.db, sbx.sandbox_id, code), 240)
                body = response.read().decode()
        lines = [json.loads(line) for line in body.splitlines()]
        assert lines[-1] == {"type": "end_of_execution"}
        notes = [
            line["text"] for line in lines if "lines of output dropped" in line.get("text", "")
        ]
        assert notes, "every line was held for a client that read none"
        kept = sum(line["text"].count("\n") for line in lines if line["type"] == "stdout")
        dropped = sum(int(note.split()[1]) for note in notes)
        assert kept < 120000 and kept + dropped == 120000
        assert sbx.run_code("1 + 1").text == "2"  # the sandbox is fine
    finally:
        sbx.kill()
