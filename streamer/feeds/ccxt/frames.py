"""The ccxt adapter's frames: what ``CcxtFeed`` gets from ccxt, as JSON, and the events they make.

ccxt hands the adapter Python dicts, not wire frames, so ``streamer record`` had nothing to
write for ``feed.venue = "ccxt"``. Now every result the adapter acts on is a *frame*: one
JSON object, recorded as received (a recording line ``{"ts_ns", "venue", "frame"}``, DESIGN
section 3, ``venue`` the ccxt exchange id), of one of three kinds::

    {"ccxt": "markets", "exchange": "okx", "underlyings": ["BTC"], "precision_mode": 4,
     "markets": {symbol: market, ...}}         # load_markets(reload=True), as returned
    {"ccxt": "tickers", "tickers": {symbol: ticker, ...}}   # one watch_tickers result
    {"ccxt": "greeks", "greeks": {symbol: greeks, ...}}     # one fetch_all_greeks result

``CcxtFrames`` is the state machine both the live adapter and a replay run: markets select the
options (``mapping.select_option_markets``) and list/expire instruments; tickers and greeks
become ``Quote`` events through ``mapping.quote_from_ticker`` with the latest greeks (or
ticker) of the same symbol. Faithful by construction: while recording, the live adapter
encodes the frame, hands the text to the recorder, and parses *that text* back before acting
on it, so a replay of the recording makes the very events the live run made (the same
``recv_ns``: the recorded ``ts_ns``). What JSON cannot carry (a ``Decimal``, a ``bytes``) is
recorded as its ``str`` and therefore also read as such live while recording.

``is_ccxt_frame(text)`` tells such a frame from a Deribit one (its first key is ``"ccxt"``);
``CcxtFrames.parse`` has the ``FrameParser`` shape, so ``ReplayFeed`` and ``streamer replay``
read ccxt recordings like Deribit ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
import structlog

from streamer.errors import FeedError, ParseError
from streamer.events import Event, Instrument, InstrumentExpired, InstrumentListed
from streamer.feeds.ccxt.mapping import (
    TICK_SIZE,
    quote_from_ticker,
    select_option_markets,
    venue_of,
)

log = structlog.get_logger(__name__)

MARKER = b'{"ccxt":'
KINDS = ("markets", "tickers", "greeks")
_DUMPS_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def is_ccxt_frame(frame: str | bytes) -> bool:
    """Is ``frame`` one of ``CcxtFrames``' frames (the text starts ``{"ccxt":``)?"""
    head = frame[:8]
    return (head.encode() if isinstance(head, str) else head) == MARKER


def markets_frame(
    exchange: str,
    underlyings: Sequence[str],
    markets: Mapping[str, Any],
    precision_mode: int = TICK_SIZE,
) -> dict[str, Any]:
    return {
        "ccxt": "markets",
        "exchange": exchange,
        "underlyings": list(underlyings),
        "precision_mode": int(precision_mode),
        "markets": markets,
    }


def tickers_frame(tickers: Mapping[str, Any]) -> dict[str, Any]:
    return {"ccxt": "tickers", "tickers": tickers}


def greeks_frame(greeks: Mapping[str, Any]) -> dict[str, Any]:
    return {"ccxt": "greeks", "greeks": greeks}


def encode(frame: Mapping[str, Any]) -> str:
    """The frame's JSON text (keys in order, ``"ccxt"`` first; what JSON lacks as ``str``)."""
    return orjson.dumps(frame, default=str, option=_DUMPS_OPTIONS).decode()


