"""The host's end of the supervisor channel and the process manager's hand-over
(`start_procman`, docs/protocol.md): init's messages are the sandbox's word, so a process
manager's channel is taken only when the host asked for one, and an exit report read while
the host waits for one is kept for the run that waits for it. A real socket pair stands for
init's end."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from codecage import Policy
from codecage._errors import TransportError
from codecage._jail.channel import Channel


class Owner:
    id = "sbx"
    ended_because = "it was killed"
    dying = False

    def __init__(self) -> None:
        self.handed: list[socket.socket] = []
        self.ended: list[str] = []

    def terminate(self, reason: str, limit: object = None) -> None:
        self.ended.append(reason)

    def new_procman(self, sock: socket.socket) -> None:
        self.handed.append(sock)


class Hooks:
    def handover(self, message: object, fds: list[int]) -> list[int]:
        return fds

    def init_hung_up(self) -> bool:
        return False


@pytest.fixture
def wired() -> Iterator[tuple[Channel, Owner, socket.socket]]:
    host, init = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host.setblocking(False)
    owner = Owner()
    channel = Channel(owner, Policy(), Hooks())
    channel.attach(host, None)
    yield channel, owner, init
    for sock in owner.handed:
        sock.close()
    host.close()
    init.close()


def _announce(init: socket.socket) -> socket.socket:
    """What init sends: the procman event with the host's end of a fresh socket pair."""
    mine, theirs = socket.socketpair()
    socket.send_fds(init, [json.dumps({"ev": "procman"}).encode()], [theirs.fileno()])
    theirs.close()
    return mine


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_process_manager_nobody_asked_for_is_never_taken(
    wired: tuple[Channel, Owner, socket.socket],
) -> None:
    channel, owner, init = wired
    before = _open_fds()
    kept = _announce(init)
    assert channel.exit_event() is None  # read, and dropped
    assert owner.handed == [] and _open_fds() == before + 1  # its descriptor closed: ours only
    kept.close()
    # positive control: once asked, the one init hands over is taken
    channel.ask_procman()
    assert json.loads(init.recv(4096)) == {"op": "start_procman"}
    peer = _announce(init)
    channel.await_procman(lambda: bool(owner.handed), time.monotonic() + 5)
    assert len(owner.handed) == 1
    owner.handed[0].sendall(b"x")
    assert peer.recv(1) == b"x"  # the very socket init handed over
    peer.close()
    # and only that one: a second, unasked, is dropped again
    _announce(init).close()
    assert channel.exit_event() is None and len(owner.handed) == 1


def test_an_exit_read_while_waiting_for_the_manager_is_kept_for_the_run(
    wired: tuple[Channel, Owner, socket.socket],
) -> None:
    channel, owner, init = wired
    channel.ask_procman()
    init.recv(4096)
    exit_report = {"ev": "exit", "generation": 0, "signal": 9, "code": None}
    init.send(json.dumps(exit_report).encode())  # the kernel died meanwhile
    threading.Timer(0.1, lambda: _announce(init).close()).start()
    channel.await_procman(lambda: bool(owner.handed), time.monotonic() + 5)
    assert channel.exit_event() == exit_report  # not lost to the waiter
    assert channel.exit_event() is None


def test_no_manager_in_time_is_a_transport_error(
    wired: tuple[Channel, Owner, socket.socket],
) -> None:
    channel, owner, _init = wired
    channel.ask_procman()
    with pytest.raises(TransportError, match="did not start its process manager"):
        channel.await_procman(lambda: bool(owner.handed), time.monotonic() + 0.2)
