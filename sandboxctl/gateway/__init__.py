"""sandboxd-gateway: the HTTP face of sandboxd, an unprivileged client of its socket.

The original codesandbox API (`/health`, `/languages`, `/execute`) answered as its
clients expect, plus the full result record, streaming (SSE and WebSocket), OpenAPI
docs, API keys with per-key limits, and Prometheus metrics. Only this package knows
FastAPI; it reaches the daemon only through :mod:`sandboxctl.client`.
"""
