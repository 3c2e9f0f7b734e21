"""What the live page shows, kept from the bus: latest payloads per topic, bounded histories.

Pure and synchronous (no I/O, no clock of its own: receive times are passed in). ``WebState``
takes ``(topic, payload)`` pairs exactly as a bot receives them (``payload`` None: the topic
was cleared) under one topic prefix (DESIGN section 4)::

    {prefix}/{venue}/{underlying}/{model}/surface          streamer.surface/1
    {prefix}/{venue}/{underlying}/{model}/greeks/{expiry}  streamer.greeks/1
    {prefix}/{venue}/{underlying}/{model}/tenors           streamer.tenors/1 (if published)
    {prefix}/status/{instance}                             streamer.status/1

and keeps, per (venue, underlying, model) key, the latest surface, tenors and greeks of each
expiry, plus two ring buffers (``history`` entries each): one row per surface (fit
diagnostics, ATM IV and parameters of every expiry) and one per tenors message (atm, rr25,
bf25 of every tenor, the 30-day index). Rows are stored compactly (numbers in ``array('d')``,
expiry and parameter names shared between consecutive rows) and expanded to JSON only when a
page asks. Anything else under the prefix is ignored; a payload that is not what its topic
promises is counted in ``dropped`` and skipped.

``view(key)`` (``build_view``) is what one page draws for one key: per listed expiry its
smile (the out-of-the-money instrument at each strike with the venue's bid, ask and mark IVs,
their mid and the model's IV), the fitted curve evaluated from the surface's parameters at
``CURVE_POINTS`` strikes (``streamer.client.Surface``: the same numbers a bot gets), the
fit's in-band share and the quality measure of the project's guide (module ``quality``);
the ATM term structure; the tenors. IVs stay fractions; the page shows percent.

Expiries leave the view when their greeks topic is cleared (settled or delisted), when their
greeks say ``T <= 0``, or when their greeks were not refreshed after any of the key's last
three surfaces (a subscriber that missed the clearing message, e.g. one that joined after it,
or retained greeks a daemon of an earlier run left behind).
"""

from __future__ import annotations

import math
from array import array
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

log = structlog.get_logger(__name__)

Key = tuple[str, str, str]  # venue, underlying, model
Payload = Mapping[str, Any]

DEFAULT_HISTORY = 3000
CURVE_POINTS = 161
TWO_HOURS_Y = 2.0 / (365.0 * 24.0)  # the quality measure's shortest maturity
GREEKS_LAG = 2  # surfaces an expiry's greeks may miss before it leaves the view
FIT_FIELDS = ("rmse_iv", "in_band", "elapsed_ms", "n_quotes", "nfev", "penalty")
TENOR_FIELDS = ("atm_iv", "rr25", "bf25", "rr10", "bf10")


def key_name(key: Key) -> str:
    """``deribit/BTC/svi``: how keys travel to the page."""
    return "/".join(key)


def parse_key(name: str) -> Key | None:
    parts = name.split("/")
    if len(parts) != 3 or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


