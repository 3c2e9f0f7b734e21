r"""The compiled arithmetic of one ``lm.solve`` iteration, as ask-and-tell kernels.

``lm.solve`` keeps the loop and the model's evaluation (a Python callable: the surface
models' numba pricers, a per-expiry model's rows, the hinge rows); everything between two
evaluations runs here, one compiled call each:

- ``point_costs``: a point's weighted residuals, loss derivatives, per-block data cost and
  penalty (the change penalty plus the extra rows' cost), from its IVs;
- ``propose``: the normal equations, the secant update of the second-order term, the held
  variables and Marquardt's damped step, projected on the bounds, with its predicted
  reduction;
- ``tell``: accept or reject the trial per block, adapt ``mu``, the stopping rules, the
  secant bookkeeping, and take the accepted trial's arrays.

The rules are those of ``lm``'s docstring (Marquardt 1963; Holland & Welsch 1977 for the
IRLS weights; Dennis, Gay & Welsch 1981 for the structured secant update). On a 274-quote
Heston surface the numpy arithmetic between evaluations cost about 0.3 ms per iteration
(some sixty small-array calls), as much as half the pricer's own time; these kernels take a
few microseconds.

Shapes: ``B`` blocks of ``p`` parameters; ``n`` points sorted by block (``starts``: each
block's first point; ``block_of``: each point's block); ``m`` extra rows per block (0 when
the problem has none). Loss codes: ``LOSS_CODES``. A point whose IV or Jacobian row is not
finite is left out of the normal equations (a zero row). Kernels use numba's
``error_model="numpy"``: a division by zero gives inf/NaN, as numpy's would.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from numba import njit

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

LOSS_CODES = {"linear": 0, "soft_l1": 1, "huber": 2}
MU_INIT = 1e-3
MU_MAX = 1e12
STALL_ITERS = 10
STALL_RTOL = 1e-4
CREEP = 0.02  # secant steps once an accepted step buys less than this share of the cost
BAD_ROW = 1e6  # a non-finite extra row counts as this


@njit(cache=True, nogil=True, error_model="numpy")
def rho(z: float, loss: int) -> tuple[float, float]:
    """Loss value and first derivative at ``z = (r/f)^2`` (codes of ``LOSS_CODES``)."""
    if loss == 0:
        return z, 1.0
    if loss == 1:
        t = math.sqrt(1.0 + z)
        return 2.0 * (t - 1.0), 1.0 / t
    if z > 1.0:
        sz = math.sqrt(z)
        return 2.0 * sz - 1.0, 1.0 / sz
    return z, 1.0


@njit(cache=True, nogil=True, error_model="numpy")
def solve_small(A: FloatArray, b: FloatArray, out: FloatArray) -> bool:
    """``A out = b`` for a small dense system (Gaussian elimination, partial pivoting);
    False when singular. ``A`` and ``b`` are overwritten."""
    n = b.shape[0]
    for c in range(n):
        piv = c
        big = abs(A[c, c])
        for i in range(c + 1, n):
            if abs(A[i, c]) > big:
                big = abs(A[i, c])
                piv = i
        if not big > 0.0 or not math.isfinite(big):
            return False
        if piv != c:
            for j in range(n):
                A[c, j], A[piv, j] = A[piv, j], A[c, j]
            b[c], b[piv] = b[piv], b[c]
        for i in range(c + 1, n):
            f = A[i, c] / A[c, c]
            for j in range(c, n):
                A[i, j] -= f * A[c, j]
            b[i] -= f * b[c]
    for i in range(n - 1, -1, -1):
        s = b[i]
        for j in range(i + 1, n):
            s -= A[i, j] * out[j]
        out[i] = s / A[i, i]
    return True


@njit(cache=True, nogil=True, error_model="numpy")
def _positive_definite(M: FloatArray, work: FloatArray) -> bool:
    """Does the symmetric ``M`` have a Cholesky factor (every pivot positive and finite)?"""
    p = M.shape[0]
    for j in range(p):
        s = M[j, j]
        for k in range(j):
            s -= work[j, k] * work[j, k]
        if not s > 0.0 or not math.isfinite(s):
            return False
        d = math.sqrt(s)
        work[j, j] = d
        for i in range(j + 1, p):
            t = M[i, j]
            for k in range(j):
                t -= work[i, k] * work[j, k]
            work[i, j] = t / d
    return True


@njit(cache=True, nogil=True, error_model="numpy")
def _residual(
    e: float, band: FloatArray, has_band: bool, kappa: float, i: int
) -> tuple[float, float]:
    """The band objective ``kappa e + (e - clip(e, -band, band))`` and its slope in ``e``;
    without a band ``e`` and 1."""
    if not has_band:
        return e, 1.0
    h = band[i]
    outside = e - min(max(e, -h), h)
    slope = kappa + (1.0 if abs(e) > h else 0.0)
    return kappa * e + outside, slope


@njit(cache=True, nogil=True, error_model="numpy")
def point_costs(
    x: FloatArray,
    iv: FloatArray,
    erows: FloatArray,
    ejac: FloatArray,
    target: FloatArray,
    weight: FloatArray,
    band: FloatArray,
    has_band: bool,
    kappa: float,
    loss: int,
    f2: float,
    block_of: IntArray,
    prior: FloatArray,
    pen_w: FloatArray,
    has_pen: bool,
    r: FloatArray,
    drho: FloatArray,
    data: FloatArray,
    pen: FloatArray,
) -> None:
    """Residuals ``r``, loss derivatives ``drho``, per-block data cost (``inf`` when not
    finite) and penalty plus extra-row cost at ``x``; non-finite extra rows are set to
    ``BAD_ROW`` and their non-finite Jacobian entries to 0, in place."""
    B, p = x.shape
    for b in range(B):
        data[b] = 0.0
        pen[b] = 0.0
    for i in range(iv.shape[0]):
        ri = weight[i] * _residual(iv[i] - target[i], band, has_band, kappa, i)[0]
        val, der = rho(ri * ri / f2, loss)
        r[i] = ri
        drho[i] = der
        data[block_of[i]] += val
    for b in range(B):
        c = 0.5 * f2 * data[b]
        data[b] = c if math.isfinite(c) else math.inf
        s = 0.0
        if has_pen:
            for q in range(p):
                d = pen_w[b, q] * (x[b, q] - prior[b, q])
                s += d * d
        e = 0.0
        for j in range(erows.shape[1]):
            if not math.isfinite(erows[b, j]):
                erows[b, j] = BAD_ROW
            e += erows[b, j] * erows[b, j]
            for q in range(p):
                if not math.isfinite(ejac[b, j, q]):
                    ejac[b, j, q] = 0.0
        pen[b] = 0.5 * s + 0.5 * e


@njit(cache=True, nogil=True, error_model="numpy")
def _normal_equations(
    x: FloatArray,
    iv: FloatArray,
    jac: FloatArray,
    r: FloatArray,
    drho: FloatArray,
    erows: FloatArray,
    ejac: FloatArray,
    target: FloatArray,
    weight: FloatArray,
    band: FloatArray,
    has_band: bool,
    kappa: float,
    block_of: IntArray,
    prior: FloatArray,
    pen_w: FloatArray,
    has_pen: bool,
    A: FloatArray,
    g: FloatArray,
    row: FloatArray,
) -> None:
    """Per block ``A = J'J`` and ``g = J'r`` of the IRLS-scaled data rows (points with a
    non-finite IV or Jacobian row left out), plus the penalty and the extra rows."""
    B, p = x.shape
    A[:] = 0.0
    g[:] = 0.0
    for i in range(iv.shape[0]):
        if not math.isfinite(iv[i]):
            continue
        ok = True
        for q in range(p):
            if not math.isfinite(jac[i, q]):
                ok = False
        if not ok:
            continue
        sd = math.sqrt(drho[i])
        w = weight[i] * _residual(iv[i] - target[i], band, has_band, kappa, i)[1] * sd
        rs = r[i] * sd
        if not math.isfinite(rs):
            rs = 0.0
        b = block_of[i]
        for q in range(p):
            row[q] = w * jac[i, q]
        for q in range(p):
            g[b, q] += row[q] * rs
            for c in range(q + 1):
                A[b, q, c] += row[q] * row[c]
    for b in range(B):
        for q in range(p):
            for c in range(q):
                A[b, c, q] = A[b, q, c]
        if has_pen:
            for q in range(p):
                w2 = pen_w[b, q] * pen_w[b, q]
                A[b, q, q] += w2
                g[b, q] += w2 * (x[b, q] - prior[b, q])
        for j in range(erows.shape[1]):
            for q in range(p):
                g[b, q] += ejac[b, j, q] * erows[b, j]
                for c in range(p):
                    A[b, q, c] += ejac[b, j, q] * ejac[b, j, c]


@njit(cache=True, nogil=True, error_model="numpy")
def secant_update(S: FloatArray, s: FloatArray, y: FloatArray, A_new: FloatArray) -> FloatArray:
    """The structured secant update of the second-order term ``S`` of one block (in place
    of ``sum_i rho_i r_i nabla^2 r_i``, which Gauss-Newton leaves out): Dennis, Gay and
    Welsch's symmetric rank-two update (NL2SOL, 1981) with their sizing (eq. 3.4: shrink
    ``S`` where it overstates curvature), such that ``(A_new + S_new) s = y`` for the step
    ``s`` and gradient change ``y``; ``A_new`` the Gauss-Newton matrix at the new point.
    With ``y's`` not positive the (sized) ``S`` is returned unchanged otherwise."""
    p = s.shape[0]
    ys = 0.0
    sSs = 0.0
    s_ysharp = 0.0
    Ss = np.empty(p)
    y_sharp = np.empty(p)
    for q in range(p):
        ys += y[q] * s[q]
        a = 0.0
        t = 0.0
        for c in range(p):
            a += A_new[q, c] * s[c]
            t += S[q, c] * s[c]
        y_sharp[q] = y[q] - a
        Ss[q] = t
    for q in range(p):
        sSs += s[q] * Ss[q]
        s_ysharp += s[q] * y_sharp[q]
    tau = min(1.0, abs(s_ysharp) / max(abs(sSs), 1e-300)) if abs(sSs) > 0.0 else 1.0
    out = tau * S
    if not ys > 1e-300:
        return out
    inv = 1.0 / ys
    v = y_sharp - tau * Ss
    vs = 0.0
    for q in range(p):
        vs += v[q] * s[q]
    for q in range(p):
        for c in range(p):
            out[q, c] += (v[q] * y[c] + y[q] * v[c]) * inv - vs * inv * inv * y[q] * y[c]
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def propose(
    x: FloatArray,
    iv: FloatArray,
    jac: FloatArray,
    r: FloatArray,
    drho: FloatArray,
    erows: FloatArray,
    ejac: FloatArray,
    target: FloatArray,
    weight: FloatArray,
    band: FloatArray,
    has_band: bool,
    kappa: float,
    block_of: IntArray,
    prior: FloatArray,
    pen_w: FloatArray,
    has_pen: bool,
    lower: FloatArray,
    upper: FloatArray,
    mu: FloatArray,
    converged: BoolArray,
    secant: bool,
    has_last: bool,
    last_x: FloatArray,
    last_g: FloatArray,
    S: FloatArray,
    creeping: BoolArray,
    use_s: BoolArray,
    x_new: FloatArray,
    data: FloatArray,
    pen: FloatArray,
    ftol: float,
    xtol: float,
) -> bool:
    """The trial point ``x_new`` of every block: Marquardt's damped step
    ``(A + mu diag(A)) d = -g`` in the free subspace (a variable on a bound whose descent
    direction leaves the box is held), ``A`` augmented by the secant term ``S`` for a
    creeping block whose augmented matrix is positive definite (``use_s``), projected on the
    bounds. Records ``last_x``, ``last_g`` (the point and its full gradient) for the next
    secant update. Converged blocks stay where they are.

    A block whose step would buy less than ``ftol`` of its cost by the quadratic model (a
    step the bounds did not cut: a clipped step far outside the box may predict nothing
    although the point is not stationary), or move no parameter by more than ``xtol``
    (relative), stops here, before the trial is evaluated: the evaluation could only confirm
    a step too small to matter. True when every block has stopped (no evaluation needed)."""
    B, p = x.shape
    A = np.empty((B, p, p))
    g = np.empty((B, p))
    row = np.empty(p)
    _normal_equations(
        x, iv, jac, r, drho, erows, ejac, target, weight, band, has_band, kappa, block_of,
        prior, pen_w, has_pen, A, g, row,
    )  # fmt: skip
    damped = np.empty((p, p))
    rhs = np.empty(p)
    step = np.empty(p)
    chol = np.empty((p, p))
    held = np.empty(p, dtype=np.bool_)
    done = True
    for b in range(B):
        Ab = A[b]
        if secant:
            if has_last:
                fresh = False
                for q in range(p):
                    if x[b, q] != last_x[b, q]:
                        fresh = True
                if fresh:
                    S[b] = secant_update(S[b], x[b] - last_x[b], g[b] - last_g[b], Ab)
            aug = Ab + S[b]
            good = False
            if creeping[b]:
                for q in range(p):
                    aug[q, q] += 1e-12
                good = _positive_definite(aug, chol)
                for q in range(p):
                    aug[q, q] -= 1e-12
            use_s[b] = good
            if good:
                Ab = aug
            for q in range(p):
                last_x[b, q] = x[b, q]
                last_g[b, q] = g[b, q]
        dmax = -math.inf
        for q in range(p):
            dmax = max(dmax, Ab[q, q])
        for q in range(p):
            gq = g[b, q]
            held[q] = (x[b, q] <= lower[b, q] and gq > 0.0) or (x[b, q] >= upper[b, q] and gq < 0.0)
            if held[q]:
                g[b, q] = 0.0
        for q in range(p):
            rhs[q] = -g[b, q]
            for c in range(p):
                damped[q, c] = 0.0 if (held[q] or held[c]) else Ab[q, c]
            if held[q]:
                damped[q, q] = 1.0
            else:
                damped[q, q] += mu[b] * (Ab[q, q] + 1e-12 * (1.0 + dmax))
        diag = np.empty(p)
        for q in range(p):
            diag[q] = damped[q, q]
        if not solve_small(damped, rhs, step):
            for q in range(p):
                step[q] = -g[b, q] / max(diag[q], 1e-300)
        if converged[b]:
            step[:] = 0.0
        cut = False
        pred = 0.0
        for q in range(p):
            xq = x[b, q] + step[q]
            xn = min(max(xq, lower[b, q]), upper[b, q])
            if xn != xq:
                cut = True
            x_new[b, q] = xn
        moved = 0.0
        for q in range(p):
            dq = x_new[b, q] - x[b, q]
            moved = max(moved, abs(dq) / (abs(x[b, q]) + 1e-8))
            pred -= g[b, q] * dq
            for c in range(p):
                pred -= 0.5 * dq * Ab[q, c] * (x_new[b, c] - x[b, c])
        total = data[b] + pen[b]
        # from a non-finite cost nothing is small: the block carries on
        if math.isfinite(total) and (
            (pred <= ftol * max(total, 1e-300) and not cut) or moved <= xtol
        ):
            converged[b] = True
            for q in range(p):
                x_new[b, q] = x[b, q]
        if not converged[b]:
            done = False
    return done


