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
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 256 * 1024 * 1024
"""A frame announcing more than this is a broken or foreign peer: its connection is closed. A replica sends a
call that would exceed it through the actor."""
MAX_TOKEN_FRAME_BYTES = 64
"""Before its token is accepted, a peer may send no frame larger than this."""
MAX_UNAUTHENTICATED = 256
"""Connections that have not yet sent their token, at once; more are closed at once (their replicas go through
the actor and try again)."""
MAX_IN_FLIGHT_PER_CONNECTION = 4096
"""Calls one connection may have running in the ledger; the link stops reading it until one finishes."""
CONNECT_TIMEOUT_S = 2.0
"""Deadline to open the connection and have the token accepted."""
RECONNECT_PAUSE_S = (1.0, 60.0)
"""After a failed connection, calls go through the actor for the first pause before the next try, doubling
with each failure in a row up to the second."""


class LinkError(RuntimeError):
    """The ledger raised while answering a call sent over the link (its message names the error)."""


def _frame(payload: Any) -> bytes:
    body = msgpack.packb(payload, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


async def _read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME_BYTES) -> Any:
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > limit:
        raise ConnectionError(f"a frame of {size} bytes, over the link's {limit}")
    return msgpack.unpackb(await reader.readexactly(size), raw=False, strict_map_key=False)


