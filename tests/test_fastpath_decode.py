"""The fused path's typed decoder (msgspec) against its orjson way, and ``parse_batch``
against ``parse``: the same rows (byte for byte), events, drops and trigger calls.

Frames are assembled as text so that every JSON spelling can occur: numbers as ints, floats,
exponents, ``-0``, 20-digit and 400-digit integers, ``1e400`` (beyond the double range:
orjson refuses the whole frame), nulls, bools, strings, lists and objects where numbers
belong, unknown keys holding any of these, duplicate keys, keys missing, another channel.
The orjson way (``FastPath(typed=False)``) is the reference: it is what the fused path did
before the typed decoder, and what the event path is tested against (test_deribit_parse).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from streamer.book import fastpath
from streamer.book.book import Books
from streamer.book.fastpath import TYPED_MISSES_MAX, FastPath
from streamer.events import Event
from streamer.feeds.deribit.parser import DeribitParser
from streamer.feeds.recordings.reader import RecordingLines, ReplayStats, read_recording_batches
from tests.conftest import shared_file

NAME = "BTC-27DEC24-100000-C"
OTHER = "BTC-27DEC24-90000-C"
TS = 1735000000000

GOOD = {
    "timestamp": "1735000000000",
    "instrument_name": f'"{NAME}"',
    "state": '"open"',
    "best_bid_price": "0.05",
    "best_bid_amount": "3.0",
    "best_ask_price": "0.055",
    "best_ask_amount": "4",
    "bid_iv": "60.0",
    "ask_iv": "64.5",
    "mark_iv": "62",
    "mark_price": "0.052",
    "underlying_price": "97000.5",
    "underlying_index": '"BTC-27DEC24"',
    "index_price": "96500.0",
    "open_interest": "12.0",
    "greeks": '{"delta":0.4,"gamma":1e-5,"vega":50.0,"theta":-30.0,"rho":5.0}',
}

NUMBER = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(-1e6, 1e6, allow_nan=False).map(lambda x: f"{x:.17e}"),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(
        [
            "0",
            "-0",
            "0.0",
            "-0.0",
            "1E2",
            "1e+2",
            "2.5e-3",
            "1e400",
            "-1e400",
            "1e-400",
            "9007199254740993",
            "18446744073709551615",
            "18446744073709551616",
            "9223372036854775808",
            "-9223372036854775809",
            "1" + "0" * 400,
            "0.1e309",
            "1" + "0" * 308,
        ]
    ),
)
STRING = st.text(
    st.characters(codec="utf-8") | st.sampled_from('"\\é'),
    max_size=6,
).map(lambda s: orjson.dumps(s).decode())
VALUE = st.one_of(
    NUMBER,
    NUMBER,
    STRING,
    st.sampled_from(["null", "true", "false", "[]", "[1,2]", "{}", '{"a":1}', '"\\u00e9"']),
)
GREEKS = st.one_of(
    st.just(GOOD["greeks"]),
    st.dictionaries(
        st.sampled_from(["delta", "gamma", "vega", "theta", "rho", "extra"]), VALUE, max_size=4
    ).map(lambda d: "{" + ",".join(f'"{k}":{v}' for k, v in d.items()) + "}"),
    VALUE,
)
KEYS = sorted(GOOD)
EXTRA = ["stats", "last_price", "settlement_price", "estimated_delivery_price", "new_field"]


@st.composite
def ticker_text(draw: st.DrawFn) -> str:
    data = dict(GOOD)
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=4, unique=True)):
        data[key] = draw(GREEKS if key == "greeks" else VALUE)
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=2, unique=True)):
        del data[key]
    for key in draw(st.lists(st.sampled_from(EXTRA), max_size=2, unique=True)):
        data[key] = draw(
            VALUE | st.just('{"high":1,"low":null,"volume":2.5}') | st.just('{"volume":1e400}')
        )
    items = [f'"{k}":{v}' for k, v in data.items()]
    items = draw(st.permutations(items))
    if items and draw(st.integers(0, 9)) == 0:  # a duplicate key: the last one wins
        items = [*items, f'"{draw(st.sampled_from(KEYS))}":{draw(VALUE)}']
    name = draw(st.sampled_from([NAME, NAME, NAME, OTHER]))
    channel = draw(st.sampled_from([f"ticker.{name}.100ms", f"ticker.{name}.raw", "book.x.raw"]))
    sep = draw(st.sampled_from(["", " ", "\n\t"]))
    top = [
        '"jsonrpc":"2.0"',
        '"method":"subscription"',
        f'"params":{{"channel":"{channel}",{sep}"data":{{{",".join(items)}}}}}',
    ]
    if draw(st.integers(0, 9)) == 0:
        top.append('"id":7')
    return sep + "{" + f",{sep}".join(draw(st.permutations(top))) + "}" + sep


def warm_frame(name: str) -> str:
    data = ",".join(f'"{k}":{v}' for k, v in {**GOOD, "instrument_name": f'"{name}"'}.items())
    return (
        '{"jsonrpc":"2.0","method":"subscription","params":'
        f'{{"channel":"ticker.{name}.100ms","data":{{{data}}}}}}}'
    )


class Run:
    """One FastPath over fresh books, recording what it does."""

    def __init__(self, *, typed: bool, hook: bool = True) -> None:
        self.parser = DeribitParser(log_first=0)
        self.books = Books()
        self.writes: list[tuple[str, int, float, bool]] = []
        on_write = self._on_write if hook else None  # None: replay --model none
        self.fast = FastPath(self.parser, self.books, on_write, typed=typed)
        self.events: list[str] = []
        for i, name in enumerate((NAME, OTHER)):
            self.fast.apply(warm_frame(name), i)

    def _on_write(self, book: Any, slot: int, forward: float, changed: bool) -> bool:
        self.writes.append((book.underlying, slot, float(forward), changed))
        return changed

    def on_event(self, ev: Event) -> None:
        self.events.append(repr(ev))
        self.books.on_event(ev)

    def apply(self, frame: str | bytes, ns: int) -> None:
        for ev in self.fast.apply(frame, ns):
            self.events.append(repr(ev))

    def state(self) -> tuple[Any, ...]:
        rows = tuple(bytes(b.buffer) for b in self.books)
        return (
            rows,
            self.events,
            self.writes,
            self.parser.frames,
            self.parser.drops,
            self.parser.skipped,
            self.fast.last_recv_ns,
        )


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ticker_text(), min_size=1, max_size=6))
def test_typed_decoder_writes_what_the_orjson_way_writes(frames: list[str]) -> None:
    ref = Run(typed=False)
    typed = Run(typed=True)
    as_bytes = Run(typed=True)
    batch = Run(typed=True)
    for i, f in enumerate(frames, start=10):
        ref.apply(f, i)
        typed.apply(f, i)
        as_bytes.apply(f.encode(), i)
    batch.fast.parse_batch(
        [(i, "deribit", f) for i, f in enumerate(frames, start=10)], batch.on_event
    )
    want = ref.state()
    assert typed.state() == want
    assert as_bytes.state() == want
    assert batch.state() == want
    assert as_bytes.fast.typed_hits == 0  # bytes always take the orjson way


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=60) | st.text(max_size=40), max_size=6))
def test_garbage_frames_the_same_either_way(frames: list[str | bytes]) -> None:
    ref, typed, batch = Run(typed=False), Run(typed=True), Run(typed=True)
    for i, f in enumerate(frames):
        ref.apply(f, i)
        typed.apply(f, i)
    batch.fast.parse_batch([(i, "deribit", f) for i, f in enumerate(frames)], batch.on_event)
    assert typed.state() == ref.state() == batch.state()


def test_the_typed_decoder_is_what_fuses_plain_tickers() -> None:
    """Not a timing test: the typed decoder is in use (hits) for ordinary tickers."""
    run = Run(typed=True)
    for i in range(5):
        run.apply(warm_frame(NAME).replace("0.05,", f"0.0{i + 5},"), i)
    assert run.fast.typed_hits == 5 and run.fast.typed_misses == 0
    row = run.books.get("deribit", "BTC").quote_row(NAME)  # type: ignore[union-attr]
    assert row is not None and row["bid"] == 0.09 and row["mark_iv"] == 0.62


def test_out_of_range_numbers_drop_the_frame_whichever_field() -> None:
    """orjson refuses a number beyond the double range anywhere in a frame (bad_json); the
    typed decoder must not accept it either, also in a field nobody reads."""
    frames = [
        warm_frame(NAME).replace('"open_interest":12.0', '"open_interest":1e400'),
        warm_frame(NAME).replace('"state":"open"', '"state":"open","new_field":-1e400'),
        warm_frame(NAME).replace('"open_interest":12.0', '"stats":{"volume":1e999}'),
    ]
    for f in frames:
        ref, typed = Run(typed=False), Run(typed=True)
        ref.apply(f, 5)
        typed.apply(f, 5)
        assert ref.parser.drops == Counter(bad_json=1)
        assert typed.state() == ref.state()


def test_typed_decoding_switches_off_when_tickers_carry_unknown_fields() -> None:
    """A venue that adds a ticker field: every typed attempt fails and the orjson way fuses;
    after TYPED_MISSES_MAX such misses the typed decoder is off (logged once), and the rows
    are what the orjson way writes throughout."""
    frame = warm_frame(NAME).replace('"state":"open"', '"state":"open","brand_new":1')
    ref, typed = Run(typed=False), Run(typed=True)
    with capture_logs() as logs:
        for i in range(TYPED_MISSES_MAX + 10):
            ref.apply(frame, i)
            typed.apply(frame, i)
    assert typed.fast.typed is False and typed.fast.typed_misses == TYPED_MISSES_MAX
    assert [e["event"] for e in logs].count("fastpath_typed_decoding_off") == 1
    assert typed.state() == ref.state()


def test_a_few_misses_among_hits_keep_the_typed_decoder_on() -> None:
    odd = warm_frame(NAME).replace('"best_bid_price":0.05', '"best_bid_price":true')
    run = Run(typed=True)
    for i in range(3 * TYPED_MISSES_MAX):
        run.apply(odd if i % 3 == 0 else warm_frame(NAME), i)
    assert run.fast.typed is True
    assert run.fast.typed_misses == TYPED_MISSES_MAX and run.fast.typed_hits == 2 * TYPED_MISSES_MAX


def _real_capture_frames() -> list[str]:
    path = shared_file("raw/cryptofeed-DERIBIT.ws.1.0")
    return [
        line.split(": ", 1)[1]
        for line in Path(path).read_text().splitlines()
        if '"channel":"' in line and not line.startswith("wss://")
    ]


def test_real_deribit_frames_the_same_either_way() -> None:
    """Deribit's own 2021 capture (tickers with every field, books, trades), twice over so
    that the second pass fuses: the typed decoder knows all of a real ticker's fields."""
    frames = _real_capture_frames() * 2
    ref, typed, batch = Run(typed=False), Run(typed=True), Run(typed=True)
    for i, f in enumerate(frames):
        ref.apply(f, i)
        typed.apply(f, i)
    batch.fast.parse_batch([(i, "deribit", f) for i, f in enumerate(frames)], batch.on_event)
    assert typed.state() == ref.state() == batch.state()
    n_tickers = sum('"channel":"ticker.' in f for f in frames)
    assert typed.fast.typed_hits >= n_tickers // 2 - 2  # the second pass: all typed
    assert typed.fast.typed_misses == 0


