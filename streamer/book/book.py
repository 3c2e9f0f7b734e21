"""The live option chain of one (venue, underlying), and the array snapshot it hands the calibrator.

``Book`` keeps, per listed option, one row of a preallocated ``float64`` array (slot index per
instrument, capacity doubled when full): quote time, best bid/ask and sizes, venue mark price
and mark/bid/ask IVs (fractions), the option's own forward (Deribit ``underlying_price``) and
the venue delta. A quote update is one ``struct.pack_into`` of that row: O(1), no allocation.
``Book.write_ticker`` is that write, used directly by the fused ticker path
(``streamer.book.fastpath``); ``Book.apply(event)`` is the general entry for every
normalized event (``streamer.events``).

``snapshot(now_ms)`` builds an immutable ``ChainSnapshot`` from the arrays (vectorized):

* the clock. A quote's time is the venue's, and one wrong timestamp must not move the book's
  "now" (a ticker in microseconds, a corrupt frame, a skewed venue mapping: before this, one such
  quote expired every expiry before it and emptied the book for good). Without ``now_ms`` the
  clock is anchored on the *median* plausible quote time of the live rows (the upper one), so
  wrong rows cannot move it unless they are half the book, and "now" is the newest quote time
  at most ``max_skew_s`` beyond ``max(anchor, receive clock)``. Plausible: inside years
  2000..2100 in ms (a unit error is off by a factor of 1000 and falls outside). Quotes beyond
  ``now + max_skew_s``, or outside that range, leave the snapshot as ``bad_timestamp`` (the
  row stays: the next valid quote of the instrument overwrites it). The receive clock (the
  newest frame's receive time, ``recv_ms``, and the newest ``recv_ns`` of the quotes applied)
  only ever *widens* what is accepted: after a feed gap (or the next hourly cut of a
  recording, or quiet instruments holding the median back) the fresh quotes count at once,
  without waiting for half the book; a host clock that is off can then let a skewed quote
  through, never drop the good ones;
* expiries whose settlement time (08:00 UTC, DESIGN section 2) is <= the *settlement clock*
  leave the book, whole slices at once: the anchor above (or ``now_ms`` when given), never
  moving backwards, so an expiry only goes when half the book's quotes say its settlement
  passed; quotes of an expiry between the anchor and "now" (its last ``max_skew_s``) are
  dropped as ``expiring`` (T <= 0) but not removed. ``InstrumentExpired`` removes single
  instruments at any time;
* relisting: a removed name comes back with an ``InstrumentListed`` or a fresh valid quote
  (newer than its ``InstrumentExpired``) as long as its expiry is after the settlement clock
  (counted in ``book.relisted``); a settled expiry's names never come back. Removed names are
  remembered only until their expiry settles (the settlement check refuses them after that);
* ``book.rejected["bad_timestamp"]`` counts each write with a bad time once (the snapshot
  that first refuses it; one overwritten before any snapshot never mattered and is not
  counted), and every first sight ``apply`` refuses for its time;
* ``apply`` refuses, counted in ``book.rejected["bad_timestamp"]``, a first sight (ticker,
  book top, mark price of an instrument not listed yet) whose time is not plausible, before it
  can list anything. A quote of a listed instrument is written whatever its time, as the fused
  path writes it (both paths must leave the same rows), and the snapshot leaves it out;
* per quote, excluded and counted in ``book.drops`` under the first reason that applies:
  ``no_quote`` (listed, never quoted), ``bad_timestamp`` and ``expiring`` (above),
  ``stale`` (quote older than ``stale_after_s``),
  ``zero`` (a side priced <= 0: a venue's "no quote" that was not mapped to NaN),
  ``empty`` (no bid and no ask), ``crossed`` (bid > ask), ``wide_spread`` (ask IV - bid IV
  above ``max_spread_iv``), ``no_forward`` (its expiry has no forward), ``below_intrinsic``
  (mid, or the ask when there is no bid, below intrinsic value: for a coin-margined option
  ``max(F - K, 0) / F`` (calls) / ``max(K - F, 0) / F`` (puts) in coin, ``max(±(F - K), 0)`` for
  linear ones, F the quote's own forward);
* one-sided quotes are kept, NaN on the missing side (the calibrator needs both sides and
  decides), and counted in ``book.one_sided``;
* the forward per expiry is the median of its fresh quotes' forwards (those that are finite,
  positive and within ``FORWARD_RATIO_MAX`` of their strike: 0 or 1e308 are not forwards);
  when no quote carries one,
  put-call parity at the strike where call and put mids are closest (nearest the money):
  coin-margined ``C - P = (F - K) / F`` so ``F = K / (1 - (C - P))``; linear ``F = K + C - P``;
* ``dirty`` per expiry: a quote of it changed (any stored field but its time), an instrument was
  added or removed, or the set of its quotes passing the filters changed, since the previous
  snapshot.

``Books`` routes events to one ``Book`` per (venue, underlying), by the instrument's
underlying; instruments are created from ``InstrumentListed`` or on first sight by their name
(``parse_option``).
"""

from __future__ import annotations