def _keep_alive(writer: asyncio.StreamWriter) -> None:
    """TCP keepalives: a peer whose machine vanished without closing the socket is noticed in about 30 s."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


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
    _tasks: set[asyncio.Task] = field(default_factory=set)  # calls running: held, so none is collected mid-way

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
    unauthenticated = 0

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal unauthenticated
        assert link is not None
        if unauthenticated >= MAX_UNAUTHENTICATED:
            log.warning("ledger link: %d connections without a token yet; closed %s", unauthenticated, _peer(writer))
            writer.close()
            return
        link._connections.add(writer)
        unauthenticated += 1
        authenticated = False
        room = asyncio.Semaphore(MAX_IN_FLIGHT_PER_CONNECTION)
        try:
            hello = await asyncio.wait_for(_read_frame(reader, MAX_TOKEN_FRAME_BYTES), CONNECT_TIMEOUT_S)
            if not isinstance(hello, str) or not hmac.compare_digest(hello, token):
                log.warning("ledger link: a connection from %s sent a wrong token; closed", _peer(writer))
                return
            authenticated = True
            unauthenticated -= 1
            _keep_alive(writer)
            writer.write(_frame("ok"))
            while True:
                request = await _read_frame(reader)
                await room.acquire()  # a peer that floods calls waits here, with the socket unread
                task = asyncio.create_task(_respond(request, writer))
                link._tasks.add(task)
                task.add_done_callback(link._tasks.discard)
                task.add_done_callback(lambda _: room.release())
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                log.warning("ledger link: connection from %s ended inside a frame", _peer(writer))
        except Exception as exc:  # a broken or foreign peer: its connection ends, the ledger goes on
            log.warning("ledger link: connection from %s ended (%s: %s)", _peer(writer), type(exc).__name__, exc)
        finally:
            if not authenticated:
                unauthenticated -= 1
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
            log.exception("ledger link: call %s from %s failed", call_id, _peer(writer))
            reply = [call_id, None, f"{type(exc).__name__}: {str(exc)[:1000]}"]
        if writer.is_closing():
            return
        try:
            frame = _frame(reply)
            if len(frame) - 4 > MAX_FRAME_BYTES:
                raise ValueError(f"{len(frame) - 4} bytes, over the link's {MAX_FRAME_BYTES}")
        except Exception as exc:  # an answer the link cannot carry: say so rather than leave the caller waiting
            frame = _frame([call_id, None, f"the ledger's answer cannot be sent ({type(exc).__name__}: {exc})"])
        try:
            writer.write(frame)
            await asyncio.wait_for(writer.drain(), write_timeout_s)
        except (OSError, TimeoutError) as exc:
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
        self._stream = reader
        self._writer = writer
        self._pending: dict[int, asyncio.Future] = {}
        self.closed = False
        self.retired = False
        self._reader = asyncio.create_task(self._read(reader))

    @property
    def usable(self) -> bool:
        """Open, not retired, and not already told by the ledger that it closed (before the reader saw it)."""
        return not (self.closed or self.retired or self._stream.at_eof() or self._writer.is_closing())

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
                if self.retired and not self._pending:
                    break
        except Exception as exc:  # closed, reset, or a frame that is not the ledger's: the connection is over
            why = ConnectionError(f"the ledger link closed ({type(exc).__name__}: {exc})")
        finally:
            self.close(why)

    def retire(self) -> None:
        """Take no new calls; close once the calls in flight have their answers or pass their deadlines."""
        self.retired = True
        if not self._pending:
            self.close(ConnectionError("the ledger link was retired"))

    def close(self, why: Exception) -> None:
        self.closed = True
        self._writer.close()
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(why)
        self._pending.clear()

    async def call(self, frame: bytes, call_id: int, timeout_s: float) -> Any:
        waiter = asyncio.get_running_loop().create_future()
        self._pending[call_id] = waiter
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    self._writer.write(frame)
                    await self._writer.drain()
                except OSError as exc:  # unreachable, reset: whether the ledger got the call is unknown
                    raise ConnectionError(f"the ledger link failed ({type(exc).__name__}: {exc})") from None
                return await waiter
        finally:
            self._pending.pop(call_id, None)
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # retrieved: a caller that left by another error does not leave it unread
            if self.retired and not self._pending:
                self.close(ConnectionError("the ledger link was retired"))


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
        self._failures = 0  # failed connections in a row
        self._next_id = 0

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.usable

    async def call(self, method: str, *args: Any) -> Any:
        """The ledger's answer to `method(*args)`; TimeoutError past the deadline, ConnectionError if the
        socket closed with the call sent, RayActorError if the actor is gone, LinkError if the ledger raised."""
        if self.connected:
            assert self._connection is not None
            self._next_id += 1
            try:
                frame: bytes | None = _frame([self._next_id, method, list(args)])
            except Exception:  # a value msgpack cannot carry: nothing was sent, so the actor takes this one
                frame = None
            if frame is not None and len(frame) - 4 <= MAX_FRAME_BYTES:
                connection = self._connection
                try:
                    return await connection.call(frame, self._next_id, self._timeout_s)
                except TimeoutError:
                    # A ledger that went silent (its node gone without closing the socket, or wedged): the next
                    # calls go through the actor, which knows whether it lives, and the socket is asked for anew;
                    # the calls in flight on this one still get their answers, or reach their own deadlines.
                    connection.retire()
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
        writer = None
        try:
            address = await asyncio.wait_for(self._ledger.link.remote(), self._timeout_s)
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(address["host"], address["port"])
                _keep_alive(writer)
                writer.write(_frame(address["token"]))
                if await _read_frame(reader) != "ok":
                    raise ConnectionError("the ledger refused the token")
        except BaseException as exc:
            if writer is not None:
                writer.close()
            if not isinstance(exc, Exception):  # cancelled by close()
                raise
            first, most = RECONNECT_PAUSE_S
            pause = min(most, first * 2**self._failures)
            self._failures += 1
            self._next_try = time.monotonic() + pause
            log.log(
                logging.WARNING if self._failures == 1 else logging.DEBUG,
                "no socket to the episode ledger (%s: %s); calls go through its actor, next try in %.0f s",
                type(exc).__name__, str(exc)[:300], pause,
            )  # fmt: skip
            return
        self._failures = 0
        self._connection = _Connection(reader, writer)
        log.info("ledger link: connected to %s:%s", address["host"], address["port"])

    def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._connection is not None:
            self._connection.close(ConnectionError("the replica closed its ledger link"))
