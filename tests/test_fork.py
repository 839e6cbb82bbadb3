"""Fork (docs/fork.md) on the real jail: a new sandbox with the parent's interpreter state
and a copy of its workspace, its own uid, cgroups and limits, and nothing shared after; what
cannot be carried is refused by name (no sandbox made), never dropped; a parent whose code
forges its pack reaches no more than the child's own jail; through the native SDK on every
backend, the HTTP API, the remote SDK, the CLI and E2B's SDK."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from e2b import Sandbox as E2BSandbox
from e2b.exceptions import SandboxNotFoundException

import codecage
from codecage import Policy, Sandbox, SandboxBusy, SandboxError, SandboxPaused
from codecage._jail import get_jail

from .conftest import Service, start_service, stop_service
from .test_service import runs

pytestmark = pytest.mark.requires_root

STATE = (
    "import pandas as pd\n"
    "df = pd.DataFrame({'a': [1, 2, 3]})\n"
    "def double(n):\n    return 2 * n\n"
    "class Box:\n    size = 7\n"
    "shared = [1, 2]\nalias = shared\n"
    "import os\nos.chdir('/home/user/data')\n"
)


def test_a_fork_has_the_state_and_files_and_shares_nothing_after(backend: str) -> None:
    policy = Policy(isolation=backend, allow_weaker=True)  # type: ignore[arg-type]
    with Sandbox(policy) as parent:
        parent.files.write("data/notes.txt", "before the fork")
        parent.run_code(STATE)
        parent.run_code("os.symlink('notes.txt', '/home/user/data/link')")
        with parent.fork() as child:
            assert child.id != parent.id and child.policy == parent.policy
            got = child.run_code("df.a.sum(), double(21), Box.size, alias is shared, os.getcwd()")
            assert got.text == "(np.int64(6), 42, 7, True, '/home/user/data')"
            assert child.files.read("data/notes.txt") == b"before the fork"
            assert child.run_code("os.readlink('/home/user/data/link')").text == "'notes.txt'"
            # independent: a write, or a secret set after the fork, stays where it was made
            child.files.write("data/notes.txt", "written in the fork")
            child.run_code("secret = 'set in the fork'; shared.append(3)")
            parent.run_code("shared.append(4)")
            assert parent.files.read("data/notes.txt") == b"before the fork"
            assert parent.run_code("'secret' in dir(), shared").text == "(False, [1, 2, 4])"
            assert child.run_code("shared").text == "[1, 2, 3]"
            parent.files.write("data/notes.txt", "written in the parent")  # positive control
            assert parent.files.read("data/notes.txt") == b"written in the parent"
            assert child.files.read("data/notes.txt") == b"written in the fork"
            mine, theirs = parent._jailed.launcher.tree, child._jailed.launcher.tree  # type: ignore[attr-defined]
            assert mine.dirs != theirs.dirs  # cgroups of its own
            if "own_uid" in get_jail(backend).enforces:  # gVisor: a kernel each instead
                assert host_uids(mine.pids()).isdisjoint(host_uids(theirs.pids()))


def host_uids(pids: list[int]) -> set[int]:
    """The host's view of the uids of these processes (the sandbox's tree)."""
    uids = set()
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        uids.add(int(next(x for x in status.splitlines() if x.startswith("Uid:")).split()[1]))
    assert uids, "no process of the sandbox was seen"
    return uids


def test_what_cannot_be_carried_is_refused_by_name_and_makes_no_sandbox() -> None:
    with Sandbox() as parent:
        parent.run_code("import threading\nlock = threading.Lock()\nkept = 1")
        with pytest.raises(SandboxError, match=r"lock \(lock: cannot pickle"):
            parent.fork()
        parent.run_code("del lock")
        context = parent.create_code_context()
        with pytest.raises(SandboxError, match="default Python context only"):
            parent.fork()
        parent.remove_code_context(context)
        cmd = parent.commands.run("sleep 600", background=True)
        with pytest.raises(SandboxError, match="running processes"):
            parent.fork()
        cmd.kill()
        parent.pause()
        with pytest.raises(SandboxPaused):
            parent.fork()
        parent.resume()
        running = threading.Thread(target=lambda: parent.run_code("import time; time.sleep(1)"))
        running.start()
        time.sleep(0.3)
        with pytest.raises(SandboxBusy):
            parent.fork()
        running.join()
        with parent.fork() as child:  # positive control: once all is carriable, it forks
            assert child.run_code("kept").text == "1"


FORGED_ARCHIVE = r"""
import io, tarfile
import codecage._inside.fork as fork

