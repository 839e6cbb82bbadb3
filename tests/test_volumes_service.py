"""Volumes through the service (docs/volumes.md): the HTTP API and the remote SDK, owned per
tenant (another tenant's volume is the same 404 as a missing one), a second attachment a
409, every attach and detach in the audit log, a service killed mid-write leaves a volume
that checks clean and holds every fsynced write; and the CLI's local store."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from codecage import VolumeBusy, VolumeNotFound
from codecage._jail import volumes as host_volumes
from codecage._volumes import Volumes

from .conftest import Service, start_service, stop_service
from .test_service import runs
from .test_volumes import WRITER

pytestmark = pytest.mark.requires_root


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    service = start_service(tmp_path / "audit.db")
    try:
        yield service
    finally:
        stop_service(service)


def _error(response: httpx.Response) -> dict[str, object]:
    body = response.json()["error"]
    return {"status": response.status_code, "type": body["type"]}


def test_volumes_over_http_are_the_tenants_own_and_audited(svc: Service) -> None:
    alice, bob = svc.client("alice"), svc.client("bob")
    with alice, bob:
        made = alice.create_volume("work", 16)
        assert made["name"] == "work" and made["size_mb"] == 16
        assert [v["name"] for v in alice.volumes()] == ["work"]
        assert bob.volumes() == []  # the control for what follows: alice's is there
        headers = {"Authorization": f"Bearer {svc.keys['bob']}"}
        theirs = httpx.get(f"{svc.url}/v1/volumes/work", headers=headers)
        missing = httpx.get(f"{svc.url}/v1/volumes/nothing", headers=headers)
        assert _error(theirs) == _error(missing) == {"status": 404, "type": "VolumeNotFound"}
        assert theirs.json()["error"]["message"].replace("work", "X") == missing.json()["error"][
            "message"
        ].replace("nothing", "X")
        with pytest.raises(VolumeNotFound):
            bob.Sandbox(volumes={"/data": "work"})
        with pytest.raises(VolumeNotFound):
            bob.delete_volume("work")

        sbx = alice.Sandbox(volumes={"/home/user": "work"})
        try:
            sbx.run_code("open('/home/user/note.txt', 'w').write('from http')")
            with pytest.raises(VolumeBusy):
                alice.Sandbox(volumes={"/data": "work"})
            with pytest.raises(VolumeBusy):
                alice.delete_volume("work")
        finally:
            sbx.kill()
        archive = b"".join(alice.export_volume("work"))
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            assert tar.getnames() == ["note.txt"]
        alice.create_volume("copy", 16)
        assert alice.import_volume("copy", archive) == 1
        again = alice.Sandbox(volumes={"/data": "copy"})
        try:
            assert "".join(again.run_code("print(open('/data/note.txt').read())").logs.stdout) == (
                "from http\n"
            )
        finally:
            again.kill()
        alice.delete_volume("work")
        assert [v["name"] for v in alice.volumes()] == ["copy"]
    kinds = [r["kind"] for r in runs(svc.db, tenant="alice") if r["kind"].startswith("volume_")]
    assert kinds.count("volume_attach") == kinds.count("volume_detach") >= 4
    assert "volume_create" in kinds and "volume_delete" in kinds and "volume_import" in kinds
    attach = runs(svc.db, tenant="alice", kind="volume_attach")[0]
    assert attach["sandbox_id"] == sbx.id


def test_a_service_killed_mid_write_leaves_a_clean_volume(tmp_path: Path) -> None:
    svc = start_service(tmp_path / "audit.db")
    try:
        with svc.client("alice") as alice:
            alice.create_volume("crash", 64)
            sbx = alice.Sandbox(volumes={"/data": "crash"})
            killed = []

            def on_stdout(message: object) -> None:
                if "synced" in str(message) and not killed:
                    killed.append(True)
                    svc.process.kill()  # kill -9 of the service, its sandbox mid-write

            with pytest.raises(Exception):  # noqa: B017 - the connection is cut
                sbx.run_code(WRITER.format(path="/data"), on_stdout=on_stdout, timeout=60)
            assert killed
            svc.process.wait()
    finally:
        stop_service(svc)
    store = Volumes(tmp_path / "volumes", owner="alice")
    assert host_volumes.wait_detached(store.dir / "crash.img", 15.0)
    store.check("crash")  # e2fsck -n -f: SandboxError on any error
    from codecage import Sandbox

    with Sandbox(volumes={"/data": "crash"}, volume_store=store) as sbx2:
        lines = sbx2.run_code("print(open('/data/log').read().count('line '))")
        assert int("".join(lines.logs.stdout)) >= 200


def test_the_cli_manages_the_local_store(tmp_path: Path) -> None:
    def cli(*args: str, data: bytes | None = None) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "codecage", "volume", *args, "--dir", str(tmp_path / "v")],
            input=data,
            capture_output=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        return done.stdout.decode()

    assert "16 MiB" in cli("create", "cli", "--size-mb", "16")
    assert "cli  16 MiB" in cli("list")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    assert "1 members imported" in cli("import", "cli", "--file", "-", data=buf.getvalue())
    exported = subprocess.run(
        [sys.executable, "-m", "codecage", "volume", "export", "cli", "--dir", str(tmp_path / "v")],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(exported)) as tar:
        assert tar.getnames() == ["hello.txt"]
    assert "files" in cli("check", "cli")
    assert "deleted" in cli("delete", "cli")
    assert "no volumes" in cli("list")


def test_e2b_create_mounts_the_tenants_volumes(
    e2b_env: dict[str, str], e2b_service: Service
) -> None:
    from e2b import Sandbox as E2BSandbox

    with e2b_service.client("alice") as alice:
        alice.create_volume("e2b-vol", 16)
        try:
            sbx = E2BSandbox.create(timeout=120, volume_mounts={"/data": "e2b-vol"})
            try:
                sbx.files.write("/data/from-e2b.txt", "kept")
            finally:
                sbx.kill()
            again = E2BSandbox.create(timeout=120, volume_mounts={"/mnt/v": "e2b-vol"})
            try:
                assert again.files.read("/mnt/v/from-e2b.txt") == "kept"
                with pytest.raises(Exception, match="attached"):  # the second attachment
                    E2BSandbox.create(timeout=120, volume_mounts={"/data": "e2b-vol"})
            finally:
                again.kill()
            with pytest.raises(Exception, match="no volume"):  # a missing one
                E2BSandbox.create(
                    timeout=120,
                    volume_mounts={"/data": "nothing"},
                )
        finally:
            alice.delete_volume("e2b-vol")
