"""``streamer record`` with ``feed.venue = "ccxt"`` records, and the recording replays faithfully.

Before, the ccxt adapter handed events to the daemon and no frame to the recorder, so a ccxt
recording was empty. Now every ccxt result the adapter acts on (markets, tickers, greeks) is
a JSON frame (``streamer.feeds.ccxt.frames``), recorded as it is parsed; a replay of the
file makes the very events the live run made: the same listings and the same quotes, field
by field (NaNs included), with the same receive times.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import streamer.feeds.ccxt.connection as ccxt_connection
from streamer.config import load_config
from streamer.daemon.replay import items_of
from streamer.daemon.service import Service
from streamer.events import Event, FeedStatus, InstrumentListed, Quote
from streamer.feeds.ccxt.connection import CcxtFeed
from streamer.feeds.ccxt.fake import FakeCcxtExchange
from streamer.feeds.ccxt.frames import CcxtFrames, is_ccxt_frame
from streamer.feeds.deribit.parser import DeribitParser
from streamer.feeds.recordings.reader import ReplayStats, read_recording
from streamer.feeds.recordings.recorder import Recorder
from streamer.feeds.recordings.replay_feed import ReplayFeed
from tests.conftest import REPO, UNIT
from tests.test_ccxt_feed import OKX_GREEKS, okx_markets, ticker_for


def _fake() -> FakeCcxtExchange:
    markets = okx_markets()
    btc, eth, btc2 = markets[0], markets[1], markets[2]
    batches = [
        {btc["symbol"]: ticker_for(btc, "0.049", 1733011201000)},
        {
            btc2["symbol"]: ticker_for(btc2, "0.02", 1733011202000),
            eth["symbol"]: ticker_for(eth, "0.1", 1733011202000),  # not followed
        },
        {btc["symbol"]: ticker_for(btc, "0.05", 1733011203000)},
    ]
    return FakeCcxtExchange("okx", markets, batches, greeks_batches=[{btc["symbol"]: OKX_GREEKS}])


def same(a: Event, b: Event) -> bool:
    """Field by field, NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b), strict=True):
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            continue
        if x != y:
            return False
    return True


async def live_events(tmp: Path) -> tuple[list[Event], Path]:
    """A ccxt feed on the fake exchange, recorded; its market events and the recording."""
    with Recorder(tmp, venue="okx", compression="zst") as rec:
        feed = CcxtFeed(
            "okx", ["BTC"], exchange_factory=_fake().factory, greeks_interval_s=3600,
            on_frame=rec.write,
        )  # fmt: skip
        got: list[Event] = []
        with contextlib.suppress(TimeoutError):
            async with contextlib.aclosing(feed.events()) as events, asyncio.timeout(2 * UNIT):
                async for ev in events:
                    got.append(ev)
    return [e for e in got if not isinstance(e, FeedStatus)], rec.paths[0]


async def test_ccxt_frames_are_recorded_and_replay_to_the_same_events(tmp_path: Path) -> None:
    live, path = await live_events(tmp_path)
    kinds = [type(e).__name__ for e in live]
    assert kinds.count("InstrumentListed") == 2 and kinds.count("Quote") == 4
    stats = ReplayStats()
    frames = list(read_recording(path, stats=stats))
    assert not stats.bad_lines and all(is_ccxt_frame(f) for _, _, f in frames)
    assert [json.loads(f)["ccxt"] for _, _, f in frames] == [
        "markets", "greeks", "tickers", "tickers", "tickers",
    ]  # fmt: skip
    assert all(v == "okx" for _, v, _ in frames)
    # read back through the ccxt mapping: the same events, the same receive times
    replayed = [ev for _, ev in CcxtFrames().events_of(frames)]
    assert len(replayed) == len(live)
    assert all(same(a, b) for a, b in zip(live, replayed, strict=True))
    # streamer replay's reader and the ReplayFeed read it the same way
    via_replay = [ev for _, ev in items_of([str(path)])]
    assert not any(isinstance(ev, str | bytes) for ev in via_replay)  # events, not frames
    assert all(same(a, b) for a, b in zip(live, via_replay, strict=True))  # type: ignore[arg-type]
    feed = ReplayFeed([str(path)], parser=DeribitParser())
    via_feed = [ev async for ev in feed.events() if not isinstance(ev, FeedStatus)]
    assert len(via_feed) == len(live) and all(
        same(a, b) for a, b in zip(live, via_feed, strict=True)
    )


async def test_streamer_record_mode_with_ccxt_writes_the_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record-only service on ``feed.venue = "ccxt"``, its feed from ``open_feed``
    (the real wiring; only the exchange is the fake)."""
    fake = _fake()
    monkeypatch.setattr(ccxt_connection, "ccxt_exchange_factory", lambda *a: fake.factory)
    cfg = load_config(None)
    cfg = dataclasses.replace(
        cfg,
        feed=dataclasses.replace(cfg.feed, venue="ccxt", ccxt_exchange="okx", currencies=("BTC",)),
        recorder=dataclasses.replace(cfg.recorder, dir=str(tmp_path)),
        publish=dataclasses.replace(cfg.publish, urls=()),
    )
    service = Service(cfg, record_only=True)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop, signals=False))
    async with asyncio.timeout(30 * UNIT):
        while service._frames_seen < 4:  # markets, greeks and the tickers
            await asyncio.sleep(0.02)
    stop.set()
    assert await asyncio.wait_for(task, 10 * UNIT) == 0
    (path,) = tmp_path.glob("okx-*.jsonl.zst")
    frames = list(read_recording(path))
    assert len(frames) == service._frames_seen >= 4
    listed = [e for _, e in items_of([str(path)]) if isinstance(e, InstrumentListed)]
    assert len(listed) == 2
    quotes = [e for _, e in items_of([str(path)]) if isinstance(e, Quote)]
    assert quotes and all(q.venue == "okx" for q in quotes)


def test_streamer_replay_reads_a_ccxt_recording(tmp_path: Path) -> None:
    _, path = asyncio.run(live_events(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "streamer", "replay", str(path), "--model", "none"],
        cwd=REPO, capture_output=True, text=True, timeout=120 * UNIT, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "6 events" in out.stderr  # 2 listings + 4 quotes, through the ccxt mapping


def test_a_bad_ccxt_frame_is_counted_not_raised() -> None:
    frames = CcxtFrames()
    lines: list[tuple[int, str, Any]] = [
        (1, "okx", '{"ccxt":"tickers","tickers":{}}'),
        (2, "okx", '{"ccxt":"nonsense"}'),
        (3, "okx", '{"ccxt":'),
        (4, "okx", '{"ccxt":"markets","exchange":"okx","underlyings":["BTC"],"markets":{}}'),
    ]
    assert frames.events_of(lines) == []
    assert dict(frames.drops) == {"not_ccxt": 1, "bad_json": 1, "no_options": 1}
