"""The fused ticker path: Deribit frames straight into book rows, for replay and the daemon.

``FastPath(parser, books).parse(frame, recv_ns)`` decodes a frame once. A ticker on a channel
seen before, of an instrument the books already hold, is checked and written straight into
that instrument's row (``write_row``: one ``struct.pack_into``, what ``Book.write_ticker``
does) without building a ``Quote``. With an ``on_write`` hook (the refit trigger) the write is
first compared with the row (``Book.quote_changed``: sides, sizes, bid/ask IVs) and the hook
hears ``on_write(book, slot, forward, changed)``; unless it answers True (a changed quote, or a
forward moved beyond the trigger's threshold) the call returns no event and the ticker costs
nothing further downstream; else that book's one-element ``(BookChanged,)`` tuple (made once
per book: nothing is allocated per frame). Without the hook (``--model none``) no comparison
is made. ``_fuse`` is that write. ``parse_batch(frames, on_event)`` is the same for a list
of ``(ts_ns, venue, frame)`` (what ``streamer.feeds.recordings.reader.read_recording_batches``
yields), applying the events of frames that are not fused through ``on_event`` in frame
order, with no call per frame; ``parse_lines(blocks, careful, on_event)`` takes a recording's
lines and decodes each record in the same loop (``replay --model none``). Both run one hot
loop, ``_run``, which inlines the write (tested against ``parse`` frame by frame).

Decoding. A text frame is first decoded by a typed ``msgspec`` decoder (``_TICKER``: a
ticker notification with every field Deribit documents for it, jointly about 0.5 µs less than
``orjson.loads`` building dicts, and attribute reads after). It is strict on purpose, so it
accepts only what ``orjson`` accepts and yields the same values: an unknown key at any
level, a wrong type, a null where a number is needed, a timestamp outside int64, a number
beyond the double range: any of these fail it (``forbid_unknown_fields``: nothing is ever
skipped unchecked; msgspec's skip checks syntax but not the number range), and such a frame,
like a bytes frame, goes the ``orjson`` way below, the reference, exactly as before. Numbers
land as the same doubles either way (both parse correctly rounded; ints become
``float(int)`` in the row, which is what ``struct.pack_into`` does with orjson's ints;
hypothesis-tested in ``tests/test_fastpath_decode.py``). Should typed decoding keep failing
on frames the ``orjson`` way then fuses (a venue that added a ticker field), it switches
itself off (``typed_misses``; logged once) rather than cost every frame a wasted attempt.

The ``orjson`` way: ``orjson.loads``, then the same check and write from the dicts (about
1.2 µs of Python after ``orjson.loads``). Everything else (a first sight, a null, a wrong
type, any other channel) goes through the parser's event path
(``DeribitParser.parse_decoded``) and its events are returned for the caller to apply
(``Books.on_event``; the pipeline does that); ``apply`` is parse + apply in one call. For every
field the book stores, both paths accept and reject the same frames and leave the same rows
(tested with hypothesis); fields the book does not keep (gamma, vega, theta, rho, index
price, open interest, underlying index) are checked on the event path only.

The book owns its row layout (``streamer.book.book``); the parser knows nothing of books. A
``FastPath`` has the parser's shape (``parse``, ``reset``), so a feed adapter takes it as its
frame parser and the daemon runs exactly what replay measures.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Annotated, get_type_hints

import msgspec
import numpy as np
import numpy.typing as npt
import orjson
import structlog

from streamer.book import scan
from streamer.book.book import ROW_BYTES, Book, Books, Routes, write_row
from streamer.events import BookChanged, Event, Quote
from streamer.feeds.deribit.parser import NAME_CACHE_MAX, DeribitParser
from streamer.feeds.recordings.reader import Lines, TextBlock

log = structlog.get_logger(__name__)

NAN = float("nan")
_loads = orjson.loads
_NO_EVENTS: tuple[Event, ...] = ()
TYPED_MISSES_MAX = 1024
"""Typed decoding switches off after this many misses (typed failed, the orjson way fused)
outnumbering its hits."""

OnWrite = Callable[[Book, int, float, bool], bool]
"""``on_write(book, slot, forward, changed)`` after a fused write into ``book``'s row ``slot``
(``changed``: its sides or bid/ask IVs moved): True if the trigger wants to hear of it."""


def _wire_keys(*names: str) -> tuple[str, ...]:
    """The key strings as orjson hands them out. orjson caches short keys, so a lookup with
    the very same string object matches by identity, without a string compare (~10 ns a
    lookup on the fused path); should the cache drop one, it is just an equal string."""
    return tuple(orjson.loads(orjson.dumps(dict.fromkeys(names, 0))))


_PARAMS, _DATA, _CHANNEL, _NAME, _DELTA, _MARK_IV, _BID_IV, _ASK_IV, _GREEKS = _wire_keys(
    "params", "data", "channel", "instrument_name", "delta", "mark_iv", "bid_iv", "ask_iv", "greeks"
)
_TS_NS, _VENUE, _FRAME = _wire_keys("ts_ns", "venue", "frame")  # a recording's line
_TICKER_FIELDS = operator.itemgetter(
    *_wire_keys(
        "timestamp",
        "best_bid_price",
        "best_bid_amount",
        "best_ask_price",
        "best_ask_amount",
        "mark_price",
        "underlying_price",
        "greeks",
    )
)


# -- the typed ticker decoder -----------------------------------------------------------------
# Field names and types of Deribit's ``ticker.{instrument}.{interval}`` notification (API v2,
# "ticker" subscription, https://docs.deribit.com/#ticker-instrument_name-interval). Only the
# fields the fused write reads have exact types (as the orjson way demands: an int timestamp,
# numbers for the rest); the others accept any JSON scalar, and a missing one is fine. Every
# struct forbids unknown fields, so the decoder never skips a value unchecked.

_Scalar = float | str | bool | None
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]  # orjson: ints, not floats


class _Greeks(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    delta: float
    gamma: _Scalar = None
    vega: _Scalar = None
    theta: _Scalar = None
    rho: _Scalar = None


class _Stats(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    high: _Scalar = None
    low: _Scalar = None
    price_change: _Scalar = None
    volume: _Scalar = None
    volume_usd: _Scalar = None
    volume_notional: _Scalar = None


class _TickerData(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    timestamp: _Int64
    instrument_name: str
    best_bid_price: float
    best_bid_amount: float
    best_ask_price: float
    best_ask_amount: float
    mark_price: float
    underlying_price: float
    greeks: _Greeks
    mark_iv: float = 0.0
    bid_iv: float = 0.0
    ask_iv: float = 0.0
    state: _Scalar = None
    underlying_index: _Scalar = None
    open_interest: _Scalar = None
    interest_rate: _Scalar = None
    interest_value: _Scalar = None
    index_price: _Scalar = None
    last_price: _Scalar = None
    settlement_price: _Scalar = None
    delivery_price: _Scalar = None
    estimated_delivery_price: _Scalar = None
    min_price: _Scalar = None
    max_price: _Scalar = None
    current_funding: _Scalar = None
    funding_8h: _Scalar = None
    combo_state: _Scalar = None
    stats: _Stats | None = None


class _TickerParams(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    channel: str
    data: _TickerData


class _Ticker(msgspec.Struct, forbid_unknown_fields=True, gc=False, kw_only=True):
    jsonrpc: _Scalar = None
    method: _Scalar = None
    params: _TickerParams


TypedLoads = Callable[[str], _Ticker]
ORDERS_MAX = 8
"""Ticker decoders built for other key orders (``ticker_decoder``), at most."""


def _reordered(
    cls: type[msgspec.Struct], first: Sequence[str], **types: object
) -> type[msgspec.Struct]:
    """``cls`` with the fields named in ``first`` declared first, in that order (names it
    does not have ignored), the others after: the same fields, defaults and strictness,
    the same types but those given in ``types``."""
    hints = get_type_hints(cls, include_extras=True) | types
    fields = cls.__struct_fields__
    required = len(fields) - len(cls.__struct_defaults__)
    defaults = dict(zip(fields[required:], cls.__struct_defaults__, strict=True))
    known = [f for f in dict.fromkeys(first) if f in hints]
    names = known + [f for f in fields if f not in known]
    spec = [(f, hints[f], defaults[f]) if f in defaults else (f, hints[f]) for f in names]
    return msgspec.defstruct(
        cls.__name__, spec, kw_only=True, forbid_unknown_fields=True, gc=False, module=__name__
    )


def ticker_decoder(data_order: Sequence[str] = (), greeks_order: Sequence[str] = ()) -> TypedLoads:
    """The typed ticker decoder with the ``data`` and ``greeks`` fields declared in the given
    key orders. msgspec matches each key against the field after the previous match first,
    so a struct declared in the venue's key order finds every field at the first compare
    (about 15% of a decode here); what it accepts and the values it decodes do not depend
    on the order (tested)."""
    if not data_order and not greeks_order:
        return _typed_loads
    greeks = _reordered(_Greeks, greeks_order)
    data = _reordered(_TickerData, data_order, greeks=greeks)
    params = _reordered(_TickerParams, (), data=data)
    decoder = msgspec.json.Decoder(_reordered(_Ticker, (), params=params))
    return decoder.decode  # type: ignore[return-value]  # a _Ticker in all but its name


_TICKER = msgspec.json.Decoder(_Ticker)
_typed_loads: TypedLoads = _TICKER.decode
_DECODERS: dict[tuple[tuple[str, ...], tuple[str, ...]], TypedLoads] = {}


# -- the compiled scanner's field table (streamer.book.scan), from the typed decoder's structs --
_SCAN_COLUMNS = {  # the row's columns (streamer.book.book: TS .. DELTA)
    "timestamp": 0,
    "best_bid_price": 1,
    "best_bid_amount": 2,
    "best_ask_price": 3,
    "best_ask_amount": 4,
    "mark_price": 5,
    "mark_iv": 6,
    "bid_iv": 7,
    "ask_iv": 8,
    "underlying_price": 9,
    "delta": 10,
}
_SCAN_SPANS = {"channel": scan.SPAN_CHANNEL, "instrument_name": scan.SPAN_NAME}
_SCAN_LEVELS: tuple[type[msgspec.Struct], ...] = (
    _Ticker,
    _TickerParams,
    _TickerData,
    _Greeks,
    _Stats,
)


def scan_fields() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The typed decoder's structs as the scanner's field table (``scan._frame``): key bytes,
    ``(level, kind, column or child level, length)`` per key, ``(first key, end, required
    mask)`` per level. Every field's kind comes from its declared type, so the scanner takes
    exactly the fields, types and required ones the typed decoder has."""
    keys: list[bytes] = []
    meta: list[tuple[int, int, int, int]] = []
    levels: list[tuple[int, int, int]] = []
    for level, cls in enumerate(_SCAN_LEVELS):
        hints = get_type_hints(cls, include_extras=True)
        fields = cls.__struct_fields__
        required = {f.name for f in msgspec.structs.fields(cls) if f.required}
        lo = len(keys)
        for f in fields:
            t = hints[f]
            if t is float:
                kind, col = scan.NUMBER, _SCAN_COLUMNS[f]
            elif t is _Int64:
                kind, col = scan.INT, _SCAN_COLUMNS[f]
            elif t is str:
                kind, col = scan.STRING, _SCAN_SPANS[f]
            elif t == _Scalar:
                kind, col = scan.SCALAR, -1
            elif t in _SCAN_LEVELS:
                kind, col = scan.OBJECT, _SCAN_LEVELS.index(t)
            elif t == _Stats | None:
                kind, col = scan.OBJECT_OR_NULL, _SCAN_LEVELS.index(_Stats)
            else:  # a type the scanner does not know: a change here must teach it
                raise TypeError(f"scanner: no kind for {cls.__name__}.{f}: {t}")
            keys.append(f.encode())
            meta.append((level, kind, col, len(f)))
        mask = sum(1 << k for k, f in enumerate(fields) if f in required)
        levels.append((lo, len(keys), mask))
    width = max(len(k) for k in keys)
    table = np.zeros((len(keys), width), dtype=np.uint8)
    for i, k in enumerate(keys):
        table[i, : len(k)] = np.frombuffer(k, dtype=np.uint8)
    return table, np.array(meta, dtype=np.int64), np.array(levels, dtype=np.int64)


