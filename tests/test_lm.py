"""The block Levenberg-Marquardt (``streamer.calib.lm``) against scipy's ``least_squares`` on
the same objectives: every loss, the band objective, the change penalty, extra rows, bounds,
several blocks at once and the secant-augmented variant; plus its bookkeeping (a non-finite
start, a converged block that stays put)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from scipy.optimize import least_squares

from streamer.calib.lm import LMProblem, Loss, solve
from streamer.calib.lm_steps import STALL_RTOL

FloatArray = npt.NDArray[np.float64]

# a smile-like curve per block: iv(k) = a + b tanh(e (k - d)) + c k^2, p = 5
P_TRUE = np.array([[0.5, -0.2, 0.3, 0.2, 2.0], [0.8, 0.1, 0.1, -0.3, 1.0]])
LO = np.array([0.0, -2.0, 0.0, -1.0, 0.5])
HI = np.array([2.0, 2.0, 2.0, 1.0, 10.0])


def _model(
    X: FloatArray, k: FloatArray, block: npt.NDArray[np.int64]
) -> tuple[FloatArray, FloatArray]:
    a, b, c, d, e = (X[block, j] for j in range(5))
    th = np.tanh(e * (k - d))
    sech2 = 1.0 - th * th
    iv = a + b * th + c * k * k
    jac = np.stack([np.ones_like(k), th, k * k, -b * e * sech2, b * (k - d) * sech2], axis=1)
    return iv, jac


def _data(n_per: int = 40, seed: int = 3) -> tuple[FloatArray, npt.NDArray[np.int64], FloatArray]:
    rng = np.random.default_rng(seed)
    k = np.tile(np.linspace(-1.5, 1.5, n_per), 2)
    block = np.repeat(np.arange(2), n_per).astype(np.int64)
    iv, _ = _model(P_TRUE, k, block)
    target = iv + rng.normal(scale=0.01, size=k.shape)
    target[::7] += 0.2  # outliers: the robust losses matter
    return k, block, target


def _scipy_fit(
    k: FloatArray,
    target: FloatArray,
    weight: FloatArray,
    x0: FloatArray,
    loss: Loss,
    f_scale: float,
    *,
    band: FloatArray | None = None,
    kappa: float = 1.0,
    prior: FloatArray | None = None,
    pen_w: FloatArray | None = None,
    lo: FloatArray = LO,
    hi: FloatArray = HI,
) -> FloatArray:
    """One block by scipy. The penalty rows (linear in x) go in as extra residuals, scaled so
    that scipy's robust loss, applied to every residual, leaves them quadratic."""
    zero = np.zeros(k.shape, dtype=np.int64)

    def resid(x: FloatArray) -> FloatArray:
        iv, _ = _model(x[None, :], k, zero)
        e = iv - target
        r = e if band is None else kappa * e + (e - np.clip(e, -band, band))
        return weight * r

    def cost(x: FloatArray) -> float:
        r = resid(x)
        z = (r / f_scale) ** 2
        if loss == "linear":
            rho = z
        elif loss == "soft_l1":
            rho = 2.0 * (np.sqrt(1.0 + z) - 1.0)
        else:
            rho = np.where(z <= 1.0, z, 2.0 * np.sqrt(z) - 1.0)
        c = 0.5 * f_scale**2 * float(np.sum(rho))
        if prior is not None and pen_w is not None:
            c += 0.5 * float(np.sum((pen_w * (x - prior)) ** 2))
        return c

    if prior is None:
        res = least_squares(
            resid, x0, bounds=(lo, hi), loss=loss, f_scale=f_scale, xtol=1e-15, ftol=1e-15,
            gtol=1e-15, max_nfev=5000,
        )  # fmt: skip
        return np.asarray(res.x)
    # with a penalty the objective is not one of scipy's losses over all rows: minimise the
    # exact cost from several scipy starts with L-BFGS-B on the box
    from scipy.optimize import minimize

    out = minimize(cost, x0, method="L-BFGS-B", bounds=list(zip(lo, hi, strict=True)),
                   options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 20000})  # fmt: skip
    return np.asarray(out.x)


