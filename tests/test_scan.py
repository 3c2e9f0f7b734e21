"""The compiled recording scanner (``streamer.book.scan``) against the reference path.

The reference is ``FastPath(scanning=False).parse_lines``: the typed decoder and the orjson
way, tested against the event path in ``test_fastpath_decode`` and ``test_deribit_parse``.
With the scanner on, every recording must leave the same rows (byte for byte), events,
counters and receive time, whatever the lines hold; the scanner may only decide *who* does
the work. Numbers are checked against Python's own ``float()`` (correctly rounded), and
against the JSON grammar (``json.loads``).
"""

from __future__ import annotations

import json
import math
from decimal import Decimal, getcontext
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.book import scan
from streamer.book.book import Books
from streamer.book.fastpath import FastPath
from streamer.events import Event
from streamer.feeds.deribit.parser import DeribitParser
from streamer.feeds.recordings.reader import Lines, RecordingLines, ReplayStats
from tests.test_fastpath_decode import NAME, OTHER, ticker_text, warm_frame

REPO = Path(__file__).resolve().parents[1]


def _read(text: str) -> tuple[int, float]:
    b = np.frombuffer(text.encode() + b"\n", dtype=np.uint8)  # a line's end, as in a block
    i, v, _ = scan._number(b, 0, len(b))
    return int(i), float(v)


def _same_double(a: float, b: float) -> bool:
    return np.float64(a).tobytes() == np.float64(b).tobytes()


DIGITS = st.text("0123456789", min_size=1, max_size=20)


@st.composite
def decimal_text(draw: st.DrawFn) -> str:
    """Numbers as JSON spells them (and a few it does not)."""
    whole = draw(DIGITS)
    if draw(st.booleans()):
        whole = whole.lstrip("0") or "0"  # else maybe a leading zero: not JSON
    frac = draw(st.none() | DIGITS)
    exp = draw(st.none() | st.integers(-40, 40))
    text = draw(st.sampled_from(["", "-"])) + whole
    if frac is not None:
        text += "." + frac
    if exp is not None:
        text += draw(st.sampled_from(["e", "E"])) + draw(st.sampled_from(["", "+"])) + str(exp)
    return text


@settings(max_examples=800, deadline=None)
@given(decimal_text() | st.floats(allow_nan=False, allow_infinity=False).map(repr))
def test_a_number_it_reads_is_the_double_python_reads(text: str) -> None:
    """Whatever it takes whole is the correctly rounded double of that JSON number, to the
    sign; nothing that is not a JSON number is taken whole."""
    i, v = _read(text)
    if i < len(text):  # refused, or a number ends early ("01": the line then declines,
        return  # no separator follows)
    want = float(json.loads(text))  # a JSON number (raises otherwise); an int: float(int)
    assert _same_double(v, want), (text, v, want)


@pytest.mark.parametrize(
    ("text", "taken"),
    [
        ("0", True),
        ("-0", True),  # an integer: 0.0, as orjson and msgspec read it
        ("-0.0", True),  # a float: -0.0
        ("0e5000", True),
        ("90646.95285714285", True),  # 16 digits, above 2^53: exact long division
        ("3291.0586455808957", True),  # 17 digits
        ("0.000000000000000001", True),
        ("9007199254740993", True),  # 2^53 + 1, an integer: one conversion
        ("123456789012345678", True),  # 18 digits
        ("1234567890123456789", False),  # 19: beyond what it reads
        ("1e23", False),  # beyond 10^22
        ("1e-23", False),
        ("1e400", False),
        ("01", False),
        ("1.", False),
        (".5", False),
        ("-", False),
        ("+1", False),
        ("1e", False),
        ("1e+", False),
        ("--1", False),
    ],
)
def test_number_spellings(text: str, taken: bool) -> None:
    i, v = _read(text)
    if taken:
        assert i == len(text)
        assert _same_double(v, float(json.loads(text)))
    else:
        assert i < 0 or i < len(text)  # not taken, or not all of it (the line declines)


