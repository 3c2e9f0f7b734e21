"""The Deribit JSON-RPC v2 protocol as values: requests, channel names, subscription state.

Pure (no I/O, no asyncio): ``streamer.feeds.deribit.connection`` sends what these build and
feeds back what the venue answered; the tests drive them without sockets. Frames coming in
are parsed by ``streamer.feeds.deribit.parser``.

Deribit API v2 documentation, "JSON-RPC over websocket", "Subscriptions", "Rate limits"
(DESIGN section 2): channels are subscribed in batches (a too large request is refused with
-32600 "request entity too large", without an id); the subscribe result lists the channels
accepted; a channel is asked for at most once per session (``Subscriptions``); 10028
``too_many_requests`` ends the session.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from streamer.errors import InputError
from streamer.instruments import STABLECOINS

VENUE = "deribit"
MIN_HEARTBEAT_S = 10.0  # Deribit refuses a shorter public/set_heartbeat interval
DEFAULT_INTERVAL = "100ms"  # the fastest public ticker/book interval (".raw" needs auth)
DEFAULT_BATCH_SIZE = 100  # channels per subscribe request; 250 is reported to pass
DEFAULT_MAX_REQUEST_BYTES = 8_192  # and a byte cap: the refusal is "request entity too large"

TOO_MANY_REQUESTS = 10028  # Deribit "too_many_requests"
INVALID_REQUEST = -32600  # JSON-RPC "invalid request"; Deribit: "request entity too large"

SUBSCRIBE = "public/subscribe"
UNSUBSCRIBE = "public/unsubscribe"
GET_INSTRUMENTS = "public/get_instruments"
SET_HEARTBEAT = "public/set_heartbeat"
TEST = "public/test"


# -- pure helpers: request builders and channel names ------------------------------------------


def rpc_request(request_id: int, method: str, params: Mapping[str, object]) -> str:
    """One JSON-RPC 2.0 request as text."""
    return orjson.dumps(
        {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    ).decode()


def ticker_channel(instrument: str, interval: str = DEFAULT_INTERVAL) -> str:
    """``ticker.BTC-27DEC24-100000-C.100ms``."""
    return f"ticker.{instrument}.{interval}"


def book_channel(instrument: str, interval: str = DEFAULT_INTERVAL) -> str:
    """``book.BTC-27DEC24-100000-C.100ms`` (snapshot, then changes with change_id)."""
    return f"book.{instrument}.{interval}"


def instrument_state_channel(currency: str) -> str:
    """``instrument.state.option.BTC``: option listings (created) and expiries (settled)."""
    return f"instrument.state.option.{currency}"


def index_channel(currency: str) -> str | None:
    """``deribit_price_index.btc_usd`` for a coin; None for the linear ``USDC``/``USDT`` books
    (their underlyings carry their own ``xxx_usdc`` indices)."""
    if currency.upper() in STABLECOINS:
        return None
    return f"deribit_price_index.{currency.lower()}_usd"


def instrument_channels(
    instrument: str, *, book: bool, interval: str = DEFAULT_INTERVAL
) -> tuple[str, ...]:
    """The channels followed for one option."""
    if book:
        return (ticker_channel(instrument, interval), book_channel(instrument, interval))
    return (ticker_channel(instrument, interval),)


def static_channels(currencies: Iterable[str]) -> list[str]:
    """The per-currency channels: listings/expiries and the spot index."""
    out: list[str] = []
    for cur in currencies:
        out.append(instrument_state_channel(cur))
        idx = index_channel(cur)
        if idx is not None:
            out.append(idx)
    return out


def currency_of(underlying: str) -> str:
    """The ``get_instruments`` currency that lists an underlying: ``BTC`` -> ``BTC``,
    ``XRP_USDC`` -> ``USDC``."""
    return underlying.rsplit("_", 1)[1] if "_" in underlying else underlying


def batch_channels(
    channels: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> list[list[str]]:
    """Split ``channels`` (order kept) into subscribe lists of at most ``batch_size`` channels
    and about ``max_bytes`` of JSON each (a single longer channel still gets its own batch)."""
    if batch_size < 1:
        raise InputError("batch_size", f"must be >= 1, got {batch_size}")
    batches: list[list[str]] = []
    current: list[str] = []
    size = 0
    for ch in channels:
        cost = len(ch) + 3  # quotes and a comma
        if current and (len(current) >= batch_size or size + cost > max_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(ch)
        size += cost
    if current:
        batches.append(current)
    return batches


# -- pure helpers: subscription bookkeeping ----------------------------------------------------


@dataclass
class RequestOutcome:
    """What a reply did to the subscription state (``Subscriptions.on_result/on_error``)."""

    method: str
    channels: tuple[str, ...]
    accepted: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()


class Subscriptions:
    """Which channels the feed wants, which the server confirmed this session, which are asked.

    ``wanted`` survives reconnects; ``active``, the requests in flight, ``refused`` and the
    per-channel request counter ``requested`` are per session (``new_session``). ``missing``
    is what still has to be asked for: wanted, not active, not in flight, not refused this
    session; so after a reconnect every channel is asked for exactly once.
    """

    def __init__(self) -> None:
        self.wanted: set[str] = set()
        self.active: set[str] = set()
        self.refused: set[str] = set()
        self.requested: Counter[str] = Counter()
        self._in_flight: dict[int, tuple[str, tuple[str, ...]]] = {}

    def new_session(self) -> None:
        """A new connection: nothing is subscribed or in flight any more."""
        self.active.clear()
        self.refused.clear()
        self.requested.clear()
        self._in_flight.clear()

    def pending_subscribe(self) -> set[str]:
        """Channels in subscribe requests not answered yet."""
        return {
            ch for method, chans in self._in_flight.values() if method == SUBSCRIBE for ch in chans
        }

    def want(self, channels: Iterable[str]) -> None:
        self.wanted.update(channels)

    def unwant(self, channels: Iterable[str]) -> list[str]:
        """Stop wanting ``channels``; returns those to unsubscribe (active or being asked)."""
        pending = self.pending_subscribe()
        out: list[str] = []
        for ch in channels:
            self.wanted.discard(ch)
            if ch in self.active or ch in pending:
                out.append(ch)
        return out

    def missing(self) -> list[str]:
        """Wanted channels to ask for now (sorted, for stable batches)."""
        skip = self.active | self.refused | self.pending_subscribe()
        return sorted(self.wanted - skip)

    def sent(self, request_id: int, method: str, channels: Sequence[str]) -> None:
        """A (un)subscribe request went out."""
        self._in_flight[request_id] = (method, tuple(channels))
        if method == SUBSCRIBE:
            self.requested.update(channels)

    def resubscribe(self, channel: str) -> bool:
        """Forget that ``channel`` is active so it is unsubscribed and asked for again; False
        when it is not active (not subscribed yet, or a resubscription is already on its way)."""
        if channel not in self.active or channel in self.pending_subscribe():
            return False
        self.active.discard(channel)
        return True

    def oldest(self, method: str) -> int | None:
        """The id of the oldest unanswered request of ``method``."""
        return next((rid for rid, (m, _) in self._in_flight.items() if m == method), None)

    def is_tracked(self, request_id: int | None) -> bool:
        return request_id is not None and request_id in self._in_flight

    def on_result(self, request_id: int, result: object) -> RequestOutcome | None:
        """The server's result for a request: a subscribe result lists the accepted channels
        (the others are refused for this session); an unsubscribe result the removed ones."""
        entry = self._in_flight.pop(request_id, None)
        if entry is None:
            return None
        method, channels = entry
        listed = (
            {str(x) for x in result} if isinstance(result, list) else set(channels)
        )  # no list: take the request as accepted
        accepted = tuple(ch for ch in channels if ch in listed)
        if method == SUBSCRIBE:
            refused = tuple(ch for ch in channels if ch not in listed)
            self.active.update(accepted)
            self.refused.update(refused)
            return RequestOutcome(method, channels, accepted, refused)
        self.active.difference_update(channels)
        return RequestOutcome(method, channels, accepted)

    def on_error(self, request_id: int, *, retry: bool) -> RequestOutcome | None:
        """The server refused a request. A subscribe's channels are refused for this session
        unless ``retry`` (then ``missing`` offers them again)."""
        entry = self._in_flight.pop(request_id, None)
        if entry is None:
            return None
        method, channels = entry
        if method == SUBSCRIBE and not retry:
            self.refused.update(channels)
        return RequestOutcome(method, channels, (), channels if method == SUBSCRIBE else ())
