"""pytest plugin of the conformance kit: `pytest_plugins = ["codecage.testing.pytest_plugin"]`.

A test that uses the `backend` fixture (directly or with `pytest.mark.usefixtures("backend")`)
runs once per backend under test (codecage.testing.backends_under_test), with `policy()`
building that backend's policies. Runs on other backends than the default are marked
`slow`. `@pytest.mark.backends("namespace")` limits a test to the backends it names (for
tests of one backend's internals). `@pytest.mark.requires_feature("own_uid", ...)` skips the
test on a backend that declares it lacks one of these features (codecage._jail.features),
with a reason naming the backend and the feature: never silently.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import DEFAULT, backends_under_test, unmet, use_backend


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends(*names): run this conformance test on these backends only"
    )
    config.addinivalue_line(
        "markers",
        "requires_feature(*features): skip on a backend that declares it lacks one of these "
        "(codecage._jail.features)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    names = backends_under_test()
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None:
        names = [n for n in names if n in marker.args]
    params = [
        pytest.param(n, id=n, marks=() if n == DEFAULT else (pytest.mark.slow,)) for n in names
    ]
    if not params:
        params = [pytest.param("", marks=pytest.mark.skip(reason="no such backend available"))]
    metafunc.parametrize("backend", params, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    name: str = request.param
    with use_backend(name):
        for marker in request.node.iter_markers("requires_feature"):
            why = unmet(*marker.args)
            if why is not None:
                pytest.skip(why)
        yield name
