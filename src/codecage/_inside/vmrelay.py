"""Many byte streams over the full-VM guest's one virtio-serial port, in both directions.

The other backends hand the host a fresh socket per channel (the supervisor, each kernel
generation, the process manager); a guest has one port. The relay carries each of those
connections as a stream of its own over it, so the host keeps its one protocol: inside the
guest, `Mux(port, listeners=...)` accepts on guest-local listeners (by name: those an OCI
sandbox's init connects to) and opens a stream for each connection; on the host,
`Mux(port, connect=...)` connects each stream opened by the guest to the host listener of
that name, and refuses any other name.

Frames, either way: a 4-byte big-endian stream id, a 1-byte kind, a 4-byte big-endian length,
then that many bytes (at most MAX_CHUNK). Kinds: OPEN (guest to host only; the payload is
the listener's name), DATA, MORE, CLOSE (either side: that stream's end). A listener of
SOCK_SEQPACKET (the supervisor channel: one JSON object per message) keeps its message
boundaries: a message is its MORE frames, then one DATA frame ending it (at most
MAX_MESSAGE bytes in all); on a byte stream every frame is DATA. Everything the guest
sends is hostile input to the host: a frame that breaks these rules ends the relay
(`violation`), and nothing is kept without a bound (MAX_STREAMS streams, MAX_PENDING bytes
waiting per stream: past it the port is not read until the stream's socket drains).
Standard library only, like everything in _inside/: the guest runs it too.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

HEADER = struct.Struct(">IBI")
OPEN, DATA, CLOSE, MORE = 1, 2, 3, 4
MAX_CHUNK = 64 << 10
MAX_MESSAGE = 1 << 20  # a packet stream's message (a sandbox's spec is at most 1 MiB)
MAX_STREAMS = 64
MAX_PENDING = 1 << 20
MAX_NAME = 64


class RelayError(Exception):
    """The other side broke the framing: the relay ends."""


@dataclass
class _Stream:
    sock: socket.socket
    out: bytearray = field(default_factory=bytearray)  # from the port, for a byte stream
    closing: bool = False  # the other side closed: the socket ends once all is written
    packet: bool = False  # SOCK_SEQPACKET: messages, not bytes
    partial: bytearray = field(default_factory=bytearray)  # a message's MORE frames so far
    messages: deque[bytes] = field(default_factory=deque)  # whole ones, for the socket

    @property
    def waiting(self) -> int:
        return len(self.out) + sum(map(len, self.messages)) + len(self.partial)

    def take(self, kind: int, payload: bytes) -> None:
        if not self.packet:
            if kind == MORE:
                raise RelayError("a message fragment on a byte stream")
            self.out += payload
            return
        if len(self.partial) + len(payload) > MAX_MESSAGE:
            raise RelayError(f"a message of more than {MAX_MESSAGE} bytes")
        self.partial += payload
        if kind == DATA:
            self.messages.append(bytes(self.partial))
            self.partial.clear()

    def flush(self) -> None:
        """Write what waits for the socket, as far as it takes it now (OSError: gone)."""
        try:
            while self.messages:
                self.sock.send(self.messages[0])
                self.messages.popleft()
            if self.out:
                del self.out[: self.sock.send(self.out)]
        except BlockingIOError:
            pass


class Mux:
    """One side of the relay over `port` (a descriptor: the virtio-serial port, or a socket
    standing for it). `listeners`: the guest's, by name; `once`: the names among them that
    accept one connection, their listener closed after it (the supervisor channel's);
    `connect`: the host's, name -> a connected socket (None: the name is refused)."""

    def __init__(
        self,
        port: int,
        *,
        listeners: Mapping[str, socket.socket] | None = None,
        once: Collection[str] = (),
        connect: Callable[[str], socket.socket | None] | None = None,
    ) -> None:
        if (listeners is None) == (connect is None):
            raise ValueError("a relay side has listeners (the guest) or connect (the host)")
        self.port = port
        self.listeners = dict(listeners or {})
        self.once = frozenset(once)
        self.connect = connect
        self.streams: dict[int, _Stream] = {}
        self._next_id = 1
        self._inbuf = bytearray()
        self._outbuf = bytearray()  # for the port
        self.closed = False

    # -- framing --------------------------------------------------------------------------

    def _send(self, sid: int, kind: int, payload: bytes = b"") -> None:
        self._outbuf += HEADER.pack(sid, kind, len(payload)) + payload

    def feed(self, data: bytes) -> None:
        """Bytes read from the port: every whole frame in them is handled."""
        self._inbuf += data
        while len(self._inbuf) >= HEADER.size:
            sid, kind, size = HEADER.unpack_from(self._inbuf)
            if size > MAX_CHUNK:
                raise RelayError(f"a frame of {size} bytes (at most {MAX_CHUNK})")
            if len(self._inbuf) < HEADER.size + size:
                return
            payload = bytes(self._inbuf[HEADER.size : HEADER.size + size])
            del self._inbuf[: HEADER.size + size]
            self._frame(sid, kind, payload)

    def _frame(self, sid: int, kind: int, payload: bytes) -> None:
        if kind == OPEN:
            self._opened(sid, payload)
        elif kind in (DATA, MORE):
            stream = self.streams.get(sid)
            if stream is None:
                return  # a stream this side already closed: its late bytes go nowhere
            if stream.closing:
                raise RelayError(f"data on stream {sid} after its end")
            stream.take(kind, payload)
        elif kind == CLOSE:
            stream = self.streams.get(sid)
            if stream is not None:
                stream.closing = True
                if not stream.out and not stream.messages:
                    self._drop(sid, tell=False)
        else:
            raise RelayError(f"a frame of unknown kind {kind}")

    def _opened(self, sid: int, payload: bytes) -> None:
        if self.connect is None:
            raise RelayError("the host opened a stream: only the guest opens streams")
        if sid == 0 or sid in self.streams or len(payload) > MAX_NAME:
            raise RelayError(f"a bad open of stream {sid}")
        if len(self.streams) >= MAX_STREAMS:
            raise RelayError(f"more than {MAX_STREAMS} streams at once")
        try:
            name = payload.decode("ascii")
        except UnicodeDecodeError:
            raise RelayError("a stream name that is not ASCII") from None
        sock = self.connect(name)
        if sock is None:
            self._send(sid, CLOSE)  # a name the host does not serve: refused
            return
        sock.setblocking(False)
        self.streams[sid] = _Stream(sock, packet=sock.type == socket.SOCK_SEQPACKET)

    def _drop(self, sid: int, tell: bool) -> None:
        stream = self.streams.pop(sid)
        with contextlib.suppress(OSError):
            stream.sock.close()
        if tell:
            self._send(sid, CLOSE)

    # -- the loop -------------------------------------------------------------------------

    def step(self, timeout_s: float | None, extra: Iterable[int] = ()) -> list[int]:
        """One round: accept, read and write whatever is ready (RelayError: the other
        side broke the framing; EOFError: the port closed). `extra`: the caller's own
        descriptors, waited on too; those readable (or hung up) are returned."""
        poller = select.poll()
        held = any(s.waiting >= MAX_PENDING for s in self.streams.values())
        poller.register(
            self.port, (0 if held else select.POLLIN) | (select.POLLOUT if self._outbuf else 0)
        )
        for listener in self.listeners.values():
            poller.register(listener, select.POLLIN)
        by_fd: dict[int, int] = {}
        for sid, stream in self.streams.items():
            events = select.POLLOUT if stream.out or stream.messages else 0
            if not stream.closing:
                events |= select.POLLIN
            poller.register(stream.sock, events)
            by_fd[stream.sock.fileno()] = sid
        names = {listener.fileno(): name for name, listener in self.listeners.items()}
        theirs = set(extra)
        for fd in theirs:
            poller.register(fd, select.POLLIN)
        ready = []
        for fd, events in poller.poll(None if timeout_s is None else timeout_s * 1000):
            if fd in theirs:
                ready.append(fd)
            elif fd == self.port:
                self._port_ready(events)
            elif fd in names:
                self._accept(names[fd])
            elif fd in by_fd and by_fd[fd] in self.streams:
                self._stream_ready(by_fd[fd], events)
        return ready

    def _port_ready(self, events: int) -> None:
        if events & select.POLLOUT and self._outbuf:
            written = os.write(self.port, self._outbuf)
            del self._outbuf[:written]
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
            data = os.read(self.port, MAX_CHUNK + HEADER.size)
            if not data:
                raise EOFError("the relay's port closed")
            self.feed(data)

    def _accept(self, name: str) -> None:
        try:
            sock, _ = self.listeners[name].accept()
        except BlockingIOError:
            return
        if name in self.once:
            self.listeners.pop(name).close()
        if len(self.streams) >= MAX_STREAMS:
            sock.close()
            return
        sid, self._next_id = self._next_id, self._next_id + 1
        sock.setblocking(False)
        self.streams[sid] = _Stream(sock, packet=sock.type == socket.SOCK_SEQPACKET)
        self._send(sid, OPEN, name.encode("ascii"))

    def _stream_ready(self, sid: int, events: int) -> None:
        stream = self.streams[sid]
        if events & select.POLLOUT and (stream.out or stream.messages):
            try:
                stream.flush()
            except OSError:
                self._drop(sid, tell=True)
                return
            if stream.closing and not stream.out and not stream.messages:
                self._drop(sid, tell=False)
                return
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and not stream.closing:
            try:
                data = stream.sock.recv(MAX_MESSAGE + 1 if stream.packet else MAX_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # a packet stream's empty message is not sent: it reads as its end
                self._drop(sid, tell=True)
            elif len(data) > MAX_MESSAGE:
                self._drop(sid, tell=True)  # a message this relay does not carry
            elif stream.packet:
                for at in range(0, len(data), MAX_CHUNK):
                    last = at + MAX_CHUNK >= len(data)
                    self._send(sid, DATA if last else MORE, data[at : at + MAX_CHUNK])
            else:
                self._send(sid, DATA, data)

    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Until the port closes, the other side breaks the framing, or `stop()`."""
        try:
            while not stop():
                self.step(0.2)
        except EOFError:
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.closed = True
        for sid in list(self.streams):
            self._drop(sid, tell=False)
