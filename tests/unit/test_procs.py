"""The process channel's host side (codecage._jail.procs) against a scripted process
manager on a socket pair, the SDK's checks of its replies (codecage._processes), and the
process manager's bounded output buffer (codecage._inside.procman.Proc)."""

from __future__ import annotations

import base64
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from errno import EINVAL, EPERM
from typing import Any

import pytest

from codecage import Policy
from codecage._errors import SandboxNotFound, TransportError
from codecage._inside import procman
from codecage._inside.protocol import FrameReader, encode
from codecage._jail.procs import ProcessManager, Spared
from codecage._processes import Caller, call, listing, read

Script = Callable[[socket.socket, dict[str, Any]], None]


class Peer:
    """A scripted process manager: greets (unless told not to), then answers each request
    with what `script` sends."""

    def __init__(self, script: Script, hello: bool = True) -> None:
        self.host, self.inside = socket.socketpair()
        self.ended: list[str] = []
        self.manager = ProcessManager(self.host, self.ended.append, None)
        self.thread = threading.Thread(target=self._serve, args=(script, hello), daemon=True)
        self.thread.start()

    def _serve(self, script: Script, hello: bool) -> None:
        reader = FrameReader()
        if hello:
            self.inside.sendall(encode({"ev": "hello", "protocol": 1, "pid": 2}))
        try:
            while data := self.inside.recv(65536):
                for request in reader.feed(data):
                    script(self.inside, request)
        except OSError:
            pass

    def close(self) -> None:
        self.inside.close()
        self.manager.close()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for peer in made:
        peer.close()


def peer(peers: list[Peer], script: Script, hello: bool = True) -> Peer:
    made = Peer(script, hello)
    peers.append(made)
    return made


def answer(**fields: Any) -> Script:
    return lambda sock, req: sock.sendall(encode({"ev": "done", "id": req["id"], **fields}))


def test_a_reply_comes_back(peers: list[Peer]) -> None:
    p = peer(peers, answer(pid=7))
    assert p.manager.request({"op": "proc_list"})["pid"] == 7
    assert p.manager.ns_pid == 2 and not p.ended


@pytest.mark.parametrize(
    "script",
    [
        lambda sock, req: sock.sendall(encode({"ev": "done", "id": "forged"})),
        lambda sock, req: sock.sendall(encode({"ev": "stdout", "id": req["id"], "text": "x"})),
        lambda sock, req: sock.sendall(struct.pack(">I", 64 << 20) + b"{"),
        lambda sock, req: sock.sendall(struct.pack(">I", 2) + b"[]"),
    ],
    ids=["foreign id", "not a reply", "oversized frame", "not an object"],
)
def test_a_hostile_reply_ends_the_sandbox(peers: list[Peer], script: Script) -> None:
    p = peer(peers, script)
    with pytest.raises(SandboxNotFound):
        p.manager.request({"op": "proc_list"})
    assert p.ended and "process manager broke the protocol" in p.ended[0]
    assert p.manager.closed


def test_no_hello_ends_the_sandbox(peers: list[Peer]) -> None:
    p = peer(peers, answer(), hello=False)
    p.inside.sendall(encode({"ev": "done", "id": "x"}))
    with pytest.raises(SandboxNotFound):
        p.manager.request({"op": "proc_list"})
    assert p.ended


def test_a_silent_or_gone_manager_is_a_transport_error(peers: list[Peer]) -> None:
    silent = peer(peers, lambda sock, req: None)
    with pytest.raises(TransportError, match="did not answer"):
        silent.manager.request({"op": "proc_list"}, timeout_s=0.2)
    assert not silent.ended  # slow is not hostile
    gone = peer(peers, lambda sock, req: sock.close())
    with pytest.raises(TransportError, match="has ended"):
        gone.manager.request({"op": "proc_list"})
    with pytest.raises(TransportError):
        gone.manager.request({"op": "proc_list"})


class Box:
    """What codecage._processes needs of a Sandbox: its policy and its process manager."""

    def __init__(self, manager: ProcessManager) -> None:
        self.policy = Policy()
        self.procs = manager
        self.last_activity = 0.0
        self.proc_observer = None

    def _use(self) -> Box:
        return self

    def process_manager(self) -> ProcessManager:
        return self.procs

    def caller(self) -> Caller:
        return lambda message: call(self, message)  # type: ignore[arg-type]


def chunk(data: bytes, stream: str = "stdout") -> list[str]:
    return [stream, base64.b64encode(data).decode()]


GOOD: dict[str, Any] = {
    "chunks": [chunk(b"abc")],
    "offset": 0,
    "next": 3,
    "dropped": 0,
    "running": True,
    "exit_code": None,
    "signal": None,
}


def test_a_well_formed_read(peers: list[Peer]) -> None:
    box = Box(peer(peers, answer(**GOOD)).manager)
    chunks, nxt, ended = read(box.caller(), 1, 0)
    assert [(c.stream, c.data) for c in chunks] == [("stdout", b"abc")] and nxt == 3
    assert ended is None


@pytest.mark.parametrize(
    "bad",
    [
        {"chunks": [chunk(b"abc", "fd3")]},
        {"chunks": [["stdout", "not base64!"]]},
        {"next": 99},  # more said than sent
        {"offset": 5, "next": 8},  # not where it was asked
        {"dropped": -1},
        {"running": "yes"},
        {"exit_code": "0"},
        {"chunks": [chunk(b"a")] * 5000},
        {"offset": True},
    ],
)
def test_a_malformed_read_is_a_transport_error(peers: list[Peer], bad: dict[str, Any]) -> None:
    box = Box(peer(peers, answer(**{**GOOD, **bad})).manager)
    with pytest.raises(TransportError, match="malformed"):
        read(box.caller(), 1, 0)


