"""contrib/haproxy.cfg: valid for Debian's HAProxy, and routing as the nodes expect."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

CONFIG = Path(__file__).parents[2] / "contrib" / "haproxy.cfg"


def test_haproxy_accepts_the_shipped_config():
    checked = subprocess.run(
        ["haproxy", "-c", "-f", str(CONFIG)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_each_node_gets_its_sessions_and_is_up_only_while_ready():
    text = CONFIG.read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    assert "option httpchk GET /ready" in lines and "http-check expect status 200" in lines
    assert "balance leastconn" in lines
    servers = [re.match(r"server (\S+) \S+ check$", line) for line in lines]
    names = [match.group(1) for match in servers if match]
    assert len(names) >= 2
    for name in names:  # the prefix sessions.node = NAME gives its session ids
        assert f"use-server {name} if {{ path_beg /sessions/{name}- }}" in lines