@pytest.mark.parametrize("text", ["-0", "-0.0", "0", "1e-400", "-1e-400"])
def test_zero_spellings_land_as_the_same_bytes(text: str) -> None:
    """The sign of a zero survives (or not) the same way: orjson's int 0 for "-0" packs as
    +0.0, msgspec's float for "-0" is +0.0 too; "-0.0" is -0.0 in both."""
    f = warm_frame(NAME).replace('"mark_price":0.052', f'"mark_price":{text}')
    ref, typed = Run(typed=False), Run(typed=True)
    ref.apply(f, 1)
    typed.apply(f, 1)
    assert typed.fast.typed_hits == 1
    assert typed.state() == ref.state()
    row = typed.books.get("deribit", "BTC").quote_row(NAME)  # type: ignore[union-attr]
    assert row is not None
    assert math.copysign(1.0, row["mark_price"]) == math.copysign(1.0, float(orjson.loads(text)))


@pytest.mark.parametrize(
    "text",
    [
        "9223372036854775807",
        "9223372036854775808",  # beyond int64, within orjson's uint64 ints
        "18446744073709551616",  # beyond uint64: orjson makes it a float (not fused)
        "1" + "0" * 30,
        "1" + "0" * 400,  # beyond the double range: bad_json
        "-9223372036854775809",
        "1735000000000.0",
        "1.735e12",
        "true",
        "null",
        '"1735000000000"',
    ],
    ids=lambda t: t[:24],
)
def test_timestamp_spellings_decide_the_same(text: str) -> None:
    f = warm_frame(NAME).replace('"timestamp":1735000000000', f'"timestamp":{text}')
    ref, typed = Run(typed=False), Run(typed=True)
    ref.apply(f, 1)
    typed.apply(f, 1)
    assert typed.state() == ref.state()


