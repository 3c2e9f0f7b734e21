"""Recorder -> replay round trips, crash (SIGKILL) and truncation tolerance, pacing, the real
cryptofeed capture and the shared ``csv_to_replay.py`` tool's output."""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard
from structlog.testing import capture_logs

from streamer.errors import FeedError, InputError
from streamer.feeds.recordings.reader import (
    ReplayStats,
    aiter_frames,
    detect_compression,
    iter_frames,
    read_cryptofeed_capture,
    read_frames,
    read_recording,
    recording_paths,
)
from streamer.feeds.recordings.recorder import Recorder
from tests.conftest import REPO, UNIT, shared_file

COMPRESSIONS = ("zst", "gz", "none")
BASE_NS = 1_735_693_199_241_000_000  # 2025-01-01T00:59:59.241Z


def frame_text(i: int) -> str:
    """A Deribit-like notification with characters JSON must escape and non-ASCII text."""
    return (
        '{"jsonrpc":"2.0","method":"subscription","params":{"channel":"ticker.BTC-27DEC24-'
        f'{1000 * i}-C.100ms","data":{{"i":{i},"note":"q\\"uote \\u00e9 é ✓\\n\\t"}}}}}}'
    )


class FakeClock:
    """ns clock that only moves when told to."""

    def __init__(self, start: int = BASE_NS) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now


