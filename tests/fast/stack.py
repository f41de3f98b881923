"""The daemon's real request path (RPC server, service, pool) in the test's own trio
run, over a real unix socket, with sandboxes from the local backend (tests/fakes):
no root, no jail, a fraction of a second per test."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from sandboxctl.client import AsyncClient
from sandboxd.backends.base import SandboxState
from sandboxd.config import Config
from sandboxd.daemon import socket_limits
from sandboxd.images import Image
from sandboxd.job import warm_runtimes
from sandboxd.languages import LanguageTable
from sandboxd.pool import Pool
from sandboxd.rpc_server import RpcServer
from sandboxd.service import Service
from sandboxd.sessions import Sessions
from tests.fakes.local_backend import LocalBackend, LocalSandbox

LANGUAGES = {"python": "host"}  # the host's python3 runs the programs


@dataclass
class Stack:
    client: AsyncClient
    pool: Pool
    backend: LocalBackend
    server: RpcServer
    sessions: Sessions


@asynccontextmanager
async def local_stack(
    tmp_path: Path,
    *,
    size: int = 1,
    max_sandboxes: int = 2,
    queue_timeout: float = 10.0,
    warm: bool = True,
    wrapper: Sequence[str] = (),
    sessions: dict[str, Any] | None = None,
    **daemon: Any,
) -> AsyncIterator[Stack]:
    """The stack serving ``tmp_path/sock`` until the block ends; then drained as the
    daemon drains, and every sandbox gone. ``daemon``: [daemon] settings to change;
    ``sessions``: [sessions] settings."""
    config = Config()
    config = dataclasses.replace(
        config,
        daemon=dataclasses.replace(config.daemon, **daemon),
        sessions=dataclasses.replace(config.sessions, **(sessions or {})),
    )
    backend = LocalBackend(tmp_path / "sandboxes", wrapper)
    await backend.start()
    table = LanguageTable(LANGUAGES)
    pool = Pool(
        backend,
        size=size,
        max_sandboxes=max_sandboxes,
        queue_timeout=queue_timeout,
        start_timeout=30.0,
        warm=warm_runtimes(table) if warm else {},
    )
    service = Service(
        pool=pool,
        backend=backend,
        backend_reason="local: tests only",
        image=Image("local", tmp_path, {"languages": LANGUAGES}),
        limits=config.limits,
    )
    table_of_sessions = Sessions(service, config.sessions)
    server = RpcServer(service, table_of_sessions, socket_limits(config))
    path = tmp_path / "sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            await nursery.start(table_of_sessions.run)
            await nursery.start(server.serve, trio.SocketListener(listener))
            yield Stack(AsyncClient(path), pool, backend, server, table_of_sessions)
            server.stop_accepting()
            pool.close()
            with trio.fail_after(10):
                await server.wait_answered()
                await table_of_sessions.close_all()
                await pool.wait_idle()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await backend.aclose()


async def wait_ready(pool: Pool, count: int, timeout: float = 10.0) -> None:
    """Until the pool holds ``count`` ready sandboxes."""
    with trio.fail_after(timeout):
        while pool.stats()["ready"] < count:
            await trio.sleep(0.01)


def running(backend: LocalBackend) -> LocalSandbox:
    """The one sandbox that runs a job now."""
    [sandbox] = [s for s in backend.opened if s.state is SandboxState.RUNNING]
    return sandbox