import math
import operator
import struct
import sys
from collections import Counter
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from streamer.book import snapkernel
from streamer.book.snapshot import ChainSnapshot, Listing
from streamer.events import (
    BookTop,
    Event,
    FeedStatus,
    IndexPrice,
    Instrument,
    InstrumentExpired,
    InstrumentListed,
    MarkPrice,
    Quote,
)
from streamer.instruments import MS_PER_YEAR, OptionName, inverse_of, parse_option

NAN = math.nan
DEFAULT_STALE_AFTER_S = 60.0
DEFAULT_MAX_SPREAD_IV = 0.5
DEFAULT_CAPACITY = 64
DEFAULT_MAX_SKEW_S = 60.0  # how far a quote may run ahead of the book's other quotes
MIN_TS_MS = 946_684_800_000  # 2000-01-01: a plausible venue time in ms is after this ...
MAX_TS_MS = 4_102_444_800_000  # ... and before 2100-01-01 (s and us are off by 1000x)
INTRINSIC_RTOL = 1e-9  # float noise allowance of the below-intrinsic test
FORWARD_RATIO_MAX = math.exp(10.0)  # a forward beyond 22026x its strike (either way) is broken

# one row per instrument: column indexes
TS, BID, BID_SIZE, ASK, ASK_SIZE, MARK_PRICE, MARK_IV, BID_IV, ASK_IV, FORWARD, DELTA = range(11)
NCOL = 11
_ROW = struct.Struct(f"={NCOL}d")
ROW_BYTES = _ROW.size
_SIDES = struct.Struct("=4d")  # bid, bid size, ask, ask size (from column BID)
_TOP = struct.Struct("=5d")  # time + the four above (from column TS)
_MARK = struct.Struct("=2d")  # mark price, mark IV (from column MARK_PRICE)
_SIDES_OFF = BID * 8
_MARK_OFF = MARK_PRICE * 8
_IVS = struct.Struct("=2d")  # bid IV, ask IV (from column BID_IV)
_IVS_OFF = BID_IV * 8
write_row = _ROW.pack_into
"""``write_row(book.buffer, slot * ROW_BYTES, ts_ms, bid, ..., delta)``: ``Book.write_ticker``
without the call (the fused path, ``streamer.book.fastpath``); the arguments must be numbers."""

DROP_REASONS = (
    "no_quote",
    "bad_timestamp",
    "expiring",
    "stale",
    "zero",
    "empty",
    "crossed",
    "wide_spread",
    "no_forward",
    "below_intrinsic",
)

# the columns ``snapkernel`` reads: time, bid, ask, bid IV, ask IV, forward
_KERNEL_COLS = np.array([TS, BID, ASK, BID_IV, ASK_IV, FORWARD], dtype=np.int64)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
Route = tuple["Book", int]


class Routes(dict[str, Route]):
    """A venue's ``name -> (book, slot)`` map. ``epoch`` moves whenever a route may have
    gone (an instrument removed), ``moved`` whenever a book's rows moved (its array
    regrown): a cache of routes (the compiled scanner's channel table,
    ``streamer.book.scan``) is stale then, or points at old rows."""

    __slots__ = ("epoch", "moved")

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0
        self.moved = 0


_NO_ROUTES = Routes()  # a venue without books (never written to)


