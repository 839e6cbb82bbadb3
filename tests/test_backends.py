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


@pytest.mark.requires_root
def test_the_kit_weakens_a_policy_only_where_its_backend_declares_a_lack() -> None:
    """codecage.testing: `policy()` adds allow_weaker=True for a backend that declares it
    cannot enforce what the policy needs (gvisor), never for one that enforces it all;
    `requires_feature` skips say which backend lacks which feature, and why."""
    from codecage.testing import enforces, policy, unmet, use_backend

    with use_backend("namespace"):
        assert policy().allow_weaker is False and unmet("own_uid", "landlock") is None
    with pytest.raises(ValueError, match="unknown feature 'own_uids'"):
        enforces("own_uids", "namespace")
    if available_backends()["gvisor"] is not None:
        pytest.skip(f"gvisor: {available_backends()['gvisor']}")
    with use_backend("gvisor"):
        assert policy().allow_weaker is True and policy(allow_weaker=False).allow_weaker is False
        assert not enforces("own_uid") and not enforces("landlock") and enforces("seccomp")
        why = unmet("seccomp", "own_uid")
        assert why is not None and why.startswith("backend 'gvisor' does not enforce 'own_uid': ")
        assert "uid 1000" in why  # the backend's own explanation (gvisor.LACKING)
