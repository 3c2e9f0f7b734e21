"""Synthetic chains for calibrator tests: quotes around a known IV surface, with noise."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from streamer.book.snapshot import ChainSnapshot
from streamer.pricing import black_price

FloatArray = npt.NDArray[np.float64]
IvFn = Callable[[FloatArray, FloatArray, int], FloatArray]  # (k, T, slice j) -> iv

DAY_MS = 86_400_000
T0_MS = 1_700_000_000_000 - (1_700_000_000_000 % DAY_MS) + 8 * 3_600_000  # a 08:00 UTC
DEFAULT_DAYS = (2, 7, 14, 30, 60, 91, 182, 365)


def make_chain(
    iv_fn: IvFn,
    *,
    days: tuple[int, ...] = DEFAULT_DAYS,
    forward: float = 60_000.0,
    n_strikes: int = 21,
    half_spread_iv: float = 0.01,
    noise_iv: float = 0.0,
    rng: np.random.Generator | None = None,
    ts_ms: int = T0_MS,
    width_sd: float = 2.2,
) -> ChainSnapshot:
    """Calls and puts on ``n_strikes`` strikes per expiry, bid/ask IV = iv -+ half-spread.

    ``noise_iv`` moves the quote's centre (normal, in vol) so re-quotes of one surface differ.
    Strikes span ``width_sd`` standard deviations (at 80% vol) each side of the forward.
    """
    rng = rng or np.random.default_rng(0)
    names, exp_idx, Ts, Fs, Ks, calls = [], [], [], [], [], []
    bids, asks, biv, aiv, miv = [], [], [], [], []
    expiry_ms = []
    for j, d in enumerate(days):
        T = d / 365.0
        e_ms = ts_ms + d * DAY_MS
        expiry_ms.append(e_ms)
        sd = 0.8 * np.sqrt(T)
        k = np.linspace(-width_sd * sd, width_sd * sd, n_strikes)
        K = np.round(forward * np.exp(k), -1)
        k = np.log(K / forward)
        iv = iv_fn(k, np.full(k.shape, T), j)
        centre = iv + noise_iv * rng.standard_normal(k.shape)
        for is_call in (True, False):
            b = np.maximum(centre - half_spread_iv, 0.01)
            a = centre + half_spread_iv
            pb = np.asarray(black_price(forward, K, T, b, is_call)) / forward
            pa = np.asarray(black_price(forward, K, T, a, is_call)) / forward
            for i in range(len(K)):
                names.append(f"X-{d}D-{int(K[i])}-{'C' if is_call else 'P'}")
                exp_idx.append(j)
                Ts.append(T)
                Fs.append(forward)
                Ks.append(K[i])
                calls.append(is_call)
                bids.append(pb[i])
                asks.append(pa[i])
                biv.append(b[i])
                aiv.append(a[i])
                miv.append(iv[i])
    n = len(names)
    return ChainSnapshot(
        venue="test",
        underlying="BTC",
        ts_ms=ts_ms,
        inverse=True,
        instrument=tuple(names),
        expiry_idx=np.array(exp_idx, dtype=np.int64),
        T=np.array(Ts),
        forward=np.array(Fs),
        strike=np.array(Ks),
        is_call=np.array(calls),
        bid=np.array(bids),
        ask=np.array(asks),
        bid_size=np.ones(n),
        ask_size=np.ones(n),
        bid_iv=np.array(biv),
        ask_iv=np.array(aiv),
        mark_iv=np.array(miv),
        mark_price=0.5 * (np.array(bids) + np.array(asks)),
        venue_delta=np.full(n, np.nan),
        quote_ts_ms=np.full(n, ts_ms, dtype=np.int64),
        expiries=tuple(f"{d}D" for d in days),
        expiry_ms=np.array(expiry_ms, dtype=np.int64),
        forwards=np.full(len(days), forward),
        dirty=np.ones(len(days), dtype=np.bool_),
    )


def svi_surface(
    atm_vol: float = 0.6, skew: float = -0.3, days: tuple[int, ...] = DEFAULT_DAYS
) -> tuple[list[FloatArray], IvFn]:
    """Per-slice raw SVI parameters of a calendar-free surface and its IV function."""
    params = []
    for d in days:
        T = d / 365.0
        b = 0.1 * np.sqrt(T) + 0.02
        sig = 0.1 * np.sqrt(T) + 0.02
        rho = skew
        m = 0.02 * np.sqrt(T)
        # choose a so that the ATM total variance is atm_vol^2 T
        w_atm_rest = b * (rho * (0 - m) + np.sqrt(m * m + sig * sig))
        a = atm_vol**2 * T - w_atm_rest
        params.append(np.array([a, b, rho, m, sig]))

    def iv_fn(k: FloatArray, T: FloatArray, j: int) -> FloatArray:
        a, b, rho, m, sig = params[j]
        w = a + b * (rho * (k - m) + np.sqrt((k - m) ** 2 + sig * sig))
        return np.asarray(np.sqrt(w / T))

    return params, iv_fn


def deribit_chain(snap: ChainSnapshot) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """A snapshot as Deribit ``get_instruments`` dicts and ticker payloads (IVs in percent)."""
    from streamer.instruments import expiry_code_of

    instruments: list[dict[str, object]] = []
    tickers: list[dict[str, object]] = []
    for i in range(snap.n_quotes):
        j = int(snap.expiry_idx[i])
        e_ms = int(snap.expiry_ms[j])
        call = bool(snap.is_call[i])
        K = float(snap.strike[i])
        name = f"{snap.underlying}-{expiry_code_of(e_ms)}-{int(K)}-{'C' if call else 'P'}"
        instruments.append(
            {
                "instrument_name": name,
                "kind": "option",
                "base_currency": snap.underlying,
                "quote_currency": snap.underlying,
                "settlement_currency": snap.underlying,
                "option_type": "call" if call else "put",
                "strike": K,
                "expiration_timestamp": e_ms,
                "creation_timestamp": snap.ts_ms - 86_400_000,
                "tick_size": 0.0001,
                "contract_size": 1.0,
                "min_trade_amount": 0.1,
                "is_active": True,
                "settlement_period": "week",
            }
        )
        tickers.append(
            {
                "timestamp": snap.ts_ms,
                "instrument_name": name,
                "state": "open",
                "best_bid_price": float(snap.bid[i]),
                "best_bid_amount": 1.0,
                "best_ask_price": float(snap.ask[i]),
                "best_ask_amount": 1.0,
                "bid_iv": float(snap.bid_iv[i]) * 100,
                "ask_iv": float(snap.ask_iv[i]) * 100,
                "mark_iv": float(snap.mark_iv[i]) * 100,
                "mark_price": float(snap.mark_price[i]),
                "underlying_price": float(snap.forward[i]),
                "underlying_index": f"{snap.underlying}-{expiry_code_of(e_ms)}",
                "index_price": float(snap.forward[i]),
                "open_interest": 1.0,
                "interest_rate": 0.0,
                "greeks": {"delta": 0.5, "gamma": 0.0, "vega": 1.0, "theta": -1.0, "rho": 0.0},
            }
        )
    return instruments, tickers


def ticker_frame(data: dict[str, object]) -> str:
    """A ``ticker.{inst}.100ms`` subscription notification."""
    import json

    channel = f"ticker.{data['instrument_name']}.100ms"
    return json.dumps(
        {"jsonrpc": "2.0", "method": "subscription", "params": {"channel": channel, "data": data}}
    )
