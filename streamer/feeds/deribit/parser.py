"""Deribit JSON-RPC v2 frames -> normalized events (``streamer.feeds.events``): pure, no I/O.

One ``DeribitParser`` per connection turns each received websocket frame (text or bytes) into a
list of events. It never raises on bad input: a frame it cannot use is counted in
``parser.drops`` under a short reason and logged (structlog, the first few of each reason, then
at powers of two). Valid frames about things that are not single options (futures, perpetuals,
combos) are skipped quietly and counted in ``parser.skipped``.

Protocol (Deribit API v2 documentation, "Subscriptions" and "Market data" sections; DESIGN.md
section 2):

* notifications ``{"method": "subscription", "params": {"channel", "data"}}``, by channel:

  - ``ticker.{inst}.{interval}`` -> ``Quote``: IVs on the wire are percent (divided by 100 here);
    a zero (or absent, or null) bid/ask price means no quote on that side: price and size NaN;
    a zero IV is NaN; Greeks copied. ``underlying_price`` is the option's forward.
  - ``book.{inst}.{interval}`` -> ``BookTop``: a ``snapshot`` then ``change`` messages of
    ``[action, price, amount]`` levels, ``action`` in new/change/delete; each change carries
    ``prev_change_id``, which must equal the previous message's ``change_id``. A change whose
    ``change_id`` is not above the last applied one (a duplicated frame, or a late one after a
    fresh snapshot) changes nothing and is skipped (``skipped["book_old_change"]``). Another
    mismatch is a gap: the instrument's levels are dropped, a
    ``FeedStatus(state="gap", instrument=...)`` is emitted (the feed resubscribes, Deribit
    then sends a fresh snapshot) and changes are ignored
    (counted in ``skipped["book_no_snapshot"]``) until that snapshot. The grouped channel
    ``book.{inst}.{group}.{depth}.{interval}`` (``[price, amount]`` levels, full each time) is
    read too.
  - ``quote.{inst}`` -> ``BookTop``; ``trades.{inst|kind.currency}.{interval}`` -> ``Trade``
    (IV percent); ``markprice.options.{index}`` -> ``MarkPrice`` (its ``iv`` is already a
    fraction); ``deribit_price_index.{index}`` -> ``IndexPrice``;
    ``instrument.state.{kind}.{currency}``: ``created``/``started`` -> ``InstrumentListed``
    (metadata from the name), ``settled``/``deactivated``/``closed``/``terminated`` ->
    ``InstrumentExpired``.

* ``{"method": "heartbeat", "params": {"type": "test_request" | "heartbeat"}}`` -> ``Heartbeat``
  (a ``test_request`` must be answered with ``public/test``; the feed does that).
* JSON-RPC replies ``{"id", "result"}`` / ``{"id", "error": {"code", "message"}}`` ->
  ``RpcResponse``. A ``public/get_instruments`` result (a list of instrument objects) also yields
  one ``InstrumentListed`` per option in it (before the ``RpcResponse``), with tick size and
  contract size; an option is inverse (premium in coin) unless it is settled or quoted in a
  stablecoin (``settlement_currency``/``quote_currency`` USDC/USDT, or a ``XRP_USDC``-style
  name).

Instrument names follow ``streamer.instruments`` (DESIGN section 2).

Size limit: a frame longer than ``max_frame_bytes`` (UTF-8 bytes; default
``DEFAULT_MAX_FRAME_BYTES``) is dropped and counted (``too_large``) before it is decoded, so a
huge or endless frame costs a length check, not a parse. ``frame_too_large`` is the same test
for the websocket adapter, which applies it before the recorder and the (fused) parser.

Speed: the book's fused path (``streamer.book.fastpath``) decodes a frame once, writes a
ticker of a known instrument straight into its book row, and hands everything else to
``parse_decoded`` here, the event path.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import structlog

from streamer.errors import ParseError
from streamer.events import (
    BookTop,
    Event,
    FeedStatus,
    Heartbeat,
    IndexPrice,
    Instrument,
    InstrumentExpired,
    InstrumentListed,
    MarkPrice,
    Quote,
    RpcResponse,
    Trade,
)
from streamer.instruments import STABLECOINS, OptionName, inverse_of, parse_option

log = structlog.get_logger(__name__)

NAN = math.nan
DEFAULT_VENUE = "deribit"
LOG_FIRST = 5  # log the first few drops of each reason, then every power of two
NAME_CACHE_MAX = 200_000  # instrument-name cache bound (cleared when exceeded)
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024  # a BTC get_instruments reply is ~0.5 MB
LISTED_STATES = frozenset({"created", "started"})
EXPIRED_STATES = frozenset({"settled", "deactivated", "closed", "terminated", "delivered"})
BOOK_ACTIONS = frozenset({"new", "change", "delete"})

_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError
_EMPTY: dict[str, Any] = {}


def frame_too_large(frame: str | bytes, limit: int) -> int:
    """The frame's size in UTF-8 bytes when it exceeds ``limit``, else 0. O(1) unless a text
    frame is within a factor 4 of the limit (then it is encoded once to count its bytes)."""
    n = len(frame)
    if n > limit:
        return n
    if type(frame) is str and 4 * n > limit:
        size = len(frame.encode("utf-8", "surrogatepass"))
        return size if size > limit else 0
    return 0


def _num(value: object) -> float:
    """A JSON number as float (null -> NaN); anything else is a ``ParseError``."""
    if value is None:
        return NAN
    if type(value) is float or type(value) is int or type(value) is bool:
        return float(value)
    raise ParseError("bad_type", f"not a number: {value!r:.40}")


def _req(value: object) -> float:
    """A JSON number that must be there (null is a ``ParseError`` too)."""
    if value is None:
        raise ParseError("bad_type", "null where a number is required")
    return _num(value)


def _price(value: object) -> float:
    """A price or IV where zero (or null) means none: NaN."""
    v = _num(value)
    return v if v != 0.0 else NAN


def _int(value: object, what: str) -> int:
    if type(value) is not int:
        raise ParseError("bad_type", f"{what} not an integer: {value!r:.40}")
    return value


def _str(value: object, what: str) -> str:
    if type(value) is not str:
        raise ParseError("bad_type", f"{what} not a string: {value!r:.40}")
    return value


def _is_inverse(underlying: str, item: dict[str, Any]) -> bool:
    """Coin-margined (premium in coin) unless settled/quoted in a stablecoin."""
    return (
        inverse_of(underlying)
        and item.get("settlement_currency") not in STABLECOINS
        and item.get("quote_currency") not in STABLECOINS
    )


def instrument_from_name(venue: str, opt: OptionName) -> Instrument:
    """An ``Instrument`` from what the name says (contract size 1, tick size unknown)."""
    return Instrument(
        venue=venue,
        name=opt.name,
        underlying=opt.underlying,
        expiry=opt.expiry,
        expiry_ms=opt.expiry_ms,
        strike=opt.strike,
        is_call=opt.is_call,
        inverse=inverse_of(opt.underlying),
    )


class _Levels:
    """One instrument's order book from the ``book`` channel: price -> amount per side."""

    __slots__ = ("asks", "bids", "change_id")

    def __init__(self, change_id: int) -> None:
        self.change_id = change_id
        self.bids: dict[float, float] = {}
        self.asks: dict[float, float] = {}