def _problem(
    k: FloatArray,
    block: npt.NDArray[np.int64],
    target: FloatArray,
    loss: Loss,
    f_scale: float,
    **kw: object,
) -> LMProblem:
    B = int(block.max()) + 1
    starts = np.searchsorted(block, np.arange(B)).astype(np.int64)
    return LMProblem(
        lambda X: _model(X, k, block),
        target,
        np.full(k.shape, 1.0),
        starts,
        np.tile(LO, (B, 1)),
        np.tile(HI, (B, 1)),
        loss=loss,
        f_scale=f_scale,
        **kw,  # type: ignore[arg-type]
    )


def _cost(problem: LMProblem, X: FloatArray) -> FloatArray:
    """The objective per block, computed here from its definition (lm's docstring)."""
    iv, _ = problem.evaluate(X)
    e = iv - problem.target
    if problem.band is not None:
        e = problem.kappa * e + (e - np.clip(e, -problem.band, problem.band))
    z = (problem.weight * e / problem.f_scale) ** 2
    rho = {
        "linear": z,
        "soft_l1": 2.0 * (np.sqrt(1.0 + z) - 1.0),
        "huber": np.where(z <= 1.0, z, 2.0 * np.sqrt(np.maximum(z, 0.0)) - 1.0),
    }[problem.loss]
    out = np.zeros(X.shape[0])
    for b in range(X.shape[0]):
        lo = problem.starts[b]
        hi = problem.starts[b + 1] if b + 1 < X.shape[0] else e.shape[0]
        out[b] = 0.5 * problem.f_scale**2 * np.sum(rho[lo:hi])
        if problem.prior is not None and problem.penalty_weight is not None:
            out[b] += 0.5 * np.sum((problem.penalty_weight[b] * (X[b] - problem.prior[b])) ** 2)
    return out


X0 = np.array([[1.0, 0.0, 0.5, 0.0, 1.0], [1.0, 0.0, 0.5, 0.0, 1.0]])


@pytest.mark.parametrize("loss", ["linear", "soft_l1", "huber"])
@pytest.mark.parametrize("secant", [False, True])
def test_every_loss_reaches_scipys_optimum(loss: Loss, secant: bool) -> None:
    k, block, target = _data()
    problem = _problem(k, block, target, loss, 0.02)
    res = solve(problem, X0, max_iter=500, secant=secant, ftol=1e-12)
    assert res.converged.all()
    for b in range(2):
        sel = block == b
        ref = _scipy_fit(k[sel], target[sel], np.ones(sel.sum()), X0[b], loss, 0.02)
        ref_cost = _cost(problem, np.stack([ref, ref]))[b]
        assert res.data_cost[b] <= ref_cost * (1.0 + 1e-5)
        np.testing.assert_allclose(res.x[b], ref, rtol=2e-3, atol=2e-4)
    # what is returned is the objective at the returned parameters
    np.testing.assert_allclose(res.data_cost, _cost(problem, res.x), rtol=1e-12)
    np.testing.assert_allclose(res.iv, problem.evaluate(res.x)[0], rtol=0, atol=0)


def test_the_band_objective_and_the_penalty_match_their_definitions() -> None:
    k, block, target = _data()
    band = np.full(k.shape, 0.015)
    prior = np.tile(P_TRUE[0] * 1.1, (2, 1))
    pen_w = np.tile(np.array([2.0, 1.0, 1.0, 3.0, 0.1]), (2, 1))
    for kw in (dict(band=band, kappa=0.2), dict(prior=prior, penalty_weight=pen_w)):
        problem = _problem(k, block, target, "soft_l1", 0.05, **kw)
        res = solve(problem, X0, max_iter=500, ftol=1e-12)
        assert res.converged.all()
        if "prior" in kw:
            total = res.data_cost + res.penalty
            np.testing.assert_allclose(total, _cost(problem, res.x), rtol=1e-10)
        for b in range(2):
            sel = block == b
            ref = _scipy_fit(
                k[sel], target[sel], np.ones(sel.sum()), X0[b], "soft_l1", 0.05,
                band=band[sel] if "band" in kw else None, kappa=0.2 if "band" in kw else 1.0,
                prior=prior[b] if "prior" in kw else None,
                pen_w=pen_w[b] if "prior" in kw else None,
            )  # fmt: skip
            mine = _cost(problem, res.x)[b]
            theirs = _cost(problem, np.stack([ref, ref]))[b]
            assert mine <= theirs * (1.0 + 1e-5) + 1e-12