def file_lines(path: Path) -> list[bytes]:
    """Decompress a whole (complete) file with the standard tools and split its lines."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read()
    return data.splitlines()


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_round_trip_keeps_every_frame_exactly(tmp_path: Path, compression: str) -> None:
    frames = [frame_text(i) for i in range(500)]
    with Recorder(tmp_path, venue="deribit", compression=compression) as rec:  # type: ignore[arg-type]
        for i, f in enumerate(frames):
            # alternate str and bytes input: both must be stored as the same text
            rec.write(f if i % 2 else f.encode(), BASE_NS + i)
    assert rec.stats.frames == 500
    assert rec.stats.files == 1
    (path,) = rec.paths
    suffix = {"zst": ".jsonl.zst", "gz": ".jsonl.gz", "none": ".jsonl"}[compression]
    assert path.name.endswith(suffix)
    # the file itself is standard: one JSON object per line, decodable by stock tools
    lines = file_lines(path)
    assert len(lines) == 500
    assert rec.stats.bytes == sum(len(x) + 1 for x in lines)
    first = json.loads(lines[0])
    assert list(first) == ["ts_ns", "venue", "frame"]
    assert first == {"ts_ns": BASE_NS, "venue": "deribit", "frame": frames[0]}
    stats = ReplayStats()
    out = list(read_recording(path, stats=stats))
    assert out == [(BASE_NS + i, "deribit", f) for i, f in enumerate(frames)]
    assert stats.frames == 500
    assert not stats.bad_lines
    assert not stats.truncated


def test_file_name_is_venue_and_utc_open_time(tmp_path: Path) -> None:
    clock = FakeClock()
    with Recorder(tmp_path, venue="okx", compression="gz", clock=clock) as rec:
        assert rec.path is None  # nothing opened before the first frame
        rec.write("{}", 1)
        assert rec.path is not None
        assert rec.path.name == "okx-20250101T005959Z.jsonl.gz"
    assert rec.path is None


def test_invalid_utf8_bytes_are_kept_with_replacement_and_counted(tmp_path: Path) -> None:
    with Recorder(tmp_path, venue="deribit", compression="none") as rec:
        rec.write(b'{"a":"\xff"}', 5)
    assert rec.stats.decode_errors == 1
    assert list(read_recording(rec.paths[0])) == [(5, "deribit", '{"a":"\ufffd"}')]


def test_bad_arguments_and_write_after_close(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="compression"):
        Recorder(tmp_path, venue="x", compression="lz4")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="venue"):
        Recorder(tmp_path, venue="a/b")
    with pytest.raises(InputError, match="rotate_bytes"):
        Recorder(tmp_path, venue="x", rotate_bytes=0)
    rec = Recorder(tmp_path, venue="x")
    rec.close()
    rec.close()  # idempotent
    with pytest.raises(FeedError):
        rec.write("{}", 1)


# -- rotation -------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_rotation_by_size(tmp_path: Path, compression: str) -> None:
    frames = [frame_text(i) for i in range(200)]
    limit = 4000
    clock = FakeClock()
    with Recorder(
        tmp_path,
        venue="deribit",
        compression=compression,  # type: ignore[arg-type]
        rotate_bytes=limit,
        clock=clock,
    ) as rec:
        for i, f in enumerate(frames):
            clock.now += 1_000_000_000  # a new second per frame: distinct file names
            rec.write(f, BASE_NS + i)
    paths = recording_paths(tmp_path, "deribit")
    assert list(paths) == list(rec.paths)
    assert rec.stats.files == len(paths) > 5
    sizes = [sum(len(x) + 1 for x in file_lines(p)) for p in paths]
    longest = max(len(x) + 1 for p in paths for x in file_lines(p))
    for size in sizes[:-1]:
        assert limit <= size < limit + longest
    assert sizes[-1] < limit + longest
    out = list(iter_frames(paths))
    assert [f for _, _, f in out] == frames


def test_rotation_by_time_and_same_second_names(tmp_path: Path) -> None:
    clock = FakeClock()
    with Recorder(
        tmp_path, venue="deribit", compression="none", rotate_seconds=25, clock=clock
    ) as rec:
        for i in range(9):
            rec.write(frame_text(i), BASE_NS + i)
            clock.now += 10_000_000_000  # 10 s per frame: a new file every 3 frames
    assert [len(file_lines(p)) for p in rec.paths] == [3, 3, 3]
    assert [p.name for p in rec.paths] == [
        "deribit-20250101T005959Z.jsonl",
        "deribit-20250101T010029Z.jsonl",
        "deribit-20250101T010059Z.jsonl",
    ]
    # several files within one second get -1, -2, ... and still sort in time order
    still = FakeClock()
    sub = tmp_path / "same"
    with Recorder(sub, venue="deribit", compression="zst", rotate_bytes=1, clock=still) as rec2:
        for i in range(12):
            rec2.write(frame_text(i), BASE_NS + i)
    names = [p.name for p in rec2.paths]
    assert names[0] == "deribit-20250101T005959Z.jsonl.zst"
    assert names[1] == "deribit-20250101T005959Z-1.jsonl.zst"
    assert names[11] == "deribit-20250101T005959Z-11.jsonl.zst"
    assert recording_paths(sub) == list(rec2.paths)
    assert [ts for ts, _, _ in iter_frames(recording_paths(sub))] == [
        BASE_NS + i for i in range(12)
    ]


# -- flushing and crashes -------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_flush_interval_makes_lines_readable_while_open(tmp_path: Path, compression: str) -> None:
    clock = FakeClock()
    rec = Recorder(
        tmp_path,
        venue="deribit",
        compression=compression,  # type: ignore[arg-type]
        flush_interval_s=1.0,
        clock=clock,
    )
    try:
        for i in range(50):
            rec.write(frame_text(i), BASE_NS + i)
            clock.now += 30_000_000  # 30 ms per frame
        clock.now += 1_000_000_000
        rec.write(frame_text(50), BASE_NS + 50)  # > 1 s since the last flush: flushes
        path = rec.path
        assert path is not None
        got = [f for _, _, f in read_recording(path)]
        # every frame up to the last write is on disk, decodable without the stream's end
        assert got == [frame_text(i) for i in range(51)]
        rec.write(frame_text(51), BASE_NS + 51)
        rec.flush()  # the explicit (timer) flush covers quiet periods
        assert [f for _, _, f in read_recording(path)][-1] == frame_text(51)
    finally:
        rec.close()


CHILD = """
import sys
from streamer.feeds.recordings.recorder import Recorder
from tests.test_recorder_replay import BASE_NS, frame_text

