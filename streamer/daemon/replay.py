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

``replay_jobs`` (``streamer replay --jobs N``) replays each file on its own (fresh books,
triggers and fits: what ``streamer replay FILE`` alone does), N files at a time in worker
processes (``forkserver``, its server preloaded with this module, so a worker starts in
milliseconds instead of importing numba again). Each worker writes its file's messages to a
temporary JSON Lines file (``jsonl:``, the encoding every sink uses); the parent owns the
real sinks and relays the files' messages in the order the files were given, each file's
as soon as it and every file before it are done: the output is the concatenation of the
one-by-one replays, whatever finishes first. MQTT included: one connection (the parent's),
the same client, retained topics and order as one by one; nothing reaches the broker
before its file is done. A failing file stops the run (the files before it are relayed,
nothing after) with its error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson

from streamer.config import Config
from streamer.daemon.derived_pool import DerivedPool
from streamer.daemon.pipeline import Message, Pipeline, finish, fits_inline, step
from streamer.errors import PublishError, StreamerError
from streamer.events import Event
from streamer.feeds.recordings.reader import Frame
from streamer.publish.base import Publisher
from streamer.publish.jsonl import JsonlPublisher
from streamer.publish.payloads import retopic
from streamer.publish.urls import from_url

Item = tuple[int, "str | bytes | Event"]
_B = TypeVar("_B")
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
    from streamer.feeds.ccxt.frames import CcxtFrames, is_ccxt_frame
    from streamer.feeds.recordings.reader import read_frame_batches
    from streamer.feeds.recordings.tardis import read_tardis_options_chain, sorted_by_time

    for path in paths:
        name = path.lower()
        if name.endswith((".csv", ".csv.gz")):
            yield None, list(sorted_by_time(read_tardis_options_chain(path)))
        else:
            ccxt: CcxtFrames | None = None
            for i, frames in enumerate(read_frame_batches(path)):
                if i == 0 and frames and is_ccxt_frame(frames[0][2]):
                    ccxt = CcxtFrames()  # a ccxt recording: its frames through the ccxt mapping
                if ccxt is not None:
                    yield None, ccxt.events_of(frames)
                else:
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
    derived_workers: int | None = None,
) -> str:
    """Replay ``files`` through a pipeline built from ``config`` into publishers of
    ``urls``; returns the summary table. ``models`` empty: parse + book only.
    ``derived_workers``: processes building the derived topics of an unpaced replay with
    models (``DerivedPool``; None: one per core, 0: inline)."""
    result = await _replay(
        files,
        config,
        models=models,
        urls=urls,
        greeks=greeks,
        speed=speed,
        progress=progress,
        derived_workers=derived_workers,
    )
    return result.summary


@dataclass(frozen=True)
class Result:
    """What one replay did: its summary table, messages published, frames and items."""

    summary: str
    published: int
    frames: int
    items: int
    seconds: float


async def _open_publishers(
    stack: contextlib.AsyncExitStack, urls: Sequence[str], config: Config
) -> list[Publisher]:
    """The sinks of ``urls``, entered on ``stack``; each MQTT broker's first connection
    attempt awaited (a refusal raises ``PublishError``)."""
    pubs: list[Publisher] = [
        await stack.enter_async_context(
            from_url(u, instance=config.instance, prefix_default=config.publish.prefix)
        )
        for u in urls
    ]
    for pub in pubs:
        check = getattr(pub, "check_broker", None)
        if check is not None:
            await check(BROKER_CHECK_S)
    return pubs


def _raise_undelivered(pubs: Sequence[Publisher]) -> None:
    for pub in pubs:
        undelivered = getattr(pub, "undelivered_error", None)
        if undelivered is not None and (error := undelivered()) is not None:
            raise error


