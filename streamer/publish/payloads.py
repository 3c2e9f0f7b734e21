"""Topics and payloads of the wire contract (DESIGN section 4), as small typed builders.

Topics::

    {prefix}/{venue}/{underlying}/{model}/surface           topic_surface(...)
    {prefix}/{venue}/{underlying}/{model}/greeks/{expiry}   topic_greeks(...)
    {prefix}/{venue}/{underlying}/{model}/tenors            topic_tenors(...)
    {prefix}/status/{instance}                              topic_status(...)

Payloads ``streamer.surface/1`` and ``streamer.greeks/1`` are built by ``surface_payload`` and
``greeks_payload`` from plain values; ``fit_info``, ``expiry_entry``, ``greeks_row`` and
``greeks_rows`` (columns as numpy arrays, the fast path) build their parts;
``streamer.tenors/1`` (constant-maturity ATM, risk reversals, butterflies and the 30-day vol
index) by ``tenors_payload`` and ``tenor_entry``. Builders check
what the schema cannot express cheaply and name the bad argument (``InputError``); numbers are
made plain ``float``/``int`` and any non-finite value becomes ``None`` (JSON ``null``).
The JSON Schemas ship as ``streamer/schemas/{surface,greeks,tenors,status}.json``
(``load_schema``).
Implied vols are fractions everywhere (0.62, not 62).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any, Literal, NotRequired, TypedDict

import numpy as np
import numpy.typing as npt

from streamer.errors import InputError

SURFACE_SCHEMA = "streamer.surface/1"
GREEKS_SCHEMA = "streamer.greeks/1"
STATUS_SCHEMA = "streamer.status/1"
TENORS_SCHEMA = "streamer.tenors/1"
STATUSES = ("ok", "degraded", "stale")

Status = Literal["ok", "degraded", "stale"]
OptionType = Literal["C", "P"]
ArrayLike = npt.ArrayLike


class FitInfo(TypedDict):
    rmse_iv: float | None
    in_band: float | None
    n_quotes: int
    nfev: int
    elapsed_ms: float
    warm: bool
    regime_shift: bool
    penalty: float | None


class ExpiryEntry(TypedDict):
    expiry: str
    expiry_ms: int
    T: float | None
    forward: float | None
    atm_iv: float | None
    params: dict[str, float | None]
    rmse_iv: float | None
    in_band: float | None
    n_quotes: int


class SurfacePayload(TypedDict):
    schema: str
    venue: str
    underlying: str
    model: str
    ts_ms: int
    seq: int
    status: Status
    fit: FitInfo
    params: dict[str, float | None]
    expiries: list[ExpiryEntry]
    reason: NotRequired[str]  # degraded: why the latest fit was not accepted


class GreeksRow(TypedDict):
    instrument: str
    strike: float
    type: OptionType
    iv: float | None
    price_coin: float | None
    price_usd: float | None
    delta: float | None
    delta_premium_adj: float | None
    gamma: float | None
    vega: float | None
    theta: float | None
    vanna: float | None
    volga: float | None
    bid_iv: float | None
    ask_iv: float | None
    mark_iv: float | None


class GreeksPayload(TypedDict):
    schema: str
    ts_ms: int
    seq: int
    status: Status
    expiry: str
    forward: float | None
    T: float | None
    fitted: bool
    instruments: list[GreeksRow]


class TenorEntry(TypedDict):
    days: int
    T: float
    forward: float | None
    atm_iv: float | None
    rr25: float | None
    bf25: float | None
    rr10: float | None
    bf10: float | None


class TenorsPayload(TypedDict):
    schema: str
    ts_ms: int
    seq: int
    status: Status
    vol_index_30d: float | None
    tenors: list[TenorEntry]


GREEKS_COLUMNS = (
    "iv",
    "price_coin",
    "price_usd",
    "delta",
    "delta_premium_adj",
    "gamma",
    "vega",
    "theta",
    "vanna",
    "volga",
    "bid_iv",
    "ask_iv",
    "mark_iv",
)

# -- topics ------------------------------------------------------------------------------


def _segment(name: str, value: str) -> str:
    if not value or any(c in value for c in "/+#\x00"):
        raise InputError(name, f"must be a non-empty topic level without / + #: {value!r}")
    return value


def _prefix(prefix: str) -> str:
    if not prefix or any(c in prefix for c in "+#\x00") or "//" in prefix:
        raise InputError("prefix", f"not a valid topic prefix: {prefix!r}")
    return prefix.strip("/")


def topic_surface(prefix: str, venue: str, underlying: str, model: str) -> str:
    """``{prefix}/{venue}/{underlying}/{model}/surface``."""
    return "/".join(
        (
            _prefix(prefix),
            _segment("venue", venue),
            _segment("underlying", underlying),
            _segment("model", model),
            "surface",
        )
    )


def topic_greeks(prefix: str, venue: str, underlying: str, model: str, expiry: str) -> str:
    """``{prefix}/{venue}/{underlying}/{model}/greeks/{expiry}``."""
    return "/".join(
        (
            _prefix(prefix),
            _segment("venue", venue),
            _segment("underlying", underlying),
            _segment("model", model),
            "greeks",
            _segment("expiry", expiry),
        )
    )


def topic_tenors(prefix: str, venue: str, underlying: str, model: str) -> str:
    """``{prefix}/{venue}/{underlying}/{model}/tenors``."""
    return "/".join(
        (
            _prefix(prefix),
            _segment("venue", venue),
            _segment("underlying", underlying),
            _segment("model", model),
            "tenors",
        )
    )


def topic_status(prefix: str, instance: str) -> str:
    """``{prefix}/status/{instance}``."""
    return f"{_prefix(prefix)}/status/{_segment('instance', instance)}"


def retopic(topic: str, old_prefix: str, new_prefix: str) -> str:
    """``topic`` under a publisher's own prefix (an MQTT URL may carry one: ``.../prefix``)."""
    old, new = old_prefix.strip("/"), new_prefix.strip("/")
    if old == new or not topic.startswith(old + "/"):
        return topic
    return new + topic[len(old) :]