rec = Recorder(sys.argv[1], venue="deribit", compression=sys.argv[2], flush_interval_s=3600.0)
i = 0
while True:
    rec.write(frame_text(i), BASE_NS + i)
    i += 1
    if i % 250 == 0:
        rec.flush()
        print(f"flushed {i}", flush=True)
"""


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_sigkilled_recorder_replays_to_its_last_complete_line(
    tmp_path: Path, compression: str
) -> None:
    """A real recorder process is SIGKILLed mid-write: the file replays a prefix that holds at
    least every frame flushed before the kill."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    flushed = 0
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), compression],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 15 * UNIT
            for line in proc.stdout:
                m = re.fullmatch(r"flushed (\d+)\n", line)
                if m:
                    flushed = int(m.group(1))
                if flushed >= 3000 or time.monotonic() > deadline:
                    break
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10 * UNIT)
    assert proc.returncode == -signal.SIGKILL
    assert flushed >= 3000
    (path,) = tmp_path.glob("deribit-*.jsonl*")
    stats = ReplayStats()
    got = list(read_recording(path, stats=stats))
    assert len(got) >= flushed
    assert got == [(BASE_NS + i, "deribit", frame_text(i)) for i in range(len(got))]
    assert not stats.bad_lines
    if compression != "none":
        assert stats.truncated  # the stream never got its end marker


# -- tolerant reading -----------------------------------------------------------------------


def _recorded(tmp_path: Path, compression: str, n: int = 300) -> tuple[Path, list[str]]:
    frames = [frame_text(i) for i in range(n)]
    with Recorder(
        tmp_path,
        venue="deribit",
        compression=compression,  # type: ignore[arg-type]
        flush_interval_s=0.0,  # a flush per frame: many decodable cut points
    ) as rec:
        for i, f in enumerate(frames):
            rec.write(f, BASE_NS + i)
    return rec.paths[0], frames


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_truncated_at_random_points_yields_a_prefix(tmp_path: Path, compression: str) -> None:
    path, frames = _recorded(tmp_path, compression)
    data = path.read_bytes()
    rng = random.Random(20240501)
    cuts = sorted(
        {0, 1, 2, 3, 5, 11, len(data) - 1, *(rng.randrange(len(data)) for _ in range(60))}
    )
    cut_path = tmp_path / f"cut{path.name[path.name.index('.') :]}"
    previous = -1
    for cut in cuts:
        cut_path.write_bytes(data[:cut])
        stats = ReplayStats()
        got = [f for _, _, f in read_recording(cut_path, stats=stats)]
        assert got == frames[: len(got)], cut
        assert not stats.bad_lines, cut
        assert len(got) >= previous, cut  # more bytes never give fewer frames
        previous = len(got)
        if compression == "none":
            # an independent count: complete lines, plus a last line missing only its newline
            complete = data[:cut].count(b"\n")
            assert len(got) == complete + (1 if data[:cut].endswith(b"}") else 0), cut
    assert previous > 250  # the last cut (one byte short) keeps nearly everything


@pytest.mark.parametrize("compression", ("zst", "gz"))
def test_corrupt_compressed_bytes_never_raise(tmp_path: Path, compression: str) -> None:
    path, frames = _recorded(tmp_path, compression)
    data = bytearray(path.read_bytes())
    rng = random.Random(7)
    for _ in range(30):
        bad = bytearray(data)
        for _ in range(3):
            bad[rng.randrange(10, len(bad))] ^= 0xFF
        path.write_bytes(bytes(bad))
        stats = ReplayStats()
        got = list(read_recording(path, stats=stats))  # must not raise
        assert len(got) <= len(frames)


