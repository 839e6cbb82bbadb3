"""Policy: the one schema for limits, network, files and isolation.

Used unchanged by the Python API, TOML config files, `--set key=value` overrides and the
audit record. Units live in the names; `None` means "no limit" where that is allowed.
"""

from __future__ import annotations

import json
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._errors import PolicyError

Isolation = Literal["namespace", "bwrap", "gvisor", "container", "vm"]
Severity = Literal["low", "medium", "high"]
SEVERITIES: tuple[Severity, ...] = ("low", "medium", "high")
_PACKAGE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class Policy(BaseModel):
    """What a sandbox may use. Defaults are safe; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    network: Literal["none"] = "none"
    memory_mb: int | None = Field(512, ge=16)
    cpu_cores: float | None = Field(1.0, gt=0, le=1024)
    cpu_s: float | None = Field(600.0, gt=0)
    pids_max: int | None = Field(64, ge=4)
    disk_mb: int = Field(256, ge=1, le=1 << 20)
    tmp_mb: int = Field(64, ge=1, le=1 << 20)
    shm_mb: int = Field(64, ge=1, le=1 << 20)
    # Disk I/O caps on the sandbox's volumes (docs/volumes.md), each per volume device.
    volume_read_bytes_per_s: int | None = Field(None, ge=4096)
    volume_write_bytes_per_s: int | None = Field(None, ge=4096)
    volume_read_iops: int | None = Field(None, ge=1)
    volume_write_iops: int | None = Field(None, ge=1)
    timeout_s: float | None = Field(30.0, gt=0)
    idle_timeout_s: float | None = Field(600.0, gt=0)
    paused_timeout_s: float | None = Field(86400.0, gt=0)
    interrupt_grace_s: float = Field(2.0, ge=0, le=600)
    output_bytes: int = Field(1 << 20, ge=0, le=1 << 30)
    results_bytes: int = Field(16 << 20, ge=0, le=1 << 30)
    open_files_max: int = Field(1024, ge=16, le=1 << 20)
    env_allowlist: tuple[str, ...] = ()
    isolation: Isolation = "namespace"
    # A built template's name (or id) the sandbox starts from (docs/templates.md); None:
    # the node's runtime alone.
    template: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    allow_weaker: bool = False
    # Guards: layers on top of the jail, never instead of it (docs/policy.md).
    modules_allow: tuple[str, ...] | None = None
    modules_deny: tuple[str, ...] = ()
    analysis_block_at: Severity | None = None
    approval_findings_at: Severity | None = None
    approval_commands: bool = False
    approval_download_mb: float | None = Field(None, ge=0)
    approval_limits_above_default: bool = False
    approval_window_s: float = Field(300.0, gt=0, le=86400)
    # Packages a `pip install` may take from the operator's wheelhouse (docs/packages.md).
    packages_allow: tuple[str, ...] | None = None
    approval_packages: bool = False

    @field_validator("modules_allow", "modules_deny")
    @classmethod
    def _module_names(cls, names: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for name in names or ():
            if not _MODULE.fullmatch(name):
                raise ValueError(f"{name!r} is not a module name")
        return names

    @field_validator("packages_allow")
    @classmethod
    def _package_names(cls, names: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for name in names or ():
            if not _PACKAGE.fullmatch(name):
                raise ValueError(f"{name!r} is not a package name")
        return names

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise PolicyError(_describe(exc)) from None

    @classmethod
    def from_toml(cls, path: str | Path) -> Policy:
        """Load a policy from a TOML file (top-level keys, or a `[policy]` table)."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"cannot read policy file {path}: {exc}") from None
        return cls(**data.get("policy", data))

    def with_overrides(self, assignments: list[str]) -> Policy:
        """Apply `key=value` strings (the CLI's --set) on top of this policy."""
        data = self.model_dump()
        for item in assignments:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep:
                raise PolicyError(f"--set expects key=value, got {item!r}")
            if key not in type(self).model_fields:
                raise PolicyError(
                    f"unknown policy field {key!r} (known: {', '.join(type(self).model_fields)})"
                )
            data[key] = _parse_value(key, raw.strip())
        return type(self)(**data)


def effective_timeout(policy: Policy, timeout: float | None) -> float | None:
    """A run's time limit: a per-run `timeout` can only lower the policy's `timeout_s`."""
    limit = policy.timeout_s
    if timeout is not None:
        limit = timeout if limit is None else min(limit, timeout)
    return limit


def _parse_value(key: str, raw: str) -> Any:
    annotation = Policy.model_fields[key].annotation
    nullable = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(annotation)
    if raw.lower() in ("none", "null", "unlimited") and nullable:
        return None
    if tuple in (typing.get_origin(a) for a in (annotation, *typing.get_args(annotation))):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "policy"
        if error["type"] == "extra_forbidden":
            parts.append(f"unknown policy field {field!r}")
        else:
            parts.append(f"policy field {field!r}: {error['msg']} (got {error.get('input')!r})")
    return "; ".join(parts)
