"""The block reader (``read_recording_batches``, behind ``read_recording``) against the
line-by-line reader it replaced: the same frames, counts, flags and logs for any bytes.

``reference_read_recording`` is the previous implementation, kept here verbatim as the
oracle: each line through ``orjson.loads`` and the checks one at a time, over ``iter_lines``.
The new reader decodes a good line once with three key lookups and hands anything else to
the same rules; hypothesis feeds both byte soup (valid records, wrong types, duplicate keys,
non-objects, garbage, invalid UTF-8, blank and ``\\r`` lines, a cut-off end) with tiny read
sizes so that lines straddle blocks.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from streamer.feeds.recordings import reader
from streamer.feeds.recordings.reader import (
    Frame,
    RecordingLines,
    ReplayStats,
    _bad,
    iter_lines,
    read_frame_batches,
    read_recording,
    read_recording_batches,
)


def reference_read_recording(
    path: str | os.PathLike[str], *, stats: ReplayStats | None = None
) -> Iterator[Frame]:
    """The line-by-line reader as it was before the block reader (the oracle)."""
    st = stats if stats is not None else ReplayStats()
    st.files += 1
    name = os.fspath(path)
    for line_no, line, complete in iter_lines(path, st):
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            if not complete:
                st.truncated = True
                reader.log.info("replay_truncated_line", path=name, line=line_no)
                return
            st.lines += 1
            _bad(st, name, line_no, "invalid_json")
            continue
        st.lines += 1
        if not isinstance(rec, dict):
            _bad(st, name, line_no, "not_an_object")
            continue
        ts_ns, venue, frame = rec.get("ts_ns"), rec.get("venue"), rec.get("frame")
        if not isinstance(ts_ns, int) or isinstance(ts_ns, bool):
            _bad(st, name, line_no, "bad_ts_ns")
            continue
        if not isinstance(venue, str):
            _bad(st, name, line_no, "bad_venue")
            continue
        if not isinstance(frame, str):
            _bad(st, name, line_no, "bad_frame")
            continue
        st.frames += 1
        yield ts_ns, venue, frame


# -- byte soup ------------------------------------------------------------------------------

TEXT = st.text(
    st.characters(codec="utf-8") | st.sampled_from('"\\\n\r\t\x00é✓'),
    max_size=12,
)
VALUE: st.SearchStrategy[Any] = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["a", "frame"]), st.integers(0, 3), max_size=2),
)


@st.composite
def record_line(draw: st.DrawFn) -> bytes:
    """A record: usually good, sometimes with a field missing, of a wrong type, or extra."""
    fields: dict[str, Any] = {
        "ts_ns": draw(st.integers(0, 2**63 - 1) | VALUE),
        "venue": draw(st.sampled_from(["deribit", "okx"]) | VALUE),
        "frame": draw(TEXT | VALUE),
    }
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True)):
        del fields[key]
    if draw(st.booleans()):
        fields[draw(st.sampled_from(["x", "note"]))] = draw(VALUE)
    keys = draw(st.permutations(sorted(fields)))
    return orjson.dumps({k: fields[k] for k in keys})


RAW_LINES = st.sampled_from(
    [
        b"",
        b" ",
        b"\t",
        b"\x0b",
        b"\x0c \r",
        b"\r",
        b"[1, 2]",
        b'"just a string"',
        b"3",
        b"null",
        b"{",
        b"not json",
        b'{"ts_ns": 1, "ts_ns": true, "venue": "deribit", "frame": "x"}',
        b'{"ts_ns": true, "ts_ns": 7, "venue": "deribit", "frame": "x"}',
        b'{"ts_ns": 1, "venue": "deribit", "frame": "\xff"}',  # invalid UTF-8
        b'{"ts_ns": 1, "venue": "deribit", "frame": "a\\ud800"}',  # lone surrogate
        b'{"ts_ns": 123456789012345678901234, "venue": "deribit", "frame": "big int"}',
        b'{"ts_ns": 1e3, "venue": "deribit", "frame": "float ts"}',
        b'  {"ts_ns": 5, "venue": "deribit", "frame": "padded"}  ',
        b'{"ts_ns": 5, "venue": "deribit", "frame": "x"} trailing',
        b"\xef\xbb\xbf" + b'{"ts_ns": 5, "venue": "deribit", "frame": "bom"}',
    ]
)
LINE = st.one_of(record_line(), record_line(), RAW_LINES, st.binary(max_size=30))


@st.composite
def soup(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(LINE, max_size=25))
    cr = draw(st.lists(st.booleans(), min_size=len(lines), max_size=len(lines)))
    data = b"\n".join(ln + (b"\r" if c else b"") for ln, c in zip(lines, cr, strict=True))
    if draw(st.booleans()):
        data += b"\n"
    if data and draw(st.booleans()):  # a crash cut it somewhere
        data = data[: draw(st.integers(0, len(data)))]
    return data


def _run(fn: Any, path: Path) -> tuple[list[Frame], ReplayStats, list[tuple[Any, ...]]]:
    stats = ReplayStats()
    with capture_logs() as logs:
        frames = list(fn(path, stats=stats))
    return frames, stats, [(e["event"], e.get("line"), e.get("reason")) for e in logs]


def _same_as_reference(path: Path, chunk: int) -> None:
    saved = reader.CHUNK
    reader.CHUNK = chunk
    try:
        want = _run(reference_read_recording, path)
        got = _run(read_recording, path)
        batched = _run(
            lambda p, stats: [f for b in read_recording_batches(p, stats=stats) for f in b], path
        )
        lined = _run(lines_as_parse_lines_reads_them, path)
    finally:
        reader.CHUNK = saved
    assert got == want
    assert batched == want
    assert lined == want


def lines_as_parse_lines_reads_them(
    path: str | os.PathLike[str], *, stats: ReplayStats | None = None
) -> Iterator[Frame]:
    """``RecordingLines`` read the way ``FastPath.parse_lines`` reads it (the same decode
    and checks per line, the rest to ``careful``), written out separately: what reaches the
    frame decoder must be what ``read_recording`` yields."""
    lines = RecordingLines(path, stats=stats)
    for block in lines:
        for line in block:
            try:
                rec = orjson.loads(line)
                ts_ns, venue, frame = rec["ts_ns"], rec["venue"], rec["frame"]
            except Exception:
                ts_ns = venue = frame = None
            if type(ts_ns) is not int or type(venue) is not str or type(frame) is not str:
                got = lines.careful(line)
                if got is None:
                    continue
                ts_ns, venue, frame = got
            yield ts_ns, venue, frame


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=soup(), chunk=st.sampled_from([1, 2, 7, 64, 1 << 16]))
def test_block_reader_equals_the_line_reader_on_byte_soup(
    tmp_path_factory: Any, data: bytes, chunk: int
) -> None:
    path = tmp_path_factory.mktemp("soup") / "soup.jsonl"
    path.write_bytes(data)
    _same_as_reference(path, chunk)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=soup(),
    kind=st.sampled_from(["zst", "gz"]),
    cut=st.floats(0.0, 1.0),
    chunk=st.sampled_from([3, 64, 1 << 16]),
)
def test_block_reader_equals_the_line_reader_compressed_and_cut(
    tmp_path_factory: Any, data: bytes, kind: str, cut: float, chunk: int
) -> None:
    """Compressed in two frames/members (as a flushing recorder writes), then cut anywhere."""
    half = len(data) // 2
    if kind == "zst":
        c = zstandard.ZstdCompressor()
        blob = c.compress(data[:half]) + c.compress(data[half:])
    else:
        blob = gzip.compress(data[:half]) + gzip.compress(data[half:])
    blob = blob[: round(len(blob) * cut)] if cut < 1.0 else blob
    path = tmp_path_factory.mktemp("z") / f"soup.jsonl.{kind}"
    path.write_bytes(blob)
    _same_as_reference(path, chunk)


def test_line_numbers_of_bad_lines_count_blank_and_good_lines(tmp_path: Path) -> None:
    """Hand-checked: line numbers in the logs are 1-based file lines, blanks included."""
    good = orjson.dumps({"ts_ns": 1, "venue": "deribit", "frame": "{}"})
    lines = [good, b"", b"oops", good, b"  ", b"[]", good, good + b"\r", b'{"ts_ns": 2']
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\n".join(lines))
    for fn in (read_recording, lines_as_parse_lines_reads_them):
        frames, stats, logs = _run(fn, path)
        assert len(frames) == 4
        assert logs == [
            ("replay_bad_line", 3, "invalid_json"),
            ("replay_bad_line", 6, "not_an_object"),
            ("replay_truncated_line", 9, None),
        ]
        assert stats.lines == 6 and stats.frames == 4 and stats.truncated


def test_frame_batches_of_a_capture_come_in_lists_of_the_size(tmp_path: Path) -> None:
    path = tmp_path / "cap.0"
    path.write_text("".join(f'1626993723.{i:03d}: {{"i":{i}}}\n' for i in range(25)))
    batches = list(read_frame_batches(path, size=10))
    assert [len(b) for b in batches] == [10, 10, 5]
    assert [f for b in batches for _, _, f in b] == [f'{{"i":{i}}}' for i in range(25)]


def _ticker_lines(n: int) -> bytes:
    """``n`` recording lines shaped like real tickers (about 10x compressible, as they are)."""
    out = []
    for i in range(n):
        frame = orjson.dumps(
            {
                "jsonrpc": "2.0",
                "method": "subscription",
                "params": {
                    "channel": f"ticker.BTC-27DEC24-{1000 * (i % 97)}-C.100ms",
                    "data": {"timestamp": 1735000000000 + i, "best_bid_price": (i % 113) / 7},
                },
            }
        ).decode()
        out.append(orjson.dumps({"ts_ns": i, "venue": "deribit", "frame": frame}) + b"\n")
    return b"".join(out)


@pytest.mark.parametrize("kind", ["zst", "gz"])
def test_compressed_blocks_stay_near_the_chunk_size(tmp_path: Path, kind: str) -> None:
    """A compressed recording is read in compressed pieces sized for about ``CHUNK`` bytes of
    text a block (a block that outgrows the CPU cache is slower to parse), across several
    frames/members: every block but the first within 3x ``CHUNK``, and the same lines and
    frames as the plain file."""
    data = _ticker_lines(6000)
    parts = [data[: len(data) // 3], data[len(data) // 3 :]]
    if kind == "zst":
        blob = b"".join(zstandard.ZstdCompressor().compress(p) for p in parts)
    else:
        blob = b"".join(gzip.compress(p) for p in parts)
    assert len(data) > 10 * reader.CHUNK and len(blob) * 4 < len(data)  # 64 KiB reads: > 4x
    plain, packed = tmp_path / "r.jsonl", tmp_path / f"r.jsonl.{kind}"
    plain.write_bytes(data)
    packed.write_bytes(blob)
    blocks = list(RecordingLines(packed))
    assert [line for b in blocks for line in b] == data.splitlines(keepends=True)
    assert max(sum(map(len, b)) for b in blocks[1:]) <= 3 * reader.CHUNK
    assert list(read_recording(packed)) == list(read_recording(plain))
