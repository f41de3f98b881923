"""Configuration: defaults < file < environment < flags, and one clear message per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd.config import load_config, parse_size
from sandboxd.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sandboxd.toml"
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def no_installed_config(monkeypatch, tmp_path):
    """An installed /etc/sandboxd/sandboxd.toml must not leak into these tests."""
    monkeypatch.setattr("sandboxd.config.DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")


def test_defaults_match_the_original_service():
    config = load_config(environ={})
    assert config.gateway.api_port == 8000
    assert config.backend.agent_port == 8080
    assert config.daemon.socket == Path("/run/sandboxd.sock")
    assert config.limits["wall_time"].default == 30


def test_file_then_environment_then_flags(tmp_path):
    path = write(tmp_path, '[pool]\nsize = 3\n[daemon]\nsocket = "/tmp/file.sock"\n')
    config = load_config(path, environ={})
    assert (config.pool.size, config.daemon.socket) == (3, Path("/tmp/file.sock"))
    config = load_config(path, environ={"SANDBOXD_POOL_SIZE": "5", "SANDBOXD_SOCKET": "/tmp/env"})
    assert (config.pool.size, config.daemon.socket) == (5, Path("/tmp/env"))
    config = load_config(
        path,
        environ={"SANDBOXD_POOL_SIZE": "5"},
        overrides={"pool.size": (7, "--pool-size"), "daemon.socket": (None, "--socket")},
    )
    assert (config.pool.size, config.daemon.socket) == (7, Path("/tmp/file.sock"))


def test_original_variables_are_honoured():
    config = load_config(
        environ={
            "API_PORT": "9000",
            "AGENT_PORT": "9090",
            "ROOTFS_PATH": "/srv/rootfs",
            "KERNEL_PATH": "/srv/vmlinux",
            "RUST_LOG": "debug",
        }
    )
    assert config.gateway.api_port == 9000
    assert config.backend.agent_port == 9090
    assert config.backend.rootfs_path == "/srv/rootfs"
    assert config.backend.kernel_path == "/srv/vmlinux"
    assert config.daemon.log_level == "debug"


@pytest.mark.parametrize(
    ("value", "level"),
    [
        ("warn", "warning"),
        ("trace", "debug"),
        ("api=debug,hyper=info", "debug"),
        ("ERROR", "error"),
    ],
)
def test_rust_log_values_map_to_levels(value, level):
    assert load_config(environ={"RUST_LOG": value}).daemon.log_level == level


def test_sandboxd_log_level_wins_over_rust_log():
    environ = {"RUST_LOG": "debug", "SANDBOXD_LOG_LEVEL": "error"}
    assert load_config(environ=environ).daemon.log_level == "error"


def test_config_file_from_environment(tmp_path):
    path = write(tmp_path, "[pool]\nsize = 4\n")
    assert load_config(environ={"SANDBOXD_CONFIG": str(path)}).pool.size == 4


def test_limits_from_file_accept_sizes(tmp_path):
    path = write(tmp_path, '[limits.memory_bytes]\ndefault = "128MiB"\nmaximum = "1G"\n')
    bounds = load_config(path, environ={}).limits["memory_bytes"]
    assert (bounds.default, bounds.maximum) == (128 * 2**20, 2**30)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[pool]\nsize = 'many'\n", "pool.size: expected an integer, got 'many'"),
        ("[pool]\nsize = -1\n", "pool.size: expected a number of at least 0, got -1"),
        ("[pool]\nsize = 1.5\n", "pool.size: expected an integer, got 1.5"),
        ("[pool]\nsizes = 1\n", "pool.sizes: unknown key"),
        ("[pools]\nsize = 1\n", "[pools]: unknown section"),
        ("[backend]\nname = 'docker'\n", "backend.name: expected one of auto, firecracker"),
        ("[gateway]\napi_port = 70000\n", "gateway.api_port: expected a port number"),
        ("[daemon]\nmax_request_bytes = 'lots'\n", "daemon.max_request_bytes: expected a size"),
        ("[limits.wall_time]\ndefault = 0\n", "limits.wall_time.default: expected a number"),
        (
            "[limits.wall_time]\ndefault = 500\n",
            "limits.wall_time: default 500 is above maximum 300",
        ),
        ("[limits.gpu]\ndefault = 1\n", "limits.gpu: unknown limit"),
        ("[pool]\nsize = 20\n", "pool.size: expected at most pool.max_sandboxes (16), got 20"),
        ("[pool\n", "not valid TOML"),
    ],
)
def test_bad_file_names_file_key_and_expectation(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(path) in caught.value.message
    assert message in caught.value.message


def test_a_nodes_name_from_its_orchestrator_is_checked():
    """Nomad and Kubernetes give SANDBOXD_NODE the host's name; one a session id cannot
    start with is refused, naming the variable."""
    assert load_config(environ={"SANDBOXD_NODE": "worker-3"}).sessions.node == "worker-3"
    with pytest.raises(ConfigError, match=r"SANDBOXD_NODE: sessions\.node"):
        load_config(environ={"SANDBOXD_NODE": "ip-10-0-0-3.ec2.internal"})


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match=r"environment variable API_PORT: gateway\.api_port"):
        load_config(environ={"API_PORT": "http"})


def test_bad_flag_names_the_flag():
    with pytest.raises(ConfigError, match=r"--pool-size: pool\.size"):
        load_config(environ={}, overrides={"pool.size": (-3, "--pool-size")})


def test_missing_named_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.toml", environ={})


def test_the_shipped_example_config_loads():
    example = Path(__file__).parents[2] / "contrib" / "sandboxd.toml"
    assert load_config(example, environ={}).pool.size == 2


@pytest.mark.parametrize(
    ("text", "size"), [(5, 5), ("64MiB", 64 * 2**20), ("2G", 2 * 2**30), ("10 KB", 10240)]
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[network]\nallow = ['not a network']\n", "network.allow: expected IPv4 networks"),
        ("[network]\nallow = 'x'\nsubnet = '10.0.0.0/30'\n", "expected IPv4 networks"),
        ("[network]\nsubnet = '10.0.0.0/28'\n", "network.subnet: expected an IPv4 network from"),
        ("[network]\nallow = ['10.213.1.0/24']\n", "is in network.subnet 10.213.0.0/16"),
    ],
)
def test_network_settings_are_checked(tmp_path, text, message):
    path = tmp_path / "sandboxd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_network_allow_from_the_environment_is_a_comma_separated_list(tmp_path):
    (tmp_path / "empty.toml").write_text("")
    environ = {"SANDBOXD_NETWORK_ALLOW": "203.0.113.0/24, 0.0.0.0/0"}
    config = load_config(tmp_path / "empty.toml", environ=environ)
    assert config.network.allow == ("203.0.113.0/24", "0.0.0.0/0")
