"""Who may call the gateway, and how often: API keys, a token bucket per key for its
rate of executions, and a cap on each key's requests running at once.

Keys come from a file of ``key-id:key`` lines (``#`` comments). Logs and metrics only
ever name the key id. Without a key file the gateway serves loopback only, and the
caller is the local user at the other end of the connection: admitted if that uid may
use the daemon's socket (sandboxctl.gateway.local_peers), and rate-limited as itself.
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sandboxctl.gateway.local_peers import SocketUsers, tcp_peer_uid
from sandboxd.errors import ConfigError, Forbidden, RateLimited, Unauthorized


def load_keys(path: Path) -> dict[str, str]:
    """Key id → key from a key file; ConfigError naming the line that is wrong."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the API key file: {exc.strerror}") from exc
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key_id, sep, key = line.partition(":")
        if not sep or not key_id.strip() or len(key.strip()) < 16:
            raise ConfigError(
                f"{path}:{number}: expected 'key-id:key' with a key of 16+ characters"
            )
        if key_id.strip() in keys:
            raise ConfigError(f"{path}:{number}: key id {key_id.strip()!r} appears twice")
        keys[key_id.strip()] = key.strip()
    if not keys:
        raise ConfigError(f"{path}: no API keys in the file")
    return keys


@dataclass
class _Bucket:
    tokens: float
    updated: float
    running: int = 0


@dataclass
class AccessControl:
    """Authenticates requests and enforces each key's rate and concurrency."""

    keys: Mapping[str, str]  # empty: local users who may use the daemon's socket
    rate_per_minute: float
    burst: int
    concurrent: int
    local_users: SocketUsers | None = None  # who those are (needed without keys)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    # The buckets are also used from the worker threads the MCP server's tools run in.
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def authenticate(
        self,
        headers: Mapping[str, str],
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
    ) -> str:
        """Who the caller is: its key id, or without keys ``uid:N`` of the local user at
        the other end of the connection. Unauthorized if a key is needed and not right,
        Forbidden if that user may not use the daemon's socket."""
        if not self.keys:
            return self._local_caller(client, server)
        presented = headers.get("x-api-key", "")
        authorization = headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            presented = authorization[7:].strip()
        if not presented:
            raise Unauthorized("an API key is required (Authorization: Bearer KEY or X-API-Key)")
        for key_id, key in self.keys.items():
            if hmac.compare_digest(presented.encode(), key.encode()):
                return key_id
        raise Unauthorized("unknown API key")

    def _local_caller(self, client: tuple[str, int] | None, server: tuple[str, int] | None) -> str:
        assert self.local_users is not None, "without keys the gateway needs local_users"
        uid = tcp_peer_uid(client, server) if client and server else None
        if uid is None:
            raise Forbidden(
                "without API keys only local users who may use sandboxd's socket are let "
                "in, and the user of this connection is not known here"
            )
        if not self.local_users.allows(uid):
            raise Forbidden(
                f"uid {uid} may not use sandboxd: without API keys only root and the "
                f"members of group {self.local_users.group_name()} are let in, as on its "
                "socket"
            )
        return f"uid:{uid}"

    def _bucket(self, key_id: str, now: float) -> _Bucket:
        bucket = self._buckets.setdefault(key_id, _Bucket(float(self.burst), now))
        refill = (now - bucket.updated) * self.rate_per_minute / 60
        bucket.tokens = min(float(self.burst), bucket.tokens + refill)
        bucket.updated = now
        return bucket

    @contextmanager
    def admit(self, key_id: str, *, executes: bool) -> Iterator[None]:
        """Hold one of the key's request slots, and for a request that ``executes`` one
        of its tokens too; RateLimited (with retry_after) if it already has its maximum
        running, or is over its rate."""
        with self._lock:
            bucket = self._bucket(key_id, time.monotonic())
            if bucket.running >= self.concurrent:
                raise RateLimited(
                    f"too many requests at once for this key (at most {self.concurrent})",
                    retry_after=1,
                    reason="concurrency",
                )
            if executes:
                self._spend(bucket)
            bucket.running += 1
        try:
            yield
        finally:
            with self._lock:
                bucket.running -= 1

    def spend(self, key_id: str) -> None:
        """Take one of the key's tokens for an execution that its request's slot holds
        already (an MCP tool call); RateLimited if it is over its rate."""
        with self._lock:
            self._spend(self._bucket(key_id, time.monotonic()))

    def _spend(self, bucket: _Bucket) -> None:
        if bucket.tokens < 1:
            wait = math.ceil((1 - bucket.tokens) * 60 / self.rate_per_minute)
            raise RateLimited(
                f"rate limit of {self.rate_per_minute:g} executions per minute exceeded",
                retry_after=wait,
                reason="rate",
            )
        bucket.tokens -= 1
