"""A real gateway in front of the session's real daemon, reached over HTTP with httpx."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.daemon_process import Gateway, start_gateway

KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdef0"}


@pytest.fixture(scope="session")
def gateway(daemon, tmp_path_factory) -> Iterator[Gateway]:
    # Limits high enough that the whole suite never meets them (test_access tests them).
    running = start_gateway(
        tmp_path_factory.mktemp("gateway"),
        daemon.socket,
        rate_per_minute=100_000,
        rate_burst=10_000,
        concurrent_per_key=100,
    )
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture
def http(gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def keyed_gateway(daemon, tmp_path_factory) -> Iterator[Gateway]:
    """With API keys, a low rate (6 a minute, bursts of 3) and 2 executions at once."""
    directory = tmp_path_factory.mktemp("keyed")
    keys = directory / "keys"
    keys.write_text("# id:key\n" + "".join(f"{k}:{v}\n" for k, v in KEYS.items()))
    running = start_gateway(
        directory,
        daemon.socket,
        api_keys_file=str(keys),
        rate_per_minute=6,
        rate_burst=3,
        concurrent_per_key=2,
    )
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture
def keys_gateway(daemon, tmp_path) -> Iterator[Gateway]:
    """With API keys (KEYS) and limits no test meets."""
    keys = tmp_path / "keys"
    keys.write_text("".join(f"{k}:{v}\n" for k, v in KEYS.items()))
    running = start_gateway(
        tmp_path, daemon.socket, api_keys_file=str(keys), rate_per_minute=10_000, rate_burst=1000
    )
    yield running
    assert running.stop() == 0, running.log()