class CcxtFrames:
    """Markets, tickers and greeks frames -> listings, expiries and quotes (module docstring).

    ``venue`` and ``underlyings`` may be left out for a replay: the first markets frame
    says them (``exchange``, ``underlyings``).
    """

    def __init__(self, venue: str | None = None, underlyings: Iterable[str] = ()) -> None:
        self.venue = venue
        self.underlyings = tuple(u.upper() for u in underlyings)
        self.selected: dict[str, tuple[Mapping[str, Any], Instrument]] = {}
        self.listed: set[str] = set()
        self.tickers: dict[str, Mapping[str, Any]] = {}
        self.greeks: dict[str, Mapping[str, Any]] = {}
        self.frames = 0
        self.drops: Counter[str] = Counter()  # recorded frames that made no events, by reason

    def events_of(self, frames: Iterable[tuple[int, str, str]]) -> list[tuple[int, Event]]:
        """Recorded ``(ts_ns, venue, frame)`` -> ``(ts_ns, event)`` in order, each event's
        ``recv_ns`` the recorded ``ts_ns``; a frame that cannot be read is counted in
        ``drops`` (and logged), never raised."""
        out: list[tuple[int, Event]] = []
        for ts_ns, _venue, frame in frames:
            try:
                events = self.parse(frame, ts_ns)
            except (ParseError, FeedError) as exc:
                reason = exc.reason if isinstance(exc, ParseError) else "no_options"
                self.drops[reason] += 1
                log.warning("ccxt_frame_dropped", reason=reason, error=str(exc))
                continue
            out.extend((ts_ns, ev) for ev in events)
        return out

    def reset(self) -> None:
        """Nothing per session: listings and the latest dicts carry over reconnects."""

    def parse(self, frame: str | bytes, recv_ns: int) -> list[Event]:
        """One frame's text -> its events (``FrameParser``); ``ParseError`` if it is not a
        ccxt frame."""
        try:
            body = orjson.loads(frame)
        except orjson.JSONDecodeError as exc:
            raise ParseError("bad_json", str(exc)) from None
        if not isinstance(body, dict) or body.get("ccxt") not in KINDS:
            raise ParseError("not_ccxt", "no ccxt frame kind")
        return self.apply(body, recv_ns)

    def apply(self, frame: Mapping[str, Any], recv_ns: int) -> list[Event]:
        """One frame (decoded) -> events. A markets frame selecting no option at all raises
        ``FeedError`` and changes nothing (the live adapter's fatal error)."""
        self.frames += 1
        kind = frame.get("ccxt")
        if kind == "markets":
            return self._markets(frame, recv_ns)
        if kind == "tickers":
            return self._tickers(frame.get("tickers") or {}, recv_ns)
        if kind == "greeks":
            return self._greeks(frame.get("greeks") or {}, recv_ns)
        raise ParseError("not_ccxt", f"unknown ccxt frame kind {kind!r}")

    def _markets(self, frame: Mapping[str, Any], now: int) -> list[Event]:
        if self.venue is None:
            self.venue = venue_of(str(frame.get("exchange")))
        if not self.underlyings:
            self.underlyings = tuple(str(u).upper() for u in frame.get("underlyings") or ())
        markets = frame.get("markets") or {}
        mode = int(frame.get("precision_mode", TICK_SIZE))
        selected = select_option_markets(self.venue, markets, self.underlyings, precision_mode=mode)
        if not selected:
            raise FeedError(f"{self.venue}: no option markets for {list(self.underlyings)}")
        events: list[Event] = []
        names = {inst.name for _, inst in selected.values()}
        for gone in sorted(self.listed - names):
            events.append(InstrumentExpired(self.venue, gone, now // 1_000_000, now))
            self.listed.discard(gone)
        for _, inst in selected.values():
            if inst.name not in self.listed:
                self.listed.add(inst.name)
                events.append(InstrumentListed(inst, now))
        for symbol in set(self.tickers) - set(selected):
            del self.tickers[symbol]
        self.selected = selected
        return events

    def _tickers(self, tickers: Mapping[str, Any], recv_ns: int) -> list[Event]:
        venue = self.venue or ""
        out: list[Event] = []
        for symbol, ticker in tickers.items():
            entry = self.selected.get(symbol)
            if entry is None:
                continue
            self.tickers[symbol] = ticker
            out.append(quote_from_ticker(venue, ticker, entry[0], recv_ns, self.greeks.get(symbol)))
        return out

    def _greeks(self, result: Mapping[str, Any], recv_ns: int) -> list[Event]:
        venue = self.venue or ""
        out: list[Event] = []
        for symbol, greeks in result.items():
            if symbol not in self.selected:
                continue
            self.greeks[symbol] = greeks
            market = self.selected[symbol][0]
            ticker = self.tickers.get(symbol, {"symbol": symbol})
            out.append(quote_from_ticker(venue, ticker, market, recv_ns, greeks))
        return out
