"""The array snapshot of one underlying's option chain: what the book hands the calibrator.

Immutable: the book builds a fresh one from its arrays; the calibrator may keep it as long as
it likes. Arrays are per quote (same length, one entry per live instrument that passed the
book's filters), ``expiries``/``expiry_ms``/``forwards``/``dirty`` are per expiry slice.
Prices are in the venue's quote unit: coin for inverse (coin-margined) options, USD for linear.
IVs are fractions (0.62, not 62), NaN where the venue gave none or the side is empty.

``listing`` (``Listing``) is every live instrument of the book, quoted or not, fresh or stale:
what a bot may hold and what the greeks topics cover (the calibrator fits the quotes only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class Listing:
    """Every live instrument of a book at the snapshot's time, by expiry, strike, calls first.

    Market fields (``bid``/``ask`` prices, ``bid_iv``/``ask_iv``/``mark_iv``) are NaN unless
    the instrument's quote is fresh (younger than the book's ``stale_after_s``);
    ``forwards`` per expiry is the snapshot's where it has one, else the last forward the book
    saw for that expiry (NaN if it never saw one).
    """

    instrument: tuple[str, ...]
    expiry_idx: IntArray  # index into the per-expiry arrays below
    strike: FloatArray
    is_call: BoolArray
    bid: FloatArray
    ask: FloatArray
    bid_iv: FloatArray
    ask_iv: FloatArray
    mark_iv: FloatArray
    expiries: tuple[str, ...]
    expiry_ms: IntArray
    forwards: FloatArray

    @property
    def n_instruments(self) -> int:
        return len(self.instrument)


@dataclass(frozen=True, eq=False)
class ChainSnapshot:
    """One underlying's live chain at ``ts_ms`` (venue time of the newest quote)."""

    venue: str
    underlying: str
    ts_ms: int
    inverse: bool  # True: premiums in coin (Deribit BTC/ETH), False: in USD (linear)
    # per quote
    instrument: tuple[str, ...]
    expiry_idx: IntArray  # index into the per-expiry arrays below
    T: FloatArray  # years to expiry at ts_ms (365-day years)
    forward: FloatArray  # the quote's own forward (Deribit underlying_price)
    strike: FloatArray
    is_call: BoolArray
    bid: FloatArray  # best bid price, NaN if none
    ask: FloatArray  # best ask price, NaN if none
    bid_size: FloatArray
    ask_size: FloatArray
    bid_iv: FloatArray  # venue bid IV, NaN if none
    ask_iv: FloatArray  # venue ask IV, NaN if none
    mark_iv: FloatArray  # venue mark IV, NaN if none
    mark_price: FloatArray  # venue mark price, NaN if none
    venue_delta: FloatArray  # venue delta, NaN if none
    quote_ts_ms: IntArray  # exchange time of each quote
    # per expiry slice, sorted by expiry
    expiries: tuple[str, ...]  # venue codes, e.g. "27DEC24"
    expiry_ms: IntArray
    forwards: FloatArray  # the book's forward per expiry (median of its quotes' forwards)
    dirty: BoolArray  # changed since the previous snapshot handed out
    listing: Listing | None = None  # every live instrument (None: the quotes are all there is)

    @property
    def n_quotes(self) -> int:
        return len(self.instrument)

    @property
    def n_expiries(self) -> int:
        return len(self.expiries)

    @property
    def mid(self) -> FloatArray:
        """Mid price where both sides exist, else NaN."""
        return np.asarray(0.5 * (self.bid + self.ask))