def test_many_random_decimals_read_as_python_reads_them() -> None:
    """30,000 decimals of 1-18 digits, the point anywhere, some with an exponent: each
    taken is the double Python reads, and the only ones not taken are those it declines by
    design (a significand above 2^53 with a positive power of ten)."""
    rng = np.random.default_rng(11)
    taken = 0
    for _ in range(30_000):
        digits = "".join(map(str, rng.integers(0, 10, int(rng.integers(1, 19)))))
        digits = digits.lstrip("0") or "0"
        point = int(rng.integers(0, len(digits) + 1))
        text = digits if point in (0, len(digits)) else digits[:point] + "." + digits[point:]
        e10 = point - len(digits) if "." in text else 0
        if rng.random() < 0.2:
            exp = int(rng.integers(-5, 6))
            text += f"e{exp}"
            e10 += exp
        if rng.random() < 0.3:
            text = "-" + text
        i, v = _read(text)
        if i != len(text):
            assert int(digits) > 2**53 and e10 > 0, text
            continue
        taken += 1
        assert _same_double(v, float(json.loads(text))), text
    assert taken > 28_000


def test_halfway_cases_round_to_even() -> None:
    """Decimals within a few units of the 18th digit of the midpoint between two
    neighbouring doubles: where a rounding slip would show."""
    getcontext().prec = 60
    rng = np.random.default_rng(7)
    checked = 0
    for x in rng.uniform(1e-3, 1e5, 4000):
        v = float(x)
        mid = (Decimal(v) + Decimal(math.nextafter(v, math.inf))) / 2
        for digits in (16, 17, 18):
            text = f"{mid:.{digits}g}"
            if "e" in text:
                continue
            i, got = _read(text)
            if i == len(text):
                checked += 1
                assert _same_double(got, float(text)), text
    assert checked > 8000


# -- lines: the scanner against the reference ---------------------------------------------------


class Replay:
    """One ``parse_lines`` run over fresh books, recording what it does."""

    def __init__(self, *, scanning: bool, capacity: int = 64) -> None:
        self.parser = DeribitParser(log_first=0)
        self.books = Books(capacity=capacity)
        self.fast = FastPath(self.parser, self.books, scanning=scanning)
        self.events: list[str] = []

    def on_event(self, ev: Event) -> None:
        self.events.append(repr(ev))
        self.books.on_event(ev)

    def run(self, blocks: list[list[bytes]]) -> None:
        self.fast.parse_lines(blocks, lambda line: None, self.on_event)

    def state(self) -> tuple[Any, ...]:
        return (
            [(b.underlying, bytes(b.buffer)) for b in self.books],
            self.events,
            self.parser.frames,
            self.parser.drops,
            self.parser.skipped,
            self.fast.last_recv_ns,
            self.fast.typed_hits,
            self.fast.typed_misses,
            {b.underlying: b.rejected for b in self.books},
        )


def _line(ts_ns: int, frame: str) -> bytes:
    return orjson.dumps({"ts_ns": ts_ns, "venue": "deribit", "frame": frame}) + b"\n"


def _both(blocks: list[list[bytes]], capacity: int = 64) -> Replay:
    """Both ways over ``blocks`` (lists of lines, each ending with its newline, as the
    reader cuts them), the scanner's as the reader's ``Lines``."""
    ref, new = Replay(scanning=False, capacity=capacity), Replay(scanning=True, capacity=capacity)
    ref.run(blocks)
    new.run([Lines(b) for b in blocks])
    assert new.state() == ref.state()
    return new


WARM = [_line(1, warm_frame(NAME)), _line(2, warm_frame(OTHER))]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ticker_text(), min_size=1, max_size=8), st.integers(1, 4))
def test_any_ticker_spelling_leaves_what_the_reference_leaves(frames: list[str], cut: int) -> None:
    """Tickers in every spelling the typed decoder's tests use (numbers of every form,
    nulls, strings, objects, unknown and duplicate keys, missing ones, other channels,
    whitespace), after warm-up lines, in blocks cut anywhere."""
    lines = WARM + [_line(10 + i, f) for i, f in enumerate(frames)]
    _both([lines[:cut], lines[cut:]])