def test_magic_bytes_win_over_the_suffix_and_concatenation(tmp_path: Path) -> None:
    zst, frames = _recorded(tmp_path / "a", "zst", n=20)
    gz, _ = _recorded(tmp_path / "b", "gz", n=20)
    misnamed = tmp_path / "really-zstd.jsonl.gz"
    misnamed.write_bytes(zst.read_bytes())
    assert detect_compression(misnamed) == "zst"
    assert [f for _, _, f in read_recording(misnamed)] == frames
    plain_named = tmp_path / "really-gzip.jsonl"
    plain_named.write_bytes(gz.read_bytes())
    assert detect_compression(plain_named) == "gz"
    assert [f for _, _, f in read_recording(plain_named)] == frames
    # `cat a.gz b.gz > c.gz` and `cat a.zst b.zst`: read across members / frames
    for src in (gz, zst):
        joined = tmp_path / f"joined{src.suffix}"
        joined.write_bytes(src.read_bytes() * 2)
        stats = ReplayStats()
        assert [f for _, _, f in read_recording(joined, stats=stats)] == frames * 2
        assert not stats.truncated


def test_malformed_lines_are_counted_logged_and_skipped(tmp_path: Path) -> None:
    good = [json.dumps({"ts_ns": i, "venue": "deribit", "frame": frame_text(i)}) for i in range(3)]
    lines = [
        good[0],
        "this is not json",
        "",
        "[1, 2, 3]",
        json.dumps({"venue": "deribit", "frame": "{}"}),
        json.dumps({"ts_ns": "12", "venue": "deribit", "frame": "{}"}),
        json.dumps({"ts_ns": True, "venue": "deribit", "frame": "{}"}),
        json.dumps({"ts_ns": 1, "venue": 3, "frame": "{}"}),
        json.dumps({"ts_ns": 1, "venue": "deribit", "frame": {"a": 1}}),
        good[1],
        "   ",
        good[2] + "\r",
        '{"ts_ns": 9, "venue": "deribit", "fra',  # cut off by a crash
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines))
    stats = ReplayStats()
    with capture_logs() as logs:
        got = list(read_recording(path, stats=stats))
    assert got == [(i, "deribit", frame_text(i)) for i in range(3)]
    assert dict(stats.bad_lines) == {
        "invalid_json": 1,
        "not_an_object": 1,
        "bad_ts_ns": 3,
        "bad_venue": 1,
        "bad_frame": 1,
    }
    assert stats.truncated
    bad_logs = [e for e in logs if e["event"] == "replay_bad_line"]
    assert len(bad_logs) == 7
    assert bad_logs[0]["line"] == 2
    assert bad_logs[0]["reason"] == "invalid_json"
    assert bad_logs[0]["path"] == str(path)


def test_empty_file_yields_nothing(tmp_path: Path) -> None:
    for name in ("e.jsonl", "e.jsonl.gz", "e.jsonl.zst"):
        (tmp_path / name).write_bytes(b"")
        assert list(read_recording(tmp_path / name)) == []


# -- pacing ---------------------------------------------------------------------------------


def _timed_recording(tmp_path: Path, offsets_ms: list[int]) -> Path:
    path = tmp_path / "paced.jsonl"
    path.write_text(
        "".join(
            json.dumps({"ts_ns": BASE_NS + ms * 1_000_000, "venue": "deribit", "frame": str(ms)})
            + "\n"
            for ms in offsets_ms
        )
    )
    return path


def test_speed_100_paces_by_ts_with_a_fake_clock(tmp_path: Path) -> None:
    offsets = [0, 1000, 1500, 1400, 3000, 3000, 10_000]  # 1400: goes backwards
    path = _timed_recording(tmp_path, offsets)
    clock = FakeClock(start=5_000_000_000)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.now += round(seconds * 1e9)

    seen: list[tuple[str, int]] = []
    for _, _, f in iter_frames([path], speed=100, clock=clock, sleep=sleep):
        seen.append((f, clock.now - 5_000_000_000))
        clock.now += 1_000_000  # the consumer takes 1 ms per frame
    # each frame is released at (ts - ts0) / 100 after the first, never earlier
    assert seen == [
        ("0", 0),
        ("1000", 10_000_000),
        ("1500", 15_000_000),
        ("1400", 16_000_000),  # late already: no sleep, no waiting for the past
        ("3000", 30_000_000),
        ("3000", 31_000_000),
        ("10000", 100_000_000),
    ]
    assert sleeps == pytest.approx([0.009, 0.004, 0.013, 0.068])