async def _replay(
    files: Sequence[str],
    config: Config,
    *,
    models: Sequence[str],
    urls: Sequence[str],
    greeks: bool = True,
    speed: float | None = None,
    progress: bool = False,
    derived_workers: int | None = 0,
) -> Result:
    pipeline = Pipeline.from_config(config, models=models, greeks=config.publish.greeks and greeks)
    t0 = time.perf_counter()
    published = 0
    bar = _Progress(enabled=progress)
    async with contextlib.AsyncExitStack() as stack:
        pubs = await _open_publishers(stack, urls, config)
        counter = _Counted(items_of(files))
        items: Iterator[Item] = iter(counter)
        if not models and speed is None:
            # parse + book only, as fast as possible: blocks of frames straight into the
            # fused path (no generator layer or call per frame)
            for path in files:
                counter.n += _parse_only(path, pipeline, bar)
        elif not models:  # paced, parse + book only
            async for ts_ns, item in _apaced(items, speed):
                if isinstance(item, str | bytes):
                    pipeline.on_frame(item, ts_ns)
                else:
                    pipeline.on_event(item)
                bar.tick(pipeline.parser.frames)
        elif speed is None:
            # the fits here, in order; their derived topics in worker processes once the
            # replay is long enough (``DerivedPool``: the same messages, in the same order)
            pool = DerivedPool(pipeline, config, _derived_workers(derived_workers))
            stack.callback(pool.close)
            for snap, surfaces in fits_inline(pipeline, items):
                for batch in await pool.add(snap, surfaces):
                    published += await _deliver(batch, pubs, pipeline.prefix)
                bar.tick(pipeline.parser.frames)
                await asyncio.sleep(0)  # let network publishers breathe
            for batch in await pool.drain():
                published += await _deliver(batch, pubs, pipeline.prefix)
        else:  # paced: wait on the event loop, so the publishers send while we wait
            now_s = 0.0
            async for ts_ns, item in _apaced(items, speed):
                now_s = ts_ns / 1e9
                for batch in step(pipeline, ts_ns, item):
                    published += await _deliver(batch, pubs, pipeline.prefix)
                bar.tick(pipeline.parser.frames)
            for batch in finish(pipeline, now_s):
                published += await _deliver(batch, pubs, pipeline.prefix)
    bar.done()
    _raise_undelivered(pubs)
    for book in pipeline.books:
        book.snapshot()  # count the final filters
    seconds = time.perf_counter() - t0
    return Result(
        summary_table(pipeline, seconds, published, counter.n),
        published,
        pipeline.parser.frames,
        counter.n,
        seconds,
    )


def _derived_workers(n: int | None) -> int:
    """``n``, or one per core this process may run on when None (none on a single core:
    the workers would only take turns with the fits)."""
    if n is not None:
        return max(0, n)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores if cores and cores > 1 else 0


def _parse_only(path: str, pipeline: Pipeline, bar: _Progress) -> int:
    """Parse + book only, as fast as possible, for one file; returns its items. A plain
    recording goes line block by line block straight into the fused path
    (``FastPath.parse_lines``: no frame tuples or generator layer in between); captures,
    ccxt recordings and Tardis CSVs as ``batches_of`` gives them."""
    from streamer.feeds.recordings.reader import RecordingLines, is_cryptofeed_capture

    plain = not path.lower().endswith((".csv", ".csv.gz")) and not is_cryptofeed_capture(path)
    if plain and not _is_ccxt_recording(path):
        lines = RecordingLines(path)
        return pipeline.fast.parse_lines(
            _ticking(lines.blocks(), bar, pipeline), lines.careful, pipeline.on_event
        )
    parse_batch, on_event = pipeline.fast.parse_batch, pipeline.on_event
    n = 0
    for frames, events in batches_of([path]):
        if frames is not None:
            parse_batch(frames, on_event)
            n += len(frames)
        else:
            for _, ev in events:
                on_event(ev)
            n += len(events)
        bar.tick(pipeline.parser.frames)
    return n


def _ticking(blocks: Iterable[_B], bar: _Progress, pipeline: Pipeline) -> Iterator[_B]:
    """``blocks`` passed on, the progress bar told after each."""
    for block in blocks:
        yield block
        bar.tick(pipeline.parser.frames)


def _is_ccxt_recording(path: str) -> bool:
    """Is the first frame of this recording a ccxt one (``batches_of``'s test)?"""
    from streamer.feeds.ccxt.frames import is_ccxt_frame
    from streamer.feeds.recordings.reader import read_recording

    frames = read_recording(path)
    try:
        first = next(frames, None)
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()
    return first is not None and is_ccxt_frame(first[2])


# -- several files in parallel ----------------------------------------------------------------


class ReplayJobError(StreamerError):
    """A file of ``replay_jobs`` failed: ``str()`` names it and says why; ``exit_code`` is
    what ``streamer replay`` would have exited with on that file alone (1 delivery, 2 input
    or config, 1 anything else)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class _JobResult:
    path: str
    result: Result | None
    error: str = ""
    exit_code: int = 0


def _job(path: str, config: Config, models: Sequence[str], greeks: bool, out: str) -> _JobResult:
    """One file's replay into ``jsonl:out`` (runs in a worker process; never raises)."""
    from streamer.daemon import logs

    logs.configure(config.log.level, config.log.format)
    try:
        result = asyncio.run(
            _replay([path], config, models=models, urls=[f"jsonl:{out}"], greeks=greeks)
        )
    except PublishError as exc:
        return _JobResult(path, None, str(exc), 1)
    except StreamerError as exc:
        return _JobResult(path, None, str(exc), 2)
    except Exception as exc:  # a bug or the machine: still the file's error, not a hang
        return _JobResult(path, None, f"{type(exc).__name__}: {exc}", 1)
    return _JobResult(path, result)


