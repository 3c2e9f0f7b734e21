r"""``streamer simulate``: a Deribit option market generated from a known, moving vol surface.

The simulator writes recordings in the DESIGN section 3 format (one received frame a line,
through ``streamer.feeds.recorder.Recorder``) whose frames are what a Deribit websocket would
deliver: a ``public/get_instruments`` reply first, then ``ticker.{inst}.100ms`` notifications,
``deribit_price_index.{cur}_usd`` every second and ``instrument.state.option.{CUR}`` listings and
settlements. Because the surface behind every price is known, a sidecar ``.truth.json`` holds the
ground truth (spot, forwards, SSVI parameters and ATM vols every ~10 s of feed time) that tests
and users compare published surfaces against. Same seed and arguments: byte-identical files
(one ``numpy.random.Generator``, a fixed start time, never the wall clock).

Market model
------------
* Spot: Bates (1996) dynamics, Heston variance with lognormal jumps, stepped every ``step_ms``
  (full-truncation Euler, Lord, Koekkoek & van Dijk 2010)::

      dS/S = -lam m dt + e^u sqrt(v) dW + (e^J - 1) dN,   dv = kappa (vbar - v) dt + xi sqrt(v) dZ,

  ``d<W, Z> = rho_sv dt``, ``J ~ N(mu_j, sigma_j^2)``, ``m = E[e^J - 1]``. ``u`` is a
  regime factor (an OU process around 0) that scales the diffusive vol and the whole ATM level:
  the ``regime-shift`` scenario moves it.
* Forwards: ``F(T) = S exp(basis T)`` per expiry (``basis`` an OU path, per year).
* Implied vols: SSVI (Gatheral & Jacquier 2014, "Arbitrage-free SVI volatility surfaces",
  Quantitative Finance 14(1))::

      w(k, theta) = theta/2 (1 + rho phi k + sqrt((phi k + rho)^2 + 1 - rho^2)),
      phi(theta) = eta / (theta^gamma (1 + theta)^(1 - gamma)),   k = ln(K / F),

  with ATM total variance ``theta(T) = atm(T)^2 T`` and the ATM term structure
  ``atm(T) = e^u (s_inf + (sqrt(v) - s_inf) (1 - e^(-T/tau)) / (T/tau))`` (Nelson-Siegel
  shape): the short end is the Bates instantaneous vol, the long end ``s_inf``. ``rho``,
  ``eta``, ``gamma``, ``s_inf``, ``basis`` and ``u`` follow OU paths (exact discretisation).
  Bounds kept every step: ``|rho| <= 0.9``, ``0.05 <= gamma <= 0.5``, ``eta (1+|rho|) <= 1.98``
  (GJ 2014 Corollary 4.1: no butterfly arbitrage), ``sqrt(v)`` within ``[0.2, 5] s_inf`` (then
  ``theta(T)`` is increasing: no calendar arbitrage).

Quotes (DESIGN section 2): ``mark_iv`` is the surface's IV (percent, 2 decimals) and
``mark_price`` the coin price at that IV with the ticker's own ``underlying_price`` and
``T = (expiry - timestamp) / 365 days``; bid/ask are Black-76 prices at the IV -+ a half spread
that widens in the wings and for short expiries, rounded outwards to Deribit's tick (0.0001 BTC
below 0.005, else 0.0005); a bid under one tick is no bid (0). ``bid_iv``/``ask_iv`` are the
IVs of those rounded prices; Greeks are ``streamer.pricing.deribit_greeks`` (delta, gamma per
USD, vega USD per vol point, theta USD per day) and ``rho = T (F delta - V) / 100``.

Instruments: the usual Deribit listing (dailies, three Friday weeklies, monthlies and
quarterlies, settling 08:00 UTC), strikes on multiples of a step that grows away from the money
(``strike_grid``). When the forward moves half a standard deviation from where an expiry's grid
was centred, missing strikes are listed (``instrument.state`` created/started), as Deribit does.
Tickers arrive as a Poisson stream (``rate`` a second over the chain, 28 by default: an hour of a
full BTC chain is about 5 MB at zstd level 19), near-the-money and short-dated options more often
than wings; every option ticks again within 30-55 s (nothing goes stale in a book that drops
quotes older than a minute) and once right after (re)connecting.

Scenarios: ``calm``; ``regime-shift`` (mid-run: spot -15% over a few minutes, ATM vol +40%,
steeper skew, then the parameters revert); ``expiry-roll`` (starts 07:45 UTC: the day's expiry
settles at 08:00, a new daily is listed); ``disconnect`` (a gap of two minutes without frames,
then a fresh ``get_instruments`` reply and a ticker per instrument, as after a reconnect);
``bad-data`` (crossed quotes, zero bids, missing fields, malformed and garbage frames at a known
rate; each counted in ``Simulation.injected``, the parser drop reason expected in
``EXPECTED_DROP``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from streamer.errors import InputError
from streamer.instruments import MS_PER_YEAR, expiry_code_of

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

SCENARIOS = ("calm", "regime-shift", "expiry-roll", "disconnect", "bad-data")
TRUTH_SCHEMA = "streamer.simulate.truth/1"
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
SECONDS_PER_YEAR = 365.0 * 86_400.0
DEFAULT_START = "2026-03-02T09:00:00Z"  # a Monday, one hour after the day's settlement
EXPIRY_ROLL_START = "2026-03-02T07:45:00Z"  # 15 minutes before the 2MAR26 daily settles
DEFAULT_RATE = 28.0  # ticker frames per second over the whole chain (+1 index frame)
SIZE_CHANGE_P = 0.35  # chance a ticker shows a new best bid/ask size (they persist)
QUIET_S = (30, 55)  # every option ticks again within this many seconds (nothing goes stale)
NEVER = 1 << 62
DEFAULT_STEP_MS = 250
TRUTH_EVERY_MS = 10_000
TICK_UNITS_PER_COIN = 10_000  # prices in units of the small tick, 0.0001 coin
COARSE_TICK_UNITS = 5  # 0.0005 coin ...
COARSE_FROM_UNITS = 50  # ... from 0.005 coin up
BURST_MS = 1_500  # every instrument ticks once within this after a (re)connect
N_DAILY = 5
N_WEEKLY = 3
N_MONTHLY = 3
N_QUARTERLY = 4
QUARTER_MONTHS = (3, 6, 9, 12)
STRIKE_MANTISSAS = (1.0, 2.0, 5.0)

# bad-data kinds -> the DeribitParser drop reason they cause ("" = accepted, not dropped)
EXPECTED_DROP: dict[str, str] = {
    "crossed": "",
    "zero_bid": "",
    "missing_optional": "",
    "missing_timestamp": "missing_field",
    "missing_instrument": "missing_field",
    "string_price": "bad_type",
    "bad_instrument": "bad_instrument",
    "truncated": "bad_json",
    "garbage": "bad_json",
    "nan_literal": "bad_json",
    "not_object": "not_object",
    "unknown_channel": "unknown_channel",
}
BAD_KINDS = tuple(EXPECTED_DROP)


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


@dataclass(frozen=True, slots=True)
class MarketParams:
    """Model parameters (annualised unless said otherwise); the scenario presets change some.

    OU processes take a half-life in minutes of feed time and a stationary standard deviation.
    """

    spot: float = 90_000.0
    v0: float = 0.45**2  # Bates variance: instantaneous vol 45%
    kappa: float = 4.0
    vbar: float = 0.45**2
    xi: float = 0.6
    rho_sv: float = -0.4
    lam: float = 20.0  # jumps per year
    mu_j: float = -0.01
    sigma_j: float = 0.02
    s_inf: float = 0.52  # long-end ATM vol
    s_inf_sd: float = 0.01
    tau: float = 0.25  # years: where the term structure bends
    u_sd: float = 0.02  # ATM level factor (log)
    rho: float = -0.15
    rho_sd: float = 0.02
    eta: float = 1.0
    eta_sd: float = 0.04
    gamma: float = 0.40
    gamma_sd: float = 0.015
    basis: float = 0.04  # forward basis per year
    basis_sd: float = 0.005
    half_life_min: float = 30.0
    spread_iv: float = 0.004  # ATM half spread in vol, widened for wings and short expiries
    # regime shift (scenario "regime-shift"): at shift_at (fraction of the run)
    shift_at: float = 0.5
    shift_minutes: float = 4.0
    crash: float = 0.15  # spot falls by this fraction
    vol_jump: float = 0.40  # ATM vol rises by this fraction
    rho_jump: float = -0.25
    eta_jump: float = 0.30  # relative
    basis_jump: float = -0.03
    revert_half_life_min: float = 20.0
    # disconnect: a gap of gap_minutes starting at gap_at (fraction of the run)
    gap_at: float = 0.5
    gap_minutes: float = 2.0
    # bad-data: the fraction of ticker frames spoiled
    bad_rate: float = 0.02


@dataclass(frozen=True, slots=True)
class SimConfig:
    """What one run is: scenario, length, seed, start, chain, rates and model parameters."""

    scenario: str = "calm"
    minutes: float = 60.0
    seed: int = 0
    underlying: str = "BTC"
    start_ms: int = 0  # 0: the scenario's default start
    rate: float = DEFAULT_RATE
    step_ms: int = DEFAULT_STEP_MS
    market: MarketParams = field(default_factory=MarketParams)


def _parse_time(text: str) -> int:
    """ISO 8601 (``Z`` allowed) -> ms since the epoch; a naive time is taken as UTC."""
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InputError("start", f"not an ISO 8601 time: {text!r}") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def default_start_ms(scenario: str) -> int:
    """The fixed start of a scenario (never the wall clock)."""
    return _parse_time(EXPIRY_ROLL_START if scenario == "expiry-roll" else DEFAULT_START)


# -- listing: expiries and strikes ----------------------------------------------------------


def _at_eight(d: datetime) -> int:
    return int(datetime(d.year, d.month, d.day, 8, tzinfo=UTC).timestamp() * 1000)


def _last_friday(year: int, month: int) -> int:
    nxt = datetime(year + month // 12, month % 12 + 1, 1, 8, tzinfo=UTC)
    ms = int(nxt.timestamp() * 1000) - DAY_MS
    while datetime.fromtimestamp(ms / 1000, tz=UTC).weekday() != 4:
        ms -= DAY_MS
    return ms


def listed_expiries(now_ms: int) -> list[int]:
    """Expiries (ms, 08:00 UTC) Deribit-style at ``now_ms``: the next ``N_DAILY`` days, the next
    ``N_WEEKLY`` Fridays, the last Fridays of the next ``N_MONTHLY`` months and of the next
    ``N_QUARTERLY`` quarter months, all strictly after now."""
    day0 = _at_eight(datetime.fromtimestamp(now_ms / 1000, tz=UTC))
    days = [day0 + i * DAY_MS for i in range(0, 400)]
    future = [d for d in days if d > now_ms]
    out = set(future[:N_DAILY])
    out.update(
        [d for d in future if datetime.fromtimestamp(d / 1000, tz=UTC).weekday() == 4][:N_WEEKLY]
    )
    now = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
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
    d = datetime.fromtimestamp(expiry_ms / 1000, tz=UTC)
    if d.weekday() != 4:
        return "day"
    return "month" if _last_friday(d.year, d.month) == expiry_ms else "week"


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


# -- the market state -----------------------------------------------------------------------


class Market:
    """The state stepped forward: spot, Bates variance, regime factor, SSVI and basis paths."""

    def __init__(self, p: MarketParams, rng: np.random.Generator) -> None:
        self.p = p
        self.rng = rng
        self.log_s = math.log(p.spot)
        self.v = p.v0
        self.u = 0.0
        self.s_inf = p.s_inf
        self.rho = p.rho
        self.eta = p.eta
        self.gamma = p.gamma
        self.basis = p.basis
        # OU means (the regime shift moves the state, not these: the state reverts to them)
        self.half_life_min = p.half_life_min
        self.jumps = 0

    @property
    def spot(self) -> float:
        return math.exp(self.log_s)

    def step(self, dt_s: float, shock: float = 0.0, reverting: bool = True) -> None:
        """Advance by ``dt_s`` seconds; ``shock`` in [0, 1] is the fraction of the regime shift
        applied during this step (the crash and the parameter jumps), ``reverting`` False
        freezes the parameters' mean reversion (during the shift)."""
        p, rng = self.p, self.rng
        dt = dt_s / SECONDS_PER_YEAR
        z = rng.standard_normal(8)
        vp = max(self.v, 0.0)
        vol = math.sqrt(vp) * math.exp(self.u)
        m = math.exp(p.mu_j + 0.5 * p.sigma_j**2) - 1.0
        n_jumps = int(rng.poisson(p.lam * dt))
        jump = 0.0
        if n_jumps:
            jump = float(np.sum(rng.normal(p.mu_j, p.sigma_j, n_jumps)))
            self.jumps += n_jumps
        self.log_s += (-p.lam * m - 0.5 * vol * vol) * dt + vol * math.sqrt(dt) * z[0] + jump
        zv = p.rho_sv * z[0] + math.sqrt(1.0 - p.rho_sv**2) * z[1]
        self.v += p.kappa * (p.vbar - vp) * dt + p.xi * math.sqrt(vp * dt) * zv
        lo, hi = (0.2 * self.s_inf) ** 2, (5.0 * self.s_inf) ** 2
        self.v = min(max(self.v, lo), hi)
        hl = self.half_life_min if reverting else math.inf
        self.u = _ou(self.u, 0.0, p.u_sd, hl, dt_s, z[2])
        self.s_inf = _ou(self.s_inf, p.s_inf, p.s_inf_sd, hl, dt_s, z[3])
        self.rho = _ou(self.rho, p.rho, p.rho_sd, hl, dt_s, z[4])
        self.eta = _ou(self.eta, p.eta, p.eta_sd, hl, dt_s, z[5])
        self.gamma = _ou(self.gamma, p.gamma, p.gamma_sd, hl, dt_s, z[6])
        self.basis = _ou(self.basis, p.basis, p.basis_sd, hl, dt_s, z[7])
        if shock > 0.0:
            self.log_s += math.log(1.0 - p.crash) * shock
            self.u += math.log(1.0 + p.vol_jump) * shock
            self.rho += p.rho_jump * shock
            self.eta += p.eta * p.eta_jump * shock
            self.basis += p.basis_jump * shock
        self.rho = min(max(self.rho, -0.9), 0.9)
        self.gamma = min(max(self.gamma, 0.05), 0.5)
        self.eta = min(max(self.eta, 0.05), 1.98 / (1.0 + abs(self.rho)))

    def atm_vol(self, T: FloatArray) -> FloatArray:
        """ATM implied vol per maturity (years): ``e^u NS(T; sqrt(v), s_inf, tau)``."""
        x = np.maximum(np.asarray(T, dtype=np.float64), 1e-12) / self.p.tau
        shape = -np.expm1(-x) / x
        s0 = math.sqrt(max(self.v, 0.0))
        return np.asarray(math.exp(self.u) * (self.s_inf + (s0 - self.s_inf) * shape))

    def forward(self, T: FloatArray) -> FloatArray:
        return np.asarray(self.spot * np.exp(self.basis * np.asarray(T, dtype=np.float64)))

    def total_variance(self, k: FloatArray, theta: FloatArray) -> FloatArray:
        """SSVI ``w(k, theta)`` with the current ``rho``, ``eta``, ``gamma``."""
        return ssvi_total_variance(k, theta, self.rho, self.eta, self.gamma)


