"""Heston (1993) stochastic-volatility surface, priced by the Fang–Oosterlee COS method.

Dynamics under the forward measure (r = 0, everything per unit of forward, ``F = 1``)::

    dF/F = sqrt(v) dW,   dv = kappa (theta - v) dt + xi sqrt(v) dZ,   dW dZ = rho dt,

parameters ``x = [v0, kappa, theta, xi, rho]``. A quote is a point ``(k = ln(K/F), T)``.

Characteristic function of ``X_T = ln(F_T/F_0)``: the "little trap" of Albrecher et al.
(2007) in the bounded form of Cui, del Baño Rollin and Germano (2017), eq. (18), which keeps
every intermediate finite for real ``u`` (``Re d >= 0``, ``|e^{-dT}| <= 1``)::

    beta = kappa - xi rho i u,    q = u^2 + i u,    d = sqrt(beta^2 + xi^2 q),
    t = tanh(d T / 2) = (1 - e^{-dT}) / (1 + e^{-dT}),      A = q t / (d + beta t),
    G = (1 + beta/d)/2 + (1 - beta/d) e^{-dT}/2  (the trap's (1 - g e^{-dT}) / (1 - g)),
    ln phi(u) = -v0 A + (2 kappa theta / xi^2) [(beta - d) T/2 - ln G].

``beta - d = -xi^2 q / (beta + d)`` and ``G - 1 = (beta - d)(1 - e^{-dT}) / (2 d)`` are formed
without cancellation and ``ln G`` as ``log1p``, so small ``xi`` loses no digits (the usual
``-kappa theta rho i u T / xi`` term cancels analytically). The principal logarithm of ``G``
is continuous in ``u`` (Albrecher et al. 2007; Lord and Kahl 2010). ``phi(-i) = 1``.

Gradient (Cui et al. 2017, section 3): ``d phi / d x_p = phi d ln phi / d x_p``, closed form
through ``beta`` and ``d`` (``d d / d p = (beta beta_p + xi xi_p q) / d``), with
``D = (kappa - d) T/2 - ln G``; evaluated alongside ``phi`` at the same nodes.

Pricing: COS method (Fang and Oosterlee 2008). On ``[a, b]`` the density of ``X_T`` is
expanded in cosines; with ``u_n = n pi / (b - a)`` the put of log-strike ``k`` is

    P(k) = sum'_{n<N} Re[phi(u_n) e^{-i u_n a}] V_n(k),
    V_n(k) (b - a)/2 = e^k [sin(u_n (k-a)) / (u_n (1 + u_n^2)) - cos(u_n (k-a)) / (1 + u_n^2)]
                       + e^a / (1 + u_n^2)                                     (n >= 1),

(the prime halves the ``n = 0`` term, ``V_0 (b-a)/2 = e^k (k - a - 1) + e^a``). Calls come
from parity, ``C = P + 1 - e^k``, never from the call coefficients, whose ``e^b`` factor loses
digits on wide ranges (Fang and Oosterlee 2008, section 4). Only the out-of-the-money option
is formed (put for ``k < 0``, call for ``k >= 0``); strikes outside ``[a, b]`` are worth 0.

Truncation, the crux for short expiries with wide strikes and for heavy tails: ``[a, b]``
follows the density, not the strikes, and is set from Chernoff bounds with the exact moment
generating function (``truncation_range``), so that each end moves no price by more than
``TAIL_TOL = 1e-15`` (of the forward). A 1-day expiry gets a narrow range and ~50 terms;
the exponential tails of Heston (moment explosion) and of jumps get the room they need,
which the cumulant rule ``c1 -+ 12 sqrt(c2 + sqrt(c4))`` of Fang and Oosterlee does not give
(on a Feller-violating test set it errs by 1e-5 to 1e-2 relative). ``N`` grows until the
terms left out, summed as a geometric tail of ``|phi(u_n)|``, are below ``TAIL_TOL``.
Cost is about (range width x decay scale of ``phi``): ordinary crypto parameters need
40-450 terms per expiry; strongly Feller-violating sets (``xi / sqrt(v0)`` of 10 or more)
need 10^4 and more. Past ``N_MAX`` terms for one expiry, or ``TERM_BUDGET`` for a call, the
expiry's prices are NaN (seen only in corners of the bounds such as ``v0 = 1e-4`` with
``xi = 5``): the cost stays below ~50 ms.
The cosines at each strike are advanced by complex rotation (re-seeded every 64 terms), so
the inner loop over (term, strike) is a few multiply-adds vectorised across strikes; the
characteristic function is evaluated once per expiry. Against QuantLib (adaptive
Gauss-Lobatto at 1e-14) and 25-digit quadrature the prices agree to ~1e-10 relative
(1e-8 in the heaviest-tailed test set), ~1e-15 absolute for tiny ones.

Two tolerances: every price and vol a caller sees is reference-grade (``TAIL_TOL``); a fit's
least-squares evaluations at its quotes (``fit_iv_and_jacobian``, one pass for the vols and
the Jacobian; ``population_iv`` for a global search) use ``FIT_TOL = 1e-7``, about a third of
the terms (narrower range, shorter series) for vols within ~2e-7 of the reference, far inside
any quote's half-spread. The reference coefficients of the last few (parameters, maturities)
are kept (``cos_bank``, ``otm_from_bank``): the gate's probes, its calendar grid and the ATM
vols of a fitted vector share one characteristic-function sweep.

Implied vols: the out-of-the-money price inverted with ``streamer.pricing.implied``; NaN where
that price is not positive (strikes ~8 standard deviations out, below double precision).
Jacobian: ``d iv / d x = (d price / d x) / vega`` (Black vega), the price gradient from the
analytic gradient of ``phi`` summed with the same COS weights (``[a, b]`` held fixed: it only
moves the truncation error).

Bounds: ``v0, theta in [1e-4, 4]``, ``kappa in [0.05, 20]``, ``xi in [0.05, 5]``,
``rho in [-0.99, 0.99]``. No-arbitrage: prices from the characteristic function of a
martingale are free of static arbitrage by construction (convex in strike, increasing in
``T`` at fixed ``k``); the Feller condition ``2 kappa theta >= xi^2`` only says whether ``v``
can touch 0 and is not a static-arbitrage condition, so it is not reported.

References:
    S. Heston, "A closed-form solution for options with stochastic volatility", RFS 6 (1993).
    H. Albrecher, P. Mayer, W. Schoutens, J. Tistaert, "The little Heston trap", Wilmott (2007).
    F. Fang, C. Oosterlee, "A novel pricing method for European options based on Fourier-cosine
    series expansions", SIAM J. Sci. Comput. 31 (2008).
    Y. Cui, S. del Baño Rollin, G. Germano, "Full and fast calibration of the Heston stochastic
    volatility model", EJOR 263 (2017).
    R. Lord, C. Kahl, "Complex logarithms in Heston-like models", Math. Finance 20 (2010).
    L. Andersen, V. Piterbarg, "Moment explosions in stochastic volatility models", Finance
    Stoch. 11 (2007) (explosion times used by ``log_mgf``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import numpy.typing as npt
from numba import njit

from streamer.models.base import FitData, FloatArray, IntArray, Model, Violation, register
from streamer.pricing.black import vega_s
from streamer.pricing.implied import LOWER_TABLE, UPPER_TABLE, implied_vol_scalar

HESTON_NAMES: tuple[str, ...] = ("v0", "kappa", "theta", "xi", "rho")
HESTON_LOWER = np.array([1e-4, 0.05, 1e-4, 0.05, -0.99])
HESTON_UPPER = np.array([4.0, 20.0, 4.0, 5.0, 0.99])
HESTON_SCALE = np.array([0.02, 0.5, 0.02, 0.1, 0.05])

N_PARAMS_MAX = 8  # Heston 5 + Bates jumps 3
TAIL_TOL = 1e-15  # price error allowed from each truncation (domain ends, series end), F = 1
# the tolerance of the least-squares evaluations (``fit_iv_and_jacobian``, ``population_iv``):
# prices to ~1e-7 of the forward, vols of the fitted quotes to ~2e-7 (0.00002 vol points, a
# hundredth of the narrowest half-spread) and the Jacobian to ~1e-5 of its scale, at about a
# third of the terms of ``TAIL_TOL`` (narrower range, shorter series); 1e-10 cost 1.7x more
# per evaluation and moved a real chain's optimum by 1e-9 of its cost
FIT_TOL = 1e-7
# a cold run's first phase (``coarse_iv_and_jacobian``): prices to ~1e-4 of the forward, vols
# of the fitted quotes within ~0.02-0.5 of their half-spreads on the default chain, at about
# half the terms of ``FIT_TOL`` (9e-4 let errors reach 5 half-spreads and lost quotes)
COARSE_TOL = 1e-4
CHERNOFF_STEPS = 40  # s - 1 grid: 2 r0, 2 r0 / sqrt 2, ... (r0: the Gaussian optimum)
CHERNOFF_RATIO = 2.0**-0.5
K_REF = 2.0  # largest log-strike the left-edge fallback protects
FALLBACK_L = 40.0  # half-range in standard deviations where no moment bound applies
MIN_HALF_WIDTH = 6.0  # never narrower than this many standard deviations each side
MAX_HALF_WIDTH = 60.0  # ... nor wider than e^{-+60} in forward (beyond any sane model)
MAX_DECAY_RATIO = 0.999  # a tail that decays slower than this per term counts as 1000 terms
TAIL_RUN = 3  # ... for this many consecutive terms
N_MIN = 16
N_MAX = 1 << 16  # terms per expiry; a series that needs more is not trusted (prices NaN)
TERM_BUDGET = 1 << 17  # terms per call, all expiries: caps the cost (~50 ms) in corners
RESEED = 64  # recompute cos/sin exactly every RESEED terms (rotation drift ~ RESEED eps)
JUMP_RESEED = 16  # ... and the jump factor of the characteristic function (``log_cf``)
# Bates expiries priced as a sum over the number of jumps (``jump_components``)
SPLIT_LAM_T = 0.1  # at most this many jumps expected over the expiry
SPLIT_RATIO = 25.0  # a jump's variance at least this many times the diffusion's
SPLIT_MAX = 6  # at most this many jumps summed
SPLIT_TAIL = 1e-2  # the components left out weigh less than this share of the tolerance
# reference-grade prices (``TAIL_TOL``: the kept coefficients, ``cos_bank``, are of one
# series per expiry) stay one series; the fit's and the coarse tolerances split
SPLIT_MIN_TOL = 1e-12
PROBE_K = np.linspace(-1.5, 1.0, 11)


# --------------------------------------------------------------------------------------------
# characteristic function and its gradient


@njit(cache=True, nogil=True)
def _csqrt(z: complex) -> complex:
    """Principal square root (``Re >= 0``) from real square roots (cheaper than cmath)."""
    x = z.real
    y = z.imag
    r = math.sqrt(x * x + y * y)
    if x >= 0.0:
        re = math.sqrt(0.5 * (r + x))
        return complex(re, 0.5 * y / re) if re > 0.0 else 0j
    im = math.copysign(math.sqrt(0.5 * (r - x)), y)
    return complex(0.5 * y / im, im)


@njit(cache=True, nogil=True)
def _cexp(z: complex) -> complex:
    m = math.exp(z.real)
    return complex(m * math.cos(z.imag), m * math.sin(z.imag))


@njit(cache=True, nogil=True)
def _clog(z: complex) -> complex:
    """Principal logarithm."""
    x = z.real
    y = z.imag
    return complex(0.5 * math.log(x * x + y * y), math.atan2(y, x))


@njit(cache=True, nogil=True)
def _clog1p(z: complex) -> complex:
    """``ln(1 + z)``, accurate for small ``|z|`` (Kahan: ``ln(w) z / (w - 1)``, ``w = 1 + z``)."""
    w = 1.0 + z
    if abs(z.real) + abs(z.imag) > 0.5:
        return _clog(w)
    if w == 1.0:
        return z
    return _clog(w) * (z / (w - 1.0))


@njit(cache=True, nogil=True)
def log_cf(
    u: float,
    T: float,
    p: np.ndarray,
    n_params: int,
    want_grad: bool,
    grad: np.ndarray,
    jump: complex,
    mean_jump: float,
    comp: int = -1,
) -> complex:
    """``ln phi(u)`` of ``X_T = ln(F_T/F_0)``; if ``want_grad``, its gradient into ``grad``.

    ``p = [v0, kappa, theta, xi, rho, lam, mu_j, sigma_j]``; the jump part (Bates 1996,
    lognormal jumps, compensated) is included when ``n_params == 8``, from the caller's
    ``jump = E[e^{i u J}] = exp(i u mu_j - u^2 sigma_j^2 / 2)`` and
    ``mean_jump = E[e^J] = exp(mu_j + sigma_j^2 / 2)`` (``_cos_coefficients``: along the COS
    grid by recurrence). ``comp >= 0``: the component with exactly ``comp`` jumps
    (``log_mgf``), ``jump`` unused; its gradient leaves out that of ``P(N_T = comp)``.
    """
    v0 = p[0]
    kappa = p[1]
    theta = p[2]
    xi = p[3]
    rho = p[4]
    iu = complex(0.0, u)
    q = complex(u * u, u)
    beta = complex(kappa, -xi * rho * u)
    d = _csqrt(beta * beta + xi * xi * q)
    e = _cexp(-d * T)
    t = (1.0 - e) / (1.0 + e)
    inv_den = 1.0 / (d + beta * t)
    a_hat = q * t * inv_den
    inv_d = 1.0 / d
    r = beta * inv_d
    # beta - d and G - 1 = (r - 1)(1 - e)/2 without cancellation (Re(beta + d) >= kappa > 0),
    # so that ln phi = -v0 A + (2 kappa theta / xi^2) [(beta - d) T/2 - ln G] keeps its
    # digits when xi is small (the -kappa theta rho i u T / xi of D cancels analytically)
    b_minus_d = -xi * xi * q / (beta + d)
    g_minus_1 = 0.5 * b_minus_d * inv_d * (1.0 - e)
    g = 1.0 + g_minus_1
    d_tilde = 0.5 * b_minus_d * T - _clog1p(g_minus_1)
    c_kt = 2.0 * kappa * theta / (xi * xi)
    lnphi: complex = -v0 * a_hat + c_kt * d_tilde
    big_d = d_tilde + 0.5 * xi * rho * T * iu  # D of the module docstring
    drift = kappa * theta * rho * T / xi  # times -i u
    if want_grad:
        # derivatives of A and D in beta and d (taken as independent), then the chain rule
        t_d = 0.5 * T * (1.0 - t * t)
        qd2 = q * inv_den * inv_den
        a_beta = -qd2 * t * t
        a_d = qd2 * (t_d * d - t)
        inv_g = 1.0 / g
        one_me = 1.0 - e
        dd_beta = -0.5 * one_me * inv_d * inv_g
        dd_d = -0.5 * T + (0.5 * r * one_me * inv_d + 0.5 * (1.0 - r) * T * e) * inv_g
        # d beta / d p and d d / d p for p = kappa, rho, xi
        d_kappa = r
        beta_rho = complex(0.0, -xi * u)
        d_rho = r * beta_rho
        beta_xi = complex(0.0, -rho * u)
        d_xi = r * beta_xi + xi * q * inv_d
        grad[0] = -a_hat
        grad[1] = (
            -theta * rho * T / xi * iu
            - v0 * (a_beta + a_d * d_kappa)
            + 2.0 * theta / (xi * xi) * big_d
            + c_kt * (0.5 * T + dd_beta + dd_d * d_kappa)
        )
        grad[2] = -kappa * rho * T / xi * iu + 2.0 * kappa / (xi * xi) * big_d
        grad[3] = (
            drift / xi * iu
            - v0 * (a_beta * beta_xi + a_d * d_xi)
            - 2.0 * c_kt / xi * big_d
            + c_kt * (dd_beta * beta_xi + dd_d * d_xi)
        )
        grad[4] = (
            -kappa * theta * T / xi * iu
            - v0 * (a_beta * beta_rho + a_d * d_rho)
            + c_kt * (dd_beta * beta_rho + dd_d * d_rho)
        )
    if n_params == N_PARAMS_MAX and comp >= 0:
        lam = p[5]
        mu = p[6]
        sj = p[7]
        lnphi += comp * complex(-0.5 * u * u * sj * sj, u * mu) - iu * (lam * T * (mean_jump - 1.0))
        if want_grad:
            grad[5] = -iu * (T * (mean_jump - 1.0))
            grad[6] = iu * (comp - lam * T * mean_jump)
            grad[7] = complex(-comp * u * u * sj, -u * lam * T * sj * mean_jump)
    elif n_params == N_PARAMS_MAX:
        lam = p[5]
        sj = p[7]
        part = jump - 1.0 - iu * (mean_jump - 1.0)
        lnphi += lam * T * part
        if want_grad:
            grad[5] = T * part
            grad[6] = lam * T * iu * (jump - mean_jump)
            grad[7] = -lam * T * sj * (u * u * jump + iu * mean_jump)
    return lnphi


@njit(cache=True, nogil=True)
def _mean_and_var_guess(
    T: float, p: np.ndarray, n_params: int, comp: int = -1
) -> tuple[float, float]:
    """``c1 = E[X_T]`` (exact) and a rough variance (expected integrated variance + jumps);
    ``comp >= 0``: of the Bates component with exactly ``comp`` jumps (``otm_prices``)."""
    kappa = p[1]
    theta = p[2]
    kt = kappa * T
    # (1 - e^{-kappa T}) / kappa without cancellation
    decay = -math.expm1(-kt) / kappa if kt > 1e-8 else T * (1.0 - 0.5 * kt)
    w = theta * T + (p[0] - theta) * decay  # E[int_0^T v dt]
    c1 = -0.5 * w
    var = w
    if n_params == N_PARAMS_MAX:
        lam = p[5]
        mu = p[6]
        sj = p[7]
        if comp >= 0:
            c1 += comp * mu - lam * T * math.expm1(mu + 0.5 * sj * sj)
            var += comp * sj * sj
        else:
            c1 += lam * T * (mu - math.expm1(mu + 0.5 * sj * sj))
            var += lam * T * (mu * mu + sj * sj)
    return c1, max(var, 1e-300)


@njit(cache=True, nogil=True)
def log_mgf(s: float, T: float, p: np.ndarray, n_params: int, comp: int = -1) -> float:
    """``ln E[e^{s X_T}]`` for real ``s``; ``+inf`` where the moment explodes before ``T``
    (``comp >= 0``: ``ln E[e^{s X_T}; N_T = comp] - ln P(N_T = comp)``, the Bates component
    with exactly ``comp`` jumps: the diffusion's, times ``comp`` Gaussian jumps, times the
    compensator's ``e^{-s lam m T}``).

    With ``q = s(1 - s)``, ``beta = kappa - xi rho s`` real and ``d^2 = beta^2 + xi^2 q``:
    ``C = cosh(dT/2) e^{-dT/2}``, ``S = sinh(dT/2) e^{-dT/2} / d`` for ``d^2 >= 0`` (and
    ``C = cos(w T/2)``, ``S = sin(w T/2)/w`` with ``d = i w``, no scaling, otherwise); the
    moment is finite while ``C + beta S > 0`` (first zero = explosion time, Andersen and
    Piterbarg 2007), and then ``A = q S / (C + beta S)``,
    ``D = kappa T/2 - y - ln(C + beta S)`` (``y = dT/2`` real part, 0 in the oscillating case).
    """
    v0 = p[0]
    kappa = p[1]
    theta = p[2]
    xi = p[3]
    rho = p[4]
    q = s * (1.0 - s)
    beta = kappa - xi * rho * s
    d2 = beta * beta + xi * xi * q
    if d2 >= 0.0:
        d = math.sqrt(d2)
        y = 0.5 * d * T
        e2 = math.exp(-2.0 * y)
        c = 0.5 * (1.0 + e2)
        sd = -0.5 * math.expm1(-2.0 * y) / d if y > 1e-8 else 0.5 * T
    else:
        w = math.sqrt(-d2)
        tau = 0.5 * w * T
        if tau >= math.pi:
            return math.inf
        y = 0.0
        c = math.cos(tau)
        sd = math.sin(tau) / w
    den = c + beta * sd
    if not den > 0.0:
        return math.inf
    a_hat = q * sd / den
    big_d = 0.5 * kappa * T - y - math.log(den)
    out = -kappa * theta * rho * s * T / xi - v0 * a_hat + 2.0 * kappa * theta / (xi * xi) * big_d
    if n_params == N_PARAMS_MAX and comp >= 0:
        mu = p[6]
        sj = p[7]
        drift = p[5] * T * math.expm1(mu + 0.5 * sj * sj)  # the compensator
        out += comp * (s * mu + 0.5 * s * s * sj * sj) - s * drift
    elif n_params == N_PARAMS_MAX and p[5] != 0.0:
        lam = p[5]
        mu = p[6]
        sj = p[7]
        expo = s * mu + 0.5 * s * s * sj * sj
        if expo > 700.0:
            return math.inf
        out += lam * T * (math.exp(expo) - 1.0 - s * math.expm1(mu + 0.5 * sj * sj))
    return out if math.isfinite(out) else math.inf


@njit(cache=True, nogil=True)
def truncation_range(
    T: float, p: np.ndarray, n_params: int, tol: float = TAIL_TOL, comp: int = -1
) -> tuple[float, float]:
    """COS range ``[a, b]`` outside which the tails move no price by more than ``tol``
    (default ``TAIL_TOL``).

    The cosine series sees the density folded into ``[a, b]`` (mirrored at ``a`` and ``b``).
    A put of strike ``k`` then errs by at most ``E[e^{2a - X}; X < a]`` from the left tail
    (mass at ``a - y`` is priced at ``a + y``; ``e^k <= e^{2a - X}`` where it folds past
    ``k``), and a put or parity call by at most ``E[e^X; X > b]`` from the right tail. With
    the exact moment generating function ``M`` (``log_mgf``) Chernoff's bounds give

        E[e^{2a - X}; X < a] <= M(-s) e^{(1 + s) a},    E[e^X; X > b] <= M(s) e^{(1 - s) b}

    for ``s >= 1``; each edge is the best over a grid of ``s = 1 + r``, ``r = 2 r0 2^{-j/2}``
    (``r0`` the Gaussian optimum), scanned down until the bound stops improving (above the
    moment explosion ``M`` is infinite, below the optimum the bound worsens). Exponential
    (heavy) tails, which the cumulant rule of Fang and Oosterlee (2008) under-covers, get
    the room they need. If no ``s >= 1`` moment is finite (a very heavy tail), the left edge
    falls back to ``e^{K_REF} P(X < a) <= e^{K_REF} M(-s) e^{s a}`` with ``s < 1``, the right
    edge to ``FALLBACK_L`` standard deviations.
    """
    c1, var = _mean_and_var_guess(T, p, n_params, comp)
    sd = math.sqrt(var)
    ln_tol = math.log(tol)
    r0 = math.sqrt(-2.0 * ln_tol) / sd  # optimal s for a Gaussian of this variance
    a = -math.inf
    b = math.inf
    r = 2.0 * r0
    found_a = False
    found_b = False
    done_a = False
    done_b = False
    for _ in range(CHERNOFF_STEPS):
        s = 1.0 + r
        if not done_a:
            lm = log_mgf(-s, T, p, n_params, comp)
            if lm < math.inf:
                edge = (ln_tol - lm) / (1.0 + s)
                if edge > a:
                    a = edge
                    found_a = True
                elif found_a:
                    done_a = True
        if not done_b:
            lm = log_mgf(s, T, p, n_params, comp)
            if lm < math.inf:
                edge = (lm - ln_tol) / (s - 1.0)
                if edge < b:
                    b = edge
                    found_b = True
                elif found_b:
                    done_b = True
        if done_a and done_b:
            break
        r *= CHERNOFF_RATIO
    if not found_a:
        r = 2.0 * r0
        for _ in range(CHERNOFF_STEPS):
            lm = log_mgf(-r, T, p, n_params, comp)
            if lm < math.inf:
                a = max(a, (ln_tol - K_REF - lm) / r)
            r *= CHERNOFF_RATIO
    if not found_b:
        b = c1 + FALLBACK_L * sd
    if not math.isfinite(a):
        a = c1 - FALLBACK_L * sd
    a = max(min(a, c1 - MIN_HALF_WIDTH * sd), c1 - MAX_HALF_WIDTH)
    b = min(max(b, c1 + MIN_HALF_WIDTH * sd), c1 + MAX_HALF_WIDTH)
    return a, b


# --------------------------------------------------------------------------------------------
# COS sums


@njit(cache=True, nogil=True)
def _cos_coefficients(
    T: float,
    p: np.ndarray,
    n_params: int,
    a: float,
    width: float,
    want_grad: bool,
    n_max: int,
    tol: float = TAIL_TOL,
    comp: int = -1,
) -> tuple[np.ndarray, int, bool]:
    """Rows ``n`` of ``[Re(phi e^{-i u a}), Re(d_p phi e^{-i u a}) ...]`` until ``phi`` dies;
    the flag says whether it did within ``n_max`` terms."""
    cols = n_params + 1 if want_grad else 1
    cap = 256
    coef = np.empty((cap, cols))
    grad = np.empty(N_PARAMS_MAX, dtype=np.complex128)
    du = math.pi / width
    run = 0
    n = 0
    prev_mod = 0.0
    jumps = n_params == N_PARAMS_MAX and comp < 0
    mu_j = p[6] if n_params == N_PARAMS_MAX else 0.0
    s2 = p[7] * p[7] if n_params == N_PARAMS_MAX else 0.0
    mean_jump = math.exp(mu_j + 0.5 * s2)
    # E[e^{i u_n J}] along u_n = n du: jump_{n+1} = jump_n step_n, step_{n+1} = step_n decay,
    # recomputed exactly every JUMP_RESEED terms (rounding drift ~ JUMP_RESEED eps)
    jump = 1.0 + 0j
    step = 1.0 + 0j
    decay = math.exp(-s2 * du * du)
    while n < n_max:
        if n == cap:
            bigger = np.empty((2 * cap, cols))
            for i in range(cap):
                for j in range(cols):
                    bigger[i, j] = coef[i, j]
            coef = bigger
            cap *= 2
        u = n * du
        if jumps and n % JUMP_RESEED == 0:
            jump = _cexp(complex(-0.5 * u * u * s2, u * mu_j))
            step = _cexp(complex(-0.5 * s2 * du * du * (2 * n + 1), du * mu_j))
        lnphi = log_cf(u, T, p, n_params, want_grad, grad, jump, mean_jump, comp)
        if jumps:
            jump *= step
            step *= decay
        mod = math.exp(lnphi.real)  # |phi|
        arg = lnphi.imag - u * a
        shift = complex(mod * math.cos(arg), mod * math.sin(arg))  # phi e^{-i u a}
        coef[n, 0] = shift.real
        if want_grad:
            for j in range(n_params):
                coef[n, j + 1] = (shift * grad[j]).real
        n += 1
        # weight of this term in a price is about (2/width) |phi| / (1 + u^2); gradients
        # carry an extra factor of about u^2 T (that of v0). The terms left out sum to about
        # size / (1 - ratio) with ratio the current decay of |phi| per term: slow
        # (exponential) decay, as in long expiries, needs many more terms than the last one
        # suggests.
        size = mod * 2.0 / (width * (1.0 + u * u))
        if want_grad:
            size *= 1.0 + u * u * T
        ratio = mod / prev_mod if prev_mod > 0.0 else 1.0
        prev_mod = mod
        tail = size / (1.0 - ratio) if ratio < MAX_DECAY_RATIO else size / (1.0 - MAX_DECAY_RATIO)
        run = run + 1 if tail < tol else 0
        if run >= TAIL_RUN and n >= N_MIN:
            return coef, n, True
    return coef, n, False


@njit(cache=True, nogil=True)
def _price_group(
    k: np.ndarray,
    coef: np.ndarray,
    n_terms: int,
    n_params: int,
    a: float,
    b: float,
    want_grad: bool,
    out_price: np.ndarray,
    out_grad: np.ndarray,
    mart: float,
    dmart: np.ndarray,
) -> None:
    """Out-of-the-money prices (and gradients) of the strikes ``k`` of one expiry: puts from
    the series, calls by parity with ``mart = E[e^X]`` (1: a martingale; a Bates component,
    ``otm_prices``, has its own, with gradient ``dmart``). 0 outside ``[a, b]``."""
    m = k.shape[0]
    width = b - a
    du = math.pi / width
    ea = math.exp(a)
    n_g = n_params if want_grad else 0
    ek = np.exp(k)
    # rotation per strike and the running cos/sin of u_n (k - a)
    step = np.empty(m)
    rot_c = np.empty(m)
    rot_s = np.empty(m)
    cs = np.ones(m)
    sn = np.zeros(m)
    acc = np.zeros((n_g + 1, m))
    for i in range(m):
        step[i] = du * (k[i] - a)
        rot_c[i] = math.cos(step[i])
        rot_s[i] = math.sin(step[i])
    # k-independent part: sum' coef_n e^a / (1 + u_n^2), and the n = 0 term
    const = np.zeros(n_g + 1)
    for n in range(1, n_terms):
        u = n * du
        w1 = 1.0 / (1.0 + u * u)
        for j in range(n_g + 1):
            const[j] += coef[n, j] * w1
    for n in range(1, n_terms):
        u = n * du
        w1 = 1.0 / (1.0 + u * u)
        g1 = w1 / u
        if n % RESEED == 0:
            for i in range(m):
                cs[i] = math.cos(n * step[i])
                sn[i] = math.sin(n * step[i])
        else:
            for i in range(m):
                c = cs[i] * rot_c[i] - sn[i] * rot_s[i]
                sn[i] = cs[i] * rot_s[i] + sn[i] * rot_c[i]
                cs[i] = c
        for j in range(n_g + 1):
            bj = coef[n, j] * g1
            cj = coef[n, j] * w1
            for i in range(m):
                acc[j, i] += sn[i] * bj - cs[i] * cj
    scale = 2.0 / width
    for i in range(m):
        ki = k[i]
        if ki < a or ki > b:  # no density mass there: the OTM option is worth nothing
            out_price[i] = 0.0
            for j in range(n_g):
                out_grad[i, j] = 0.0
            continue
        v0_put = ek[i] * (ki - a - 1.0) + ea  # n = 0 coefficient, (b - a)/2 V_0
        put = scale * (0.5 * coef[0, 0] * v0_put + ek[i] * acc[0, i] + ea * const[0])
        out_price[i] = put if ki < 0.0 else put + mart - ek[i]
        for j in range(n_g):
            out_grad[i, j] = scale * (
                0.5 * coef[0, j + 1] * v0_put + ek[i] * acc[j + 1, i] + ea * const[j + 1]
            )
            if ki >= 0.0:
                out_grad[i, j] += dmart[j]


@njit(cache=True, nogil=True)
def maturity_buckets(
    k: np.ndarray, T: np.ndarray, t_list: np.ndarray, price: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The points with finite ``k`` and a positive ``T`` in ``t_list``, grouped by maturity
    (``_buckets``: ``start, order``); ``price`` of a ``T <= 0`` point set to 0 (no time
    value), the rest of ``price`` untouched."""
    n_t = t_list.shape[0]
    group = np.full(k.shape[0], -1, dtype=np.int64)
    for i in range(k.shape[0]):
        if not (math.isfinite(T[i]) and math.isfinite(k[i])):
            continue
        if T[i] <= 0.0:
            price[i] = 0.0
            continue
        for j in range(n_t):
            if t_list[j] == T[i]:
                group[i] = j
                break
    return _buckets(group, n_t)


@njit(cache=True, nogil=True)
def _buckets(group: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Counting sort of the points by ``group`` (``-1``: none): ``start`` (``n_groups + 1``
    offsets) and ``order``, the points of group ``j`` at ``order[start[j]:start[j + 1]]`` in
    their original order."""
    start = np.zeros(n_groups + 1, dtype=np.int64)
    for i in range(group.shape[0]):
        if group[i] >= 0:
            start[group[i] + 1] += 1
    for j in range(n_groups):
        start[j + 1] += start[j]
    fill = start[:-1].copy()
    order = np.empty(start[n_groups], dtype=np.int64)
    for i in range(group.shape[0]):
        if group[i] >= 0:
            order[fill[group[i]]] = i
            fill[group[i]] += 1
    return start, order


@njit(cache=True, nogil=True)
def otm_prices(
    p: np.ndarray,
    n_params: int,
    k: np.ndarray,
    T: np.ndarray,
    want_grad: bool,
    tol: float = TAIL_TOL,
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-the-money prices (put ``k < 0``, call ``k >= 0``, per unit forward) and, if
    ``want_grad``, their gradient ``(n, n_params)`` in ``p``; one COS expansion per unique T.

    ``T <= 0`` gives 0 (no time value); non-finite ``k`` or ``T`` give NaN.
    """
    n = k.shape[0]
    price = np.empty(n)
    grad = np.zeros((n, n_params if want_grad else 0))
    # group the points by expiry (counting sort on the distinct T, in order of appearance)
    group = np.empty(n, dtype=np.int64)
    uniq = np.empty(n)
    n_u = 0
    for i in range(n):
        if not (math.isfinite(T[i]) and math.isfinite(k[i])):
            group[i] = -1
            price[i] = math.nan
            continue
        j = 0
        while j < n_u and uniq[j] != T[i]:
            j += 1
        if j == n_u:
            uniq[n_u] = T[i]
            n_u += 1
        group[i] = j
    start, order = _buckets(group, n_u)
    budget = TERM_BUDGET
    for j in range(n_u):
        t_now = uniq[j]
        idx = order[start[j] : start[j + 1]]
        if t_now <= 0.0:
            for i in idx:
                price[i] = 0.0
            continue
        kk = k[idx]
        pp = np.zeros(kk.shape[0])
        gg = np.zeros((kk.shape[0], n_params if want_grad else 0))
        used = _price_expiry(t_now, p, n_params, kk, want_grad, tol, min(N_MAX, budget), pp, gg)
        if used < 0:  # pathological parameters (see N_MAX): no trustworthy price
            for i in idx:
                price[i] = math.nan
            continue
        budget -= used
        for i in range(idx.shape[0]):
            price[idx[i]] = pp[i]
            for j2 in range(gg.shape[1]):
                grad[idx[i], j2] = gg[i, j2]
    return price, grad


@njit(cache=True, nogil=True)
def jump_components(T: float, p: np.ndarray, n_params: int, tol: float) -> int:
    """How many Bates components ``otm_prices`` sums for expiry ``T`` (``N`` of ``n = 0..N``
    jumps), or -1 for one expansion of the whole law.

    Over a short expiry, rare jumps much wider than the diffusion make a spiky mixture: a
    narrow peak and a far, thin tail. One cosine series then needs the tail's range at the
    peak's resolution (Bates' crash regime, ``lam T ~ 2e-4``, ``sigma_j ~ 1``, on a daily:
    ~200 terms at ``COARSE_TOL``), while conditioned on the number of jumps each part is
    either the narrow diffusion or a wide, smooth Gaussian blur of it, a few tens of terms
    each. Split when ``tol >= SPLIT_MIN_TOL``, ``lam T <= SPLIT_LAM_T``, a jump's variance
    is at least ``SPLIT_RATIO`` times the diffusion's over ``T``, and the components beyond
    ``SPLIT_MAX`` jumps weigh less than ``SPLIT_TAIL * tol`` (each by ``P(N_T = n)`` times
    the most an option is worth under it).

    Conditioned on ``N_T = n`` (independent of the diffusion), ``X_T`` is the diffusion's
    log-return plus ``n`` Gaussian jumps minus the compensator ``lam m T``: characteristic
    function ``phi_H(u) exp(n (i u mu_j - u^2 sigma_j^2 / 2) - i u lam m T)`` (Merton 1976's
    series, here over Heston's law)."""
    if n_params != N_PARAMS_MAX or not p[5] > 0.0 or tol < SPLIT_MIN_TOL:
        return -1
    lam_t = p[5] * T
    if lam_t > SPLIT_LAM_T:
        return -1
    _, w = _mean_and_var_guess(T, p, 5)
    if p[6] * p[6] + p[7] * p[7] < SPLIT_RATIO * w:
        return -1
    # the components left out weigh P(N_T = n) max(1, E[e^X | n jumps]) each (a call is worth
    # at most the latter): their sum, from the last term kept down (no cancellation)
    # (term n + 1 is term n times lam T growth / (n + 1), at most 0.85 / (n + 1) within the
    # bounds: 40 terms past SPLIT_MAX leave nothing a tolerance sees)
    growth = max(1.0, math.exp(p[6] + 0.5 * p[7] * p[7]))
    terms = np.empty(SPLIT_MAX + 40)
    weight = math.exp(-lam_t)
    for n in range(terms.shape[0]):
        if n > 0:
            weight *= lam_t * growth / n
        terms[n] = weight
    tail = 0.0
    for n in range(terms.shape[0] - 1, SPLIT_MAX, -1):
        tail += terms[n]
    best = -1
    for n in range(SPLIT_MAX, -1, -1):  # the fewest components whose tail is small enough
        if tail < SPLIT_TAIL * tol:
            best = n
        tail += terms[n]
    return best


@njit(cache=True, nogil=True)
def _price_expiry(
    T: float,
    p: np.ndarray,
    n_params: int,
    k: np.ndarray,
    want_grad: bool,
    tol: float,
    n_max: int,
    out_price: np.ndarray,
    out_grad: np.ndarray,
) -> int:
    """``otm_prices`` of the strikes ``k`` of one expiry into ``out_price``/``out_grad``
    (zeroed by the caller): one cosine series of the whole law, or (``jump_components``) the
    sum over ``n`` of ``P(N_T = n)`` times the price under the component with ``n`` jumps
    (its own range and series; the gradient adds ``d P(N_T = n) / d lam`` times its price).
    The terms used, -1 when a series did not converge within ``n_max``."""
    n_comp = jump_components(T, p, n_params, tol)
    m = k.shape[0]
    n_g = n_params if want_grad else 0
    pp = np.empty(m)
    gg = np.zeros((m, n_g))
    dmart = np.zeros(N_PARAMS_MAX)
    if n_comp < 0:
        a, b = truncation_range(T, p, n_params, tol)
        coef, n_terms, ok = _cos_coefficients(T, p, n_params, a, b - a, want_grad, n_max, tol)
        if not ok:
            return -1
        _price_group(k, coef, n_terms, n_params, a, b, want_grad, out_price, out_grad, 1.0, dmart)
        return n_terms
    lam_t = p[5] * T
    mean_jump = math.exp(p[6] + 0.5 * p[7] * p[7])
    used = 0
    w_prev = 0.0
    w = math.exp(-lam_t)
    for n in range(n_comp + 1):
        if n > 0:
            w_prev = w
            w *= lam_t / n
        a, b = truncation_range(T, p, n_params, tol, n)
        coef, n_terms, ok = _cos_coefficients(
            T, p, n_params, a, b - a, want_grad, n_max - used, tol, n
        )
        if not ok:
            return -1
        used += n_terms
        # E[e^X] of the component: n jumps' e^J, the compensator's e^{-lam m T}
        log_mart = n * (p[6] + 0.5 * p[7] * p[7]) - lam_t * (mean_jump - 1.0)
        mart = math.exp(log_mart)
        if want_grad:
            dmart[5] = -T * (mean_jump - 1.0) * mart
            dmart[6] = (n - lam_t * mean_jump) * mart
            dmart[7] = (n - lam_t * mean_jump) * p[7] * mart
        _price_group(k, coef, n_terms, n_params, a, b, want_grad, pp, gg, mart, dmart)
        for i in range(m):
            # beyond the component's range (no mass there): a put above b and a call below a
            # are worth their intrinsic value against ``mart`` (the martingale's never are)
            if (k[i] > b and k[i] < 0.0) or (k[i] < a and k[i] >= 0.0):
                sign = -1.0 if k[i] > b else 1.0
                pp[i] = sign * (mart - math.exp(k[i]))
                for q in range(n_g):
                    gg[i, q] = sign * dmart[q]
        dw = T * (w_prev - w)  # d P(N_T = n) / d lam
        for i in range(m):
            out_price[i] += w * pp[i]
            for q in range(n_g):
                out_grad[i, q] += w * gg[i, q]
            if want_grad:
                out_grad[i, 5] += dw * pp[i]
    return used


@njit(cache=True, nogil=True)
def cos_bank(
    p: np.ndarray, n_params: int, t_list: np.ndarray, tol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The price coefficients ``Re(phi(u_n) e^{-i u_n a})`` of every maturity of ``t_list``
    (positive, distinct) stacked in one bank, with per maturity ``meta = [first row, terms,
    converged]`` and ``ranges = [a, b]``: what ``otm_prices`` computes per call, kept so that
    several evaluations at one parameter vector (the gate's probes, the calendar grid, the
    ATM vols) pay for the characteristic function once (``otm_from_bank``)."""
    n_t = t_list.shape[0]
    meta = np.zeros((n_t, 3), dtype=np.int64)
    ranges = np.zeros((n_t, 2))
    parts = []
    rows = 0
    budget = TERM_BUDGET
    for j in range(n_t):
        a, b = truncation_range(t_list[j], p, n_params, tol)
        n_max = min(N_MAX, budget)
        coef, n_terms, converged = _cos_coefficients(
            t_list[j], p, n_params, a, b - a, False, n_max, tol
        )
        budget -= n_terms
        meta[j, 0] = rows
        meta[j, 1] = n_terms
        meta[j, 2] = 1 if converged else 0
        ranges[j, 0] = a
        ranges[j, 1] = b
        parts.append(coef[:n_terms, 0].copy())
        rows += n_terms
    bank = np.empty((rows, 1))
    for j in range(n_t):
        r0 = meta[j, 0]
        part = parts[j]
        for i in range(part.shape[0]):
            bank[r0 + i, 0] = part[i]
    return bank, meta, ranges


@njit(cache=True, nogil=True)
def otm_from_bank(
    bank: np.ndarray,
    meta: np.ndarray,
    ranges: np.ndarray,
    t_list: np.ndarray,
    k: np.ndarray,
    T: np.ndarray,
) -> np.ndarray:
    """Out-of-the-money prices at ``(k, T)`` from ``cos_bank`` coefficients: those of
    ``otm_prices`` (without gradient) for maturities in ``t_list``; ``T <= 0`` gives 0, a
    non-finite input, a maturity not in ``t_list`` or one whose series did not converge NaN."""
    n = k.shape[0]
    n_t = t_list.shape[0]
    price = np.full(n, math.nan)
    no_grad = np.zeros(0)
    count, order = maturity_buckets(k, T, t_list, price)
    for j in range(n_t):
        if count[j + 1] == count[j] or meta[j, 2] == 0:
            continue
        idx = order[count[j] : count[j + 1]]
        r0, n_terms = meta[j, 0], meta[j, 1]
        kk = k[idx]
        pp = np.empty(kk.shape[0])
        gg = np.zeros((kk.shape[0], 0))
        _price_group(
            kk, bank[r0 : r0 + n_terms], n_terms, 0, ranges[j, 0], ranges[j, 1], False, pp, gg,
            1.0, no_grad,
        )  # fmt: skip
        for i in range(idx.shape[0]):
            price[idx[i]] = pp[i]
    return price


@njit(cache=True, nogil=True)
def _ivs(price: np.ndarray, k: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Black implied vols of out-of-the-money prices (F = 1, K = e^k)."""
    out = np.empty(price.shape[0])
    for i in range(price.shape[0]):
        out[i] = implied_vol_scalar(
            price[i], 1.0, math.exp(k[i]), T[i], k[i] >= 0.0, LOWER_TABLE, UPPER_TABLE
        )
    return out


@njit(cache=True, nogil=True)
def iv_and_jacobian(
    p: np.ndarray,
    n_params: int,
    k: np.ndarray,
    T: np.ndarray,
    want_grad: bool,
    tol: float = TAIL_TOL,
) -> tuple[np.ndarray, np.ndarray]:
    """Implied vols and ``d iv / d p = (d price / d p) / vega``; NaN rows where iv is NaN."""
    price, grad = otm_prices(p, n_params, k, T, want_grad, tol)
    iv = _ivs(price, k, T)
    if want_grad:
        for i in range(k.shape[0]):
            s = iv[i] * math.sqrt(T[i])
            # Black vega per unit forward: sqrt(F K) db/ds dsqrt(T) with x = -|k|
            vega = math.exp(0.5 * k[i]) * vega_s(-abs(k[i]), s) * math.sqrt(T[i])
            if math.isfinite(iv[i]) and vega > 0.0:
                for j in range(n_params):
                    grad[i, j] /= vega
            else:
                for j in range(n_params):
                    grad[i, j] = math.nan
    return iv, grad


@njit(cache=True, nogil=True)
def population_ivs(
    P: np.ndarray, n_params: int, k: np.ndarray, T: np.ndarray, tol: float = TAIL_TOL
) -> np.ndarray:
    """Implied vols ``(n_pop, n)`` of every parameter row of ``P`` (``(n_pop, n_params)``) at
    the points ``(k, T)``: a whole population of a global search (differential evolution,
    CMA-ES) in one call; NaN where ``iv_and_jacobian`` gives NaN."""
    out = np.empty((P.shape[0], k.shape[0]))
    p = np.zeros(N_PARAMS_MAX)
    for r in range(P.shape[0]):
        for j in range(n_params):
            p[j] = P[r, j]
        price, _ = otm_prices(p, n_params, k, T, False, tol)
        out[r] = _ivs(price, k, T)
    return out


# --------------------------------------------------------------------------------------------
# the model


_Bank = tuple[FloatArray, npt.NDArray[np.int64], FloatArray]  # cos_bank's (bank, meta, ranges)
BANK_CACHE = 4  # (parameters, maturities) whose coefficients a model keeps


def _as_f64(a: npt.ArrayLike) -> FloatArray:
    return np.ascontiguousarray(a, dtype=np.float64).ravel()


def with_parity(otm: FloatArray, k: FloatArray, is_call: npt.NDArray[np.bool_]) -> FloatArray:
    """Prices (F = 1) of the options asked for from the out-of-the-money prices ``otm`` (put
    for ``k < 0``, call for ``k >= 0``): parity ``C - P = 1 - e^k`` adds the intrinsic value
    of the in-the-money side."""
    calls = np.asarray(is_call, dtype=np.bool_).ravel()
    intrinsic = np.where(calls, np.maximum(1.0 - np.exp(k), 0.0), 0.0)
    intrinsic = np.where(~calls & (k >= 0.0), np.exp(k) - 1.0, intrinsic)
    out: FloatArray = np.where(calls == (k >= 0.0), otm, otm + intrinsic)
    return out


class _CharacteristicFunctionModel(Model):
    """Shared plumbing of Heston and Bates: COS prices, implied vols, Jacobian, checks."""

    per_expiry: ClassVar[bool] = False
    any_maturity: ClassVar[bool] = True
    # cold and regime fits from the network's guess (``streamer.calib.learned``; Bates with
    # its rival jump regimes), measured on the 56 BTC and ETH chains of the shared snapshots:
    # Heston reached the optimum on all in a median 10 evaluations (hand-made starts: 38),
    # Bates on all in 66 (hand-made: 53 in 165) (``bench calib --success``)
    calib_defaults: ClassVar[dict[str, object]] = {"cold_start": "learned"}
    names: ClassVar[tuple[str, ...]]
    lower: ClassVar[FloatArray]
    upper: ClassVar[FloatArray]
    scales: ClassVar[FloatArray]

    def __init__(self, *, prefetch_jacobian: bool = True, fit_tol: float = FIT_TOL) -> None:
        """``prefetch_jacobian``: ``implied_vol`` also computes the Jacobian (about 2x its
        own cost) so that the ``jacobian`` call a least-squares iteration makes next at the
        same point is free; only at the points of the last ``jacobian`` request (a fit's
        quotes), so that other evaluations (a calendar grid, the ATM vols) cost the vols
        alone. Turn it off where vols are wanted without Jacobians. ``fit_tol``: the COS
        truncation tolerance of ``fit_iv_and_jacobian`` and ``population_iv`` (what a fit
        evaluates at its quotes); every other price and vol keeps ``TAIL_TOL``."""
        if not 0.0 < fit_tol < 1e-3:
            raise ValueError(f"{self.name}: fit_tol must lie in (0, 1e-3), got {fit_tol}")
        self.prefetch_jacobian = prefetch_jacobian
        self.fit_tol = fit_tol
        # the cos_bank coefficients of the last few (parameters, maturities) asked for
        self._banks: list[tuple[tuple[bytes, bytes], _Bank]] = []
        self._prefetched: tuple[FloatArray, FloatArray, FloatArray, FloatArray] | None = None
        self._jac_inputs: tuple[FloatArray, FloatArray] | None = None  # of the last jacobian

    def _params(self, x: FloatArray) -> FloatArray:
        p = np.zeros(N_PARAMS_MAX)
        p[: len(self.names)] = _as_f64(x)
        return p

    def param_names(self, n_slices: int) -> tuple[str, ...]:
        return self.names

    def bounds(self, n_slices: int) -> tuple[FloatArray, FloatArray]:
        return self.lower.copy(), self.upper.copy()

    def scale(self, n_slices: int, slice_T: FloatArray | None = None) -> FloatArray:
        return self.scales.copy()

    def _bank(self, p: FloatArray, T: FloatArray) -> tuple[_Bank, FloatArray]:
        """The reference-grade coefficients (``TAIL_TOL``) of ``p`` at the distinct positive
        maturities of ``T``, from the cache when the last few calls asked for them."""
        ok = np.isfinite(T) & (T > 0.0)
        t_list = np.unique(T[ok]) if not ok.all() else np.unique(T)
        key = (p.tobytes(), t_list.tobytes())
        for i, (k_, bank) in enumerate(self._banks):
            if k_ == key:
                if i:
                    self._banks.insert(0, self._banks.pop(i))
                return bank, t_list
        bank = cos_bank(p, len(self.names), t_list, TAIL_TOL)
        self._banks.insert(0, (key, bank))
        del self._banks[BANK_CACHE:]
        return bank, t_list

    def _otm_alone(self, x: FloatArray, t: float) -> FloatArray:
        """The probe prices of one maturity in a sweep of their own (its own term budget)."""
        price, _ = otm_prices(
            self._params(x), len(self.names), PROBE_K, np.full(PROBE_K.shape, t), False
        )
        out: FloatArray = price
        return out

    def otm_price(self, x: FloatArray, k: FloatArray, T: FloatArray) -> FloatArray:
        """Out-of-the-money prices: put for ``k < 0``, call for ``k >= 0`` (F = 1); the
        coefficients of the last few parameter vectors and maturities are kept (``_bank``)."""
        p, kk, tt = self._params(x), _as_f64(k), _as_f64(T)
        (bank, meta, ranges), t_list = self._bank(p, tt)
        out: FloatArray = otm_from_bank(bank, meta, ranges, t_list, kk, tt)
        return out

    def price(
        self,
        x: FloatArray,
        k: FloatArray,
        T: FloatArray,
        slice_idx: IntArray,
        is_call: npt.NDArray[np.bool_],
    ) -> FloatArray:
        kk = _as_f64(k)
        return with_parity(self.otm_price(x, kk, T), kk, is_call)

    def implied_vol(
        self, x: FloatArray, k: FloatArray, T: FloatArray, slice_idx: IntArray
    ) -> FloatArray:
        """Model Black vols; NaN where the out-of-the-money price is not positive (strikes
        so far out, ~8 standard deviations, that the price is below double precision).

        With ``prefetch_jacobian`` the Jacobian is computed in the same sweep and kept for a
        following ``jacobian`` call at the same inputs (what a least-squares step does).
        """
        p, kk, tt = self._params(x), _as_f64(k), _as_f64(T)
        last = self._jac_inputs
        want = (
            self.prefetch_jacobian
            and last is not None
            and np.array_equal(last[0], kk)
            and np.array_equal(last[1], tt)
        )
        if not want:
            (bank, meta, ranges), t_list = self._bank(p, tt)
            vols: FloatArray = _ivs(otm_from_bank(bank, meta, ranges, t_list, kk, tt), kk, tt)
            return vols
        iv, jac = iv_and_jacobian(p, len(self.names), kk, tt, want)
        self._prefetched = (p, kk.copy(), tt.copy(), jac)
        out: FloatArray = iv
        return out

    def population_iv(
        self, X: FloatArray, k: FloatArray, T: FloatArray, slice_idx: IntArray
    ) -> FloatArray:
        """Model vols of every row of ``X`` (``(n_pop, len(names))``): ``(n_pop, n)``, one
        compiled call (``population_ivs``)."""
        P = np.ascontiguousarray(X, dtype=np.float64)
        out: FloatArray = population_ivs(P, len(self.names), _as_f64(k), _as_f64(T), self.fit_tol)
        return out

    def jacobian(
        self, x: FloatArray, k: FloatArray, T: FloatArray, slice_idx: IntArray
    ) -> FloatArray:
        """``d iv / d x``, shape ``(n_points, len(x))``; NaN rows where the vol is NaN."""
        p, kk, tt = self._params(x), _as_f64(k), _as_f64(T)
        if self.prefetch_jacobian:
            self._jac_inputs = (kk.copy(), tt.copy())
        last = self._prefetched
        if (
            last is not None
            and np.array_equal(last[0], p)
            and np.array_equal(last[1], kk)
            and np.array_equal(last[2], tt)
        ):
            self._prefetched = None
            return last[3]
        _, jac = iv_and_jacobian(p, len(self.names), kk, tt, True)
        out: FloatArray = jac
        return out

    def iv_and_jacobian(
        self, x: FloatArray, k: FloatArray, T: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """Implied vols and their Jacobian in one pass (one characteristic-function sweep)."""
        iv, jac = iv_and_jacobian(self._params(x), len(self.names), _as_f64(k), _as_f64(T), True)
        return iv, jac

    def fit_iv_and_jacobian(
        self, x: FloatArray, k: FloatArray, T: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """``iv_and_jacobian`` at the fit's tolerance ``fit_tol``: what each least-squares
        evaluation at the quotes costs (``streamer.calib.evaluate.surface_evaluator``)."""
        p, kk, tt = self._params(x), _as_f64(k), _as_f64(T)
        iv, jac = iv_and_jacobian(p, len(self.names), kk, tt, True, self.fit_tol)
        return iv, jac

    def coarse_iv_and_jacobian(
        self, x: FloatArray, k: FloatArray, T: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """``iv_and_jacobian`` at ``COARSE_TOL``: the first phase of a cold run
        (``streamer.calib.surface``), which only has to bring the LM near the optimum."""
        p, kk, tt = self._params(x), _as_f64(k), _as_f64(T)
        iv, jac = iv_and_jacobian(p, len(self.names), kk, tt, True, COARSE_TOL)
        return iv, jac

    def arbitrage(self, x: FloatArray, slice_T: FloatArray) -> list[Violation]:
        xx = _as_f64(x)
        out: list[Violation] = []
        if xx.shape[0] != len(self.names) or not np.all(np.isfinite(xx)):
            return [Violation("nonfinite", -1, math.inf, "parameters not finite or wrong length")]
        for name, value, lo, hi in zip(self.names, xx, self.lower, self.upper, strict=True):
            if value < lo or value > hi:
                amount = float(lo - value if value < lo else value - hi)
                out.append(
                    Violation("bounds", -1, amount, f"{name}={value:.6g} not in [{lo}, {hi}]")
                )
        if out:
            return out
        # probe the prices: finite and within the no-arbitrage bounds 0 <= OTM price <= min(1, K)
        # (every slice in one call)
        ts = _as_f64(slice_T)
        n_k = PROBE_K.shape[0]
        all_otm = self.otm_price(xx, np.tile(PROBE_K, ts.shape[0]), np.repeat(ts, n_k))
        upper = np.minimum(1.0, np.exp(PROBE_K))
        for j, t in enumerate(ts):
            if not t > 0.0:
                continue
            otm = all_otm[j * n_k : (j + 1) * n_k]
            if not np.all(np.isfinite(otm)):
                # the shared sweep's term budget (TERM_BUDGET a call) may have run out on the
                # earlier slices: the slice alone, with a budget of its own, as it was probed
                otm = self._otm_alone(xx, t)
            bad = ~np.isfinite(otm) | (otm < -1e-12) | (otm > upper)
            if np.any(bad):
                first = int(np.argmax(bad))
                out.append(
                    Violation(
                        "nonfinite",
                        -1,
                        float(np.count_nonzero(bad)),
                        f"slice {j} (T={t:.6g}): price {otm[first]!r} at k={PROBE_K[first]:.3g}",
                    )
                )
        return out

    def initial_guesses(self, data: FitData) -> list[FloatArray]:
        v_short, v_long, skew = _atm_summary(data)
        rho = -0.5 if skew < 0.0 else (0.3 if skew > 0.0 else 0.0)
        guesses: list[FloatArray] = []
        for kappa, xi, rho_g in ((2.0, 1.0, rho), (5.0, 2.0, rho), (1.0, 0.6, 0.5 * rho)):
            guesses.append(np.array([v_short, kappa, v_long, xi, rho_g]))
        lo, hi = HESTON_LOWER, HESTON_UPPER
        return [np.clip(g, lo, hi) for g in guesses]


def _atm_summary(data: FitData) -> tuple[float, float, float]:
    """ATM variance of the shortest and longest slices and the mean skew sign of the data."""
    atm_var: list[tuple[float, float]] = []
    skews: list[float] = []
    for j in range(data.n_slices):
        m = (data.slice_idx == j) & np.isfinite(data.iv)
        if np.count_nonzero(m) == 0:
            continue
        k = data.k[m]
        iv = data.iv[m]
        near = np.argsort(np.abs(k))[: max(2, min(5, k.shape[0]))]
        atm_var.append((float(data.slice_T[j]), float(np.median(iv[near])) ** 2))
        if k.shape[0] >= 3 and np.ptp(k) > 0.0:
            skews.append(float(np.polyfit(k, iv, 1)[0]))
    if not atm_var:
        return 0.25, 0.25, 0.0
    atm_var.sort()
    skew = float(np.mean(skews)) if skews else 0.0
    return atm_var[0][1], atm_var[-1][1], skew


@register
class Heston(_CharacteristicFunctionModel):
    """Heston surface: ``x = [v0, kappa, theta, xi, rho]`` for all expiries."""

    name: ClassVar[str] = "heston"
    # cold fits take the secant-augmented LM (``streamer.calib.lm.solve``): on the 56 shared
    # snapshot chains the learned guess reached the optimum on all of them in a median 11
    # evaluations against 13 (Bates: fewer optima reached, so not there)
    secant_lm: ClassVar[bool] = True
    # a cold run that crawls carries on in (ln kappa, ln theta) (``surface._SurfaceFit.uncurl``)
    log_params: ClassVar[tuple[str, ...]] = ("kappa", "theta")
    # cold runs start on coarse prices (``surface._SurfaceFit._solve_cold``): 20 % less CPU
    # for a cold fit of the default chain, the same optima on the 56 + 15 chains of ``bench
    # calib --success`` (Bates: 7 % less, one shared chain 0.10 % off, so not there)
    coarse_cold: ClassVar[bool] = True
    names: ClassVar[tuple[str, ...]] = HESTON_NAMES
    lower: ClassVar[FloatArray] = HESTON_LOWER
    upper: ClassVar[FloatArray] = HESTON_UPPER
    scales: ClassVar[FloatArray] = HESTON_SCALE
