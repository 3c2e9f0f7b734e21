"""Live receive loop benchmark: frames/s of the real ``DeribitFeed`` against the fake server.

The fake Deribit server (``streamer.feeds.deribit.fake.FakeDeribitServer``, the real JSON-RPC
protocol on loopback) runs in a process of its own, so its work (encoding and sending every
frame) is not on the client's core. It lists a full real BTC+ETH option chain (the shared
``snapshots/deribit_options_snapshot_*.csv`` cuts turned into ``ticker`` notifications by
``../shared/tools/csv_to_replay.py``, ~1,350 options) and, once the client has subscribed,
pushes those tickers round after round as fast as it can (``interval_s=0``).

The client is what the daemon runs: ``DeribitFeed`` (websockets, heartbeats, subscriptions)
parsing with the book's fused path (``FastPath``), its events applied to the books (first
sights; fused tickers are already written). Measured over ``--frames`` frames after a warm-up
round: wall-clock frames/s (bounded by whichever side is slower) and the client's CPU time
per frame (``time.process_time``: only this process), whose inverse is the rate one core of
the client could keep up with. Compared with Deribit's peak for these chains: every option's
``ticker.{instrument}.100ms`` channel sends at most one notification per 100 ms, so ~1,350
options give at most ~13,500 frames/s (Deribit API v2 docs, "Subscriptions": ``100ms``
intervals; the option count is the shared chain's). Skips (exit 0) without the shared data.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

from streamer.book.book import Books
from streamer.book.fastpath import FastPath
from streamer.events import BookChanged
from streamer.feeds.deribit.connection import DeribitFeed
from streamer.feeds.deribit.parser import DeribitParser
from streamer.paths import shared_root

SHARED = shared_root()
TOOL = "tools/csv_to_replay.py"
SNAPSHOT = "data/deribit/snapshots/deribit_options_snapshot_20260105T041127Z.csv"
TICKER_INTERVAL_S = 0.1  # ticker.{instrument}.100ms: at most one notification per 100 ms


def _script(recording: Path) -> tuple[list[dict[str, Any]], list[tuple[str, dict[str, Any]]]]:
    """Instruments (get_instruments dicts) and (channel, data) of a ticker recording."""
    from streamer.feeds.deribit.fake import instrument_from_name

    frames: list[tuple[str, dict[str, Any]]] = []
    names: dict[str, dict[str, Any]] = {}
    for line in recording.read_bytes().splitlines():
        data = orjson.loads(orjson.loads(line)["frame"])["params"]["data"]
        name = data["instrument_name"]
        if name not in names:
            inst = instrument_from_name(name)
            if inst is None:
                continue
            names[name] = inst
        frames.append((f"ticker.{name}", data))
    return list(names.values()), frames


def _serve(recording: str, conn: Connection) -> None:
    """The server process: serve the chain's tickers round after round until told to stop."""
    from streamer.daemon import logs
    from streamer.feeds.deribit.fake import FakeDeribitServer, ScriptFrame

    logs.configure("error")
    instruments, frames = _script(Path(recording))
    script = [ScriptFrame(ch, data) for ch, data in frames]
    n_channels = len(instruments) + 4  # + instrument.state and price index, BTC and ETH

    async def main() -> None:
        server = FakeDeribitServer(
            instruments=instruments,
            script=script,
            loops=None,
            interval_s=0.0,
            start_when=lambda c: len(c.subscribed) >= n_channels,
        )
        async with server:
            conn.send(server.url)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, conn.recv)  # the parent's stop

    asyncio.run(main())


@dataclass(frozen=True)
class LiveResult:
    frames: int
    wall_s: float
    cpu_s: float
    fused: int
    options: int

    @property
    def per_s(self) -> float:
        return self.frames / self.wall_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.frames * 1e6


async def _client(url: str, warmup: int, frames: int) -> LiveResult:
    books = Books()
    parser = DeribitParser()
    fast = FastPath(parser, books)
    feed = DeribitFeed(url=url, currencies=("BTC", "ETH"), parser=fast)
    on_event = books.on_event
    t0 = c0 = 0.0
    start = hits = 0
    async with asyncio.timeout(300), contextlib.aclosing(feed.events()) as events:
        async for ev in events:
            if type(ev) is not BookChanged:
                on_event(ev)
            n = parser.frames
            if not start and n >= warmup:
                start, hits = n, fast.typed_hits
                t0, c0 = time.perf_counter(), time.process_time()
            elif start and n - start >= frames:
                break
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    options = sum(len(b) for b in books)
    return LiveResult(parser.frames - start, wall, cpu, fast.typed_hits - hits, options)


def run_live(recording: Path, frames: int, repeat: int) -> list[LiveResult]:
    """``repeat`` client runs against one server process."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(str(recording), child), daemon=True)
    server.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the fake server did not start")
        url = parent.recv()
        n_script = sum(1 for _ in recording.open("rb"))
        return [asyncio.run(_client(url, 2 * n_script, frames)) for _ in range(repeat)]
    finally:
        parent.send("stop")
        server.join(10)
        if server.is_alive():
            server.terminate()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="streamer bench live", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--shared", type=Path, default=SHARED, help="the shared folder (tool + data)")
    ap.add_argument("--frames", type=int, default=100_000, help="frames timed per run")
    ap.add_argument("--repeat", type=int, default=3, help="client runs (best kept)")
    args = ap.parse_args(argv)
    if not (args.shared / TOOL).exists() or not (args.shared / SNAPSHOT).exists():
        print(f"skipped: {args.shared / TOOL} or the snapshot CSV not found")
        return 0
    with tempfile.TemporaryDirectory(prefix="streamer-bench-live-") as tmp:
        rec = Path(tmp) / "chain.jsonl"
        cmd = [sys.executable, str(args.shared / TOOL), str(args.shared / SNAPSHOT), "-o", str(rec)]
        subprocess.run(cmd, check=True, capture_output=True)
        results = run_live(rec, args.frames, args.repeat)
    best = min(results, key=lambda r: r.cpu_us)
    fastest = max(results, key=lambda r: r.per_s)
    peak = best.options / TICKER_INTERVAL_S
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{best.options:,} options (BTC+ETH) subscribed; fake server in its own process")
    print()
    print("| measurement | value |")
    print("|---|---:|")
    print(f"| frames timed per run | {best.frames:,} |")
    print(f"| wall-clock frames/s (best of {len(results)}) | {fastest.per_s:,.0f} |")
    print(f"| client CPU µs/frame (best) | {best.cpu_us:.2f} |")
    print(f"| client capacity on one core (1 / CPU per frame) | {1e6 / best.cpu_us:,.0f} |")
    print(f"| fused by the typed decoder | {best.fused / best.frames:.1%} |")
    print(f"| Deribit peak: {best.options:,} options x 10/s (100 ms) | {peak:,.0f} |")
    print(
        f"- headroom over Deribit's peak: wall-clock {fastest.per_s / peak:.1f}x, "
        f"client capacity {1e6 / best.cpu_us / peak:.1f}x"
    )
    return 0
