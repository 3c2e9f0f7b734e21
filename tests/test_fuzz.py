"""Fuzzing with hypothesis: the parser, the config loader and the book never fail in a way
nobody sees.

* The parser (``DeribitParser`` and the daemon's fused ``FastPath``), on arbitrary bytes,
  arbitrary text, arbitrary JSON and Deribit-shaped notifications with arbitrary field values:
  never raises, counts every frame, and every frame either yields events, is skipped (valid,
  not an option) or is dropped under a reason. Frames over the configured maximum are dropped
  as ``too_large`` before they are decoded (however broken their JSON).
* The config loader (``config_from_table``), on arbitrary tables (known and unknown keys,
  any TOML value, NaN and infinities, nested tables) and arbitrary ``STREAMER__`` overrides:
  a ``ConfigError`` naming a key, or a ``Config`` whose numbers are finite and within their
  documented ranges; nothing else.
* The book, as a state machine over random listings, quotes (some with timestamps in the
  wrong unit or skewed, NaN or missing forwards, crossed or empty sides), venue expiries,
  relistings and snapshots at advancing times: every published forward is finite and
  positive, every snapshot is internally consistent, a settled expiry's instruments never
  come back, and a delisted instrument of a live expiry can be relisted.

The example counts are in ``EXAMPLES`` (the README's reliability section reports them).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import orjson
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from streamer.book.book import MAX_TS_MS, MIN_TS_MS, Book, Books
from streamer.book.fastpath import FastPath
from streamer.config import Config, config_from_table
from streamer.errors import ConfigError
from streamer.events import (
    Event,
    Instrument,
    InstrumentExpired,
    InstrumentListed,
    Quote,
)
from streamer.feeds.deribit.parser import DeribitParser
from streamer.instruments import expiry_code_of, parse_option

EXAMPLES = {"parser": 500, "parser_shaped": 500, "config": 600, "book": 200}
NOW = 1_767_600_000_000  # 2026-01-05 08:00 UTC
DAY = 86_400_000


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """Thousands of counted drops: their warnings would only fill the output (the conftest
    fixture restores logging after each test)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    yield


# -- the parser ---------------------------------------------------------------------------------

json_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # what JSON libraries exchange (orjson: 64 bits)
    | st.floats()
    | st.text(max_size=20)
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=30,
)
CHANNELS = (
    "ticker.BTC-27DEC24-100000-C.100ms",
    "book.BTC-27DEC24-100000-C.100ms",
    "book.BTC-27DEC24-100000-C.none.10.100ms",
    "quote.BTC-27DEC24-100000-C",
    "trades.option.BTC.100ms",
    "markprice.options.btc_usd",
    "deribit_price_index.btc_usd",
    "instrument.state.option.BTC",
    "ticker.BTC-PERPETUAL.100ms",
    "nonsense",
)
FIELDS = (
    "timestamp",
    "instrument_name",
    "best_bid_price",
    "best_bid_amount",
    "best_ask_price",
    "best_ask_amount",
    "mark_price",
    "mark_iv",
    "bid_iv",
    "ask_iv",
    "underlying_price",
    "underlying_index",
    "index_price",
    "greeks",
    "open_interest",
    "type",
    "change_id",
    "prev_change_id",
    "bids",
    "asks",
    "state",
    "price",
    "index_name",
    "direction",
    "amount",
    "iv",
)
field_value = (
    json_value
    | st.sampled_from(["BTC-27DEC24-100000-C", "BTC-27DEC24-100000-P", "ETH-PERPETUAL"])
    | st.sampled_from(["snapshot", "change", "created", "settled", "buy"])
    | st.integers(min_value=MIN_TS_MS - DAY, max_value=MAX_TS_MS * 1000)
    | st.lists(st.lists(json_scalar | st.sampled_from(["new", "change", "delete"]), max_size=4))
)
data_dict = st.dictionaries(st.sampled_from(FIELDS), field_value, max_size=len(FIELDS))
notification = st.builds(
    lambda ch, data, wrap: {"jsonrpc": "2.0", "method": "subscription", "params": wrap(ch, data)},
    st.sampled_from(CHANNELS),
    data_dict | st.lists(data_dict, max_size=3),
    st.sampled_from(
        [
            lambda ch, d: {"channel": ch, "data": d},
            lambda ch, d: {"channel": ch},
            lambda ch, d: {"data": d},
            lambda ch, d: d,
        ]
    ),
)
rpc = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0")},
    optional={
        "id": json_value,
        "result": json_value | st.lists(data_dict, max_size=3),
        "error": json_value | st.fixed_dictionaries({"code": json_value, "message": json_value}),
        "method": st.sampled_from(["heartbeat", "subscription", "other"]) | json_value,
        "params": json_value | st.fixed_dictionaries({"type": json_value}),
    },
)
LIMIT = 2_048