def _context() -> multiprocessing.context.BaseContext:
    """``forkserver`` (preloaded with this module: workers start without re-importing numba
    and the models) where there is one, else ``spawn``. Never plain ``fork``: the parent
    runs an event loop and maybe MQTT threads."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


async def _relay(path: Path, pubs: Sequence[Publisher], prefix: str) -> int:
    """Deliver the messages of a worker's JSON Lines file to ``pubs`` in order (what the
    single replay's loop does with each message); returns how many. A JSON Lines sink with
    the worker's prefix takes the lines as they are (the same class wrote them, so the same
    bytes; decoding and re-encoding a greeks payload costs ~0.1 ms, serial in this
    process); any other sink gets each message decoded and delivered."""
    raw = [p for p in pubs if type(p) is JsonlPublisher and p.prefix == prefix]
    cooked = [p for p in pubs if not any(p is r for r in raw)]
    n = 0
    with path.open("rb") as fh:
        for line in fh:
            for sink in raw:
                sink._write(line)
            if cooked:
                msg = orjson.loads(line)
                topic, payload = msg["topic"], msg["payload"]
                for pub in cooked:
                    await pub.deliver(
                        retopic(topic, prefix, pub.prefix), payload or {}, clear=payload is None
                    )
            n += 1
            if n % 256 == 0:
                await asyncio.sleep(0)  # let network publishers breathe
    return n


async def replay_jobs(
    files: Sequence[str],
    config: Config,
    *,
    jobs: int,
    models: Sequence[str],
    urls: Sequence[str],
    greeks: bool = True,
) -> str:
    """Replay each of ``files`` on its own, ``jobs`` at a time in worker processes (one job:
    in this process), relaying the messages to the publishers of ``urls`` in the order of
    ``files`` (module doc); returns the summary: one table per file and a total line.
    Raises ``ReplayJobError`` for a failed file, ``PublishError`` for the sinks."""
    if jobs < 1:
        raise ReplayJobError(f"--jobs must be >= 1, got {jobs}", 2)
    Pipeline.from_config(config, models=models)  # a bad model name fails here, not per file
    t0 = time.perf_counter()
    workers = min(jobs, len(files))
    results: list[Result] = []
    published = 0
    async with contextlib.AsyncExitStack() as stack:
        pubs = await _open_publishers(stack, urls, config)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="streamer-replay-")))
        outs = [str(tmp / f"{i}.jsonl") for i in range(len(files))]
        pending: list[asyncio.Future[_JobResult]] = []
        if workers > 1:
            pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=_context())
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            loop = asyncio.get_running_loop()
            pending = [
                loop.run_in_executor(pool, _job, f, config, tuple(models), greeks, out)
                for f, out in zip(files, outs, strict=True)
            ]
        for i, (f, out) in enumerate(zip(files, outs, strict=True)):
            if workers > 1:
                try:
                    job = await pending[i]
                except concurrent.futures.process.BrokenProcessPool as exc:
                    raise ReplayJobError(f"{f}: the worker process died ({exc})", 1) from None
            else:  # one job: the same work in this process (no pickling, no start-up)
                try:
                    res = await _replay([f], config, models=models, urls=[f"jsonl:{out}"],
                                        greeks=greeks)  # fmt: skip
                except PublishError as exc:
                    job = _JobResult(f, None, str(exc), 1)
                except StreamerError as exc:
                    job = _JobResult(f, None, str(exc), 2)
                else:
                    job = _JobResult(f, res)
            if job.result is None:
                raise ReplayJobError(f"{f}: {job.error}", job.exit_code)
            published += await _relay(Path(out), pubs, config.publish.prefix)
            Path(out).unlink()
            results.append(job.result)
    _raise_undelivered(pubs)
    seconds = time.perf_counter() - t0
    frames = sum(r.frames for r in results)
    items = sum(r.items for r in results)
    lines = [f"== {f}\n{r.summary}\n" for f, r in zip(files, results, strict=True)]
    lines.append(
        f"replayed {len(files)} files ({frames:,} frames, {items - frames:,} events) with "
        f"--jobs {jobs} in {seconds:.2f} s ({max(items, frames) / max(seconds, 1e-9):,.0f}/s), "
        f"published {published:,} messages"
    )
    return os.linesep.join(lines)


async def _apaced(items: Iterator[Item], speed: float | None) -> AsyncIterator[Item]:
    """``items`` released at ``speed`` times their recorded pace; the waits are the event
    loop's (``asyncio.sleep``), so publishers keep sending meanwhile."""
    first: int | None = None
    start = time.monotonic_ns()
    for ts_ns, item in items:
        if speed is not None:
            if first is None:
                first = ts_ns
            delay = start + (ts_ns - first) / speed - time.monotonic_ns()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
        yield ts_ns, item


async def _deliver(batch: Sequence[Message], pubs: Sequence[Publisher], prefix: str) -> int:
    """Hand one refit's messages to every publisher; how many messages."""
    for msg in batch:
        for pub in pubs:
            await pub.deliver(retopic(msg.topic, prefix, pub.prefix), msg.wire, clear=msg.clear)
    return len(batch)


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
