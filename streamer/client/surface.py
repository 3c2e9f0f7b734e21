"""A fitted surface as a value: built from a surface payload, answers IVs, prices and Greeks.

The daemon computes the greeks topic through this very class (from the surface payload it is
about to publish), and bots rebuild it from what they receive, so both see the same numbers.

Units of ``greeks`` (Deribit's, DESIGN section 2): ``price_coin`` = USD / F, ``price_usd``,
``delta`` = N(d1) (puts N(d1) - 1, not premium-adjusted), ``delta_premium_adj`` = delta -
price_coin, ``gamma`` per USD, ``vega`` USD per vol point, ``theta`` USD per day (Deribit's
rule, see ``streamer.pricing.greeks``), ``vanna`` change of delta per vol point, ``volga``
change of vega (USD per vol point) per vol point. ``iv`` is a fraction (0.62).

Any maturity (``iv_at``, ``greeks_at``, ``forward_at``): between two fitted expiries total
implied variance is interpolated linearly in ``T`` at fixed log-moneyness ``k``,
``w(k, T) = (1 - u) w1(k) + u w2(k)``. Between two slices free of calendar arbitrage
(``w2 >= w1``) it rises with ``T`` at every ``k``, and a flat smile stays flat; but a convex
combination of total variances can, rarely, break the butterfly condition. So the
interpolated slice is checked (call prices decreasing and convex in strike on a grid of
``k`` over +-3 standard deviations), and where it fails the price interpolation of Gatheral
and Jacquier (2014, "Arbitrage-free SVI volatility surfaces", section 5.2) is used instead:
``C(k, T) = a C1(k) + (1 - a) C2(k)`` (undiscounted calls per unit forward) with ``a`` set so
the at-the-money total variance is linear in ``T`` (``C_atm(theta) = 2 N(sqrt(theta)/2) - 1``
solved exactly), a mixture that is free of static arbitrage by construction (it turns a flat
smile into a mild smile, hence not the first choice). Before the first and after the last
fitted expiry the smile is held flat in implied vol at fixed ``k`` (constant forward variance:
"flat-forward"). Before the first that is free of static arbitrage: the total variance
``l w1(k)`` (``l = T / T1 < 1``) lies below the first slice, and Durrleman's ``g`` of it,
``(1 - k w1'/(2 w1))^2 + l (w1''/2 - w1'^2/(4 w1)) - l^2 w1'^2/16``, is concave in ``l``
and non-negative at ``l = 0`` and ``l = 1``, so at every ``l`` between. After the last
(``l > 1``) it can turn negative: the scaled slice is checked (the interpolation's grid,
widened to +-2), and where it fails the price mixture between the last slice and the
infinite-variance limit ``C = 1`` (per unit forward) is used instead, ``a`` so the ATM total
variance scales like the flat rule's. Models whose parameters describe every maturity
(Heston, Bates) are evaluated at ``T`` itself. The forward is interpolated linearly in
``ln F`` against ``T`` (a constant basis rate between expiries), extrapolated with the
nearest segment's rate.
``smile_at(T)`` is that maturity's smile as a function of ``k`` (the interpolation chosen
once for ``T``).

Constant maturities (``tenor``, ``tenors``, ``vol_index``): ATM IV, 25- and 10-delta risk
reversals and butterflies at ``days / 365`` on ``smile_at``, and the 30-day variance-swap vol
index from the fitted slices around 30 days; the maths and its references are in
``streamer.client.tenors``. Only inside the fitted expiries (None outside: no extrapolation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from streamer.client.tenors import (
    DEFAULT_TENORS_DAYS,
    VOL_INDEX_DAYS,
    Smile,
    Tenor,
    empty_tenor,
    smile_tenor,
    tenor_years,
    vol_index,
)
from streamer.errors import InputError
from streamer.models import REGISTRY, Model, ParamView
from streamer.pricing import black_greeks, black_price, deribit_greeks, implied_vol

FloatArray = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike
CHECK_POINTS = 121  # the butterfly check's grid of an interpolated slice
Grid = tuple[FloatArray, FloatArray]  # log-moneyness and the smile's IVs there
SHORT_IV_MAX = 5.0  # 500 %: above it a model's vol before its first fitted expiry is noise


@dataclass(frozen=True, eq=False)
class Surface:
    """One published calibration of one model on one underlying."""

    venue: str
    underlying: str
    model: Model
    ts_ms: int
    seq: int
    status: str
    expiries: tuple[str, ...]
    expiry_ms: npt.NDArray[np.int64]
    T: FloatArray
    forward: FloatArray
    x: tuple[FloatArray, ...]  # per-expiry models: one vector per slice; else one vector

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], **model_kwargs: Any) -> Surface:
        """Rebuild from a ``streamer.surface/1`` payload (DESIGN section 4)."""
        try:
            name = payload["model"]
            model_cls = REGISTRY[name]
        except KeyError as exc:
            raise InputError("payload.model", f"unknown model {exc.args[0]!r}") from exc
        surface_params = dict(payload.get("params") or {})
        model = model_cls(**model_kwargs) if model_kwargs else model_cls.from_params(surface_params)
        rows = list(payload["expiries"])
        n = len(rows)
        if model.per_expiry:
            x = tuple(
                model.from_view(ParamView(surface=surface_params, slices=[dict(r["params"])]), 1)
                for r in rows
            )
        else:
            view = ParamView(surface=surface_params, slices=[dict(r["params"]) for r in rows])
            x = (model.from_view(view, n),)
        T = np.array([float(r["T"]) for r in rows])
        return cls(
            venue=payload["venue"],
            underlying=payload["underlying"],
            model=model.bind_slices(T) if n else model,
            ts_ms=int(payload["ts_ms"]),
            seq=int(payload.get("seq", 0)),
            status=str(payload.get("status", "ok")),
            expiries=tuple(r["expiry"] for r in rows),
            expiry_ms=np.array([int(r["expiry_ms"]) for r in rows], dtype=np.int64),
            T=T,
            forward=np.array([float(r["forward"]) for r in rows]),
            x=x,
        )

    def _slice(self, expiry: str) -> int:
        try:
            return self.expiries.index(expiry)
        except ValueError:
            raise InputError("expiry", f"{expiry!r} not in {list(self.expiries)}") from None

    def iv(self, strike: ArrayLike, expiry: str) -> FloatArray:
        """Model implied vol (fraction) at ``strike`` for ``expiry`` (at the payload's T)."""
        j = self._slice(expiry)
        K = np.atleast_1d(np.asarray(strike, dtype=np.float64))
        k = np.log(K / self.forward[j])
        T = np.full(K.shape, float(self.T[j]))
        if self.model.per_expiry:
            x, idx = self.x[j], np.zeros(K.shape, dtype=np.int64)
        else:
            x, idx = self.x[0], np.full(K.shape, j, dtype=np.int64)
        return np.asarray(self.model.implied_vol(x, k, T, idx), dtype=np.float64)

    def price(
        self, strike: ArrayLike, expiry: str, is_call: ArrayLike, *, coin: bool = True
    ) -> FloatArray:
        """Model premium: in coin (USD / F) by default, else USD."""
        j = self._slice(expiry)
        K = np.atleast_1d(np.asarray(strike, dtype=np.float64))
        F = float(self.forward[j])
        usd = np.asarray(black_price(F, K, float(self.T[j]), self.iv(K, expiry), is_call))
        return usd / F if coin else usd

    def greeks(self, strike: ArrayLike, expiry: str, is_call: ArrayLike) -> dict[str, FloatArray]:
        """IV, prices and Greeks in Deribit's units (module docstring), one array each."""
        j = self._slice(expiry)
        K = np.atleast_1d(np.asarray(strike, dtype=np.float64))
        F, T = float(self.forward[j]), float(self.T[j])
        return _greeks(F, K, T, self.iv(K, expiry), is_call, True)

    # -- any maturity --------------------------------------------------------------------

    def forward_at(self, T: float) -> float:
        """The forward at ``T`` years: log-linear between fitted expiries (module docstring)."""
        Ts, lnF = self.T, np.log(self.forward)
        if len(Ts) == 1:
            return float(self.forward[0])
        j = int(np.clip(np.searchsorted(Ts, T) - 1, 0, len(Ts) - 2))
        rate = (lnF[j + 1] - lnF[j]) / max(float(Ts[j + 1] - Ts[j]), 1e-12)
        return float(np.exp(lnF[j] + rate * (T - Ts[j])))

    def iv_at(self, strike: ArrayLike, T: float, forward: float | None = None) -> FloatArray:
        """Model implied vol at ``strike`` for any maturity ``T`` (years) against ``forward``
        (default ``forward_at(T)``): interpolated between fitted expiries (module docstring)."""
        K = np.atleast_1d(np.asarray(strike, dtype=np.float64))
        F = self.forward_at(T) if forward is None else float(forward)
        return self.smile_at(T)(np.log(K / F))

    def smile_at(self, T: float) -> Smile:
        """The smile at maturity ``T`` (years): log-moneyness ``k = ln(K / F_T)`` -> model
        implied vol, by the maths of ``iv_at`` (the interpolation between the two slices
        around ``T`` is chosen once, here, not on every call)."""
        return self._smile_at(float(T))[0]

    def _smile_at(self, T: float) -> tuple[Smile, float | None, Grid | None]:
        """``smile_at`` and what choosing it computed on the way, for the tenors: the ATM IV
        and the smile on the butterfly check's grid ``(k, iv)`` (None where not computed)."""
        if not T > 0.0 or not self.expiries:
            return _nan_smile, None, None
        if self.model.any_maturity:
            if self.T[0] > T:  # before the first fitted expiry (T -> 0 included)
                return (lambda k: self._short_iv(_k(k), T)), None, None
            return (lambda k: self._slice_iv(0, _k(k), np.full(np.shape(k), T))), None, None
        Ts = self.T
        hit = np.flatnonzero(np.abs(Ts - T) <= 1e-12)  # np.isclose with rtol 0, 10x cheaper
        if hit.size:
            j = int(hit[0])
            return (lambda k: self._slice_iv(j, _k(k))), None, None
        if Ts[0] > T:  # before the first fitted expiry: flat in vol at fixed k
            return (lambda k: self._slice_iv(0, _k(k))), None, None
        if Ts[-1] < T:  # after the last
            return self._long_smile(T)
        return self._interpolated_smile(int(np.searchsorted(Ts, T)) - 1, T)

    def _short_iv(self, k: FloatArray, T: float) -> FloatArray:
        """A maturity-aware model (Heston, Bates) before its first fitted expiry: its own IV
        at ``T``, and where that is not a number (T -> 0: the smile can no longer be
        inverted from prices), the first expiry's IV at the same log-moneyness, as the
        other models extrapolate there; so too where it is no tradeable vol (at or above
        ``SHORT_IV_MAX``: Bates' jumps one millisecond before a settlement price far
        out-of-the-money options at vols of hundreds)."""
        iv = np.asarray(self._slice_iv(0, k, np.full(np.shape(k), T)), dtype=np.float64)
        bad = ~(np.isfinite(iv) & (iv < SHORT_IV_MAX))
        if bad.any():
            iv = np.where(bad, self._slice_iv(0, k), iv)
        return iv

    def greeks_at(
        self,
        strike: ArrayLike,
        T: float,
        is_call: ArrayLike,
        forward: float | None = None,
        *,
        inverse: bool = True,
    ) -> dict[str, FloatArray]:
        """``greeks`` at any maturity ``T``; ``inverse=False`` (linear, USD-settled options)
        leaves ``price_coin`` and ``delta_premium_adj`` NaN."""
        K = np.atleast_1d(np.asarray(strike, dtype=np.float64))
        F = self.forward_at(T) if forward is None else float(forward)
        return _greeks(F, K, float(T), self.iv_at(K, T, F), is_call, inverse)

    def _slice_iv(self, j: int, k: FloatArray, T: FloatArray | None = None) -> FloatArray:
        """Slice ``j``'s model IVs at log-moneyness ``k`` (at its own T unless given)."""
        TT = np.full(k.shape, float(self.T[j])) if T is None else T
        if self.model.per_expiry:
            x, idx = self.x[j], np.zeros(k.shape, dtype=np.int64)
        else:
            x, idx = self.x[0], np.full(k.shape, j, dtype=np.int64)
        return np.asarray(self.model.implied_vol(x, k, TT, idx), dtype=np.float64)

    def _interpolated_smile(self, j: int, T: float) -> tuple[Smile, float | None, Grid | None]:
        """Between slices ``j`` and ``j + 1``: total variance linear in ``T`` where that is
        free of butterfly arbitrage, else the Gatheral-Jacquier price mixture (with the ATM
        IV and the check grid's IVs of the linear branch, ``_smile_at``)."""
        T1, T2 = float(self.T[j]), float(self.T[j + 1])
        u = (T - T1) / (T2 - T1)

        def w_lin(kk: FloatArray) -> FloatArray:
            w1 = self._slice_iv(j, kk) ** 2 * T1
            w2 = self._slice_iv(j + 1, kk) ** 2 * T2
            return np.asarray((1.0 - u) * w1 + u * w2)

        theta = float(w_lin(np.zeros(1))[0])
        half = 3.0 * math.sqrt(max(theta, 1e-8))
        grid = np.linspace(-half, half, CHECK_POINTS)
        w_grid = w_lin(grid)
        if _butterfly_free(grid, w_grid):
            atm = math.sqrt(max(theta, 0.0) / T)  # = the smile at k = 0, to the bit
            iv_grid = np.sqrt(np.maximum(w_grid, 0.0) / T)
            smile = lambda k: np.asarray(np.sqrt(np.maximum(w_lin(_k(k)), 0.0) / T))  # noqa: E731
            return smile, atm, (grid, iv_grid)
        return (lambda k: self._mixture_iv(j, _k(k), T)), None, None

    def _long_smile(self, T: float) -> tuple[Smile, float | None, Grid | None]:
        """After the last fitted expiry: flat in implied vol at fixed ``k`` (total variance
        scaled up: calendar-free) where that slice passes the butterfly check, else the
        Gatheral-Jacquier price mixture between the last slice and the infinite-variance
        limit ``C = 1`` (per unit forward), ATM total variance scaled like the flat rule."""
        j = len(self.T) - 1
        theta_j = float(self._slice_iv(j, np.zeros(1))[0] ** 2 * float(self.T[j]))
        grid = _check_grid(theta_j * T / float(self.T[j]))
        if _butterfly_free(grid, self._slice_iv(j, grid) ** 2 * T):
            return (lambda k: self._slice_iv(j, _k(k))), None, None
        return (lambda k: self._mixture_iv(j, _k(k), T, limit=1.0)), None, None

    def _mixture_iv(
        self, j: int, k: FloatArray, T: float, limit: float | None = None
    ) -> FloatArray:
        """Gatheral-Jacquier price mixture at ``T``: between slices ``j`` and ``j + 1``, or
        (``limit``) between slice ``j`` and a bound of call prices per unit forward (``1.0``:
        the infinite-variance limit ``C = 1``; ``0.0``: the intrinsic value, ``T = 0``)."""
        if limit is not None:
            return self._limit_mixture_iv(j, k, T, limit)
        return self._pair_mixture_iv(j, k, T)

    def _limit_mixture_iv(self, j: int, k: FloatArray, T: float, limit: float) -> FloatArray:
        """``C(k, T) = a C_j(k) + (1 - a) C_lim(k)``, ``a`` so the ATM IV is slice ``j``'s."""
        Tj = float(self.T[j])
        thj = float(self._slice_iv(j, np.zeros(1))[0] ** 2 * Tj)
        theta = thj * T / Tj
        cj, c = _atm_call(thj), _atm_call(theta)
        # the limit's ATM call: 0 (intrinsic) or 1
        a = (c - limit) / (cj - limit) if abs(cj - limit) > 1e-14 else 1.0
        a = min(max(a, 0.0), 1.0)
        K = np.exp(k)
        calls = k >= 0.0
        one = np.ones(k.shape)
        pj = np.asarray(black_price(one, K, np.full(k.shape, Tj), self._slice_iv(j, k), calls))
        # the limit's out-of-the-money price: 0 (intrinsic) or, from C = 1, C = 1 and P = K
        p_lim = np.where(calls, 1.0, K) if limit > 0.0 else np.zeros(k.shape)
        price = a * pj + (1.0 - a) * p_lim
        return np.asarray(implied_vol(price, one, K, np.full(k.shape, T), calls), dtype=np.float64)

    def _pair_mixture_iv(self, j: int, k: FloatArray, T: float) -> FloatArray:
        """Gatheral-Jacquier price interpolation between slices ``j`` and ``j + 1``."""
        T1, T2 = float(self.T[j]), float(self.T[j + 1])
        zero = np.zeros(1)
        th1 = float(self._slice_iv(j, zero)[0] ** 2 * T1)
        th2 = float(self._slice_iv(j + 1, zero)[0] ** 2 * T2)
        u = (T - T1) / (T2 - T1)
        theta = th1 + u * (th2 - th1)
        c1, c2, c = _atm_call(th1), _atm_call(th2), _atm_call(theta)
        a = (c2 - c) / (c2 - c1) if abs(c2 - c1) > 1e-14 else 1.0 - u
        K = np.exp(k)
        calls = k >= 0.0  # the out-of-the-money side (parity is linear: the same mixture)
        # every argument at full shape: streamer.pricing broadcasts scalars with
        # np.broadcast_arrays, whose views numba's typeof warns about (FutureWarning)
        one = np.ones(k.shape)
        p1 = np.asarray(black_price(one, K, np.full(k.shape, T1), self._slice_iv(j, k), calls))
        p2 = np.asarray(black_price(one, K, np.full(k.shape, T2), self._slice_iv(j + 1, k), calls))
        price = a * p1 + (1.0 - a) * p2
        return np.asarray(implied_vol(price, one, K, np.full(k.shape, T), calls), dtype=np.float64)

    def atm_iv(self, expiry: str) -> float:
        """Model IV at the forward."""
        value = float(self.iv(self.forward[self._slice(expiry)], expiry)[0])
        return value if math.isfinite(value) else math.nan

    # -- constant maturities (the maths in streamer.client.tenors) ------------------------

    def fitted_range(self) -> tuple[float, float] | None:
        """The first and last fitted ``T`` (years), None without expiries."""
        if not self.expiries:
            return None
        return float(np.min(self.T)), float(np.max(self.T))

    def tenor(self, days: int) -> Tenor:
        """The constant maturity ``days / 365``: forward, ATM IV (at the forward), 25- and
        10-delta risk reversals and butterflies (forward Black delta, smile strikes), IVs
        as fractions; every value None outside the fitted expiries."""
        if isinstance(days, bool) or not isinstance(days, int | np.integer) or days < 1:
            raise InputError("days", f"must be a positive whole number of days, got {days!r}")
        days = int(days)
        T = tenor_years(days)
        span = self.fitted_range()
        if span is None or not span[0] - 1e-12 <= T <= span[1] + 1e-12:
            return empty_tenor(days)
        smile, atm, grid = self._smile_at(T)
        return smile_tenor(smile, days, T, self.forward_at(T), atm_iv=atm, grid=grid)

    def tenors(self, days: Iterable[int] = DEFAULT_TENORS_DAYS) -> list[Tenor]:
        """``tenor`` of each of ``days`` (default 1, 7, 14, 30, 60, 90, 180, 365)."""
        return [self.tenor(d) for d in days]

    def vol_index(self, days: int = VOL_INDEX_DAYS) -> float | None:
        """The variance-swap implied vol at ``days`` (the 30-day vol index, a fraction) from
        the fitted smiles of the two expiries around it (``streamer.client.tenors``); None
        outside the fitted expiries."""
        order = np.argsort(self.T, kind="stable")
        slices = [(float(self.T[j]), self._fitted_smile(int(j))) for j in order]
        return vol_index(slices, days)

    def _fitted_smile(self, j: int) -> Smile:
        return lambda k: self._slice_iv(j, _k(k))


def _k(k: ArrayLike) -> FloatArray:
    return np.atleast_1d(np.asarray(k, dtype=np.float64))


def _nan_smile(k: FloatArray) -> FloatArray:
    return np.full(np.shape(k), math.nan)


def _butterfly_free(k: FloatArray, w: FloatArray) -> bool:
    """Undiscounted calls (per unit forward) of total variance ``w`` at strikes ``e^k``:
    decreasing and convex in the strike (discretely, to rounding)?"""
    if not np.all(np.isfinite(w)) or np.any(w <= 0.0):
        return False
    K = np.exp(k)
    C = np.asarray(black_price(1.0, K, 1.0, np.sqrt(w), True))
    slope = np.diff(C) / np.diff(K)
    return bool(np.all(slope <= 1e-12) and np.all(np.diff(slope) >= -1e-10))


def _check_grid(theta: float) -> FloatArray:
    """The butterfly check's grid of a slice of ATM total variance ``theta``: +-3 standard
    deviations (``CHECK_POINTS``) and +-2 in log-moneyness (where the listed strikes reach)."""
    half = 3.0 * math.sqrt(max(theta, 1e-8))
    k = np.sort(np.concatenate([np.linspace(-half, half, CHECK_POINTS), np.linspace(-2, 2, 81)]))
    return np.asarray(k[np.concatenate([[True], np.diff(k) > 1e-6])])  # no near-repeats


def _atm_call(theta: float) -> float:
    """Undiscounted at-the-money call per unit forward at total variance ``theta``."""
    return math.erf(math.sqrt(max(theta, 0.0)) / (2.0 * math.sqrt(2.0)))


def _greeks(
    F: float, K: FloatArray, T: float, iv: FloatArray, is_call: ArrayLike, inverse: bool
) -> dict[str, FloatArray]:
    """IV, prices and Greeks in Deribit's units at one (F, T)."""
    return greeks_columns(F, K, T, iv, is_call, inverse=inverse)


def greeks_columns(
    F: ArrayLike,
    K: FloatArray,
    T: ArrayLike,
    iv: FloatArray,
    is_call: ArrayLike,
    *,
    inverse: bool = True,
) -> dict[str, FloatArray]:
    """IV, prices and Greeks in Deribit's units (module docstring), one array each, of
    options at strikes ``K`` with model IVs ``iv``; ``F`` and ``T`` per option or one for
    all. ``inverse=False`` (linear, USD-settled options) leaves ``price_coin`` and
    ``delta_premium_adj`` NaN."""
    F = np.asarray(F, dtype=np.float64)
    d = deribit_greeks(F, K, T, iv, is_call)
    g = black_greeks(F, K, T, iv, is_call)
    coin = np.asarray(d.price_coin, dtype=np.float64)
    none = np.full(K.shape, math.nan)
    return {
        "iv": iv,
        "price_coin": coin if inverse else none,
        "price_usd": coin * F,
        "delta": np.asarray(d.delta, dtype=np.float64),
        "delta_premium_adj": np.asarray(d.delta_premium_adj, dtype=np.float64) if inverse else none,
        "gamma": np.asarray(d.gamma, dtype=np.float64),
        "vega": np.asarray(d.vega, dtype=np.float64),
        "theta": np.asarray(d.theta, dtype=np.float64),
        "vanna": np.asarray(g.vanna, dtype=np.float64) / 100.0,
        "volga": np.asarray(g.volga, dtype=np.float64) / 1e4,
    }
