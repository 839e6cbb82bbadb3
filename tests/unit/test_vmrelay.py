"""The full-VM relay (`_inside/vmrelay.py`): many streams over one port, each side a real
Mux in a thread, the port a socket pair, the host's listeners real Unix sockets. And what the
host does with a hostile guest's frames: each broken rule ends the relay, nothing grows
without a bound."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from codecage._inside import vmrelay
from codecage._inside.vmrelay import CLOSE, DATA, HEADER, MORE, OPEN, Mux, RelayError


def _kind(name: str) -> int:
    """As the OCI listeners: the supervisor channel keeps message boundaries."""
    return socket.SOCK_SEQPACKET if name == "supervisor.sock" else socket.SOCK_STREAM


class Pair:
    """A guest Mux with listeners `names` and a host Mux connecting to host listeners of
    the names in `served`, relaying over a socket pair."""

    def __init__(self, tmp: Path, names: tuple[str, ...], served: tuple[str, ...]) -> None:
        self.guest_port, self.host_port = socket.socketpair()
        self.guest_listeners = {}
        for name in names:
            listener = socket.socket(socket.AF_UNIX, _kind(name))
            listener.bind(str(tmp / f"guest-{name}"))
            listener.listen(8)
            listener.setblocking(False)
            self.guest_listeners[name] = listener
        self.host_listeners = {}
        for name in served:
            listener = socket.socket(socket.AF_UNIX, _kind(name))
            listener.bind(str(tmp / f"host-{name}"))
            listener.listen(8)
            self.host_listeners[name] = listener
        self.tmp = tmp

        def connect(name: str) -> socket.socket | None:
            if name not in self.host_listeners:
                return None
            sock = socket.socket(socket.AF_UNIX, _kind(name))
            sock.connect(str(tmp / f"host-{name}"))
            return sock

        self.guest = Mux(self.guest_port.fileno(), listeners=self.guest_listeners)
        self.host = Mux(self.host_port.fileno(), connect=connect)
        self.stopping = False
        self.threads = [
            threading.Thread(target=m.run, args=(lambda: self.stopping,), daemon=True)
            for m in (self.guest, self.host)
        ]
        for t in self.threads:
            t.start()

    def dial(self, name: str) -> socket.socket:
        """What code inside the guest does: connect to a guest listener."""
        sock = socket.socket(socket.AF_UNIX, _kind(name))
        sock.connect(str(self.tmp / f"guest-{name}"))
        sock.settimeout(10)
        return sock

    def accept(self, name: str) -> socket.socket:
        self.host_listeners[name].settimeout(10)
        sock, _ = self.host_listeners[name].accept()
        sock.settimeout(10)
        return sock

    def close(self) -> None:
        self.stopping = True
        for t in self.threads:
            t.join(5)
        for s in (self.guest_port, self.host_port, *self.guest_listeners.values(),
                  *self.host_listeners.values()):  # fmt: skip
            s.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path, ("supervisor.sock", "kernel.sock", "other.sock"),
             ("supervisor.sock", "kernel.sock"))  # fmt: skip
    yield p
    p.close()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        assert chunk, "the stream ended early"
        out += chunk
    return bytes(out)


def test_streams_carry_bytes_both_ways_each_on_its_own(pair: Pair) -> None:
    a = pair.dial("other.sock")
    a.close()  # refused (below): the next two are on their own
    a = pair.dial("kernel.sock")
    host_a = pair.accept("kernel.sock")
    b = pair.dial("kernel.sock")
    host_b = pair.accept("kernel.sock")
    a.sendall(b"to the host on a")
    b.sendall(b"to the host on b")
    assert _recv_exactly(host_a, 16) == b"to the host on a"
    assert _recv_exactly(host_b, 16) == b"to the host on b"
    host_b.sendall(b"back on b")
    assert _recv_exactly(b, 9) == b"back on b"
    for s in (a, b, host_a, host_b):
        s.close()


def test_a_large_transfer_arrives_whole_and_in_order(pair: Pair) -> None:
    payload = os.urandom(5 << 20)  # many chunks, past the per-stream bound
    guest = pair.dial("kernel.sock")
    host = pair.accept("kernel.sock")
    sender = threading.Thread(target=guest.sendall, args=(payload,))
    sender.start()
    got = _recv_exactly(host, len(payload))
    sender.join()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    guest.close()
    host.close()


def test_an_end_on_either_side_ends_the_other(pair: Pair) -> None:
    guest = pair.dial("kernel.sock")
    host = pair.accept("kernel.sock")
    guest.sendall(b"last words")
    guest.close()
    assert _recv_exactly(host, 10) == b"last words"
    assert host.recv(1) == b""  # then end of file
    host.close()
    other = pair.dial("kernel.sock")
    other_host = pair.accept("kernel.sock")
    other_host.close()
    assert other.recv(1) == b""
    other.close()


def test_a_packet_stream_keeps_its_message_boundaries(pair: Pair) -> None:
    """The supervisor channel: one JSON object per message, a spec of up to 1 MiB."""
    guest = pair.dial("supervisor.sock")
    host = pair.accept("supervisor.sock")
    sizes = [1, 7, vmrelay.MAX_CHUNK - 1, vmrelay.MAX_CHUNK, vmrelay.MAX_CHUNK + 1, 150_000]
    messages = [os.urandom(n) for n in sizes]
    for m in messages:
        guest.send(m)
    assert [host.recv(vmrelay.MAX_MESSAGE) for _ in messages] == messages  # each whole
    spec = os.urandom(150_000)  # host to guest, as a spec goes (a datagram of this host)
    host.send(spec)
    assert guest.recv(vmrelay.MAX_MESSAGE + 1) == spec
    guest.close()
    host.close()


def test_a_name_the_host_does_not_serve_is_refused(pair: Pair) -> None:
    refused = pair.dial("other.sock")
    assert refused.recv(1) == b""  # closed: nothing on the host was reached
    refused.close()
    served = pair.dial("kernel.sock")  # positive control: a served name connects
    host = pair.accept("kernel.sock")
    served.sendall(b"x")
    assert host.recv(1) == b"x"
    served.close()
    host.close()


# -- a hostile guest: frames written straight to the host's port --------------------------


class Host:
    """A host Mux whose port the test writes to by hand (`feed`); every socket it made is
    closed by `close`."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.sockets: list[socket.socket] = list(socket.socketpair())
        self.mux = Mux(self.sockets[0].fileno(), connect=self.connect)

    def connect(self, name: str) -> socket.socket | None:
        self.asked.append(name)
        a, b = socket.socketpair(socket.AF_UNIX, _kind(name))
        self.sockets += [a, b]
        return a

    def close(self) -> None:
        self.mux.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def hostile() -> Iterator[Host]:
    host = Host()
    yield host
    host.close()


