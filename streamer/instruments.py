"""Deribit instrument names (DESIGN section 2): ``BTC-27DEC24-100000-C``.

Days are not zero-padded (``BTC-7FEB25-...``), linear USDC options use ``d`` as the decimal
point (``XRP_USDC-24JAN25-0d625-C``), expiries settle at 08:00 UTC. Combos (``-CS-``,
``-STRD-``, ...), futures and perpetuals are not single options: ``parse_option`` returns None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
MONTH_INDEX = {m: i + 1 for i, m in enumerate(MONTHS)}
SETTLEMENT_HOUR_UTC = 8
MS_PER_YEAR = 365 * 86_400_000
STABLECOINS = frozenset({"USDC", "USDT"})

_OPTION = re.compile(
    r"^(?P<under>[A-Z0-9]+(?:_[A-Z]+)?)-(?P<day>\d{1,2})(?P<mon>[A-Z]{3})(?P<yy>\d{2})"
    r"-(?P<strike>\d+(?:d\d+)?)-(?P<cp>[CP])$"
)


@dataclass(frozen=True, slots=True)
class OptionName:
    """What a Deribit option name says."""

    name: str
    underlying: str  # "BTC", "XRP_USDC"
    expiry: str  # venue code, "27DEC24"
    expiry_ms: int  # settlement time, 08:00 UTC, ms since the epoch
    strike: float
    is_call: bool


@lru_cache(maxsize=1024)
def expiry_ms_of(code: str) -> int:
    """``27DEC24`` -> ms since the epoch of 2024-12-27 08:00 UTC. Raises ValueError."""
    m = re.fullmatch(r"(\d{1,2})([A-Z]{3})(\d{2})", code)
    if m is None or m.group(2) not in MONTH_INDEX:
        raise ValueError(f"not an expiry code: {code!r}")
    dt = datetime(
        2000 + int(m.group(3)),
        MONTH_INDEX[m.group(2)],
        int(m.group(1)),
        SETTLEMENT_HOUR_UTC,
        tzinfo=UTC,
    )
    return int(dt.timestamp() * 1000)


def expiry_code_of(expiry_ms: int) -> str:
    """Inverse of ``expiry_ms_of``: ms since the epoch -> ``7FEB25`` (day not padded)."""
    d = datetime.fromtimestamp(expiry_ms / 1000, tz=UTC)
    return f"{d.day}{MONTHS[d.month - 1]}{d.year % 100:02d}"


@lru_cache(maxsize=8192)
def parse_option(name: str) -> OptionName | None:
    """Parse a single-option name; None for anything else (futures, combos, garbage).
    Cached (a few thousand names: an instrument's first sight parses its name in the parser
    and again in the book; ``OptionName`` is immutable)."""
    m = _OPTION.match(name)
    if m is None or m.group("mon") not in MONTH_INDEX:
        return None
    code = f"{int(m.group('day'))}{m.group('mon')}{m.group('yy')}"
    try:
        expiry_ms = expiry_ms_of(code)
    except ValueError:  # e.g. 31FEB25
        return None
    return OptionName(
        name=name,
        underlying=m.group("under"),
        expiry=code,
        expiry_ms=expiry_ms,
        strike=float(m.group("strike").replace("d", ".")),
        is_call=m.group("cp") == "C",
    )


def year_fraction(expiry_ms: int | float, now_ms: int | float) -> float:
    """``T = (expiry - now) / (365 days)`` in years (DESIGN section 2)."""
    return (expiry_ms - now_ms) / MS_PER_YEAR


def inverse_of(underlying: str) -> bool:
    """Coin-margined unless the underlying is a stablecoin pair (``XRP_USDC``, ``BTC_USDT``)."""
    return not ("_" in underlying and underlying.rsplit("_", 1)[1] in STABLECOINS)