INTERESTING = b'"\\,:{}[]0123456789eE+-. \r\ntnfu\x00\x7f\xc3\xa9'


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["replace", "insert", "delete"]),
            st.integers(0, 10_000),
            st.sampled_from(list(INTERESTING)),
        ),
        min_size=1,
        max_size=3,
    ),
    st.booleans(),
)
def test_a_damaged_line_leaves_what_the_reference_leaves(
    edits: list[tuple[str, int, int]], crlf: bool
) -> None:
    """A good ticker line with bytes replaced, inserted or deleted anywhere (the record,
    the frame's escapes, keys, numbers), between good lines."""
    good = _line(5, warm_frame(NAME))
    line = bytearray(good[:-1])
    for op, where, byte in edits:
        at = where % (len(line) + 1)
        if op == "replace" and at < len(line):
            line[at] = byte
        elif op == "insert":
            line.insert(at, byte)
        elif line and at < len(line):
            del line[at]
    damaged = BytesIO(bytes(line) + (b"\r\n" if crlf else b"\n")).readlines()  # as read
    _both([[*WARM, *damaged, good, *damaged, _line(9, warm_frame(OTHER))]])


def test_plain_tickers_of_known_channels_are_the_scanners() -> None:
    """After an instrument's first sight, its plain tickers are taken. (In the block of its
    first sight, its next line still takes the reference way: a channel is hashed into the
    scanner's table at the next block, or when it comes again.)"""
    lines = [_line(10 + i, warm_frame(NAME if i % 2 else OTHER)) for i in range(50)]
    new = _both([WARM, lines])  # taught in one block, hashed in before the next
    assert new.fast.scanned == 50
    assert new.fast.typed_hits == 50  # counted as the typed decoder's, as before


def test_rows_that_move_and_instruments_that_go() -> None:
    """Books that regrow their arrays mid-block (capacity 2: 300 instruments) and
    instruments removed by an instrument.state notification, then quoted again (a removed
    name's slot is reused): the scanner writes where the reference writes."""
    names = [f"BTC-27DEC24-{90_000 + 500 * k}-{'C' if k % 2 else 'P'}" for k in range(300)]
    lines: list[bytes] = []
    ts = 10
    for rnd in range(3):
        for k, name in enumerate(names):
            lines.append(_line(ts, warm_frame(name).replace("0.052", f"0.0{rnd}{k % 10}")))
            ts += 1
        gone = names[rnd * 7]
        state = {
            "jsonrpc": "2.0",
            "method": "subscription",
            "params": {
                "channel": "instrument.state.option.BTC",
                "data": {"timestamp": 1735000000500 + rnd, "state": "closed",
                         "instrument_name": gone},
            },
        }  # fmt: skip
        lines.append(_line(ts, orjson.dumps(state).decode()))
    blocks = [lines[i : i + 97] for i in range(0, len(lines), 97)]
    new = _both(blocks, capacity=2)
    assert new.fast.scanned > 500


@pytest.mark.parametrize("name", ["calm.jsonl.zst", "regime-shift.jsonl.zst"])
def test_bundled_recordings_leave_what_the_reference_leaves(name: str) -> None:
    """The bundled hours of real-shaped BTC options, through ``RecordingLines`` as replay
    reads them (the scanner from its ``blocks()``, bytes not split into lines): the same
    rows, counts and stats, and nearly every line is the scanner's (all but first sights
    and the instrument listing)."""
    path = REPO / "replay_data" / name
    out = []
    for scanning in (False, True):
        run = Replay(scanning=scanning)
        stats = ReplayStats()
        lines = RecordingLines(path, stats=stats)
        source = lines.blocks() if scanning else lines
        n = run.fast.parse_lines(source, lines.careful, run.on_event)
        out.append((run.state(), stats, n))
    assert out[0] == out[1]
    assert run.fast.scanned > 0.95 * out[1][2]


