"""What any caller of the gateway may ask the daemon (health, languages), asked at most
so often: these paths are open to everyone, and each question would otherwise cost one
of the connections the daemon allows the gateway's uid."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from sandboxctl.client import AsyncClient
from sandboxd.errors import DaemonUnavailable

HEALTH_SECONDS = 0.5  # how old a health answer may be (load balancers poll it)
LANGUAGES_SECONDS = 30.0  # the languages change only with the daemon's image
ANSWER_TIMEOUT = 5.0  # how long a caller waits for the daemon to answer


class _Cached:
    def __init__(self, ask: Callable[[], Awaitable[dict[str, Any]]], seconds: float) -> None:
        self._ask = ask
        self._seconds = seconds
        self._answer: dict[str, Any] | None = None
        self._when = -float("inf")
        self._lock = trio.Lock()

    async def get(self) -> dict[str, Any]:
        """The answer, asked anew if the one kept is too old; the daemon's errors (a
        refusal, DaemonUnavailable) are raised, not kept, and so is its silence past
        ANSWER_TIMEOUT (a health check must hear something)."""
        try:
            with trio.fail_after(ANSWER_TIMEOUT):
                async with self._lock:  # one question at a time; the others take its answer
                    if self._answer is None or trio.current_time() - self._when > self._seconds:
                        self._answer = await self._ask()
                        self._when = trio.current_time()
                    return self._answer
        except trio.TooSlowError:
            raise DaemonUnavailable(
                f"the daemon did not answer within {ANSWER_TIMEOUT:g} s"
            ) from None


class DaemonAnswers:
    def __init__(self, client: AsyncClient) -> None:
        self._health = _Cached(client.health, HEALTH_SECONDS)
        self._languages = _Cached(client.languages, LANGUAGES_SECONDS)

    async def health(self) -> dict[str, Any]:
        return await self._health.get()

    async def languages(self) -> dict[str, Any]:
        return await self._languages.get()
