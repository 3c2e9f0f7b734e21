"""The global search (``streamer.calib.global_opt``) and its place in the cold step.

References: the LM's own cost at the same point (``solve`` with no iteration) and the soft-L1
formula written out here, each model's LM evaluation (``surface_evaluator``) row by row for the
compiled population pricers, and the known parameters of synthetic chains for the searches.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from streamer.calib.calibrator import Calibrator
from streamer.calib.data import prepare
from streamer.calib.evaluate import surface_evaluator
from streamer.calib.global_opt import (
    BAD_COST,
    GlobalSettings,
    global_search,
    population_cost,
    population_evaluator,
    search_space,
)
from streamer.calib.lm import LMProblem, solve
from streamer.calib.options import CalibConfig
from streamer.models import REGISTRY
from streamer.models.base import FitData, Model
from streamer.pricing import black_price
from tests.synth import make_chain

FloatArray = npt.NDArray[np.float64]
DAYS = (2, 7, 30, 91, 182)
HESTON_TRUE = np.array([0.36, 3.0, 0.25, 1.2, -0.4])
BATES_TRUE = np.array([0.25, 2.5, 0.3, 1.0, -0.3, 0.6, -0.25, 0.2])


def _chain_data(model: Model, x: FloatArray, days: tuple[int, ...] = DAYS) -> FitData:
    T_all = np.array(days) / 365.0

    def iv_fn(k: FloatArray, T: FloatArray, j: int) -> FloatArray:
        iv_at = getattr(model, "iv_at", None)
        if iv_at is not None:
            return np.asarray(iv_at(x, k, T, T_all))
        return np.asarray(model.implied_vol(x, k, T, np.full(k.shape, j, dtype=np.int64)))

    snap = make_chain(iv_fn, days=days, n_strikes=13, half_spread_iv=0.005)
    return prepare(snap, CalibConfig().filters, 3).data


def _problem(model: Model, data: FitData, cfg: CalibConfig | None = None) -> LMProblem:
    cfg = cfg or CalibConfig()
    lo, hi = model.bounds(data.n_slices)
    return cfg.problem(
        surface_evaluator(model, data),
        data,
        np.zeros(1, dtype=np.int64),
        lo[None, :],
        hi[None, :],
    )


def test_population_cost_is_the_lm_cost() -> None:
    model = REGISTRY["heston"]()
    data = _chain_data(model, HESTON_TRUE)
    problem = _problem(model, data)
    X = np.array([HESTON_TRUE, [0.2, 1.0, 0.4, 0.8, -0.7], [0.5, 6.0, 0.2, 2.0, 0.1]])
    iv = population_evaluator(model, data)(X)
    cost = population_cost(problem, iv)
    for i, x in enumerate(X):
        lm = solve(problem, x[None, :], max_iter=0)
        # the same prices to the fit's tolerance (``_same_prices``); the costs then agree to
        # 1e-5 (the first row is the truth, where the cost is all pricing error: ~1e-7)
        assert cost[i] == pytest.approx(float(lm.data_cost[0]), rel=1e-5, abs=1e-6)
        r = data.weight * (iv[i] - data.iv)  # soft_l1 with f = 1, written out
        assert cost[i] == pytest.approx(0.5 * np.sum(2.0 * (np.sqrt(1.0 + r * r) - 1.0)))
    nan_iv = iv.copy()
    nan_iv[1, 0] = np.nan
    assert population_cost(problem, nan_iv)[1] == BAD_COST


@pytest.mark.parametrize("name", ["heston", "bates", "heston-td", "bates-td", "bates-tdl"])
def test_population_iv_matches_implied_vol(name: str) -> None:
    model = REGISTRY[name]()
    data = _chain_data(REGISTRY["heston"](), HESTON_TRUE)
    rng = np.random.default_rng(3)
    lo, hi = model.bounds(data.n_slices)
    guess = model.initial_guesses(data)[0]
    X = np.array([np.clip(guess * rng.uniform(0.8, 1.2, guess.shape), lo, hi) for _ in range(3)])
    pop = population_evaluator(model, data)(X)
    evaluate = surface_evaluator(model, data)  # what the LM prices (at the fit's tolerance)
    tol = float(getattr(model, "fit_tol", getattr(model, "tol", 0.0)))
    assert 0.0 < tol <= 1e-7
    for i, x in enumerate(X):
        _same_prices(pop[i], evaluate(x[None, :])[0], data, tol)


def _same_prices(iv: FloatArray, ref: FloatArray, data: FitData, tol: float) -> None:
    """The out-of-the-money Black prices (F = 1) of two sets of vols agree to a few times
    the COS truncation tolerance ``tol`` (of the forward; each series stops on its own: the
    LM's also waits for the gradient's terms to die, the population's only for the prices'),
    and the vols to 1e-4 relative where the price is worth a tick (1e-4)."""
    np.testing.assert_array_equal(np.isnan(iv), np.isnan(ref))
    ok = ~np.isnan(ref)
    k, T = data.k[ok], data.T[ok]
    call = k >= 0.0
    p = black_price(1.0, np.exp(k), T, iv[ok], call)
    p_ref = black_price(1.0, np.exp(k), T, ref[ok], call)
    assert np.max(np.abs(p - p_ref)) <= 4.0 * tol + 1e-15
    worth = p_ref > 1e-4
    np.testing.assert_allclose(iv[ok][worth], ref[ok][worth], rtol=1e-4)


def test_search_space_ties_pieces_and_maps_the_box() -> None:
    model = REGISTRY["bates-td"]()
    S = 4
    space = search_space(model, S)
    names = model.param_names(S)
    assert space.dim == 8  # v0 kappa theta xi rho lam mu_j sigma_j
    assert {names[i] for i in np.flatnonzero(space.group == space.group[2])} == {
        f"theta[{j}]" for j in range(S)
    }
    lo, hi = model.bounds(S)
    np.testing.assert_allclose(space.to_params(np.zeros((1, 8)))[0], lo)
    np.testing.assert_allclose(space.to_params(np.ones((1, 8)))[0], hi)
    # log scale for v0 (1e-4..4): the middle of the cube is the geometric mean
    assert space.log[0] and not space.log[4]
    mid = space.to_params(np.full((1, 8), 0.5))[0]
    assert mid[0] == pytest.approx(np.sqrt(1e-4 * 4.0))
    x = space.to_params(np.random.default_rng(0).uniform(size=(1, 8)))[0]
    np.testing.assert_allclose(space.to_params(space.to_unit(x)[None, :])[0], x, rtol=1e-12)


@pytest.mark.parametrize(("name", "truth"), [("heston", HESTON_TRUE), ("bates", BATES_TRUE)])
def test_differential_evolution_then_lm_finds_the_known_parameters(
    name: str, truth: FloatArray
) -> None:
    model = REGISTRY[name]()
    data = _chain_data(model, truth)
    problem = _problem(model, data)
    found = global_search(model, data, problem, GlobalSettings(maxiter=60))  # no seeds
    polished = solve(problem, found.x[None, :], max_iter=200)
    assert float(polished.data_cost[0]) < 1e-3
    np.testing.assert_allclose(polished.x[0][:5], truth[:5], rtol=0.05, atol=0.02)


def test_cmaes_finds_the_known_heston_parameters() -> None:
    pytest.importorskip("cma")
    model = REGISTRY["heston"]()
    data = _chain_data(model, HESTON_TRUE)
    problem = _problem(model, data)
    found = global_search(model, data, problem, GlobalSettings(method="cmaes", maxiter=80))
    polished = solve(problem, found.x[None, :], max_iter=200)
    np.testing.assert_allclose(polished.x[0], HESTON_TRUE, rtol=0.05, atol=0.02)


def test_cold_step_global_and_fallback() -> None:
    """``cold_start = "global"`` recovers the parameters from no warm start; ``learned`` falls
    back to the search when its fit is doubtful (here: any error at all)."""
    model = REGISTRY["heston"]()
    T_all = np.array(DAYS) / 365.0

    def iv_fn(k: FloatArray, T: FloatArray, j: int) -> FloatArray:
        return np.asarray(model.implied_vol(HESTON_TRUE, k, T, np.full(k.shape, j)))

    snap = make_chain(iv_fn, days=DAYS, n_strikes=13, half_spread_iv=0.005)
    dim_pop = 6 * 5
    r = Calibrator(model, CalibConfig(cold_start="global")).fit(snap)
    assert r.success
    assert r.nfev > dim_pop
    np.testing.assert_allclose(r.x[0], HESTON_TRUE, rtol=0.05, atol=0.02)
    plain = Calibrator(model, CalibConfig(cold_start="learned")).fit(snap)
    forced = Calibrator(model, CalibConfig(cold_start="learned", global_fallback_wrms=0.0)).fit(
        snap
    )
    assert plain.nfev < dim_pop < forced.nfev
    assert forced.success and T_all.shape[0] == len(forced.slices)
