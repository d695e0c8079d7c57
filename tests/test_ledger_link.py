"""The socket between a gateway replica and the episode ledger (gateway.ledger_link): a real ledger actor on the
suite's Ray, the replica's `LedgerLink` in this process; and the link's server on its own for what a ledger cannot
be made to do on cue (answer late, or out of order)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from typing import Any

import pytest

from recorder.config import DatabaseConfig
from tests.test_gateway import _database, _served

pytestmark = pytest.mark.slow


async def _connected(link: Any, wait_s: float = 30.0) -> None:
    """Until `link` has its socket up: it connects only when asked to call (the calls meanwhile go by the actor)."""
    deadline = time.monotonic() + wait_s
    while not link.connected:
        assert time.monotonic() < deadline, "the link did not connect"
        await link.call("describe", "nobody")
        await asyncio.sleep(0.1)


def test_calls_go_over_the_socket_once_it_is_up_and_through_the_actor_while_the_ledger_restarts(ray_session, tmp_path):
    """The first call goes through the actor while the socket connects; the rest over the socket, many in flight
    at once, each answered as its own (the steps of one episode in the order sent, none lost or doubled). kill -9
    of the ledger: a call in flight fails as a ConnectionError (whether it was recorded is unknown), the next calls
    go through the restarted actor, and the socket of its new life is found again."""
    import ray
    from ray.exceptions import RayActorError

    from gateway.config import GatewayConfig
    from gateway.ledger import start_ledger
    from gateway.ledger_link import LedgerLink

    settings = GatewayConfig(ledger_name="zg-link-ledger", flush_interval_s=0.1, ledger_timeout_s=60)
    with _database(tmp_path) as url:
        ledger = start_ledger(settings, DatabaseConfig(url=url))
        try:

            async def before_the_kill() -> tuple[list[int], list[dict[str, Any]], int]:
                link = LedgerLink(ledger, settings.ledger_timeout_s)
                first = await link.call("record_call", "solo", _served("a"))
                await _connected(link)
                sent = [await link.call("record_call", "solo", _served(str(i))) for i in range(3)]
                crowd = await asyncio.gather(*(link.call("record_call", f"e{i}", _served("b")) for i in range(40)))
                over_socket = (await link.call("stats"))["link_calls"]
                link.close()
                return [first["step"]] + [a["step"] for a in sent], crowd, over_socket

            steps, crowd, over_socket = asyncio.run(before_the_kill())
            assert steps == [0, 1, 2, 3]
            assert [(a["episode"], a["step"]) for a in crowd] == [(f"e{i}", 0) for i in range(40)]  # each its own
            assert over_socket == 3 + 40  # the first call went through the actor, every later one not

            async def across_the_kill() -> tuple[type, dict[str, Any], int]:
                link = LedgerLink(ledger, settings.ledger_timeout_s)
                await link.call("stats")
                await _connected(link)
                pid = await asyncio.wait_for(ledger.__ray_call__.remote(lambda _: os.getpid()), 60)
                # an annotation waits for its store; the ledger dies before or while answering it
                in_flight = asyncio.ensure_future(link.call("annotate", "solo", "price 0.4", {"order": "buy"}, 0.25))
                await asyncio.sleep(0)
                os.kill(pid, signal.SIGKILL)
                try:
                    await in_flight
                    failed: type = type(None)
                except Exception as exc:
                    failed = type(exc)
                deadline = time.monotonic() + 120
                while True:  # as a client would on its 503s: until the restarted ledger answers
                    assert time.monotonic() < deadline, "the ledger did not come back"
                    try:
                        await link.call("stats")
                        break
                    except (RayActorError, ConnectionError):
                        await asyncio.sleep(0.2)
                after = await link.call("record_call", "solo", _served("after"))
                await _connected(link)
                await link.call("record_call", "solo", _served("again"))
                over_socket = (await link.call("stats"))["link_calls"]
                link.close()
                return failed, after, over_socket

            failed, after, over_socket = asyncio.run(across_the_kill())
            assert failed in (ConnectionError, type(None)), failed  # answered before it died, or unknown
            assert after["step"] == 4, after  # the steps read back from the database: none lost, none doubled
            assert over_socket >= 1  # the new life's socket took the calls after it was found
        finally:
            ray.kill(ledger, no_restart=True)


def test_a_foreign_peer_gets_nothing_and_late_answers_reach_only_their_own_callers(monkeypatch):
    """A wrong token, a token frame of absurd size, more connections than allowed that never send a token, a
    request for a method the ledger does not offer, a frame of absurd size: each refused, and the link serves on.
    Answers finish out of order and each reaches its caller; a call past its deadline raises TimeoutError, and its
    answer, arriving late, reaches no one."""
    from gateway import ledger_link
    from gateway.ledger_link import (
        MAX_FRAME_BYTES,
        LinkError,
        _Connection,
        _frame,
        _read_frame,
        serve_link,
    )  # fmt: skip

    answered: list[str] = []

    async def answer(method: str, args: list[Any]) -> Any:
        await asyncio.sleep(args[0])
        answered.append(args[1])
        return {"echo": args[1]}

    monkeypatch.setattr(ledger_link, "MAX_UNAUTHENTICATED", 3)

    async def scenario() -> None:
        link = await serve_link(answer, frozenset({"slow"}), "127.0.0.1", write_timeout_s=5)

        async def connect(token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_connection(link.host, link.port)
            writer.write(_frame(token))
            return reader, writer

        reader, writer = await connect("not-the-token")
        writer.write(_frame([1, "slow", [0, "intruder"]]))
        with pytest.raises(asyncio.IncompleteReadError):
            await asyncio.wait_for(_read_frame(reader), 5)  # closed without an answer
        reader, writer = await asyncio.open_connection(link.host, link.port)  # a token frame of absurd size
        writer.write((100_000).to_bytes(4, "big") + b"x" * 64)
        # closed at once, not after waiting out the token's deadline (2 s) for the rest of the frame
        assert await _closed(reader, within_s=1)
        # connections that send no token take at most MAX_UNAUTHENTICATED places (3 here); a replica's gets in
        # once one of them has gone
        silent = [await asyncio.open_connection(link.host, link.port) for _ in range(3)]
        await asyncio.sleep(0.1)
        turned_away, _ = await connect(link.token)
        assert await _closed(turned_away, within_s=1)
        silent[0][1].close()
        await asyncio.sleep(0.1)
        reader, writer = await connect(link.token)
        assert await asyncio.wait_for(_read_frame(reader), 5) == "ok"
        for _, other in silent[1:]:
            other.close()
        writer.write((MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
        assert await _closed(reader, within_s=5)  # the link does not wait for 256 MB

        reader, writer = await connect(link.token)
        assert await _read_frame(reader) == "ok"
        connection = _Connection(reader, writer)
        calls = [(i, 0.3 - 0.1 * i, f"c{i}") for i in range(3)]  # the last sent finishes first
        answers = await asyncio.gather(
            *(connection.call(_frame([i, "slow", [delay, tag]]), i, 5) for i, delay, tag in calls)
        )
        assert answers == [{"echo": tag} for _, _, tag in calls] and answered == ["c2", "c1", "c0"]
        with pytest.raises(LinkError, match="'forbidden' is not a ledger call"):
            await connection.call(_frame([7, "forbidden", []]), 7, 5)
        with pytest.raises(TimeoutError):
            await connection.call(_frame([8, "slow", [1.0, "late"]]), 8, 0.2)
        assert await connection.call(_frame([9, "slow", [0, "next"]]), 9, 5) == {"echo": "next"}
        await asyncio.sleep(1.0)  # the late answer arrives for a caller that is gone, and is dropped
        assert not connection.closed and "late" in answered and "intruder" not in answered
        assert link.calls == 5
        connection.close(ConnectionError("done"))
        link.close()

    asyncio.run(scenario())


async def _closed(reader: asyncio.StreamReader, within_s: float) -> bool:
    """Whether the other end closed the connection (an end with our bytes unread resets it) within the time."""
    try:
        return await asyncio.wait_for(reader.read(1), within_s) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def slow_ledger(ray_session) -> Any:
    """A Ray actor that serves the link as the ledger does, with one call, `slow(delay_s, tag)`, that answers the tag
    after the delay and counts the calls that came through the actor rather than the socket."""
    import ray

    from gateway.ledger_link import serve_link

    @ray.remote
    class SlowLedger:
        def __init__(self) -> None:
            self.link_server: Any = None
            self.through_actor = 0

        async def link(self) -> dict[str, Any]:
            if self.link_server is None:
                answer = lambda method, args: self.answer(*args)  # noqa: E731
                self.link_server = await serve_link(answer, frozenset({"slow"}), "127.0.0.1", 5)
            return self.link_server.address

        async def answer(self, delay_s: float, tag: str) -> str:
            await asyncio.sleep(delay_s)
            return tag

        async def slow(self, delay_s: float, tag: str) -> str:
            self.through_actor += 1
            return await self.answer(delay_s, tag)

        def counts(self) -> dict[str, int]:
            return {"actor": self.through_actor, "socket": self.link_server.calls if self.link_server else 0}

    actor = SlowLedger.options(max_concurrency=100).remote()
    ray.get(actor.counts.remote(), timeout=60)  # started: the test's own deadlines are short
    yield actor
    ray.kill(actor)


def test_a_call_past_its_deadline_sends_the_next_ones_through_the_actor_and_spares_the_calls_in_flight(
    slow_ledger, monkeypatch
):
    """A ledger that stops answering one call over the socket: that call raises TimeoutError at its deadline, a
    call already in flight on the same connection still gets its answer, the calls after it go through the actor,
    the old connection closes once its calls are done, and a new socket is asked for. A call too large for a
    frame goes through the actor, and the socket stays up."""
    from gateway import ledger_link
    from gateway.ledger_link import LedgerLink

    async def connected(link: LedgerLink) -> None:
        deadline = time.monotonic() + 60
        while not link.connected:  # the link connects when asked to call
            assert time.monotonic() < deadline, "the link did not connect"
            await link.call("slow", 0, "probe")
            await asyncio.sleep(0.05)

    async def scenario() -> tuple[list[Any], list[dict[str, int]]]:
        link = LedgerLink(slow_ledger, timeout_s=4.0)
        await connected(link)
        start = await asyncio.wait_for(slow_ledger.counts.remote(), 30)
        old = link._connection
        assert old is not None
        stuck = asyncio.ensure_future(link.call("slow", 600, "stuck"))
        await asyncio.sleep(3.0)
        in_flight = asyncio.ensure_future(link.call("slow", 2.0, "in flight"))  # answered 1 s after stuck's deadline
        outcomes: list[Any] = []
        try:
            await stuck
        except TimeoutError:
            outcomes.append("timed out")
        assert not link.connected and not old.closed  # retired: "in flight" still waits on it
        outcomes.append(await link.call("slow", 0, "after"))  # through the actor
        outcomes.append(await in_flight)
        await asyncio.sleep(0)
        assert old.closed  # its last call answered
        middle = await asyncio.wait_for(slow_ledger.counts.remote(), 30)
        await connected(link)
        outcomes.append(await link.call("slow", 0, "over the new socket"))
        before_large = await asyncio.wait_for(slow_ledger.counts.remote(), 30)
        monkeypatch.setattr(ledger_link, "MAX_FRAME_BYTES", 1000)  # this side's limit only
        outcomes.append(len(await link.call("slow", 0, "x" * 5000)))
        assert link.connected
        end = await asyncio.wait_for(slow_ledger.counts.remote(), 30)
        link.close()
        return outcomes, [start, middle, before_large, end]

    outcomes, counts = asyncio.run(scenario())
    assert outcomes == ["timed out", "after", "in flight", "over the new socket", 5000]
    moved = [(b["actor"] - a["actor"], b["socket"] - a["socket"]) for a, b in itertools.pairwise(counts)]
    # "after" went through the actor and "in flight" was answered over the retired socket; "over the new socket"
    # (and any probes through the actor while it was found); the large call through the actor
    assert moved[0] == (1, 1) and moved[1][1] == 1 and moved[2] == (1, 0), moved
