"""envd's `filesystem.Filesystem` Connect service (port 49983)."""

from __future__ import annotations

from .connect import Service

service = Service("filesystem.Filesystem")
router = service.router()
