"""``ReplayFeed`` shares the event loop: paced or not, ahead of its pace or behind it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from streamer.feeds.deribit.parser import DeribitParser
from streamer.feeds.recordings.replay_feed import ReplayFeed

N_FRAMES = 2_000


def _recording(path: Path) -> Path:
    with path.open("wb") as fh:
        for i in range(N_FRAMES):
            frame = {"jsonrpc": "2.0", "id": i, "result": "ok"}
            rec = {"ts_ns": 1_767_586_287_551_000_000 + i, "venue": "deribit"}
            fh.write(orjson.dumps(dict(rec, frame=orjson.dumps(frame).decode())) + b"\n")
    return path


@pytest.mark.parametrize(("rate", "speed"), [(None, None), (1e12, None), (None, 1e12)])
async def test_other_tasks_run_while_a_replay_streams(
    tmp_path: Path, rate: float | None, speed: float | None
) -> None:
    """A replay far behind its pace (``rate``/``speed`` beyond what the loop can do) still
    hands the loop over every ``batch`` frames: the daemon's fit workers and publishers run
    between its frames, as they do between a websocket's. (It used to yield only while
    ahead of its pace, so a bench at Deribit's peak rate starved every fit.)"""
    path = str(_recording(tmp_path / "r.jsonl"))
    feed = ReplayFeed([path], parser=DeribitParser(), rate=rate, speed=speed)
    turns = 0
    done = asyncio.Event()

    async def other() -> None:
        nonlocal turns
        while not done.is_set():
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other())
    await asyncio.sleep(0)
    turns = 0
    async for _ in feed.events():
        pass
    done.set()
    await task
    assert feed.frames == N_FRAMES
    assert turns >= N_FRAMES // feed.batch - 1