def empty_list(frame: str | bytes) -> bool:
    """A list-valued channel's notification with nothing in it (no trades, no marks)."""
    try:
        msg = orjson.loads(frame)
        return msg["params"]["data"] == []  # type: ignore[no-any-return]
    except Exception:
        return False


def accounted(
    parser: DeribitParser, before: tuple[int, int, int], events: object, frame: str | bytes
) -> None:
    """One frame more, and it gave events, or was skipped, or dropped: never nothing (but
    for an empty list, which says nothing)."""
    frames, drops, skipped = before
    assert parser.frames == frames + 1
    assert isinstance(events, list | tuple)
    assert all(isinstance(e, Event.__args__) for e in events)
    moved = sum(parser.drops.values()) - drops + sum(parser.skipped.values()) - skipped
    # a get_instruments reply may drop bad items and still yield the RpcResponse
    assert events or moved >= 1 or empty_list(frame)


def state(parser: DeribitParser) -> tuple[int, int, int]:
    return parser.frames, sum(parser.drops.values()), sum(parser.skipped.values())


def both_parse(frame: str | bytes) -> None:
    """The event path and the fused path, each on a fresh parser: neither raises, both
    account for the frame."""
    p = DeribitParser(max_frame_bytes=LIMIT)
    before = state(p)
    accounted(p, before, p.parse(frame, 1), frame)
    p2 = DeribitParser(max_frame_bytes=LIMIT)
    fast = FastPath(p2, Books())
    before = state(p2)
    events = fast.apply(frame, 1)
    assert p2.frames == before[0] + 1 and isinstance(events, list | tuple)


@settings(max_examples=EXAMPLES["parser"], deadline=None)
@given(st.binary(max_size=LIMIT) | st.text(max_size=LIMIT // 4) | json_value.map(orjson.dumps))
def test_parser_on_arbitrary_bytes_text_and_json(frame: bytes | str) -> None:
    both_parse(frame)


@settings(
    max_examples=EXAMPLES["parser_shaped"],
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(notification | rpc, st.booleans())
def test_parser_on_deribit_shaped_frames(msg: dict[str, Any], as_bytes: bool) -> None:
    text = orjson.dumps(msg)
    frame: str | bytes = text if as_bytes else text.decode("utf-8", "replace")
    if len(frame) > LIMIT:
        frame = frame[:LIMIT]  # up to the limit (a cut frame is just more garbage)
    both_parse(frame)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=LIMIT), st.integers(1, 3 * LIMIT), st.booleans())
def test_frames_over_the_limit_are_dropped_before_decoding(
    body: bytes, extra: int, as_text: bool
) -> None:
    raw = b'{"jsonrpc":"2.0",' + body + b"x" * extra
    # as text, some chars take 2 bytes in UTF-8: the limit counts bytes
    frame: str | bytes = raw.decode("latin-1") if as_text else raw
    size = len(frame.encode()) if isinstance(frame, str) else len(frame)
    p = DeribitParser(max_frame_bytes=LIMIT)
    events = p.parse(frame, 1)
    if size > LIMIT:
        assert events == [] and p.drops == {"too_large": 1}  # not bad_json: never decoded
    else:
        assert "too_large" not in p.drops


# -- the config loader ----------------------------------------------------------------------------

# section -> {setting: its type} (the hints resolved: config.py uses postponed annotations)
HINTS: dict[str, dict[str, Any]] = {
    name: typing.get_type_hints(tp)
    for name, tp in typing.get_type_hints(Config).items()
    if dataclasses.is_dataclass(tp)
}
SECTIONS = {name: sorted(h) for name, h in HINTS.items()}
assert {"feed", "book", "trigger", "publish"} <= set(SECTIONS)
wild_float = st.floats() | st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e308])
toml_scalar = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | wild_float  # NaN and infinities included: TOML has them
    | st.text(max_size=20)
    | st.sampled_from(["deribit", "ccxt", "okx", "debug", "json", "mid", "band", "svi", "ssvi"])
    | st.sampled_from(["jsonl:-", "mqtt://h:1883", "mqtt://u:pw@h:1883", "127.0.0.1", "0.0.0.0"])
)
toml_value = st.recursive(
    toml_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def typed(tp: Any) -> st.SearchStrategy[Any]:
    """Values of a setting's own type, edges included (so the checks after it are reached)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(tp))
    if origin is tuple:
        return st.lists(typed(typing.get_args(tp)[0]), max_size=4)
    if origin is dict:
        return st.dictionaries(st.sampled_from(["svi", "ssvi", "x"]), typed(typing.get_args(tp)[1]))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-10, 10) | st.integers(-(2**40), 2**40) | st.sampled_from([0, 1024])
    if tp is float:
        return wild_float | st.floats(-100, 1000)
    return st.text(max_size=12) | st.sampled_from(["jsonl:-", "mqtt://u:pw@h:1883", "127.0.0.1"])


@st.composite
def tables(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly settings of the right type (so range checks are what is tested), sometimes
    anything at all, unknown sections and keys included."""
    out: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "nope"]), max_size=6, unique=True)):
        hints = HINTS.get(section, {})
        body: dict[str, Any] = {}
        for key in draw(st.lists(st.sampled_from([*hints, "unknown_key"]), max_size=5)):
            wild = key not in hints or draw(st.integers(0, 9)) == 0
            body[key] = draw(toml_value if wild else typed(hints[key]))
        out[section] = body
    if draw(st.booleans()):
        out["instance"] = draw(toml_value)
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.text(max_size=6))] = draw(toml_value)
    return out


