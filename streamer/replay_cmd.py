"""``streamer replay FILE...``: recorded feeds through the live code path (DESIGN section 4).

Inputs: recordings (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: raw frames through the Deribit
parser), cryptofeed captures, and Tardis ``options_chain`` CSV(.gz) files (normalized events).
Frames go parse -> book -> trigger -> calibrate -> publish, fitting inline whenever the
trigger says so (the clock is the recording's receive time, so every run makes the same fits),
as fast as possible or paced with ``--speed X``. ``--model none`` runs parse + book only.

Messages go to every ``--publish URL`` (``mqtt://``, ``mqtts://``, ``jsonl:PATH``,
``jsonl:-``) and to ``--out FILE`` (short for ``--publish jsonl:FILE``); with neither, to the
config's ``publish.urls`` (the default config: stdout). A progress bar (on a terminal) and the
summary table go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamer.config import Config, load_config
from streamer.errors import StreamerError
from streamer.feeds.events import Event
from streamer.publish.payloads import retopic

Item = tuple[int, "str | bytes | Event"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``replay`` on an argparse subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "replay",
        help="replay recorded feeds through parse, book, calibration and publishing",
        description=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="recordings or Tardis CSV files")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="M",
        help="model to fit (repeatable; 'none' = parse + book only; default: the config's)",
    )
    p.add_argument(
        "--publish",
        action="append",
        default=[],
        metavar="URL",
        help="mqtt://[user:pass@]host:port[/prefix], mqtts://..., jsonl:PATH, jsonl:- (stdout)",
    )
    p.add_argument("--out", metavar="OUT.jsonl", help="short for --publish jsonl:OUT.jsonl")
    p.add_argument(
        "--speed", type=float, default=None, metavar="X", help="pace at X times real time"
    )
    p.add_argument("--config", metavar="C", help="TOML config (default: built-in defaults)")
    p.add_argument("--no-greeks", action="store_true", help="publish surfaces only")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=main)
    return p


def items_of(paths: Sequence[str]) -> Iterator[Item]:
    """Everything in ``paths``, in order: frames of recordings, events of Tardis CSVs."""
    from streamer.feeds.replay import read_frames
    from streamer.feeds.tardis import read_tardis_options_chain, sorted_by_time

    for path in paths:
        name = path.lower()
        if name.endswith((".csv", ".csv.gz")):
            yield from sorted_by_time(read_tardis_options_chain(path))
        else:
            for ts_ns, _venue, frame in read_frames(path):
                yield ts_ns, frame


def main(args: argparse.Namespace) -> int:
    """Run the command: 0 on success, 2 on bad arguments or config."""
    from streamer import logs

    try:
        config = load_config(args.config)
    except StreamerError as exc:
        print(f"streamer replay: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log.level, config.log.format)
    for f in args.files:
        if not Path(f).is_file():
            print(f"streamer replay: no such file: {f}", file=sys.stderr)
            return 2
    if args.speed is not None and not args.speed > 0:
        print("streamer replay: --speed must be positive", file=sys.stderr)
        return 2
    models = list(config.models.names) if args.model is None else list(args.model)
    if "none" in models:
        models = []
    urls = list(args.publish) + ([f"jsonl:{args.out}"] if args.out else [])
    if not urls:
        urls = list(config.publish.urls)
    try:
        summary = asyncio.run(_replay(args, config, models, urls))
    except StreamerError as exc:
        print(f"streamer replay: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        from streamer.models import REGISTRY

        print(
            f"streamer replay: unknown model {exc.args[0]!r}; "
            f"allowed: {', '.join(sorted(REGISTRY))}, none",
            file=sys.stderr,
        )
        return 2
    if not args.quiet:
        print(summary, file=sys.stderr)
    return 0


async def _replay(
    args: argparse.Namespace, config: Config, models: list[str], urls: list[str]
) -> str:
    from streamer.calib.calibrator import CalibConfig
    from streamer.pipeline import Pipeline, run_inline
    from streamer.publish.base import from_url

    pipeline = Pipeline(
        models=models,
        prefix=config.publish.prefix,
        trigger=config.trigger,
        calib={
            m: CalibConfig(penalty=config.models.penalty.get(m), objective=config.models.objective)
            for m in models
        },
        model_options=config.models.options(),
        greeks=config.publish.greeks and not args.no_greeks,
        stale_after_s=config.book.stale_after_s,
        max_spread_iv=config.book.max_spread_iv,
    )
    t0 = time.perf_counter()
    published = 0
    progress = _Progress(enabled=not args.quiet and sys.stderr.isatty())
    async with contextlib.AsyncExitStack() as stack:
        pubs = [
            await stack.enter_async_context(
                from_url(u, instance=config.instance, prefix_default=config.publish.prefix)
            )
            for u in urls
        ]
        counter = _Counted(_paced(items_of(args.files), args.speed))
        items: Iterator[Item] = iter(counter)
        if not models:
            for ts_ns, item in items:
                if isinstance(item, str | bytes):
                    pipeline.parser.parse_into(item, ts_ns, pipeline.books)
                else:
                    pipeline.books.on_event(item)
                progress.tick(pipeline.parser.frames)
        else:
            for batch in run_inline(pipeline, items):
                for msg in batch:
                    for pub in pubs:
                        await pub.publish(
                            retopic(msg.topic, pipeline.prefix, pub.prefix), msg.payload
                        )
                    published += 1
                progress.tick(pipeline.parser.frames)
                await asyncio.sleep(0)  # let network publishers breathe
    progress.done()
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
