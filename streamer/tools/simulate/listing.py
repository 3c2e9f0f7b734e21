"""What the simulated venue lists: Deribit's expiry calendar, strike grids, the option chain.

Instruments: the usual Deribit listing (dailies, three Friday weeklies, monthlies and
quarterlies, settling 08:00 UTC), strikes on multiples of a step that grows away from the money
(``strike_grid``). When the forward moves half a standard deviation from where an expiry's grid
was centred, missing strikes are listed (``instrument.state`` created/started), as Deribit does
(``Simulation`` decides when; this module only says what).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from streamer.instruments import expiry_code_of

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
ChainArrays = tuple[FloatArray, BoolArray, IntArray, IntArray, BoolArray, BoolArray]

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
NEVER = 1 << 62
N_DAILY = 5
N_WEEKLY = 3
N_MONTHLY = 3
N_QUARTERLY = 4
QUARTER_MONTHS = (3, 6, 9, 12)
STRIKE_MANTISSAS = (1.0, 2.0, 5.0)


@dataclass(frozen=True, slots=True)
class Underlying:
    """Per-currency defaults: spot, index name."""

    name: str
    spot: float
    index: str


UNDERLYINGS: dict[str, Underlying] = {
    "BTC": Underlying("BTC", 90_000.0, "btc_usd"),
    "ETH": Underlying("ETH", 3_000.0, "eth_usd"),
}


# -- the calendar ---------------------------------------------------------------------------


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _at_eight(d: datetime) -> int:
    return int(datetime(d.year, d.month, d.day, 8, tzinfo=UTC).timestamp() * 1000)


def _last_friday(year: int, month: int) -> int:
    nxt = datetime(year + month // 12, month % 12 + 1, 1, 8, tzinfo=UTC)
    ms = int(nxt.timestamp() * 1000) - DAY_MS
    while _utc(ms).weekday() != 4:
        ms -= DAY_MS
    return ms


def listed_expiries(now_ms: int) -> list[int]:
    """Expiries (ms, 08:00 UTC) Deribit-style at ``now_ms``: the next ``N_DAILY`` days, the next
    ``N_WEEKLY`` Fridays, the last Fridays of the next ``N_MONTHLY`` months and of the next
    ``N_QUARTERLY`` quarter months, all strictly after now."""
    day0 = _at_eight(_utc(now_ms))
    days = [day0 + i * DAY_MS for i in range(0, 400)]
    future = [d for d in days if d > now_ms]
    out = set(future[:N_DAILY])
    out.update([d for d in future if _utc(d).weekday() == 4][:N_WEEKLY])
    now = _utc(now_ms)
    monthly: list[int] = []
    quarterly: list[int] = []
    for i in range(0, 30):
        y, m = now.year + (now.month - 1 + i) // 12, (now.month - 1 + i) % 12 + 1
        ms = _last_friday(y, m)
        if ms <= now_ms:
            continue
        if len(monthly) < N_MONTHLY:
            monthly.append(ms)
        if m in QUARTER_MONTHS and len(quarterly) < N_QUARTERLY:
            quarterly.append(ms)
    out.update(monthly)
    out.update(quarterly)
    return sorted(out)


def settlement_period(expiry_ms: int) -> str:
    """``day``, ``week`` (Fridays) or ``month`` (last Friday of a month)."""
    d = _utc(expiry_ms)
    if d.weekday() != 4:
        return "day"
    return "month" if _last_friday(d.year, d.month) == expiry_ms else "week"


# -- strikes --------------------------------------------------------------------------------


def nice_step(target: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten that is >= ``target``."""
    p = 10.0 ** math.floor(math.log10(max(target, 1e-12)))
    for m in (*STRIKE_MANTISSAS, 10.0):
        if m * p >= target * (1 - 1e-12):
            return m * p
    return 10.0 * p  # pragma: no cover


def strike_grid(forward: float, T: float, vol: float) -> list[float]:
    """Deribit-like strikes around ``forward``: step ``s0 = nice(F sd / 10)`` within one
    standard deviation ``sd = vol sqrt(max(T, 1 day))`` of log-moneyness, ``nice(2 s0)`` out to
    two, ``nice(4 s0)`` beyond, out to ``-max(3 sd, 0.12)`` / ``+max(3 sd, 0.08)`` (capped)."""
    sd = vol * math.sqrt(max(T, 1.0 / 365.0))
    s0 = nice_step(forward * sd / 10.0)
    steps = (s0, nice_step(2.0 * s0), nice_step(4.0 * s0))
    lo = forward * math.exp(-min(max(3.0 * sd, 0.12), 1.5))
    hi = forward * math.exp(min(max(3.0 * sd, 0.08), 1.4))
    out: set[float] = set()
    for i, step in enumerate(steps):
        band_lo = forward * math.exp(-(i + 1) * sd) if i < 2 else lo
        band_hi = forward * math.exp((i + 1) * sd) if i < 2 else hi
        a, b = max(band_lo, lo), min(band_hi, hi)
        k = math.ceil(a / step) * step
        while k <= b:
            if k > 0:
                out.add(float(k))
            k += step
    return sorted(out)