@st.composite
def one_setting(draw: st.DrawFn) -> dict[str, Any]:
    """One setting of its own type (edges included): most of these are valid configs, so
    the checks on what is accepted get exercised."""
    section = draw(st.sampled_from(sorted(HINTS)))
    key = draw(st.sampled_from(sorted(HINTS[section])))
    return {section: {key: draw(typed(HINTS[section][key]))}}


env_names = st.builds(
    lambda s, k: f"STREAMER__{s}__{k}".upper(),
    st.sampled_from([*SECTIONS, "nope"]),
    st.sampled_from([*sorted({k for ks in SECTIONS.values() for k in ks}), "zz"]),
)
envs = st.dictionaries(env_names, st.text(max_size=20), max_size=3)


def check_valid(cfg: Config) -> None:
    """What every accepted Config must satisfy: finite numbers, documented ranges."""

    def walk(obj: Any, path: str) -> None:
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), f"{path}.{f.name}")
        elif isinstance(obj, float):
            assert math.isfinite(obj), path
        elif isinstance(obj, tuple):
            for i, x in enumerate(obj):
                walk(x, f"{path}[{i}]")
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{path}.{k}")

    walk(cfg, "config")
    f, b, t = cfg.feed, cfg.book, cfg.trigger
    assert f.heartbeat_s >= 10.0 and f.dead_after_s > f.heartbeat_s
    assert 1024 <= f.max_frame_bytes <= 2**31
    assert b.stale_after_s > 0 and b.max_spread_iv > 0
    assert t.min_changed_quotes >= 1 and 0 <= t.min_interval_s <= t.max_interval_s
    assert 0 <= cfg.metrics.port <= 65535
    assert cfg.recorder.rotate_mb > 0 and cfg.recorder.rotate_minutes > 0


@settings(max_examples=EXAMPLES["config"], deadline=None)
@given(one_setting() | tables(), envs)
def test_config_loader_gives_a_config_error_or_a_valid_config(
    table: dict[str, Any], env: dict[str, str]
) -> None:
    try:
        cfg = config_from_table(table, env)
    except ConfigError as exc:
        # names what was wrong (the key, which may be the empty key of an empty key name)
        assert exc.message and (exc.key or "unknown setting" in exc.message)
        assert "pw@" not in str(exc)  # the URL password never shows
        return
    check_valid(cfg)


# -- the book -------------------------------------------------------------------------------------

EXPIRIES = [NOW + d * DAY for d in (1, 2, 7, 30)]  # 08:00 UTC each
STRIKES = (90_000.0, 100_000.0, 110_000.0)
NAMES = [f"BTC-{expiry_code_of(e)}-{int(k)}-{cp}" for e in EXPIRIES for k in STRIKES for cp in "CP"]


