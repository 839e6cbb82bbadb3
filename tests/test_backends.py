"""Backends by name, each declaring what it enforces: a policy asking for more is refused
with a PolicyError naming the field and the backend, never run silently weaker."""

from __future__ import annotations

import pytest

from codecage import BackendUnavailable, Policy, PolicyError
from codecage._jail import BACKENDS, Backend, available_backends, features, get_jail, register


def test_unknown_backend_names_the_known_ones() -> None:
    with pytest.raises(BackendUnavailable, match=r"'nope'.*known: namespace, bwrap"):
        get_jail("nope")


def test_backend_missing_its_host_requirement_says_what_to_install() -> None:
    def load() -> object:
        raise AssertionError("a backend whose probe fails is never loaded")

    register(Backend("probe-test", "a backend this host lacks", load, lambda: "apt-get install x"))  # type: ignore[arg-type]
    try:
        assert available_backends()["probe-test"] == "apt-get install x"
        with pytest.raises(BackendUnavailable, match="cannot run on this host: apt-get install x"):
            get_jail("probe-test")
    finally:
        del BACKENDS["probe-test"]


def test_a_feature_the_backend_lacks_is_refused_by_field_and_backend() -> None:
    lacking = features.ALL - {"memory", "landlock"}
    with pytest.raises(PolicyError) as info:
        features.check("bwrap", lacking, Policy(isolation="bwrap"), {"landlock": "no LSM"})
    text = str(info.value)
    assert "policy field 'memory_mb': backend 'bwrap' cannot enforce memory" in text
    assert "policy field 'isolation': backend 'bwrap' cannot enforce landlock" in text
    assert "(no LSM)" in text and "allow_weaker" in text
    # what the policy does not ask for is not needed; allow_weaker accepts the rest
    features.check("bwrap", features.ALL - {"memory"}, Policy(isolation="bwrap", memory_mb=None))
    features.check("bwrap", lacking, Policy(isolation="bwrap", allow_weaker=True))
    features.check("bwrap", features.ALL, Policy(isolation="bwrap"))  # the control


def test_a_backend_refuses_another_backends_policy() -> None:
    with pytest.raises(PolicyError, match="this backend is 'bwrap', not 'namespace'"):
        features.check("bwrap", features.ALL, Policy())


@pytest.mark.requires_root
def test_available_backends_declare_everything_here() -> None:
    """On this host (root, cgroups, Landlock) both built-in backends enforce every feature."""
    for name in ("namespace", "bwrap"):
        if available_backends()[name] is None:
            jail = get_jail(name)
            assert jail.enforces == features.ALL, (name, features.ALL - jail.enforces)
            jail.check(Policy(isolation=name))  # type: ignore[arg-type]
