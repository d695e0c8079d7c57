"""A direct socket from each gateway replica to the episode ledger, beside its Ray actor handle.

Every gateway call waits for one ledger answer (the call's step, and with `gateway.store_before_reply` its
commit). On the 2-core test machine an idle Ray actor round trip between two async actors takes 3.0 ms (p50 of
30, 0.25 s apart), a round trip over a kept TCP connection between the same two processes 0.33 ms: a Ray call
wakes half a dozen threads in both processes, a socket read wakes the event loop it is waiting in. So with
`gateway.ledger_transport: socket` (the default) the ledger also listens on a TCP port of its node, and each
replica keeps one connection to it, many calls in flight on it at once.

The Ray handle stays the way in: a replica asks the actor for the port and a token (`EpisodeLedger.link`),
connects in the background, and sends every call through the actor until the connection is up, or whenever it
is down (a restarted ledger listens on a new port, and is asked again). Nothing is retried over the other path
once sent: whether a call that got no answer was recorded is unknown, as with a Ray call that timed out.

Frames: a 4-byte big-endian length, then msgpack. The first frame a client sends is the token; then requests
`[id, method, args]`, answered `[id, answer]` or `[id, None, error]`, in whatever order they finish.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 256 * 1024 * 1024
"""A frame announcing more than this is a broken or foreign peer: its connection is closed."""
CONNECT_TIMEOUT_S = 2.0
"""Deadline to open the connection and have the token accepted."""
RECONNECT_PAUSE_S = 1.0
"""After a failed connection, calls go through the actor this long before the next try."""


class LinkError(RuntimeError):
    """The ledger raised while answering a call sent over the link (its message names the error)."""


def _frame(payload: Any) -> bytes:
    body = msgpack.packb(payload, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > MAX_FRAME_BYTES:
        raise ConnectionError(f"a frame of {size} bytes, over the link's {MAX_FRAME_BYTES}")
    return msgpack.unpackb(await reader.readexactly(size), raw=False, strict_map_key=False)


# --- the ledger's side --------------------------------------------------------------------------------------


@dataclass
class LinkServer:
    """The listening socket of one ledger life; `address` is what a replica is told to connect to."""

    server: asyncio.Server
    host: str
    port: int
    token: str
    calls: int = 0
    """Calls answered over the link (the ledger's `stats` report it)."""
    _connections: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def address(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "token": self.token}

    def close(self) -> None:
        self.server.close()
        for writer in list(self._connections):
            writer.close()


async def serve_link(
    answer: Callable[[str, list[Any]], Awaitable[Any]], methods: frozenset[str], host: str, write_timeout_s: float
) -> LinkServer:
    """Listen on `host` (any free port) and answer each authenticated request with `await answer(method, args)`,
    for the `methods` named only. A client that does not read its answers within `write_timeout_s` is dropped."""
    token = secrets.token_hex(16)
    link: LinkServer | None = None

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert link is not None
        link._connections.add(writer)
        tasks: set[asyncio.Task] = set()
        try:
            hello = await asyncio.wait_for(_read_frame(reader), CONNECT_TIMEOUT_S)
            if not isinstance(hello, str) or not hmac.compare_digest(hello, token):
                log.warning("ledger link: a connection from %s sent a wrong token; closed", _peer(writer))
                return
            writer.write(_frame("ok"))
            while True:
                request = await _read_frame(reader)
                task = asyncio.create_task(_respond(request, writer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                log.warning("ledger link: connection from %s ended inside a frame", _peer(writer))
        except Exception as exc:  # a broken or foreign peer: its connection ends, the ledger goes on
            log.warning("ledger link: connection from %s ended (%s: %s)", _peer(writer), type(exc).__name__, exc)
        finally:
            link._connections.discard(writer)
            writer.close()

    async def _respond(request: Any, writer: asyncio.StreamWriter) -> None:
        assert link is not None
        call_id = request[0] if isinstance(request, list) and request else None
        try:
            if not (isinstance(request, list) and len(request) == 3 and isinstance(request[2], list)):
                raise ValueError("a request is [id, method, args]")
            method = request[1]
            if method not in methods:
                raise ValueError(f"{method!r} is not a ledger call (one of {sorted(methods)})")
            reply = [call_id, await answer(method, request[2])]
            link.calls += 1
        except Exception as exc:  # the caller gets the error by name, the connection stays up
            reply = [call_id, None, f"{type(exc).__name__}: {str(exc)[:1000]}"]
        if writer.is_closing():
            return
        try:
            frame = _frame(reply)
        except Exception as exc:  # an answer msgpack cannot carry: say so rather than leave the caller waiting
            frame = _frame([call_id, None, f"the ledger's answer cannot be sent ({type(exc).__name__}: {exc})"])
        try:
            writer.write(frame)
            await asyncio.wait_for(writer.drain(), write_timeout_s)
        except (ConnectionError, TimeoutError) as exc:
            log.warning("ledger link: dropping %s, which does not take its answers (%s)", _peer(writer), exc)
            writer.close()

    server = await asyncio.start_server(session, host, 0)
    link = LinkServer(server, host, server.sockets[0].getsockname()[1], token)
    return link


def _peer(writer: asyncio.StreamWriter) -> str:
    return str(writer.get_extra_info("peername"))


# --- a replica's side ---------------------------------------------------------------------------------------


class _Connection:
    """One open connection: calls go out as frames, a reader task hands each answer to its caller."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: dict[int, asyncio.Future] = {}
        self.closed = False
        self._reader = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        why: Exception = ConnectionError("the ledger link closed")
        try:
            while True:
                reply = await _read_frame(reader)
                waiter = self._pending.pop(reply[0], None)
                if waiter is None or waiter.done():
                    continue  # its caller gave up at its deadline
                if len(reply) == 3:
                    waiter.set_exception(LinkError(f"the episode ledger failed: {reply[2]}"))
                else:
                    waiter.set_result(reply[1])
        except Exception as exc:  # closed, reset, or a frame that is not the ledger's: the connection is over
            why = ConnectionError(f"the ledger link closed ({type(exc).__name__}: {exc})")
        finally:
            self.close(why)

    def close(self, why: Exception) -> None:
        self.closed = True
        self._writer.close()
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(why)
        self._pending.clear()

    async def call(self, method: str, frame: bytes, call_id: int, timeout_s: float) -> Any:
        waiter = asyncio.get_running_loop().create_future()
        self._pending[call_id] = waiter
        try:
            async with asyncio.timeout(timeout_s):
                self._writer.write(frame)
                await self._writer.drain()
                return await waiter
        finally:
            self._pending.pop(call_id, None)


class LedgerLink:
    """A replica's way to the ledger: `call` goes over the socket when it is up, else through the actor."""

    def __init__(self, ledger: Any, timeout_s: float, use_socket: bool = True) -> None:
        """`ledger`: the actor handle; `timeout_s`: deadline of one call (gateway.ledger_timeout_s);
        `use_socket`: False sends every call through the actor (gateway.ledger_transport: ray)."""
        self._ledger = ledger
        self._timeout_s = timeout_s
        self._use_socket = use_socket
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task | None = None
        self._next_try = 0.0
        self._next_id = 0

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.closed

    async def call(self, method: str, *args: Any) -> Any:
        """The ledger's answer to `method(*args)`; TimeoutError past the deadline, ConnectionError if the
        socket closed with the call sent, RayActorError if the actor is gone, LinkError if the ledger raised."""
        if self.connected:
            assert self._connection is not None
            self._next_id += 1
            try:
                frame = _frame([self._next_id, method, list(args)])
            except Exception:  # a value msgpack cannot carry: nothing was sent, so the actor takes this one
                frame = None
            if frame is not None:
                connection = self._connection
                try:
                    return await connection.call(method, frame, self._next_id, self._timeout_s)
                except TimeoutError:
                    # A ledger that went silent (its node gone without closing the socket, or wedged): the next
                    # calls go through the actor, which knows whether it lives, and the socket is asked for anew.
                    connection.close(ConnectionError("a call over the ledger link timed out"))
                    raise
        else:
            self._connect_soon()
        return await asyncio.wait_for(getattr(self._ledger, method).remote(*args), self._timeout_s)

    def _connect_soon(self) -> None:
        if not self._use_socket or time.monotonic() < self._next_try:
            return
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            address = await asyncio.wait_for(self._ledger.link.remote(), self._timeout_s)
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(address["host"], address["port"])
                writer.write(_frame(address["token"]))
                if await _read_frame(reader) != "ok":
                    raise ConnectionError("the ledger refused the token")
        except Exception as exc:
            self._next_try = time.monotonic() + RECONNECT_PAUSE_S
            log.warning(
                "no socket to the episode ledger (%s: %s); calls go through its actor, next try in %.0f s",
                type(exc).__name__, str(exc)[:300], RECONNECT_PAUSE_S,
            )  # fmt: skip
            return
        self._connection = _Connection(reader, writer)
        log.info("ledger link: connected to %s:%s", address["host"], address["port"])

    def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._connection is not None:
            self._connection.close(ConnectionError("the replica closed its ledger link"))
