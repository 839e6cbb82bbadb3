from __future__ import annotations

from pathlib import Path

import pytest

from codecage import Policy, PolicyError, SandboxError


def test_defaults_are_safe() -> None:
    p = Policy()
    assert p.network == "none"
    assert (p.memory_mb, p.pids_max, p.disk_mb, p.tmp_mb, p.shm_mb) == (512, 64, 256, 64, 64)
    assert (p.timeout_s, p.idle_timeout_s, p.cpu_s, p.output_bytes) == (30, 600, 600, 1 << 20)
    assert p.env_allowlist == () and p.isolation == "namespace" and p.allow_weaker is False


def test_unknown_key_is_refused_by_name() -> None:
    with pytest.raises(PolicyError, match="unknown policy field 'memory'"):
        Policy(memory=5)


@pytest.mark.parametrize("field", ["memory_mb", "pids_max", "disk_mb", "timeout_s", "output_bytes"])
def test_negative_limit_names_the_field(field: str) -> None:
    with pytest.raises(PolicyError, match=field) as info:
        Policy(**{field: -1})
    assert isinstance(info.value, SandboxError) and isinstance(info.value, ValueError)


def test_none_means_no_limit_only_where_allowed() -> None:
    assert Policy(memory_mb=None).memory_mb is None
    with pytest.raises(PolicyError, match="disk_mb"):
        Policy(disk_mb=None)


def test_network_other_than_none_is_refused() -> None:
    with pytest.raises(PolicyError, match="network"):
        Policy(network="host")


def test_toml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[policy]\nmemory_mb = 256\nenv_allowlist = ["LANG"]\n')
    p = Policy.from_toml(path)
    assert p.memory_mb == 256 and p.env_allowlist == ("LANG",)
    q = p.with_overrides(
        ["timeout_s=5", "memory_mb=none", "env_allowlist=A,B", "allow_weaker=true"]
    )
    assert (q.timeout_s, q.memory_mb, q.env_allowlist, q.allow_weaker) == (
        5,
        None,
        ("A", "B"),
        True,
    )
    with pytest.raises(PolicyError, match="unknown policy field 'nope'"):
        p.with_overrides(["nope=1"])
    with pytest.raises(PolicyError, match="key=value"):
        p.with_overrides(["timeout_s"])
    with pytest.raises(PolicyError, match="timeout_s"):
        p.with_overrides(["timeout_s=soon"])


def test_bad_toml_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("memory_mb = = 3")
    with pytest.raises(PolicyError, match="cannot read policy file"):
        Policy.from_toml(path)