def test_speed_none_never_sleeps_and_bad_speed_is_refused(tmp_path: Path) -> None:
    path = _timed_recording(tmp_path, [0, 5000, 90_000])

    def no_sleep(seconds: float) -> None:
        raise AssertionError("slept")

    assert [f for _, _, f in iter_frames([path], sleep=no_sleep)] == ["0", "5000", "90000"]
    with pytest.raises(InputError, match="speed"):
        list(iter_frames([path], speed=0))


def test_aiter_frames_paces_in_real_time(tmp_path: Path) -> None:
    path = _timed_recording(tmp_path, [0, 1000, 2000, 3000])

    async def run() -> tuple[list[str], float]:
        t0 = time.perf_counter()
        got = [f async for _, _, f in aiter_frames([path, path], speed=100)]
        return got, time.perf_counter() - t0

    got, elapsed = asyncio.run(run())
    assert got == ["0", "1000", "2000", "3000"] * 2
    # second file's ts go back to the start: no waiting there, so 3 s / 100 in total
    assert 0.029 <= elapsed < 1.0 * UNIT  # never early; the upper bound only catches a hang


# -- real inputs ----------------------------------------------------------------------------


def test_real_cryptofeed_capture() -> None:
    path = shared_file("raw/cryptofeed-DERIBIT.ws.1.0")
    text = path.read_text()
    # independent count: lines that start with "<digits>.<digits>: "
    received = [ln for ln in text.splitlines() if re.match(r"^\d+\.\d+: ", ln)]
    stats = ReplayStats()
    got = list(read_cryptofeed_capture(path, stats=stats))
    assert len(got) == len(received) == 136
    assert not stats.bad_lines
    assert got[0][0] == 1_626_993_723_804_318_000
    assert got[0][2] == received[0].split(": ", 1)[1]
    assert got[-1][0] == 1_626_993_754_165_582_200
    assert all(v == "deribit" for _, v, _ in got)
    assert all(isinstance(json.loads(f), dict) for _, _, f in got)
    # the one request we sent is there on demand
    sent = list(read_cryptofeed_capture(path, include_sent=True))
    assert len(sent) == 137
    assert json.loads(sent[0][2])["method"] == "public/subscribe"
    # iter_frames sniffs the format by content
    assert list(iter_frames([path])) == got
    # the REST capture (get_instruments responses) reads too
    rest = list(read_frames(shared_file("raw/cryptofeed-DERIBIT.0")))
    assert len(rest) == 4
    assert all(json.loads(f)["result"][0]["kind"] in {"option", "future"} for _, _, f in rest)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_csv_to_replay_output_reads_back(tmp_path: Path, suffix: str) -> None:
    tool = REPO.parent / "shared" / "tools" / "csv_to_replay.py"
    if not tool.exists():
        pytest.skip(f"shared tool not available: {tool}")
    csv_path = shared_file("chains/bottama-btc-2021-02-11.csv")
    out = tmp_path / f"chain{suffix}"
    subprocess.run(
        [sys.executable, str(tool), str(csv_path), "-o", str(out), "--limit-rows", "40"],
        check=True,
        capture_output=True,
        timeout=60 * UNIT,
    )
    with csv_path.open(newline="") as fh:
        rows = [r for _, r in zip(range(40), csv.DictReader(fh), strict=False)]
    stats = ReplayStats()
    got = list(read_recording(out, stats=stats))
    assert len(got) == 40
    assert not stats.bad_lines
    assert [ts for ts, _, _ in got] == sorted(ts for ts, _, _ in got)
    names = sorted(json.loads(f)["params"]["data"]["instrument_name"] for _, _, f in got)
    assert names == sorted(r["instrument_name"] for r in rows)
    for ts, venue, f in got:
        msg = json.loads(f)
        assert venue == "deribit"
        assert msg["method"] == "subscription"
        assert ts // 1_000_000 == msg["params"]["data"]["timestamp"]
