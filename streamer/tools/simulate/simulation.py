"""One simulated run: the market stepped forward, the chain listed and settled, frames in order.

Every ``step_ms`` of feed time the run settles expired options, lists new expiries and new
strikes (when the forward moved half a standard deviation from where an expiry's grid was
centred), sends the index every second and the tickers due, then steps the market. Tickers
arrive as a Poisson stream (``rate`` a second over the chain, 28 by default: an hour of a full
BTC chain is about 5 MB at zstd level 19), near-the-money and short-dated options more often
than wings; every option ticks again within 30-55 s (nothing goes stale in a book that drops
quotes older than a minute) and once right after (re)connecting. Deribit's 100 ms channel
conflates: one ticker per option per step at most, none in an option's last second.

The ground truth (``Simulation.truth``) fills as the run goes: spot, model state and every
expiry's SSVI slice every ``TRUTH_EVERY_MS`` of feed time. One ``numpy.random.Generator``
(seeded), a fixed start time and never the wall clock: the same seed and arguments give the
same frames.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from streamer.errors import InputError
from streamer.instruments import MS_PER_YEAR
from streamer.tools.simulate.frames import (
    BAD_KINDS,
    EXPECTED_DROP,
    index_frame,
    instruments_reply,
    notification,
    spoil,
    state_frame,
    ticker_payloads,
)
from streamer.tools.simulate.listing import (
    DAY_MS,
    HOUR_MS,
    UNDERLYINGS,
    Chain,
    Expiry,
    listed_expiries,
    strike_grid,
)
from streamer.tools.simulate.market import Market, MarketParams
from streamer.tools.simulate.quotes import quote, rint
from streamer.tools.simulate.scenarios import (
    DEFAULT_RATE,
    DEFAULT_STEP_MS,
    NO_WINDOW,
    SECOND_NS,
    SimConfig,
    parse_time,
    resolve,
    timeline,
)

FloatArray = npt.NDArray[np.float64]
Frame = tuple[int, int, str]  # (receive time ns, order among equal times, text)

TRUTH_SCHEMA = "streamer.simulate.truth/1"
TRUTH_EVERY_MS = 10_000
SIZE_CHANGE_P = 0.35  # chance a ticker shows a new best bid/ask size (they persist)
QUIET_S = (30, 55)  # every option ticks again within this many seconds (nothing goes stale)
BURST_MS = 1_500  # every instrument ticks once within this after a (re)connect
NS_PER_MS = 1_000_000
TRUTH_FORMULA = (
    "iv(K) = sqrt(w(k, theta) / T), k = ln(K / forward), w = theta/2 (1 + rho phi k"
    " + sqrt((phi k + rho)^2 + 1 - rho^2)), phi = eta / (theta^gamma"
    " (1 + theta)^(1 - gamma)), theta = atm_iv^2 T"
)


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
        self.config = resolve(config)
        self.timeline = timeline(self.config)
        self.rng = np.random.default_rng(config.seed)
        self.market = Market(self.config.market, self.rng)
        self.chain = Chain(UNDERLYINGS[self.config.underlying])
        self.injected: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.truth: dict[str, Any] = {}
        self._weights: tuple[FloatArray, float] = (np.zeros(0), 0.0)
        self._pending: list[Frame] = []  # state frames (listings, settlements) to send
        self._forced: list[tuple[int, int]] = []  # (ts_ns, option): first tickers due
        self._seq = 0  # orders the pending frames
        self._rid = 1  # the get_instruments request id
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

    # -- the run ------------------------------------------------------------------------------

    def _run(self) -> Iterator[tuple[int, str]]:
        tl = self.timeline
        self.truth = self._truth_header()
        new = self._list_initial()
        self.counts["instruments"] += 1
        yield tl.t0, instruments_reply(self.chain, self._rid, tl.t0)
        self._burst(tl.t0, new)
        next_truth = tl.t0
        reconnected = tl.gap == NO_WINDOW
        for step in range(tl.n_steps):
            t = tl.t0 + step * tl.step_ns
            frames: list[Frame] = []
            if not reconnected and t >= tl.gap[1]:
                reconnected = True
                frames.append(self._reconnect(tl.gap[1]))
            if t % SECOND_NS == 0:  # settlements, then new expiries (at most once a second)
                self._settle(t)
            if t >= next_truth:
                next_truth += TRUTH_EVERY_MS * NS_PER_MS
                self._sample_and_relist(t)
            if t % SECOND_NS == 0:
                frames.append(self._index(t))
            frames.extend(self._tickers(*self._ticker_events(t)))
            frames.extend(self._pop_pending(t + tl.step_ns))
            frames.sort(key=lambda f: (f[0], f[1]))
            for ts, _, txt in frames:
                if not tl.in_gap(ts):
                    yield ts, txt
            self._advance(t)
        self._sample_truth(tl.end // NS_PER_MS)
        self.truth["expected_drops"] = dict(self.expected_drops())

    def _advance(self, t: int) -> None:
        """Step the market from ``t`` to the next step (the regime shift inside its window)."""
        cfg, tl = self.config, self.timeline
        dt_s = cfg.step_ms / 1000.0
        if not tl.in_shift(t):
            self.market.step(dt_s)
            return
        s0, s1 = tl.shift
        self.market.step(dt_s, cfg.step_ms * 1e6 / (s1 - s0), reverting=False)
        if t + tl.step_ns >= s1:
            self.market.half_life_min = cfg.market.revert_half_life_min

    def _reconnect(self, at_ns: int) -> Frame:
        """A fresh ``get_instruments`` reply, then a ticker of every option soon after."""
        self._rid += 1
        self.counts["instruments"] += 1
        frame = (at_ns, -1, instruments_reply(self.chain, self._rid, at_ns))
        self._burst(at_ns, self.chain.live())
        return frame

    def _index(self, t: int) -> Frame:
        """The index price frame of second ``t`` (a few ms of latency)."""
        lat = int(self.rng.integers(1, 8))
        text = index_frame(self.chain.under.index, round(self.market.spot, 2), t // NS_PER_MS)
        self.counts["index"] += 1
        return (t + lat * NS_PER_MS, 0, text)

    def _push(self, ts_ns: int, text: str) -> None:
        self._seq += 1
        self._pending.append((ts_ns, self._seq, text))

    def _pop_pending(self, until_ns: int) -> list[Frame]:
        out: list[Frame] = []
        while self._pending and self._pending[0][0] < until_ns:
            out.append(self._pending.pop(0))
        return out

    # -- listing and settlement ---------------------------------------------------------------

    def _list_initial(self) -> list[int]:
        """The chain at the start; the options' indices."""
        now_ms = self.config.start_ms
        new: list[int] = []
        for ms in listed_expiries(now_ms):
            new += self._list_expiry(ms, now_ms, initial=True)
        self._weights = self._compute_weights(now_ms)
        return new

    def _list_expiry(self, ms: int, now_ms: int, initial: bool) -> list[int]:
        """Add an expiry and its strike grid; the new options' indices."""
        T = (ms - now_ms) / MS_PER_YEAR
        F, atm = self.market.at(T)
        e = self.chain.add_expiry(ms, F)
        return self._list_strikes(e, strike_grid(F, T, atm), now_ms, initial)

    def _list_strikes(self, e: int, strikes: list[float], now_ms: int, initial: bool) -> list[int]:
        ex = self.chain.expiries[e]
        tenor = {"day": 4, "week": 21, "month": 120}[ex.period] * DAY_MS
        out: list[int] = []
        for K in strikes:
            for is_call in (True, False):
                oi = float(np.round(self.rng.lognormal(3.5, 1.3), 1))
                sizes = np.maximum(rint(self.rng.lognormal(1.6, 1.1, size=2), 1), 0.1).tolist()
                created = min(ex.ms - tenor, now_ms - HOUR_MS) if initial else now_ms
                i = self.chain.add(e, K, is_call, oi, sizes, created)
                if i is not None:
                    out.append(i)
        return out

    def _settle(self, t: int) -> None:
        """Settle the expiries 2 s past their time; list the expiries that follow them."""
        t_ms = t // NS_PER_MS
        for e, ex in enumerate(self.chain.expiries):
            if ex.alive and ex.ms + 2_000 <= t_ms:
                gone = self.chain.kill_expiry(e)
                self.truth["settlements"].append({"expiry": ex.code, "ts_ms": t_ms})
                for j, i in enumerate(gone):
                    ts = t + j * 1_000
                    self._push(ts, self._state_frame(i, "settled", ts))
                    self.counts["state"] += 1
                self._list_new_expiries(t)
                self._weights = self._compute_weights(t_ms)

    def _list_new_expiries(self, t: int) -> None:
        t_ms = t // NS_PER_MS
        listed = {x.ms for x in self.chain.expiries if x.alive}
        for ms in listed_expiries(t_ms):
            if ms not in listed:
                added = self._list_expiry(ms, t_ms, initial=False)
                self._announce(added, t + 500_000_000)
                self._burst(t + 1_600_000_000, added)

    def _sample_and_relist(self, t: int) -> None:
        """A truth sample; strikes around forwards that moved; the new ticker weights."""
        t_ms = t // NS_PER_MS
        self._sample_truth(t_ms)
        added = self._relist(t_ms)
        if added:
            self._announce(added, t + 1_000_000)
            self._burst(t + 1_100_000_000, added)
        self._weights = self._compute_weights(t_ms)

    def _relist(self, now_ms: int) -> list[int]:
        """List strikes around the forward of expiries it moved away from (> 0.5 sd)."""
        added: list[int] = []
        for e, ex in enumerate(self.chain.expiries):
            if not ex.alive or ex.ms - now_ms < HOUR_MS:
                continue
            T = (ex.ms - now_ms) / MS_PER_YEAR
            F, atm = self.market.at(T)
            sd = atm * math.sqrt(max(T, 1.0 / 365.0))
            if abs(math.log(F / ex.center)) > 0.5 * sd:
                ex.center = F
                added += self._list_strikes(e, strike_grid(F, T, atm), now_ms, initial=False)
        return added

    def _announce(self, added: list[int], at_ns: int) -> None:
        """``created`` then (0.5 s later) ``started`` frames for new options."""
        for j, i in enumerate(added):
            self.chain.active_ns[i] = at_ns + 500_000_000 + j * 1_000 + 1
            for state, dt in (("created", 0), ("started", 500_000_000)):
                ts = at_ns + dt + j * 1_000
                self._push(ts, self._state_frame(i, state, ts))
                self.counts["state"] += 1
        self._pending.sort()
        self.truth["listings"].append({"ts_ms": at_ns // 10**6, "instruments": len(added)})

    def _state_frame(self, i: int, state: str, ts_ns: int) -> str:
        return state_frame(self.chain.under.name, self.chain.names[i], state, ts_ns // 10**6)

    # -- ticker frames ------------------------------------------------------------------------

    def _burst(self, at_ns: int, which: list[int]) -> None:
        """A first ticker of each of ``which`` within ``BURST_MS`` after ``at_ns``."""
        offs = self.rng.integers(50_000, BURST_MS * 1000, size=len(which)) * 1000
        self._forced.extend((at_ns + int(o), i) for o, i in zip(offs.tolist(), which, strict=True))
        self._forced.sort()

    def _ticker_events(self, t: int) -> tuple[list[int], list[int]]:
        """(receive times, options) of the tickers of the step at ``t``: the Poisson stream,
        options quiet for too long, and first tickers of new or resubscribed options."""
        probs, poisson_rate = self._weights
        step_ns = self.timeline.step_ns
        n = int(self.rng.poisson(poisson_rate * self.config.step_ms / 1000.0))
        idx = self.rng.choice(len(probs), size=n, p=probs)
        offs = self.rng.integers(0, step_ns // 1000, size=n) * 1000
        ev_t: list[int] = (t + offs).tolist()
        ev_i: list[int] = idx.tolist()
        due = np.asarray(self.chain.next_due, dtype=np.int64)
        for i in np.flatnonzero(due < t + step_ns).tolist():
            ev_t.append(max(int(due[i]), t))
            ev_i.append(i)
        while self._forced and self._forced[0][0] < t + step_ns:
            ft, fi = self._forced.pop(0)
            ev_t.append(max(ft, t))
            ev_i.append(fi)
        return ev_t, ev_i

    def _tickers(self, ev_t: list[int], ev_i: list[int]) -> list[Frame]:
        """Ticker notifications for options ``ev_i`` received at ``ev_t`` (ns), priced off the
        current state (``_conflate`` says which are sent)."""
        keep_t, keep_i = self._conflate(ev_t, ev_i)
        n = len(keep_i)
        if n == 0:
            return []
        rng, chain = self.rng, self.chain
        ts_ms = np.asarray(keep_t, dtype=np.int64) // NS_PER_MS - rng.integers(1, 20, size=n)
        noise = np.clip(rng.standard_normal(n), -3.0, 3.0) * 0.2
        self._schedule_refresh(keep_t, keep_i)
        sizes = self._update_sizes(keep_i)
        K, call, _, exp_ms, syn, _ = chain.arrays()
        idx = np.asarray(keep_i, dtype=np.int64)
        T = (exp_ms[idx] - ts_ms) / MS_PER_YEAR
        q = quote(self.market, K[idx], call[idx], T, syn[idx], noise)
        index = round(self.market.spot, 2)
        payloads = ticker_payloads(chain, keep_i, ts_ms.tolist(), q, sizes, index)
        kinds = self._bad_kinds(n)
        out: list[Frame] = []
        for j, (i, data) in enumerate(zip(keep_i, payloads, strict=True)):
            channel = f"ticker.{chain.names[i]}.100ms"
            if kinds[j]:
                self.injected[kinds[j]] += 1
                text = spoil(kinds[j], channel, data, rng)
            else:
                text = notification(channel, data)
            self.counts["ticker"] += 1
            out.append((keep_t[j], 1, text))
        return out

    def _conflate(self, ev_t: list[int], ev_i: list[int]) -> tuple[list[int], list[int]]:
        """The events sent, in time order: one per option (Deribit's 100 ms channel
        conflates), only of listed and started options, none in an option's last second."""
        chain = self.chain
        exp_of = [x.ms for x in chain.expiries]
        seen: set[int] = set()
        keep_t: list[int] = []
        keep_i: list[int] = []
        for ts, i in sorted(zip(ev_t, ev_i, strict=True)):
            if i in seen or not chain.alive[i] or ts < chain.active_ns[i]:
                continue
            if exp_of[chain.exp_idx[i]] - ts // NS_PER_MS <= 1_100:  # 1 s + the max latency
                continue
            seen.add(i)
            keep_t.append(ts)
            keep_i.append(i)
        return keep_t, keep_i

    def _schedule_refresh(self, keep_t: list[int], keep_i: list[int]) -> None:
        """Each ticked option ticks again within ``QUIET_S`` at the latest."""
        quiet = self.rng.integers(QUIET_S[0] * 1000, QUIET_S[1] * 1000, size=len(keep_i))
        quiet = quiet * 1_000_000
        for j, i in enumerate(keep_i):
            self.chain.next_due[i] = keep_t[j] + int(quiet[j])

    def _update_sizes(self, keep_i: list[int]) -> FloatArray:
        """New best sizes where they change (``SIZE_CHANGE_P``); (bid row, ask row) of all."""
        n = len(keep_i)
        new_sizes = np.maximum(rint(self.rng.lognormal(1.6, 1.1, size=(2, n)), 1), 0.1)
        change = self.rng.random((2, n)) < SIZE_CHANGE_P
        for j, i in enumerate(keep_i):
            held = self.chain.sizes[i]
            for side in (0, 1):
                if change[side, j]:
                    held[side] = float(new_sizes[side, j])
        return np.asarray([self.chain.sizes[i] for i in keep_i], dtype=np.float64).T

    def _bad_kinds(self, n: int) -> list[str]:
        """Per ticker, the bad-data kind it is spoiled with ("" for none)."""
        cfg = self.config
        if cfg.scenario != "bad-data":
            return [""] * n
        spoiled = (self.rng.random(n) < cfg.market.bad_rate).tolist()
        kinds = self.rng.integers(0, len(BAD_KINDS), size=n).tolist()
        return [BAD_KINDS[k] if s else "" for s, k in zip(spoiled, kinds, strict=True)]

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
        return p, _stream_rate(p, self.config.rate)

    # -- ground truth -------------------------------------------------------------------------

    def _truth_header(self) -> dict[str, Any]:
        cfg, tl = self.config, self.timeline
        return {
            "schema": TRUTH_SCHEMA,
            "model": "ssvi",
            "formula": TRUTH_FORMULA,
            "config": dataclasses.asdict(cfg),
            "start_ms": cfg.start_ms,
            "end_ms": tl.end // NS_PER_MS,
            "shift": _window_ms(tl.shift),
            "gap": _window_ms(tl.gap),
            "settlements": [],
            "listings": [],
            "injected": self.injected,
            "expected_drops": {},
            "frames": self.counts,
            "path": [],
        }

    def _sample_truth(self, t_ms: int) -> None:
        m = self.market
        expiries = self.chain.expiries
        rows = [self._truth_slice(ex, t_ms) for ex in expiries if ex.alive and ex.ms > t_ms]
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

    def _truth_slice(self, ex: Expiry, t_ms: int) -> dict[str, Any]:
        """The SSVI slice of expiry ``ex`` at ``t_ms``."""
        m = self.market
        T = (ex.ms - t_ms) / MS_PER_YEAR
        forward, atm = m.at(T)
        return {
            "expiry": ex.code,
            "expiry_ms": ex.ms,
            "T": _sig(T, 9),
            "forward": _sig(forward, 10),
            "atm_iv": _sig(atm, 7),
            "theta": _sig(atm * atm * T, 7),
            "rho": _sig(m.rho, 6),
            "eta": _sig(m.eta, 6),
            "gamma": _sig(m.gamma, 6),
        }


def _stream_rate(p: FloatArray, rate: float) -> float:
    """The Poisson stream's rate ``c`` (option ``i`` ticks at ``c p_i``) that makes the whole
    chain send ``rate`` tickers a second: a Poisson stream of rate lam with a forced tick after
    q quiet seconds is a renewal process with mean interval (1 - exp(-lam q)) / lam; bisection
    on ``c``."""
    q = float(np.mean(QUIET_S))
    live = p[p > 0]
    lo, hi = 0.0, rate
    for _ in range(50):
        lam = np.maximum(0.5 * (lo + hi) * live, 1e-12)
        if float(np.sum(lam / -np.expm1(-lam * q))) > rate:
            hi = 0.5 * (lo + hi)
        else:
            lo = 0.5 * (lo + hi)
    return lo


def _window_ms(window: tuple[int, int]) -> list[int] | None:
    return None if window == NO_WINDOW else [window[0] // 10**6, window[1] // 10**6]


def _sig(x: float, digits: int) -> float:
    """``x`` to ``digits`` significant digits (a compact truth file)."""
    return float(f"{x:.{digits}g}")


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
    start_ms = parse_time(start) if isinstance(start, str) else int(start or 0)
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
