"""Replay throughput benchmark: frames/s of parse + book on one core, and book memory.

Input: a long recording made in a temporary directory by ``../shared/tools/csv_to_replay.py``
from the shared real-data CSVs (``smiles/tardis-hourly-*.csv`` and
``snapshots/deribit_options_snapshot_*.csv``: full BTC+ETH Deribit chains as
``ticker.{inst}.100ms`` notifications, DESIGN section 3). The recording's lines are decoded
into ``(ts_ns, frame)`` in memory first, so no file I/O is timed. Then, over the same frames,
best of ``--repeat`` runs, in CPU time of this process (``time.process_time``, so other work
on a shared machine does not count):

* ``json.loads`` and ``orjson.loads`` loops (the decoding floor);
* the event path: ``DeribitParser.parse`` + ``Books.on_event`` for every event;
* the fused path: ``streamer.book.fastpath.FastPath`` (ticker frames written straight into the book
  rows), with fresh books (every instrument created on first sight) and with warm books
  (the steady state of a running daemon).

Also: the time of ``Book.snapshot`` on the final chains, and the memory the books hold per
1,000 live instruments (``tracemalloc``: row arrays, instrument table, name maps), with the
numpy arrays alone (``Book.nbytes``) for comparison. Skips with a message (exit 0) when the
shared data or tool is absent.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from streamer.book.book import Books
from streamer.book.fastpath import FastPath
from streamer.feeds.deribit.parser import DeribitParser

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TOOL = "tools/csv_to_replay.py"
INPUTS = ("data/deribit/smiles/tardis-hourly-*.csv", "data/deribit/snapshots/*.csv")
GOAL_FRAMES_PER_S = 400_000

Frames = list[tuple[int, str]]


@dataclass(frozen=True)
class Row:
    method: str
    frames: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.frames / self.seconds

    @property
    def us(self) -> float:
        return self.seconds / self.frames * 1e6


def make_recording(shared: Path, out: Path, limit_rows: int | None) -> Path:
    """Run the shared tool on the real CSVs; the recording's path."""
    inputs = sorted(str(p) for pattern in INPUTS for p in shared.glob(pattern))
    if not inputs:
        raise FileNotFoundError(f"no CSVs under {shared / 'data/deribit'}")
    cmd = [sys.executable, str(shared / TOOL), *inputs, "-o", str(out)]
    if limit_rows:
        cmd += ["--limit-rows", str(limit_rows)]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def load_frames(path: Path) -> Frames:
    """``(ts_ns, frame)`` of every line of a plain ``.jsonl`` recording, in memory."""
    out: Frames = []
    for line in path.read_bytes().splitlines():
        if line:
            rec = orjson.loads(line)
            out.append((rec["ts_ns"], rec["frame"]))
    return out


def _best(fn: Callable[[], object], repeat: int) -> float:
    """Best CPU time of ``repeat`` runs (process time: other load on a shared machine that
    takes the core away does not count, its cache pollution still does)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def run_speed(frames: Frames, repeat: int) -> list[Row]:
    texts = [f for _, f in frames]
    n = len(frames)

    def json_loop() -> None:
        loads = json.loads
        for f in texts:
            loads(f)

    def orjson_loop() -> None:
        loads = orjson.loads
        for f in texts:
            loads(f)

    def event_path() -> None:
        p, books = DeribitParser(), Books()
        parse, on_event = p.parse, books.on_event
        for ns, f in frames:
            for ev in parse(f, ns):
                on_event(ev)

    def fused_fresh() -> None:
        apply = FastPath(DeribitParser(), Books()).apply
        for ns, f in frames:
            apply(f, ns)

    warm = FastPath(DeribitParser(), Books())
    for ns, f in frames:
        warm.apply(f, ns)

    def fused_warm() -> None:
        apply = warm.apply
        for ns, f in frames:
            apply(f, ns)

    return [
        Row("json.loads only", n, _best(json_loop, repeat)),
        Row("orjson.loads only", n, _best(orjson_loop, repeat)),
        Row("parse + Books.on_event (event path)", n, _best(event_path, repeat)),
        Row("FastPath (fused), fresh books", n, _best(fused_fresh, repeat)),
        Row("FastPath (fused), warm books", n, _best(fused_warm, repeat)),
    ]


@dataclass(frozen=True)
class Memory:
    live: int
    held_bytes: int
    array_bytes: int


def run_memory(frames: Frames) -> tuple[Memory, Books]:
    """What the books hold after the whole replay (the parser and frames excluded)."""
    gc.collect()
    tracemalloc.start()
    try:
        books = Books()
        fast = FastPath(DeribitParser(), books)
        for ns, f in frames:
            fast.apply(f, ns)
        del fast
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    live = sum(len(b) for b in books)
    return Memory(live, held, sum(b.nbytes() for b in books)), books


def run_snapshots(books: Books, repeat: int) -> list[str]:
    lines = []
    for b in books:
        now = b.last_ts_ms()
        b.snapshot(now)  # expires what settled before the end of the recording
        snap = b.snapshot(now)
        dt = _best(lambda b=b, now=now: b.snapshot(now), repeat)  # type: ignore[misc]
        lines.append(
            f"- snapshot {b.underlying}: {snap.n_quotes:,} quotes, {snap.n_expiries} expiries, "
            f"{len(b):,} live instruments: {dt * 1e3:.2f} ms"
        )
    return lines


def table(rows: list[Row]) -> str:
    base = next(r for r in rows if r.method.startswith("orjson"))
    lines = [
        "| method | frames | frames/s | µs/frame | µs beyond orjson |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        extra = "" if r is base else f"{r.us - base.us:+.2f}"
        lines.append(f"| {r.method} | {r.frames:,} | {r.per_s:,.0f} | {r.us:.2f} | {extra} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="streamer bench replay", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--shared", type=Path, default=SHARED, help="the shared folder (tool + data)")
    ap.add_argument("--recording", type=Path, help="use this plain .jsonl recording instead")
    ap.add_argument("--limit-rows", type=int, help="rows per CSV given to the tool (quick runs)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per method (best kept)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="streamer-bench-") as tmp:
        path = args.recording
        if path is None:
            if not (args.shared / TOOL).exists():
                print(f"skipped: {args.shared / TOOL} not found (the shared data lives outside)")
                return 0
            t0 = time.perf_counter()
            path = make_recording(args.shared, Path(tmp) / "replay.jsonl", args.limit_rows)
            made = time.perf_counter() - t0
            print(f"recording: {path.stat().st_size / 1e6:.1f} MB made in {made:.1f} s")
        frames = load_frames(path)
    mean = sum(len(f) for _, f in frames) / len(frames)
    print(f"{len(frames):,} frames in memory, mean {mean:.0f} B")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; CPU time per frame")
    print()
    rows = run_speed(frames, args.repeat)
    print(table(rows))
    mem, books = run_memory(frames)
    print()
    per_k = 1000 / mem.live
    print(
        f"- memory: {mem.held_bytes * per_k / 1e6:.2f} MB per 1,000 live instruments "
        f"({mem.live:,} live; the numpy row arrays alone {mem.array_bytes * per_k / 1e3:.0f} kB "
        "per 1,000, capacity doubling included)"
    )
    for line in run_snapshots(books, args.repeat):
        print(line)
    fused = max(r.per_s for r in rows if r.method.startswith("FastPath"))
    verdict = "met" if fused >= GOAL_FRAMES_PER_S else "NOT met"
    print(f"- goal >= {GOAL_FRAMES_PER_S:,} frames/s parse + book: {verdict} ({fused:,.0f})")
    return 0
