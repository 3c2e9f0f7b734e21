"""Issue 13's measure: what a bot sees, scored against the market's bid-ask IV band.

For one chain snapshot, the *scored* instruments are every instrument with a two-sided quote
(bid IV > 0, ask IV > bid IV: Deribit's own IVs where the data carries them, else implied
from the bid and ask prices against the instrument's forward), out of the money against its
expiry's forward (calls above it, puts below), and at least ``MIN_T_MS`` (2 hours) from expiry.
A method's IV for an instrument (``published``: one entry per snapshot instrument, NaN where it
publishes none) is *in band* when ``bid_iv <= iv <= ask_iv``; a missing or NaN IV is a miss.

``retained_ivs`` reads the daemon's output the way a bot does: the ``iv`` of the last greeks
message of each expiry (a cleared topic removes it), looked up per instrument.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from streamer.book.snapshot import ChainSnapshot
from streamer.pricing import implied_vol

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
MIN_T_MS = 2 * 3_600_000  # T >= 2 hours


@dataclass(frozen=True)
class Scored:
    """The scored instruments of one snapshot: positions in it and their market."""

    index: npt.NDArray[np.int64]  # positions in the snapshot
    bid_iv: FloatArray
    ask_iv: FloatArray
    mark_iv: FloatArray
    k: FloatArray  # ln(K / F) against the expiry's forward
    T: FloatArray  # years to expiry
    expiry_idx: npt.NDArray[np.int64]

    @property
    def mid_iv(self) -> FloatArray:
        return np.asarray(0.5 * (self.bid_iv + self.ask_iv))

    @property
    def n(self) -> int:
        return int(self.index.shape[0])


def market_ivs(snap: ChainSnapshot) -> tuple[FloatArray, FloatArray]:
    """Bid and ask IVs per instrument: the venue's where it sent them (> 0), else implied
    from the prices (coin prices times the forward on inverse venues)."""
    n = snap.n_quotes
    F_exp = snap.forwards[snap.expiry_idx] if n else np.zeros(0)
    F = np.where(np.isfinite(snap.forward) & (snap.forward > 0), snap.forward, F_exp)
    unit = F if snap.inverse else np.ones(n)
    out = []
    for venue_iv, px in ((snap.bid_iv, snap.bid), (snap.ask_iv, snap.ask)):
        usd = px * unit
        with np.errstate(invalid="ignore", divide="ignore"):
            mine = np.asarray(
                implied_vol(usd, F, snap.strike, snap.T, snap.is_call), dtype=np.float64
            )
        mine = np.where(np.isfinite(usd) & (usd > 0), mine, np.nan)
        out.append(np.where(np.isfinite(venue_iv) & (venue_iv > 0), venue_iv, mine))
    return out[0], out[1]


def scored(snap: ChainSnapshot) -> Scored:
    """The instruments of ``snap`` the measure scores (module docstring)."""
    bid, ask = market_ivs(snap)
    F = snap.forwards[snap.expiry_idx] if snap.n_quotes else np.zeros(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = np.log(snap.strike / F)
        two_sided = (bid > 0) & (ask > bid)
        otm = np.where(snap.is_call, snap.strike > F, snap.strike < F) & np.isfinite(k)
    left_ms = snap.expiry_ms[snap.expiry_idx] - snap.ts_ms if snap.n_quotes else np.zeros(0)
    keep = two_sided & otm & (left_ms >= MIN_T_MS)
    idx = np.flatnonzero(keep).astype(np.int64)
    return Scored(
        index=idx,
        bid_iv=bid[idx],
        ask_iv=ask[idx],
        mark_iv=np.asarray(snap.mark_iv[idx], dtype=np.float64),
        k=np.asarray(k[idx], dtype=np.float64),
        T=np.asarray(left_ms[idx] / (365.0 * 86_400_000.0), dtype=np.float64),
        expiry_idx=snap.expiry_idx[idx].astype(np.int64),
    )


@dataclass
class Tally:
    """Pooled scores of one method over many snapshots."""

    scored: int = 0
    inside: int = 0
    missing: int = 0
    diffs: list[FloatArray] = field(default_factory=list)  # |iv - mark| in vol points

    def add(self, s: Scored, iv: FloatArray) -> BoolArray:
        """Score the IVs ``iv`` (one per scored instrument, NaN = none published); returns
        the in-band mask."""
        ok = np.isfinite(iv)
        inside = ok & (iv >= s.bid_iv) & (iv <= s.ask_iv)
        self.scored += s.n
        self.inside += int(inside.sum())
        self.missing += int((~ok).sum())
        d = np.abs(iv - s.mark_iv) * 100.0
        self.diffs.append(d[np.isfinite(d)])
        return np.asarray(inside)

    @property
    def share(self) -> float:
        return self.inside / self.scored if self.scored else math.nan

    def pct(self, q: float) -> float:
        pooled = np.concatenate(self.diffs) if self.diffs else np.zeros(0)
        return float(np.percentile(pooled, q)) if pooled.size else math.nan

    def merge(self, other: Tally) -> None:
        self.scored += other.scored
        self.inside += other.inside
        self.missing += other.missing
        self.diffs.extend(other.diffs)


class Retained:
    """The greeks topics a subscriber holds: the last message per expiry topic."""

    def __init__(self) -> None:
        self.by_topic: dict[str, dict[str, Any]] = {}

    def update(self, messages: Iterable[Any]) -> None:
        """Apply published messages (``Message``: topic, payload, clear); only greeks topics."""
        for msg in messages:
            if "/greeks/" not in msg.topic:
                continue
            if msg.clear:
                self.by_topic.pop(msg.topic, None)
            else:
                self.by_topic[msg.topic] = msg.payload

    def ivs(self) -> dict[str, float]:
        """Instrument name -> published ``iv`` (NaN for a null iv)."""
        return retained_ivs(self.by_topic.values())

    def expiries(self) -> list[Mapping[str, Any]]:
        return list(self.by_topic.values())


def retained_ivs(payloads: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Instrument name -> ``iv`` over greeks payloads (None becomes NaN)."""
    out: dict[str, float] = {}
    for p in payloads:
        for row in p.get("instruments", ()):
            v = row.get("iv")
            out[str(row["instrument"])] = math.nan if v is None else float(v)
    return out


def lookup(snap: ChainSnapshot, ivs: Mapping[str, float]) -> FloatArray:
    """Per snapshot instrument, its IV in ``ivs`` (NaN when absent)."""
    return np.array([ivs.get(name, math.nan) for name in snap.instrument], dtype=np.float64)
