"""What one simulated run is: its scenario, length, seed, start, chain, rates and model.

Scenarios: ``calm``; ``regime-shift`` (mid-run: spot -15% over a few minutes, ATM vol +40%,
steeper skew, then the parameters revert); ``expiry-roll`` (starts 07:45 UTC: the day's expiry
settles at 08:00, a new daily is listed); ``disconnect`` (a gap of two minutes without frames,
then a fresh ``get_instruments`` reply and a ticker per instrument, as after a reconnect);
``bad-data`` (crossed quotes, zero bids, missing fields, malformed and garbage frames at a known
rate; each counted in ``Simulation.injected``, the parser drop reason expected in
``frames.EXPECTED_DROP``). The sizes and times of the shift, the gap and the bad-data rate are
``MarketParams`` fields; ``timeline`` places the windows on the run's clock.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime

from streamer.errors import InputError
from streamer.tools.simulate.listing import UNDERLYINGS
from streamer.tools.simulate.market import MarketParams

SCENARIOS = ("calm", "regime-shift", "expiry-roll", "disconnect", "bad-data")
DEFAULT_START = "2026-03-02T09:00:00Z"  # a Monday, one hour after the day's settlement
EXPIRY_ROLL_START = "2026-03-02T07:45:00Z"  # 15 minutes before the 2MAR26 daily settles
DEFAULT_RATE = 28.0  # ticker frames per second over the whole chain (+1 index frame)
DEFAULT_STEP_MS = 250
SECOND_NS = 1_000_000_000
NO_WINDOW = (0, 0)  # a [start, end) window that never holds


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


def parse_time(text: str) -> int:
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
    return parse_time(EXPIRY_ROLL_START if scenario == "expiry-roll" else DEFAULT_START)


def resolve(config: SimConfig) -> SimConfig:
    """``config`` checked, with its defaults filled in: the underlying's spot (unless the spot
    was set) and the scenario's start (unless a start was set)."""
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
    return dataclasses.replace(config, market=market, start_ms=start_ms)


@dataclass(frozen=True, slots=True)
class Timeline:
    """A run's clock (ns since the epoch): ``n_steps`` market steps of ``step_ns`` from ``t0``;
    the regime shift's and the disconnect's ``[start, end)`` windows (``NO_WINDOW``: none)."""

    t0: int
    step_ns: int
    n_steps: int
    shift: tuple[int, int]
    gap: tuple[int, int]

    @property
    def end(self) -> int:
        return self.t0 + self.n_steps * self.step_ns

    def in_gap(self, ts_ns: int) -> bool:
        return self.gap[0] <= ts_ns < self.gap[1]

    def in_shift(self, ts_ns: int) -> bool:
        return self.shift[0] <= ts_ns < self.shift[1]


def timeline(cfg: SimConfig) -> Timeline:
    """The clock of a resolved config: the shift starts on a step, the gap on a second."""
    p = cfg.market
    step_ns = cfg.step_ms * 1_000_000
    t0 = cfg.start_ms * 1_000_000
    n_steps = max(1, round(cfg.minutes * 60_000 / cfg.step_ms))
    duration = n_steps * step_ns
    shift = gap = NO_WINDOW
    if cfg.scenario == "regime-shift":
        s0 = t0 + round(p.shift_at * duration / step_ns) * step_ns
        shift = (s0, s0 + round(p.shift_minutes * 60e9 / step_ns) * step_ns)
    if cfg.scenario == "disconnect":
        g0 = t0 + round(p.gap_at * duration / 1e9) * SECOND_NS
        gap = (g0, g0 + round(p.gap_minutes * 60e9))
    return Timeline(t0, step_ns, n_steps, shift, gap)
