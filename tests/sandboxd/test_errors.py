"""The error tree: every code maps back to its class, and nothing slips through unmapped."""

from __future__ import annotations

import pytest

from sandboxd import errors


def wire_errors() -> list[type[errors.SandboxError]]:
    found = []
    stack = [errors.SandboxError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.code != errors.SandboxError.code and cls.__module__ == errors.__name__:
            found.append(cls)
    return found


@pytest.mark.parametrize("cls", wire_errors(), ids=lambda cls: cls.__name__)
def test_every_wire_error_round_trips_as_its_class(cls):
    original = cls("something went wrong", field="x")
    again = errors.SandboxError.from_wire(original.to_wire())
    assert type(again) is cls
    assert (again.message, again.data) == ("something went wrong", {"field": "x"})


def test_codes_are_unique():
    codes = [cls.code for cls in wire_errors()]
    assert len(codes) == len(set(codes))


def test_unknown_codes_and_garbage_become_the_root_error():
    assert (
        type(errors.SandboxError.from_wire({"code": 12345, "message": "?"})) is errors.SandboxError
    )
    weird = errors.SandboxError.from_wire({"code": "x", "data": [1]})
    assert weird.message == "unknown error" and weird.data == {}