def _levels3(entries: object) -> list[tuple[str, float, float]]:
    """Validate ``[[action, price, amount], ...]`` before anything is applied."""
    if type(entries) is not list:
        raise ParseError("bad_type", "book side not a list")
    out: list[tuple[str, float, float]] = []
    for e in entries:
        if type(e) is not list or len(e) != 3:
            raise ParseError("bad_book_level", f"{e!r:.60}")
        action, price, amount = e
        if action not in BOOK_ACTIONS:
            raise ParseError("bad_book_level", f"action {action!r:.30}")
        p, a = _num(price), _num(amount)
        if math.isnan(p) or math.isnan(a):
            raise ParseError("bad_book_level", f"{e!r:.60}")
        out.append((action, p, a))
    return out


def _levels2(entries: object) -> list[tuple[float, float]]:
    """Validate the grouped channel's ``[[price, amount], ...]``."""
    if type(entries) is not list:
        raise ParseError("bad_type", "book side not a list")
    out: list[tuple[float, float]] = []
    for e in entries:
        if type(e) is not list or len(e) != 2:
            raise ParseError("bad_book_level", f"{e!r:.60}")
        p, a = _num(e[0]), _num(e[1])
        if math.isnan(p) or math.isnan(a):
            raise ParseError("bad_book_level", f"{e!r:.60}")
        out.append((p, a))
    return out


