r"""Block Levenberg-Marquardt with box bounds, a robust loss and a parameter-change penalty.

The problem is a set of ``B`` independent blocks of ``p`` parameters each (the slices of a
per-expiry model, or one block holding a whole surface). Each data point belongs to one block;
points are sorted by block. For block ``b`` with parameters ``x_b`` the objective is::

    C_b(x_b) = 1/2 f^2 sum_i rho(r_i^2 / f^2)  +  1/2 sum_j (c_bj (x_bj - xprev_bj))^2
    r_i = w_i (iv_i(x_b) - target_i)

(or, with a band, ``r_i = w_i (kappa e_i + e_i - clip(e_i, -band_i, band_i))`` for
``e_i = iv_i - target_i``: a dead zone around the target that counts only what lies beyond the
band, plus a gentle pull ``kappa`` to the target), with ``rho`` the robust loss (``linear``:
z; ``soft_l1``: 2(sqrt(1+z) - 1); ``huber``: z for z <= 1 else 2 sqrt(z) - 1), ``f`` its
scale, and ``c = sqrt(lambda)/s`` the penalty weights
(DESIGN section 5: the rows ``sqrt(lambda) (theta - theta_prev)/s`` appended to the
least-squares problem; ``c = 0`` where a parameter has no previous value).

Each iteration is one Gauss-Newton step with iteratively reweighted least squares for the
robust loss (weights ``rho'(z)``; Holland & Welsch 1977) and Marquardt's damping
``(A + mu diag(A)) delta = -g`` (Marquardt 1963; Nocedal & Wright 2006, ch. 10), projected on
the bounds. Optional extra rows per block (``extra``: e.g. no-arbitrage hinges that vanish when
the constraints hold) join the normal equations like the penalty rows. Blocks accept or reject
their step and adapt ``mu`` independently, but one call of the model evaluates every block at
once, so a 12-slice SVI fit costs one vectorised model evaluation per iteration, not twelve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Loss = Literal["linear", "soft_l1", "huber"]
Evaluate = Callable[[FloatArray], tuple[FloatArray, FloatArray]]

MU_INIT = 1e-3
MU_MAX = 1e12
STALL_ITERS = 10
STALL_RTOL = 1e-4
CREEP = 0.02  # secant steps once an accepted step buys less than this share of the cost


@dataclass(frozen=True)
class LMProblem:
    """One least-squares problem: model, data, bounds, penalty.

    ``evaluate(X)`` with ``X`` of shape ``(B, p)`` returns the model IVs ``(n,)`` and each
    point's derivatives with respect to its own block's parameters ``(n, p)``.
    """

    evaluate: Evaluate
    target: FloatArray
    weight: FloatArray
    starts: IntArray  # first point of each block (points sorted by block)
    lower: FloatArray  # (B, p)
    upper: FloatArray  # (B, p)
    prior: FloatArray | None = None  # (B, p) previous parameters
    penalty_weight: FloatArray | None = None  # (B, p): sqrt(lambda) / s, 0 = no penalty
    loss: Loss = "soft_l1"
    f_scale: float = 1.0
    band: FloatArray | None = None  # half-width of the dead zone per point (None: none)
    kappa: float = 1.0  # weight of the pull to the target inside the band
    # extra residual rows per block (constraint hinges): X -> rows (B, m), jacobian (B, m, p)
    extra: Callable[[FloatArray], tuple[FloatArray, FloatArray]] | None = None

    @property
    def n_blocks(self) -> int:
        return int(self.starts.shape[0])


@dataclass(frozen=True)
class LMResult:
    """Per-block outcome. ``data_cost`` excludes the penalty; ``penalty`` is its own term."""

    x: FloatArray  # (B, p)
    iv: FloatArray  # model IVs at x, (n,)
    data_cost: FloatArray  # (B,)
    penalty: FloatArray  # (B,) change penalty plus any extra (constraint) rows
    converged: npt.NDArray[np.bool_]  # (B,)
    nfev: int
    iterations: int


def _rho(z: FloatArray, loss: Loss) -> tuple[FloatArray, FloatArray]:
    """Loss value and first derivative at ``z = (r/f)^2``."""
    if loss == "linear":
        return z, np.ones_like(z)
    if loss == "soft_l1":
        t = np.sqrt(1.0 + z)
        return 2.0 * (t - 1.0), 1.0 / t
    sz = np.sqrt(np.maximum(z, 1e-300))
    big = z > 1.0
    return np.where(big, 2.0 * sz - 1.0, z), np.where(big, 1.0 / sz, 1.0)


def _block_sum(values: FloatArray, starts: IntArray) -> FloatArray:
    if starts.shape[0] == 1:
        return np.asarray(values.sum(axis=0, keepdims=True))
    return np.asarray(np.add.reduceat(values, starts, axis=0))


def _extra_cost(
    problem: LMProblem, x: FloatArray
) -> tuple[FloatArray, FloatArray | None, FloatArray | None]:
    if problem.extra is None:
        return np.zeros(x.shape[0]), None, None
    rows, jac = problem.extra(x)
    rows = np.where(np.isfinite(rows), rows, 1e6)
    jac = np.where(np.isfinite(jac), jac, 0.0)
    return 0.5 * np.sum(rows * rows, axis=1), rows, jac


def _costs(
    problem: LMProblem, x: FloatArray, iv: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Per-block data cost and penalty, plus residuals and loss derivatives per point."""
    f2 = problem.f_scale * problem.f_scale
    r = problem.weight * _shape(iv - problem.target, problem)[0]
    z = r * r / f2
    rho, drho = _rho(z, problem.loss)
    data = 0.5 * f2 * _block_sum(rho, problem.starts)
    if problem.prior is not None and problem.penalty_weight is not None:
        d = problem.penalty_weight * (x - problem.prior)
        pen = 0.5 * np.sum(d * d, axis=1)
    else:
        pen = np.zeros(problem.n_blocks)
    bad = ~np.isfinite(data)
    data[bad] = np.inf
    return data, pen, r, drho


