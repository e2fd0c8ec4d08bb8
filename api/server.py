"""How `cartwise api` runs the app: uvicorn with connection limits and read timeouts, and
Prometheus metrics on their own port (docs/api.md, "Limits" and "Operations routes").

uvicorn has no timeout for a request still arriving: its keep-alive timer stops at the first
byte, so a client that sends headers or a body a byte at a time holds a connection (and the
bytes buffered so far) for as long as it likes. GuardedHttpTools closes such connections:
the headers must be in within `header_timeout_s` of the connection or of the request's
first byte, the body within `body_timeout_s` of the headers. It also refuses connections
beyond `max_connections` with a 503 at once, instead of queueing them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import orjson
import uvicorn
from prometheus_client import start_http_server
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.metrics import ApiMetrics
from cartwise.settings import Settings

log = logging.getLogger("cartwise.api")


def _answer(status: int, reason: str, detail: str) -> bytes:
    body = orjson.dumps({"error": {"status": status, "reason": reason, "detail": detail}})
    phrase = {408: b"Request Timeout", 503: b"Service Unavailable"}[status]
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, phrase, len(body), body))


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with read deadlines and a connection bound."""

    header_timeout_s = 10.0
    body_timeout_s = 30.0
    max_connections = 2048

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        full = len(self.connections) >= self.max_connections
        super().connection_made(transport)
        if full:
            transport.write(_answer(503, "too_many_connections", "the server has "
                                    f"{self.max_connections} connections open; retry shortly"))
            transport.close()
            return
        self._arm(self.header_timeout_s, "headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a new request on a kept-alive connection
            self._arm(self.header_timeout_s, "headers")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.body_timeout_s, "body")

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, what, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, what: str, seconds: float) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle  # still the previous request's while headers are awaited
        if what == "headers" or cycle is None or not cycle.response_started:
            self.transport.write(_answer(408, f"{what}_timeout", f"the request {what} did not "
                                         f"arrive within {seconds:g}s"))
        self.transport.close()  # the app, if waiting for the body, sees a disconnect


def protocol_for(settings: Settings) -> type[GuardedHttpTools]:
    """A protocol class carrying this process's limits (uvicorn instantiates it per
    connection, with no way to pass arguments)."""
    return type("CartwiseHttp", (GuardedHttpTools,), {
        "header_timeout_s": settings.header_timeout_s,
        "body_timeout_s": settings.body_timeout_s,
        "max_connections": settings.max_connections})


def config(app: Any, settings: Settings, host: str | None = None, port: int | None = None,
           log_level: str = "info") -> uvicorn.Config:
    """The uvicorn configuration `cartwise api` runs with."""
    return uvicorn.Config(
        app, host=host or settings.api_host, port=port or settings.api_port, loop="uvloop",
        http=protocol_for(settings), access_log=False, log_level=log_level,
        timeout_graceful_shutdown=5,
        # Longer than the usual 60 s idle timeout of load balancers in front of it.
        timeout_keep_alive=65)


def serve(app: Any, settings: Settings, host: str | None = None, port: int | None = None,
          log_level: str = "info") -> None:
    uvicorn.Server(config(app, settings, host, port, log_level)).run()


class MetricsPort:
    """/metrics on CARTWISE_METRICS_PORT, off the public port (started by the app's
    lifespan, so any way of running the app gets it)."""

    def __init__(self, metrics: ApiMetrics, host: str, port: int) -> None:
        self.metrics, self.host, self.port = metrics, host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self._server, self._thread = start_http_server(self.port, self.host,
                                                           self.metrics.registry)
        except OSError as exc:
            raise RuntimeError(f"cannot serve metrics on {self.host}:{self.port} ({exc}); "
                               "set CARTWISE_METRICS_PORT to a free port, or 0 to serve "
                               "them on the API's port") from None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
