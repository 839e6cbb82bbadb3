"""Where a sandbox's pip finds and installs packages (docs/packages.md). Standard library only.

The host writes the wheels it chose into FIND_LINKS; pip, configured by the sandbox's
environment (never an index), installs them under PREFIX, in the workspace, whose site
directory is on sys.path (the kernel's and, through PYTHONPATH, every process's). The
shared runtime is read-only and stays as it is.
"""

from __future__ import annotations

import importlib
import sys

FIND_LINKS = "/tmp/.codecage-wheels"
PREFIX = "/home/user/.local"


def site_dir(version: str) -> str:
    """The site directory of PREFIX for a Python "X.Y"."""
    return f"{PREFIX}/lib/python{version}/site-packages"


SITE = site_dir(f"{sys.version_info.major}.{sys.version_info.minor}")


def on_path() -> None:
    """Put SITE on the kernel's sys.path (it runs with -I: PYTHONPATH is not read), before
    the runtime's site-packages, where PYTHONPATH would put it."""
    if SITE in sys.path:
        return
    at = next((i for i, p in enumerate(sys.path) if p.endswith("site-packages")), len(sys.path))
    sys.path.insert(at, SITE)


def refresh() -> None:
    """Before a cell: if SITE was looked at before it existed (an import caches "no finder"),
    forget that, so what pip installed since imports."""
    if sys.path_importer_cache.get(SITE, False) is None:
        importlib.invalidate_caches()
