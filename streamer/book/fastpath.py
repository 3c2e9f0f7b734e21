"""The fused ticker path: Deribit frames straight into book rows, for replay and the daemon.

``FastPath(parser, books).parse(frame, recv_ns)`` decodes a frame once (orjson). A ticker on
a channel seen before, of an instrument the books already hold, is checked and written
straight into that instrument's row (``write_row``: one ``struct.pack_into``, what
``Book.write_ticker`` does) without building a ``Quote``: about 1.2 µs of Python after
``orjson.loads`` (``streamer bench replay``). The book's refit trigger is told through
``on_write(book, slot, forward)`` and the call returns that book's one-element ``(BookChanged,)``
tuple (made once per book: nothing is allocated per frame).

Everything else (a first sight, a null, a wrong type, any other channel) goes through the
parser's event path (``DeribitParser.parse_decoded``) and its events are returned for the
caller to apply (``Books.on_event``; the pipeline does that); ``apply`` is parse + apply in
one call. For every field the book stores, both paths accept and reject the same frames and
leave the same rows (tested with hypothesis); fields the book does not keep (gamma, vega,
theta, rho, index price, open interest, underlying index) are checked on the event path only.

The book owns its row layout (``streamer.book.book``); the parser knows nothing of books. A
``FastPath`` has the parser's shape (``parse``, ``reset``), so a feed adapter takes it as its
frame parser and the daemon runs exactly what replay measures.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import orjson

from streamer.book.book import ROW_BYTES, Book, Books, Route, write_row
from streamer.events import BookChanged, Event, Quote
from streamer.feeds.deribit.parser import NAME_CACHE_MAX, DeribitParser

NAN = float("nan")
_loads = orjson.loads
_NO_EVENTS: tuple[Event, ...] = ()

OnWrite = Callable[[Book, int, float], None]
"""``on_write(book, slot, forward)``: a fused write changed ``book``'s row ``slot``."""


def _wire_keys(*names: str) -> tuple[str, ...]:
    """The key strings as orjson hands them out. orjson caches short keys, so a lookup with
    the very same string object matches by identity, without a string compare (~10 ns a
    lookup on the fused path); should the cache drop one, it is just an equal string."""
    return tuple(orjson.loads(orjson.dumps(dict.fromkeys(names, 0))))


_PARAMS, _DATA, _CHANNEL, _NAME, _DELTA, _MARK_IV, _BID_IV, _ASK_IV = _wire_keys(
    "params", "data", "channel", "instrument_name", "delta", "mark_iv", "bid_iv", "ask_iv"
)
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


class FastPath:
    """Deribit frames -> book rows (fused tickers) or events (everything else).

    Args:
        parser: the event path (its ``frames``, ``drops`` and ``skipped`` count every frame).
        books: where fused tickers are written; their venue is ``parser.venue``.
        on_write: called after each fused write (the refit trigger), or None.
    """

    __slots__ = ("_changed", "_channels", "_on_write", "_routes", "books", "last_recv_ns", "parser")

    def __init__(
        self, parser: DeribitParser, books: Books, on_write: OnWrite | None = None
    ) -> None:
        self.parser = parser
        self.books = books
        self._on_write = on_write
        self._routes: dict[str, Route] = books.routes(parser.venue)
        self._channels: dict[str, str] = {}  # "ticker.{inst}.100ms" -> inst
        self._changed: dict[int, tuple[Event, ...]] = {}  # id(book) -> (BookChanged,)
        self.last_recv_ns = 0  # receive time of the newest frame parsed

    def reset(self) -> None:
        """A new connection: the parser forgets its order-book levels."""
        self.parser.reset()

    def parse(self, frame: str | bytes, recv_ns: int) -> Sequence[Event]:
        """One frame: ``(BookChanged,)`` after a fused write, else the parser's events (not
        yet applied to the books). Never raises."""
        parser = self.parser
        parser.frames += 1
        self.last_recv_ns = recv_ns
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
                        biv / 100.0 if biv else NAN,
                        aiv / 100.0 if aiv else NAN,
                        fwd,
                        delta,
                    )
                    if self._on_write is not None:
                        self._on_write(book, slot, fwd)
                    return self._changed.get(id(book)) or self._changed_of(book)
        except Exception:
            pass
        events = parser.parse_decoded(msg, frame, recv_ns)
        if len(events) == 1 and type(events[0]) is Quote:
            self._learn(msg, events[0].instrument)
        return events

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
            self._channels[channel] = instrument

    def _changed_of(self, book: Book) -> tuple[Event, ...]:
        out: tuple[Event, ...] = (BookChanged(book.venue, book.underlying),)
        self._changed[id(book)] = out
        return out