def ssvi_total_variance(
    k: FloatArray, theta: FloatArray, rho: float, eta: float, gamma: float
) -> FloatArray:
    """Gatheral & Jacquier (2014) SSVI with the power-law ``phi`` (module docstring)."""
    phi = eta / (theta**gamma * (1.0 + theta) ** (1.0 - gamma))
    q = phi * k + rho
    return np.asarray(0.5 * theta * (1.0 + rho * phi * k + np.sqrt(q * q + 1.0 - rho * rho)))


def _ou(x: float, mean: float, sd: float, half_life_min: float, dt_s: float, z: float) -> float:
    """One exact step of an OU process with stationary sd ``sd`` and the given half-life."""
    if not math.isfinite(half_life_min):
        return x  # frozen (during a regime shift)
    a = math.exp(-math.log(2.0) * dt_s / (60.0 * half_life_min))
    return mean + (x - mean) * a + sd * math.sqrt(1.0 - a * a) * z


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
        self._arrays: tuple[FloatArray, BoolArray, IntArray, IntArray, BoolArray, BoolArray] | None
        self._arrays = None

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

    def arrays(self) -> tuple[FloatArray, BoolArray, IntArray, IntArray, BoolArray, BoolArray]:
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


def _notification(channel: str, data: Any) -> str:
    return orjson.dumps(
        {"jsonrpc": "2.0", "method": "subscription", "params": {"channel": channel, "data": data}}
    ).decode()


