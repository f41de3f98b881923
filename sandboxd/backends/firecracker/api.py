"""A small client for Firecracker's REST API, on the Unix socket in a VM's jail.

Firecracker answers each request once it has been applied (a 204 means done) and
reports a refusal as 400 with ``{"fault_message": ...}``; both become one call here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from sandboxd.errors import LaunchError

# Requests are small and answered at once, except snapshot ones (a VM's whole memory).
TIMEOUT = httpx.Timeout(10.0, read=120.0)


class FirecrackerApiError(LaunchError):
    """Firecracker refused a request, or its API socket went away."""


class FirecrackerApi:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._client = httpx.AsyncClient(
            # Plain HTTP on a unix socket: no TLS and no proxy, so nothing of either to
            # set up (httpx's defaults load certifi's CA bundle for the transport and
            # again for the client: 50 ms of the daemon's CPU for every VM).
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path), verify=False),
            base_url="http://localhost",
            timeout=TIMEOUT,
            verify=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> FirecrackerApi:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def put(self, path: str, body: dict[str, Any]) -> None:
        await self._request("PUT", path, body)

    async def patch(self, path: str, body: dict[str, Any]) -> None:
        await self._request("PATCH", path, body)

    async def get(self, path: str) -> dict[str, Any]:
        answer = await self._request("GET", path)
        return answer.json() if answer.content else {}

    async def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        try:
            answer = await self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise FirecrackerApiError(f"Firecracker's API: {method} {path}: {exc}") from exc
        if answer.is_success:
            return answer
        try:
            fault = answer.json().get("fault_message") or answer.text
        except ValueError:
            fault = answer.text
        raise FirecrackerApiError(
            f"Firecracker refused {method} {path} ({answer.status_code}): {fault}"
        )
