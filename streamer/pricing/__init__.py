"""Pricing core: Black-76 price, implied volatility, Greeks, coin-margined helpers.

Every function takes scalars or arrays (broadcast together, NumPy style) and returns a
float for all-scalar input, else an array of the broadcast shape. The work is done by numba
kernels (``nogil``) that never raise on bad numbers: where no value exists they give NaN.

Conventions (DESIGN section 2): undiscounted Black-76 with r = 0, ``F`` the option's forward
(Deribit's ``underlying_price``), ``T`` in years of 365 days, ``sigma`` a fraction (0.62),
prices in USD per unit of underlying; Deribit quotes premiums in coin = USD / F.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from streamer.pricing.cache import configure as _configure_cache

_configure_cache()  # before any kernel below is decorated (numba fixes its cache dir then)

from streamer.pricing.black import black_kernel  # noqa: E402
from streamer.pricing.greeks import deribit_theta_kernel, greeks_kernel  # noqa: E402
from streamer.pricing.implied import implied_vol_kernel  # noqa: E402

__all__ = [
    "DeribitGreeks",
    "Greeks",
    "black_greeks",
    "black_price",
    "coin_to_usd",
    "deribit_greeks",
    "full_shape",
    "implied_vol",
    "implied_vol_coin",
    "premium_adjusted_delta",
    "usd_to_coin",
]

ArrayLike = npt.ArrayLike
FloatOrArray = float | npt.NDArray[np.float64]


def _prepare(
    *args: ArrayLike, is_call: ArrayLike
) -> tuple[list[npt.NDArray[np.float64]], npt.NDArray[np.bool_], tuple[int, ...], bool]:
    arrays = [np.asarray(a, dtype=np.float64) for a in args]
    flags = np.asarray(is_call)
    if flags.dtype.kind in "US":  # "C"/"P" or "call"/"put"
        flags = np.char.upper(flags.astype(str))
        flags = (flags == "C") | (flags == "CALL")
    flags = flags.astype(np.bool_)
    scalar = all(a.ndim == 0 for a in arrays) and flags.ndim == 0
    shape = np.broadcast_shapes(*(a.shape for a in arrays), flags.shape)
    # writeable, contiguous, one-dimensional: a broadcast view (even of one element) is
    # read-only to numba's eyes (and numpy warns when asked whether it is writeable); arrays
    # already of the full shape are only flattened (the common case: whole columns)
    flat = [full_shape(a, shape, np.float64) for a in arrays]
    return flat, full_shape(flags, shape, np.bool_), shape, scalar


def full_shape(a: ArrayLike, shape: tuple[int, ...], dtype: type[Any]) -> npt.NDArray[Any]:
    """``a`` broadcast to ``shape`` as a writeable, contiguous, one-dimensional array of
    ``dtype`` (what the compiled kernels take): ``a`` itself, flattened, when it already is
    one, else a copy (never a broadcast view: ~5 µs to make, and read-only to numba)."""
    a = np.asarray(a, dtype=dtype)
    if a.shape == shape and a.flags.c_contiguous and a.flags.writeable:
        return a.reshape(-1)
    return np.array(np.broadcast_to(a, shape), dtype=dtype, order="C").reshape(-1)


def _finish(values: npt.NDArray[np.float64], shape: tuple[int, ...], scalar: bool) -> FloatOrArray:
    if scalar:
        return float(values[0])
    return values.reshape(shape)


def black_price(
    F: ArrayLike, K: ArrayLike, T: ArrayLike, sigma: ArrayLike, is_call: ArrayLike
) -> FloatOrArray:
    """Undiscounted Black-76 price in USD per unit of underlying.

    ``T <= 0`` or ``sigma <= 0`` gives the intrinsic value; non-positive ``F`` or ``K`` or a
    NaN input gives NaN. ``is_call`` is a bool (or "C"/"P") per option.
    """
    (f, k, t, s), c, shape, scalar = _prepare(F, K, T, sigma, is_call=is_call)
    return _finish(black_kernel(f, k, t, s, c), shape, scalar)


def implied_vol(
    price: ArrayLike, F: ArrayLike, K: ArrayLike, T: ArrayLike, is_call: ArrayLike
) -> FloatOrArray:
    """Black-76 implied volatility from an undiscounted USD price.

    Relative error about 1e-13 or better wherever the price determines the volatility to that
    precision (see ``streamer.pricing.implied``). NaN, never an exception, where no
    volatility exists: price at or below intrinsic, at or above the upper bound (F for a
    call, K for a put), ``T <= 0``, or non-finite inputs.
    """
    (p, f, k, t), c, shape, scalar = _prepare(price, F, K, T, is_call=is_call)
    return _finish(implied_vol_kernel(p, f, k, t, c), shape, scalar)


class Greeks(NamedTuple):
    """Black-76 Greeks of the USD price; units in ``streamer.pricing.greeks``."""

    delta: FloatOrArray
    gamma: FloatOrArray
    vega: FloatOrArray
    theta: FloatOrArray
    vanna: FloatOrArray
    volga: FloatOrArray


def black_greeks(
    F: ArrayLike, K: ArrayLike, T: ArrayLike, sigma: ArrayLike, is_call: ArrayLike
) -> Greeks:
    """Delta, gamma, vega (per 1.00 vol), theta (per year), vanna, volga of the USD price."""
    (f, k, t, s), c, shape, scalar = _prepare(F, K, T, sigma, is_call=is_call)
    g = greeks_kernel(f, k, t, s, c)
    return Greeks(*(_finish(g[i], shape, scalar) for i in range(6)))


def usd_to_coin(price_usd: ArrayLike, F: ArrayLike) -> FloatOrArray:
    """Coin-margined (inverse) premium: USD price / forward."""
    out = np.asarray(price_usd, dtype=np.float64) / np.asarray(F, dtype=np.float64)
    return float(out) if out.ndim == 0 else out


def coin_to_usd(price_coin: ArrayLike, F: ArrayLike) -> FloatOrArray:
    """USD premium of a coin-quoted price: coin price * forward."""
    out = np.asarray(price_coin, dtype=np.float64) * np.asarray(F, dtype=np.float64)
    return float(out) if out.ndim == 0 else out


def implied_vol_coin(
    price_coin: ArrayLike, F: ArrayLike, K: ArrayLike, T: ArrayLike, is_call: ArrayLike
) -> FloatOrArray:
    """Implied volatility of a coin-quoted (Deribit BTC/ETH) premium."""
    return implied_vol(coin_to_usd(price_coin, F), F, K, T, is_call)


def premium_adjusted_delta(delta: ArrayLike, price_coin: ArrayLike) -> FloatOrArray:
    """Delta of a coin-margined option in coin: ``delta - coin price`` (Deribit's delta total)."""
    out = np.asarray(delta, dtype=np.float64) - np.asarray(price_coin, dtype=np.float64)
    return float(out) if out.ndim == 0 else out


class DeribitGreeks(NamedTuple):
    """Greeks as Deribit shows them for coin-margined options."""

    price_coin: FloatOrArray
    delta: FloatOrArray  # N(d1) (puts N(d1) - 1), not premium-adjusted
    delta_premium_adj: FloatOrArray  # delta - price_coin
    gamma: FloatOrArray  # per USD
    vega: FloatOrArray  # USD per vol point
    theta: FloatOrArray  # USD per day


def deribit_greeks(
    F: ArrayLike, K: ArrayLike, T: ArrayLike, sigma: ArrayLike, is_call: ArrayLike
) -> DeribitGreeks:
    """Price and Greeks in Deribit's units (DESIGN section 2)."""
    (f, k, t, s), c, shape, scalar = _prepare(F, K, T, sigma, is_call=is_call)
    g = greeks_kernel(f, k, t, s, c)
    coin = black_kernel(f, k, t, s, c) / f
    theta = deribit_theta_kernel(f, k, t, s, c)
    return DeribitGreeks(
        price_coin=_finish(coin, shape, scalar),
        delta=_finish(g[0], shape, scalar),
        delta_premium_adj=_finish(g[0] - coin, shape, scalar),
        gamma=_finish(g[1], shape, scalar),
        vega=_finish(g[2] / 100.0, shape, scalar),
        theta=_finish(theta, shape, scalar),
    )
