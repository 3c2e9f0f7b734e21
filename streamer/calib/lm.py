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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from streamer.calib import lm_steps
from streamer.calib.lm_steps import LOSS_CODES, MU_INIT

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Loss = Literal["linear", "soft_l1", "huber"]
Evaluate = Callable[[FloatArray], tuple[FloatArray, FloatArray]]


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


FTOL = 1e-5  # a block stops once a step buys less than this share of its cost
BEAT_STEPS = 2  # ``beat``: the pace of a run is that of its last this many accepted steps


def solve(
    problem: LMProblem,
    x0: FloatArray,
    *,
    max_iter: int = 50,
    ftol: float = FTOL,
    xtol: float = 1e-9,
    secant: bool = False,
    beat: float = math.inf,
) -> LMResult:
    """Minimise every block's objective from ``x0`` (shape ``(B, p)``).

    A block stops on a small cost reduction (actual, or predicted by the Gauss-Newton model for
    a step the bounds did not clip: then before that step is evaluated, which could only
    confirm a step too small to matter), a small move (likewise), ``mu`` past ``MU_MAX``, or
    a stall:
    ``STALL_ITERS`` iterations that bought less than ``STALL_RTOL`` of its cost (a block
    creeping along a flat valley, SVI's a/b/sigma trade-off). Variables on a bound whose
    descent direction leaves the box are held there for the step. A step clipped by the
    bounds may predict no (or a negative) reduction although the point is not stationary (a
    Gauss-Newton step far outside the box): that is not convergence; the step is judged by
    its actual cost, and ``mu`` grows if it fails.

    ``secant``: augment the Gauss-Newton matrix with a secant estimate of the second-order
    term (``lm_steps.secant_update``; NL2SOL, Dennis, Gay and Welsch 1981), for large-residual
    problems where Gauss-Newton converges only linearly (a misspecified surface model
    creeping along a flat valley); only in the creeping phase (an accepted step bought less
    than ``CREEP`` of the cost: far from the optimum the estimate misleads); a block whose
    augmented matrix is not positive definite, or whose last augmented step failed, takes the
    plain Gauss-Newton step.

    ``beat`` (one block): the cost of a rival run that converged. A run still above it gives
    up (not converged) once its pace, the cost its last ``BEAT_STEPS`` accepted steps bought
    per iteration, kept up over every iteration it has left, would not bring it down to
    ``beat``: the LM's reductions only shrink within a basin, so the projection is
    optimistic, and such a run is crawling towards a worse basin (a cold race's losers).

    The loop and the evaluations are here; the arithmetic between two evaluations is compiled
    (``streamer.calib.lm_steps``).
    """
    x = np.clip(np.asarray(x0, dtype=np.float64), problem.lower, problem.upper)
    B, p = x.shape
    lower = np.broadcast_to(_f64(problem.lower), (B, p)).copy()
    upper = np.broadcast_to(_f64(problem.upper), (B, p)).copy()
    n = problem.target.shape[0]
    counts = np.diff(np.append(problem.starts, n))
    block_of = np.repeat(np.arange(B, dtype=np.int64), counts)
    starts = np.ascontiguousarray(problem.starts, dtype=np.int64)
    const = _Constants.of(problem, block_of, B, p)
    cur = _Trial.at(problem, const, x)
    new = _Trial.empty(n, B, p, cur.erows.shape[1])
    mu = np.full(B, MU_INIT)
    converged = np.zeros(B, dtype=np.bool_)
    checkpoint = cur.data + cur.pen
    S = np.zeros((B, p, p))
    last_x, last_g = np.zeros((B, p)), np.zeros((B, p))
    creeping = np.zeros(B, dtype=np.bool_)  # the last accepted step bought < CREEP
    use_s = np.zeros(B, dtype=np.bool_)  # this step is augmented
    nfev, iterations = 1, 0
    paced = math.isfinite(beat) and B == 1
    accepted = [(0, float(cur.data[0] + cur.pen[0]))] if paced else []  # (iteration, cost)
    for iterations in range(1, max_iter + 1):
        if lm_steps.propose(
            cur.x, cur.iv, cur.jac, cur.r, cur.drho, cur.erows, cur.ejac, *const.data,
            lower, upper, mu, converged, secant, iterations > 1, last_x, last_g, S, creeping,
            use_s, new.x, cur.data, cur.pen, ftol, xtol,
        ):  # fmt: skip
            break
        new.evaluate(problem, const)
        nfev += 1
        if lm_steps.tell(
            cur.x, cur.iv, cur.jac, cur.r, cur.drho, cur.data, cur.pen, cur.erows, cur.ejac,
            new.x, new.iv, new.jac, new.r, new.drho, new.data, new.pen, new.erows, new.ejac,
            starts, mu, converged, checkpoint, secant, S, creeping, use_s, ftol, iterations,
        ):  # fmt: skip
            break
        if paced and _outpaced(
            accepted, float(cur.data[0] + cur.pen[0]), iterations, max_iter, beat
        ):
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