# -- key orders, and parse_lines ----------------------------------------------------------------

_DATA_FIELDS = fastpath._TickerData.__struct_fields__
_GREEKS_FIELDS = fastpath._Greeks.__struct_fields__


def _decoded(loads: Any, frame: str) -> Any:
    try:
        return msgspec.to_builtins(loads(frame))
    except Exception as exc:  # the kind of failure, not its message (which names a field)
        return type(exc).__name__


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(ticker_text(), min_size=1, max_size=4),
    data_order=st.permutations(_DATA_FIELDS),
    greeks_order=st.permutations(_GREEKS_FIELDS),
)
def test_a_decoder_in_another_key_order_decodes_the_same(
    frames: list[str], data_order: list[str], greeks_order: list[str]
) -> None:
    """The declared field order is only where msgspec looks first: same values, same
    refusals, whatever the order of the keys on the wire."""
    reordered = fastpath.ticker_decoder(data_order, greeks_order)
    for f in frames:
        assert _decoded(reordered, f) == _decoded(fastpath._typed_loads, f)


def test_the_fused_path_learns_the_wire_order_of_tickers(monkeypatch: pytest.MonkeyPatch) -> None:
    # the process-wide decoders (at most ORDERS_MAX orders) may be used up by earlier tests'
    # odd key orders: this one starts with room to learn
    monkeypatch.setattr(fastpath, "_DECODERS", {})
    run = Run(typed=True)  # warm_frame's order: GOOD's
    want = (tuple(orjson.loads(warm_frame(NAME))["params"]["data"]), ())
    assert run.fast._orders[0] == want[0]


