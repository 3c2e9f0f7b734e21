"""Replay: recorded feeds through the live code path, inline and deterministic.

Inputs: recordings (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: raw frames through the Deribit
parser and the book's fused path, as live), cryptofeed captures, and Tardis ``options_chain``
CSV(.gz) files (normalized events). Frames go parse -> book -> trigger -> calibrate ->
publish, fitting inline whenever the trigger says so (the clock is the recording's receive
time, so every run makes the same fits), as fast as possible or paced at ``speed`` times real
time. No models: parse + book only. ``streamer replay`` (``streamer.cli.replay``) is the
command; ``summary_table`` its closing table.

Nothing is lost silently: before the first frame each MQTT publisher's first connection
attempt is awaited (``BROKER_CHECK_S``), and a broker that refuses us (credentials, ACL, TLS)
raises ``PublishError`` naming it; after the publishers close, messages left undelivered (a
broker that never came up) raise ``PublishError`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from streamer.config import Config
from streamer.daemon.pipeline import Pipeline, run_inline
from streamer.events import Event
from streamer.feeds.recordings.reader import Frame
from streamer.publish.payloads import retopic
from streamer.publish.urls import from_url

Item = tuple[int, "str | bytes | Event"]
BROKER_CHECK_S = 10.0


def items_of(paths: Sequence[str]) -> Iterator[Item]:
    """Everything in ``paths``, in order: frames of recordings, events of Tardis CSVs."""
    for frames, events in batches_of(paths):
        if frames is not None:
            for ts_ns, _venue, frame in frames:
                yield ts_ns, frame
        else:
            yield from events


Batch = tuple["list[Frame] | None", "list[tuple[int, Event]]"]
"""``(frames, None-or-[])``: a block of a recording's frames, or ``(None, events)`` of a CSV."""


def batches_of(paths: Sequence[str]) -> Iterator[Batch]:
    """``items_of`` in blocks: ``(frames, [])`` for a block of ``(ts_ns, venue, frame)`` of a
    recording or capture, ``(None, events)`` for a Tardis CSV's ``(ts_ns, event)``."""
    from streamer.feeds.recordings.reader import read_frame_batches
    from streamer.feeds.recordings.tardis import read_tardis_options_chain, sorted_by_time

    for path in paths:
        name = path.lower()
        if name.endswith((".csv", ".csv.gz")):
            yield None, list(sorted_by_time(read_tardis_options_chain(path)))
        else:
            for frames in read_frame_batches(path):
                yield frames, []


async def replay(
    files: Sequence[str],
    config: Config,
    *,
    models: Sequence[str],
    urls: Sequence[str],
    greeks: bool = True,
    speed: float | None = None,
    progress: bool = False,
) -> str:
    """Replay ``files`` through a pipeline built from ``config`` into publishers of
    ``urls``; returns the summary table. ``models`` empty: parse + book only."""
    pipeline = Pipeline.from_config(config, models=models, greeks=config.publish.greeks and greeks)
    t0 = time.perf_counter()
    published = 0
    bar = _Progress(enabled=progress)
    async with contextlib.AsyncExitStack() as stack:
        pubs = [
            await stack.enter_async_context(
                from_url(u, instance=config.instance, prefix_default=config.publish.prefix)
            )
            for u in urls
        ]
        for pub in pubs:
            check = getattr(pub, "check_broker", None)
            if check is not None:
                await check(BROKER_CHECK_S)
        counter = _Counted(_paced(items_of(files), speed))
        items: Iterator[Item] = iter(counter)
        if not models and speed is None:
            # parse + book only, as fast as possible: blocks of frames straight into the
            # fused path (no generator layer or call per frame)
            parse_batch, on_event = pipeline.fast.parse_batch, pipeline.on_event
            for frames, events in batches_of(files):
                if frames is not None:
                    parse_batch(frames, on_event)
                    counter.n += len(frames)
                else:
                    for _, ev in events:
                        on_event(ev)
                    counter.n += len(events)
                bar.tick(pipeline.parser.frames)
        elif not models:
            for ts_ns, item in items:
                if isinstance(item, str | bytes):
                    pipeline.on_frame(item, ts_ns)
                else:
                    pipeline.on_event(item)
                bar.tick(pipeline.parser.frames)
        else:
            for batch in run_inline(pipeline, items):
                for msg in batch:
                    for pub in pubs:
                        topic = retopic(msg.topic, pipeline.prefix, pub.prefix)
                        await pub.deliver(topic, msg.payload, clear=msg.clear)
                    published += 1
                bar.tick(pipeline.parser.frames)
                await asyncio.sleep(0)  # let network publishers breathe
    bar.done()
    for pub in pubs:
        undelivered = getattr(pub, "undelivered_error", None)
        if undelivered is not None and (error := undelivered()) is not None:
            raise error
    for book in pipeline.books:
        book.snapshot()  # count the final filters
    return summary_table(pipeline, time.perf_counter() - t0, published, counter.n)


