"""uvicorn's h11 HTTP protocol with a deadline for each request's line and headers.

uvicorn times out idle keep-alive connections but not a client that connects and sends nothing, or half its
headers (slowloris); such a connection holds a slot until it goes away. The protocol here closes it after
``header_timeout`` seconds. Stalled bodies are the application's (:func:`diffrl.rewards.server.app.read_body`).
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["header_deadline_protocol"]

logger = logging.getLogger(__package__)


class _HeaderDeadline(H11Protocol):
    header_timeout: float
    _deadline: asyncio.TimerHandle | None = None
    _answered = 0

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def _headers_overdue(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            partial = bool(self.conn.trailing_data[0])
            (logger.info if partial or not self._answered else logger.debug)(
                "%s:%s sent no complete request within %gs; connection closed", *(self.client or ("-", 0)),
                self.header_timeout,
            )
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        self._answered += 1
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)


def header_deadline_protocol(header_timeout: float) -> type[H11Protocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``: closes a connection whose request line and
    headers are not complete ``header_timeout`` seconds after it opened or after its last answer."""
    return type("HeaderDeadlineProtocol", (_HeaderDeadline,), {"header_timeout": float(header_timeout)})
