r"""The numba kernels of the piecewise-constant Heston family (``heston-td``, ``bates-td``,
``bates-tdl``): the chained characteristic function and its adjoint gradient, the chained
moment generating function and the COS truncation range, the cosine coefficients (split by
the number of jumps for short expiries), prices, implied vols and their Jacobian.

The maths (dynamics, the piece recursion, the gradient sweep, the truncation bounds and the
jump split) is set out in ``streamer.models.heston_td`` and ``streamer.models.bates_td``; each
kernel's docstring states what it computes. Array in, array out: no logging, no config.

References: Mikhailov and Nögel (2003), Elices (2008), Cui et al. (2017), Fang and Oosterlee
(2008), Andersen and Piterbarg (2007) (full citations in ``streamer.models.heston_td``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from streamer.models.heston import (
    CHERNOFF_RATIO,
    CHERNOFF_STEPS,
    FALLBACK_L,
    HESTON_LOWER,
    HESTON_SCALE,
    HESTON_UPPER,
    K_REF,
    MAX_DECAY_RATIO,
    MAX_HALF_WIDTH,
    MIN_HALF_WIDTH,
    N_MAX,
    N_MIN,
    TAIL_RUN,
    TERM_BUDGET,
    _cexp,
    _clog1p,
    _csqrt,
    _ivs,
    _price_group,
    maturity_buckets,
)
from streamer.pricing.black import vega_s

N_SURFACE = 2  # v0, kappa
N_PIECE = 3  # theta, xi, rho
PIECE_NAMES: tuple[str, ...] = ("theta", "xi", "rho")
PIECE_LOWER = HESTON_LOWER[2:5]
PIECE_UPPER = HESTON_UPPER[2:5]
PIECE_SCALE = HESTON_SCALE[2:5]
SURFACE_LOWER = HESTON_LOWER[:2]
SURFACE_UPPER = HESTON_UPPER[:2]
SURFACE_SCALE = HESTON_SCALE[:2]


# --------------------------------------------------------------------------------------------
# the chained characteristic function and its gradient


@njit(cache=True, nogil=True)
def piece_of(T: float, piece_T: np.ndarray, n_pieces: int) -> int:
    """Index of the piece holding ``T``: the first ``j`` with ``T <= t_j`` (else the last)."""
    m = 0
    while m < n_pieces - 1 and piece_T[m] < T:
        m += 1
    return m


@njit(cache=True, nogil=True)
def durations(T: float, piece_T: np.ndarray, m: int) -> np.ndarray:
    """Time spent in pieces ``0 .. m`` on the way to ``T`` (piece ``m`` holds ``T``)."""
    tau = np.empty(m + 1)
    start = 0.0
    for i in range(m):
        tau[i] = piece_T[i] - start
        start = piece_T[i]
    tau[m] = T - start
    return tau


@njit(cache=True, nogil=True)
def _piece_step(
    u: float, tau: float, beta: complex, s: float, q: complex, d_in: complex, want_grad: bool
) -> tuple[complex, complex, complex, complex, complex, complex, complex, complex]:
    """One piece of the backward recursion: ``(D_out, L)`` and their partials in
    ``(beta, s = xi^2, D_in)`` (zeros unless ``want_grad``), ``L = (beta - d) tau/2 - ln G``."""
    d = _csqrt(beta * beta + s * q)
    e = _cexp(-d * tau)
    one_me = 1.0 - e
    bp = beta - s * d_in
    r_d = 0.5 * s * d_in * d_in - beta * d_in - 0.5 * q
    g_minus_1 = s * r_d * one_me / (d * (bp + d))
    m2 = 2.0 * d * (1.0 + g_minus_1)  # (d + b') + (d - b') e
    qb = q + beta * d_in
    num = d * d_in * (1.0 + e) - one_me * qb
    d_out = num / m2
    b_minus_d = -s * q / (beta + d)
    ln_g = _clog1p(g_minus_1)
    ell = 0.5 * b_minus_d * tau - ln_g
    zero = 0j
    if not want_grad:
        return d_out, ell, zero, zero, zero, zero, zero, zero
    inv_m = 1.0 / m2
    inv_d = 1.0 / d
    dmb = d - bp
    # beta
    dd = beta * inv_d
    de = -tau * e * dd
    dn = dd * d_in * (1.0 + e) + d * d_in * de + de * qb - one_me * d_in
    dm = dd * (1.0 + e) + one_me + dmb * de
    dout_beta = (dn - d_out * dm) * inv_m
    ell_beta = (1.0 - dd) * 0.5 * tau - (dm * inv_m - dd * inv_d)
    # s = xi^2
    dd = 0.5 * q * inv_d
    de = -tau * e * dd
    dn = dd * d_in * (1.0 + e) + d * d_in * de + de * qb
    dm = dd * (1.0 + e) - d_in * one_me + dmb * de
    dout_s = (dn - d_out * dm) * inv_m
    ell_s = -dd * 0.5 * tau - (dm * inv_m - dd * inv_d)
    # D_in
    dn = d * (1.0 + e) - one_me * beta
    dm = -s * one_me
    dout_d = (dn - d_out * dm) * inv_m
    ell_d = -dm * inv_m
    return d_out, ell, dout_beta, dout_s, dout_d, ell_beta, ell_s, ell_d


@njit(cache=True, nogil=True)
def jump_time(tau: np.ndarray, x: np.ndarray, n_pieces: int, n_piece: int, n_jump: int) -> float:
    """``int_0^T lam(t) dt``: ``lam T`` (one intensity) or ``sum_i lam_i tau_i`` (per piece)."""
    if n_jump == 0:
        return 0.0
    if n_piece > N_PIECE:
        out = 0.0
        for i in range(tau.shape[0]):
            out += x[N_SURFACE + n_piece * i + N_PIECE] * tau[i]
        return out
    total = 0.0
    for i in range(tau.shape[0]):
        total += tau[i]
    lam: float = x[N_SURFACE + n_piece * n_pieces]
    return lam * total


@njit(cache=True, nogil=True)
def td_log_cf(
    u: float,
    tau: np.ndarray,
    x: np.ndarray,
    n_piece: int,
    want_grad: bool,
    work: np.ndarray,
    grad: np.ndarray,
) -> complex:
    """``ln phi(u)`` of the stochastic-volatility part (no jumps) at the maturity reached by
    crossing pieces ``0 .. m`` for ``tau[0 .. m]``.

    Layout of ``x`` (global): ``[v0, kappa]``, then ``n_piece`` entries per piece
    (``theta, xi, rho`` and, when ``n_piece == 4``, the piece's jump intensity), then the
    surface jump parameters (``lam, mu_j, sigma_j``, or ``mu_j, sigma_j`` with per-piece
    intensities). If ``want_grad``, ``grad[j]`` (complex) receives ``d ln phi / d x_j`` for
    the first ``2 + n_piece (m + 1)`` entries of ``x`` (0 for the intensities), by one
    adjoint sweep over the pieces (reverse mode: ``O(m)`` per node); ``work`` (complex, at
    least ``(m + 1, 8)``) keeps each piece's partials between the two sweeps.
    """
    m = tau.shape[0] - 1
    v0 = x[0]
    kappa = x[1]
    q = complex(u * u, u)
    big_d = 0j
    big_c = 0j
    for i in range(m, -1, -1):
        base = N_SURFACE + n_piece * i
        theta = x[base]
        xi = x[base + 1]
        rho = x[base + 2]
        s = xi * xi
        beta = complex(kappa, -xi * rho * u)
        d_out, ell, o_b, o_s, o_d, l_b, l_s, l_d = _piece_step(
            u, tau[i], beta, s, q, big_d, want_grad
        )
        big_c += 2.0 * kappa * theta / s * ell
        big_d = d_out
        if want_grad:
            work[i, 0] = ell
            work[i, 1] = o_b
            work[i, 2] = o_s
            work[i, 3] = o_d
            work[i, 4] = l_b
            work[i, 5] = l_s
            work[i, 6] = l_d
    if want_grad:
        # ln phi = C_0 + v0 D_0 with C_i = C_{i+1} + c_i L_i(D_{i+1}), D_i = F_i(D_{i+1}):
        # the adjoint of D_i is bar_i, bar_0 = v0, bar_{i+1} = bar_i F_i' + c_i L_i'
        grad[0] = big_d
        grad[1] = 0j
        bar = complex(v0, 0.0)
        for i in range(m + 1):
            base = N_SURFACE + n_piece * i
            theta = x[base]
            xi = x[base + 1]
            rho = x[base + 2]
            s = xi * xi
            c_kt = 2.0 * kappa * theta / s
            ell = work[i, 0]
            o_b = work[i, 1]
            l_b = work[i, 4]
            d_beta = bar * o_b + c_kt * l_b  # d ln phi / d beta_i
            d_s = bar * work[i, 2] + c_kt * work[i, 5]  # ... / d xi_i^2
            grad[1] += d_beta + 2.0 * theta / s * ell
            grad[base] = 2.0 * kappa / s * ell
            grad[base + 1] = (
                d_beta * complex(0.0, -rho * u) + d_s * 2.0 * xi - 2.0 * c_kt / xi * ell
            )
            grad[base + 2] = d_beta * complex(0.0, -xi * u)
            for j in range(N_PIECE, n_piece):
                grad[base + j] = 0j
            bar = bar * work[i, 3] + c_kt * work[i, 6]
    lnphi: complex = big_c + v0 * big_d
    return lnphi


@njit(cache=True, nogil=True)
def td_log_mgf(
    s: float, tau: np.ndarray, x: np.ndarray, n_pieces: int, n_piece: int, n_jump: int
) -> float:
    """``ln E[e^{s X_T}]`` for real ``s``; ``+inf`` where the moment explodes before ``T``.

    The recursion of the module docstring at ``u = -i s`` in real arithmetic: with
    ``q = s(1 - s)``, ``beta = kappa - xi rho s``, ``d^2 = beta^2 + xi^2 q`` and
    ``ch = cosh(d tau/2)``, ``sh = sinh(d tau/2)/d`` (``cos``, ``sin(w tau/2)/w`` for
    ``d = i w``), ``w = e^{-beta tau/2} (ch + b' sh)``; the moment is finite while
    ``ch + b' sh > 0`` on every piece (its first zero is the explosion), and then
    ``D_out = (D_in ch - sh (q + beta D_in)) / (ch + b' sh)``,
    ``C_out = C_in + (2 kappa theta/xi^2) (beta tau/2 - ln(ch + b' sh))``.
    """
    m = tau.shape[0] - 1
    kappa = x[1]
    q = s * (1.0 - s)
    big_d = 0.0
    big_c = 0.0
    for i in range(m, -1, -1):
        base = N_SURFACE + n_piece * i
        theta = x[base]
        xi = x[base + 1]
        rho = x[base + 2]
        ss = xi * xi
        t = tau[i]
        beta = kappa - xi * rho * s
        bp = beta - ss * big_d
        d2 = beta * beta + ss * q
        if d2 >= 0.0:
            d = math.sqrt(d2)
            y = 0.5 * d * t
            ch = 0.5 * (1.0 + math.exp(-2.0 * y))
            sh = -0.5 * math.expm1(-2.0 * y) / d if y > 1e-8 else 0.5 * t
        else:
            w = math.sqrt(-d2)
            ang = 0.5 * w * t
            if ang >= math.pi:
                return math.inf
            y = 0.0
            ch = math.cos(ang)
            sh = math.sin(ang) / w
        den = ch + bp * sh
        if not den > 0.0:
            return math.inf
        new_d = (big_d * ch - sh * (q + beta * big_d)) / den
        big_c += 2.0 * kappa * theta / ss * (0.5 * beta * t - y - math.log(den))
        big_d = new_d
    out = big_c + x[0] * big_d
    if n_jump > 0:
        big_l = jump_time(tau, x, n_pieces, n_piece, n_jump)
        if big_l != 0.0:
            jb = N_SURFACE + n_piece * n_pieces + n_jump - 2
            mu = x[jb]
            sj = x[jb + 1]
            expo = s * mu + 0.5 * s * s * sj * sj
            if expo > 700.0:
                return math.inf
            out += big_l * (math.exp(expo) - 1.0 - s * math.expm1(mu + 0.5 * sj * sj))
    return out if math.isfinite(out) else math.inf


@njit(cache=True, nogil=True)
def _td_mean_and_var(
    tau: np.ndarray, x: np.ndarray, n_pieces: int, n_piece: int, n_jump: int
) -> tuple[float, float]:
    """``E[X_T]`` (exact) and a rough variance: ``E[int v dt]`` piece by piece, plus jumps."""
    kappa = x[1]
    v = x[0]
    w = 0.0
    for i in range(tau.shape[0]):
        theta = x[N_SURFACE + n_piece * i]
        kt = kappa * tau[i]
        decay = -math.expm1(-kt) / kappa if kt > 1e-8 else tau[i] * (1.0 - 0.5 * kt)
        w += theta * tau[i] + (v - theta) * decay
        v = theta + (v - theta) * math.exp(-kt)
    c1 = -0.5 * w
    var = w
    if n_jump > 0:
        big_l = jump_time(tau, x, n_pieces, n_piece, n_jump)
        jb = N_SURFACE + n_piece * n_pieces + n_jump - 2
        mu = x[jb]
        sj = x[jb + 1]
        c1 += big_l * (mu - math.expm1(mu + 0.5 * sj * sj))
        var += big_l * (mu * mu + sj * sj)
    return c1, max(var, 1e-300)


@njit(cache=True, nogil=True)
def td_truncation_range(
    tau: np.ndarray, x: np.ndarray, n_pieces: int, n_piece: int, n_jump: int, tol: float
) -> tuple[float, float]:
    """COS range ``[a, b]``: the Chernoff bounds of ``streamer.models.heston.truncation_range``
    (each edge moves no price by more than ``tol``) with the chained moment generating
    function ``td_log_mgf``."""
    c1, var = _td_mean_and_var(tau, x, n_pieces, n_piece, n_jump)
    sd = math.sqrt(var)
    ln_tol = math.log(tol)
    r0 = math.sqrt(-2.0 * ln_tol) / sd
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
            lm = td_log_mgf(-s, tau, x, n_pieces, n_piece, n_jump)
            if lm < math.inf:
                edge = (ln_tol - lm) / (1.0 + s)
                if edge > a:
                    a = edge
                    found_a = True
                elif found_a:
                    done_a = True
        if not done_b:
            lm = td_log_mgf(s, tau, x, n_pieces, n_piece, n_jump)
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
            lm = td_log_mgf(-r, tau, x, n_pieces, n_piece, n_jump)
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
# COS prices


@njit(cache=True, nogil=True)
def _cexpm1(z: complex) -> complex:
    """``e^z - 1`` without cancellation for small ``|z|``."""
    x = z.real
    y = z.imag
    sh = math.sin(0.5 * y)
    return complex(math.expm1(x) * math.cos(y) - 2.0 * sh * sh, math.exp(x) * math.sin(y))


PART_ALL, PART_NO_JUMP, PART_JUMPS = 0, 1, 2


@njit(cache=True, nogil=True)
def _td_cos_coefficients(
    T: float,
    tau: np.ndarray,
    x: np.ndarray,
    n_pieces: int,
    n_piece: int,
    n_jump: int,
    a: float,
    width: float,
    want_grad: bool,
    n_max: int,
    tol: float,
    part: int,
) -> tuple[np.ndarray, int, bool]:
    """Rows ``[Re(f e^{-i u a}), Re(d_p f e^{-i u a}) ...]`` (local layout: the first
    ``2 + n_piece (m + 1)`` entries of ``x``, then the surface jump parameters) until ``f``
    dies, with the stopping rule of ``streamer.models.heston`` at ``tol``; the flag says
    whether it did within ``n_max`` terms. The rule looks at ``f`` alone, so vols do not
    depend on whether gradients are asked for; the gradient columns stop with it (their
    truncation, ~``u^2 T tol``, is orders below what a least-squares step can see).

    ``f`` is the characteristic function (``PART_ALL``) or one of the two parts of the split
    of ``td_coefficients``: ``PART_NO_JUMP``
    ``A = phi_sv e^{-L (1 + i u m)}`` and ``PART_JUMPS`` ``B = A (e^{L phi_J} - 1)``.
    """
    m1 = tau.shape[0]
    n_top = N_SURFACE + n_piece * m1
    n_loc = n_top + n_jump
    cols = n_loc + 1 if want_grad else 1
    cap = 256
    coef = np.empty((cap, cols))
    grad = np.zeros(n_loc, dtype=np.complex128)
    work = np.empty((m1, 8), dtype=np.complex128)
    gj = np.zeros(n_loc, dtype=np.complex128)  # d ln(f) / d jump parameters (parts 0, 1)
    ge = np.zeros(n_loc, dtype=np.complex128)  # part 2: d (L phi_J) / d jump parameters
    big_l = 0.0
    mu = 0.0
    sj = 0.0
    mean_jump = 1.0
    t_total = 0.0
    if n_jump > 0:
        big_l = jump_time(tau, x, n_pieces, n_piece, n_jump)
        jb = N_SURFACE + n_piece * n_pieces + n_jump - 2
        mu = x[jb]
        sj = x[jb + 1]
        mean_jump = math.exp(mu + 0.5 * sj * sj)
        for i in range(m1):
            t_total += tau[i]
    du = math.pi / width
    run = 0
    n = 0
    prev_mod = 0.0
    while n < n_max:
        if n == cap:
            bigger = np.empty((2 * cap, cols))
            bigger[:cap] = coef
            coef = bigger
            cap *= 2
        u = n * du
        lnf = td_log_cf(u, tau, x, n_piece, want_grad, work, grad)
        e1 = 0j
        if n_jump > 0:
            iu = complex(0.0, u)
            phij = _cexp(complex(-0.5 * u * u * sj * sj, u * mu))
            ex = -1.0 - iu * (mean_jump - 1.0)
            d_mu = -iu * mean_jump
            d_sj = -iu * sj * mean_jump
            if part == PART_ALL:
                ex += phij
                d_mu += iu * phij
                d_sj -= sj * u * u * phij
            lnf += big_l * ex
            if part == PART_JUMPS:
                e1 = _cexpm1(big_l * phij)
            if want_grad:
                g = n_top
                if n_piece > N_PIECE:
                    for i in range(m1):
                        gj[N_SURFACE + n_piece * i + N_PIECE] = tau[i] * ex
                        ge[N_SURFACE + n_piece * i + N_PIECE] = tau[i] * phij
                else:
                    gj[g] = t_total * ex
                    ge[g] = t_total * phij
                    g += 1
                gj[g] = big_l * d_mu
                gj[g + 1] = big_l * d_sj
                ge[g] = big_l * iu * phij
                ge[g + 1] = -big_l * sj * u * u * phij
        val_a = _cexp(complex(lnf.real, lnf.imag - u * a))  # f e^{-i u a} (part A or all)
        val = val_a * e1 if part == PART_JUMPS else val_a
        coef[n, 0] = val.real
        if want_grad:
            for j in range(n_loc):
                dj = val * (grad[j] + gj[j])
                if part == PART_JUMPS:
                    dj += val_a * (e1 + 1.0) * ge[j]
                coef[n, j + 1] = dj.real
        n += 1
        mod = abs(val)
        size = mod * 2.0 / (width * (1.0 + u * u))
        ratio = mod / prev_mod if prev_mod > 0.0 else 1.0
        prev_mod = mod
        tail = size / (1.0 - ratio) if ratio < MAX_DECAY_RATIO else size / (1.0 - MAX_DECAY_RATIO)
        run = run + 1 if tail < tol else 0
        if run >= TAIL_RUN and n >= N_MIN:
            return coef, n, True
    return coef, n, False


SPLIT_RATIO = 0.5  # split off the no-jump part when its range is below this share of the whole


@njit(cache=True, nogil=True)
def td_coefficients(
    x: np.ndarray,
    n_pieces: int,
    n_piece: int,
    n_jump: int,
    piece_T: np.ndarray,
    t_list: np.ndarray,
    want_grad: bool,
    tol: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The cosine coefficients of every maturity of ``t_list`` (positive, distinct).

    Returns ``bank`` (rows of all series, one after another; ``1 + n_loc`` columns used when
    ``want_grad``), ``meta`` (per series: first row, terms, local parameter count, part),
    ``ranges`` (per series: ``a, b``) and ``first`` (series of maturity ``j``:
    ``first[j] .. first[j + 1] - 1``; none when the series did not converge).

    With jumps, a short expiry's density is a narrow diffusion peak plus a small, wide jump
    part: one cosine series must span the jumps' range at the peak's resolution (~10^3
    terms). Then (``L = int lam dt``, ``M = E[e^J]``) the characteristic function is split by
    the number of jumps, none or some::

        phi = A + B,   A = phi_sv e^{-L (1 + i u (M - 1))},   B = A (e^{L phi_J} - 1),

    ``A`` (mass ``e^{-L}``, ``E_A[e^X] = e^{-L M}``) on the stochastic-volatility range shifted
    by ``-L (M - 1)`` (its Chernoff bounds only shrink, by ``e^{-L M}``), ``B`` on the whole
    range, where it decays like ``e^{-u^2 sigma_j^2/2}`` (few terms). Each part's puts come
    from its cosine series, its calls from parity with its own mass (``_part_parity``), which
    adds up to the parity of the whole. The split is used when ``A``'s range is below
    ``SPLIT_RATIO`` of the whole.
    """
    n_t = t_list.shape[0]
    cols_max = N_SURFACE + n_piece * n_pieces + n_jump + 1 if want_grad else 1
    bank = np.empty((1024, cols_max))
    meta = np.zeros((2 * n_t, 4), dtype=np.int64)
    ranges = np.zeros((2 * n_t, 2))
    first = np.zeros(n_t + 1, dtype=np.int64)
    rows = 0
    n_set = 0
    budget = TERM_BUDGET
    jb = N_SURFACE + n_piece * n_pieces
    for j in range(n_t):
        t_now = t_list[j]
        m = piece_of(t_now, piece_T, n_pieces)
        tau = durations(t_now, piece_T, m)
        n_loc = N_SURFACE + n_piece * (m + 1) + n_jump
        a, b = td_truncation_range(tau, x, n_pieces, n_piece, n_jump, tol)
        split = False
        a0 = a
        b0 = b
        big_l = 0.0
        if n_jump > 0:
            big_l = jump_time(tau, x, n_pieces, n_piece, n_jump)
            if big_l > 0.0:
                a0, b0 = td_truncation_range(tau, x, n_pieces, n_piece, 0, tol)
                split = b0 - a0 < SPLIT_RATIO * (b - a)
        start_set = n_set
        ok = True
        for part in range(2 if split else 1):
            kind = PART_ALL
            lo = a
            hi = b
            if split and part == 0:
                kind = PART_NO_JUMP
                shift = -big_l * math.expm1(x[jb + n_jump - 2] + 0.5 * x[jb + n_jump - 1] ** 2)
                lo = a0 + shift
                hi = b0 + shift
            elif split:
                kind = PART_JUMPS
            coef, n_terms, converged = _td_cos_coefficients(
                t_now,
                tau,
                x,
                n_pieces,
                n_piece,
                n_jump,
                lo,
                hi - lo,
                want_grad,
                min(N_MAX, budget),
                tol,
                kind,
            )
            budget -= n_terms
            if not converged:
                ok = False
                break
            while rows + n_terms > bank.shape[0]:
                bigger = np.empty((2 * bank.shape[0], cols_max))
                bigger[:rows] = bank[:rows]
                bank = bigger
            bank[rows : rows + n_terms, : coef.shape[1]] = coef[:n_terms]
            meta[n_set, 0] = rows
            meta[n_set, 1] = n_terms
            meta[n_set, 2] = n_loc
            meta[n_set, 3] = kind
            ranges[n_set, 0] = lo
            ranges[n_set, 1] = hi
            rows += n_terms
            n_set += 1
        if not ok:
            n_set = start_set
        first[j + 1] = n_set
    return bank[:rows], meta[:n_set], ranges[:n_set], first


@njit(cache=True, nogil=True)
def td_prices_from(
    bank: np.ndarray,
    meta: np.ndarray,
    ranges: np.ndarray,
    first: np.ndarray,
    t_list: np.ndarray,
    x: np.ndarray,
    n_pieces: int,
    n_piece: int,
    n_jump: int,
    piece_T: np.ndarray,
    k: np.ndarray,
    T: np.ndarray,
    want_grad: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-the-money prices (and gradients, if ``want_grad`` and the bank has them) at
    ``(k, T)`` from the coefficients of ``td_coefficients``; every positive finite ``T`` must
    be in ``t_list``. ``T <= 0`` gives 0; non-finite inputs, a maturity whose series did not
    converge, or one not in ``t_list`` give NaN."""
    n = k.shape[0]
    n_x = x.shape[0]
    n_t = t_list.shape[0]
    if want_grad and bank.shape[0] > 0 and bank.shape[1] < n_x + 1:
        raise ValueError("td_prices_from: the coefficients were computed without gradients")
    price = np.full(n, math.nan)
    grad = np.zeros((n, n_x if want_grad else 0))
    count, order = maturity_buckets(k, T, t_list, price)
    jb = N_SURFACE + n_piece * n_pieces
    no_grad = np.zeros(n_x)  # calls by the martingale's parity (``_part_parity`` then fixes)
    for j in range(n_t):
        if count[j + 1] == count[j] or first[j + 1] == first[j]:
            continue
        idx = order[count[j] : count[j + 1]]
        t_now = t_list[j]
        m = piece_of(t_now, piece_T, n_pieces)
        tau = durations(t_now, piece_T, m)
        n_top = N_SURFACE + n_piece * (m + 1)
        kk = k[idx]
        n_k = kk.shape[0]
        pp = np.zeros(n_k)
        n_loc = meta[first[j], 2]
        gg = np.zeros((n_k, n_loc if want_grad else 0))
        split = first[j + 1] - first[j] > 1
        for c in range(first[j], first[j + 1]):
            row, n_terms, kind = meta[c, 0], meta[c, 1], meta[c, 3]
            lo, hi = ranges[c, 0], ranges[c, 1]
            coef = bank[row : row + n_terms, : n_loc + 1 if want_grad else 1]
            p1 = np.empty(n_k)
            g1 = np.zeros((n_k, n_loc if want_grad else 0))
            n_g = n_loc if want_grad else 0
            _price_group(kk, coef, n_terms, n_g, lo, hi, want_grad, p1, g1, 1.0, no_grad)
            if split:
                _part_parity(kk, lo, hi, tau, x, n_pieces, n_piece, n_jump, kind, want_grad, p1, g1)
            for i in range(n_k):
                pp[i] += p1[i]
                for cc in range(g1.shape[1]):
                    gg[i, cc] += g1[i, cc]
        for i in range(n_k):
            price[idx[i]] = pp[i]
            if want_grad:
                for cc in range(n_top):
                    grad[idx[i], cc] = gg[i, cc]
                for cc in range(n_jump):
                    grad[idx[i], jb + cc] = gg[i, n_top + cc]
    return price, grad


@njit(cache=True, nogil=True)
def maturities(T: np.ndarray) -> np.ndarray:
    """The distinct positive finite values of ``T``, in order of appearance."""
    out = np.empty(T.shape[0])
    n = 0
    for i in range(T.shape[0]):
        t = T[i]
        if not (math.isfinite(t) and t > 0.0):
            continue
        j = 0
        while j < n and out[j] != t:
            j += 1
        if j == n:
            out[n] = t
            n += 1
    return out[:n]


@njit(cache=True, nogil=True)
def td_otm_prices(
    x: np.ndarray,
    n_pieces: int,
    n_piece: int,
    n_jump: int,
    piece_T: np.ndarray,
    k: np.ndarray,
    T: np.ndarray,
    want_grad: bool,
    tol: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-the-money prices (put ``k < 0``, call ``k >= 0``, per unit forward) and, if
    ``want_grad``, their gradient ``(n, len(x))``: ``td_coefficients`` then ``td_prices_from``.

    ``piece_T[j]`` ends piece ``j`` (increasing); ``tol`` is the truncation tolerance (of the
    forward) of each end of the range and of the series. ``T <= 0`` gives 0; non-finite
    ``k`` or ``T``, or a series that needs more than ``N_MAX`` terms, give NaN.
    """
    t_list = maturities(T)
    bank, meta, ranges, first = td_coefficients(
        x, n_pieces, n_piece, n_jump, piece_T, t_list, want_grad, tol
    )
    return td_prices_from(
        bank, meta, ranges, first, t_list, x, n_pieces, n_piece, n_jump, piece_T, k, T, want_grad
    )


NOISE_TOL = 10.0  # prices below this many tolerances (of the forward) ...
NOISE_EPS = 1e3  # ... plus this many roundings of the parity 1 - e^k are noise: no vol


@njit(cache=True, nogil=True)
def ivs_and_jacobian_from(
    price: np.ndarray, grad: np.ndarray, k: np.ndarray, T: np.ndarray, want_grad: bool, tol: float
) -> np.ndarray:
    """Implied vols of out-of-the-money prices; if ``want_grad``, ``grad`` becomes
    ``d iv / d x = (d price / d x) / vega`` in place (NaN rows where the vol is NaN).

    A price below ``NOISE_TOL tol + NOISE_EPS eps max(1, e^k)`` carries no digits (the series'
    truncation, and the rounding of the parity call ``P + 1 - e^k`` far out of the money): its
    vol is NaN, not the vol of the noise (which could, say, invert the order of two expiries'
    far wings)."""
    iv = _ivs(price, k, T)
    eps = 2.220446049250313e-16
    for i in range(k.shape[0]):
        if price[i] < NOISE_TOL * tol + NOISE_EPS * eps * max(1.0, math.exp(k[i])):
            iv[i] = math.nan
    if want_grad:
        n_x = grad.shape[1]
        for i in range(k.shape[0]):
            s = iv[i] * math.sqrt(T[i])
            vega = math.exp(0.5 * k[i]) * vega_s(-abs(k[i]), s) * math.sqrt(T[i])
            if math.isfinite(iv[i]) and vega > 0.0:
                for j in range(n_x):
                    grad[i, j] /= vega
            else:
                for j in range(n_x):
                    grad[i, j] = math.nan
    return iv


@njit(cache=True, nogil=True)
def _part_parity(
    k: np.ndarray,
    a: float,
    b: float,
    tau: np.ndarray,
    x: np.ndarray,
    n_pieces: int,
    n_piece: int,
    n_jump: int,
    kind: int,
    want_grad: bool,
    price: np.ndarray,
    grad: np.ndarray,
) -> None:
    """Turn ``_price_group``'s calls of one part (``P + 1 - e^k``, for ``0 <= k <= b``) into
    the part's own parity ``P + E_part[e^X] - e^k mass_part`` (A: ``e^{-L M}``, ``e^{-L}``;
    B: the rest), with its gradient in the jump parameters."""
    m1 = tau.shape[0]
    n_top = N_SURFACE + n_piece * m1
    big_l = jump_time(tau, x, n_pieces, n_piece, n_jump)
    jb = N_SURFACE + n_piece * n_pieces + n_jump - 2
    mu = x[jb]
    sj = x[jb + 1]
    mean_jump = math.exp(mu + 0.5 * sj * sj)
    mass_a = math.exp(-big_l)
    ex_a = math.exp(-big_l * mean_jump)
    sign = 1.0 if kind == PART_NO_JUMP else -1.0
    t_total = 0.0
    for i in range(m1):
        t_total += tau[i]
    for i in range(k.shape[0]):
        ki = k[i]
        if ki < 0.0 or ki > b or ki < a:
            continue
        ek = math.exp(ki)
        # A: (ex_a - ek mass_a) - (1 - ek); B: -(ex_a - ek mass_a)
        corr = sign * (ex_a - ek * mass_a)
        if kind == PART_NO_JUMP:
            corr -= 1.0 - ek
        price[i] += corr
        if want_grad:
            # d/dL of (ex_a - ek mass_a) = -M ex_a + ek mass_a
            d_l = sign * (-mean_jump * ex_a + ek * mass_a)
            g = n_top
            if n_piece > N_PIECE:
                for p in range(m1):
                    grad[i, N_SURFACE + n_piece * p + N_PIECE] += d_l * tau[p]
            else:
                grad[i, g] += d_l * t_total
                g += 1
            d_m = sign * (-big_l * mean_jump * ex_a)  # d/dmu of ex_a (dM/dmu = M)
            grad[i, g] += d_m
            grad[i, g + 1] += d_m * sj  # dM/dsigma = sigma M


@njit(cache=True, nogil=True)
def _slice_ends(T: np.ndarray, slice_idx: np.ndarray, n_slices: int) -> np.ndarray:
    """Per slice index ``0 .. n_slices - 1``: the longest finite ``T`` among its points
    (``-inf`` for none)."""
    out = np.full(n_slices, -np.inf)
    for i in range(T.shape[0]):
        j = slice_idx[i]
        if 0 <= j < n_slices and math.isfinite(T[i]) and T[i] > out[j]:
            out[j] = T[i]
    return out


@njit(cache=True, nogil=True)
def td_population_ivs(
    X: np.ndarray,
    n_pieces: int,
    n_piece: int,
    n_jump: int,
    piece_T: np.ndarray,
    k: np.ndarray,
    T: np.ndarray,
    tol: float,
) -> np.ndarray:
    """Implied vols ``(n_pop, n)`` of every parameter row of ``X`` at ``(k, T)`` (piece ends
    ``piece_T``): a whole population of a global search in one call; NaN as in
    ``ivs_and_jacobian_from``."""
    t_list = maturities(T)
    out = np.empty((X.shape[0], k.shape[0]))
    for r in range(X.shape[0]):
        x = X[r].copy()
        bank, meta, ranges, first = td_coefficients(
            x, n_pieces, n_piece, n_jump, piece_T, t_list, False, tol
        )
        price, grad = td_prices_from(
            bank, meta, ranges, first, t_list, x, n_pieces, n_piece, n_jump, piece_T, k, T, False
        )
        out[r] = ivs_and_jacobian_from(price, grad, k, T, False, tol)
    return out