def strike_text(strike: float) -> str:
    return str(int(strike)) if float(strike).is_integer() else repr(strike).replace(".", "d")


# -- the chain ------------------------------------------------------------------------------


@dataclass(slots=True)
class Expiry:
    """One listed expiry: its code, settlement time, forward name, where its grid is centred."""

    code: str
    ms: int
    period: str
    underlying_index: str  # "BTC-6MAR26" (Friday futures) or "SYN.BTC-3MAR26" (dailies)
    center: float
    alive: bool = True


class Chain:
    """The listed options as parallel lists, with numpy views rebuilt after each change."""

    def __init__(self, underlying: Underlying) -> None:
        self.under = underlying
        self.expiries: list[Expiry] = []
        self.names: list[str] = []
        self.strikes: list[float] = []
        self.calls: list[bool] = []
        self.exp_idx: list[int] = []
        self.oi: list[float] = []
        self.sizes: list[list[float]] = []  # [bid, ask] best sizes, persistent
        self.next_due: list[int] = []  # ns: tick by then at the latest
        self.active_ns: list[int] = []  # ns: quoted from then on (after "started")
        self.created_ms: list[int] = []
        self.alive: list[bool] = []
        self._by_name: dict[str, int] = {}
        self._arrays: ChainArrays | None = None

    def add_expiry(self, ms: int, center: float) -> int:
        code = expiry_code_of(ms)
        period = settlement_period(ms)
        cur = self.under.name
        index = f"SYN.{cur}-{code}" if period == "day" else f"{cur}-{code}"
        self.expiries.append(Expiry(code, ms, period, index, center))
        return len(self.expiries) - 1

    def add(
        self, e: int, strike: float, is_call: bool, oi: float, sizes: list[float], created_ms: int
    ) -> int | None:
        """List one option; None if it exists already."""
        ex = self.expiries[e]
        name = f"{self.under.name}-{ex.code}-{strike_text(strike)}-{'C' if is_call else 'P'}"
        if name in self._by_name:
            return None
        self._by_name[name] = len(self.names)
        self.names.append(name)
        self.strikes.append(strike)
        self.calls.append(is_call)
        self.exp_idx.append(e)
        self.oi.append(oi)
        self.sizes.append(sizes)
        self.next_due.append(NEVER)  # set by the first ticker
        self.active_ns.append(0)
        self.created_ms.append(created_ms)
        self.alive.append(True)
        self._arrays = None
        return len(self.names) - 1

    def kill_expiry(self, e: int) -> list[int]:
        """Remove an expiry's options; their indices."""
        self.expiries[e].alive = False
        out = [i for i, x in enumerate(self.exp_idx) if x == e and self.alive[i]]
        for i in out:
            self.alive[i] = False
            self.next_due[i] = NEVER
        self._arrays = None
        return out

    def live(self) -> list[int]:
        """The options listed now."""
        return [i for i, a in enumerate(self.alive) if a]

    def arrays(self) -> ChainArrays:
        """strike, is_call, expiry index, expiry ms, synthetic forward?, alive."""
        if self._arrays is None:
            e = np.asarray(self.exp_idx, dtype=np.int64)
            exp_ms = np.asarray([x.ms for x in self.expiries], dtype=np.int64)
            syn = np.asarray([x.period == "day" for x in self.expiries], dtype=np.bool_)
            self._arrays = (
                np.asarray(self.strikes, dtype=np.float64),
                np.asarray(self.calls, dtype=np.bool_),
                e,
                exp_ms[e] if len(e) else np.zeros(0, dtype=np.int64),
                syn[e] if len(e) else np.zeros(0, dtype=np.bool_),
                np.asarray(self.alive, dtype=np.bool_),
            )
        return self._arrays

    def instrument(self, i: int) -> dict[str, Any]:
        """The ``public/get_instruments`` entry of option ``i`` (Deribit's fields)."""
        ex = self.expiries[self.exp_idx[i]]
        cur = self.under.name
        return {
            "tick_size": 0.0001,
            "tick_size_steps": [{"above_price": 0.005, "tick_size": 0.0005}],
            "taker_commission": 0.0003,
            "strike": self.strikes[i],
            "settlement_period": ex.period,
            "settlement_currency": cur,
            "rfq": False,
            "quote_currency": cur,
            "price_index": self.under.index,
            "option_type": "call" if self.calls[i] else "put",
            "min_trade_amount": 0.1,
            "maker_commission": 0.0003,
            "kind": "option",
            "is_active": True,
            "instrument_name": self.names[i],
            "instrument_id": 400_000 + i,
            "expiration_timestamp": ex.ms,
            "creation_timestamp": self.created_ms[i],
            "counter_currency": "USD",
            "contract_size": 1.0,
            "block_trade_tick_size": 0.0001,
            "block_trade_min_trade_amount": 25,
            "block_trade_commission": 0.0003,
            "base_currency": cur,
        }
