"""The one reader of the OpenAI app's streams (raypd/server/openai_streams.py), over the engine
loop's RequestStream fed by a producer thread: no JAX, no HTTP.

Guards against: a notification lost between the producer's put and the event loop's read (a
stream that hangs until its deadline); one event-loop wake-up per token per stream (what made
a thread per stream cost half the tokens/s at 32 streams); outputs out of order; a cancelled
or expired request whose streams are not aborted (pages held until they finish).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import pytest

from raypd.engine.api import FINISH_LENGTH, TokenOutput
from raypd.server.engine_loop import RequestStream
from raypd.server.openai_protocol import ApiError
from raypd.server.openai_streams import Choices, Reader


class Stream(RequestStream):
    """A RequestStream (what the engine loop fills) that records its abort."""

    def __init__(self, request_id: str):
        super().__init__(request_id, time.perf_counter())
        self.num_aborts = 0

    def abort(self) -> None:
        self.num_aborts += 1


def produce(streams, num_tokens: int, step_s: float = 0.0) -> threading.Thread:
    """Like the engine loop: each step puts one token into every stream, from another thread."""
    def run():
        for j in range(num_tokens):
            for s in streams:
                s.put(TokenOutput(s.request_id, j, -0.5, FINISH_LENGTH if j == num_tokens - 1 else None, f"<{j}>"))
            if step_s:
                time.sleep(step_s)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


async def collect(choices: Choices) -> list[list[int]]:
    async for _ in choices.events():
        pass
    return [c.token_ids for c in choices.items]


def test_every_token_of_every_stream_arrives_in_order_with_few_wakeups():
    async def main():
        loop = asyncio.get_running_loop()
        reader = Reader(loop)
        runs = 0
        run = reader._run

        def counted():
            nonlocal runs
            runs += 1
            run()
        reader._run = counted
        with futures.ThreadPoolExecutor(2) as ex:
            streams = [Stream(f"r{i}") for i in range(32)]
            choices = Choices(streams, reader, ex, timeout_s=60)
            producer = produce(streams, 50, step_s=0.002)
            got = await asyncio.wait_for(collect(choices), 60)
            producer.join(10)
        assert got == [list(range(50))] * 32
        assert all(c.finish_reason == "length" and c.text == "".join(f"<{j}>" for j in range(50))
                   for c in choices.items)
        assert all(s.num_aborts == 0 for s in streams)  # all finished: nothing to abort
        return runs

    runs = asyncio.run(main())
    # 32 x 50 tokens: many per wake-up of the event loop (a thread per stream: one wake-up per token)
    assert runs <= 32 * 50 // 4, runs


def test_outputs_that_arrived_before_the_reader_watched_are_read():
    async def main():
        with futures.ThreadPoolExecutor(1) as ex:
            s = Stream("early")
            produce([s], 3).join(10)  # all three tokens are queued before anyone watches
            return await asyncio.wait_for(collect(Choices([s], Reader(asyncio.get_running_loop()), ex, 60)), 10)

    assert asyncio.run(main()) == [[0, 1, 2]]


def test_cancel_aborts_the_unfinished_streams_only():
    async def main():
        with futures.ThreadPoolExecutor(1) as ex:
            done, running = Stream("done"), Stream("running")
            choices = Choices([done, running], Reader(asyncio.get_running_loop()), ex, 60)
            produce([done], 2).join(10)
            running.put(TokenOutput("running", 7, -1.0))
            events = choices.events()
            seen = [await events.__anext__() for _ in range(2)]  # whatever order they came in
            assert sorted(i for i, _ in seen) == [0, 1] or len(seen) == 2
            choices.cancel()
            with pytest.raises(ApiError) as e:
                while True:
                    await events.__anext__()
            assert e.value.status == 499
        return done.num_aborts, running.num_aborts

    assert asyncio.run(main()) == (0, 1)


def test_deadline_is_a_504_and_aborts():
    async def main():
        with futures.ThreadPoolExecutor(1) as ex:
            s = Stream("slow")
            choices = Choices([s], Reader(asyncio.get_running_loop()), ex, timeout_s=0.05)
            with pytest.raises(ApiError) as e:
                await asyncio.wait_for(collect(choices), 10)
        return e.value, s.num_aborts

    err, aborts = asyncio.run(main())
    assert err.status == 504 and err.code == "deadline_exceeded" and "slow" in err.message and aborts == 1


def test_a_stream_error_ends_the_request():
    async def main():
        with futures.ThreadPoolExecutor(1) as ex:
            s = Stream("bad")
            choices = Choices([s], Reader(asyncio.get_running_loop()), ex, 60)
            s.put(ValueError("max_tokens must be >= 1"))
            with pytest.raises(ApiError) as e:
                await asyncio.wait_for(collect(choices), 10)
        return e.value

    err = asyncio.run(main())
    assert err.status == 400 and err.param == "max_tokens"