def frame(sid: int, kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(sid, kind, len(payload)) + payload


# well-formed: stream 1 opened, closed, opened again (to another name), then stream 2
REOPENED = [
    frame(1, OPEN, b"kernel.sock"),
    frame(1, CLOSE),
    frame(1, OPEN, b"k"),
    frame(1, CLOSE),
    frame(2, OPEN, b"kernel.sock"),
]


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        ([HEADER.pack(1, DATA, vmrelay.MAX_CHUNK + 1)], "a frame of"),
        ([frame(1, 9)], "unknown kind"),
        ([frame(0, OPEN, b"kernel.sock")], "bad open"),
        ([frame(1, OPEN, b"kernel.sock"), frame(1, OPEN, b"kernel.sock")], "bad open"),
        ([frame(1, OPEN, b"x" * (vmrelay.MAX_NAME + 1))], "bad open"),
        ([frame(1, OPEN, "k\u00e9".encode())], "not ASCII"),
        ([frame(1, OPEN, b"kernel.sock"), frame(1, MORE, b"x")], "fragment on a byte stream"),
        (
            [frame(1, OPEN, b"supervisor.sock")]
            + [frame(1, MORE, b"x" * vmrelay.MAX_CHUNK)]
            * (vmrelay.MAX_MESSAGE // vmrelay.MAX_CHUNK)
            + [frame(1, DATA, b"x")],
            "more than",
        ),
        ([frame(i, OPEN, b"kernel.sock") for i in range(1, vmrelay.MAX_STREAMS + 2)], "more than"),
        (REOPENED, None),
    ],
)
def test_a_broken_rule_from_the_guest_ends_the_relay(
    hostile: Host, frames: list[bytes], why: str | None
) -> None:
    if why is None:  # positive control: well-formed frames are taken
        hostile.mux.feed(b"".join(frames))  # an id may be opened again once closed
        assert set(hostile.mux.streams) == {2}
        assert hostile.asked == ["kernel.sock", "k", "kernel.sock"]
        return
    with pytest.raises(RelayError, match=why):
        hostile.mux.feed(b"".join(frames))


