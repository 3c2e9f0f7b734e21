"""Replay throughput benchmark: frames/s of parse + book on one core, and book memory.

Input: a long recording made in a temporary directory by ``../shared/tools/csv_to_replay.py``
from the shared real-data CSVs (``smiles/tardis-hourly-*.csv`` and
``snapshots/deribit_options_snapshot_*.csv``: full BTC+ETH Deribit chains as
``ticker.{inst}.100ms`` notifications, DESIGN section 3), looped ``--loops`` times (each pass
shifted in ``ts_ns`` past the previous one; the frames stay the real text) into a plain
``.jsonl`` and a ``.jsonl.zst`` copy.

End to end (the number users see): ``streamer replay FILE --model none --out /dev/null`` as a
whole process, best of ``--repeat``, in the child's CPU time (user + system, from
``getrusage``: other work on a shared machine does not count) and in wall time, with and
without start-up: the same command over a one-line recording is timed too and subtracted.

In memory (no file I/O), over the recording's ``(ts_ns, frame)``, best of ``--repeat`` runs in
CPU time of this process (``time.process_time``):

* ``json.loads`` and ``orjson.loads`` loops (the decoding floor);
* the event path: ``DeribitParser.parse`` + ``Books.on_event`` for every event;
* the fused path: ``streamer.book.fastpath.FastPath`` (ticker frames written straight into the
  book rows) with fresh books (every instrument created on first sight) and with warm books
  (the steady state of a running daemon), its orjson way alone (``typed=False``) and its
  typed decoder, frame by frame (``apply``), in blocks of frames (``parse_batch``) and in
  blocks of the recording's lines (``parse_lines``: what ``replay --model none`` runs, the
  record's decode included; blocks of about ``CHUNK`` bytes, as the reader makes them).

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
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import zstandard

from streamer.book.book import Books
from streamer.book.fastpath import FastPath
from streamer.feeds.deribit.parser import DeribitParser
from streamer.feeds.recordings.reader import Lines
from streamer.paths import shared_root

SHARED = shared_root()
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


def make_recording(
    shared: Path, out: Path, limit_rows: int | None, loops: int = 1
) -> tuple[Path, Path]:
    """Run the shared tool on the real CSVs, loop its output ``loops`` times (``ts_ns``
    shifted a pass at a time) into ``out`` (plain) and ``out.zst``; the two paths."""
    inputs = sorted(str(p) for pattern in INPUTS for p in shared.glob(pattern))
    if not inputs:
        raise FileNotFoundError(f"no CSVs under {shared / 'data/deribit'}")
    once = out.with_suffix(".once.jsonl")
    cmd = [sys.executable, str(shared / TOOL), *inputs, "-o", str(once)]
    if limit_rows:
        cmd += ["--limit-rows", str(limit_rows)]
    subprocess.run(cmd, check=True, capture_output=True)
    lines = once.read_bytes().splitlines()
    once.unlink()
    recs = [orjson.loads(line) for line in lines]
    span = recs[-1]["ts_ns"] - recs[0]["ts_ns"] + 1_000_000_000
    zst = out.with_name(out.name + ".zst")
    with (
        out.open("wb") as plain,
        zst.open("wb") as raw,
        zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as z,
    ):
        for k in range(loops):
            for rec in recs:
                line = orjson.dumps({**rec, "ts_ns": rec["ts_ns"] + k * span}) + b"\n"
                plain.write(line)
                z.write(line)
    return out, zst


@dataclass(frozen=True)
class EndToEnd:
    """One file's whole-process replay: frames, best CPU and wall seconds, start-up's."""

    name: str
    frames: int
    cpu: float
    wall: float
    cpu0: float
    wall0: float

    @property
    def per_s(self) -> float:
        """Frames per CPU second beyond start-up (NaN if start-up took longer: noise)."""
        extra = self.cpu - self.cpu0
        return self.frames / extra if extra > 0 else float("nan")

    @property
    def per_s_wall(self) -> float:
        extra = self.wall - self.wall0
        return self.frames / extra if extra > 0 else float("nan")


REPLAY_CMD = (sys.executable, "-m", "streamer", "replay")


def _timed_process(path: Path) -> tuple[float, float]:
    """CPU (user + system of the child) and wall seconds of one replay of ``path``."""
    cmd = [*REPLAY_CMD, str(path), "--model", "none", "--out", os.devnull, "--quiet"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return cpu, wall


def run_end_to_end(paths: list[Path], frames: int, repeat: int, tmp: Path) -> list[EndToEnd]:
    """Best of ``repeat`` whole-process replays of each path, and of a one-line file (the
    start-up, subtracted), interleaved so that load on the machine hits all alike."""
    tiny = tmp / "one-line.jsonl"
    with paths[0].open("rb") as fh:
        tiny.write_bytes(fh.readline())
    _timed_process(tiny)  # untimed: byte-compiles what changed, warms the page cache
    best: dict[Path, tuple[float, float]] = {}
    for _ in range(repeat):
        for p in (tiny, *paths):
            cpu, wall = _timed_process(p)
            old = best.get(p, (float("inf"), float("inf")))
            best[p] = (min(old[0], cpu), min(old[1], wall))
    cpu0, wall0 = best[tiny]
    return [EndToEnd(p.name, frames, *best[p], cpu0, wall0) for p in paths]


def end_to_end_table(rows: list[EndToEnd]) -> str:
    lines = [
        "| file | frames | CPU s | start-up CPU s | frames/s (CPU, start-up subtracted) "
        "| wall s | frames/s (wall, start-up subtracted) | frames/s (wall, whole run) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.frames:,} | {r.cpu:.2f} | {r.cpu0:.2f} | {r.per_s:,.0f} | "
            f"{r.wall:.2f} | {r.per_s_wall:,.0f} | {r.frames / r.wall:,.0f} |"
        )
    return "\n".join(lines)


def load_frames(path: Path) -> Frames:
    """``(ts_ns, frame)`` of every line of a plain ``.jsonl`` recording, in memory."""
    out: Frames = []
    for line in path.read_bytes().splitlines():
        if line:
            rec = orjson.loads(line)
            out.append((rec["ts_ns"], rec["frame"]))
    return out


def load_line_blocks(path: Path) -> list[Lines]:
    """The lines of a plain recording in blocks of about ``reader.CHUNK`` bytes (what
    ``RecordingLines`` hands ``FastPath.parse_lines``), in memory."""
    from streamer.feeds.recordings.reader import CHUNK

    blocks: list[Lines] = [Lines()]
    size = 0
    with path.open("rb") as fh:
        for line in fh:  # lines as the reader cuts them (at b"\n")
            if size >= CHUNK:
                blocks.append(Lines())
                size = 0
            blocks[-1].append(line)
            size += len(line)
    return blocks


def _best(fn: Callable[[], object], repeat: int) -> float:
    """Best CPU time of ``repeat`` runs (process time: other load on a shared machine that
    takes the core away does not count, its cache pollution still does)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def run_speed(frames: Frames, repeat: int, blocks: list[Lines] | None = None) -> list[Row]:
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

    def orjson_way_warm() -> None:
        warm.typed = False
        try:
            fused_warm()
        finally:
            warm.typed = True

    batches = [[(ns, "deribit", f) for ns, f in frames[i : i + 1000]] for i in range(0, n, 1000)]

    def batch_warm() -> None:
        parse_batch, on_event = warm.parse_batch, warm.books.on_event
        for b in batches:
            parse_batch(b, on_event)

    def careful(line: bytes) -> None:  # blank lines (load_frames skips them too)
        return None

    def lines_warm() -> None:
        warm.parse_lines(blocks or (), careful, warm.books.on_event)

    lines_row = (
        [
            Row(
                "FastPath.parse_lines, warm books (replay's loop, record decode included)",
                n,
                _best(lines_warm, repeat),
            )
        ]
        if blocks is not None
        else []
    )
    return [
        Row("json.loads only", n, _best(json_loop, repeat)),
        Row("orjson.loads only", n, _best(orjson_loop, repeat)),
        Row("parse + Books.on_event (event path)", n, _best(event_path, repeat)),
        Row("FastPath.apply, fresh books", n, _best(fused_fresh, repeat)),
        Row(
            "FastPath.apply, warm books, orjson way (typed=False)",
            n,
            _best(orjson_way_warm, repeat),
        ),
        Row("FastPath.apply, warm books (typed decoder)", n, _best(fused_warm, repeat)),
        Row("FastPath.parse_batch, warm books (blocks of frames)", n, _best(batch_warm, repeat)),
        *lines_row,
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
    ap.add_argument("--loops", type=int, default=4, help="passes over the real data (>= 500k)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per method (best kept)")
    ap.add_argument("--no-end-to-end", action="store_true", help="in-memory rows only")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="streamer-bench-") as tmp:
        path = args.recording
        paths = [path] if path is not None else []
        if path is None:
            if not (args.shared / TOOL).exists():
                print(f"skipped: {args.shared / TOOL} not found (the shared data lives outside)")
                return 0
            t0 = time.perf_counter()
            path, zst = make_recording(
                args.shared, Path(tmp) / "replay.jsonl", args.limit_rows, args.loops
            )
            paths = [path, zst]
            made = time.perf_counter() - t0
            print(
                f"recording: {path.stat().st_size / 1e6:.1f} MB ({zst.stat().st_size / 1e6:.1f}"
                f" MB as .zst), {args.loops} passes over the real data, made in {made:.1f} s"
            )
        frames = load_frames(path)
        blocks = load_line_blocks(path)
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        e2e = (
            [] if args.no_end_to_end else run_end_to_end(paths, len(frames), args.repeat, Path(tmp))
        )
    mean = sum(len(f) for _, f in frames) / len(frames)
    print(f"{len(frames):,} frames, mean {mean:.0f} B")
    if e2e:
        print()
        print(
            f"End to end: `streamer replay FILE --model none --out {os.devnull}`, best of "
            f"{args.repeat}; start-up = the same over a one-line file"
        )
        print()
        print(end_to_end_table(e2e))
    print()
    print("In memory, CPU time per frame")
    print()
    rows = run_speed(frames, args.repeat, blocks)
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
    if e2e:
        worst = min(r.per_s for r in e2e)
        verdict = "met" if worst >= GOAL_FRAMES_PER_S else "NOT met"
        print(
            f"- goal >= {GOAL_FRAMES_PER_S:,} frames/s end to end (whole process, start-up "
            f"subtracted, CPU time): {verdict} (slowest file {worst:,.0f})"
        )
    else:
        fused = max(r.per_s for r in rows if r.method.startswith("FastPath"))
        print(f"- parse + book in memory: {fused:,.0f} frames/s (no end-to-end run)")
    return 0
