"""The operator's wheelhouse: a directory of wheels that builds install from without the
package index (`CODECAGE_WHEELHOUSE`, default /var/lib/codecage/wheelhouse; the service's
`wheelhouse` setting)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_WHEELHOUSE = "/var/lib/codecage/wheelhouse"


def wheelhouse_dir() -> Path:
    return Path(os.environ.get("CODECAGE_WHEELHOUSE", DEFAULT_WHEELHOUSE))
