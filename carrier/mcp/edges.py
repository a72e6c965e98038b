"""The HTTP door's connection edges: a request deadline and a connection cap on uvicorn's h11 protocol.

uvicorn arms its keep-alive timer only after a response, so a client that connects and sends half a
request line (or a few header bytes after a response) holds its socket for ever: a few hundred such
clients exhaust the door. :class:`GuardedH11Protocol` gives every request a deadline from its first
byte (or from the connection, for the first request) until it is fully read, and closes connections
beyond ``max_connections`` as soon as they are made. Both apply after the TLS handshake, which
asyncio bounds by itself (60 s).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

#: States of the client's side in which a request is still being read.
_READING = (h11.IDLE, h11.SEND_BODY)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a whole-request deadline and a cap on open connections."""

    request_timeout: float = 10.0
    max_connections: int = 256

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    @classmethod
    def configured(cls, *, request_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
        """A subclass with these limits (uvicorn takes a protocol class, not an instance)."""
        return type(cls.__name__, (cls,), {"request_timeout": float(request_timeout),
                                           "max_connections": int(max_connections)})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("HTTP connection refused: %d connections are open (mcp.max_connections)",
                        len(self.connections) - 1, extra={"client": _peer(self.client)})
            self.transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            self._disarm()
        elif self.conn.their_state in _READING and self.cycle_reading():
            self._arm()
        else:
            self._disarm()

    def cycle_reading(self) -> bool:
        """True while a request has begun (or the connection is new) and is not fully read yet."""
        if self.conn.their_state is h11.SEND_BODY:
            return True
        # IDLE: before the first request or between requests. Bytes of the next request may sit in
        # h11's buffer (a partial request line); an empty buffer is keep-alive idling, which
        # uvicorn's own keep-alive timer covers.
        return bool(self.conn.trailing_data[0]) or self.cycle is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._disarm()
        super().on_response_complete()

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.conn.their_state in _READING and not self.transport.is_closing():
            log.warning("HTTP connection closed: no whole request within %.0f s (mcp.request_timeout)",
                        self.request_timeout, extra={"client": _peer(self.client)})
            self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"