def test_bounds_hold_and_a_bound_optimum_is_found() -> None:
    """With the curvature bounded above the truth, the optimum sits on the bound."""
    k, block, target = _data()
    problem = _problem(k, block, target, "linear", 1.0)
    hi = np.tile(HI, (2, 1))
    hi[:, 2] = 0.05  # c <= 0.05 < truth
    problem = LMProblem(
        problem.evaluate, problem.target, problem.weight, problem.starts, problem.lower, hi,
        loss="linear",
    )  # fmt: skip
    res = solve(problem, X0 * 0.0 + np.array([1.0, 0.0, 0.01, 0.0, 1.0]), max_iter=300, ftol=1e-12)
    assert np.all(res.x <= hi) and np.all(res.x >= problem.lower)
    np.testing.assert_allclose(res.x[:, 2], 0.05)
    for b in range(2):
        sel = block == b
        ref = _scipy_fit(k[sel], target[sel], np.ones(sel.sum()), np.array([1.0, 0, 0.01, 0, 1]),
                         "linear", 1.0, hi=hi[b])  # fmt: skip
        assert _cost(problem, res.x)[b] <= _cost(problem, np.stack([ref, ref]))[b] * (1 + 1e-6)


def test_extra_rows_join_the_objective() -> None:
    """An extra row ``10 (a - 0.3)`` per block: the optimum of the augmented problem."""
    k, block, target = _data()

    def extra(X: FloatArray) -> tuple[FloatArray, FloatArray]:
        rows = 10.0 * (X[:, :1] - 0.3)
        jac = np.zeros((X.shape[0], 1, 5))
        jac[:, 0, 0] = 10.0
        return rows, jac

    problem = _problem(k, block, target, "linear", 1.0, extra=extra)
    res = solve(problem, X0, max_iter=300, ftol=1e-12)
    plain = solve(_problem(k, block, target, "linear", 1.0), X0, max_iter=300)
    zero = np.zeros(int((block == 0).sum()), dtype=np.int64)
    for b in range(2):
        sel = block == b

        def resid(x: FloatArray, sel: npt.NDArray[np.bool_] = sel) -> FloatArray:
            iv, _ = _model(x[None, :], k[sel], zero)
            return np.append(iv - target[sel], 10.0 * (x[0] - 0.3))

        ref = least_squares(resid, X0[b], bounds=(LO, HI), xtol=1e-15, ftol=1e-15, gtol=1e-15)
        mine = 0.5 * float(np.sum(resid(res.x[b]) ** 2))
        assert mine <= float(ref.cost) * (1.0 + STALL_RTOL)  # the LM's stall rule
        np.testing.assert_allclose(res.data_cost[b] + res.penalty[b], mine, rtol=1e-10)
        assert abs(res.x[b, 0] - 0.3) < abs(plain.x[b, 0] - 0.3)
        np.testing.assert_allclose(res.penalty[b], 0.5 * (10.0 * (res.x[b, 0] - 0.3)) ** 2)


