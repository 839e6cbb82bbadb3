"""Which `pip install` the host sees in a cell or a command (docs/packages.md), and the
service's guards on the packages policy. No jail: the jail's side is tests/test_packages.py."""

from __future__ import annotations

import pytest

from codecage import PackageRefused, Policy, PolicyError
from codecage._service.config import within
from codecage._wheelhouse import canonical, requested


@pytest.mark.parametrize(
    ("text", "shell", "found"),
    [
        ("!pip install pillow numpy", False, ["pillow", "numpy"]),
        ("x = 1\n  %pip install -q 'polars==1.9.0'\nimport polars", False, ["polars==1.9.0"]),
        ("pip install requests[socks]>=2", False, ["requests[socks]>=2"]),
        ("!{sys.executable} -m pip install --upgrade duckdb", False, ["duckdb"]),
        ("!python3 -m pip --quiet install -r req.txt tqdm", False, ["tqdm"]),
        ("!pip install -i http://x/simple -f /tmp/w ./local.whl a.whl $PKG", False, []),
        ("print('!pip install nope')\npip_install = 3", False, []),
        ("!pip list && pip install a; ls | pip3 install b", False, ["a", "b"]),
        ("cd /x && PIP_X=1 pip install 'c >= 1, < 2'\nls -l\n", True, ["c>=1,<2"]),
        ("/bin/bash -l -c 'pip install d'", True, ["d"]),
        ("pip install e \\\n  f", True, ["e", "f"]),
        ("echo pip install g", True, []),
        ("pip download h", True, []),
    ],
)
def test_the_requirements_of_every_pip_install(text: str, shell: bool, found: list[str]) -> None:
    assert requested(text, shell) == found


@pytest.mark.parametrize("arg", ["'x;rm'", "\"a; python_version>'3'\"", "a" * 300, "a==1=2"])
def test_what_is_not_a_requirement_is_refused_clearly(arg: str) -> None:
    with pytest.raises(PackageRefused, match="not a package the wheelhouse can provide"):
        requested(f"pip install {arg}", True)


def test_too_many_requirements_at_once_are_refused() -> None:
    with pytest.raises(PackageRefused, match="more than 64"):
        requested("pip install " + " ".join(f"p{i}" for i in range(65)), True)


def test_names_compare_as_pip_compares_them() -> None:
    assert canonical("Foo_Bar.baz") == canonical("foo-bar-baz") == "foo-bar-baz"


def test_tenants_can_only_narrow_the_packages_policy() -> None:
    base = Policy(packages_allow=("polars", "duckdb"), approval_packages=True)
    assert within(base, {"packages_allow": ["Polars"]}, Policy()).packages_allow == ("Polars",)
    with pytest.raises(PolicyError, match="packages_allow"):
        within(base, {"packages_allow": ["polars", "torch"]}, Policy())
    with pytest.raises(PolicyError, match="packages_allow"):
        within(base, {"packages_allow": None}, Policy())
    with pytest.raises(PolicyError, match="approval_packages"):
        within(base, {"approval_packages": False}, Policy())
    assert within(Policy(), {"packages_allow": ["x"]}, Policy()).packages_allow == ("x",)
    with pytest.raises(PolicyError, match="not a package name"):
        Policy(packages_allow=("../etc",))
