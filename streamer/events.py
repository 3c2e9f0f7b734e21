"""Normalized feed events: what every venue adapter's parser emits and the book consumes.

All events are frozen, slotted dataclasses. Prices are in the venue's quote unit (coin for
Deribit's coin-margined BTC/ETH options, USD for linear ones); IVs are fractions (0.62, not
62: the parser divides the wire's percent); a side with no quote is NaN, not 0. Times:
``ts_ms`` is the venue's (exchange) time in ms since the epoch, ``recv_ns`` the local receive
time in ns since the epoch (the recording's ``ts_ns``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

NAN = math.nan


@dataclass(frozen=True, slots=True)
class Instrument:
    """A single listed option."""

    venue: str  # "deribit", "okx", ...
    name: str  # the venue's instrument name, "BTC-27DEC24-100000-C"
    underlying: str  # "BTC", "ETH", "XRP_USDC"
    expiry: str  # Deribit-style code, "27DEC24" (day not padded)
    expiry_ms: int  # settlement time, ms since the epoch
    strike: float
    is_call: bool
    contract_size: float = 1.0
    inverse: bool = True  # premium in coin (True) or in the quote currency (False)
    tick_size: float = NAN


@dataclass(frozen=True, slots=True)
class InstrumentListed:
    """An instrument is live (from get_instruments, instrument.state 'created'/'started')."""

    instrument: Instrument
    recv_ns: int = 0


@dataclass(frozen=True, slots=True)
class InstrumentExpired:
    """An instrument stopped trading (settled, delivered, closed, or de-listed)."""

    venue: str
    name: str
    ts_ms: int
    recv_ns: int = 0


@dataclass(frozen=True, slots=True)
class Quote:
    """A ticker update: top of book plus the venue's marks, forward and Greeks.

    Fields the venue did not send are NaN. ``forward`` is Deribit's ``underlying_price`` (the
    expiry's future or synthetic forward), ``forward_index`` its name (``"BTC-27DEC24"`` or
    ``"SYN.BTC-27DEC24"``), ``index_price`` the spot index.
    """

    venue: str
    instrument: str
    ts_ms: int
    recv_ns: int
    bid: float = NAN
    bid_size: float = NAN
    ask: float = NAN
    ask_size: float = NAN
    mark_price: float = NAN
    mark_iv: float = NAN
    bid_iv: float = NAN
    ask_iv: float = NAN
    forward: float = NAN
    forward_index: str = ""
    index_price: float = NAN
    delta: float = NAN
    gamma: float = NAN
    vega: float = NAN
    theta: float = NAN
    rho: float = NAN
    open_interest: float = NAN


@dataclass(frozen=True, slots=True)
class BookTop:
    """Best bid/ask from an order-book channel (no marks, no IVs)."""

    venue: str
    instrument: str
    ts_ms: int
    recv_ns: int
    bid: float
    bid_size: float
    ask: float
    ask_size: float


@dataclass(frozen=True, slots=True)
class MarkPrice:
    """The venue's mark price and mark IV of one option (Deribit ``markprice.options``)."""

    venue: str
    instrument: str
    ts_ms: int
    recv_ns: int
    mark_price: float
    mark_iv: float


@dataclass(frozen=True, slots=True)
class Trade:
    """One trade print."""

    venue: str
    instrument: str
    ts_ms: int
    recv_ns: int
    price: float
    amount: float
    is_buy: bool
    iv: float = NAN
    trade_id: str = ""


@dataclass(frozen=True, slots=True)
class IndexPrice:
    """The spot index (Deribit ``deribit_price_index.btc_usd``)."""

    venue: str
    index: str  # "btc_usd"
    ts_ms: int
    recv_ns: int
    price: float


FeedState = Literal["connected", "disconnected", "gap", "stale", "resubscribe"]


@dataclass(frozen=True, slots=True)
class FeedStatus:
    """The feed's state changed, or one instrument's stream has a gap (``instrument`` set)."""

    venue: str
    state: FeedState
    recv_ns: int
    detail: str = ""
    instrument: str = ""


@dataclass(frozen=True, slots=True)
class RpcResponse:
    """A JSON-RPC reply to one of our requests (``error_code`` 0 on success).

    The adapter matches ``id`` to its request (subscribe, get_instruments, set_heartbeat);
    the book ignores these.
    """

    venue: str
    id: int | None
    recv_ns: int
    result: object = None
    error_code: int = 0
    error_message: str = ""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A venue heartbeat; ``test_request`` True means it must be answered (``public/test``)."""

    venue: str
    recv_ns: int
    test_request: bool


@dataclass(frozen=True, slots=True)
class BookChanged:
    """Quotes of one book were written straight into its rows (``streamer.book.fastpath``):
    nothing to apply, but the book changed (its refit trigger has been told)."""

    venue: str
    underlying: str


Event = (
    InstrumentListed
    | InstrumentExpired
    | Quote
    | BookTop
    | MarkPrice
    | Trade
    | IndexPrice
    | FeedStatus
    | RpcResponse
    | Heartbeat
    | BookChanged
)
