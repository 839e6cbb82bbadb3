"""`codecage serve` on loopback with a real SQLite audit log: tenants, bad input, the audit
log's guarantees, crashes and shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import codecage
from codecage import Policy, SandboxNotFound

from .conftest import Service, cli, sandbox_cgroups, start_service, stop_service

pytestmark = pytest.mark.requires_root


def raw(service: Service, tenant: str | None = "alice") -> httpx.Client:
    headers = {"Authorization": f"Bearer {service.keys[tenant]}"} if tenant else {}
    from .openapi_check import validate

    return httpx.Client(
        base_url=service.url, headers=headers, timeout=60, event_hooks={"response": [validate]}
    )


def runs(db: Path, **where: Any) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        clause = " AND ".join(f"{k} = ?" for k in where) or "1"
        return [
            dict(r)
            for r in conn.execute(
                f"SELECT * FROM runs WHERE {clause} ORDER BY rowid", tuple(where.values())
            )
        ]
    finally:
        conn.close()


def test_keys_are_required_and_stored_hashed(service: Service) -> None:
    with raw(service, None) as http:
        assert http.get("/v1/sandboxes").status_code == 401
        wrong = http.get("/v1/sandboxes", headers={"Authorization": "Bearer cc_wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "Unauthorized"
        assert http.get("/healthz").json()["status"] == "ok"
    conn = sqlite3.connect(service.db)
    stored = [r[0] for r in conn.execute("SELECT key_sha256 FROM api_keys")]
    conn.close()
    assert service.keys["alice"] not in stored and len(stored[0]) == 64


def test_tenants_cannot_see_each_other(service: Service, alice: codecage.Client) -> None:
    with alice.Sandbox() as sbx, raw(service, "bob") as bob:
        sbx.files.write("secret.txt", b"alice's")
        sbx.run_code("x = 'alice'")
        missing = "0" * 32
        base, other = f"/v1/sandboxes/{sbx.id}", f"/v1/sandboxes/{missing}"
        probes = [
            ("GET", "", None),
            ("POST", "/execute", {"code": "x"}),
            ("POST", "/commands", {"cmd": "cat secret.txt"}),
            ("DELETE", "", None),
        ]
        for method, suffix, body in probes:
            theirs = bob.request(method, base + suffix, json=body)
            nothing = bob.request(method, other + suffix, json=body)
            assert theirs.status_code == nothing.status_code == 404
            assert theirs.json() == json.loads(nothing.text.replace(missing, sbx.id))
        theirs = bob.get(base + "/files", params={"path": "secret.txt"})
        assert theirs.status_code == 404 and theirs.json()["error"]["type"] == "SandboxNotFound"
        assert bob.get("/v1/sandboxes").json() == []
        assert all(r["tenant"] == "bob" for r in bob.get("/v1/audit").json())
        assert bob.get("/v1/audit", params={"sandbox_id": sbx.id}).json() == []
        assert sbx.run_code("x").text == "'alice'"  # untouched


def test_bad_input_is_4xx_with_a_message(service: Service, alice: codecage.Client) -> None:
    with alice.Sandbox() as sbx, raw(service) as http:
        base = f"/v1/sandboxes/{sbx.id}"
        r = http.post(
            f"{base}/execute", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 422 and r.json()["error"]["type"] == "ValidationError"
        r = http.post(f"{base}/execute", json={"code": 5})
        assert r.status_code == 422 and "code" in r.json()["error"]["message"]
        r = http.post(f"{base}/execute", json={"code": "1", "timeout": -1})
        assert r.status_code == 422 and "timeout" in r.json()["error"]["message"]
        r = http.post("/v1/sandboxes", json={"policy": {"memory": 5}})
        assert r.status_code == 422 and "memory" in r.json()["error"]["message"]
        r = http.post("/v1/sandboxes", json={"policy": {"memory_mb": 1 << 20}})
        assert (
            r.status_code == 422
            and "beyond what this service allows" in r.json()["error"]["message"]
        )
        r = http.post(f"{base}/execute", json={"code": "x" * (12 << 20)})
        assert r.status_code == 413
        for bad in ("a\0b", "x" * 5000, ""):
            r = http.get(f"{base}/files", params={"path": bad})
            assert r.status_code == 400, bad
        r = http.get(f"{base}/files", params={"path": "../../../etc/passwd"})
        assert r.status_code == 200 and b"sandbox" in r.content  # the jail's own /etc/passwd
        assert r.content != Path("/etc/passwd").read_bytes()
        for response in (r,):
            assert "/work" not in response.text and "Traceback" not in response.text


def test_audit_records_before_the_run_and_after(service: Service, alice: codecage.Client) -> None:
    with alice.Sandbox() as sbx:
        seen: list[dict[str, Any]] = []

        def watch(msg: object) -> None:
            if not seen:  # while the cell is still running, the start record is durable already
                seen.extend(runs(service.db, sandbox_id=sbx.id, kind="execute"))

        code = (
            "import time\nprint('started', flush=True)\ntime.sleep(1)\nprint('\\x1b[31mred')\n6 * 7"
        )
        ex = sbx.run_code(code, on_stdout=watch)
        assert ex.text == "42"
        assert len(seen) == 1 and seen[0]["status"] == "started" and seen[0]["code"] == code
        (done,) = runs(service.db, sandbox_id=sbx.id, kind="execute")
        assert (
            done["status"] == "completed" and done["outcome"] == "ok" and done["tenant"] == "alice"
        )
        assert done["code_sha256"] == __import__("hashlib").sha256(code.encode()).hexdigest()
        assert json.loads(done["policy"])["memory_mb"] == 512 and "started" in done["output"]
        sbx.files.write("in.bin", b"\x00" * 1000)
        assert sbx.files.read("in.bin") == b"\x00" * 1000
        upload, download = runs(service.db, sandbox_id=sbx.id, kind="file_upload") + runs(
            service.db, sandbox_id=sbx.id, kind="file_download"
        )
        assert json.loads(upload["files"])[0]["size"] == 1000
        assert (
            json.loads(download["files"])[0]["sha256"]
            == __import__("hashlib").sha256(b"\x00" * 1000).hexdigest()
        )
        killed = sbx.run_code("import time; time.sleep(60)", timeout=1)
        assert killed.killed_by == "timeout"
        last = runs(service.db, sandbox_id=sbx.id, kind="execute")[-1]
        assert last["killed_by"] == "timeout" and last["outcome"] == "killed"
    # the CLI: filters, export, and escapes neutralised on a terminal
    exported = cli("audit", "export", "--db", str(service.db), "--sandbox", sbx.id)
    assert len(exported.splitlines()) == 4 and all(
        json.loads(line)["sandbox_id"] == sbx.id for line in exported.splitlines()
    )
    primary, secondary = os.openpty()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "codecage",
                "audit",
                "show",
                done["id"],
                "--db",
                str(service.db),
            ],
            stdout=secondary,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        os.close(secondary)
        secondary = -1
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    assert b"red" in shown and b"\x1b[31m" not in shown


def test_concurrent_executes_on_one_sandbox_are_serialized_and_recorded(
    alice: codecage.Client, service: Service
) -> None:
    with alice.Sandbox() as sbx:
        spans: list[tuple[float, float]] = []

        def one() -> None:
            ex = sbx.run_code("import time; t0 = time.time(); time.sleep(0.3); (t0, time.time())")
            spans.append(eval(ex.text or ""))

        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        spans.sort()
        assert len(spans) == 2 and spans[0][1] <= spans[1][0]
        assert len(runs(service.db, sandbox_id=sbx.id, kind="execute")) == 2


def test_a_crashing_kernel_is_reported_and_the_server_stays_up(
    alice: codecage.Client, service: Service
) -> None:
    with alice.Sandbox() as sbx:
        ex = sbx.run_code("import ctypes; ctypes.string_at(0)")  # SIGSEGV
        assert ex.killed_by == "signal" and ex.exit_code == 128 + signal.SIGSEGV and ex.state_lost
        ex = sbx.run_code("import os; os._exit(7)")
        assert ex.exit_code == 7 and ex.state_lost
        assert sbx.run_code("1 + 1").text == "2"
    assert httpx.get(f"{service.url}/healthz").status_code == 200


def test_one_shot_run_and_metrics(alice: codecage.Client, service: Service) -> None:
    ex = alice.run("import sys; print('once'); sys.exit(3)", Policy(timeout_s=10))
    assert ex.logs.stdout == ["once\n"] and ex.exit_code == 3
    (record,) = [r for r in runs(service.db, kind="run") if "once" in r["code"]]
    assert record["outcome"] == "ok" and json.loads(record["policy"])["timeout_s"] == 10
    operator = cli(
        "keys", "create", "--tenant", "ops", "--role", "operator", "--db", str(service.db)
    )
    with alice.Sandbox() as sbx:
        headers = {"Authorization": f"Bearer {operator}"}
        live = httpx.get(f"{service.url}/metrics", headers=headers).text
        assert f'codecage_sandbox_memory_bytes{{sandbox="{sbx.id}",tenant="alice"}}' in live
        assert "codecage_pool_ready" in live and "codecage_pool_hits" in live
        assert sbx.id not in httpx.get(f"{service.url}/metrics").text  # without the key
    text = httpx.get(f"{service.url}/metrics").text
    assert (
        "codecage_sandboxes_live" in text
        and 'codecage_runs_total{killed_by="",kind="run",outcome="ok"}' in text
    )
    assert "codecage_run_seconds_bucket" in text


def test_many_sessions_from_many_threads(service: Service) -> None:
    """100 sessions alive at once, driven by 20 client threads, all answering correctly."""
    errors: list[str] = []
    all_alive = threading.Barrier(20, timeout=120)
    live: list[int] = []

    def worker(n: int) -> None:
        with service.client("alice") as client:
            sandboxes = []
            try:
                for i in range(5):
                    sbx = client.Sandbox()
                    sandboxes.append(sbx)
                    sbx.run_code(f"v = {n * 100 + i}")
                all_alive.wait()
                live.append(len(client.request("GET", "/v1/sandboxes").json()))
                for i, sbx in enumerate(sandboxes):
                    got = sbx.run_code("v * 2").text
                    if got != str((n * 100 + i) * 2):
                        errors.append(f"{n}/{i}: {got}")
            except Exception as exc:  # collected, then asserted
                errors.append(f"{n}: {exc!r}")
            finally:
                for sbx in sandboxes:
                    sbx.kill()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert max(live) >= 100


@pytest.fixture
def quota_service(tmp_path: Path) -> Iterator[Service]:
    config = tmp_path / "service.toml"
    config.write_text("[quotas]\nlive_sandboxes = 2\nruns_per_minute = 6\n")
    svc = start_service(tmp_path / "audit.db", ("alice",), config)
    try:
        yield svc
    finally:
        stop_service(svc)


def test_quotas_answer_429(quota_service: Service) -> None:
    with quota_service.client() as client:
        a, b = client.Sandbox(), client.Sandbox()
        with pytest.raises(codecage.QuotaExceeded):
            client.Sandbox()
        for _ in range(6):
            a.run_code("1")
        with pytest.raises(codecage.QuotaExceeded):
            b.run_code("1")
        a.kill()
        b.kill()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "codecage-test", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_an_unwritable_log_refuses_work(tiny_disk: Path, tmp_path: Path) -> None:
    config = tmp_path / "service.toml"  # no free-space floor: the disk really fills up
    config.write_text("audit_min_free_mb = 0\n")
    svc = start_service(tiny_disk / "audit.db", ("alice",), config)
    try:
        with svc.client() as client, client.Sandbox() as sbx:
            assert sbx.run_code("1 + 1").text == "2"
            filler = tiny_disk / "filler"
            # the log's disk is full (unbuffered: no write left over for close to retry)
            with open(filler, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass
            try:
                with pytest.raises(codecage.AuditUnavailable):
                    sbx.run_code("open('ran', 'w').write('x')")
            finally:
                filler.unlink()
            assert not sbx.files.exists("ran")  # nothing ran unrecorded
    finally:
        stop_service(svc)


def test_kill_9_then_restart_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    svc = start_service(db, ("alice",))
    acknowledged: list[str] = []
    with svc.client() as client:
        sbx = client.Sandbox()
        for i in range(5):
            sbx.run_code(f"print({i})")
            acknowledged.append(f"print({i})")
        in_flight = threading.Thread(
            target=lambda: _swallow(sbx.run_code, "import time; time.sleep(30)")
        )
        in_flight.start()
        deadline = time.monotonic() + 10
        while not any(r["status"] == "started" for r in runs(db)) and time.monotonic() < deadline:
            time.sleep(0.05)
        svc.process.send_signal(signal.SIGKILL)
        svc.process.wait()
        in_flight.join()
    deadline = time.monotonic() + 15
    while _server_sandboxes(svc.process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _server_sandboxes(svc.process.pid) == []  # init saw its channel close: nothing left
    again = start_service(db, ())
    try:
        records = runs(db)
        done = [r["code"] for r in records if r["status"] == "completed"]
        assert all(code in done for code in acknowledged)
        interrupted = [r for r in records if r["status"] == "interrupted"]
        assert [r["code"] for r in interrupted] == ["import time; time.sleep(30)"]
        assert not [p for p in sandbox_cgroups() if str(svc.process.pid) in p]
    finally:
        stop_service(again)
    assert not _leftover_cgroups(svc.process.pid)  # the restart swept the dead server's cgroups


def test_sigterm_shuts_down_cleanly(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    svc = start_service(db, ("alice",))
    with svc.client() as client:
        sbx = client.Sandbox()
        sbx.run_code("x = 1")
        in_flight = threading.Thread(
            target=lambda: _swallow(sbx.run_code, "import time; time.sleep(30)")
        )
        in_flight.start()
        time.sleep(0.5)
        started = time.monotonic()
        stop_service(svc)
        in_flight.join()
    assert time.monotonic() - started < 25
    assert svc.process.returncode in (
        0,
        -signal.SIGTERM,
    )  # uvicorn re-raises the signal after shutdown
    assert _server_sandboxes(svc.process.pid) == [] and not _leftover_cgroups(svc.process.pid)
    assert all(r["status"] == "completed" for r in runs(db))  # the in-flight run was recorded


def _swallow(fn: Any, *args: Any) -> None:
    with contextlib.suppress(codecage.SandboxError, httpx.HTTPError):
        fn(*args)


def _leftover_cgroups(pid: int) -> list[str]:
    base = Path("/sys/fs/cgroup/pids/codecage")
    return [str(p) for p in base.glob(f"{pid}-*/*") if p.is_dir()] if base.exists() else []


def _server_sandboxes(pid: int) -> list[str]:
    """Processes in the cgroups of the server that had this pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"/codecage/{pid}-" in (entry / "cgroup").read_text():
                    found.append(entry.name)
            except OSError:
                continue
    return found


def test_openapi_document_is_current() -> None:
    generated = json.loads(cli("openapi"))
    checked_in = json.loads(
        (Path(__file__).resolve().parent.parent / "docs" / "openapi.json").read_text()
    )
    assert generated == checked_in, "run: .venv/bin/codecage openapi > docs/openapi.json"


def test_sandbox_not_found_after_delete(alice: codecage.Client) -> None:
    sbx = alice.Sandbox()
    sbx.kill()
    with pytest.raises(SandboxNotFound):
        alice.request("GET", f"/v1/sandboxes/{sbx.id}")
