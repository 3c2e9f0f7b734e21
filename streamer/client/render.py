"""Published payloads as short human-readable text (``streamer subscribe``'s view).

Surface payloads (``streamer.surface/1``) render as a compact table per expiry (expiry, T,
forward, ATM IV in %, RMSE in IV points, share of quotes in the bid-ask band, parameters);
greeks payloads (``streamer.greeks/1``) as a short summary, tenors payloads
(``streamer.tenors/1``) as a table of ATM IV, 25- and 10-delta risk reversals and
butterflies per tenor (vol points) under the 30-day vol index, status as one line; any other
payload as JSON. Pure functions of the payload.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any


def _f(value: Any, fmt: str, scale: float = 1.0, suffix: str = "") -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    if not math.isfinite(value):
        return "-"
    return f"{value * scale:{fmt}}{suffix}"


def _when(ts_ms: Any) -> str:
    if not isinstance(ts_ms, int):
        return "-"
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _params(params: Any) -> str:
    if not isinstance(params, dict):
        return ""
    return " ".join(f"{k}={_f(v, '.4g')}" for k, v in params.items())


def _table(headers: list[str], rows: list[list[str]], out: list[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    last = len(headers) - 1
    for cells in [headers, *rows]:
        parts = [
            c.ljust(w) if i in (0, last) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        out.append("  ".join(parts).rstrip())


def render_surface(topic: str, p: dict[str, Any]) -> str:
    fit = p.get("fit") or {}
    lines = [
        f"{topic}  seq {p.get('seq')}  {p.get('status')}  {_when(p.get('ts_ms'))} UTC",
        f"  fit: rmse {_f(fit.get('rmse_iv'), '.2f', 100, '%')}"
        f"  in_band {_f(fit.get('in_band'), '.0f', 100, '%')}"
        f"  quotes {fit.get('n_quotes', '-')}  nfev {fit.get('nfev', '-')}"
        f"  {_f(fit.get('elapsed_ms'), '.1f', 1, ' ms')}"
        f"  {'warm' if fit.get('warm') else 'cold'}"
        f"{'  REGIME SHIFT' if fit.get('regime_shift') else ''}"
        f"  penalty {_f(fit.get('penalty'), '.3g')}",
    ]
    if p.get("params"):
        lines.append(f"  params: {_params(p.get('params'))}")
    rows = [
        [
            str(e.get("expiry", "-")),
            _f(e.get("T"), ".4f"),
            _f(e.get("forward"), ",.2f"),
            _f(e.get("atm_iv"), ".2f", 100, "%"),
            _f(e.get("rmse_iv"), ".2f", 100, "%"),
            _f(e.get("in_band"), ".0f", 100, "%"),
            _params(e.get("params")),
        ]
        for e in p.get("expiries") or []
        if isinstance(e, dict)
    ]
    if rows:
        table: list[str] = []
        _table(["expiry", "T", "forward", "atm_iv", "rmse", "in_band", "params"], rows, table)
        lines.extend("  " + t for t in table)
    return "\n".join(lines)


def render_greeks(topic: str, p: dict[str, Any]) -> str:
    rows = [r for r in p.get("instruments") or [] if isinstance(r, dict)]
    ivs = sorted(r["iv"] for r in rows if isinstance(r.get("iv"), int | float))
    calls = sum(1 for r in rows if r.get("type") == "C")
    line = (
        f"{topic}  seq {p.get('seq')}  {_when(p.get('ts_ms'))} UTC  expiry {p.get('expiry')}"
        f"  T {_f(p.get('T'), '.4f')}  forward {_f(p.get('forward'), ',.2f')}"
        f"  {len(rows)} instruments ({calls} C, {len(rows) - calls} P)"
    )
    if ivs:
        line += (
            f"  iv {_f(ivs[0], '.1f', 100, '%')} .. {_f(ivs[len(ivs) // 2], '.1f', 100, '%')}"
            f" .. {_f(ivs[-1], '.1f', 100, '%')}"
        )
    forward = p.get("forward")
    if rows and isinstance(forward, int | float):
        atm = min(rows, key=lambda r: abs(float(r.get("strike") or 0.0) - forward))
        line += (
            f"\n  ATM {atm.get('instrument')}: iv {_f(atm.get('iv'), '.2f', 100, '%')}"
            f" delta {_f(atm.get('delta'), '.3f')} gamma {_f(atm.get('gamma'), '.3g')}"
            f" vega {_f(atm.get('vega'), '.2f')} theta {_f(atm.get('theta'), '.2f')}"
            f" bid/ask iv {_f(atm.get('bid_iv'), '.2f', 100, '%')}"
            f"/{_f(atm.get('ask_iv'), '.2f', 100, '%')}"
        )
    return line


def render_tenors(topic: str, p: dict[str, Any]) -> str:
    lines = [
        f"{topic}  seq {p.get('seq')}  {p.get('status')}  {_when(p.get('ts_ms'))} UTC"
        f"  vol index 30d {_f(p.get('vol_index_30d'), '.2f', 100, '%')}"
    ]
    rows = [
        [
            f"{t.get('days', '-')}d",
            _f(t.get("T"), ".4f"),
            _f(t.get("forward"), ",.2f"),
            _f(t.get("atm_iv"), ".2f", 100, "%"),
            _f(t.get("rr25"), "+.2f", 100),
            _f(t.get("bf25"), "+.2f", 100),
            _f(t.get("rr10"), "+.2f", 100),
            _f(t.get("bf10"), "+.2f", 100),
        ]
        for t in p.get("tenors") or []
        if isinstance(t, dict)
    ]
    if rows:
        table: list[str] = []
        headers = ["tenor", "T", "forward", "atm_iv", "rr25", "bf25", "rr10", "bf10"]
        # an empty last column: every number right-aligned (_table left-aligns the last)
        _table([*headers, ""], [[*r, ""] for r in rows], table)
        lines.extend("  " + t for t in table)
    return "\n".join(lines)


def render_status(topic: str, p: dict[str, Any]) -> str:
    import orjson

    line = f"{topic}  {str(p.get('state', '?')).upper()}  v{p.get('version')}"
    line += f"  up {_f(p.get('uptime_s'), ',.1f', 1, ' s')}  at {_when(p.get('ts_ms'))} UTC"
    if p.get("reason"):
        line += f"  ({p['reason']})"
    if p.get("feeds"):
        line += "  feeds " + orjson.dumps(p["feeds"]).decode()
    return line


def render(topic: str, payload: dict[str, Any]) -> str:
    """The human view of one message."""
    import orjson

    schema = payload.get("schema")
    try:
        if schema == "streamer.surface/1":
            return render_surface(topic, payload)
        if schema == "streamer.greeks/1":
            return render_greeks(topic, payload)
        if schema == "streamer.tenors/1":
            return render_tenors(topic, payload)
        if schema == "streamer.status/1":
            return render_status(topic, payload)
    except (TypeError, ValueError, KeyError):  # malformed: fall back to the JSON
        pass
    return f"{topic}  " + orjson.dumps(payload).decode()
