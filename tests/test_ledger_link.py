"""The socket between a gateway replica and the episode ledger (gateway.ledger_link): a real ledger actor on the
suite's Ray, the replica's `LedgerLink` in this process; and the link's server on its own for what a ledger cannot
be made to do on cue (answer late, or out of order)."""

from __future__ import annotations

import asyncio
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

            async def before_the_kill() -> tuple[list[int], list[int], int]:
                link = LedgerLink(ledger, settings.ledger_timeout_s)
                first = await link.call("record_call", "solo", _served("a"))
                await _connected(link)
                sent = [await link.call("record_call", "solo", _served(str(i))) for i in range(3)]
                crowd = await asyncio.gather(*(link.call("record_call", f"e{i}", _served("b")) for i in range(40)))
                over_socket = (await link.call("stats"))["link_calls"]
                link.close()
                return [first["step"]] + [a["step"] for a in sent], [a["step"] for a in crowd], over_socket

            steps, crowd, over_socket = asyncio.run(before_the_kill())
            assert steps == [0, 1, 2, 3] and crowd == [0] * 40
            assert over_socket == 3 + 40  # the first call went through the actor, every later one not

            async def across_the_kill() -> tuple[type, dict[str, Any], int]:
                link = LedgerLink(ledger, settings.ledger_timeout_s)
                await link.call("stats")
                await _connected(link)
                pid = await ledger.__ray_call__.remote(lambda _: os.getpid())
                # an annotation waits for its store; the ledger dies before or while answering it
                in_flight = asyncio.ensure_future(link.call("annotate", "solo", "price 0.4", {"order": "buy"}, 0.25))
                await asyncio.sleep(0)
                os.kill(pid, signal.SIGKILL)
                try:
                    await in_flight
                    failed: type = type(None)
                except Exception as exc:
                    failed = type(exc)
                while True:  # as a client would on its 503s: until the restarted ledger answers
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
            assert after["step"] == 4 + (failed is type(None)), after  # read back from the database: no step lost
            assert over_socket >= 1  # the new life's socket took the calls after it was found
        finally:
            ray.kill(ledger, no_restart=True)


def test_a_foreign_peer_gets_nothing_and_late_answers_reach_only_their_own_callers():
    """A wrong token, a request for a method the ledger does not offer, a frame of absurd size: each refused,
    and the link serves on. Answers finish out of order and each reaches its caller; a call past its deadline
    raises TimeoutError and closes that connection (the next calls go through the actor until it is back)."""
    from gateway.ledger_link import MAX_FRAME_BYTES, LinkError, _Connection, _frame, _read_frame, serve_link

    answered: list[str] = []

    async def answer(method: str, args: list[Any]) -> Any:
        await asyncio.sleep(args[0])
        answered.append(args[1])
        return {"echo": args[1]}

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
        reader, writer = await connect(link.token)
        writer.write((MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
        assert await asyncio.wait_for(_read_frame(reader), 5) == "ok"
        assert await asyncio.wait_for(reader.read(1), 5) == b""  # closed: the link does not wait for 256 MB

        reader, writer = await connect(link.token)
        assert await _read_frame(reader) == "ok"
        connection = _Connection(reader, writer)
        calls = [(i, 0.3 - 0.1 * i, f"c{i}") for i in range(3)]  # the last sent finishes first
        answers = await asyncio.gather(
            *(connection.call("slow", _frame([i, "slow", [delay, tag]]), i, 5) for i, delay, tag in calls)
        )
        assert answers == [{"echo": tag} for _, _, tag in calls] and answered == ["c2", "c1", "c0"]
        with pytest.raises(LinkError, match="'forbidden' is not a ledger call"):
            await connection.call("forbidden", _frame([7, "forbidden", []]), 7, 5)
        with pytest.raises(TimeoutError):
            await connection.call("slow", _frame([8, "slow", [1.0, "late"]]), 8, 0.2)
        assert await connection.call("slow", _frame([9, "slow", [0, "next"]]), 9, 5) == {"echo": "next"}
        await asyncio.sleep(1.0)  # the late answer arrives for a caller that is gone, and is dropped
        assert not connection.closed and "late" in answered and "intruder" not in answered
        assert link.calls == 5
        connection.close(ConnectionError("done"))
        link.close()

    asyncio.run(scenario())