def test_a_malformed_listing_is_a_transport_error(peers: list[Peer]) -> None:
    box = Box(peer(peers, answer(processes=[{"pid": "x", "running": True}])).manager)
    with pytest.raises(TransportError):
        listing(box.caller())
    box = Box(peer(peers, answer(processes=[{"pid": 3, "cmd": "c", "running": False}])).manager)
    assert listing(box.caller()) == []  # ended ones are not listed


class Popen:
    pid = 42


def buffer(cap: int) -> procman.Proc:
    return procman.Proc(Popen(), {}, cap)  # type: ignore[arg-type]


def test_the_output_buffer_keeps_the_newest_bytes_and_counts_the_rest() -> None:
    proc = buffer(10)
    proc.add("stdout", b"0123456789")
    proc.add("stderr", b"abcde")
    got = proc.read(0, 1 << 20)
    assert got["dropped"] == 5 and got["offset"] == 5 and got["next"] == 15
    data = [(s, base64.b64decode(d)) for s, d in got["chunks"]]
    assert data == [("stdout", b"56789"), ("stderr", b"abcde")]
    assert proc.read(15, 1 << 20)["chunks"] == []
    assert proc.read(None, 1 << 20)["offset"] == 15  # from now on
    assert proc.read(12, 2)["next"] == 14  # at most max_bytes


def test_the_output_buffer_bounds_its_chunk_count() -> None:
    proc = buffer(1 << 30)
    for i in range(procman.MAX_CHUNKS * 2):
        proc.add("stdout" if i % 2 else "stderr", b"x")
    assert len(proc.chunks) <= procman.MAX_CHUNKS
    assert proc.read(0, 1 << 20)["dropped"] == procman.MAX_CHUNKS


def test_small_writes_share_a_chunk() -> None:
    proc = buffer(1 << 20)
    for _ in range(1000):
        proc.add("stdout", b"y")
    assert len(proc.chunks) == 1


def test_a_kernel_without_subreapers_is_no_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """gVisor answers PR_SET_CHILD_SUBREAPER with EINVAL: the manager runs without; any other
    failure still ends it."""

    def failing(code: int) -> Callable[..., int]:
        def prctl(*args: int) -> int:
            raise OSError(code, "prctl")

        return prctl

    monkeypatch.setattr(procman.libc, "prctl", lambda *args: 0)
    assert procman._become_subreaper() is True
    monkeypatch.setattr(procman.libc, "prctl", failing(EINVAL))
    assert procman._become_subreaper() is False
    monkeypatch.setattr(procman.libc, "prctl", failing(EPERM))
    with pytest.raises(OSError):
        procman._become_subreaper()


def test_spared_is_the_tree_of_its_root() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        mine = Spared(frozenset({12345678}), os.getpid())
        assert child.pid in mine and os.getpid() in mine and 12345678 in mine
        assert os.getppid() not in mine
        assert "x" not in mine
        assert child.pid not in Spared(frozenset(), None)
    finally:
        child.kill()
        child.wait()


class Records:
    """The Manager's side of ProcessRecords: what it finished and failed."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, Any]] = []
        self.failed: list[tuple[str, BaseException]] = []

    def finish(self, run_id: str, kind: str, ex: Any, files: Any = None) -> None:
        self.finished.append((run_id, ex))

    def fail(self, run_id: str, kind: str, exc: BaseException) -> None:
        self.failed.append((run_id, exc))


class LiveBox(Box):
    id = "sbx"
    alive = True

    class _jailed:
        ended_because = "it was killed"


def manager_script(sock: socket.socket, req: dict[str, Any]) -> None:
    if req["op"] == "proc_list":
        reply = {"processes": [{"pid": 5, "running": True}, {"pid": 6, "running": False}]}
    elif req["pid"] == 6:
        reply = {**GOOD, "chunks": [chunk(b"out"), chunk(b"err", "stderr")], "next": 6}
        reply |= {"running": False, "exit_code": None, "signal": 9}
    else:
        sock.sendall(encode({"ev": "failed", "id": req["id"], "error": "ProcessLookupError"}))
        return
    sock.sendall(encode({"ev": "done", "id": req["id"], **reply}))


def test_process_records_finish_what_ended_and_kill_what_died_with_its_sandbox(
    peers: list[Peer],
) -> None:
    from codecage._service.processes import ProcessRecords, Watched

    box = LiveBox(peer(peers, manager_script).manager)
    manager = Records()
    records = ProcessRecords(manager)  # type: ignore[arg-type]
    for run_id, pid in (("running", 5), ("ended", 6), ("lost", 7)):
        records._watched[(box.id, pid)] = Watched(run_id, box, pid, 0.0)  # type: ignore[arg-type]
    records.sweep()
    ended = dict(manager.finished)["ended"]
    assert ended.exit_code == 137 and ended.killed_by == "signal"
    assert ended.logs.stdout == ["out"] and ended.logs.stderr == ["err"]
    assert [r for r, _ in manager.failed] == ["lost"]  # its process manager lost it
    box.alive = False
    records.sweep()
    killed = dict(manager.finished)["running"]
    assert killed.killed_by == "signal" and killed.error.name == "SandboxEnded"
    assert records._watched == {}
