"""Errors become wire errors in exactly one place, and no traceback reaches the wire."""

from __future__ import annotations

import logging

from oslash.either import Left

from sandboxd.errors import InternalError, NoCapacity
from sandboxd.rpc_server import _expose


async def failing(context, **params):
    raise RuntimeError("secret detail /etc/sandboxd/keys")


async def refusing(context, **params):
    raise NoCapacity("no sandbox became free within 1 s", waited=1)


async def test_unexpected_exception_becomes_internal_error_with_log_id(caplog):
    with caplog.at_level(logging.ERROR):
        result = await _expose(failing)(None)
    assert isinstance(result, Left)
    error = result._error
    assert error.code == InternalError.code
    assert "secret" not in error.message and "Traceback" not in error.message
    assert error.data["log_id"] in error.message
    assert error.data["log_id"] in caplog.text and "secret detail" in caplog.text


async def test_sandbox_errors_keep_their_code_and_data():
    result = await _expose(refusing)(None)
    assert (result._error.code, result._error.data) == (NoCapacity.code, {"waited": 1})
