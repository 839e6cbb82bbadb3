"""The host's part of carrying a sandbox's state (docs/fork.md): the chunks of a pack that
one sandbox's kernel makes (`packed`), and their unpacking into another sandbox (`unpack`).
The host never reads what it carries; it checks each chunk's encoding and bounds the whole
(the packing sandbox's memory and disk, and FORK_S). A fork carries a pack from sandbox to
sandbox; a snapshot (the service's) keeps one in a file, and unpacks it into new sandboxes.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ._errors import SandboxError, TransportError
from ._policy import Policy

if TYPE_CHECKING:
    from ._jail import Jailed

CHUNK = 4 << 20  # what one request carries, at most (the kernel's files.CHUNK)
FORK_S = 600.0  # a whole pack or unpack at most
STEP_S = 60.0  # one chunk's


def bound(policy: Policy) -> int:
    """The bytes a pack of a sandbox of `policy` may come to."""
    return ((policy.memory_mb or 4096) + policy.disk_mb) << 20


def packed(
    jailed: Jailed, policy: Policy, memory: bool = True, plain: bool = False
) -> Iterator[bytes]:
    """The sandbox's pack, chunk by chunk (the first request is sent at the first next():
    what cannot be carried raises there). `plain`: a tar of the workspace's files only."""
    deadline = time.monotonic() + FORK_S
    limit, carried = bound(policy), 0
    cursor: str | None = None
    while True:
        args = {"cursor": cursor, "size": CHUNK, "memory": memory, "plain": plain}
        reply = jailed.request({"op": "pack", "args": args}, STEP_S)
        if reply.get("ev") == "failed":
            raise SandboxError(f"its state cannot be carried: {str(reply.get('message'))[:2000]}")
        try:
            data = base64.b64decode(str(reply["data"]), validate=True)
            cursor, eof = str(reply["cursor"])[:64], reply["eof"] is True
        except (KeyError, TypeError, ValueError):
            raise TransportError("a malformed pack from the sandbox") from None
        del reply
        carried += len(data)
        if len(data) > CHUNK or carried > limit or time.monotonic() > deadline:
            raise TransportError(
                f"the sandbox's pack passed its bound ({limit >> 20} MiB, or {FORK_S:g} s)"
            )
        yield data
        if eof:
            return


def unpack(jailed: Jailed, chunks: Iterable[bytes], plain: bool = False) -> int:
    """Send a pack's chunks to the sandbox's kernel, which unpacks them in its jail (`plain`:
    a tar of files for its workspace, no state). Returns the files it unpacked."""
    pending: bytes | None = None
    for chunk in chunks:
        if len(chunk) > CHUNK:
            raise TransportError(f"a chunk of a pack is more than {CHUNK} bytes")
        if pending is not None:
            _send(jailed, pending, False, plain)
        pending = chunk
    files = _send(jailed, pending or b"", True, plain).get("files")
    return files if isinstance(files, int) and not isinstance(files, bool) else 0


def _send(jailed: Jailed, data: bytes, last: bool, plain: bool) -> dict[str, object]:
    args = {"data": base64.b64encode(data).decode(), "last": last, "plain": plain}
    done = jailed.request({"op": "unpack", "args": args}, STEP_S)
    if done.get("ev") == "failed":
        raise SandboxError(f"the sandbox could not unpack: {str(done.get('message'))[:2000]}")
    return done