# -- values ------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A finite float, or None for None / NaN / inf."""
    if value is None:
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise InputError(name, f"must be a non-negative integer, got {value!r}")
    return int(value)


def _params(name: str, params: Mapping[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, value in params.items():
        if not isinstance(key, str) or not key:
            raise InputError(name, f"parameter names must be non-empty strings, got {key!r}")
        out[key] = _num(value)
    return out


def fit_info(
    *,
    rmse_iv: float | None,
    in_band: float | None,
    n_quotes: int,
    nfev: int,
    elapsed_ms: float,
    warm: bool,
    regime_shift: bool,
    penalty: float | None,
) -> FitInfo:
    """The ``fit`` block: rmse_iv (IV fraction), in_band (share of quotes within bid-ask)."""
    band = _num(in_band)
    if band is not None and not 0.0 <= band <= 1.0:
        raise InputError("in_band", f"must be a share in [0, 1], got {in_band!r}")
    elapsed = _num(elapsed_ms)
    return {
        "rmse_iv": _num(rmse_iv),
        "in_band": band,
        "n_quotes": _count("n_quotes", n_quotes),
        "nfev": _count("nfev", nfev),
        "elapsed_ms": elapsed if elapsed is not None else 0.0,
        "warm": bool(warm),
        "regime_shift": bool(regime_shift),
        "penalty": _num(penalty),
    }


def expiry_entry(
    *,
    expiry: str,
    expiry_ms: int,
    T: float | None,
    forward: float | None,
    atm_iv: float | None,
    params: Mapping[str, Any],
    rmse_iv: float | None,
    in_band: float | None,
    n_quotes: int,
) -> ExpiryEntry:
    """One element of the surface's ``expiries`` list (``expiry`` is the venue code)."""
    band = _num(in_band)
    if band is not None and not 0.0 <= band <= 1.0:
        raise InputError("in_band", f"must be a share in [0, 1], got {in_band!r}")
    return {
        "expiry": _segment("expiry", expiry),
        "expiry_ms": _count("expiry_ms", expiry_ms),
        "T": _num(T),
        "forward": _num(forward),
        "atm_iv": _num(atm_iv),
        "params": _params("params", params),
        "rmse_iv": _num(rmse_iv),
        "in_band": band,
        "n_quotes": _count("n_quotes", n_quotes),
    }


def surface_payload(
    *,
    venue: str,
    underlying: str,
    model: str,
    ts_ms: int,
    seq: int,
    status: Status,
    fit: FitInfo | Mapping[str, Any],
    params: Mapping[str, Any],
    expiries: Iterable[ExpiryEntry | Mapping[str, Any]],
    reason: str = "",
) -> SurfacePayload:
    """A ``streamer.surface/1`` payload. ``fit`` and ``expiries`` items are passed through
    ``fit_info`` / ``expiry_entry`` (so plain dicts with those keys work too). ``reason``
    (degraded: why the latest fit was not accepted) is included when not empty."""
    if status not in STATUSES:
        raise InputError("status", f"must be one of {', '.join(STATUSES)}, got {status!r}")
    try:
        fit_block = fit_info(**fit)
        entries = [expiry_entry(**e) for e in expiries]
    except TypeError as exc:  # a missing or unknown key
        raise InputError("fit/expiries", str(exc)) from exc
    out: SurfacePayload = {
        "schema": SURFACE_SCHEMA,
        "venue": _segment("venue", venue),
        "underlying": _segment("underlying", underlying),
        "model": _segment("model", model),
        "ts_ms": _count("ts_ms", ts_ms),
        "seq": _count("seq", seq),
        "status": status,
        "fit": fit_block,
        "params": _params("params", params),
        "expiries": entries,
    }
    if reason:
        out["reason"] = reason
    return out


def greeks_row(
    *,
    instrument: str,
    strike: float,
    type: OptionType,  # the wire name (shadows the builtin inside this function only)
    iv: float | None,
    price_coin: float | None,
    price_usd: float | None,
    delta: float | None,
    delta_premium_adj: float | None,
    gamma: float | None,
    vega: float | None,
    theta: float | None,
    vanna: float | None,
    volga: float | None,
    bid_iv: float | None,
    ask_iv: float | None,
    mark_iv: float | None = None,
) -> GreeksRow:
    """One instrument of the greeks payload (Deribit units, see ``schemas/greeks.json``)."""
    if type not in ("C", "P"):
        raise InputError("type", f"must be 'C' or 'P', got {type!r}")
    k = _num(strike)
    if k is None or k <= 0:
        raise InputError("strike", f"must be a positive number, got {strike!r}")
    if not instrument:
        raise InputError("instrument", "must be a non-empty name")
    return {
        "instrument": instrument,
        "strike": k,
        "type": type,
        "iv": _num(iv),
        "price_coin": _num(price_coin),
        "price_usd": _num(price_usd),
        "delta": _num(delta),
        "delta_premium_adj": _num(delta_premium_adj),
        "gamma": _num(gamma),
        "vega": _num(vega),
        "theta": _num(theta),
        "vanna": _num(vanna),
        "volga": _num(volga),
        "bid_iv": _num(bid_iv),
        "ask_iv": _num(ask_iv),
        "mark_iv": _num(mark_iv),
    }


def _column(name: str, values: ArrayLike, n: int) -> list[float | None]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n,):
        raise InputError(name, f"must have shape ({n},), got {arr.shape}")
    finite = np.isfinite(arr)
    if finite.all():
        out: list[float | None] = arr.tolist()
        return out
    obj = arr.astype(object)
    obj[~finite] = None
    holes: list[float | None] = obj.tolist()
    return holes


class CheckedRows(list):  # type: ignore[type-arg]
    """Rows ``greeks_rows`` built and checked: ``greeks_payload`` takes them as they are."""


_ROW_KEYS = ("instrument", "strike", "type", *GREEKS_COLUMNS)


def greeks_rows(
    *,
    instruments: Sequence[str],
    strikes: ArrayLike,
    is_call: ArrayLike,
    **columns: ArrayLike,
) -> list[GreeksRow]:
    """Rows from columns (numpy arrays of equal length): the fast path for whole expiries.

    ``columns`` must be exactly ``GREEKS_COLUMNS`` (iv, price_coin, ..., ask_iv, mark_iv);
    non-finite entries become None. Every check of ``greeks_row`` is made here on whole
    columns, so the result (a ``CheckedRows``) goes into ``greeks_payload`` unchecked again.
    """
    n = len(instruments)
    missing = set(GREEKS_COLUMNS) - set(columns)
    extra = set(columns) - set(GREEKS_COLUMNS)
    if missing or extra:
        raise InputError(
            "columns",
            f"need exactly {', '.join(GREEKS_COLUMNS)}; missing {sorted(missing)}, "
            f"unknown {sorted(extra)}",
        )
    k = np.asarray(strikes, dtype=np.float64)
    calls = np.asarray(is_call, dtype=bool)
    if k.shape != (n,) or calls.shape != (n,):
        raise InputError("strikes/is_call", f"must have shape ({n},)")
    if not (np.isfinite(k).all() and (k > 0).all()):
        raise InputError("strikes", "must be positive and finite")
    names = list(instruments)
    if not all(isinstance(name, str) and name for name in names):
        raise InputError("instrument", "must be a non-empty name")
    cols = [_column(name, columns[name], n) for name in GREEKS_COLUMNS]
    types = np.where(calls, "C", "P").tolist()
    keys = _ROW_KEYS
    return CheckedRows(
        dict(zip(keys, row, strict=True))
        for row in zip(names, k.tolist(), types, *cols, strict=True)
    )


def greeks_payload(
    *,
    ts_ms: int,
    seq: int,
    expiry: str,
    forward: float | None,
    T: float | None,
    instruments: Iterable[GreeksRow | Mapping[str, Any]],
    status: Status = "ok",
    fitted: bool = True,
) -> GreeksPayload:
    """A ``streamer.greeks/1`` payload; each ``instruments`` item is checked by ``greeks_row``
    (so ``greeks_rows`` output and plain dicts with those keys both work). ``status`` is the
    surface's; ``fitted`` False: the expiry was not fitted, its IVs come from the surface
    around it."""
    if status not in STATUSES:
        raise InputError("status", f"must be one of {', '.join(STATUSES)}, got {status!r}")
    rows: list[GreeksRow] = []
    if type(instruments) is CheckedRows:
        rows.extend(instruments)
    else:
        try:
            for item in instruments:
                rows.append(greeks_row(**item))
        except TypeError as exc:
            raise InputError("instruments", str(exc)) from exc
    return {
        "schema": GREEKS_SCHEMA,
        "ts_ms": _count("ts_ms", ts_ms),
        "seq": _count("seq", seq),
        "status": status,
        "expiry": _segment("expiry", expiry),
        "forward": _num(forward),
        "T": _num(T),
        "fitted": bool(fitted),
        "instruments": rows,
    }


def _iv(name: str, value: Any) -> float | None:
    """An implied vol (fraction), or None; negative or >= 10 (a percent mistake) is refused."""
    v = _num(value)
    if v is not None and not 0.0 <= v < 10.0:
        raise InputError(name, f"must be an implied vol as a fraction in [0, 10), got {value!r}")
    return v


def _skew(name: str, value: Any) -> float | None:
    """A difference of implied vols (fractions), or None; |value| >= 10 is refused."""
    v = _num(value)
    if v is not None and not abs(v) < 10.0:
        raise InputError(name, f"must be a vol difference as a fraction, got {value!r}")
    return v


def tenor_entry(
    *,
    days: int,
    T: float,
    forward: float | None,
    atm_iv: float | None,
    rr25: float | None,
    bf25: float | None,
    rr10: float | None,
    bf10: float | None,
) -> TenorEntry:
    """One constant maturity of the tenors payload: ``days`` (whole days), ``T = days/365``;
    IVs and their differences as fractions, None outside the fitted range."""
    if isinstance(days, bool) or not isinstance(days, int | np.integer) or days < 1:
        raise InputError("days", f"must be a positive whole number of days, got {days!r}")
    t = _num(T)
    if t is None or t <= 0.0:
        raise InputError("T", f"must be a positive number of years, got {T!r}")
    fwd = _num(forward)
    if fwd is not None and fwd <= 0.0:
        raise InputError("forward", f"must be positive, got {forward!r}")
    return {
        "days": int(days),
        "T": t,
        "forward": fwd,
        "atm_iv": _iv("atm_iv", atm_iv),
        "rr25": _skew("rr25", rr25),
        "bf25": _skew("bf25", bf25),
        "rr10": _skew("rr10", rr10),
        "bf10": _skew("bf10", bf10),
    }


def tenors_payload(
    *,
    ts_ms: int,
    seq: int,
    status: Status,
    vol_index_30d: float | None,
    tenors: Iterable[TenorEntry | Mapping[str, Any]],
) -> TenorsPayload:
    """A ``streamer.tenors/1`` payload (``seq`` and ``status`` are the surface's); each
    ``tenors`` item goes through ``tenor_entry`` (``Tenor.as_dict()`` output works)."""
    if status not in STATUSES:
        raise InputError("status", f"must be one of {', '.join(STATUSES)}, got {status!r}")
    try:
        entries = [tenor_entry(**t) for t in tenors]
    except TypeError as exc:  # a missing or unknown key
        raise InputError("tenors", str(exc)) from exc
    return {
        "schema": TENORS_SCHEMA,
        "ts_ms": _count("ts_ms", ts_ms),
        "seq": _count("seq", seq),
        "status": status,
        "vol_index_30d": _iv("vol_index_30d", vol_index_30d),
        "tenors": entries,
    }


def load_schema(name: Literal["surface", "greeks", "tenors", "status"]) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) shipped for payload ``name``."""
    text = resources.files("streamer").joinpath("schemas", f"{name}.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