class Book:
    """The live chain of one (venue, underlying).

    Args:
        venue: the venue the events come from (``"deribit"``).
        underlying: ``"BTC"``, ``"ETH"``, ``"XRP_USDC"``, ...
        inverse: premiums in coin (True, Deribit BTC/ETH) or in the quote currency.
        stale_after_s: quotes older than this (venue time) leave the snapshot.
        max_spread_iv: a wider bid-ask in IV (0.5 = 50 vol points) leaves the snapshot.
        max_skew_s: how far (venue time) a quote may run ahead of the book's clock; beyond
            it the quote is a ``bad_timestamp`` (module docstring, "the clock").
        capacity: initial number of instrument slots (doubled when full).
        routes: a shared ``name -> (book, slot)`` map to keep current (``Books`` passes its
            per-venue map, which the fused path reads).
    """

    __slots__ = (
        "_cap",
        "_exp",
        "_exp_code",
        "_exp_id",
        "_exp_live",
        "_exp_ms",
        "_expired",
        "_free",
        "_included",
        "_inst",
        "_is_call",
        "_n",
        "_names",
        "_prev",
        "_q",
        "_recv_ns",
        "_routes",
        "_settled_ms",
        "_slot_of",
        "_strike",
        "_touched",
        "buffer",
        "clock_ms",
        "drops",
        "index_price",
        "inverse",
        "max_skew_s",
        "max_spread_iv",
        "one_sided",
        "rejected",
        "relisted",
        "stale_after_s",
        "underlying",
        "venue",
    )

    def __init__(
        self,
        venue: str,
        underlying: str,
        *,
        inverse: bool = True,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        max_spread_iv: float = DEFAULT_MAX_SPREAD_IV,
        max_skew_s: float = DEFAULT_MAX_SKEW_S,
        capacity: int = DEFAULT_CAPACITY,
        routes: Routes | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        if not max_skew_s >= 0.0:
            raise ValueError(f"max_skew_s: must be >= 0, got {max_skew_s}")
        self.venue = venue
        self.underlying = underlying
        self.inverse = inverse
        self.stale_after_s = stale_after_s
        self.max_spread_iv = max_spread_iv
        self.max_skew_s = max_skew_s
        self.clock_ms = 0  # the latest snapshot's "now" (venue ms; 0: none yet)
        self._settled_ms = 0  # expiries at or before this are settled (never moves back)
        self.relisted = 0  # removed instruments that came back (listing or fresh quote)
        self._recv_ns = 0  # the newest receive time of a quote applied (0: none)
        self.index_price = NAN  # the venue's spot index (IndexPrice events)
        self.drops: Counter[str] = Counter()  # the latest snapshot's exclusions, by reason
        self.one_sided = 0  # one-sided quotes kept in the latest snapshot
        # refused input, by reason, cumulative: events apply() refused, and each write of a
        # row with a bad timestamp that a snapshot refused ("bad_timestamp", once per write)
        self.rejected: Counter[str] = Counter()
        self._routes: Routes = routes if routes is not None else Routes()
        self._slot_of: dict[str, int] = {}
        self._free: list[int] = []
        self._n = 0  # slots ever used (high-water mark)
        self._cap = 0
        self._q: FloatArray = np.empty((0, NCOL))
        self.buffer = memoryview(b"")  # the rows as bytes (write_row packs into it)
        self._grow(capacity)
        self._exp_id: dict[str, int] = {}
        self._exp_code: list[str] = []
        self._exp_ms: list[int] = []
        self._exp_live: list[int] = []
        self._touched: set[int] = set()  # expiry ids with instruments added/removed
        # removed names -> (expiry ms, removal venue ms): a late quote does not re-create them
        self._expired: dict[str, tuple[int, int]] = {}

    # -- storage --------------------------------------------------------------------------------

    def _grow(self, cap: int) -> None:
        old = self._cap
        q = np.full((cap, NCOL), NAN)
        prev = np.full((cap, NCOL), NAN)
        strike = np.zeros(cap)
        is_call = np.zeros(cap, dtype=np.bool_)
        exp = np.full(cap, -1, dtype=np.int64)
        included = np.zeros(cap, dtype=np.bool_)
        if old:
            q[:old] = self._q
            prev[:old] = self._prev
            strike[:old] = self._strike
            is_call[:old] = self._is_call
            exp[:old] = self._exp
            included[:old] = self._included
            self._names.extend([""] * (cap - old))
            self._inst.extend([None] * (cap - old))
        else:
            self._names: list[str] = [""] * cap
            self._inst: list[Instrument | None] = [None] * cap
        self.buffer.release()
        self._routes.moved += 1
        self._q = q
        self.buffer = memoryview(q).cast("B")  # type: ignore[arg-type]
        self._prev: FloatArray = prev  # stored fields at the previous snapshot (dirty flags)
        self._strike: FloatArray = strike
        self._is_call: BoolArray = is_call
        self._exp: IntArray = exp  # expiry id per slot, -1 = free
        self._included: BoolArray = included  # in the previous snapshot
        self._cap = cap

    def __len__(self) -> int:
        """Live instruments."""
        return len(self._slot_of)

    def __contains__(self, name: object) -> bool:
        return name in self._slot_of

    def instruments(self) -> list[Instrument]:
        """The live instruments (slot order)."""
        return [i for i in self._inst[: self._n] if i is not None]

    def slot(self, name: str) -> int | None:
        """The row of a live instrument."""
        return self._slot_of.get(name)

    def expiry_of(self, slot: int) -> str:
        """The expiry code of the live instrument in ``slot``."""
        inst = self._inst[slot]
        return inst.expiry if inst is not None else ""

    def quote_row(self, name: str) -> dict[str, float] | None:
        """One instrument's stored fields by column name (for inspection and tests)."""
        slot = self._slot_of.get(name)
        if slot is None:
            return None
        cols = _ROW.unpack_from(self.buffer, slot * ROW_BYTES)
        keys = (
            "ts_ms",
            "bid",
            "bid_size",
            "ask",
            "ask_size",
            "mark_price",
            "mark_iv",
            "bid_iv",
            "ask_iv",
            "forward",
            "delta",
        )
        return dict(zip(keys, cols, strict=True))

    @property
    def row_array(self) -> FloatArray:
        """The rows as a ``(capacity, NCOL)`` float64 array (``buffer``'s memory); a new one
        after the book grows (``Routes.epoch`` moves then)."""
        return self._q

    def nbytes(self) -> int:
        """Bytes of the per-slot numpy arrays (the instrument table is extra)."""
        return int(
            self._q.nbytes
            + self._prev.nbytes
            + self._strike.nbytes
            + self._is_call.nbytes
            + self._exp.nbytes
            + self._included.nbytes
        )

    # -- instruments ----------------------------------------------------------------------------

    def add(self, instrument: Instrument, now_ms: int = 0, *, listing: bool = True) -> int | None:
        """List an instrument (or refresh its metadata); its slot, or None if refused.

        ``now_ms`` is the venue time of what lists it; ``listing`` False: a quote lists it
        (on first sight), which does not bring back a name removed at or after ``now_ms``.
        """
        name = instrument.name
        slot = self._slot_of.get(name)
        if slot is not None:
            self._inst[slot] = instrument
            self._strike[slot] = instrument.strike
            self._is_call[slot] = instrument.is_call
            return slot
        if instrument.underlying != self.underlying or instrument.venue != self.venue:
            self.rejected["other_underlying"] += 1
            return None
        if instrument.expiry_ms <= max(now_ms, self._settled_ms):
            self.rejected["expired"] += 1
            return None
        gone = self._expired.get(name)
        if gone is not None:
            if not listing and now_ms <= gone[1]:  # a late quote of a removed instrument
                self.rejected["expired"] += 1
                return None
            del self._expired[name]  # not settled: listed again, or quoted after its removal
            self.relisted += 1
        if self._free:
            slot = self._free.pop()
        else:
            if self._n == self._cap:
                self._grow(2 * self._cap)
            slot = self._n
            self._n += 1
        e = self._exp_id.get(instrument.expiry)
        if e is None:
            e = self._exp_id[instrument.expiry] = len(self._exp_code)
            self._exp_code.append(instrument.expiry)
            self._exp_ms.append(instrument.expiry_ms)
            self._exp_live.append(0)
        self._exp_live[e] += 1
        self._touched.add(e)
        # the slot's row is NaN and not included: fresh from _grow, or reset by remove()
        self._strike[slot] = instrument.strike
        self._is_call[slot] = instrument.is_call
        self._exp[slot] = e
        self._names[slot] = name
        self._inst[slot] = instrument
        self._slot_of[name] = slot
        self._routes[name] = (self, slot)
        return slot

    def _add_name(self, name: str, now_ms: int) -> int | None:
        opt = parse_option(name)
        if opt is None:
            self.rejected["not_option"] += 1
            return None
        return self.add_option(opt, now_ms, listing=False)

    def add_option(self, opt: OptionName, now_ms: int = 0, *, listing: bool = True) -> int | None:
        """List an instrument from what its name says (``parse_option``); ``listing`` as in
        ``add`` (False: a quote of it was seen)."""
        slot = self._slot_of.get(opt.name)
        if slot is not None:
            return slot
        return self.add(
            Instrument(
                venue=self.venue,
                name=opt.name,
                # one string shared by the whole book (add() refuses another underlying)
                underlying=self.underlying if opt.underlying == self.underlying else opt.underlying,
                expiry=sys.intern(opt.expiry),
                expiry_ms=opt.expiry_ms,
                strike=opt.strike,
                is_call=opt.is_call,
                inverse=self.inverse,
            ),
            now_ms,
            listing=listing,
        )

    def remove(self, name: str, at_ms: int = 0) -> bool:
        """Forget an instrument (expired, delisted at venue time ``at_ms``): quotes of it up
        to ``at_ms`` are refused; a later one, or a listing, brings it back unless its expiry
        has settled (module docstring, "relisting")."""
        slot = self._slot_of.pop(name, None)
        inst = self._inst[slot] if slot is not None else None
        expiry_ms = inst.expiry_ms if inst is not None else _expiry_ms_of(name)
        if expiry_ms > self._settled_ms:  # settled names need no entry: expiry refuses them
            at = at_ms if MIN_TS_MS <= at_ms <= MAX_TS_MS else self.clock_ms
            self._expired[name] = (expiry_ms, at)
        if slot is None:
            return False
        self._routes.pop(name, None)
        self._routes.epoch += 1
        e = int(self._exp[slot])
        self._exp_live[e] -= 1
        self._touched.add(e)
        self._exp[slot] = -1
        self._q[slot] = NAN
        self._prev[slot] = NAN
        self._included[slot] = False
        self._names[slot] = ""
        self._inst[slot] = None
        self._free.append(slot)
        return True

    def expire(self, now_ms: int) -> int:
        """Settle every expiry at or before ``now_ms`` (the settlement clock never moves
        back): remove its instruments; how many."""
        if now_ms > self._settled_ms:
            self._settled_ms = now_ms
            settled = self._settled_ms
            for name in [n for n, (ms, _) in self._expired.items() if ms <= settled]:
                del self._expired[name]  # refused by the expiry check from now on
        gone = 0
        for e, ms in enumerate(self._exp_ms):
            if ms <= now_ms and self._exp_live[e] > 0:
                for slot in np.flatnonzero(self._exp[: self._n] == e).tolist():
                    gone += self.remove(self._names[slot])
        return gone

    @property
    def settled_ms(self) -> int:
        """The settlement clock: expiries at or before it are gone for good (venue ms)."""
        return self._settled_ms

    # -- updates --------------------------------------------------------------------------------

    def write_ticker(
        self,
        slot: int,
        ts_ms: float,
        bid: float,
        bid_size: float,
        ask: float,
        ask_size: float,
        mark_price: float,
        mark_iv: float,
        bid_iv: float,
        ask_iv: float,
        forward: float,
        delta: float,
    ) -> None:
        """Overwrite one instrument's row: O(1), no allocation. Arguments must be numbers
        (NaN for none; IVs as fractions); ``slot`` from ``slot()`` or the routes map."""
        write_row(
            self.buffer,
            slot * ROW_BYTES,
            ts_ms,
            bid,
            bid_size,
            ask,
            ask_size,
            mark_price,
            mark_iv,
            bid_iv,
            ask_iv,
            forward,
            delta,
        )

    def quote_changed(
        self,
        slot: int,
        bid: float,
        bid_size: float,
        ask: float,
        ask_size: float,
        bid_iv: float,
        ask_iv: float,
    ) -> bool:
        """Would this quote change the row's sides (prices, sizes) or its bid/ask IVs? Bit for
        bit, so an empty side (NaN) equals an empty side. What refits are triggered by: the
        quote's time, mark and forward alone move every tick."""
        off = slot * ROW_BYTES
        buf = self.buffer
        sides = buf[off + _SIDES_OFF : off + _SIDES_OFF + _SIDES.size]
        ivs = buf[off + _IVS_OFF : off + _IVS_OFF + _IVS.size]
        return sides != _SIDES.pack(bid, bid_size, ask, ask_size) or ivs != _IVS.pack(
            bid_iv, ask_iv
        )

    def _slot_for(self, name: str, ts_ms: int) -> int | None:
        """The row a quote of ``name`` at ``ts_ms`` goes to, listing it on first sight unless
        refused (counted in ``rejected``: an implausible time first)."""
        slot = self._slot_of.get(name)
        if slot is not None:
            return slot
        if not MIN_TS_MS <= ts_ms <= MAX_TS_MS:
            self.rejected["bad_timestamp"] += 1
            return None
        return self._add_name(name, ts_ms)

    def apply(self, event: Event) -> bool:
        """Apply one event; True when a quote of this book changed (a ``Quote`` whose sides or
        bid/ask IVs moved: ``quote_changed``; its time is refreshed either way), False for
        everything else (listings, index, ...)."""
        t = type(event)
        if t is Quote:
            q: Quote = event  # type: ignore[assignment]
            slot = self._slot_for(q.instrument, q.ts_ms)
            if slot is None:
                return False
            self._recv_ns = max(self._recv_ns, q.recv_ns)
            changed = self.quote_changed(
                slot, q.bid, q.bid_size, q.ask, q.ask_size, q.bid_iv, q.ask_iv
            )
            self.write_ticker(
                slot,
                q.ts_ms,
                q.bid,
                q.bid_size,
                q.ask,
                q.ask_size,
                q.mark_price,
                q.mark_iv,
                q.bid_iv,
                q.ask_iv,
                q.forward,
                q.delta,
            )
            return changed
        if t is BookTop:
            b: BookTop = event  # type: ignore[assignment]
            slot = self._slot_for(b.instrument, b.ts_ms)
            if slot is None:
                return False
            off = slot * ROW_BYTES
            before = self.buffer[off + _SIDES_OFF : off + _SIDES_OFF + _SIDES.size].tobytes()
            _TOP.pack_into(self.buffer, off, b.ts_ms, b.bid, b.bid_size, b.ask, b.ask_size)
            return self._changed(off + _SIDES_OFF, before)
        if t is MarkPrice:
            m: MarkPrice = event  # type: ignore[assignment]
            slot = self._slot_for(m.instrument, m.ts_ms)
            if slot is None:
                return False
            off = slot * ROW_BYTES + _MARK_OFF
            before = self.buffer[off : off + _MARK.size].tobytes()
            _MARK.pack_into(self.buffer, off, m.mark_price, m.mark_iv)
            return self._changed(off, before)
        if t is InstrumentListed:
            listed: InstrumentListed = event  # type: ignore[assignment]
            self.add(listed.instrument, listed.recv_ns // 1_000_000)
            return False
        if t is InstrumentExpired:
            gone: InstrumentExpired = event  # type: ignore[assignment]
            return self.remove(gone.name, gone.ts_ms)
        if t is FeedStatus:
            st: FeedStatus = event  # type: ignore[assignment]
            slot = self._slot_of.get(st.instrument) if st.state == "gap" else None
            if slot is None:
                return False
            off = slot * ROW_BYTES + _SIDES_OFF  # the order book is unknown until resubscribed
            before = self.buffer[off : off + _SIDES.size].tobytes()
            _SIDES.pack_into(self.buffer, off, NAN, NAN, NAN, NAN)
            return self._changed(off, before)
        if t is IndexPrice:
            ix: IndexPrice = event  # type: ignore[assignment]
            self.index_price = ix.price
        return False

    def _changed(self, off: int, before: bytes) -> bool:
        return bool(self.buffer[off : off + len(before)] != before)

    def pending_changes(self) -> int:
        """Live quotes whose stored fields (all but the time) changed since the last snapshot:
        what a refit trigger counts (vectorized; cheap enough to ask often)."""
        n = self._n
        live = self._exp[:n] >= 0
        now, prev = self._q[:n, 1:], self._prev[:n, 1:]
        changed = (now.view(np.int64) != prev.view(np.int64)).any(axis=1)
        return int((changed & live).sum())

    # -- snapshot -------------------------------------------------------------------------------

    def last_ts_ms(self) -> int:
        """Venue time of the newest quote (0 if none)."""
        ts = self._q[: self._n, TS]
        ts = ts[~np.isnan(ts)]
        return int(ts.max()) if ts.size else 0

    def clock(self, recv_ms: int = 0) -> tuple[int, int]:
        """``(now, anchor)`` from the live rows (module docstring, "the clock"): the anchor is
        the (upper) median plausible quote time, "now" the newest within ``max_skew_s`` of
        the anchor or of the receive clock (``recv_ms``, or the newest quote's ``recv_ns``);
        both the previous ``clock_ms`` when no row has a plausible time."""
        ts = self._q[: self._n, TS][self._exp[: self._n] >= 0]
        ts = np.sort(ts[(ts >= MIN_TS_MS) & (ts <= MAX_TS_MS)])  # NaN fails both
        n = ts.size
        if n == 0:
            return self.clock_ms, self.clock_ms
        anchor = float(ts[n // 2])  # the upper median: half the rows at or after it
        recv = max(recv_ms, self._recv_ns // 1_000_000)
        base = max(anchor, float(recv)) if MIN_TS_MS <= recv <= MAX_TS_MS else anchor
        top = int(np.searchsorted(ts, base + self.max_skew_s * 1000.0, side="right"))
        return int(ts[top - 1]), int(anchor)

    def snapshot(self, now_ms: int | None = None, *, recv_ms: int = 0) -> ChainSnapshot:
        """The chain at ``now_ms`` (venue clock; default: the book's own, ``clock(recv_ms)``,
        ``recv_ms`` the receive time of the newest frame, 0 if unknown)."""
        if now_ms is None:
            now_ms, settle_ms = self.clock(recv_ms)
        else:
            settle_ms = now_ms
        self.clock_ms = now_ms
        self.expire(settle_ms)
        n = self._n
        live = np.flatnonzero(self._exp[:n] >= 0)
        q = self._q[live]
        exp_id = self._exp[live]
        strike = self._strike[live]
        is_call = self._is_call[live]
        ts, bid, ask = q[:, TS], q[:, BID].copy(), q[:, ASK].copy()
        bid_size, ask_size = q[:, BID_SIZE].copy(), q[:, ASK_SIZE].copy()
        fwd = q[:, FORWARD]

        # the filters: each quote counted under the first reason that applies (compiled:
        # ``snapkernel``, the numpy expressions row by row)
        m = len(live)
        reason = np.empty(m, dtype=np.int64)
        has_bid, has_ask = np.empty(m, dtype=np.bool_), np.empty(m, dtype=np.bool_)
        good_fwd = np.empty(m, dtype=np.bool_)
        exp_ms_all = np.array(self._exp_ms, dtype=np.int64)
        new_bad = snapkernel.filter_rows(
            q, self._prev[live, TS], exp_ms_all, exp_id, strike, _KERNEL_COLS,
            float(MIN_TS_MS), float(MAX_TS_MS), now_ms + self.max_skew_s * 1000.0, int(now_ms),
            now_ms - self.stale_after_s * 1000.0, float(self.max_spread_iv), FORWARD_RATIO_MAX,
            reason, has_bid, has_ask, good_fwd,
        )  # fmt: skip
        # each bad write once: its time differs from what the previous snapshot saw
        if new_bad:
            self.rejected["bad_timestamp"] += new_bad

        # forward per expiry id: median of fresh quotes' forwards, else put-call parity
        fwd_by_id = snapkernel.group_medians(exp_id, fwd, good_fwd, len(self._exp_ms))
        left = reason == snapkernel.KEPT
        for e in np.unique(exp_id[left]).tolist():
            if np.isnan(fwd_by_id[e]):
                fwd_by_id[e] = self._parity((exp_id == e) & left, q, strike, is_call)
        # no forward; below intrinsic, with the quote's own forward (else its slice's)
        F = np.empty(m)
        snapkernel.finish_rows(
            q, exp_id, strike, is_call, fwd_by_id, good_fwd, has_bid, _KERNEL_COLS,
            self.inverse, INTRINSIC_RTOL, reason, F,
        )  # fmt: skip
        counts = np.bincount(reason + 1, minlength=snapkernel.N_REASONS + 1)[1:].tolist()
        drops: Counter[str] = Counter(
            {why: k for why, k in zip(DROP_REASONS, counts, strict=True) if k}
        )
        keep = reason == snapkernel.KEPT
        self.drops = drops
        self.one_sided = int((keep & (has_bid != has_ask)).sum())
        fresh = reason > snapkernel.STALE  # not dropped before the market tests
        fresh |= keep

        # dirty: stored fields (all but the time) changed, membership changed, or listed/removed
        changed = snapkernel.rows_changed(q, self._prev[live], keep, self._included[live])
        dirty_ids = set(exp_id[changed].tolist()) | self._touched
        self._touched = set()
        self._prev[:n] = self._q[:n]
        self._included[:n] = False
        self._included[live[keep]] = True

        # order: expiry, strike, calls before puts (the listing's order, a stable sort,
        # restricted to the quotes kept)
        order_all = np.lexsort((~is_call, strike, exp_ms_all[exp_id]))
        order = order_all[keep[order_all]]
        ids = sorted(set(exp_id[order].tolist()), key=lambda e: self._exp_ms[e])
        pos = np.full(len(self._exp_ms), -1, dtype=np.int64)
        pos[ids] = np.arange(len(ids))
        expiry_ms = exp_ms_all[np.array(ids, dtype=np.int64)]
        e_idx = pos[exp_id[order]]
        listing = self._listing(live, q, exp_id, strike, is_call, fresh, fwd_by_id, order_all)
        return ChainSnapshot(
            venue=self.venue,
            underlying=self.underlying,
            ts_ms=int(now_ms),
            inverse=self.inverse,
            instrument=_pick(self._names, live[order]),
            expiry_idx=e_idx,
            T=(expiry_ms[e_idx] - now_ms) / MS_PER_YEAR,
            forward=F[order],
            strike=strike[order],
            is_call=is_call[order],
            bid=bid[order],
            ask=ask[order],
            bid_size=np.where(has_bid, bid_size, NAN)[order],
            ask_size=np.where(has_ask, ask_size, NAN)[order],
            bid_iv=q[order, BID_IV],
            ask_iv=q[order, ASK_IV],
            mark_iv=q[order, MARK_IV],
            mark_price=q[order, MARK_PRICE],
            venue_delta=q[order, DELTA],
            quote_ts_ms=ts[order].astype(np.int64),
            expiries=tuple(self._exp_code[e] for e in ids),
            expiry_ms=expiry_ms,
            forwards=fwd_by_id[np.array(ids, dtype=np.int64)],
            dirty=np.array([e in dirty_ids for e in ids], dtype=np.bool_),
            listing=listing,
        )

    def _listing(
        self,
        live: IntArray,
        q: FloatArray,
        exp_id: IntArray,
        strike: FloatArray,
        is_call: BoolArray,
        fresh: BoolArray,
        fwd_by_id: FloatArray,
        order: IntArray,
    ) -> Listing:
        """Every live instrument (``live`` slots, their rows ``q``, in ``order``: expiry,
        strike, calls before puts): market fields where the quote is fresh, the forward per
        expiry from the fresh quotes or else the last seen."""
        exp_ms_all = np.array(self._exp_ms, dtype=np.int64)
        ids = sorted(set(exp_id.tolist()), key=lambda e: self._exp_ms[e])
        pos = np.full(len(self._exp_ms), -1, dtype=np.int64)
        pos[ids] = np.arange(len(ids))
        id_arr = np.array(ids, dtype=np.int64)
        forwards = fwd_by_id[id_arr] if ids else np.zeros(0)
        missing = ~np.isfinite(forwards)
        if missing.any():  # no fresh forward: the last ones seen (stale quotes' forwards)
            fwd = q[:, FORWARD]
            seen = _sane_forward(fwd, strike)
            last = snapkernel.group_medians(exp_id, fwd, seen, len(self._exp_ms))[id_arr]
            forwards = np.where(missing, last, forwards)

        def market(col: int) -> FloatArray:
            return np.where(fresh, q[:, col], NAN)[order]

        return Listing(
            instrument=_pick(self._names, live[order]),
            expiry_idx=pos[exp_id[order]],
            strike=strike[order],
            is_call=is_call[order],
            bid=market(BID),
            ask=market(ASK),
            bid_iv=market(BID_IV),
            ask_iv=market(ASK_IV),
            mark_iv=market(MARK_IV),
            expiries=tuple(self._exp_code[e] for e in ids),
            expiry_ms=exp_ms_all[id_arr] if ids else np.zeros(0, dtype=np.int64),
            forwards=forwards,
        )

    def _parity(
        self, mask: BoolArray, q: FloatArray, strike: FloatArray, is_call: BoolArray
    ) -> float:
        """Forward from the call/put pair whose mids are closest (nearest the money)."""
        bid, ask = q[:, BID], q[:, ASK]
        two_sided = mask & (bid > 0.0) & (ask >= bid)
        mids: dict[float, list[float]] = {}
        for i in np.flatnonzero(two_sided).tolist():
            pair = mids.setdefault(float(strike[i]), [NAN, NAN])
            pair[0 if is_call[i] else 1] = 0.5 * (bid[i] + ask[i])
        best, best_f = math.inf, NAN
        for k, (c, p) in mids.items():
            d = c - p
            if not math.isnan(d) and abs(d) < best:
                f = (k / (1.0 - d) if d < 1.0 else NAN) if self.inverse else k + d
                if f > 0.0:
                    best, best_f = abs(d), f
        return best_f


def _expiry_ms_of(name: str) -> int:
    """The settlement time an option's name says (0 if it is no option name)."""
    opt = parse_option(name)
    return opt.expiry_ms if opt is not None else 0


def _pick(names: list[str], slots: IntArray) -> tuple[str, ...]:
    """``tuple(names[s] for s in slots)``, at C speed."""
    at = slots.tolist()
    if len(at) < 2:
        return tuple(names[s] for s in at)
    picked: tuple[str, ...] = operator.itemgetter(*at)(names)
    return picked


def _sane_forward(fwd: FloatArray, strike: FloatArray) -> BoolArray:
    """A quote's forward worth using: finite, positive, within ``FORWARD_RATIO_MAX`` of its
    strike either way (0, 1e308 or a unit slip are broken fields, not far wings)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(
            (fwd > strike / FORWARD_RATIO_MAX) & (fwd < strike * FORWARD_RATIO_MAX), dtype=np.bool_
        )


class Books:
    """One ``Book`` per (venue, underlying); routes each event to its instrument's book.

    Keyword arguments are passed to every ``Book`` it creates.
    """

    def __init__(
        self,
        *,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        max_spread_iv: float = DEFAULT_MAX_SPREAD_IV,
        max_skew_s: float = DEFAULT_MAX_SKEW_S,
        capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        self.stale_after_s = stale_after_s
        self.max_spread_iv = max_spread_iv
        self.max_skew_s = max_skew_s
        self.capacity = capacity
        self.rejected: Counter[str] = Counter()  # events no book could take
        self._books: dict[tuple[str, str], Book] = {}
        self._routes: dict[str, Routes] = {}

    def __iter__(self) -> Iterator[Book]:
        return iter(list(self._books.values()))

    def __len__(self) -> int:
        return len(self._books)

    def get(self, venue: str, underlying: str) -> Book | None:
        return self._books.get((venue, underlying))

    def book(self, venue: str, underlying: str, *, inverse: bool | None = None) -> Book:
        """The book of (venue, underlying), created on first use."""
        b = self._books.get((venue, underlying))
        if b is None:
            b = self._books[(venue, underlying)] = Book(
                venue,
                underlying,
                inverse=inverse_of(underlying) if inverse is None else inverse,
                stale_after_s=self.stale_after_s,
                max_spread_iv=self.max_spread_iv,
                max_skew_s=self.max_skew_s,
                capacity=self.capacity,
                routes=self.routes(venue),
            )
        return b

    def route(self, venue: str, name: str) -> Route | None:
        """Where a listed instrument lives: ``(book, slot)``, or None."""
        return self._routes.get(venue, _NO_ROUTES).get(name)

    def routes(self, venue: str) -> Routes:
        """The live ``name -> (book, slot)`` map of one venue (kept current by the books)."""
        r = self._routes.get(venue)
        if r is None:
            r = self._routes[venue] = Routes()
        return r

    def on_event(self, event: Event) -> Book | None:
        """Apply one event; the book whose quotes changed, else None."""
        t = type(event)
        book: Book | None
        if t is Quote or t is BookTop or t is MarkPrice:
            ev: Quote | BookTop | MarkPrice = event  # type: ignore[assignment]
            hit = self._routes.get(ev.venue, _NO_ROUTES).get(ev.instrument)
            if hit is not None:
                book = hit[0]
            else:  # first sight: list it from its name (parsed once, here)
                opt = parse_option(ev.instrument)
                if opt is None:
                    self.rejected["not_option"] += 1
                    return None
                book = self.book(ev.venue, opt.underlying)
                if not MIN_TS_MS <= ev.ts_ms <= MAX_TS_MS:
                    book.rejected["bad_timestamp"] += 1
                    return None
                if book.add_option(opt, ev.ts_ms, listing=False) is None:
                    return None
        elif t is InstrumentListed:
            listed: InstrumentListed = event  # type: ignore[assignment]
            inst = listed.instrument
            self.book(inst.venue, inst.underlying, inverse=inst.inverse).apply(event)
            return None
        elif t is InstrumentExpired:
            gone: InstrumentExpired = event  # type: ignore[assignment]
            book = self._book_of(gone.venue, gone.name)
        elif t is FeedStatus:
            st: FeedStatus = event  # type: ignore[assignment]
            if not st.instrument:
                return None
            book = self._book_of(st.venue, st.instrument)
        elif t is IndexPrice:
            ix: IndexPrice = event  # type: ignore[assignment]
            under = ix.index.split("_", 1)[0].upper()  # "btc_usd" -> BTC
            book = self._books.get((ix.venue, under))
            if book is not None:
                book.apply(event)
            return None
        else:
            return None
        if book is None:
            return None
        return book if book.apply(event) else None

    def _book_of(self, venue: str, name: str) -> Book | None:
        """The existing book of an instrument's underlying (None: no such book)."""
        hit = self._routes.get(venue, _NO_ROUTES).get(name)
        if hit is not None:
            return hit[0]
        opt = parse_option(name)
        if opt is None:
            self.rejected["not_option"] += 1
            return None
        return self._books.get((venue, opt.underlying))
