"""Deadlines for slow clients: the request head, the request body, an idle keep-alive connection.

Without them a client that sends a header a byte at a time, or a body it never finishes, holds a
connection (and a file descriptor, and for a body a handler and its buffer) for as long as it
likes; a few hundred such clients use up the server. Three deadlines, each a CLI flag:

- ``header_s``: from the connection's start (or the end of the previous answer on a keep-alive
  connection) to the end of the request head. Enforced in the HTTP protocol (an h11 protocol
  subclass): uvicorn itself only times out idle keep-alive connections, never a head in progress.
  Late: ``408`` and the connection is closed.
- ``body_s``: from the request head to the end of its body, enforced at the ASGI level around
  ``receive`` (:class:`BodyDeadline`). Late: the app answers ``408`` with ``Connection: close``.
- ``keep_alive_s``: uvicorn's ``timeout_keep_alive``, idle time between requests.

:func:`server_config` is the one place a uvicorn config is made with them.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any

import h11
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class Timeouts:
    """Slow-client deadlines in seconds; the CLI sets each with a flag (``header_s``:
    ``--header-timeout-s``, ``body_s``: ``--body-timeout-s``, ``keep_alive_s``: ``--keep-alive-s``)."""

    header_s: float = 10.0  # connection start (or previous answer) -> end of the request head
    body_s: float = 60.0  # request head -> end of the body (10 MiB at 2 Mbit/s takes 42 s)
    keep_alive_s: int = 5  # idle keep-alive connection closed after this (uvicorn's default)


class BodyDeadline:
    """ASGI middleware: the whole request body must arrive within ``seconds`` of its head.

    ``receive`` is wrapped; when the deadline passes while the app waits for body bytes, the
    wait raises ``HTTPException(408)`` (answered by the app's HTTP error handler) and the
    answer carries ``Connection: close``, so the server drops the half-sent body's connection.
    """

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        state = {"body_done": False, "expired": False}

        async def timed_receive() -> Message:
            if state["body_done"]:  # afterwards only http.disconnect comes: not a body wait
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                state["expired"] = True
                raise HTTPException(408, f"request body not complete after {self.seconds:g} s "
                                         "(the server's body_s deadline): send the body at once") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and state["expired"]:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, timed_receive, send_closing)


def _408(message: str) -> bytes:
    body = json.dumps({"error": message, "status": 408}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class HeaderDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request head (:attr:`header_timeout_s`).

    The timer starts when the connection opens and again when an answer is complete; it stops
    when the next request's head has been parsed (a new request cycle exists). When it fires the
    client gets a ``408`` (if no answer is under way) and the connection is closed.
    """

    header_timeout_s: float = Timeouts.header_s

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._cycle_before: Any = None
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._cycle_before = self.cycle  # the head has arrived once a different cycle exists
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def handle_events(self) -> None:
        super().handle_events()
        if self._head_timer is not None and self.cycle is not self._cycle_before:
            self._disarm()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # before super(): it may parse a pipelined head at once (and disarm)
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.conn.our_state is h11.IDLE:  # nothing of an answer sent on this cycle
            self.transport.write(_408(f"request head not complete after {self.header_timeout_s:g} s "
                                      "(the server's header_s deadline)"))
        self.transport.close()


def protocol_class(header_s: float) -> type[HeaderDeadlineH11]:
    """A :class:`HeaderDeadlineH11` subclass with a head deadline of ``header_s`` seconds."""
    return type("HeaderDeadlineH11", (HeaderDeadlineH11,), {"header_timeout_s": header_s})


def server_config(app: ASGIApp, host: str, port: int, timeouts: Timeouts | None = None,
                  **kwargs: Any) -> Any:
    """A ``uvicorn.Config`` serving ``app`` on ``host:port`` with the three deadlines of
    ``timeouts`` (default :class:`Timeouts`); ``kwargs`` go to ``uvicorn.Config`` as they are."""
    import uvicorn

    t = timeouts or Timeouts()
    return uvicorn.Config(BodyDeadline(app, t.body_s), host=host, port=port, http=protocol_class(t.header_s),
                          timeout_keep_alive=max(1, math.ceil(t.keep_alive_s)), **kwargs)


__all__ = ["BodyDeadline", "HeaderDeadlineH11", "Timeouts", "protocol_class", "server_config"]
