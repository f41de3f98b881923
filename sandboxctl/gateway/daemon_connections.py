"""The daemon connections the gateway's uid may hold (``daemon.max_connections_per_uid``),
shared out: so many for runs over HTTP and WebSockets, so many for MCP's tool calls,
and one for the health and languages answers, so that a flood of one kind of call waits
its turn within its own share and never takes the daemon's refusal, nor makes a load
balancer's health check wait behind jobs."""

from __future__ import annotations

from dataclasses import dataclass

import anyio.from_thread

from sandboxctl.client import AsyncClient, Client


@dataclass(frozen=True)
class DaemonConnections:
    runs: AsyncClient  # executions and session calls over HTTP and WebSockets
    mcp: Client  # MCP's tool calls, blocking, in the SDK's worker threads
    answers: AsyncClient  # health and languages (sandboxctl.gateway.daemon_answers)

    @classmethod
    def sharing(cls, socket_path: str, budget: int) -> DaemonConnections:
        """``budget`` connections shared out: a quarter to MCP, one to the answers, the
        rest to runs (one each at least: under four, the shares overlap, and a call may
        meet the daemon's refusal)."""
        mcp = max(1, budget // 4)
        return cls(
            runs=AsyncClient(socket_path, max_connections=max(1, budget - mcp - 1)),
            # Its calls run in the SDK's worker threads: a cancelled tool call ends its.
            mcp=Client(
                socket_path, max_connections=mcp, while_waiting=anyio.from_thread.check_cancelled
            ),
            answers=AsyncClient(socket_path, max_connections=1),
        )