def test_data_for_no_stream_is_dropped_and_a_guest_cannot_open_on_the_guest(
    hostile: Host,
) -> None:
    hostile.mux.feed(frame(7, DATA, b"x" * 1000) * 100)  # no such stream: nothing kept
    assert hostile.mux.streams == {} and hostile.asked == []
    hostile.mux.feed(frame(3, OPEN, b"kernel.sock") + frame(3, DATA, b"hello"))
    assert hostile.asked == ["kernel.sock"] and bytes(hostile.mux.streams[3].out) == b"hello"
    guest = Mux(hostile.sockets[1].fileno(), listeners={})
    with pytest.raises(RelayError, match="only the guest opens"):
        guest.feed(frame(1, OPEN, b"kernel.sock"))


def test_a_split_frame_waits_for_its_rest(hostile: Host) -> None:
    whole = frame(5, OPEN, b"kernel.sock")
    hostile.mux.feed(whole[:4])
    hostile.mux.feed(whole[4:10])
    assert hostile.asked == []
    hostile.mux.feed(whole[10:])
    assert hostile.asked == ["kernel.sock"]


def test_what_waits_for_a_stream_that_does_not_read_is_bounded(hostile: Host) -> None:
    """A guest sending faster than the host's listener reads: past MAX_PENDING waiting, the
    host stops reading the port (the guest is held, nothing is dropped)."""
    guest_end = hostile.sockets[1]
    guest_end.setblocking(False)
    guest_end.sendall(frame(1, OPEN, b"kernel.sock"))
    hostile.mux.step(1.0)
    assert 1 in hostile.mux.streams
    peer = hostile.sockets[-1]  # the host listener's end: never read
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = frame(1, DATA, b"x" * vmrelay.MAX_CHUNK)
    sent = held = 0
    for _ in range(400):
        try:
            sent += guest_end.send(chunk)
            held = 0
        except BlockingIOError:
            held += 1
        hostile.mux.step(0.001)
        waiting = len(hostile.mux.streams[1].out)
        assert waiting <= vmrelay.MAX_PENDING + vmrelay.MAX_CHUNK + HEADER.size
    assert sent > vmrelay.MAX_PENDING  # the bound was reached: more was sent than it holds
    assert held > 100  # and the guest is held: its sends no longer go through


def test_a_once_listener_takes_one_connection_and_closes(tmp_path: Path) -> None:
    """The supervisor channel's guest listener: init's connection, then nobody's."""
    port, _other = socket.socketpair()
    names = {}
    for name in ("supervisor.sock", "kernel.sock"):
        listener = socket.socket(socket.AF_UNIX, _kind(name))
        listener.bind(str(tmp_path / name))
        listener.listen(8)
        listener.setblocking(False)
        names[name] = listener
    mux = Mux(port.fileno(), listeners=names, once=("supervisor.sock",))
    try:
        first = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        first.connect(str(tmp_path / "supervisor.sock"))
        mux.step(1.0)
        assert "supervisor.sock" not in mux.listeners and len(mux.streams) == 1
        late = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with pytest.raises(ConnectionRefusedError):  # its listener is closed
            late.connect(str(tmp_path / "supervisor.sock"))
        again = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # positive control
        again.connect(str(tmp_path / "kernel.sock"))
        mux.step(1.0)
        mux.step(0.1)
        assert "kernel.sock" in mux.listeners and len(mux.streams) == 2
        for s in (first, late, again):
            s.close()
    finally:
        mux.close()
        port.close()
        _other.close()
        for listener in names.values():
            listener.close()


def test_a_step_also_waits_on_the_callers_descriptors() -> None:
    port, _other = socket.socketpair()
    mine, theirs = socket.socketpair()
    mux = Mux(port.fileno(), listeners={})
    try:
        assert mux.step(0.05, extra=(mine.fileno(),)) == []  # nothing ready: nothing returned
        theirs.sendall(b"x")
        assert mux.step(1.0, extra=(mine.fileno(),)) == [mine.fileno()]
        assert mine.recv(1) == b"x"  # the relay left the caller's bytes alone
    finally:
        mux.close()
        for s in (port, _other, mine, theirs):
            s.close()
