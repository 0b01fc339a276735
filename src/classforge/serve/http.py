"""The HTTP server under the app: uvicorn, with a deadline for each request to arrive and a cap on connections.

uvicorn closes a keep-alive connection that stays idle, but not one that is opened and never sends a request,
nor one that sends its headers or body a byte at a time: each such client holds a socket (and a slot) for as long
as it likes. Here every request must arrive whole within `request_timeout_s` of the connection opening (or of the
previous response); the connection is closed otherwise. Long answers are unaffected: the deadline ends once the
request has arrived."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request to arrive in full."""

    request_timeout_s: float = 15.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and not cycle.more_body and not cycle.response_complete:
            self._disarm()  # the whole request is here: the app may take as long as it needs to answer

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline

    def handle_websocket_upgrade(self, event) -> None:
        self._disarm()  # the connection now belongs to the websocket protocol
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def server_config(app, host: str, port: int, request_timeout_s: float = 15.0, max_connections: int = 256,
                  log_level: str = "info"):
    """A uvicorn.Config for `app`: requests must arrive within `request_timeout_s`; beyond `max_connections`
    open connections new requests get a 503 at once; idle keep-alive connections close after 5 s."""
    import uvicorn

    protocol = type("Protocol", (DeadlineH11Protocol,), {"request_timeout_s": float(request_timeout_s)})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                          limit_concurrency=max_connections, timeout_keep_alive=5, timeout_graceful_shutdown=5)


def serve(app, host: str, port: int, request_timeout_s: float = 15.0, max_connections: int = 256,
          log_level: str = "info") -> None:
    import uvicorn

    uvicorn.Server(server_config(app, host, port, request_timeout_s, max_connections, log_level)).run()