_SCAN_KEYS, _SCAN_META, _SCAN_LEVEL_TABLE = scan_fields()


def _orders_of(msg: object) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The key orders of a decoded ticker's ``data`` and ``greeks`` objects (orjson keeps
    the wire order), or None if it is not shaped like one."""
    try:
        data = msg[_PARAMS][_DATA]  # type: ignore[index]
        greeks = data.get(_GREEKS)
    except (KeyError, TypeError, IndexError, AttributeError):
        return None
    if type(data) is not dict:
        return None
    return tuple(data), tuple(greeks) if type(greeks) is dict else ()


def _as_lines(blocks: Iterable[list[bytes] | TextBlock]) -> Iterator[Sequence[bytes]]:
    for b in blocks:
        yield b.lines() if isinstance(b, TextBlock) else b


class FastPath:
    """Deribit frames -> book rows (fused tickers) or events (everything else).

    Args:
        parser: the event path (its ``frames``, ``drops`` and ``skipped`` count every frame).
        books: where fused tickers are written; their venue is ``parser.venue``.
        on_write: called after each fused write (the refit trigger, ``OnWrite``), or None.
    """

    __slots__ = (
        "_changed",
        "_channels",
        "_follow",
        "_loads",
        "_on_write",
        "_orders",
        "_routes",
        "_scan_epoch",
        "_scan_moved",
        "_scan_out",
        "_scan_run_buf",
        "_table",
        "books",
        "last_recv_ns",
        "parser",
        "scanned",
        "scanning",
        "typed",
        "typed_hits",
        "typed_misses",
    )

    def __init__(
        self,
        parser: DeribitParser,
        books: Books,
        on_write: OnWrite | None = None,
        *,
        typed: bool = True,
        scanning: bool = True,
    ) -> None:
        self.parser = parser
        self.books = books
        self._on_write = on_write
        self._routes: Routes = books.routes(parser.venue)
        self._channels: dict[str, str] = {}  # "ticker.{inst}.100ms" -> inst
        self._changed: dict[int, tuple[Event, ...]] = {}  # id(book) -> (BookChanged,)
        self._loads = _typed_loads  # the typed decoder, for the key order seen last
        self._orders: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self.last_recv_ns = 0  # receive time of the newest frame parsed
        self.typed = typed  # try the typed decoder first (text frames)
        self.typed_hits = 0  # fused writes from the typed decoder
        self.typed_misses = 0  # typed decoding failed, the orjson way fused
        self.scanning = scanning  # parse_lines without on_write: the compiled scanner first
        self.scanned = 0  # lines the compiled scanner wrote
        self._table = scan.ChannelTable()
        self._scan_epoch = self._routes.epoch
        self._scan_moved = self._routes.moved
        self._scan_out = np.zeros(scan.OUT_SIZE, dtype=np.int64)
        self._scan_run_buf = np.zeros(2 * scan.RUN_MAX, dtype=np.int64)
        self._follow = np.full(len(_SCAN_META) + len(_SCAN_LEVEL_TABLE), -1, dtype=np.int64)

    def reset(self) -> None:
        """A new connection: the parser forgets its order-book levels."""
        self.parser.reset()

    def parse(self, frame: str | bytes, recv_ns: int) -> Sequence[Event]:
        """One frame: ``(BookChanged,)`` after a fused write, else the parser's events (not
        yet applied to the books). Never raises."""
        self.parser.frames += 1
        self.last_recv_ns = recv_ns
        if self.typed and type(frame) is str:
            try:
                p = self._loads(frame).params
            except Exception:  # not a ticker as documented: the orjson way decides
                return self._parse_json(frame, recv_ns, missed=True)
            d = p.data
            name = self._channels.get(p.channel)
            if name is not None and d.instrument_name == name:
                route = self._routes.get(name)
                if route is not None:
                    book, slot = route
                    bid = d.best_bid_price
                    if bid:
                        bsz = d.best_bid_amount
                    else:  # zero: no bid
                        bid = bsz = NAN
                    ask = d.best_ask_price
                    if ask:
                        asz = d.best_ask_amount
                    else:
                        ask = asz = NAN
                    self.typed_hits += 1
                    return self._fuse(
                        book, slot, d.timestamp, bid, bsz, ask, asz, d.mark_price,
                        d.mark_iv, d.bid_iv, d.ask_iv, d.underlying_price, d.greeks.delta,
                    )  # fmt: skip
        return self._parse_json(frame, recv_ns, missed=False)

    def parse_batch(
        self,
        frames: Sequence[tuple[int, str, str | bytes]],
        on_event: Callable[[Event], object],
    ) -> None:
        """``parse`` every ``(ts_ns, venue, frame)`` of ``frames`` in order (``ts_ns`` is the
        receive time, ``venue`` is not read: the parser has its own), applying the events of
        frames that are not fused with ``on_event`` right away, so a later frame sees what an
        earlier one did. Fused writes leave no event (their ``BookChanged`` says nothing
        ``on_write`` did not). The same decisions and rows as ``parse`` frame by frame
        (tested), in one loop (``parse_lines``' own). Never raises for bad frames."""
        if frames:
            self._run((frames,), None, on_event)

    def parse_lines(
        self,
        blocks: Iterable[list[bytes] | TextBlock],
        careful: Callable[[bytes], tuple[int, str, str] | None],
        on_event: Callable[[Event], object],
    ) -> int:
        """``parse_batch`` straight from a recording's lines (``RecordingLines``: its
        ``Lines`` or, better, its ``blocks()``, the same as bytes, ``TextBlock``; DESIGN
        section 3: ``{"ts_ns", "venue", "frame"}`` a line): each block of lines is decoded
        and applied in one loop, with no ``(ts_ns, venue, frame)`` tuple or list in between
        (about 1 µs a frame less than reading blocks of frames and ``parse_batch``). A line
        that is not a plain good record (not JSON, not an object, a key missing or of the
        wrong type, blank) goes to ``careful``, the reader's line-by-line rules, which counts
        it as bad or returns its frame; the same frames reach the books, in the same order,
        as ``read_recording_batches`` + ``parse_batch`` (tested). Returns the frames parsed.
        Never raises for bad lines or frames.

        Without ``on_write`` (``replay --model none``) each block of ``Lines`` (the
        reader's blocks: one line an item, known by construction) goes to the compiled
        scanner first (``streamer.book.scan``: lines to rows in one pass, ~10x less work a
        line), which takes the plain ticker lines of channels seen before and hands back
        every other line, in order, to this loop: the same rows, counters and events
        (tested)."""
        if self.scanning and self._on_write is None:
            return self._scan_run(blocks, careful, on_event)
        return self._run(_as_lines(blocks), careful, on_event)

    def _scan_run(
        self,
        blocks: Iterable[Sequence[bytes] | TextBlock],
        careful: Callable[[bytes], tuple[int, str, str] | None],
        on_event: Callable[[Event], object],
    ) -> int:
        """``parse_lines`` through the scanner: it takes what it can of a block; the lines
        it does not take, a run of them at a time, go through ``_run``, and it goes on after
        them. A line it did not take for an unknown channel teaches it the channel once
        ``_run`` has handled the line (the route exists then)."""
        table, out, parser, routes = self._table, self._scan_out, self.parser, self._routes
        follow, run = self._follow, self._scan_run_buf
        keys, meta, levels = _SCAN_KEYS, _SCAN_META, _SCAN_LEVEL_TABLE
        scan_block, frombuffer, u8 = scan.scan_block, np.frombuffer, np.uint8
        done_, next_, last_, run_ = scan.DONE, scan.NEXT, scan.LAST_TS, scan.RUN
        n = 0
        for item in blocks:
            if type(item) is TextBlock:  # the reader's bytes: lines split only if needed
                text = item.text
                block: Sequence[bytes] | None = None
            elif type(item) is Lines:
                text = b"".join(item)
                block = item
            else:  # items not known to be one line each
                n += self._run((item,), careful, on_event)  # type: ignore[arg-type]
                continue
            table.flush()  # the channels taught during the previous block
            buf = frombuffer(text, u8)
            end = len(text)
            pos = k = 0
            while pos < end:
                if routes.epoch != self._scan_epoch or routes.moved != self._scan_moved:
                    self._follow_routes()
                scan_block(
                    buf, pos, end, keys, meta, levels, table.tab, table.ent_bytes,
                    table.ent_meta, table.rows, follow, out, run,
                )  # fmt: skip
                done = int(out[done_])
                if done:
                    k += done
                    n += done
                    parser.frames += done
                    self.scanned += done
                    if self.typed:
                        self.typed_hits += done
                    self.last_recv_ns = int(out[last_])
                m = int(out[run_])
                if m == 0:
                    break
                if block is None:
                    block = item.lines()  # type: ignore[union-attr]
                n += self._run((block[k : k + m],), careful, on_event)
                for j in range(m):
                    start = int(run[2 * j])
                    if start >= 0:
                        self._teach(text[start : run[2 * j + 1]])
                k += m
                pos = int(out[next_])
            if type(item) is TextBlock:
                item.count = k
        return n

    def _teach(self, channel: bytes) -> None:
        """Tell the scanner a channel the reference path knows now (a ticker channel seen
        before, of a listed instrument)."""
        name = self._channels.get(channel.decode("ascii"))
        route = self._routes.get(name) if name is not None else None
        if route is not None:
            self._follow_routes()
            book, slot = route
            if not self._table.add(channel, name, book, slot):  # type: ignore[arg-type]
                self._table.flush()  # known but not hashed in yet: seen again this block

    def _follow_routes(self) -> None:
        """Bring the scanner's table up to the routes: entries whose instrument went (or
        moved) are dropped (``Routes.epoch``), books whose rows were regrown are pointed at
        again (``Routes.moved``)."""
        routes = self._routes
        if routes.epoch != self._scan_epoch:
            self._table.retain(lambda name, book, slot: routes.get(name) == (book, slot))
            self._scan_epoch = routes.epoch
        if routes.moved != self._scan_moved:
            self._table.refresh()
            self._scan_moved = routes.moved

    def _run(
        self,
        blocks: Iterable[Sequence[bytes]] | Iterable[Sequence[tuple[int, str, str | bytes]]],
        careful: Callable[[bytes], tuple[int, str, str] | None] | None,
        on_event: Callable[[Event], object],
    ) -> int:
        """The hot loop of ``parse_lines`` (``careful`` given: blocks of recording lines) and
        ``parse_batch`` (``careful`` None: blocks of ``(ts_ns, venue, frame)``). A fused
        ticker costs its decodes, two dict lookups and one ``write_row``; counters are kept
        per block (``parser.frames`` after each, for a progress bar), fused hits before a miss
        is judged (``_missed`` weighs them). Returns the frames parsed."""
        loads = _loads
        channels, routes, on_write = self._channels, self._routes, self._on_write
        nan, row_bytes, write = NAN, ROW_BYTES, write_row
        lines = careful is not None
        ts_key, venue_key, frame_key = _TS_NS, _VENUE, _FRAME
        parser = self.parser
        n = hits = 0  # frames parsed; fused by the typed decoder, not yet in typed_hits
        ts_ns = last = self.last_recv_ns
        for block in blocks:
            parser.frames += len(block)
            n += len(block)
            typed = self._loads if self.typed else None
            for item in block:
                if lines:
                    try:
                        rec = loads(item)  # type: ignore[arg-type]  # a line (read_recording_batches' checks)
                        ts_ns, venue, frame = rec[ts_key], rec[venue_key], rec[frame_key]
                    except Exception:
                        venue = frame = None
                    if type(ts_ns) is not int or type(venue) is not str or type(frame) is not str:
                        got = careful(item)  # type: ignore[misc, arg-type]
                        if got is None:  # blank or bad: counted and logged there
                            n -= 1
                            parser.frames -= 1
                            ts_ns = last
                            continue
                        ts_ns, venue, frame = got
                else:
                    ts_ns, venue, frame = item
                last = ts_ns
                if typed is not None and (lines or type(frame) is str):
                    try:
                        p = typed(frame).params
                    except Exception:  # not a ticker as documented: the orjson way
                        self.typed_hits += hits
                        hits = 0
                        self.last_recv_ns = ts_ns
                        for ev in self._parse_json(frame, ts_ns, missed=True):
                            if type(ev) is not BookChanged:
                                on_event(ev)
                        typed = self._loads if self.typed else None  # may be off now
                        continue
                    d = p.data
                    name = channels.get(p.channel)
                    if name is not None and d.instrument_name == name:
                        route = routes.get(name)
                        if route is not None:
                            book, slot = route
                            bid = d.best_bid_price
                            if bid:
                                bsz = d.best_bid_amount
                            else:  # zero: no bid
                                bid = bsz = nan
                            ask = d.best_ask_price
                            if ask:
                                asz = d.best_ask_amount
                            else:
                                ask = asz = nan
                            miv, biv, aiv = d.mark_iv, d.bid_iv, d.ask_iv
                            biv = biv / 100.0 if biv else nan
                            aiv = aiv / 100.0 if aiv else nan
                            hits += 1
                            if on_write is None:
                                write(
                                    book.buffer, slot * row_bytes, d.timestamp, bid, bsz,
                                    ask, asz, d.mark_price, miv / 100.0 if miv else nan,
                                    biv, aiv, d.underlying_price, d.greeks.delta,
                                )  # fmt: skip
                                continue
                            fwd = d.underlying_price
                            changed = book.quote_changed(slot, bid, bsz, ask, asz, biv, aiv)
                            write(
                                book.buffer, slot * row_bytes, d.timestamp, bid, bsz, ask,
                                asz, d.mark_price, miv / 100.0 if miv else nan, biv, aiv,
                                fwd, d.greeks.delta,
                            )  # fmt: skip
                            on_write(book, slot, fwd, changed)
                            continue
                self.last_recv_ns = ts_ns
                for ev in self._parse_json(frame, ts_ns, missed=False):
                    if type(ev) is not BookChanged:
                        on_event(ev)
                typed = self._loads if self.typed else None  # it may have learned an order
        self.typed_hits += hits
        self.last_recv_ns = last
        return n

    def _parse_json(self, frame: str | bytes, recv_ns: int, *, missed: bool) -> Sequence[Event]:
        """The orjson way: decode, fuse a ticker if it can, else the parser's events.
        ``missed``: the typed decoder failed on this frame (a fused write here is a miss)."""
        parser = self.parser
        try:
            msg = _loads(frame)
        except Exception as exc:  # JSONDecodeError, or not str/bytes at all
            return parser.bad_json(exc, frame)
        try:
            params = msg[_PARAMS]
            d = params[_DATA]
            # a ticker channel seen before (cheaper than testing its prefix), of the instrument
            # it names, in these books
            name = self._channels.get(params[_CHANNEL])
            if name is not None and d[_NAME] == name:
                route = self._routes.get(name)
                if route is not None:
                    ts, bid, bsz, ask, asz, mp, fwd, g = _TICKER_FIELDS(d)
                    delta = g[_DELTA]
                    miv = d.get(_MARK_IV, 0.0)
                    biv = d.get(_BID_IV, 0.0)
                    aiv = d.get(_ASK_IV, 0.0)
                    if type(ts) is not int:
                        raise TypeError
                    # plain numbers only (int, float, bool): this refuses null, strings, lists
                    # and objects before anything is written (they take the event path)
                    0.0 + bid + bsz + ask + asz + mp + fwd + delta + miv + biv + aiv
                    if not bid:  # zero: no bid
                        bid = bsz = NAN
                    if not ask:
                        ask = asz = NAN
                    book, slot = route
                    if missed:
                        self._missed()
                    return self._fuse(
                        book, slot, ts, bid, bsz, ask, asz, mp, miv, biv, aiv, fwd, delta
                    )
        except Exception:
            pass
        events = parser.parse_decoded(msg, frame, recv_ns)
        if len(events) == 1 and type(events[0]) is Quote:
            self._learn(msg, events[0].instrument)
        return events

    def _fuse(
        self,
        book: Book,
        slot: int,
        ts: int,
        bid: float,
        bsz: float,
        ask: float,
        asz: float,
        mp: float,
        miv: float,
        biv: float,
        aiv: float,
        fwd: float,
        delta: float,
    ) -> Sequence[Event]:
        """Write one checked ticker into its row (IVs still in percent, 0 = none); tell the
        trigger; ``(BookChanged,)`` unless the trigger says nothing moved."""
        biv = biv / 100.0 if biv else NAN
        aiv = aiv / 100.0 if aiv else NAN
        on_write = self._on_write
        changed = on_write is None or book.quote_changed(slot, bid, bsz, ask, asz, biv, aiv)
        write_row(
            book.buffer,
            slot * ROW_BYTES,
            ts,
            bid,
            bsz,
            ask,
            asz,
            mp,
            miv / 100.0 if miv else NAN,
            biv,
            aiv,
            fwd,
            delta,
        )
        if on_write is not None and not on_write(book, slot, fwd, changed):
            return _NO_EVENTS  # only its time or mark moved (or its forward, a little)
        return self._changed.get(id(book)) or self._changed_of(book)

    def _missed(self) -> None:
        """The typed decoder failed on a ticker the orjson way fused: count it, and switch
        typed decoding off once misses pass ``TYPED_MISSES_MAX`` and outnumber the hits."""
        self.typed_misses += 1
        misses = self.typed_misses
        if self.typed and misses >= TYPED_MISSES_MAX and misses > self.typed_hits:
            self.typed = False
            log.warning(
                "fastpath_typed_decoding_off",
                misses=misses,
                hits=self.typed_hits,
                reason="tickers the typed decoder does not know (new fields?)",
            )

    def apply(self, frame: str | bytes, recv_ns: int) -> Sequence[Event]:
        """``parse`` and apply the events to the books; returns them (none for a fused write)."""
        events = self.parse(frame, recv_ns)
        if events and type(events[0]) is BookChanged:
            return _NO_EVENTS
        for ev in events:
            self.books.on_event(ev)
        return events

    def _learn(self, msg: object, instrument: str) -> None:
        """Remember a ticker channel's instrument: the fused path's key from now on."""
        try:
            channel = msg[_PARAMS][_CHANNEL]  # type: ignore[index]
        except (KeyError, TypeError, IndexError):
            return
        if type(channel) is str and channel.startswith("ticker."):
            if len(self._channels) >= NAME_CACHE_MAX:
                self._channels.clear()
                self._table.clear()
            elif self._channels.get(channel, instrument) != instrument:
                self._table.clear()  # a channel that named another instrument
            self._channels[channel] = instrument
            orders = _orders_of(msg)
            if orders is not None and orders != self._orders:
                self._use_orders(orders)

    def _use_orders(self, orders: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
        """Decode with the typed decoder declared in these key orders (built once per
        process for each, ``ORDERS_MAX`` at most; past that the current one stays)."""
        loads = _DECODERS.get(orders)
        if loads is None:
            if len(_DECODERS) >= ORDERS_MAX:
                return
            loads = _DECODERS[orders] = ticker_decoder(*orders)
        self._orders, self._loads = orders, loads

    def _changed_of(self, book: Book) -> tuple[Event, ...]:
        out: tuple[Event, ...] = (BookChanged(book.venue, book.underlying),)
        self._changed[id(book)] = out
        return out