class BookMachine(RuleBasedStateMachine):
    """Random listings, quotes, expiries and snapshots against one Book."""

    @initialize()
    def start(self) -> None:
        self.book = Book("deribit", "BTC", stale_after_s=3_600.0)
        self.now = NOW
        self.settled = 0  # the settlement clock as snapshots showed it
        self.delisted: set[str] = set()  # removed by the venue, expiry not settled

    def _instrument(self, name: str) -> Instrument:
        opt = parse_option(name)
        assert opt is not None
        return Instrument(
            "deribit", name, "BTC", opt.expiry, opt.expiry_ms, opt.strike, opt.is_call
        )

    @rule(name=st.sampled_from(NAMES))
    def list_it(self, name: str) -> None:
        was_live = name in self.book
        self.book.apply(InstrumentListed(self._instrument(name), self.now * 1_000_000))
        opt = parse_option(name)
        assert opt is not None
        if opt.expiry_ms > max(self.book.settled_ms, self.now):
            assert name in self.book  # listing (again) is allowed before settlement
            self.delisted.discard(name)
        elif not was_live:
            assert name not in self.book  # nothing new is listed at or after its expiry

    @rule(
        name=st.sampled_from(NAMES),
        lag=st.integers(0, 5_000),
        unit=st.sampled_from(["ms"] * 8 + ["us", "s", "skew", "past"]),
        fwd=st.sampled_from([100_000.0, 99_000.0, math.nan, 0.0, -1.0, math.inf]),
        bid=st.sampled_from([0.01, 0.02, math.nan, 0.0]),
        ask=st.sampled_from([0.03, 0.015, math.nan]),
    )
    def quote(self, name: str, lag: int, unit: str, fwd: float, bid: float, ask: float) -> None:
        ts = self.now - lag
        ts = {"ms": ts, "us": ts * 1000, "s": ts // 1000, "skew": ts + DAY, "past": ts - DAY}[unit]
        q = Quote(
            "deribit",
            name,
            ts,
            self.now * 1_000_000,
            bid=bid,
            ask=ask,
            bid_iv=0.5 if bid == bid else math.nan,  # noqa: PLR0124
            ask_iv=0.55 if ask == ask else math.nan,  # noqa: PLR0124
            forward=fwd,
        )
        was_live = name in self.book
        self.book.apply(q)
        opt = parse_option(name)
        assert opt is not None
        if opt.expiry_ms <= self.book.settled_ms:
            assert name not in self.book  # never revived by a quote
        if not was_live and name in self.book:
            assert MIN_TS_MS <= ts <= MAX_TS_MS  # nothing listed from an implausible time

    @rule(name=st.sampled_from(NAMES))
    def venue_expires(self, name: str) -> None:
        self.book.apply(InstrumentExpired("deribit", name, self.now))
        assert name not in self.book
        self.delisted.add(name)

    @rule(ms=st.integers(0, 2 * DAY))
    def time_passes(self, ms: int) -> None:
        self.now += ms

    @precondition(lambda self: len(self.book) > 0)
    @rule(recv=st.booleans())
    def snapshot(self, recv: bool) -> None:
        book = self.book
        snap = book.snapshot(recv_ms=self.now if recv else 0)
        assert book.settled_ms >= self.settled  # never moves back
        self.settled = book.settled_ms
        n = snap.n_quotes
        for arr in (snap.strike, snap.is_call, snap.bid, snap.ask, snap.T, snap.forward):
            assert len(arr) == n
        assert len(snap.expiries) == len(snap.expiry_ms) == len(snap.forwards) == len(snap.dirty)
        # no NaN (or non-positive) forward published, per expiry or per quote
        assert np.all(np.isfinite(snap.forwards) & (snap.forwards > 0))
        assert np.all(np.isfinite(snap.forward) & (snap.forward > 0))
        assert np.all(snap.T > 0)  # nothing at or past its expiry
        assert np.all(snap.expiry_ms > book.settled_ms)
        # plausible, not in the future of the snapshot's own clock
        assert MIN_TS_MS <= snap.ts_ms <= MAX_TS_MS or n == 0
        assert np.all(snap.quote_ts_ms <= snap.ts_ms + book.max_skew_s * 1000)
        assert np.all(snap.quote_ts_ms >= snap.ts_ms - book.stale_after_s * 1000)
        key = list(zip(snap.expiry_ms[snap.expiry_idx], snap.strike, ~snap.is_call, strict=True))
        assert key == sorted(key)
        assert set(snap.instrument) <= {i.name for i in book.instruments()}
        assert sum(book.drops.values()) + n == len(book)  # every live row: in, or counted out

    @invariant()
    def settled_names_are_gone(self) -> None:
        book = getattr(self, "book", None)
        if book is None:
            return
        for inst in book.instruments():
            assert inst.expiry_ms > book.settled_ms


BookMachine.TestCase.settings = settings(
    max_examples=EXAMPLES["book"], stateful_step_count=40, deadline=None
)
test_book_state_machine = BookMachine.TestCase
