"""Snapshots (docs/fork.md, "Snapshots"): a sandbox's pack (its interpreter state and a copy
of its workspace, as a fork carries it) kept in a file of the service, per tenant, from
which new sandboxes start. The service never reads a pack: it stores the bytes the
sandbox's kernel made and gives them back to a new sandbox of the same tenant, whose
kernel unpacks them inside its jail.

Layout: <dir>/<tenant digest>/<snapshot id>.pack and .json (its metadata), written to a
temporary name, fsynced and renamed, so a crash leaves a whole snapshot or none (a stray
temporary file is removed at start). Bounded per tenant: quotas.snapshots of them and
quotas.snapshot_mb bytes in all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._errors import QuotaExceeded
from .._volumes import fsync_dir as _fsync_dir

CHUNK = 4 << 20
_ID = re.compile(r"snap_[0-9a-f]{20}")


@dataclass
class Snapshot:
    id: str
    tenant: str
    sandbox_id: str
    names: list[str]
    created_at: float
    size: int
    sha256: str
    policy: dict[str, Any] = field(default_factory=dict)  # the snapshotted sandbox's
    memory: bool = True  # its variables too, else files, environment and cwd only


class SnapshotStore:
    def __init__(self, root: Path, max_count: int, max_mb: int) -> None:
        self.root, self.max_count, self.max_bytes = root, max_count, max_mb << 20
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stray in self.root.glob("*/.*.tmp"):  # a save a crash cut short
            stray.unlink(missing_ok=True)

    def _dir(self, tenant: str) -> Path:
        return self.root / hashlib.sha256(tenant.encode()).hexdigest()[:24]

    def save(
        self,
        tenant: str,
        sandbox_id: str,
        name: str | None,
        policy: dict[str, Any],
        memory: bool,
        chunks: Iterable[bytes],
    ) -> Snapshot:
        """Store a pack, within the tenant's quotas (QuotaExceeded, and nothing kept)."""
        where = self._dir(tenant)
        where.mkdir(exist_ok=True, mode=0o700)
        with self._lock:
            held = self.list(tenant)
            if len(held) >= self.max_count:
                raise QuotaExceeded(
                    f"tenant already has {len(held)} snapshots (quotas.snapshots): delete one"
                )
            room = self.max_bytes - sum(s.size for s in held)
        sid = f"snap_{secrets.token_hex(10)}"
        temporary = where / f".{sid}.tmp"
        digest, size = hashlib.sha256(), 0
        try:
            with open(temporary, "xb") as out:
                os.fchmod(out.fileno(), 0o600)
                for chunk in chunks:
                    size += len(chunk)
                    if size > room:
                        raise QuotaExceeded(
                            f"the snapshot passes the tenant's quotas.snapshot_mb="
                            f"{self.max_bytes >> 20} (with the snapshots it has)"
                        )
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.rename(temporary, where / f"{sid}.pack")
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        snap = Snapshot(
            sid, tenant, sandbox_id, [name] if name else [], time.time(), size,
            digest.hexdigest(), policy, memory,
        )  # fmt: skip
        meta = where / f".{sid}.json.tmp"
        meta.write_text(json.dumps(asdict(snap)))
        os.chmod(meta, 0o600)
        os.rename(meta, where / f"{sid}.json")
        _fsync_dir(where)
        return snap

    def list(self, tenant: str) -> list[Snapshot]:
        found = []
        for meta in sorted(self._dir(tenant).glob("snap_*.json")):
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                snap = Snapshot(**json.loads(meta.read_text()))
                if snap.tenant == tenant and (meta.parent / f"{snap.id}.pack").exists():
                    found.append(snap)
        return sorted(found, key=lambda s: s.created_at)

    def get(self, tenant: str, id_or_name: str) -> Snapshot | None:
        """The tenant's snapshot by id, else the newest by name."""
        held = self.list(tenant)
        by_id = [s for s in held if s.id == id_or_name]
        by_name = [s for s in held if id_or_name in s.names]
        found = by_id or by_name[-1:]
        return found[0] if found else None

    def chunks(self, snap: Snapshot) -> Iterator[bytes]:
        with open(self._dir(snap.tenant) / f"{snap.id}.pack", "rb") as pack:
            while chunk := pack.read(CHUNK):
                yield chunk

    def delete(self, tenant: str, snapshot_id: str) -> bool:
        if not _ID.fullmatch(snapshot_id):
            return False
        where = self._dir(tenant)
        with self._lock:
            meta = where / f"{snapshot_id}.json"
            if not meta.exists():
                return False
            meta.unlink()
            (where / f"{snapshot_id}.pack").unlink(missing_ok=True)
        return True