def _rint(x: FloatArray, decimals: int) -> FloatArray:
    """Round half-even to ``decimals``: the quotient of an exact integer by a power of ten,
    so the shortest float repr has at most ``decimals`` decimals."""
    scale = 10.0**decimals
    return np.asarray(np.rint(np.asarray(x) * scale) / scale)


# -- the simulation -------------------------------------------------------------------------


class Simulation(Iterator[tuple[int, str]]):
    """Iterate to get ``(ts_ns, frame_text)`` in receive order; ``truth`` fills as it goes.

    ``truth`` (a JSON-able dict): ``schema``, ``config`` (every parameter), ``scenario``
    event times (``shift``, ``gap``, ``settlements``), ``injected`` bad frames by kind and the
    parser drops they should cause, ``frames`` by kind, and ``path``: samples every
    ``TRUTH_EVERY_MS`` of feed time (``ts_ms``, ``spot``, model state, and per expiry
    ``expiry``, ``expiry_ms``, ``T``, ``forward``, ``atm_iv``, ``theta``, ``rho``, ``eta``,
    ``gamma``: the SSVI slice, so ``iv(K) = sqrt(w(ln(K/forward), theta) / T)``).
    """

    def __init__(self, config: SimConfig) -> None:
        if config.scenario not in SCENARIOS:
            raise InputError("scenario", f"one of {', '.join(SCENARIOS)}: {config.scenario!r}")
        if config.underlying not in UNDERLYINGS:
            raise InputError("underlying", f"one of {sorted(UNDERLYINGS)}: {config.underlying!r}")
        if not config.minutes > 0:
            raise InputError("minutes", f"must be positive: {config.minutes}")
        if not config.rate > 0:
            raise InputError("rate", f"must be positive: {config.rate}")
        if config.step_ms <= 0 or 1000 % config.step_ms or config.step_ms > 1000:
            raise InputError("step_ms", f"must divide 1000: {config.step_ms}")
        under = UNDERLYINGS[config.underlying]
        market = config.market
        if market.spot == MarketParams().spot and under.spot != market.spot:
            market = dataclasses.replace(market, spot=under.spot)
        start_ms = config.start_ms or default_start_ms(config.scenario)
        self.config = dataclasses.replace(config, market=market, start_ms=start_ms)
        self.rng = np.random.default_rng(config.seed)
        self.market = Market(market, self.rng)
        self.chain = Chain(under)
        self.injected: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.truth: dict[str, Any] = {}
        self._weights: tuple[FloatArray, float] = (np.zeros(0), 0.0)
        self._gen = self._run()

    def __iter__(self) -> Simulation:
        return self

    def __next__(self) -> tuple[int, str]:
        return next(self._gen)

    def expected_drops(self) -> Counter[str]:
        """The ``DeribitParser.drops`` the injected bad frames should cause (so far)."""
        out: Counter[str] = Counter()
        for kind, n in self.injected.items():
            if EXPECTED_DROP[kind]:
                out[EXPECTED_DROP[kind]] += n
        return out

    # -- setup --------------------------------------------------------------------------------

    def _list_expiry(self, ms: int, now_ms: int, initial: bool) -> list[int]:
        """Add an expiry and its strike grid; the new options' indices."""
        T = (ms - now_ms) / MS_PER_YEAR
        F = float(self.market.forward(np.array([T]))[0])
        atm = float(self.market.atm_vol(np.array([T]))[0])
        e = self.chain.add_expiry(ms, F)
        return self._list_strikes(e, strike_grid(F, T, atm), now_ms, initial)

    def _list_strikes(self, e: int, strikes: list[float], now_ms: int, initial: bool) -> list[int]:
        ex = self.chain.expiries[e]
        tenor = {"day": 4, "week": 21, "month": 120}[ex.period] * DAY_MS
        out: list[int] = []
        for K in strikes:
            for is_call in (True, False):
                oi = float(np.round(self.rng.lognormal(3.5, 1.3), 1))
                sizes = np.maximum(_rint(self.rng.lognormal(1.6, 1.1, size=2), 1), 0.1).tolist()
                created = min(ex.ms - tenor, now_ms - HOUR_MS) if initial else now_ms
                i = self.chain.add(e, K, is_call, oi, sizes, created)
                if i is not None:
                    out.append(i)
        return out

    def _instruments_reply(self, rid: int, ts_ns: int) -> str:
        us = ts_ns // 1000
        result = [self.chain.instrument(i) for i, a in enumerate(self.chain.alive) if a]
        return orjson.dumps(
            {
                "jsonrpc": "2.0",
                "id": rid,
                "result": result,
                "usIn": us - 2_000,
                "usOut": us - 1_200,
                "usDiff": 800,
                "testnet": False,
            }
        ).decode()

    def _state_frame(self, name: str, state: str, ts_ms: int) -> str:
        channel = f"instrument.state.option.{self.chain.under.name}"
        return _notification(channel, {"timestamp": ts_ms, "state": state, "instrument_name": name})

    # -- the run ------------------------------------------------------------------------------

    def _run(self) -> Iterator[tuple[int, str]]:
        cfg, p = self.config, self.config.market
        step_ns = cfg.step_ms * 1_000_000
        t0 = cfg.start_ms * 1_000_000
        n_steps = max(1, round(cfg.minutes * 60_000 / cfg.step_ms))
        end = t0 + n_steps * step_ns
        duration = end - t0
        shift = gap = (0, 0)
        if cfg.scenario == "regime-shift":
            s0 = t0 + round(p.shift_at * duration / step_ns) * step_ns
            shift = (s0, s0 + round(p.shift_minutes * 60e9 / step_ns) * step_ns)
        if cfg.scenario == "disconnect":
            g0 = t0 + round(p.gap_at * duration / 1e9) * 1_000_000_000
            gap = (g0, g0 + round(p.gap_minutes * 60e9))
        self.truth = {
            "schema": TRUTH_SCHEMA,
            "model": "ssvi",
            "formula": (
                "iv(K) = sqrt(w(k, theta) / T), k = ln(K / forward), w = theta/2 (1 + rho phi k"
                " + sqrt((phi k + rho)^2 + 1 - rho^2)), phi = eta / (theta^gamma"
                " (1 + theta)^(1 - gamma)), theta = atm_iv^2 T"
            ),
            "config": _config_dict(self.config),
            "start_ms": cfg.start_ms,
            "end_ms": end // 1_000_000,
            "shift": None if shift == (0, 0) else [shift[0] // 10**6, shift[1] // 10**6],
            "gap": None if gap == (0, 0) else [gap[0] // 10**6, gap[1] // 10**6],
            "settlements": [],
            "listings": [],
            "injected": self.injected,
            "expected_drops": {},
            "frames": self.counts,
            "path": [],
        }
        now_ms = cfg.start_ms
        new: list[int] = []
        for ms in listed_expiries(now_ms):
            new += self._list_expiry(ms, now_ms, initial=True)
        self._weights = self._compute_weights(now_ms)
        rid = 1
        pending: list[tuple[int, int, str]] = []  # (ts_ns, seq, text): static frames
        forced: list[tuple[int, int]] = []  # (ts_ns, instrument): first tickers
        seq = 0

        def burst(at_ns: int, which: list[int]) -> None:
            offs = self.rng.integers(50_000, BURST_MS * 1000, size=len(which)) * 1000
            forced.extend((at_ns + int(o), i) for o, i in zip(offs.tolist(), which, strict=True))
            forced.sort()

        self.counts["instruments"] += 1
        yield t0, self._instruments_reply(rid, t0)
        burst(t0, new)
        next_truth = t0
        reconnected = gap == (0, 0)
        for step in range(n_steps):
            t = t0 + step * step_ns
            t_ms = t // 1_000_000
            frames: list[tuple[int, int, str]] = []
            if not reconnected and t >= gap[1]:
                reconnected = True
                rid += 1
                self.counts["instruments"] += 1
                frames.append((gap[1], -1, self._instruments_reply(rid, gap[1])))
                burst(gap[1], [i for i, a in enumerate(self.chain.alive) if a])
            # settlements, then new expiries (both at most once a second)
            if t % 1_000_000_000 == 0:
                for e, ex in enumerate(self.chain.expiries):
                    if ex.alive and ex.ms + 2_000 <= t_ms:
                        gone = self.chain.kill_expiry(e)
                        self.truth["settlements"].append({"expiry": ex.code, "ts_ms": t_ms})
                        for j, i in enumerate(gone):
                            ts = t + j * 1_000
                            txt = self._state_frame(self.chain.names[i], "settled", ts // 10**6)
                            seq += 1
                            pending.append((ts, seq, txt))
                            self.counts["state"] += 1
                        listed = {x.ms for x in self.chain.expiries if x.alive}
                        for ms in listed_expiries(t_ms):
                            if ms not in listed:
                                added = self._list_expiry(ms, t_ms, initial=False)
                                seq = self._announce(added, t + 500_000_000, pending, seq)
                                burst(t + 1_600_000_000, added)
                        self._weights = self._compute_weights(t_ms)
            if t >= next_truth:
                next_truth += TRUTH_EVERY_MS * 1_000_000
                self._sample_truth(t_ms)
                added = self._relist(t_ms)
                if added:
                    seq = self._announce(added, t + 1_000_000, pending, seq)
                    burst(t + 1_100_000_000, added)
                self._weights = self._compute_weights(t_ms)
            if t % 1_000_000_000 == 0:
                lat = int(self.rng.integers(1, 8))
                price = round(self.market.spot, 2)
                data = {"index_name": self.chain.under.index, "price": price, "timestamp": t_ms}
                txt = _notification(f"deribit_price_index.{self.chain.under.index}", data)
                frames.append((t + lat * 1_000_000, 0, txt))
                self.counts["index"] += 1
            # tickers: the Poisson stream, options quiet for too long, and first tickers of
            # new or resubscribed options
            probs, poisson_rate = self._weights
            n = int(self.rng.poisson(poisson_rate * cfg.step_ms / 1000.0))
            idx = self.rng.choice(len(probs), size=n, p=probs)
            offs = self.rng.integers(0, step_ns // 1000, size=n) * 1000
            ev_t = (t + offs).tolist()
            ev_i = idx.tolist()
            due = np.asarray(self.chain.next_due, dtype=np.int64)
            for i in np.flatnonzero(due < t + step_ns).tolist():
                ev_t.append(max(int(due[i]), t))
                ev_i.append(i)
            while forced and forced[0][0] < t + step_ns:
                ft, fi = forced.pop(0)
                ev_t.append(max(ft, t))
                ev_i.append(fi)
            frames.extend(self._tickers(ev_t, ev_i))
            while pending and pending[0][0] < t + step_ns:
                frames.append(pending.pop(0))
            frames.sort(key=lambda f: (f[0], f[1]))
            for ts, _, txt in frames:
                if gap[0] <= ts < gap[1]:
                    continue
                yield ts, txt
            # advance the market to t + step
            if shift[0] <= t < shift[1]:
                self.market.step(
                    cfg.step_ms / 1000.0, cfg.step_ms * 1e6 / (shift[1] - shift[0]), reverting=False
                )
                if t + step_ns >= shift[1]:
                    self.market.half_life_min = p.revert_half_life_min
            else:
                self.market.step(cfg.step_ms / 1000.0)
        self._sample_truth(end // 1_000_000)
        self.truth["expected_drops"] = dict(self.expected_drops())

    def _announce(
        self, added: list[int], at_ns: int, pending: list[tuple[int, int, str]], seq: int
    ) -> int:
        """``created`` then (0.5 s later) ``started`` frames for new options."""
        for j, i in enumerate(added):
            self.chain.active_ns[i] = at_ns + 500_000_000 + j * 1_000 + 1
            for state, dt in (("created", 0), ("started", 500_000_000)):
                ts = at_ns + dt + j * 1_000
                seq += 1
                pending.append(
                    (ts, seq, self._state_frame(self.chain.names[i], state, ts // 10**6))
                )
                self.counts["state"] += 1
        pending.sort()
        self.truth["listings"].append({"ts_ms": at_ns // 10**6, "instruments": len(added)})
        return seq

    def _relist(self, now_ms: int) -> list[int]:
        """List strikes around the forward of expiries it moved away from (> 0.5 sd)."""
        added: list[int] = []
        for e, ex in enumerate(self.chain.expiries):
            if not ex.alive or ex.ms - now_ms < HOUR_MS:
                continue
            T = (ex.ms - now_ms) / MS_PER_YEAR
            F = float(self.market.forward(np.array([T]))[0])
            atm = float(self.market.atm_vol(np.array([T]))[0])
            sd = atm * math.sqrt(max(T, 1.0 / 365.0))
            if abs(math.log(F / ex.center)) > 0.5 * sd:
                ex.center = F
                added += self._list_strikes(e, strike_grid(F, T, atm), now_ms, initial=False)
        return added

    def _compute_weights(self, now_ms: int) -> tuple[FloatArray, float]:
        """Each option's share of the Poisson ticker stream (near the money and short expiries
        more) and the stream's rate, chosen so that with the refresh floor (one tick every
        ``QUIET_S`` at least) the whole chain sends about ``rate`` tickers a second."""
        K, _, _, exp_ms, _, alive = self.chain.arrays()
        T = np.maximum((exp_ms - now_ms) / MS_PER_YEAR, 1e-9)
        F = self.market.forward(T)
        sd = self.market.atm_vol(T) * np.sqrt(np.maximum(T, 1.0 / 365.0))
        z = np.log(K / F) / sd
        w = (0.05 + np.exp(-0.5 * z * z)) * (1.0 + 1.0 / (1.0 + 30.0 * T))
        w = np.where(alive & (exp_ms - now_ms > 2_000), w, 0.0)
        total = float(np.sum(w))
        if total <= 0:
            return np.full(len(w), 1.0 / max(len(w), 1)), 0.0
        p = np.asarray(w / total)
        # a Poisson stream of rate lam with a forced tick after q quiet seconds is a renewal
        # process with mean interval (1 - exp(-lam q)) / lam
        q = float(np.mean(QUIET_S))
        live = p[p > 0]
        lo, hi = 0.0, self.config.rate
        for _ in range(50):  # bisection on the Poisson stream's rate c
            lam = np.maximum(0.5 * (lo + hi) * live, 1e-12)
            if float(np.sum(lam / -np.expm1(-lam * q))) > self.config.rate:
                hi = 0.5 * (lo + hi)
            else:
                lo = 0.5 * (lo + hi)
        return p, lo

    def _sample_truth(self, t_ms: int) -> None:
        m = self.market
        rows = []
        for ex in self.chain.expiries:
            if not ex.alive or ex.ms <= t_ms:
                continue
            T = (ex.ms - t_ms) / MS_PER_YEAR
            Ta = np.array([T])
            atm = float(m.atm_vol(Ta)[0])
            rows.append(
                {
                    "expiry": ex.code,
                    "expiry_ms": ex.ms,
                    "T": _sig(T, 9),
                    "forward": _sig(float(m.forward(Ta)[0]), 10),
                    "atm_iv": _sig(atm, 7),
                    "theta": _sig(atm * atm * T, 7),
                    "rho": _sig(m.rho, 6),
                    "eta": _sig(m.eta, 6),
                    "gamma": _sig(m.gamma, 6),
                }
            )
        self.truth["path"].append(
            {
                "ts_ms": t_ms,
                "spot": _sig(m.spot, 10),
                "v": _sig(m.v, 8),
                "u": _sig(m.u, 8),
                "s_inf": _sig(m.s_inf, 8),
                "rho": _sig(m.rho, 8),
                "eta": _sig(m.eta, 8),
                "gamma": _sig(m.gamma, 8),
                "basis": _sig(m.basis, 8),
                "jumps": m.jumps,
                "expiries": rows,
            }
        )

    # -- ticker frames ------------------------------------------------------------------------

    def _tickers(self, ev_t: list[int], ev_i: list[int]) -> list[tuple[int, int, str]]:
        """Ticker notifications for options ``ev_i`` received at ``ev_t`` (ns), priced off the
        current state; one per option per call (Deribit's 100 ms channel conflates), none in
        an option's last second before settlement."""
        chain = self.chain
        exp_of = [x.ms for x in chain.expiries]
        seen: set[int] = set()
        keep_t: list[int] = []
        keep_i: list[int] = []
        for ts, i in sorted(zip(ev_t, ev_i, strict=True)):
            if i in seen or not chain.alive[i] or ts < chain.active_ns[i]:
                continue
            if exp_of[chain.exp_idx[i]] - ts // 1_000_000 <= 1_100:  # 1 s + the max latency
                continue
            seen.add(i)
            keep_t.append(ts)
            keep_i.append(i)
        n = len(keep_i)
        if n == 0:
            return []
        rng, cfg = self.rng, self.config
        idx = np.asarray(keep_i, dtype=np.int64)
        recv = np.asarray(keep_t, dtype=np.int64)
        ts_ms = recv // 1_000_000 - rng.integers(1, 20, size=n)  # exchange time: latency
        noise = np.clip(rng.standard_normal(n), -3.0, 3.0) * 0.2
        quiet = rng.integers(QUIET_S[0] * 1000, QUIET_S[1] * 1000, size=n) * 1_000_000
        for j, i in enumerate(keep_i):
            chain.next_due[i] = keep_t[j] + int(quiet[j])
        new_sizes = np.maximum(_rint(rng.lognormal(1.6, 1.1, size=(2, n)), 1), 0.1)
        change = rng.random((2, n)) < SIZE_CHANGE_P
        for j, i in enumerate(keep_i):
            held = chain.sizes[i]
            for side in (0, 1):
                if change[side, j]:
                    held[side] = float(new_sizes[side, j])
        sizes = np.asarray([chain.sizes[i] for i in keep_i], dtype=np.float64).T
        Ka, Ca, _, Ea, Sa, _ = chain.arrays()
        K, call, exp_ms, syn = Ka[idx], Ca[idx], Ea[idx], Sa[idx]
        q = quote(self.market, K, call, (exp_ms - ts_ms) / MS_PER_YEAR, syn, noise)
        cols = {name: v.tolist() for name, v in q.items()}
        bid_sz = np.where(q["bid"] > 0, sizes[0], 0.0).tolist()
        ask_sz = sizes[1].tolist()
        times = ts_ms.tolist()
        index = round(self.market.spot, 2)
        bad = cfg.scenario == "bad-data"
        if bad:
            spoil = (rng.random(n) < cfg.market.bad_rate).tolist()
            kinds = rng.integers(0, len(BAD_KINDS), size=n).tolist()
        out: list[tuple[int, int, str]] = []
        for j, i in enumerate(keep_i):
            data: dict[str, Any] = {
                "timestamp": times[j],
                "instrument_name": chain.names[i],
                "state": "open",
                "best_bid_price": cols["bid"][j],
                "best_ask_price": cols["ask"][j],
                "best_bid_amount": bid_sz[j],
                "best_ask_amount": ask_sz[j],
                "bid_iv": cols["bid_iv"][j],
                "ask_iv": cols["ask_iv"][j],
                "mark_iv": cols["mark_iv"][j],
                "mark_price": cols["mark"][j],
                "underlying_price": cols["forward"][j],
                "underlying_index": chain.expiries[chain.exp_idx[i]].underlying_index,
                "index_price": index,
                "open_interest": chain.oi[i],
                "interest_rate": 0.0,
                "greeks": {g: cols[g][j] for g in ("delta", "gamma", "vega", "theta", "rho")},
            }
            channel = f"ticker.{chain.names[i]}.100ms"
            if bad and spoil[j]:
                txt = self._spoil(BAD_KINDS[kinds[j]], channel, data)
            else:
                txt = _notification(channel, data)
            self.counts["ticker"] += 1
            out.append((keep_t[j], 1, txt))
        return out

    def _spoil(self, kind: str, channel: str, data: dict[str, Any]) -> str:
        """One deliberately bad ticker frame of the given kind (``EXPECTED_DROP``)."""
        self.injected[kind] += 1
        if kind == "crossed":
            bid, ask = data["best_bid_price"], data["best_ask_price"]
            if bid > 0:
                data["best_bid_price"], data["best_ask_price"] = ask, bid
                data["bid_iv"], data["ask_iv"] = data["ask_iv"], data["bid_iv"]
            else:
                data["best_bid_price"] = round(ask + 0.0010, 4)
                data["best_bid_amount"] = 1.0
        elif kind == "zero_bid":
            data["best_bid_price"] = data["best_bid_amount"] = data["bid_iv"] = 0.0
        elif kind == "missing_optional":
            del data["mark_iv"], data["greeks"], data["underlying_price"]
        elif kind == "missing_timestamp":
            del data["timestamp"]
        elif kind == "missing_instrument":
            del data["instrument_name"]
        elif kind == "string_price":
            data["mark_price"] = str(data["mark_price"])
        elif kind == "bad_instrument":
            name = str(data["instrument_name"]).split("-")
            data["instrument_name"] = "-".join([name[0], "31FEB26", *name[2:]])
        elif kind == "unknown_channel":
            channel = "tickr." + channel.removeprefix("ticker.")
        text = _notification(channel, data)
        if kind == "truncated":
            return text[: len(text) // 2]
        if kind == "garbage":
            return "\x15\x03\x03" + self.rng.bytes(12).hex() + "}{"
        if kind == "nan_literal":
            return text.replace('"mark_iv":', '"mark_iv":NaN,"mark_iv_was":', 1)
        if kind == "not_object":
            return orjson.dumps(["subscription", channel, data["best_ask_price"]]).decode()
        return text


def quote(
    market: Market,
    K: FloatArray,
    is_call: BoolArray,
    T: FloatArray,
    synthetic: BoolArray,
    noise: FloatArray,
) -> dict[str, FloatArray]:
    """Wire values of options (strike ``K``, years ``T`` to expiry) off the market's surface.

    ``forward`` (2 decimals for a future, 4 for a synthetic forward), ``mark_iv`` (percent, 2
    decimals), ``mark`` (coin price at that IV and forward, 8 decimals), ``bid``/``ask`` (Black
    prices at the IV -+ the half spread, the quote's centre moved by ``noise`` half spreads,
    rounded outwards to the tick; a bid under one tick is 0; the ask at least a tick above
    intrinsic value, so the mid is never below it), ``bid_iv``/``ask_iv`` (of the
    rounded prices; 0 for no bid or no IV, e.g. a bid below intrinsic), and Deribit's Greeks
    ``delta``, ``gamma``, ``vega``, ``theta``, ``rho`` (5 decimals)."""
    from streamer.pricing import black_price, deribit_greeks, implied_vol

    fwd = market.forward(T)
    F = np.where(synthetic, _rint(fwd, 4), _rint(fwd, 2))
    k = np.log(K / F)
    atm = market.atm_vol(T)
    iv = np.sqrt(market.total_variance(k, atm * atm * T) / T)
    mark_iv = _rint(iv * 100.0, 2)
    sig = mark_iv / 100.0
    g = deribit_greeks(F, K, T, sig, is_call)
    coin = np.asarray(g.price_coin)
    # half spread in vol: wider in the wings (|z| standard deviations out) and near expiry
    z = k / (atm * np.sqrt(np.maximum(T, 1.0 / 365.0)))
    hs = market.p.spread_iv * (1.0 + 0.5 * np.abs(z))
    hs = hs * (1.0 + 0.5 / np.sqrt(np.maximum(T * 365.0, 0.05)))
    centre = sig + noise * hs
    p_bid = np.asarray(black_price(F, K, T, np.maximum(centre - hs, 0.005), is_call)) / F
    p_ask = np.asarray(black_price(F, K, T, centre + hs, is_call)) / F
    # no ask within a tick of intrinsic value: the mid never falls below it
    intrinsic = np.maximum(np.where(is_call, F - K, K - F), 0.0) / F
    tick = np.where(intrinsic * TICK_UNITS_PER_COIN >= COARSE_FROM_UNITS, 0.0005, 0.0001)
    p_ask = np.maximum(p_ask, intrinsic + tick)
    bid_u = np.floor(p_bid * TICK_UNITS_PER_COIN + 1e-7)
    bid_u = np.where(bid_u >= COARSE_FROM_UNITS, bid_u - bid_u % COARSE_TICK_UNITS, bid_u)
    ask_u = np.ceil(p_ask * TICK_UNITS_PER_COIN - 1e-7)
    coarse = -(-ask_u // COARSE_TICK_UNITS) * COARSE_TICK_UNITS
    ask_u = np.maximum(np.where(ask_u > COARSE_FROM_UNITS, coarse, ask_u), 1.0)
    bid = bid_u / TICK_UNITS_PER_COIN
    ask = ask_u / TICK_UNITS_PER_COIN
    bid_iv = np.asarray(implied_vol(bid * F, F, K, T, is_call))
    ask_iv = np.asarray(implied_vol(ask * F, F, K, T, is_call))
    rho = T * (F * np.asarray(g.delta) - coin * F) / 100.0  # USD per 1% of rate
    return {
        "forward": F,
        "mark_iv": mark_iv,
        "mark": _rint(coin, 8),
        "bid": bid,
        "ask": ask,
        "bid_iv": np.where(np.isfinite(bid_iv) & (bid > 0), _rint(bid_iv * 100.0, 2), 0.0),
        "ask_iv": np.where(np.isfinite(ask_iv), _rint(ask_iv * 100.0, 2), 0.0),
        "delta": _rint(np.asarray(g.delta), 5),
        "gamma": _rint(np.asarray(g.gamma), 5),
        "vega": _rint(np.asarray(g.vega), 5),
        "theta": _rint(np.asarray(g.theta), 5),
        "rho": _rint(rho, 5),
    }


def _sig(x: float, digits: int) -> float:
    """``x`` to ``digits`` significant digits (a compact truth file)."""
    return float(f"{x:.{digits}g}")


def _config_dict(cfg: SimConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def simulate(
    scenario: str = "calm",
    minutes: float = 60.0,
    seed: int = 0,
    *,
    underlying: str = "BTC",
    start: str | int | None = None,
    rate: float = DEFAULT_RATE,
    step_ms: int = DEFAULT_STEP_MS,
    **market: Any,
) -> Simulation:
    """A run in memory: iterate it for ``(ts_ns, frame_text)``; its ``truth`` is complete once
    exhausted. ``start``: ISO time or ms since the epoch (default: the scenario's fixed start);
    ``market``: ``MarketParams`` fields to override (``spot=...``, ``crash=0.2``, ...)."""
    start_ms = _parse_time(start) if isinstance(start, str) else int(start or 0)
    unknown = set(market) - {f.name for f in dataclasses.fields(MarketParams)}
    if unknown:
        raise InputError("market", f"unknown parameters {sorted(unknown)}")
    return Simulation(
        SimConfig(
            scenario=scenario,
            minutes=minutes,
            seed=seed,
            underlying=underlying.upper(),
            start_ms=start_ms,
            rate=rate,
            step_ms=step_ms,
            market=MarketParams(**market),
        )
    )


# -- files ----------------------------------------------------------------------------------

_SUFFIX_COMPRESSION = ((".jsonl.zst", "zst"), (".jsonl.gz", "gz"), (".jsonl", "none"))


def truth_path_for(path: str | os.PathLike[str]) -> Path:
    """``x.jsonl[.zst|.gz]`` -> ``x.truth.json``."""
    p = Path(path)
    for suffix, _ in _SUFFIX_COMPRESSION:
        if p.name.endswith(suffix):
            return p.with_name(p.name.removesuffix(suffix) + ".truth.json")
    raise InputError("out", f"must end in .jsonl, .jsonl.gz or .jsonl.zst: {p.name!r}")


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What ``write`` produced."""

    path: Path
    truth_path: Path
    frames: int
    bytes: int  # the file's size on disk
    seconds: float


def write(sim: Simulation, out: str | os.PathLike[str], *, zstd_level: int = 19) -> WriteResult:
    """Run ``sim`` into the recording ``out`` (compression by suffix, via ``Recorder``) and its
    ``.truth.json`` sidecar. The recorder's clock is the feed time, so files are reproducible
    (gzip: the header's MTIME is zeroed, RFC 1952 section 2.3.1)."""
    from streamer.feeds.recordings.recorder import Recorder

    path = Path(out)
    truth_path = truth_path_for(path)
    compression = next(c for s, c in _SUFFIX_COMPRESSION if path.name.endswith(s))
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".simulate-", dir=path.parent))
    clock = [sim.config.start_ms * 1_000_000]
    frames = 0
    try:
        rec = Recorder(
            tmp,
            venue="deribit",
            rotate_bytes=1 << 62,
            rotate_seconds=1e12,
            compression=compression,  # type: ignore[arg-type]
            flush_interval_s=1e9,
            clock=lambda: clock[0],
            zstd_level=zstd_level,
        )
        with rec:
            for ts_ns, frame in sim:
                clock[0] = ts_ns
                rec.write(frame, ts_ns)
                frames += 1
            written = rec.paths
        if compression == "gz":
            with written[0].open("r+b") as fh:
                fh.seek(4)
                fh.write(b"\0\0\0\0")
        os.replace(written[0], path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    truth_path.write_bytes(truth_json(sim.truth))
    return WriteResult(path, truth_path, frames, path.stat().st_size, time.perf_counter() - t0)


def truth_json(truth: dict[str, Any]) -> bytes:
    """The truth as JSON, one path sample a line (diff-able, still one JSON document)."""
    head = {k: v for k, v in truth.items() if k != "path"}
    body = orjson.dumps(head)[:-1]
    lines = b",\n".join(orjson.dumps(s) for s in truth.get("path", []))
    return body + b',\n"path":[\n' + lines + b"\n]}\n"


def load_truth(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``.truth.json`` file."""
    data: dict[str, Any] = orjson.loads(Path(path).read_bytes())
    if data.get("schema") != TRUTH_SCHEMA:
        raise InputError("truth", f"{path}: not a {TRUTH_SCHEMA} file")
    return data