@njit(cache=True, nogil=True, error_model="numpy")
def tell(
    x: FloatArray,
    iv: FloatArray,
    jac: FloatArray,
    r: FloatArray,
    drho: FloatArray,
    data: FloatArray,
    pen: FloatArray,
    erows: FloatArray,
    ejac: FloatArray,
    x_new: FloatArray,
    iv_new: FloatArray,
    jac_new: FloatArray,
    r_new: FloatArray,
    drho_new: FloatArray,
    data_new: FloatArray,
    pen_new: FloatArray,
    erows_new: FloatArray,
    ejac_new: FloatArray,
    starts: IntArray,
    mu: FloatArray,
    converged: BoolArray,
    checkpoint: FloatArray,
    secant: bool,
    S: FloatArray,
    creeping: BoolArray,
    use_s: BoolArray,
    ftol: float,
    iteration: int,
) -> bool:
    """Judge the trial of every block: accept it where its cost fell (its arrays copied into
    the current point's), adapt ``mu``, stop a block on a small actual reduction, ``mu`` past
    ``MU_MAX`` or a stall (every ``STALL_ITERS`` iterations, less than ``STALL_RTOL``
    bought); forget the secant term of a block whose augmented step failed. True when every
    block has stopped."""
    B, p = x.shape
    n = iv.shape[0]
    done = True
    for b in range(B):
        old_total = data[b] + pen[b]
        new_total = data_new[b] + pen_new[b]
        accept = new_total < old_total and not converged[b]
        scale = max(old_total, 1e-300)
        # from a non-finite cost no reduction is small: the block carries on (a rejected
        # trial grows mu until MU_MAX stops it)
        small = accept and math.isfinite(old_total) and (old_total - new_total) <= ftol * scale
        if secant:
            if accept:
                creeping[b] = (old_total - new_total) / scale < CREEP
            if use_s[b] and not accept and not converged[b]:
                S[b] = 0.0
        if accept:
            lo = starts[b]
            hi = starts[b + 1] if b + 1 < B else n
            for i in range(lo, hi):
                iv[i] = iv_new[i]
                r[i] = r_new[i]
                drho[i] = drho_new[i]
                for q in range(p):
                    jac[i, q] = jac_new[i, q]
            for q in range(p):
                x[b, q] = x_new[b, q]
            data[b] = data_new[b]
            pen[b] = pen_new[b]
            for j in range(erows.shape[1]):
                erows[b, j] = erows_new[b, j]
                for q in range(p):
                    ejac[b, j, q] = ejac_new[b, j, q]
            mu[b] = max(mu[b] / 3.0, 1e-12)
        else:
            mu[b] *= 4.0
        if small or mu[b] > MU_MAX:
            converged[b] = True
        if iteration % STALL_ITERS == 0:
            now_total = data[b] + pen[b]
            if checkpoint[b] - now_total <= STALL_RTOL * max(now_total, 1e-300):
                converged[b] = True
            checkpoint[b] = now_total
        if not converged[b]:
            done = False
    return done
