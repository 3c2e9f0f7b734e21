"""Quotes off the simulated surface: the values a Deribit ticker carries (DESIGN section 2).

``mark_iv`` is the surface's IV (percent, 2 decimals) and ``mark_price`` the coin price at that
IV with the ticker's own ``underlying_price`` and ``T = (expiry - timestamp) / 365 days``;
bid/ask are Black-76 prices at the IV -+ a half spread that widens in the wings and for short
expiries, rounded outwards to Deribit's tick (0.0001 BTC below 0.005, else 0.0005); a bid under
one tick is no bid (0). ``bid_iv``/``ask_iv`` are the IVs of those rounded prices; Greeks are
``streamer.pricing.deribit_greeks`` (delta, gamma per USD, vega USD per vol point, theta USD per
day) and ``rho = T (F delta - V) / 100``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from streamer.tools.simulate.market import Market

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

TICK_UNITS_PER_COIN = 10_000  # prices in units of the small tick, 0.0001 coin
COARSE_TICK_UNITS = 5  # 0.0005 coin ...
COARSE_FROM_UNITS = 50  # ... from 0.005 coin up
GREEKS = ("delta", "gamma", "vega", "theta", "rho")


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
    from streamer.pricing import deribit_greeks, implied_vol

    fwd = market.forward(T)
    F = np.where(synthetic, rint(fwd, 4), rint(fwd, 2))
    k = np.log(K / F)
    atm = market.atm_vol(T)
    iv = np.sqrt(market.total_variance(k, atm * atm * T) / T)
    mark_iv = rint(iv * 100.0, 2)
    sig = mark_iv / 100.0
    g = deribit_greeks(F, K, T, sig, is_call)
    coin = np.asarray(g.price_coin)
    hs = half_spread(market.p.spread_iv, k, atm, T)
    bid, ask = tick_prices(F, K, T, sig + noise * hs, hs, is_call)
    bid_iv = np.asarray(implied_vol(bid * F, F, K, T, is_call))
    ask_iv = np.asarray(implied_vol(ask * F, F, K, T, is_call))
    rho = T * (F * np.asarray(g.delta) - coin * F) / 100.0  # USD per 1% of rate
    greeks = (g.delta, g.gamma, g.vega, g.theta, rho)
    return {
        "forward": F,
        "mark_iv": mark_iv,
        "mark": rint(coin, 8),
        "bid": bid,
        "ask": ask,
        "bid_iv": np.where(np.isfinite(bid_iv) & (bid > 0), rint(bid_iv * 100.0, 2), 0.0),
        "ask_iv": np.where(np.isfinite(ask_iv), rint(ask_iv * 100.0, 2), 0.0),
        **{name: rint(np.asarray(v), 5) for name, v in zip(GREEKS, greeks, strict=True)},
    }


def half_spread(spread_iv: float, k: FloatArray, atm: FloatArray, T: FloatArray) -> FloatArray:
    """Half spread in vol: ``spread_iv`` at the money, wider in the wings (``|z|`` standard
    deviations out, ``z = k / (atm sqrt(T))``) and near expiry."""
    z = k / (atm * np.sqrt(np.maximum(T, 1.0 / 365.0)))
    hs = spread_iv * (1.0 + 0.5 * np.abs(z))
    return np.asarray(hs * (1.0 + 0.5 / np.sqrt(np.maximum(T * 365.0, 0.05))))


def tick_prices(
    F: FloatArray,
    K: FloatArray,
    T: FloatArray,
    centre: FloatArray,
    hs: FloatArray,
    is_call: BoolArray,
) -> tuple[FloatArray, FloatArray]:
    """(bid, ask) in coin: Black prices at ``centre -+ hs`` rounded outwards to the tick; a bid
    under one tick is 0, the ask at least a tick above intrinsic value and at least one tick."""
    from streamer.pricing import black_price

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
    return bid_u / TICK_UNITS_PER_COIN, ask_u / TICK_UNITS_PER_COIN


def rint(x: FloatArray, decimals: int) -> FloatArray:
    """Round half-even to ``decimals``: the quotient of an exact integer by a power of ten,
    so the shortest float repr has at most ``decimals`` decimals."""
    scale = 10.0**decimals
    return np.asarray(np.rint(np.asarray(x) * scale) / scale)
