r"""Heston with piecewise-constant parameters between expiries (``heston-td``), priced by COS.

Dynamics under the forward measure (r = 0, per unit of forward, ``F = 1``)::

    dF/F = sqrt(v) dW,   dv = kappa (theta(t) - v) dt + xi(t) sqrt(v) dZ,   dW dZ = rho(t) dt,

with ``theta, xi, rho`` constant on each *piece* ``(t_{j-1}, t_j]`` between consecutive fitted
expiries ``t_0 < t_1 < ... < t_{S-1}`` (``t_{-1} = 0``; the last piece extends beyond
``t_{S-1}``) and ``kappa``, ``v0`` shared (Mikhailov and Nögel 2003). Parameters::

    x = [v0, kappa, theta[0], xi[0], rho[0], ..., theta[S-1], xi[S-1], rho[S-1]]

(``bates-td`` appends ``lam, mu_j, sigma_j``: ``streamer.models.bates_td``). Piece ``j`` ends at
slice ``j``'s expiry, so its parameters follow that expiry from fit to fit (the calibrator's
warm start and change penalty are per expiry) and a slice that expires hands its share of the
time line to the next piece.

Piece boundaries: the model needs ``t_0 .. t_{j-1}`` to price slice ``j``. By default they are
read off each call, the longest ``T`` among the points of each slice index (the calibrator always
evaluates every slice together); callers that price some slices alone bind them once with
``piece_T`` (constructor) or use ``iv_at``.

Characteristic function of ``X_T = ln(F_T/F_0)`` (Mikhailov and Nögel 2003; Elices 2008):
``phi(u) = exp(C + D v0)`` where, in time to maturity ``tau``, on every piece

    dD/dtau = -q/2 - beta D + xi^2 D^2 / 2,   dC/dtau = kappa theta D,
    q = u^2 + i u,   beta = kappa - i rho xi u,   d = sqrt(beta^2 + xi^2 q)  (Re d >= 0).

Starting from ``C = D = 0`` at ``T`` the pieces are crossed backward in time, ``T`` down to 0
(the piece holding ``T`` for ``tau_m = T - t_{m-1}``, then pieces ``m-1 .. 0`` in full). On a
piece of length ``tau`` entered with ``D_in`` (linearise ``D = -2 w' / (xi^2 w)``:
``w'' + beta w' - xi^2 q w / 4 = 0``, ``w(0) = 1``, ``w'(0) = -xi^2 D_in / 2``)::

    b' = beta - xi^2 D_in,   e = exp(-d tau),
    G  = [(d + b') + (d - b') e] / (2 d)   (so w = exp((d - beta) tau / 2) G),
    D_out = [d D_in (1 + e) - (1 - e)(q + beta D_in)] / (2 d G),
    C_out = C_in + (2 kappa theta / xi^2) [(beta - d) tau / 2 - ln G].

With ``D_in = 0`` this is Heston's closed form in the bounded form of Cui et al. (2017) used by
``streamer.models.heston``. As there, nothing cancels for small ``xi``:
``beta - d = -xi^2 q / (beta + d)`` and ``G - 1 = xi^2 R(D_in) (1 - e) / (d (b' + d))`` with
``R(D) = xi^2 D^2 / 2 - beta D - q / 2`` (the Riccati right-hand side; ``b'^2 - d^2 = 2 xi^2 R``),
``ln G = log1p(G - 1)``, principal branch. ``G`` is QuantLib's ``(1 - g~ e) / (1 - g~)`` with
``g~ = (b' - d)/(b' + d)`` (its ``AnalyticPTDHestonEngine``); the tests check the branch
against a direct integration of the Riccati equations.

Gradient (reverse mode through the recursion): each piece maps ``(beta, s = xi^2, D_in)``
to ``(D_out, L = (beta - d) tau/2 - ln G)``; the six complex partials follow from
``d d/d beta = beta/d``, ``d d/d s = q/(2d)``, ``d e = -tau e d d``. With
``ln phi = C_0 + v0 D_0``, ``C_i = C_{i+1} + c_i L_i(D_{i+1})``, ``c_i = 2 kappa theta_i/xi_i^2``
and ``D_i = D_out,i(D_{i+1})``, the adjoint of ``D_i`` runs forward in time:
``bar_0 = v0``, ``bar_{i+1} = bar_i D_D,i + c_i L_D,i``, and piece ``i``'s parameters get
``d/d beta_i = bar_i D_beta,i + c_i L_beta,i`` (likewise for ``s``), then
``beta_kappa = 1``, ``beta_rho = -i xi u``, ``beta_xi = -i rho u``, ``s_xi = 2 xi`` and the
direct terms of ``c_i`` (``theta`` enters only there); ``d ln phi / d v0 = D_0``. Cost per node:
one square root, exponential and logarithm and a few dozen complex operations per piece, for
the value and the whole gradient.

Kernels: ``streamer.models.td_kernels`` (numba; this module holds the model classes).

Pricing (COS, Fang and Oosterlee 2008), implied vols and the Jacobian as in
``streamer.models.heston``, whose cosine sums (``_price_group``) are reused; the truncation range
``[a, b]`` comes from Chernoff bounds with the exact moment generating function of the chained
model (``td_log_mgf``: the same recursion for real ``u = -i s``, explosion when ``w`` reaches 0
on a piece, Andersen and Piterbarg 2007), so that each end moves no price by more than the
tolerance ``tol``: ``FIT_TOL = 1e-12`` of the forward by default (vols to ~1e-7 even for
options worth 1e-5), ``streamer.models.heston.TAIL_TOL = 1e-15`` for reference-grade prices
(what the tests compare with QuantLib at 1e-8). Jumps (``bates-td``) split short expiries by
the number of jumps (``td_coefficients``). The coefficients of the last few parameter vectors
are kept, so the Jacobian after the vols, and the calendar, ATM and probe evaluations at a
fitted vector, cost only the sums over strikes.

Bounds: ``v0, theta[j] in [1e-4, 4]``, ``kappa in [0.05, 20]``, ``xi[j] in [0.05, 5]``,
``rho[j] in [-0.99, 0.99]`` (Heston's). No-arbitrage: the prices are expectations under a
martingale (for any parameters inside the bounds): convex in strike and, at fixed ``k``,
non-decreasing in ``T`` (a convex function of a martingale), so no static arbitrage by
construction; ``arbitrage`` reports parameters out of bounds and non-finite or out-of-range
probe prices (a numerical failure, not an arbitrage of the model).

References:
    S. Mikhailov, U. Nögel, "Heston's stochastic volatility model: implementation, calibration
    and some extensions", Wilmott (2003).
    A. Elices, "Models with time-dependent parameters using transform methods: application to
    Heston's model", arXiv:0708.2020 (2008).
    Y. Cui, S. del Baño Rollin, G. Germano, "Full and fast calibration of the Heston stochastic
    volatility model", EJOR 263 (2017).
    F. Fang, C. Oosterlee, SIAM J. Sci. Comput. 31 (2008) (COS method).
    L. Andersen, V. Piterbarg, "Moment explosions in stochastic volatility models", Finance
    Stoch. 11 (2007).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from streamer.models.base import FitData, FloatArray, IntArray, Model, Violation, register
from streamer.models.heston import PROBE_K, with_parity
from streamer.models.td_kernels import (
    N_PIECE,
    N_SURFACE,
    PIECE_LOWER,
    PIECE_NAMES,
    PIECE_SCALE,
    PIECE_UPPER,
    SURFACE_LOWER,
    SURFACE_SCALE,
    SURFACE_UPPER,
    _slice_ends,
    durations,
    ivs_and_jacobian_from,
    maturities,
    td_coefficients,
    td_log_cf,
    td_population_ivs,
    td_prices_from,
)

__all__ = [
    "N_PIECE",
    "N_SURFACE",
    "PIECE_LOWER",
    "PIECE_NAMES",
    "PIECE_SCALE",
    "PIECE_UPPER",
    "HestonTD",
    "durations",
    "td_log_cf",
]


# --------------------------------------------------------------------------------------------
# the model


def _as_f64(a: npt.ArrayLike) -> FloatArray:
    return np.ascontiguousarray(a, dtype=np.float64).ravel()


COEFFICIENT_CACHE = 4  # parameter vectors whose cosine coefficients are kept
# truncation tolerance of the fitted models (of the forward): prices to ~1e-12, i.e. vols to
# ~1e-7 even for 1e-5 options, at two thirds of the cost of 1e-15 (``TAIL_TOL``)
FIT_TOL = 1e-12


@dataclass(frozen=True)
class _Coefficients:
    """``td_coefficients`` of one parameter vector and set of maturities."""

    key: tuple[bytes, bytes]  # (x, piece ends)
    t_list: FloatArray
    has_grad: bool
    bank: FloatArray
    meta: npt.NDArray[np.int64]
    ranges: FloatArray
    first: npt.NDArray[np.int64]


class _PiecewiseModel(Model):
    """Shared plumbing of ``heston-td`` and ``bates-td``: the layout of ``x`` is ``[v0, kappa]``,
    ``piece_names`` per slice, then ``jump_names`` (see ``td_log_cf``)."""

    per_expiry: ClassVar[bool] = False
    any_maturity: ClassVar[bool] = True  # with its piece ends bound (``bind_slices``)
    piece_names: ClassVar[tuple[str, ...]] = PIECE_NAMES
    piece_lower: ClassVar[FloatArray] = PIECE_LOWER
    piece_upper: ClassVar[FloatArray] = PIECE_UPPER
    piece_scale: ClassVar[FloatArray] = PIECE_SCALE
    jump_names: ClassVar[tuple[str, ...]] = ()
    jump_lower: ClassVar[FloatArray] = np.zeros(0)
    jump_upper: ClassVar[FloatArray] = np.zeros(0)
    jump_scale: ClassVar[FloatArray] = np.zeros(0)

    def __init__(
        self,
        *,
        piece_T: npt.ArrayLike | None = None,
        prefetch_jacobian: bool = True,
        tol: float = FIT_TOL,
    ) -> None:
        """``piece_T``: the piece ends (years to each slice's expiry, increasing); None reads
        them off each call (see the module docstring). ``prefetch_jacobian``: ``implied_vol``
        also computes the coefficients of the gradient, so that the ``jacobian`` call a
        least-squares step makes next at the same point costs only the sums over strikes.
        ``tol``: truncation tolerance of the COS sums (of the forward, per range end and for
        the series; ``FIT_TOL`` by default, ``streamer.models.heston.TAIL_TOL`` for
        reference-grade prices).

        The cosine coefficients of the last few parameter vectors are kept
        (``COEFFICIENT_CACHE``): the Jacobian after the vols, and the calendar, ATM and probe
        evaluations at a fitted vector, then cost only the sums over strikes."""
        self.piece_T = None if piece_T is None else _as_f64(piece_T)
        if self.piece_T is not None and np.any(np.diff(self.piece_T) <= 0.0):
            raise ValueError(f"{self.name}: piece_T must increase, got {self.piece_T}")
        if not 0.0 < tol < 1e-3:
            raise ValueError(f"{self.name}: tol must lie in (0, 1e-3), got {tol}")
        self.prefetch_jacobian = prefetch_jacobian
        self.tol = float(tol)
        self._cache: list[_Coefficients] = []

    def bind_slices(self, slice_T: FloatArray) -> _PiecewiseModel:
        """This model with its piece ends at ``slice_T`` (a published surface's maturities)."""
        return type(self)(piece_T=slice_T, prefetch_jacobian=self.prefetch_jacobian, tol=self.tol)

    @property
    def n_jump(self) -> int:
        return len(self.jump_names)

    @property
    def n_piece(self) -> int:
        return len(self.piece_names)

    def n_pieces(self, x: FloatArray) -> int:
        """The number of pieces (slices) a parameter vector holds."""
        rest = x.shape[0] - N_SURFACE - self.n_jump
        if rest <= 0 or rest % self.n_piece:
            raise ValueError(f"{self.name}: parameter vector of length {x.shape[0]}")
        return int(rest // self.n_piece)

    def param_names(self, n_slices: int) -> tuple[str, ...]:
        names = ["v0", "kappa"]
        for j in range(n_slices):
            names.extend(f"{p}[{j}]" for p in self.piece_names)
        return (*names, *self.jump_names)

    def bounds(self, n_slices: int) -> tuple[FloatArray, FloatArray]:
        lo = np.concatenate([SURFACE_LOWER, np.tile(self.piece_lower, n_slices), self.jump_lower])
        hi = np.concatenate([SURFACE_UPPER, np.tile(self.piece_upper, n_slices), self.jump_upper])
        return lo, hi

    def scale(self, n_slices: int, slice_T: FloatArray | None = None) -> FloatArray:
        return np.concatenate([SURFACE_SCALE, np.tile(self.piece_scale, n_slices), self.jump_scale])

    # ------------------------------------------------------------------ boundaries
    def boundaries(self, x: FloatArray, T: FloatArray, slice_idx: IntArray) -> FloatArray:
        """The piece ends for a call: ``piece_T`` if bound, else each slice's longest ``T``."""
        S = self.n_pieces(x)
        if self.piece_T is not None:
            if self.piece_T.shape[0] < S - 1:
                raise ValueError(f"{self.name}: {S} pieces but piece_T has {self.piece_T.shape[0]}")
            out = np.full(S, np.inf)
            n = min(S, self.piece_T.shape[0])
            out[:n] = self.piece_T[:n]
            return out
        idx = np.ascontiguousarray(slice_idx, dtype=np.int64).ravel()
        ends = _slice_ends(T, idx, S)
        top = int(idx.max()) if idx.size else -1
        top = min(top, S - 1)
        missing = [j for j in range(top) if not np.isfinite(ends[j])]
        if missing:
            raise ValueError(
                f"{self.name}: slices {missing} have no point in this call, so their piece ends "
                "are unknown: bind them with piece_T or use iv_at"
            )
        ends[top + 1 :] = np.inf
        if np.any(np.diff(ends[: top + 1]) <= 0.0):
            raise ValueError(f"{self.name}: slice maturities do not increase: {ends[: top + 1]}")
        return ends

    # ------------------------------------------------------------------ evaluation
    def _coefficients(
        self, x: FloatArray, ends: FloatArray, T: FloatArray, want_grad: bool
    ) -> _Coefficients:
        """Cosine coefficients of every maturity in ``T`` at ``x`` (from the cache if there)."""
        t_need = maturities(T)
        key = (x.tobytes(), ends.tobytes())
        for i, entry in enumerate(self._cache):
            if (
                entry.key == key
                and (entry.has_grad or not want_grad)
                and np.all(np.isin(t_need, entry.t_list))
            ):
                self._cache.insert(0, self._cache.pop(i))
                return entry
        grad = want_grad or self.prefetch_jacobian
        bank, meta, ranges, first = td_coefficients(
            x, self.n_pieces(x), self.n_piece, self.n_jump, ends, t_need, grad, self.tol
        )
        entry = _Coefficients(key, t_need, grad, bank, meta, ranges, first)
        self._cache.insert(0, entry)
        del self._cache[COEFFICIENT_CACHE:]
        return entry

    def _eval(
        self, x: FloatArray, k: FloatArray, T: FloatArray, ends: FloatArray, want_grad: bool
    ) -> tuple[FloatArray, FloatArray]:
        """Implied vols and (if ``want_grad``) their Jacobian."""
        xx, kk, tt, ee = _as_f64(x), _as_f64(k), _as_f64(T), _as_f64(ends)
        price, grad = self._prices(xx, kk, tt, ee, want_grad)
        iv = ivs_and_jacobian_from(price, grad, kk, tt, want_grad, self.tol)
        return iv, grad

    def _prices(
        self, x: FloatArray, k: FloatArray, T: FloatArray, ends: FloatArray, want_grad: bool
    ) -> tuple[FloatArray, FloatArray]:
        """Out-of-the-money prices (F = 1) and (if ``want_grad``) their Jacobian."""
        c = self._coefficients(x, ends, T, want_grad)
        price, grad = td_prices_from(
            c.bank,
            c.meta,
            c.ranges,
            c.first,
            c.t_list,
            x,
            self.n_pieces(x),
            self.n_piece,
            self.n_jump,
            ends,
            k,
            T,
            want_grad,
        )
        return price, grad

    def otm_price(
        self, x: FloatArray, k: FloatArray, T: FloatArray, piece_T: FloatArray
    ) -> FloatArray:
        """Out-of-the-money prices (F = 1) with explicit piece ends."""
        xx, kk, tt, ee = _as_f64(x), _as_f64(k), _as_f64(T), _as_f64(piece_T)
        return self._prices(xx, kk, tt, ee, False)[0]

    def price(
        self,
        x: FloatArray,
        k: FloatArray,
        T: FloatArray,
        slice_idx: IntArray,
        is_call: npt.NDArray[np.bool_],
    ) -> FloatArray:
        kk, tt = _as_f64(k), _as_f64(T)
        otm = self.otm_price(x, kk, tt, self.boundaries(_as_f64(x), tt, slice_idx))
        return with_parity(otm, kk, is_call)

    def implied_vol(
        self, x: FloatArray, k: FloatArray, T: FloatArray, slice_idx: IntArray
    ) -> FloatArray:
        """Model Black vols; NaN where the OTM price is below its noise (``NOISE_TOL``):
        strikes so far out (~8 standard deviations) that the price has no digits."""
        xx, tt = _as_f64(x), _as_f64(T)
        return self._eval(xx, k, tt, self.boundaries(xx, tt, slice_idx), False)[0]

    def jacobian(
        self, x: FloatArray, k: FloatArray, T: FloatArray, slice_idx: IntArray
    ) -> FloatArray:
        """``d iv / d x``, shape ``(n_points, len(x))``; NaN rows where the vol is NaN."""
        xx, tt = _as_f64(x), _as_f64(T)
        return self._eval(xx, k, tt, self.boundaries(xx, tt, slice_idx), True)[1]

    def population_iv(
        self, X: FloatArray, k: FloatArray, T: FloatArray, slice_idx: IntArray
    ) -> FloatArray:
        """Model vols of every row of ``X`` (``(n_pop, len(x))``, one piece count):
        ``(n_pop, n)``, one compiled call (``td_population_ivs``)."""
        P = np.ascontiguousarray(X, dtype=np.float64)
        tt = _as_f64(T)
        ends = self.boundaries(P[0], tt, slice_idx)
        n_pieces = self.n_pieces(P[0])
        out: FloatArray = td_population_ivs(
            P, n_pieces, self.n_piece, self.n_jump, ends, _as_f64(k), tt, self.tol
        )
        return out

    def iv_at(self, x: FloatArray, k: FloatArray, T: FloatArray, piece_T: FloatArray) -> FloatArray:
        """Implied vols at any ``(k, T)`` with explicit piece ends (e.g. an expiry the fit left
        out: it lies inside a piece, or before the first / after the last one)."""
        return self._eval(x, k, T, np.asarray(piece_T, dtype=np.float64), False)[0]

    # ------------------------------------------------------------------ checks
    def arbitrage(self, x: FloatArray, slice_T: FloatArray) -> list[Violation]:
        xx = _as_f64(x)
        S = len(_as_f64(slice_T))
        names = self.param_names(S)
        if xx.shape[0] != len(names) or not np.all(np.isfinite(xx)):
            return [Violation("nonfinite", -1, math.inf, "parameters not finite or wrong length")]
        lo, hi = self.bounds(S)
        out: list[Violation] = []
        for name, value, a, b in zip(names, xx, lo, hi, strict=True):
            if value < a or value > b:
                amount = float(a - value if value < a else value - b)
                out.append(Violation("bounds", -1, amount, f"{name}={value:.6g} not in [{a}, {b}]"))
        if out:
            return out
        ends = _as_f64(slice_T)
        live = np.flatnonzero(ends > 0.0)
        G = PROBE_K.shape[0]
        k = np.tile(PROBE_K, live.shape[0])
        otm = self.otm_price(xx, k, np.repeat(ends[live], G), ends).reshape(live.shape[0], G)
        upper = np.minimum(1.0, np.exp(PROBE_K))
        bad = ~np.isfinite(otm) | (otm < -1e-12) | (otm > upper)
        for row, j in enumerate(live):
            if np.any(bad[row]):
                first = int(np.argmax(bad[row]))
                out.append(
                    Violation(
                        "nonfinite",
                        int(j),
                        float(np.count_nonzero(bad[row])),
                        f"slice {j} (T={ends[j]:.6g}): price {otm[row, first]!r} "
                        f"at k={PROBE_K[first]:.3g}",
                    )
                )
        return out

    # ------------------------------------------------------------------ cold start
    def initial_guesses(self, data: FitData) -> list[FloatArray]:
        """Quasi-explicit starts: ``v0`` from the shortest ATM variance, ``theta[j]`` the
        forward ATM variance of piece ``j``, ``rho[j]`` from the slice's ATM skew (short-time
        Heston skew ``d sigma / d k ~ rho xi / (4 sigma)``), for a few ``kappa, xi``."""
        S = data.n_slices
        atm, skew = _slice_summaries(data)
        w = atm * atm * data.slice_T
        w = np.maximum.accumulate(w)
        prev_T = np.concatenate([[0.0], data.slice_T[:-1]])
        prev_w = np.concatenate([[0.0], w[:-1]])
        fwd = (w - prev_w) / np.maximum(data.slice_T - prev_T, 1e-12)
        fwd = np.where(fwd > 0.0, fwd, atm * atm)
        lo, hi = self.bounds(S)
        out: list[FloatArray] = []
        for kappa, xi in ((2.0, 1.0), (5.0, 2.0), (1.0, 0.6)):
            rho = np.clip(4.0 * atm * skew / xi, -0.9, 0.9)
            pieces = np.column_stack([fwd, np.full(S, xi), rho, self._piece_extra(S)]).ravel()
            x = np.concatenate([[atm[0] ** 2, kappa], pieces, self._jump_guess()])
            out.append(np.clip(x, lo, hi))
        return out

    def _piece_extra(self, n_slices: int) -> FloatArray:
        """Cold-start values of the per-piece parameters beyond ``theta, xi, rho``."""
        return np.zeros((n_slices, self.n_piece - N_PIECE))

    def _jump_guess(self) -> FloatArray:
        """Cold-start values of the surface jump parameters."""
        return np.zeros(0)


def _slice_summaries(data: FitData) -> tuple[FloatArray, FloatArray]:
    """Per slice: ATM vol (median of the mid IVs nearest the forward) and ATM skew ``d iv/d k``
    (a line through the quotes within one ATM standard deviation)."""
    S = data.n_slices
    atm = np.full(S, np.nan)
    skew = np.zeros(S)
    for j in range(S):
        m = (data.slice_idx == j) & np.isfinite(data.iv)
        if not np.any(m):
            continue
        k, iv = data.k[m], data.iv[m]
        near = np.argsort(np.abs(k))[: max(2, min(5, k.shape[0]))]
        atm[j] = float(np.median(iv[near]))
        sd = atm[j] * math.sqrt(float(data.slice_T[j]))
        close = np.abs(k) <= max(sd, 1e-6)
        if np.count_nonzero(close) >= 3 and np.ptp(k[close]) > 0.0:
            skew[j] = float(np.polyfit(k[close], iv[close], 1)[0])
        elif k.shape[0] >= 3 and np.ptp(k) > 0.0:
            skew[j] = float(np.polyfit(k, iv, 1)[0])
    good = np.isfinite(atm)
    if not np.any(good):
        return np.full(S, 0.5), skew
    atm = np.interp(np.arange(S), np.flatnonzero(good), atm[good])
    return atm, skew


@register
class HestonTD(_PiecewiseModel):
    """Heston with ``theta, xi, rho`` piecewise constant between expiries."""

    name: ClassVar[str] = "heston-td"
