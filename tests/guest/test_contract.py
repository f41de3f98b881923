"""The agent speaks the wire contract (sandboxd.protocol) without importing it: it runs on
the image's python, standard library only. What it says must equal what is there."""

from __future__ import annotations

import ast
from pathlib import Path

from guest.agent.protocol import PROTOCOL
from sandboxd.limits import LIMIT_SPECS
from sandboxd.protocol import AGENT_PROTOCOL, Status

AGENT = Path(__file__).parents[2] / "guest" / "agent"
TREE = ast.Module(
    body=[node for path in sorted(AGENT.glob("*.py")) for node in ast.parse(path.read_text()).body],
    type_ignores=[],
)


def function(name: str) -> ast.FunctionDef:
    return next(
        node for node in ast.walk(TREE) if isinstance(node, ast.FunctionDef) and node.name == name
    )


def test_the_agent_speaks_the_contracts_protocol_version():
    assert PROTOCOL == AGENT_PROTOCOL


def test_every_status_the_agent_reports_is_the_contracts():
    # classify returns (status, message); serve reports the agent's own failures.
    reported = {
        node.value.elts[0].value
        for node in ast.walk(function("classify"))
        if isinstance(node, ast.Return)
        and isinstance(node.value, ast.Tuple)
        and isinstance(node.value.elts[0], ast.Constant)
    }
    reported |= {
        value.value
        for node in ast.walk(function("serve"))
        if isinstance(node, ast.Dict)
        for key, value in zip(node.keys, node.values, strict=True)
        if isinstance(key, ast.Constant) and key.value == "status"
        if isinstance(value, ast.Constant)
    }
    assert len(reported) >= 6, reported
    assert reported <= {str(status) for status in Status}


def test_every_limit_the_agent_reads_is_the_contracts():
    read = {
        node.slice.value
        for node in ast.walk(TREE)
        if isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Name)
        and node.value.id == "limits"
        and isinstance(node.slice, ast.Constant)
    }
    assert len(read) >= 6, read
    assert read <= {spec.name for spec in LIMIT_SPECS}
