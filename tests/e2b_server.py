"""A real `codecage serve` on loopback for E2B's own SDKs (`e2b`, `e2b-code-interpreter`),
shared by the E2B tests (tests/test_e2b*.py): tests/conftest.py loads it as a plugin, so
a test asks for the fixtures by name. `e2b_service` is one service for the module (tenants alice and bob); `e2b_env` points the
SDKs at it for one test (E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY of alice, in the
environment, where the SDKs read them) and, after the test, kills whatever sandbox alice
left and fails the test if there was one. `env_for(service, tenant)` is the same
environment for another tenant, for an SDK call given its own `api_key`.

The service's sandboxes are the service process's: the leak check (tests/conftest.py)
does not see them, which is why `e2b_env` checks the tenant's list itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from .conftest import Service, start_service, stop_service

CONFIG = (  # room for a few sandboxes at once; a small warm pool
    "pool_size = 1\n"
    "[quotas]\nlive_sandboxes = 8\nruns_per_minute = 100000\n"
    "[ceiling]\nmemory_mb = 4096\ncpu_cores = 2.0\ncpu_s = 3600\npids_max = 64\n"
    "disk_mb = 4096\ntmp_mb = 1024\nshm_mb = 1024\ntimeout_s = 600\n"
    "idle_timeout_s = 3600\noutput_bytes = 16777216\n"
)


def env_for(service: Service, tenant: str = "alice") -> dict[str, str]:
    """What E2B's SDKs need to use this service as tenant `tenant`."""
    return {
        "E2B_API_URL": service.url,
        "E2B_SANDBOX_URL": service.url,
        "E2B_API_KEY": service.keys[tenant],
    }


def sandboxes_of(service: Service, tenant: str = "alice") -> list[str]:
    response = httpx.get(
        f"{service.url}/v2/sandboxes", headers={"X-API-KEY": service.keys[tenant]}, timeout=30
    )
    response.raise_for_status()
    return [s["sandboxID"] for s in response.json()]


def kill_all(service: Service, tenant: str = "alice") -> list[str]:
    left = sandboxes_of(service, tenant)
    for sandbox_id in left:
        httpx.delete(
            f"{service.url}/sandboxes/{sandbox_id}",
            headers={"X-API-KEY": service.keys[tenant]},
            timeout=30,
        )
    return left


@pytest.fixture(scope="module")
def e2b_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    where = tmp_path_factory.mktemp("e2b")
    config = where / "service.toml"
    config.write_text(CONFIG)
    service = start_service(where / "audit.db", ("alice", "bob"), config)
    try:
        yield service
    finally:
        stop_service(service)


@pytest.fixture
def e2b_env(e2b_service: Service, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    env = env_for(e2b_service)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("E2B_DEBUG", "E2B_ACCESS_TOKEN", "E2B_DOMAIN", "E2B_HTTP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    yield env
    left = kill_all(e2b_service, "alice") + kill_all(e2b_service, "bob")
    assert left == [], f"sandboxes left on the service: {left}"