def _num(value: Any) -> float:
    """A finite float or NaN (None, strings, bools and non-finite numbers become NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    f = float(value)
    return f if math.isfinite(f) else math.nan


def _json_num(value: float) -> float | None:
    return value if math.isfinite(value) else None


# -- history rows ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FitRow:
    """One surface in the history: diagnostics, then per expiry ``atm_iv`` and parameters."""

    n: int
    ts_ms: int
    seq: int
    status: str
    warm: bool
    regime_shift: bool
    fit: array[float]  # FIT_FIELDS
    expiries: tuple[str, ...]
    names: tuple[str, ...]  # per-expiry parameter names
    surface_names: tuple[str, ...]  # surface-wide parameter names
    values: array[float]  # per expiry: atm_iv then names; then the surface parameters

    def to_json(self) -> dict[str, Any]:
        width = 1 + len(self.names)
        per: dict[str, Any] = {}
        atm: dict[str, float | None] = {}
        for j, expiry in enumerate(self.expiries):
            base = j * width
            atm[expiry] = _json_num(self.values[base])
            per[expiry] = {
                name: _json_num(self.values[base + 1 + i]) for i, name in enumerate(self.names)
            }
        off = len(self.expiries) * width
        surface = {
            name: _json_num(self.values[off + i]) for i, name in enumerate(self.surface_names)
        }
        out: dict[str, Any] = {
            "n": self.n,
            "ts_ms": self.ts_ms,
            "seq": self.seq,
            "status": self.status,
            "warm": self.warm,
            "regime_shift": self.regime_shift,
            "atm": atm,
            "params": per,
            "surface_params": surface,
        }
        for i, name in enumerate(FIT_FIELDS):
            out[name] = _json_num(self.fit[i])
        return out


@dataclass(frozen=True, slots=True)
class TenorRow:
    """One tenors message in the history."""

    n: int
    ts_ms: int
    seq: int
    days: tuple[int, ...]
    values: array[float]  # per tenor: TENOR_FIELDS
    vol_index_30d: float

    def to_json(self) -> dict[str, Any]:
        width = len(TENOR_FIELDS)
        tenors = {
            str(d): {f: _json_num(self.values[i * width + k]) for k, f in enumerate(TENOR_FIELDS)}
            for i, d in enumerate(self.days)
        }
        return {
            "n": self.n,
            "ts_ms": self.ts_ms,
            "seq": self.seq,
            "vol_index_30d": _json_num(self.vol_index_30d),
            "tenors": tenors,
        }


class _Interner:
    """Shares equal name tuples between rows (most rows repeat the previous row's names)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[Any, ...]] = {}

    def get(self, slot: str, value: tuple[Any, ...]) -> tuple[Any, ...]:
        prev = self._last.get(slot)
        if prev == value:
            return prev
        self._last[slot] = value
        return value


def fit_row(n: int, payload: Payload, interner: _Interner | None = None) -> FitRow:
    """The history row of a ``streamer.surface/1`` payload (KeyError/TypeError if malformed)."""
    intern = interner or _Interner()
    fit = payload.get("fit") or {}
    rows = [e for e in payload["expiries"] if isinstance(e, Mapping)]
    expiries = tuple(str(e["expiry"]) for e in rows)
    names: list[str] = []
    for e in rows:
        for name in e.get("params") or {}:
            if name not in names:
                names.append(name)
    surface_params = payload.get("params") or {}
    surface_names = tuple(str(k) for k in surface_params)
    values = array("d")
    for e in rows:
        params = e.get("params") or {}
        values.append(_num(e.get("atm_iv")))
        values.extend(_num(params.get(name)) for name in names)
    values.extend(_num(surface_params[k]) for k in surface_names)
    return FitRow(
        n=n,
        ts_ms=int(payload["ts_ms"]),
        seq=int(payload.get("seq", 0)),
        status=str(payload.get("status", "ok")),
        warm=bool(fit.get("warm", False)),
        regime_shift=bool(fit.get("regime_shift", False)),
        fit=array("d", (_num(fit.get(f)) for f in FIT_FIELDS)),
        expiries=intern.get("expiries", expiries),
        names=intern.get("names", tuple(names)),
        surface_names=intern.get("surface", surface_names),
        values=values,
    )


def tenor_row(n: int, payload: Payload, interner: _Interner | None = None) -> TenorRow:
    """The history row of a ``streamer.tenors/1`` payload (KeyError/TypeError if malformed)."""
    intern = interner or _Interner()
    entries = [t for t in payload["tenors"] if isinstance(t, Mapping)]
    days = tuple(int(t["days"]) for t in entries)
    values = array("d")
    for t in entries:
        values.extend(_num(t.get(f)) for f in TENOR_FIELDS)
    return TenorRow(
        n=n,
        ts_ms=int(payload["ts_ms"]),
        seq=int(payload.get("seq", 0)),
        days=intern.get("days", days),
        values=values,
        vol_index_30d=_num(payload.get("vol_index_30d")),
    )


# -- per key ------------------------------------------------------------------------------


def live_greeks(
    greeks: Mapping[str, Payload], rounds: Mapping[str, int], current: int
) -> dict[str, Payload]:
    """The greeks of expiries still listed: not at or past expiry (``T <= 0``) and received
    after one of the key's last ``GREEKS_LAG + 1`` surfaces (``rounds``: per expiry, how many
    surfaces of the key had arrived when its greeks did; ``current``: how many have now).
    Arrival order, not ``seq``: a restarted daemon counts its ``seq`` from 1 again."""
    out = {}
    for expiry, g in greeks.items():
        T = _num(g.get("T"))
        if T == T and T <= 0.0:  # noqa: PLR0124
            continue
        if rounds.get(expiry, current) < current - GREEKS_LAG:
            continue
        out[expiry] = g
    return out


@dataclass
class KeyState:
    """Everything kept for one (venue, underlying, model)."""

    key: Key
    history: int
    surface: Payload | None = None
    surface_rx_ms: int = 0  # when the latest surface was received (wall clock)
    tenors: Payload | None = None
    greeks: dict[str, Payload] = field(default_factory=dict)
    fits: deque[FitRow] = field(init=False)
    tenor_rows: deque[TenorRow] = field(init=False)
    version: int = 0
    greeks_round: dict[str, int] = field(default_factory=dict)  # expiry -> surfaces then
    _n_fit: int = 0
    _n_tenor: int = 0
    _interner: _Interner = field(default_factory=_Interner)

    def __post_init__(self) -> None:
        self.fits = deque(maxlen=self.history)
        self.tenor_rows = deque(maxlen=self.history)

    def add_surface(self, payload: Payload, rx_ms: int) -> None:
        row = fit_row(self._n_fit + 1, payload, self._interner)
        self._n_fit += 1
        self.fits.append(row)
        self.surface = payload
        self.surface_rx_ms = rx_ms
        self.version += 1

    def add_tenors(self, payload: Payload) -> None:
        row = tenor_row(self._n_tenor + 1, payload, self._interner)
        self._n_tenor += 1
        self.tenor_rows.append(row)
        self.tenors = payload
        self.version += 1

    def add_greeks(self, expiry: str, payload: Payload | None) -> None:
        if payload is None:
            self.greeks.pop(expiry, None)
        else:
            if not isinstance(payload.get("instruments"), list):
                raise TypeError("greeks payload without an instruments list")
            self.greeks[expiry] = payload
            self.greeks_round[expiry] = self._n_fit
        self.version += 1

    def live_greeks(self) -> dict[str, Payload]:
        """Greeks of the expiries still listed (module docstring), by expiry code."""
        return live_greeks(self.greeks, self.greeks_round, self._n_fit)

    def history_json(self, since_fit: int = 0, since_tenor: int = 0) -> dict[str, Any]:
        """History rows newer than the given row numbers (0: all kept)."""
        return {
            "fits": [r.to_json() for r in self.fits if r.n > since_fit],
            "tenors": [r.to_json() for r in self.tenor_rows if r.n > since_tenor],
            "last_fit": self._n_fit,
            "last_tenor": self._n_tenor,
        }


# -- shards -------------------------------------------------------------------------------


def shard_health(status: Payload) -> str:
    """``offline`` (the status says so), ``stale`` (online, but a feed is not connected), or
    ``online``."""
    if status.get("state") != "online":
        return "offline"
    feeds = status.get("feeds") or {}
    for value in feeds.values() if isinstance(feeds, Mapping) else ():
        state = value.get("state") if isinstance(value, Mapping) else value
        if state != "connected":
            return "stale"
    return "online"


def shard_json(instance: str, status: Payload, rx_ms: int) -> dict[str, Any]:
    return {
        "instance": instance,
        "state": status.get("state"),
        "health": shard_health(status),
        "version": status.get("version"),
        "ts_ms": status.get("ts_ms"),
        "started_ms": status.get("started_ms"),
        "uptime_s": status.get("uptime_s"),
        "feeds": status.get("feeds") or {},
        "brokers": status.get("brokers") or {},
        "reason": status.get("reason"),
        "received_ms": rx_ms,
    }


# -- the state ------------------------------------------------------------------------------


class WebState:
    """Latest payloads and histories of every key under ``prefix`` (module docstring)."""

    def __init__(self, prefix: str = "streamer", *, history: int = DEFAULT_HISTORY) -> None:
        if history < 1:
            raise ValueError("history must be >= 1")
        self.prefix = prefix.strip("/")
        self.history = history
        self.keys: dict[Key, KeyState] = {}
        self.shards: dict[str, tuple[Payload, int]] = {}  # instance -> (status, received ms)
        self.version = 0  # bumped by every accepted message
        self.shards_version = 0
        self.keys_version = 0
        self.messages = 0
        self.dropped: Counter[str] = Counter()

    def ingest(self, topic: str, payload: Payload | None, rx_ms: int) -> bool:
        """Take one message (``payload`` None: the topic was cleared); True if it was used."""
        if not topic.startswith(self.prefix + "/"):
            return False
        parts = topic[len(self.prefix) + 1 :].split("/")
        self.messages += 1
        try:
            used = self._ingest(parts, payload, rx_ms)
        except (KeyError, TypeError, ValueError) as exc:
            self.dropped["malformed"] += 1
            if self.dropped["malformed"] <= 5:
                log.warning("web_payload_dropped", topic=topic, error=repr(exc))
            return False
        if used:
            self.version += 1
        else:
            self.dropped["ignored"] += 1
        return used

    def _ingest(self, parts: list[str], payload: Payload | None, rx_ms: int) -> bool:
        if len(parts) == 2 and parts[0] == "status":
            if payload is None:
                self.shards.pop(parts[1], None)
            else:
                if payload.get("state") not in ("online", "offline"):
                    raise ValueError(f"status state {payload.get('state')!r}")
                self.shards[parts[1]] = (payload, rx_ms)
            self.shards_version += 1
            return True
        if len(parts) not in (4, 5) or not all(parts):
            return False
        key: Key = (parts[0], parts[1], parts[2])
        kind = parts[3]
        if (kind == "greeks") != (len(parts) == 5) or kind not in ("surface", "greeks", "tenors"):
            return False
        ks = self.keys.get(key)
        if ks is None:
            if payload is None:
                return False
            ks = self.keys[key] = KeyState(key, self.history)
            self.keys_version += 1
        if kind == "surface":
            if payload is None:
                ks.surface = None
                ks.version += 1
            else:
                ks.add_surface(payload, rx_ms)
        elif kind == "tenors":
            if payload is None:
                ks.tenors = None
                ks.version += 1
            else:
                ks.add_tenors(payload)
        else:
            ks.add_greeks(parts[4], payload)
        return True

    def key_names(self) -> list[str]:
        return sorted(key_name(k) for k, ks in self.keys.items() if ks.surface or ks.greeks)

    def shards_json(self) -> list[dict[str, Any]]:
        return [shard_json(i, st, rx) for i, (st, rx) in sorted(self.shards.items())]

    def inputs(self, key: Key) -> ViewInputs | None:
        """A consistent copy of what ``build_view`` needs (safe to use off the event loop)."""
        ks = self.keys.get(key)
        if ks is None:
            return None
        return ViewInputs(key, ks.surface, ks.surface_rx_ms, ks.tenors, ks.live_greeks())


# -- the view ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewInputs:
    key: Key
    surface: Payload | None
    surface_rx_ms: int
    tenors: Payload | None
    greeks: Mapping[str, Payload]


def quality(rows: Sequence[Payload], forward: float, T: float) -> dict[str, int]:
    """The guide's quality measure on one expiry's greeks rows: ``n`` instruments with a
    two-sided quote (bid IV > 0, ask IV > bid IV), out of the money against the expiry's
    forward, T >= 2 h; ``model`` of them with the published ``iv`` inside [bid_iv, ask_iv]
    (a null iv is a miss), ``mark`` with Deribit's mark IV inside, scored the same way."""
    n = model_in = mark_in = 0
    if not (T >= TWO_HOURS_Y and forward > 0):
        return {"n": 0, "model": 0, "mark": 0}
    for r in rows:
        bid, ask = _num(r.get("bid_iv")), _num(r.get("ask_iv"))
        if not (bid > 0 and ask > bid):
            continue
        strike = _num(r.get("strike"))
        otm = strike >= forward if r.get("type") == "C" else strike < forward
        if not otm:
            continue
        n += 1
        iv, mark = _num(r.get("iv")), _num(r.get("mark_iv"))
        model_in += bid <= iv <= ask
        mark_in += bid <= mark <= ask
    return {"n": n, "model": model_in, "mark": mark_in}


def otm_points(rows: Iterable[Payload], forward: float) -> dict[str, list[Any]]:
    """One point per strike: the out-of-the-money instrument (puts below the forward, calls at
    and above), with the venue's bid, ask and mark IVs, their mid and the model's IV."""
    chosen: dict[float, Payload] = {}
    for r in rows:
        strike = _num(r.get("strike"))
        if not strike > 0:
            continue
        want = "C" if strike >= forward else "P"
        current = chosen.get(strike)
        if current is None or (current.get("type") != want and r.get("type") == want):
            chosen[strike] = r
    out: dict[str, list[Any]] = {
        k: [] for k in ("strike", "instrument", "type", "bid", "ask", "mid", "mark", "model")
    }
    for strike in sorted(chosen):
        r = chosen[strike]
        bid, ask = _num(r.get("bid_iv")), _num(r.get("ask_iv"))
        mid = 0.5 * (bid + ask) if bid > 0 and ask >= bid else math.nan
        out["strike"].append(strike)
        out["instrument"].append(r.get("instrument"))
        out["type"].append(r.get("type"))
        out["bid"].append(_json_num(bid))
        out["ask"].append(_json_num(ask))
        out["mid"].append(_json_num(mid))
        out["mark"].append(_json_num(_num(r.get("mark_iv"))))
        out["model"].append(_json_num(_num(r.get("iv"))))
    return out


def curve_strikes(strikes: Sequence[float], forward: float, T: float, atm: float) -> np.ndarray:
    """``CURVE_POINTS`` strikes, evenly spaced in log-moneyness over the listed strikes (a
    little beyond), or +-3 standard deviations around the forward without them."""
    ks = np.log(np.asarray([s for s in strikes if s > 0], dtype=np.float64) / forward)
    if ks.size >= 2:
        lo, hi = float(ks.min()), float(ks.max())
        pad = 0.03 * max(hi - lo, 1e-3)
        lo, hi = lo - pad, hi + pad
    else:
        sd = (atm if atm > 0 else 0.6) * math.sqrt(max(T, 1e-4))
        lo, hi = -3.0 * sd, 3.0 * sd
    return np.asarray(forward * np.exp(np.linspace(lo, hi, CURVE_POINTS)), dtype=np.float64)


def _surface_of(payload: Payload | None) -> Any:
    if payload is None:
        return None
    from streamer.client.surface import Surface

    try:
        return Surface.from_payload(payload)
    except Exception as exc:  # an unknown model, a malformed payload: no curves
        log.warning("web_surface_unusable", model=payload.get("model"), error=repr(exc))
        return None


def _curve(surface: Any, expiry: str, in_surface: bool, K: np.ndarray, T: float, F: float) -> Any:
    try:
        if in_surface:
            iv = surface.iv(K, expiry)
        elif T > 0 and F > 0:
            iv = surface.iv_at(K, T, F)
        else:
            return None
    except Exception as exc:
        log.warning("web_curve_failed", expiry=expiry, error=repr(exc))
        return None
    values = [_json_num(float(v)) for v in np.asarray(iv, dtype=np.float64)]
    return {"strike": K.tolist(), "iv": values}


def build_view(inputs: ViewInputs, now_ms: int | None = None) -> dict[str, Any]:
    """Everything one page draws for one key (module docstring); JSON-ready."""
    venue, underlying, model = inputs.key
    surf = inputs.surface
    surface = _surface_of(surf)
    entries = {str(e["expiry"]): e for e in (surf or {}).get("expiries", ()) if "expiry" in e}
    codes = set(entries) | set(inputs.greeks)

    def order(code: str) -> tuple[float, str]:
        e = entries.get(code)
        g = inputs.greeks.get(code)
        T = _num(e.get("T")) if e else math.nan
        if T != T and g is not None:  # noqa: PLR0124
            T = _num(g.get("T"))
        return (T if T == T else math.inf, code)  # noqa: PLR0124

    expiries = []
    for code in sorted(codes, key=order):
        e = entries.get(code) or {}
        g = inputs.greeks.get(code) or {}
        rows = g.get("instruments") or []
        T = _num(g.get("T")) if g else _num(e.get("T"))
        F = _num(g.get("forward")) if g else _num(e.get("forward"))
        if not F > 0:
            F = _num(e.get("forward"))
        atm = _num(e.get("atm_iv"))
        points = otm_points(rows, F) if F > 0 else otm_points((), 1.0)
        curve = None
        if surface is not None and F > 0:
            K = curve_strikes(points["strike"], F, T if T == T else 0.0, atm)  # noqa: PLR0124
            curve = _curve(surface, code, code in entries, K, T, F)
        status = str(g.get("status") or (surf or {}).get("status") or "")
        expiries.append(
            {
                "expiry": code,
                "expiry_ms": e.get("expiry_ms"),
                "T": _json_num(T),
                "days": _json_num(T * 365.0),
                "forward": _json_num(F),
                "status": status,
                "fitted": bool(g["fitted"]) if "fitted" in g else code in entries,
                "in_surface": code in entries,
                "atm_iv": _json_num(atm),
                "fit_in_band": e.get("in_band"),
                "rmse_iv": e.get("rmse_iv"),
                "n_quotes": e.get("n_quotes"),
                "greeks_seq": g.get("seq"),
                "greeks_ts_ms": g.get("ts_ms"),
                "quality": quality(rows, F, T),
                "market": points,
                "curve": curve,
            }
        )
    term: dict[str, list[Any]] = {"expiry": [], "days": [], "atm_iv": []}
    for code, e in sorted(entries.items(), key=lambda kv: order(kv[0])):
        T, atm = _num(e.get("T")), _num(e.get("atm_iv"))
        if T > 0 and atm == atm:  # noqa: PLR0124
            term["expiry"].append(code)
            term["days"].append(T * 365.0)
            term["atm_iv"].append(atm)
    head = None
    if surf is not None:
        head = {
            "ts_ms": surf.get("ts_ms"),
            "seq": surf.get("seq"),
            "status": surf.get("status"),
            "fit": surf.get("fit"),
            "params": surf.get("params"),
            "received_ms": inputs.surface_rx_ms,
            "age_s": (now_ms - inputs.surface_rx_ms) / 1e3 if now_ms else None,
        }
    return {
        "key": key_name(inputs.key),
        "venue": venue,
        "underlying": underlying,
        "model": model,
        "surface": head,
        "expiries": expiries,
        "term": term,
        "tenors": inputs.tenors,
    }