def _shape(e: FloatArray, problem: LMProblem) -> tuple[FloatArray, FloatArray]:
    """Band objective: ``kappa e + (e - clip(e, -band, band))`` and its slope in ``e``.

    Inside the band only the gentle pull ``kappa e`` to the target acts; outside, the
    distance beyond the band counts in full. Without a band this is ``e`` (slope 1).
    """
    if problem.band is None:
        return e, np.ones_like(e)
    outside = e - np.clip(e, -problem.band, problem.band)
    slope = problem.kappa + (np.abs(e) > problem.band).astype(np.float64)
    return problem.kappa * e + outside, np.asarray(slope, dtype=np.float64)


@dataclass(frozen=True)
class _Point:
    """Everything known at one parameter point of every block."""

    x: FloatArray  # (B, p)
    iv: FloatArray
    jac: FloatArray
    r: FloatArray  # weighted residuals
    drho: FloatArray  # loss derivatives
    data: FloatArray  # per-block data cost
    pen: FloatArray  # per-block penalty (change penalty plus extra rows)
    erows: FloatArray | None
    ejac: FloatArray | None

    @property
    def total(self) -> FloatArray:
        return self.data + self.pen


def _point(problem: LMProblem, x: FloatArray) -> _Point:
    """Evaluate the model, the costs and the extra rows at ``x``."""
    iv, jac = problem.evaluate(x)
    data, pen, r, drho = _costs(problem, x, iv)
    ecost, erows, ejac = _extra_cost(problem, x)
    return _Point(x, iv, jac, r, drho, data, pen + ecost, erows, ejac)


def _normal_equations(
    problem: LMProblem, pt: _Point, pw2: FloatArray | None
) -> tuple[FloatArray, FloatArray]:
    """Per block ``A = J'J`` and ``g = J'r`` of the IRLS-scaled data rows (non-finite points
    count as zero), the penalty rows and the extra rows."""
    jac, iv, starts = pt.jac, pt.iv, problem.starts
    p = pt.x.shape[1]
    if not np.all(np.isfinite(jac)) or not np.all(np.isfinite(iv)):
        bad_pts = ~(np.isfinite(iv) & np.all(np.isfinite(jac), axis=1))
        jac = np.where(bad_pts[:, None], 0.0, jac)
    slope = _shape(iv - problem.target, problem)[1]
    wj = (problem.weight * slope * np.sqrt(pt.drho))[:, None] * jac  # IRLS-scaled rows
    rs = pt.r * np.sqrt(pt.drho)
    rs = np.where(np.isfinite(rs), rs, 0.0)
    if starts.shape[0] == 1:
        # a contiguous transpose: OpenBLAS runs this product on one thread (the transposed
        # view takes its threaded path, whose spinning workers cost more CPU than the product
        # on a shared machine)
        wt = np.ascontiguousarray(wj.T)
        A = np.dot(wt, wj)[None, :, :]
        g = np.dot(wt, rs)[None, :]
    else:
        A = _block_sum(wj[:, :, None] * wj[:, None, :], starts)
        g = _block_sum(wj * rs[:, None], starts)
    if pw2 is not None and problem.prior is not None:
        A = A + pw2[:, None, :] * np.eye(p)
        g = g + pw2 * (pt.x - problem.prior)
    if pt.erows is not None and pt.ejac is not None:
        A = A + np.einsum("bmi,bmj->bij", pt.ejac, pt.ejac)
        g = g + np.einsum("bmi,bm->bi", pt.ejac, pt.erows)
    return A, g