def forged(self, state):
    sink = fork._Sink(self.out, self.cancelled)
    with tarfile.open(fileobj=sink, mode="w|") as tar:
        info = tarfile.TarInfo(fork.STATE); info.size = len(state)
        tar.addfile(info, io.BytesIO(state))
        for name, kind, link in MEMBERS:
            info = tarfile.TarInfo(name); info.type = kind; info.linkname = link
            body = b"forged"
            info.size = len(body) if kind == tarfile.REGTYPE else 0
            info.mode = 0o4755
            tar.addfile(info, io.BytesIO(body) if kind == tarfile.REGTYPE else None)
    sink.finish(); self.out.put(None)

fork.Packer._write = forged
"""


@pytest.mark.parametrize(
    "members, refused",
    [
        ([("workspace/../../tmp/escaped", "0", "")], "outside the workspace"),
        ([("/etc/escaped", "0", "")], "outside the workspace"),
        ([("workspace/up", "2", "/tmp"), ("workspace/up/escaped", "0", "")], "through a link"),
        ([("workspace/hard", "1", "/etc/passwd")], "hard link"),
        ([("workspace/dev", "3", "")], "no file, directory or link"),
    ],
    ids=["dotdot", "absolute", "through-symlink", "hardlink-out", "device"],
)
def test_a_parent_that_forges_its_archive_is_refused(
    members: list[tuple[str, str, str]], refused: str
) -> None:
    with Sandbox() as parent:
        spec = [(name, kind.encode(), link) for name, kind, link in members]
        parent.run_code(FORGED_ARCHIVE.replace("MEMBERS", repr(spec)))
        with pytest.raises(SandboxError, match=refused):
            parent.fork()


def test_a_forged_state_runs_only_inside_the_child(tmp_path: Path) -> None:
    # The child unpickles what the parent sent: code of the parent's choosing, run in the
    # child's jail. It tries to reach the host: a file in the test's own directory.
    probe = tmp_path / "reached-from-the-fork"
    reach = f"open({str(probe)!r}, 'w').write('x')"
    payload = (
        "class Evil:\n"
        "    def __reduce__(self):\n"
        f"        return (exec, ({reach!r},))\n"
        "evil = Evil()\n"
    )
    with Sandbox() as parent:
        assert parent.run_code(payload).error is None
        with pytest.raises(SandboxError, match="could not unpack"):
            parent.fork()  # the child's own filesystem has no such directory
    assert not probe.exists()
    subprocess.run(  # positive control: the same code on the host reaches it
        [sys.executable, "-c", f"open({str(probe)!r}, 'w').write('x')"], check=True
    )
    assert probe.exists()


# -- the service ----------------------------------------------------------------------------------


def test_fork_over_http_the_remote_sdk_and_the_cli(service: Service) -> None:
    with service.client("alice") as alice, service.client("bob") as bob:
        sbx = alice.Sandbox()
        try:
            sbx.run_code("x = 41")
            sbx.files.write("f.txt", "kept")
            child = sbx.fork()
            assert child.run_code("x + 1").text == "42" and child.files.read("f.txt") == b"kept"
            child.kill()
            made = alice.request("POST", f"/v1/sandboxes/{sbx.id}/fork", json={"count": 2}).json()
            assert len({m["id"] for m in made}) == 2
            for m in made:
                alice.request("DELETE", f"/v1/sandboxes/{m['id']}")
            with pytest.raises(codecage.SandboxNotFound):  # another tenant's: as none
                bob.request("POST", f"/v1/sandboxes/{sbx.id}/fork")
            with pytest.raises(codecage.PolicyError):
                alice.request("POST", f"/v1/sandboxes/{sbx.id}/fork", json={"count": 0})
            env = {**os.environ, "CODECAGE_URL": service.url}
            env["CODECAGE_API_KEY"] = service.keys["alice"]
            out = subprocess.run(
                [sys.executable, "-m", "codecage", "sandboxes", "fork", sbx.id],
                capture_output=True, text=True, check=True, env=env,
            ).stdout.strip()  # fmt: skip
            forked = out.split(":")[0]
            assert out == f"{forked}: forked from {sbx.id}"
            alice.request("DELETE", f"/v1/sandboxes/{forked}")
        finally:
            sbx.kill()
    kinds = [r["kind"] for r in runs(service.db, sandbox_id=sbx.id)]
    assert kinds.count("sandbox_fork") == 3


def test_e2b_fork(e2b_env: dict[str, str], e2b_service: Service) -> None:
    sbx = E2BSandbox.create(timeout=120)
    try:
        sbx.files.write("/home/user/state.txt", "before the fork")
        forks = sbx.fork(count=2, timeout=60)
        try:
            assert len(forks) == 2 and all(isinstance(f, E2BSandbox) for f in forks)
            one, two = forks
            assert one.files.read("/home/user/state.txt") == "before the fork"
            one.files.write("/home/user/state.txt", "in the fork")
            assert sbx.files.read("/home/user/state.txt") == "before the fork"
            assert two.files.read("/home/user/state.txt") == "before the fork"
            assert one._envd_access_token != sbx._envd_access_token  # a token each
        finally:
            for each in forks:
                each.kill()
        sbx.kill()
        with pytest.raises(SandboxNotFoundException):
            sbx.fork()
    finally:
        sbx.kill()


# -- snapshots --------------------------------------------------------------------------------


def test_snapshots_over_http_the_remote_sdk_and_the_cli(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text("[quotas]\nsnapshots = 2\n")
    svc = start_service(tmp_path / "audit.db", ("alice", "bob"), config)
    try:
        with svc.client("alice") as alice, svc.client("bob") as bob:
            with alice.Sandbox() as sbx:
                sbx.run_code("import numpy as np\nweights = np.arange(4)")
                sbx.files.write("model/notes.txt", "trained")
                first = sbx.create_snapshot("trained")
                files_only = sbx.create_snapshot(memory=False)
                with pytest.raises(codecage.QuotaExceeded):
                    sbx.create_snapshot()  # quotas.snapshots = 2
                sbx.run_code("weights = None")  # the snapshot keeps what was
            with alice.Sandbox(snapshot="trained") as again:  # by name; by id works too
                assert again.run_code("int(weights.sum())").text == "6"
                assert again.files.read("model/notes.txt") == b"trained"
            with alice.Sandbox(snapshot=files_only) as bare:
                assert bare.files.read("model/notes.txt") == b"trained"
                assert bare.run_code("'weights' in dir()").text == "False"
            assert bob.snapshots() == []  # another tenant's: unseen, unusable
            with pytest.raises(codecage.SnapshotNotFound):
                bob.Sandbox(snapshot=first)
            with pytest.raises(codecage.SnapshotNotFound):
                bob.delete_snapshot(first)
            env = {**os.environ, "CODECAGE_URL": svc.url, "CODECAGE_API_KEY": svc.keys["alice"]}
            listed = subprocess.run(
                [sys.executable, "-m", "codecage", "snapshots", "list"],
                capture_output=True, text=True, check=True, env=env,
            ).stdout  # fmt: skip
            assert first in listed and "trained" in listed
            alice.delete_snapshot(first)
            alice.delete_snapshot(files_only)
            assert alice.snapshots() == []
        stored = list((tmp_path / "snapshots").rglob("*"))
        assert [p for p in stored if p.is_file()] == []  # deleted means gone from disk
    finally:
        stop_service(svc)


def test_a_snapshot_outlives_the_service(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    svc = start_service(db, ("alice",))
    with svc.client() as client, client.Sandbox() as sbx:
        sbx.run_code("kept = 'across a restart'")
        snap = sbx.create_snapshot()
    stop_service(svc)
    again = start_service(db, ())
    try:
        again.keys = svc.keys
        with again.client() as client, client.Sandbox(snapshot=snap) as sbx:
            assert sbx.run_code("kept").text == "'across a restart'"
            client.delete_snapshot(snap)
    finally:
        stop_service(again)


def test_e2b_snapshots(e2b_env: dict[str, str], e2b_service: Service) -> None:
    sbx = E2BSandbox.create(timeout=120)
    try:
        sbx.files.write("/home/user/app/config.json", '{"env": "test"}')
        snap = sbx.create_snapshot(name="e2b-snap")
        try:
            assert snap.names == ["e2b-snap"]
            listed = E2BSandbox.list_snapshots(sandbox_id=sbx.sandbox_id).next_items()
            assert [s.snapshot_id for s in listed] == [snap.snapshot_id]
            new = E2BSandbox.create(snap.snapshot_id)
            try:
                assert new.files.read("/home/user/app/config.json") == '{"env": "test"}'
                new.files.write("/home/user/app/config.json", "changed")
                assert sbx.files.read("/home/user/app/config.json") == '{"env": "test"}'
            finally:
                new.kill()
        finally:
            assert E2BSandbox.delete_snapshot(snap.snapshot_id) is True
        assert E2BSandbox.delete_snapshot(snap.snapshot_id) is False
    finally:
        sbx.kill()
