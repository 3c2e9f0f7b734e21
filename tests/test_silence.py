"""The feed's per-session recv timeout (``_Silence``): what ``asyncio.timeout`` around each
``recv`` did, for a timer a session instead of one a frame."""

from __future__ import annotations

import asyncio

import pytest

from streamer.feeds.deribit.connection import _Silence
from tests.conftest import UNIT

AFTER = 0.05 * UNIT


async def _wait(silence: _Silence, fut: asyncio.Future[None]) -> str:
    task = asyncio.current_task()
    assert task is not None
    silence.start(task)
    try:
        await fut
    except asyncio.CancelledError:
        if silence.expired(task):
            return "expired"
        raise
    silence.stop(task)
    return "done"


def test_a_wait_longer_than_after_expires_and_leaves_no_cancel_behind() -> None:
    async def main() -> None:
        silence = _Silence(AFTER)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await _wait(silence, loop.create_future()) == "expired"
        assert loop.time() - t0 >= AFTER
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        await asyncio.sleep(0)  # not cancelled again
        silence.close()

    asyncio.run(main())


def test_frames_in_time_never_expire_even_long_after_the_first_timer() -> None:
    async def main() -> None:
        silence = _Silence(AFTER)
        loop = asyncio.get_running_loop()
        end = loop.time() + 4 * AFTER
        n = 0
        while loop.time() < end:  # waits of a quarter of AFTER each, for 4 x AFTER
            fut = loop.create_future()
            loop.call_later(AFTER / 4, fut.set_result, None)
            assert await _wait(silence, fut) == "done"
            n += 1
        assert n >= 8
        silence.close()

    asyncio.run(main())


def test_time_outside_recv_does_not_count() -> None:
    """The consumer may take longer than AFTER between frames: only waiting in recv counts."""

    async def main() -> None:
        silence = _Silence(AFTER)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fut.set_result(None)
        assert await _wait(silence, fut) == "done"
        await asyncio.sleep(2 * AFTER)  # busy elsewhere
        fut = loop.create_future()
        loop.call_later(AFTER / 2, fut.set_result, None)
        assert await _wait(silence, fut) == "done"
        silence.close()

    asyncio.run(main())


def test_someone_elses_cancel_propagates() -> None:
    async def main() -> None:
        silence = _Silence(10 * AFTER)
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(_wait(silence, loop.create_future()))
        await asyncio.sleep(AFTER / 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        silence.close()

    asyncio.run(main())