def _step(A: FloatArray, g: FloatArray, mu: FloatArray, held: npt.NDArray[np.bool_]) -> FloatArray:
    """Marquardt's damped step ``(A + mu diag(A)) d = -g`` per block, solved in the free
    subspace: ``held`` variables (on a bound, their descent direction leaving the box) do not
    move (a projected step of the full system is distorted by the clipping and crawls along
    the bound)."""
    eye = np.eye(A.shape[1])
    diag = np.einsum("bii->bi", A)
    lift = mu[:, None] * (diag + 1e-12 * (1.0 + diag.max(axis=1, keepdims=True)))
    damped = A + lift[:, :, None] * eye
    if held.any():
        free = (~held).astype(np.float64)
        damped = damped * free[:, :, None] * free[:, None, :] + held[:, :, None] * eye
        g = g * free
    try:
        return np.asarray(-np.linalg.solve(damped, g[:, :, None])[:, :, 0])
    except np.linalg.LinAlgError:
        return np.asarray(-g / np.maximum(np.einsum("bii->bi", damped), 1e-300))


def _take(old: _Point, new: _Point, accept: npt.NDArray[np.bool_], block_of: IntArray) -> _Point:
    """Per block, the new point where its step was accepted, else the old one."""
    if accept.all():
        return new
    if not accept.any():
        return old
    pt = accept[block_of]
    erows, ejac = old.erows, old.ejac
    if erows is not None and new.erows is not None and ejac is not None and new.ejac is not None:
        erows = np.where(accept[:, None], new.erows, erows)
        ejac = np.where(accept[:, None, None], new.ejac, ejac)
    return _Point(
        x=np.where(accept[:, None], new.x, old.x),
        iv=np.where(pt, new.iv, old.iv),
        jac=np.where(pt[:, None], new.jac, old.jac),
        r=np.where(pt, new.r, old.r),
        drho=np.where(pt, new.drho, old.drho),
        data=np.where(accept, new.data, old.data),
        pen=np.where(accept, new.pen, old.pen),
        erows=erows,
        ejac=ejac,
    )


def _secant_update(S: FloatArray, s: FloatArray, y: FloatArray, A_new: FloatArray) -> FloatArray:
    """The structured secant update of the second-order term ``S`` (per block, in place of
    ``sum_i rho_i r_i nabla^2 r_i``, which Gauss-Newton leaves out): Dennis, Gay and Welsch's
    symmetric rank-two update (NL2SOL, 1981) with their sizing, such that
    ``(A_new + S_new) s = y`` for the step ``s`` and gradient change ``y``; ``A_new`` the
    Gauss-Newton matrix at the new point. Blocks with ``y's`` not positive keep ``S``."""
    ys = np.einsum("bi,bi->b", y, s)
    y_sharp = y - np.einsum("bij,bj->bi", A_new, s)
    Ss = np.einsum("bij,bj->bi", S, s)
    sSs = np.einsum("bi,bi->b", s, Ss)
    # sizing (Dennis, Gay and Welsch 1981, eq. 3.4): shrink S where it overstates curvature
    tau = np.where(
        np.abs(sSs) > 0.0,
        np.minimum(
            1.0, np.abs(np.einsum("bi,bi->b", s, y_sharp)) / np.maximum(np.abs(sSs), 1e-300)
        ),
        1.0,
    )
    S = tau[:, None, None] * S
    v = y_sharp - tau[:, None] * Ss
    ok = ys > 1e-300
    inv = np.where(ok, 1.0 / np.where(ok, ys, 1.0), 0.0)
    vs = np.einsum("bi,bi->b", v, s)
    upd = (v[:, :, None] * y[:, None, :] + y[:, :, None] * v[:, None, :]) * inv[:, None, None] - (
        vs * inv * inv
    )[:, None, None] * y[:, :, None] * y[:, None, :]
    out: FloatArray = np.where(ok[:, None, None], S + upd, S)
    return out


def _positive_definite(M: FloatArray) -> npt.NDArray[np.bool_]:
    """Per block: is the symmetric matrix positive definite (a Cholesky factor exists)?"""
    out = np.ones(M.shape[0], dtype=np.bool_)
    for b in range(M.shape[0]):
        try:
            np.linalg.cholesky(M[b])
        except np.linalg.LinAlgError:
            out[b] = False
    return out