def _outpaced(
    accepted: list[tuple[int, float]], cost: float, iteration: int, max_iter: int, beat: float
) -> bool:
    """``solve``'s ``beat`` test after ``iteration`` (``accepted`` updated here)."""
    if cost < accepted[-1][1]:
        accepted.append((iteration, cost))
    if not (cost > beat and len(accepted) > BEAT_STEPS and math.isfinite(cost)):
        return False
    then, before = accepted[-1 - BEAT_STEPS]
    pace = (before - cost) / (iteration - then)
    return pace * (max_iter - iteration) < cost - beat


@dataclass(frozen=True)
class _Constants:
    """The problem's arrays in the kernels' form: ``data`` is the argument run shared by
    ``lm_steps.point_costs`` and ``lm_steps.propose`` (target, weight, band, has_band, kappa,
    block_of, prior, pen_w, has_pen); ``loss`` its code, ``f2`` the squared scale."""

    data: tuple[
        FloatArray, FloatArray, FloatArray, bool, float, IntArray, FloatArray, FloatArray, bool
    ]
    loss: int
    f2: float

    @classmethod
    def of(cls, problem: LMProblem, block_of: IntArray, B: int, p: int) -> _Constants:
        has_pen = problem.prior is not None and problem.penalty_weight is not None
        zeros = np.zeros((B, p))
        prior = _f64(problem.prior) if has_pen and problem.prior is not None else zeros
        pen_w = (
            _f64(problem.penalty_weight)
            if has_pen and problem.penalty_weight is not None
            else zeros
        )
        band = np.zeros(0) if problem.band is None else _f64(problem.band)
        data = (
            _f64(problem.target),
            _f64(problem.weight),
            band,
            problem.band is not None,
            float(problem.kappa),
            block_of,
            np.broadcast_to(prior, (B, p)).copy(),
            np.broadcast_to(pen_w, (B, p)).copy(),
            has_pen,
        )
        return cls(data, LOSS_CODES[problem.loss], float(problem.f_scale) ** 2)


@dataclass
class _Trial:
    """One parameter point of every block and what is known there."""

    x: FloatArray  # (B, p)
    iv: FloatArray
    jac: FloatArray
    r: FloatArray  # weighted residuals
    drho: FloatArray  # loss derivatives
    data: FloatArray  # per-block data cost
    pen: FloatArray  # per-block penalty (change penalty plus extra rows)
    erows: FloatArray  # (B, m) extra rows, (B, 0) without
    ejac: FloatArray  # (B, m, p)

    @classmethod
    def empty(cls, n: int, B: int, p: int, m: int) -> _Trial:
        return cls(
            np.zeros((B, p)), np.zeros(n), np.zeros((n, p)), np.zeros(n), np.zeros(n),
            np.zeros(B), np.zeros(B), np.zeros((B, m)), np.zeros((B, m, p)),
        )  # fmt: skip

    @classmethod
    def at(cls, problem: LMProblem, const: _Constants, x: FloatArray) -> _Trial:
        B, p = x.shape
        n = problem.target.shape[0]
        out = cls.empty(n, B, p, 0)
        out.x[:] = x
        out.evaluate(problem, const)
        return out

    def evaluate(self, problem: LMProblem, const: _Constants) -> None:
        """The model (and the extra rows) at ``self.x``, then the costs."""
        iv, jac = problem.evaluate(self.x)
        self.iv[:] = iv
        self.jac[:] = jac
        if problem.extra is not None:
            rows, rjac = problem.extra(self.x)
            if self.erows.shape != rows.shape:
                self.erows = np.zeros(rows.shape)
                self.ejac = np.zeros(rjac.shape)
            self.erows[:] = rows
            self.ejac[:] = rjac
        target, weight, band, has_band, kappa, block_of, prior, pen_w, has_pen = const.data
        lm_steps.point_costs(
            self.x, self.iv, self.erows, self.ejac, target, weight, band, has_band, kappa,
            const.loss, const.f2, block_of, prior, pen_w, has_pen, self.r, self.drho, self.data,
            self.pen,
        )  # fmt: skip


def _f64(a: FloatArray) -> FloatArray:
    return np.ascontiguousarray(a, dtype=np.float64)