def test_a_non_finite_start_and_points_are_survived() -> None:
    """A start whose model values are NaN at some points (and infinite cost) still descends:
    non-finite points are left out of the step, and a finite trial is accepted."""
    k, block, target = _data()
    base = _problem(k, block, target, "soft_l1", 0.05)

    def evaluate(X: FloatArray) -> tuple[FloatArray, FloatArray]:
        iv, jac = base.evaluate(X)
        bad = (X[block, 0] > 0.95) & (np.arange(k.shape[0]) % 5 == 0)
        iv = np.where(bad, np.nan, iv)
        return iv, jac

    problem = LMProblem(
        evaluate, base.target, base.weight, base.starts, base.lower, base.upper,
        loss="soft_l1", f_scale=0.05,
    )  # fmt: skip
    res = solve(problem, X0, max_iter=300)
    assert np.all(np.isfinite(res.data_cost))
    assert np.all(res.x[:, 0] <= 0.95)


def test_a_converged_block_stays_while_another_works() -> None:
    """Block 0 starts at its optimum: it stops at once and never moves; block 1 carries on."""
    k, block, target = _data()
    problem = _problem(k, block, target, "linear", 1.0)
    first = solve(problem, X0, max_iter=300, ftol=1e-12)
    start = np.stack([first.x[0], X0[1]])
    res = solve(problem, start, max_iter=300, ftol=1e-12)
    np.testing.assert_allclose(res.x[0], first.x[0], rtol=1e-6, atol=1e-9)
    assert res.data_cost[0] <= first.data_cost[0]
    np.testing.assert_allclose(res.x[1], first.x[1], rtol=1e-5, atol=1e-7)
    assert res.iterations > 2


def _valley() -> LMProblem:
    """Rosenbrock's valley as least squares (r = [10 (x2 - x1^2), 1 - x1]): from (-1.2, 1) the
    LM crawls along a curved floor for tens of iterations."""

    def evaluate(X: FloatArray) -> tuple[FloatArray, FloatArray]:
        x1, x2 = X[0]
        iv = np.array([10.0 * (x2 - x1 * x1), 1.0 - x1])
        return iv, np.array([[-20.0 * x1, 10.0], [-1.0, 0.0]])

    lo, hi = np.array([[-5.0, -5.0]]), np.array([[5.0, 5.0]])
    return LMProblem(evaluate, np.zeros(2), np.ones(2), np.zeros(1, dtype=np.int64), lo, hi)


def test_a_run_that_cannot_beat_a_rival_at_its_pace_gives_up() -> None:
    """``beat``: the run stops at the first iteration where the cost its last two accepted
    steps bought per iteration, times the iterations left, is short of ``beat`` (the rule
    applied here to the cost after each iteration of the plain run)."""
    problem, x0, max_iter = _valley(), np.array([[-1.2, 1.0]]), 60
    plain = solve(problem, x0, max_iter=max_iter)
    assert plain.converged[0] and plain.iterations > 12
    costs = [float(solve(problem, x0, max_iter=i).data_cost[0]) for i in range(plain.iterations)]
    beat = 0.05 * costs[0]  # a rival's cost below all but the end of this run's path
    accepted, expected = [(0, costs[0])], None
    for i in range(1, len(costs)):
        if costs[i] < accepted[-1][1]:
            accepted.append((i, costs[i]))
        if costs[i] > beat and len(accepted) > 2:
            then, before = accepted[-3]
            if (before - costs[i]) / (i - then) * (max_iter - i) < costs[i] - beat:
                expected = i
                break
    assert expected is not None
    paced = solve(problem, x0, max_iter=max_iter, beat=beat)
    assert paced.iterations == expected and not paced.converged[0]
    assert paced.data_cost[0] == pytest.approx(costs[expected], rel=1e-12)


def test_a_run_that_beats_its_rival_is_not_stopped() -> None:
    problem, x0 = _valley(), np.array([[-1.2, 1.0]])
    plain = solve(problem, x0, max_iter=60)
    first = float(solve(problem, x0, max_iter=1).data_cost[0])
    paced = solve(problem, x0, max_iter=60, beat=1.0001 * first)  # below it after one step
    assert paced.iterations == plain.iterations and paced.converged[0]
    np.testing.assert_array_equal(paced.x, plain.x)