def solve(
    problem: LMProblem,
    x0: FloatArray,
    *,
    max_iter: int = 50,
    ftol: float = 1e-5,
    xtol: float = 1e-9,
    secant: bool = False,
) -> LMResult:
    """Minimise every block's objective from ``x0`` (shape ``(B, p)``).

    A block stops on a small cost reduction (actual, or predicted by the Gauss-Newton model for
    a step the bounds did not clip), a small move, ``mu`` past ``MU_MAX``, or a stall:
    ``STALL_ITERS`` iterations that bought less than ``STALL_RTOL`` of its cost (a block
    creeping along a flat valley, SVI's a/b/sigma trade-off). Variables on a bound whose
    descent direction leaves the box are held there for the step.

    ``secant``: augment the Gauss-Newton matrix with a secant estimate of the second-order
    term (``_secant_update``; NL2SOL, Dennis, Gay and Welsch 1981), for large-residual
    problems where Gauss-Newton converges only linearly (a misspecified surface model
    creeping along a flat valley); a block whose augmented matrix is not positive definite,
    or whose last augmented step failed, takes the plain Gauss-Newton step.
    """
    lower, upper = problem.lower, problem.upper
    cur = _point(problem, np.clip(np.asarray(x0, dtype=np.float64), lower, upper))
    n_blocks = cur.x.shape[0]
    counts = np.diff(np.append(problem.starts, problem.target.shape[0]))
    block_of = np.repeat(np.arange(n_blocks), counts)
    has_pen = problem.prior is not None and problem.penalty_weight is not None
    pw2 = problem.penalty_weight**2 if has_pen and problem.penalty_weight is not None else None
    nfev = 1
    mu = np.full(n_blocks, MU_INIT)
    checkpoint = cur.total
    converged = np.zeros(n_blocks, dtype=np.bool_)
    iterations = 0
    p = cur.x.shape[1]
    S = np.zeros((n_blocks, p, p))
    use_s = np.zeros(n_blocks, dtype=np.bool_)  # the last step was augmented
    last: tuple[FloatArray, FloatArray] | None = None  # (x, gradient) before the last accept
    creeping = np.zeros(n_blocks, dtype=np.bool_)  # the last accepted step bought < CREEP
    for iterations in range(1, max_iter + 1):
        A, g = _normal_equations(problem, cur, pw2)
        if secant:
            if last is not None:
                moved_x = cur.x - last[0]
                fresh = np.any(moved_x != 0.0, axis=1)
                if fresh.any():
                    S = np.where(
                        fresh[:, None, None], _secant_update(S, moved_x, g - last[1], A), S
                    )
            aug = A + S
            # only in the creeping phase: far from the optimum the estimate misleads
            good = creeping & _positive_definite(aug + 1e-12 * np.eye(p))
            A = np.where(good[:, None, None], aug, A)
            use_s = good
        held = ((cur.x <= lower) & (g > 0.0)) | ((cur.x >= upper) & (g < 0.0))
        g_full = g
        g = np.where(held, 0.0, g)
        step = _step(A, g, mu, held)
        step[converged] = 0.0
        x_new = np.clip(cur.x + step, lower, upper)
        d = x_new - cur.x
        # the Gauss-Newton model's predicted reduction of the (robust, penalised) cost
        predicted = -(np.sum(g * d, axis=1) + 0.5 * np.einsum("bi,bij,bj->b", d, A, d))
        new = _point(problem, x_new)
        nfev += 1
        old_total, new_total = cur.total, new.total
        accept = (new_total < old_total) & ~converged
        moved = np.max(np.abs(x_new - cur.x) / (np.abs(cur.x) + 1e-8), axis=1)
        scale = np.maximum(old_total, 1e-300)
        # a step clipped by the bounds may predict no (or a negative) reduction although the
        # point is not stationary (a Gauss-Newton step far outside the box): not convergence;
        # the step is judged by its actual cost, and mu grows if it fails
        clipped = np.any(cur.x + step != x_new, axis=1)
        with np.errstate(invalid="ignore"):  # inf - inf (a non-finite cost): not small
            small = (
                (accept & ((old_total - new_total) <= ftol * scale))
                | ((predicted <= ftol * scale) & ~clipped)
                | (moved <= xtol)
            )
        if secant:
            last = (cur.x.copy(), g_full)
            with np.errstate(invalid="ignore"):  # inf - inf: a step from a non-finite cost
                gain = (old_total - new_total) / scale
            creeping = np.where(accept, gain < CREEP, creeping)
            # a failed augmented step: forget the second-order estimate
            S = np.where((use_s & ~accept & ~converged)[:, None, None], 0.0, S)
        cur = _take(cur, new, accept, block_of)
        mu = np.where(accept, np.maximum(mu / 3.0, 1e-12), mu * 4.0)
        converged |= small | (mu > MU_MAX)
        if iterations % STALL_ITERS == 0:
            now_total = cur.total
            with np.errstate(invalid="ignore"):  # inf - inf: a cost still non-finite
                converged |= (checkpoint - now_total) <= STALL_RTOL * np.maximum(now_total, 1e-300)
            checkpoint = now_total
        if converged.all():
            break
    return LMResult(
        x=cur.x,
        iv=cur.iv,
        data_cost=cur.data,
        penalty=cur.pen,
        converged=converged,
        nfev=nfev,
        iterations=iterations,
    )
