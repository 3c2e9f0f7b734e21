"""A feed adapter that plays recordings: the live service's plug point, fed from files.

``ReplayFeed(paths, parser, speed=...)`` has the same ``events()`` async iterator as the
Deribit adapter, so ``streamer.daemon.service.Service`` runs unchanged on recorded data (for
latency measurements and service tests). Frames are parsed as they are released, and each
event's ``recv_ns`` is the local time of its release (not the recording's), so tick-to-publish
latencies measure this process. ``speed=None`` releases as fast as the consumer takes them
(yielding to the event loop every ``batch`` frames); ``speed=X`` paces by the recorded
receive times at X times real time; ``rate=N`` releases N frames per second whatever the
recorded times (for recordings whose frames share one timestamp, e.g. a chain snapshot).

A recording of the ccxt adapter (``streamer.feeds.ccxt.frames``: its first frame starts
``{"ccxt":``) is read through ``CcxtFrames`` instead of ``parser``, and its events keep the
recorded receive time as ``recv_ns`` (ccxt listings are checked against that clock).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence

from streamer.events import Event, FeedStatus
from streamer.feeds.base import Feed, FrameParser
from streamer.feeds.ccxt.frames import CcxtFrames, is_ccxt_frame
from streamer.feeds.recordings.reader import read_frames


class ReplayFeed(Feed):
    """Recorded frames as a live feed."""

    def __init__(
        self,
        paths: Sequence[str],
        *,
        parser: FrameParser,
        speed: float | None = None,
        rate: float | None = None,
        batch: int = 64,
        on_frame: Callable[[str, int], None] | None = None,
        venue: str = "deribit",
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.paths = list(paths)
        self.parser = parser
        self.speed = speed
        self.rate = rate
        self.batch = max(1, batch)
        self.on_frame = on_frame
        self.venue = venue
        self.clock_ns = clock_ns
        self.frames = 0
        self._file_start = 0  # frames released before the current file

    async def events(self) -> AsyncIterator[Event]:
        yield FeedStatus(self.venue, "connected", self.clock_ns(), detail="replay")
        first: int | None = None
        start = time.monotonic_ns()
        for path in self.paths:
            ccxt: CcxtFrames | None = None
            for ts_ns, _venue, frame in read_frames(path):
                if ccxt is None and self.frames == self._file_start and is_ccxt_frame(frame):
                    ccxt = CcxtFrames()
                due: float | None = None
                if self.rate is not None:
                    due = start + self.frames / self.rate * 1e9
                elif self.speed is not None:
                    if first is None:
                        first = ts_ns
                    due = start + (ts_ns - first) / self.speed
                delay = 0.0 if due is None else due - time.monotonic_ns()
                if delay > 0:
                    await asyncio.sleep(delay / 1e9)
                elif self.frames % self.batch == 0:  # behind the pace too: others get a turn
                    await asyncio.sleep(0)
                now = self.clock_ns()
                self.frames += 1
                if self.on_frame is not None:
                    self.on_frame(frame, now)
                if ccxt is not None:
                    for _, ev in ccxt.events_of([(ts_ns, _venue, frame)]):
                        yield ev
                    continue
                for ev in self.parser.parse(frame, now):
                    yield ev
            self._file_start = self.frames
        yield FeedStatus(self.venue, "disconnected", self.clock_ns(), detail="end of replay")