def _paced(items: Iterator[Item], speed: float | None) -> Iterator[Item]:
    if speed is None:
        yield from items
        return
    first: int | None = None
    start = time.monotonic_ns()
    for ts_ns, item in items:
        if first is None:
            first = ts_ns
        delay = start + (ts_ns - first) / speed - time.monotonic_ns()
        if delay > 0:
            time.sleep(delay / 1e9)
        yield ts_ns, item


class _Progress:
    """A one-line progress indicator on stderr (terminals only)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.last = 0.0

    def tick(self, frames: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < 0.2:
            return
        self.last = now
        rate = frames / max(now - self.t0, 1e-9)
        sys.stderr.write(f"\r  {frames:>10,} frames  {rate:>10,.0f} frames/s")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 50 + "\r")
            sys.stderr.flush()


class _Counted:
    """Counts the items it passes on (frames, or events of Tardis CSVs)."""

    def __init__(self, items: Iterator[Item]) -> None:
        self.items = items
        self.n = 0

    def __iter__(self) -> Iterator[Item]:
        for item in self.items:
            self.n += 1
            yield item


def summary_table(pipeline: Any, seconds: float, published: int, items: int = 0) -> str:
    """Frames, drops, and per model: fits, quality and time (a Markdown-ish table)."""
    st = pipeline.stats()
    frames = st["frames"]
    events = items - frames
    what = f"{frames:,} frames" + (f" and {events:,} events" if events > 0 else "")
    lines = [
        f"replayed {what} in {seconds:.2f} s ({max(items, frames) / max(seconds, 1e-9):,.0f}/s), "
        f"published {published:,} messages",
    ]
    if st["parse_drops"]:
        lines.append(f"parser drops: {st['parse_drops']}")
    if st["book_drops"]:
        lines.append(f"book filters (last snapshot): {st['book_drops']}")
    if pipeline.quality:
        lines.append("")
        lines.append(
            "| model | fits | failed | in_band | rmse_iv (vol pts) | fit ms p50 | fit ms p95 |"
            " warm | regime shifts |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in pipeline.models:
            q = pipeline.quality.get(name, [])
            arr = np.array([r[:3] for r in q], dtype=np.float64).reshape(-1, 3)
            warm = sum(1 for r in q if r[3])
            shifts = sum(1 for r in q if r[4])

            def med(col: int, arr: np.ndarray = arr) -> float:
                v = arr[:, col]
                v = v[np.isfinite(v)]
                return float(np.median(v)) if v.size else math.nan

            p95 = float(np.percentile(arr[:, 2], 95)) if len(arr) else math.nan
            lines.append(
                f"| {name} | {pipeline.fits.get(name, 0)} | {pipeline.failed.get(name, 0)} | "
                f"{med(0):.3f} | {med(1) * 100:.3f} | {med(2):.2f} | {p95:.2f} | "
                f"{warm} | {shifts} |"
            )
    return os.linesep.join(lines)