def test_blocks_not_known_to_be_lines_take_the_reference_way() -> None:
    """A plain list of lines (a caller's, not the reader's ``Lines``) is not scanned: its
    items could hold two lines, or one without its newline."""
    a, b = _line(10, warm_frame(NAME)), _line(11, warm_frame(OTHER))
    ref, new = Replay(scanning=False), Replay(scanning=True)
    for run in (ref, new):
        run.run([[*WARM], [a + b, a[:-1]], [b]])
    assert new.state() == ref.state() and new.fast.scanned == 0


def test_the_replay_loop_counts_lines_as_before(tmp_path: Path) -> None:
    """Through ``RecordingLines`` (bad lines, blank ones, a cut-off end), as lines and as
    ``blocks()``: the same stats and frames every way."""
    good = [_line(10 + i, warm_frame(NAME)) for i in range(5)]
    data = b"".join([*WARM, good[0], b"\n", b"oops\n", good[1], b"  \n", *good[2:]])[:-3]
    path = tmp_path / "r.jsonl"
    path.write_bytes(data)
    out = []
    for scanning, text in ((False, False), (True, False), (True, True)):
        run = Replay(scanning=scanning)
        stats = ReplayStats()
        lines = RecordingLines(path, stats=stats)
        n = run.fast.parse_lines(lines.blocks() if text else lines, lines.careful, run.on_event)
        out.append((run.state(), stats, n))
    assert out[0] == out[1] == out[2]
    assert out[1][1].bad_lines["invalid_json"] == 1 and out[1][1].truncated


def test_the_scanner_stops_at_lines_it_does_not_take() -> None:
    """``scan_block`` itself: lines of an unknown channel say which channel; it reads on
    over lines it does not take (a cut-off final line, a damaged one) to the next it takes,
    and writes what it takes."""
    table = scan.ChannelTable()
    rows = np.full((4, scan.NVAL), np.nan)

    class Holder:
        row_array = rows

    from streamer.book.fastpath import _SCAN_KEYS, _SCAN_LEVEL_TABLE, _SCAN_META

    follow = np.full(len(_SCAN_META) + len(_SCAN_LEVEL_TABLE), -1, dtype=np.int64)
    out = np.zeros(scan.OUT_SIZE, dtype=np.int64)
    run = np.zeros(2 * scan.RUN_MAX, dtype=np.int64)
    good = _line(77, warm_frame(NAME))
    channel = f"ticker.{NAME}.100ms".encode()

    def scan_(text: bytes) -> int:
        b = np.frombuffer(text, dtype=np.uint8)
        return int(
            scan.scan_block(
                b, 0, len(b), _SCAN_KEYS, _SCAN_META, _SCAN_LEVEL_TABLE, table.tab,
                table.ent_bytes, table.ent_meta, table.rows, follow, out, run,
            )
        )  # fmt: skip

    assert scan_(good + good) == scan.STOP and out[scan.RUN] == 2 and out[scan.DONE] == 0
    assert good[run[0] : run[1]] == channel and (good + good)[run[2] : run[3]] == channel
    assert out[scan.POS] == 0 and out[scan.NEXT] == 2 * len(good)
    assert table.add(channel, NAME, Holder(), 2)
    assert scan_(good) == scan.STOP  # not hashed in yet
    table.flush()
    assert scan_(good + good) == scan.END and out[scan.DONE] == 2 and out[scan.LAST_TS] == 77
    assert rows[2, 0] == 1735000000000 and rows[2, 1] == 0.05 and rows[2, 7] == 0.60
    damaged = good.replace(b"0.05,", b"0.05 ,")  # whitespace: not its own
    other = _line(78, warm_frame(OTHER))
    assert scan_(good + damaged + other + good + damaged) == scan.STOP
    assert out[scan.DONE] == 1 and out[scan.RUN] == 2 and out[scan.POS] == len(good)
    assert out[scan.NEXT] == len(good) + len(damaged) + len(other)
    assert list(run[:2]) == [-1, -1] and run[2] > 0  # damaged; an unknown channel
    assert scan_(good + good[:-1]) == scan.STOP  # cut off: no final newline, nothing read
    assert out[scan.DONE] == 0 and out[scan.RUN] == 1
    assert scan_(good.replace(b"\n", b"\r\n")) == scan.END