def _recording(frames: list[str | bytes], junk: list[bytes]) -> bytes:
    lines = []
    for i, f in enumerate(frames):
        text = f if isinstance(f, str) else f.decode("utf-8", "replace")
        lines.append(orjson.dumps({"ts_ns": 10 + i, "venue": "deribit", "frame": text}))
        if i < len(junk):
            lines.append(junk[i])
    return b"\n".join(lines) + b"\n"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(ticker_text() | st.text(max_size=40), min_size=1, max_size=8),
    junk=st.lists(
        st.sampled_from(
            [
                b"",
                b"  ",
                b"oops",
                b"[]",
                b'{"ts_ns":true,"venue":"d","frame":"x"}',
                b'{"ts_ns":1,"venue":"d","frame":3}',
                b'{"ts_ns":1,"venue":"d"}',
            ]
        ),
        max_size=4,
    ),
    cut=st.booleans(),
)
def test_parse_lines_does_what_reading_frames_and_parse_batch_do(
    tmp_path_factory: Any, frames: list[str | bytes], junk: list[bytes], cut: bool
) -> None:
    """Replay's loop (``RecordingLines`` into ``parse_lines``) against the reader's frames
    into ``parse_batch``: the same rows, events, trigger calls, counts and stats."""
    data = _recording(frames, junk)
    if cut:
        data = data[:-1]  # no final newline: the last line comes alone
    path = tmp_path_factory.mktemp("lines") / "r.jsonl"
    path.write_bytes(data)
    for hook in (True, False):
        ref, new = Run(typed=True, hook=hook), Run(typed=True, hook=hook)
        ref_stats, new_stats = ReplayStats(), ReplayStats()
        for block in read_recording_batches(path, stats=ref_stats):
            for ts_ns, _, frame in block:  # frame by frame: parse_batch runs parse_lines' loop
                ref.apply(frame, ts_ns)
        lines = RecordingLines(path, stats=new_stats)
        with capture_logs() as logs:
            n = new.fast.parse_lines(lines, lines.careful, new.on_event)
        assert new.state() == ref.state()
        assert new_stats == ref_stats and n == ref_stats.frames
        bad = sum(new_stats.bad_lines.values())
        assert [e["event"] for e in logs].count("replay_bad_line") == bad  # each drop logged


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ticker_text() | st.binary(max_size=30), min_size=1, max_size=8))
def test_without_a_trigger_the_batch_writes_what_parse_writes(frames: list[str | bytes]) -> None:
    """``--model none`` (no ``on_write``): the batch loop's own write, against ``parse``
    frame by frame, and the same rows as with a trigger."""
    ref, batch, hooked = Run(typed=True, hook=False), Run(typed=True, hook=False), Run(typed=True)
    for i, f in enumerate(frames, start=10):
        ref.apply(f, i)
        hooked.apply(f, i)
    batch.fast.parse_batch(
        [(i, "deribit", f) for i, f in enumerate(frames, start=10)], batch.on_event
    )
    assert batch.state() == ref.state()
    assert batch.fast.typed_hits == ref.fast.typed_hits
    assert [bytes(b.buffer) for b in batch.books] == [bytes(b.buffer) for b in hooked.books]


def test_hits_of_a_long_batch_count_before_misses_are_judged() -> None:
    """One long ``parse_lines`` call (a whole recording): the misses among many hits do not
    switch typed decoding off, as they do not frame by frame (the hits were once added only
    at the end of the call, so 1,024 misses looked like all there was)."""
    odd = warm_frame(NAME).replace('"best_bid_price":0.05', '"best_bid_price":true')
    frames = [odd if i % 3 == 0 else warm_frame(NAME) for i in range(3 * TYPED_MISSES_MAX)]
    blocks = [  # one block: what a recording's lines look like to parse_lines
        [
            orjson.dumps({"ts_ns": i, "venue": "deribit", "frame": f}) + b"\n"
            for i, f in enumerate(frames)
        ]
    ]
    ref, run = Run(typed=True), Run(typed=True)
    for i, f in enumerate(frames):
        ref.apply(f, i)
    n = run.fast.parse_lines(blocks, lambda line: None, run.on_event)
    assert n == len(frames) and run.fast.typed is True
    assert run.fast.typed_misses == TYPED_MISSES_MAX and run.fast.typed_hits == 2 * TYPED_MISSES_MAX
    assert run.state() == ref.state()