class DeribitParser:
    """Deribit frames -> events; counts what it drops (``drops``) and skips (``skipped``).

    Holds only the per-instrument order-book levels (``book`` channel) and caches; call
    ``reset()`` on a new connection (the books restart from their snapshots).
    """

    __slots__ = (
        "_levels",
        "_log_first",
        "_names",
        "drops",
        "frames",
        "max_frame_bytes",
        "skipped",
        "venue",
    )

    def __init__(
        self,
        venue: str = DEFAULT_VENUE,
        *,
        log_first: int = LOG_FIRST,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        if max_frame_bytes < 1:
            raise ValueError(f"max_frame_bytes: must be >= 1, got {max_frame_bytes}")
        self.venue = venue
        self.max_frame_bytes = max_frame_bytes
        self.frames = 0
        self.drops: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self._log_first = log_first
        self._levels: dict[str, _Levels] = {}
        self._names: dict[str, OptionName | str] = {}  # OptionName, or why it is no option

    def reset(self) -> None:
        """Forget every instrument's order-book levels (a new connection sends snapshots)."""
        self._levels.clear()

    # -- public entry points ------------------------------------------------------------------

    def parse(self, frame: str | bytes, recv_ns: int) -> list[Event]:
        """All events of one frame; never raises (bad frames are counted in ``drops``)."""
        self.frames += 1
        # (anything that is no str/bytes at all is orjson's to refuse, below)
        size = frame_too_large(frame, self.max_frame_bytes) if isinstance(frame, str | bytes) else 0
        if size:
            return self.too_large(size, frame)
        try:
            msg = _loads(frame)
        except Exception as exc:  # JSONDecodeError, or not str/bytes at all
            return self.bad_json(exc, frame)
        return self.parse_decoded(msg, frame, recv_ns)

    # -- dispatch -------------------------------------------------------------------------------

    def bad_json(self, exc: Exception, frame: str | bytes) -> list[Event]:
        """Count (and log) a frame that is not JSON at all."""
        return self._drop("bad_json", str(exc), frame)

    def too_large(self, size: int, frame: str | bytes, limit: int | None = None) -> list[Event]:
        """Count (and log) a frame over ``max_frame_bytes`` (or the adapter's ``limit``: it
        calls this when it drops one before parsing), never decoded."""
        limit = self.max_frame_bytes if limit is None else limit
        return self._drop("too_large", f"{size} bytes > max_frame_bytes {limit}", frame)

    def parse_decoded(self, msg: Any, frame: str | bytes, recv_ns: int) -> list[Event]:
        """The events of one decoded frame (``frame`` is its raw text, for drop logs)."""
        try:
            params = msg["params"]
            channel = params["channel"]
            data = params["data"]
        except (KeyError, TypeError, IndexError):
            return self._other(msg, recv_ns, frame)
        try:
            if channel.startswith("ticker."):
                q = self._ticker(data, recv_ns)
                return [] if q is None else [q]
            if channel.startswith("book."):
                return self._book(channel, data, recv_ns)
            if channel.startswith("trades."):
                return self._trades(data, recv_ns)
            if channel.startswith("quote."):
                return self._quote_channel(data, recv_ns)
            if channel.startswith("markprice.options."):
                return self._markprice(data, recv_ns)
            if channel.startswith("deribit_price_index."):
                return self._index(data, recv_ns)
            if channel.startswith("instrument.state."):
                return self._instrument_state(data, recv_ns)
            raise ParseError("unknown_channel", str(channel)[:80])
        except ParseError as exc:
            return self._drop(exc.reason, exc.detail, frame)
        except KeyError as exc:
            return self._drop("missing_field", f"missing {exc}", frame)
        except (TypeError, AttributeError) as exc:
            return self._drop("bad_type", str(exc), frame)
        except (ValueError, IndexError, OverflowError) as exc:
            return self._drop("bad_value", str(exc), frame)
        except Exception as exc:  # a bug here must not stop the feed
            log.exception("deribit_parse_internal_error", error=repr(exc))
            return self._drop("internal_error", repr(exc), frame)

    def _other(self, msg: object, recv_ns: int, frame: str | bytes) -> list[Event]:
        """Anything that is not a subscription notification."""
        if type(msg) is not dict:
            return self._drop("not_object", type(msg).__name__, frame)
        try:
            method = msg.get("method")
            if method == "heartbeat":
                kind = msg["params"]["type"]
                if kind not in ("test_request", "heartbeat"):
                    raise ParseError("bad_heartbeat", f"type {kind!r:.30}")
                return [Heartbeat(self.venue, recv_ns, kind == "test_request")]
            if method == "subscription":
                params = msg.get("params")
                if type(params) is not dict:
                    raise ParseError("missing_field" if params is None else "bad_type", "params")
                raise ParseError("missing_field", "params.channel/data")
            if method is None and ("result" in msg or "error" in msg):
                return self._rpc(msg, recv_ns)
            raise ParseError("unknown_method", f"{method!r:.40}")
        except ParseError as exc:
            return self._drop(exc.reason, exc.detail, frame)
        except KeyError as exc:
            return self._drop("missing_field", f"missing {exc}", frame)
        except (TypeError, AttributeError) as exc:
            return self._drop("bad_type", str(exc), frame)
        except Exception as exc:  # a bug here must not stop the feed
            log.exception("deribit_parse_internal_error", error=repr(exc))
            return self._drop("internal_error", repr(exc), frame)

    def _drop(self, reason: str, detail: str, frame: str | bytes) -> list[Event]:
        n = self.drops[reason] = self.drops[reason] + 1
        if n <= self._log_first or n & (n - 1) == 0:
            head = frame[:160] if isinstance(frame, str | bytes) else repr(frame)[:160]
            log.warning(
                "deribit_frame_dropped", reason=reason, count=n, detail=detail[:200], frame=head
            )
        return []

    # -- instruments --------------------------------------------------------------------------

    def _option(self, name: object) -> OptionName | None:
        """The parsed option name, or None (counted: skipped non-options, dropped garbage)."""
        if type(name) is not str:
            raise ParseError("bad_type", f"instrument_name {name!r:.40}")
        hit = self._names.get(name)
        if hit is None:
            hit = self._classify(name)
            if len(self._names) >= NAME_CACHE_MAX:
                self._names.clear()
            self._names[name] = hit
        if isinstance(hit, OptionName):
            return hit
        if hit == "bad_instrument":
            raise ParseError("bad_instrument", name[:80])
        self.skipped[hit] += 1
        return None

    @staticmethod
    def _classify(name: str) -> OptionName | str:
        opt = parse_option(name)
        if opt is not None:
            return opt
        parts = name.split("-")
        if len(parts) == 2 and parts[0] and parts[1]:
            return "future"  # BTC-PERPETUAL, BTC-27DEC24, XRP_USDC-PERPETUAL
        if len(parts) >= 3 and parts[0] and parts[1].isalpha() and parts[1].isupper():
            return "combo"  # BTC-CS-..., BTC-STRD-..., BTC-FS-...
        return "bad_instrument"

    # -- ticker ---------------------------------------------------------------------------------

    def _ticker(self, d: dict[str, Any], recv_ns: int) -> Quote | None:
        """The event path's ticker -> Quote (the reference for the fused path's semantics)."""
        opt = self._option(d["instrument_name"])
        if opt is None:
            return None
        get = d.get
        ts = get("timestamp")
        if type(ts) is not int:
            raise ParseError("bad_type" if ts is not None else "missing_field", "timestamp")
        g = get("greeks")
        if g is None:
            g = _EMPTY
        elif type(g) is not dict:
            raise ParseError("bad_type", "greeks")
        # ``x if type(x) is float else _num(x)``: the common case without a call
        bid = get("best_bid_price")
        bid = bid if type(bid) is float and bid != 0.0 else _price(bid)
        ask = get("best_ask_price")
        ask = ask if type(ask) is float and ask != 0.0 else _price(ask)
        if bid == bid:  # noqa: PLR0124 - not NaN
            bsz = get("best_bid_amount")
            bsz = bsz if type(bsz) is float else _num(bsz)
        else:
            bsz = NAN
        if ask == ask:  # noqa: PLR0124
            asz = get("best_ask_amount")
            asz = asz if type(asz) is float else _num(asz)
        else:
            asz = NAN
        miv, biv, aiv = get("mark_iv"), get("bid_iv"), get("ask_iv")
        mp, fwd, idx = get("mark_price"), get("underlying_price"), get("index_price")
        oi = get("open_interest")
        de, ga, ve, th, rh = (
            g.get("delta"),
            g.get("gamma"),
            g.get("vega"),
            g.get("theta"),
            g.get("rho"),
        )
        fidx = get("underlying_index")
        return Quote(
            self.venue,
            opt.name,
            ts,
            recv_ns,
            bid,
            bsz,
            ask,
            asz,
            mp if type(mp) is float else _num(mp),
            (miv if type(miv) is float and miv != 0.0 else _price(miv)) / 100.0,
            (biv if type(biv) is float and biv != 0.0 else _price(biv)) / 100.0,
            (aiv if type(aiv) is float and aiv != 0.0 else _price(aiv)) / 100.0,
            fwd if type(fwd) is float else _num(fwd),
            "" if fidx is None else _str(fidx, "underlying_index"),
            idx if type(idx) is float else _num(idx),
            de if type(de) is float else _num(de),
            ga if type(ga) is float else _num(ga),
            ve if type(ve) is float else _num(ve),
            th if type(th) is float else _num(th),
            rh if type(rh) is float else _num(rh),
            oi if type(oi) is float else _num(oi),
        )

    # -- order book -----------------------------------------------------------------------------

    def _book(self, channel: str, d: dict[str, Any], recv_ns: int) -> list[Event]:
        name = d["instrument_name"]
        opt = self._option(name)
        if opt is None:
            return []
        ts = _int(d["timestamp"], "timestamp")
        if channel.count(".") >= 4:  # book.{inst}.{group}.{depth}.{interval}: full each time
            bids2, asks2 = _levels2(d["bids"]), _levels2(d["asks"])
            bb = max(bids2, default=(NAN, NAN))
            ba = min(asks2, default=(NAN, NAN))
            return [BookTop(self.venue, opt.name, ts, recv_ns, bb[0], bb[1], ba[0], ba[1])]
        kind = d.get("type", "snapshot" if "prev_change_id" not in d else "change")
        change_id = _int(d["change_id"], "change_id")
        bids, asks = _levels3(d["bids"]), _levels3(d["asks"])
        if kind == "snapshot":
            lv = self._levels[opt.name] = _Levels(change_id)
        elif kind == "change":
            prev = _int(d["prev_change_id"], "prev_change_id")
            lv_or_none = self._levels.get(opt.name)
            if lv_or_none is None:
                self.skipped["book_no_snapshot"] += 1
                return []
            lv = lv_or_none
            if change_id <= lv.change_id:  # a duplicate, or one older than the levels held
                self.skipped["book_old_change"] += 1
                return []
            if prev != lv.change_id:
                del self._levels[opt.name]
                detail = f"prev_change_id {prev} != last change_id {lv.change_id}"
                log.info("deribit_book_gap", instrument=opt.name, detail=detail)
                return [FeedStatus(self.venue, "gap", recv_ns, detail, opt.name)]
            lv.change_id = change_id
        else:
            raise ParseError("bad_value", f"book type {kind!r:.30}")
        for side, entries in ((lv.bids, bids), (lv.asks, asks)):
            for action, price, amount in entries:
                if action == "delete" or amount == 0.0:
                    side.pop(price, None)
                else:
                    side[price] = amount
        bid = max(lv.bids) if lv.bids else NAN
        ask = min(lv.asks) if lv.asks else NAN
        return [
            BookTop(
                self.venue,
                opt.name,
                ts,
                recv_ns,
                bid,
                lv.bids[bid] if not math.isnan(bid) else NAN,
                ask,
                lv.asks[ask] if not math.isnan(ask) else NAN,
            )
        ]

    def _quote_channel(self, d: dict[str, Any], recv_ns: int) -> list[Event]:
        opt = self._option(d["instrument_name"])
        if opt is None:
            return []
        ts = _int(d["timestamp"], "timestamp")
        bid = _price(d.get("best_bid_price"))
        ask = _price(d.get("best_ask_price"))
        bsz = _num(d.get("best_bid_amount")) if not math.isnan(bid) else NAN
        asz = _num(d.get("best_ask_amount")) if not math.isnan(ask) else NAN
        return [BookTop(self.venue, opt.name, ts, recv_ns, bid, bsz, ask, asz)]

    # -- other channels -------------------------------------------------------------------------

    def _option_items(
        self, data: object, what: str, item: str
    ) -> Iterator[tuple[dict[str, Any], OptionName]]:
        """The objects of a list-valued channel that name single options, with their names."""
        if type(data) is not list:
            raise ParseError("bad_type", f"{what} data not a list")
        for t in data:
            if type(t) is not dict:
                raise ParseError("bad_type", f"{item} not an object")
            opt = self._option(t["instrument_name"])
            if opt is not None:
                yield t, opt

    def _trades(self, data: object, recv_ns: int) -> list[Event]:
        out: list[Event] = []
        for t, opt in self._option_items(data, "trades", "trade"):
            direction = t["direction"]
            if direction not in ("buy", "sell"):
                raise ParseError("bad_value", f"direction {direction!r:.20}")
            tid = t.get("trade_id", "")
            out.append(
                Trade(
                    self.venue,
                    opt.name,
                    _int(t["timestamp"], "timestamp"),
                    recv_ns,
                    _num(t["price"]),
                    _num(t["amount"]),
                    direction == "buy",
                    _price(t.get("iv")) / 100.0,
                    tid if type(tid) is str else str(_int(tid, "trade_id")),
                )
            )
        return out

    def _markprice(self, data: object, recv_ns: int) -> list[Event]:
        out: list[Event] = []
        for m, opt in self._option_items(data, "markprice", "markprice item"):
            ts = _int(m["timestamp"], "timestamp")
            # this channel's iv is a fraction already (0.9 = 90%)
            out.append(
                MarkPrice(self.venue, opt.name, ts, recv_ns, _num(m["mark_price"]), _price(m["iv"]))
            )
        return out

    def _index(self, d: dict[str, Any], recv_ns: int) -> list[Event]:
        return [
            IndexPrice(
                self.venue,
                _str(d["index_name"], "index_name"),
                _int(d["timestamp"], "timestamp"),
                recv_ns,
                _req(d["price"]),
            )
        ]

    def _instrument_state(self, d: dict[str, Any], recv_ns: int) -> list[Event]:
        state = _str(d["state"], "state")
        ts = _int(d["timestamp"], "timestamp")
        opt = self._option(d["instrument_name"])
        if opt is None:
            return []
        if state in LISTED_STATES:
            return [InstrumentListed(instrument_from_name(self.venue, opt), recv_ns)]
        if state in EXPIRED_STATES:
            return [InstrumentExpired(self.venue, opt.name, ts, recv_ns)]
        self.skipped[f"state_{state[:20]}"] += 1
        return []

    # -- JSON-RPC replies -----------------------------------------------------------------------

    def _rpc(self, msg: dict[str, Any], recv_ns: int) -> list[Event]:
        rid = msg.get("id")
        if rid is not None and type(rid) is not int:
            raise ParseError("bad_type", f"id {rid!r:.30}")
        if "error" in msg:
            err = msg["error"]
            if type(err) is not dict:
                raise ParseError("bad_type", "error not an object")
            code = _int(err["code"], "error.code")
            message = err.get("message", "")
            return [
                RpcResponse(
                    self.venue,
                    rid,
                    recv_ns,
                    err.get("data"),
                    code,
                    message if type(message) is str else str(message),
                )
            ]
        result = msg["result"]
        out: list[Event] = []
        if type(result) is list and result and type(result[0]) is dict and "kind" in result[0]:
            for item in result:
                ev = self._listed(item, recv_ns)
                if ev is not None:
                    out.append(ev)
        elif type(result) is dict and "kind" in result and "instrument_name" in result:
            ev = self._listed(result, recv_ns)  # public/get_instrument
            if ev is not None:
                out.append(ev)
        out.append(RpcResponse(self.venue, rid, recv_ns, result))
        return out

    def _listed(self, item: object, recv_ns: int) -> InstrumentListed | None:
        """One ``get_instruments`` entry; a bad entry is counted, the others still count."""
        try:
            if type(item) is not dict:
                raise ParseError("bad_instrument", "not an object")
            kind = item["kind"]
            if kind != "option":
                self.skipped[str(kind)[:20]] += 1
                return None
            opt = self._option(item["instrument_name"])
            if opt is None:
                return None
            option_type = item["option_type"]
            if option_type not in ("call", "put") or (option_type == "call") != opt.is_call:
                raise ParseError("bad_instrument", f"option_type {option_type!r:.20}")
            expiry_ms = item.get("expiration_timestamp", opt.expiry_ms)
            strike = _num(item.get("strike", opt.strike))
            tick = _num(item.get("tick_size"))
            size = _num(item.get("contract_size", 1.0))
            return InstrumentListed(
                Instrument(
                    venue=self.venue,
                    name=opt.name,
                    underlying=opt.underlying,
                    expiry=opt.expiry,
                    expiry_ms=_int(expiry_ms, "expiration_timestamp"),
                    strike=strike,
                    is_call=opt.is_call,
                    contract_size=size,
                    inverse=_is_inverse(opt.underlying, item),
                    tick_size=tick,
                ),
                recv_ns,
            )
        except ParseError as exc:
            self._count_item(exc.reason, exc.detail)
        except KeyError as exc:
            self._count_item("bad_instrument", f"missing {exc}")
        except (TypeError, AttributeError, ValueError) as exc:
            self._count_item("bad_instrument", str(exc))
        return None

    def _count_item(self, reason: str, detail: str) -> None:
        n = self.drops[reason] = self.drops[reason] + 1
        if n <= self._log_first or n & (n - 1) == 0:
            log.warning("deribit_instrument_dropped", reason=reason, count=n, detail=detail[:200])
