"""The cold path's cheaper pieces: the fit tolerance of the COS pricer, the vectorised smile
features, the kept COS coefficients, the secant-augmented LM and the race of starts.

References: the reference-grade pricer (``TAIL_TOL``) for the fit-tolerance vols, the slice
by slice least squares (``slice_smiles_loop``) for the vectorised features, the direct COS
sweep (``otm_prices``) for the kept coefficients, the secant
condition written out for the update, plain Gauss-Newton LM runs for the augmented one, and
known parameters of synthetic chains.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from streamer.calib.calibrator import Calibrator
from streamer.calib.data import prepare
from streamer.calib.evaluate import surface_evaluator
from streamer.calib.learned import slice_smiles, slice_smiles_loop
from streamer.calib.lm import solve
from streamer.calib.lm_steps import secant_update
from streamer.calib.options import CalibConfig
from streamer.models import REGISTRY
from streamer.models.base import FitData, Model
from streamer.models.bates import Bates
from streamer.models.heston import TAIL_TOL, Heston, iv_and_jacobian, otm_prices
from tests.synth import make_chain

FloatArray = npt.NDArray[np.float64]
DAYS = (1, 3, 7, 30, 91, 365)
HESTON_X = np.array([0.36, 3.0, 0.25, 1.2, -0.4])
BATES_X = np.array([0.25, 2.5, 0.3, 1.0, -0.3, 0.6, -0.25, 0.2])
# the rare-crash basin of several ETH snapshot chains (kappa and mu_j at their bounds)
CRASH_X = np.array([0.25, 20.0, 0.4, 3.5, -0.14, 0.07, -1.0, 1.13])


def _data(model: Model, x: FloatArray, noise: float = 0.0, seed: int = 0) -> FitData:
    def iv_fn(k: FloatArray, T: FloatArray, j: int) -> FloatArray:
        return np.asarray(model.implied_vol(x, k, T, np.full(k.shape, j)))

    rng = np.random.default_rng(seed)
    snap = make_chain(iv_fn, days=DAYS, n_strikes=15, half_spread_iv=0.005, noise_iv=noise, rng=rng)
    return prepare(snap, CalibConfig().filters, 3).data


@pytest.mark.parametrize(("name", "x"), [("heston", HESTON_X), ("bates", BATES_X)])
def test_fit_tolerance_vols_match_reference_grade(name: str, x: FloatArray) -> None:
    """The fit's one-pass vols and Jacobian (``fit_tol``) against the reference-grade pricer:
    vols to 1e-6 (a thousandth of the narrowest half-spread) at quotes worth more than 1e-6,
    the Jacobian to 1e-4 of its scale."""
    cls = Heston if name == "heston" else Bates
    model, ref_model = cls(), cls(fit_tol=TAIL_TOL)
    data = _data(model, x)
    iv, jac = model.fit_iv_and_jacobian(x, data.k, data.T)
    ref_iv, ref_jac = ref_model.fit_iv_and_jacobian(x, data.k, data.T)
    worth = model.otm_price(x, data.k, data.T) > 1e-6
    assert np.count_nonzero(worth) > 0.9 * worth.size
    np.testing.assert_allclose(iv[worth], ref_iv[worth], rtol=0.0, atol=1e-6)
    scale = np.max(np.abs(ref_jac[worth]), axis=0)
    assert np.all(np.abs(jac[worth] - ref_jac[worth]) <= 1e-4 * scale)
    # the reference-grade path is what every other price and vol uses
    np.testing.assert_array_equal(
        ref_model.implied_vol(x, data.k, data.T, data.slice_idx),
        model.implied_vol(x, data.k, data.T, data.slice_idx),
    )


def test_fit_tolerance_is_checked() -> None:
    with pytest.raises(ValueError, match="fit_tol"):
        Heston(fit_tol=0.1)


def test_vectorised_smiles_match_the_slice_loop() -> None:
    rng = np.random.default_rng(5)
    for trial in range(40):
        S = int(rng.integers(1, 9))
        slice_T = np.sort(rng.uniform(1.0, 400.0, S)) / 365.0
        ks, ivs, idx = [], [], []
        for j in range(S):
            n = int(rng.integers(1, 25)) if trial % 4 else int(rng.integers(1, 4))
            k = rng.normal(0.0, 0.1 + slice_T[j], n)
            iv = 0.5 + 0.3 * k + 0.5 * k * k + rng.normal(0.0, 0.01, n)
            if trial % 5 == 0:
                iv[rng.uniform(size=n) < 0.3] = np.nan
            ks.append(k)
            ivs.append(iv)
            idx.append(np.full(n, j))
        k_all, iv_all, idx_all = np.concatenate(ks), np.concatenate(ivs), np.concatenate(idx)
        order = rng.permutation(k_all.shape[0])  # any order of the points
        args = (k_all[order], iv_all[order], idx_all[order], slice_T)
        fast, ref = slice_smiles(*args), slice_smiles_loop(*args)
        np.testing.assert_array_equal(np.isnan(fast), np.isnan(ref))
        np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-10, equal_nan=True)


def test_secant_update_satisfies_the_secant_condition() -> None:
    rng = np.random.default_rng(2)
    p = 5
    J = rng.normal(size=(2, 8, p))
    A_new = np.einsum("bni,bnj->bij", J, J)
    S = rng.normal(size=(2, p, p))
    S = 0.5 * (S + S.transpose(0, 2, 1))
    s = rng.normal(size=(2, p))
    y = np.einsum("bij,bj->bi", A_new + np.eye(p), s)  # y's > 0
    for b in range(2):
        out = secant_update(S[b], s[b], y[b], A_new[b])
        np.testing.assert_allclose((A_new[b] + out) @ s[b], y[b], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(out, out.T, atol=1e-12)
        # a step along which the gradient does not grow leaves S as it was
        same = secant_update(S[b], s[b], -y[b], A_new[b])
        np.testing.assert_array_equal(same, S[b])


def test_secant_lm_reaches_the_gauss_newton_optimum_of_a_misspecified_fit() -> None:
    """Heston fitted to a Bates surface (a large-residual problem, where Gauss-Newton
    converges linearly): the augmented LM ends at least as low, in no more evaluations."""
    bates, heston = REGISTRY["bates"](), REGISTRY["heston"]()
    data = _data(bates, np.array([0.2, 2.0, 0.3, 1.0, -0.3, 2.0, -0.15, 0.15]))
    lo, hi = heston.bounds(data.n_slices)
    cfg = CalibConfig()
    problem = cfg.problem(
        surface_evaluator(heston, data), data, np.zeros(1, dtype=np.int64), lo[None], hi[None]
    )
    x0 = heston.initial_guesses(data)[0][None, :]
    gn = solve(problem, x0, max_iter=200)
    sec = solve(problem, x0, max_iter=200, secant=True)
    assert bool(gn.converged[0]) and bool(sec.converged[0])
    assert float(gn.data_cost[0]) > 1.0  # misspecified: a real residual is left
    assert float(sec.data_cost[0]) <= float(gn.data_cost[0]) * (1.0 + 1e-4)
    assert sec.nfev <= gn.nfev


@pytest.mark.parametrize(
    ("name", "x"), [("heston", HESTON_X), ("bates", BATES_X), ("bates", CRASH_X)]
)
def test_learned_cold_path_recovers_known_parameters(name: str, x: FloatArray) -> None:
    """The learned path (network guess, its rivals raced, LM) on a chain of known
    parameters: the data cost of the truth or lower, without the global search."""
    model = REGISTRY[name]()

    def iv_fn(k: FloatArray, T: FloatArray, j: int) -> FloatArray:
        return np.asarray(model.implied_vol(x, k, T, np.full(k.shape, j)))

    snap = make_chain(iv_fn, days=DAYS, n_strikes=15, half_spread_iv=0.005)
    r = Calibrator(model, CalibConfig(cold_start="learned")).fit(snap)
    assert r.success
    assert r.nfev < 150  # no global search (its first generation alone prices 6 x p members)
    data = prepare(snap, CalibConfig().filters, 3).data
    lo, hi = model.bounds(data.n_slices)
    problem = CalibConfig().problem(
        surface_evaluator(model, data), data, np.zeros(1, dtype=np.int64), lo[None], hi[None]
    )
    truth = float(solve(problem, x[None, :], max_iter=0).data_cost[0])
    fitted = float(solve(problem, r.x[0][None, :], max_iter=0).data_cost[0])
    assert fitted <= truth + 1e-6


@pytest.mark.parametrize(
    "x",
    [HESTON_X, BATES_X, np.array([0.2, 20.0, 0.4, 3.3, -0.16, 0.06, -1.0, 1.14])],
)
def test_kept_coefficients_price_as_the_direct_sweep(x: FloatArray) -> None:
    """``otm_price`` and ``implied_vol`` from the kept coefficients (``cos_bank``) against
    ``otm_prices`` computing them afresh, also for a different point set of the same
    maturities (served from the cache) and with zero, NaN and infinite inputs."""
    model: Heston | Bates = Heston() if x.shape[0] == 5 else Bates()
    p = model._params(x)
    days = np.array([1.0, 2.0, 7.0, 30.0, 91.0, 365.0]) / 365.0
    T = np.repeat(days, 21)
    k = np.tile(np.linspace(-1.5, 1.0, 21), days.shape[0])
    T[3], T[5], k[7] = 0.0, np.nan, np.inf
    for kk, tt in ((k, T), (k[::-1].copy(), T[::-1].copy()), (np.zeros(6), days)):
        ref, _ = otm_prices(p, x.shape[0], kk, tt, False)
        ours = model.otm_price(x, kk, tt)
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
        np.testing.assert_allclose(ours, ref, rtol=1e-13, atol=1e-18, equal_nan=True)
        ref_iv, _ = iv_and_jacobian(p, x.shape[0], kk, tt, False)
        iv = model.implied_vol(x, kk, tt, np.zeros(kk.shape, dtype=np.int64))
        np.testing.assert_allclose(iv, ref_iv, rtol=1e-12, atol=0.0, equal_nan=True)
    assert len(model._banks) == 1  # one set of maturities: one bank, reused
    moved = x.copy()
    moved[0] *= 1.1
    assert not np.allclose(model.otm_price(moved, k, T), model.otm_price(x, k, T), equal_nan=True)


def test_bates_rivals_are_the_documented_regimes() -> None:
    """The learned path's rivals of a guess: many small jumps (``lam`` 5, the jump variance
    ``lam (mu^2 + sigma^2)`` taken out of ``v0`` and ``theta``, at most half of each), and
    rare crashes from their basin's diffusion (``kappa`` 20, ``xi`` 3.5, ``rho`` -0.15) with
    the guess's ``v0`` and ``theta``."""
    guess = np.array([0.3, 2.0, 0.5, 1.0, -0.4, 1.0, -0.2, 0.3])
    crash, small = Bates().learned_rivals(guess)  # the crash raced first
    np.testing.assert_allclose(small, [0.3 - 0.05, 2.0, 0.5 - 0.05, 1.0, -0.4, 5.0, 0.0, 0.1])
    np.testing.assert_allclose(crash, [0.3, 20.0, 0.5, 3.5, -0.15, 0.07, -1.0, 1.1])
    low = Bates().learned_rivals(np.array([0.04, 2.0, 0.06, 1.0, -0.4, 1.0, -0.2, 0.3]))[1]
    np.testing.assert_allclose(low[[0, 2]], [0.02, 0.03])  # halved, not below


def test_a_crawling_cold_fit_carries_on_in_log_coordinates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Heston's small-kappa valley: a simulated chain (``bench calib --success``'s fifth,
    kappa 0.10, theta 0.81) on which the LM crawls along ``kappa (theta - v0)`` and stalls
    0.07-0.16 % above the optimum; the log-coordinate polish reaches scipy's optimum (its
    trust-region LSQ, from the truth and from near the optimum) to 1e-4."""
    from scipy.optimize import least_squares

    from streamer.calib import surface
    from streamer.tools.bench.calib import SIM_DAYS, simulated_chain
    from streamer.tools.train.data import parameters

    model = REGISTRY["heston"]()
    rng = np.random.default_rng(1)
    for _ in range(5):
        truth = parameters(model, np.array(SIM_DAYS) / 365.0, rng)
        snap = simulated_chain(model, truth, rng)
    assert truth[1] < 0.2  # the small-kappa case
    cfg = CalibConfig.for_model(model)
    data = prepare(snap, cfg.filters, 3).data
    evaluate = surface_evaluator(model, data)
    lo, hi = model.bounds(1)

    def resid(x: FloatArray) -> FloatArray:
        iv, _ = evaluate(x[None, :])
        r = data.weight * (iv - data.iv)
        return np.asarray(np.where(np.isfinite(r), r, 1e3))

    def jac(x: FloatArray) -> FloatArray:
        _, j = evaluate(x[None, :])
        return np.asarray(np.where(np.isfinite(j), j, 0.0) * data.weight[:, None])

    assert cfg.objective == "mid"
    ref = min(
        float(
            least_squares(
                resid, x0, jac=jac, bounds=(lo, hi), loss=cfg.loss, f_scale=cfg.f_scale,
                x_scale="jac", xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=3000,
            ).cost
        )
        for x0 in (truth, np.array([0.0112, 0.06, 1.5, 3.45, -0.816]))
    )  # fmt: skip

    def cost(x: FloatArray) -> float:
        r = resid(x) / cfg.f_scale
        return float(0.5 * cfg.f_scale**2 * np.sum(2.0 * (np.sqrt(1.0 + r * r) - 1.0)))

    assert cfg.loss == "soft_l1"
    fit = Calibrator(model, cfg).fit(snap)
    assert cost(fit.x[0]) <= ref * (1.0 + 1e-4)
    monkeypatch.setattr(surface, "CRAWL_NFEV", 10**9)  # no polish: the stall
    stalled = Calibrator(model, cfg).fit(snap)
    assert cost(stalled.x[0]) > ref * (1.0 + 5e-4)


class _OnePhaseBates(Bates):
    """Bates racing its cold starts on the fit's own prices (the race before ``coarse_race``)."""

    coarse_race = False


class _CountingBates(Bates):
    coarse_calls = 0

    def coarse_iv_and_jacobian(self, x: FloatArray, k: FloatArray, T: FloatArray) -> object:  # type: ignore[override]
        type(self).coarse_calls += 1
        return super().coarse_iv_and_jacobian(x, k, T)


@pytest.mark.parametrize("x", [BATES_X, CRASH_X])
def test_the_coarse_race_ends_where_the_one_phase_race_does(x: FloatArray) -> None:
    """Bates' cold race on coarse prices, its winner polished on the fit's prices, against
    the same race run on the fit's prices throughout: the data cost within 0.1 %, on a chain
    of each jump regime (noisy quotes, so that the optimum is not the truth); the coarse
    pricer does the race's work."""
    truth = Bates()

    def iv_fn(k: FloatArray, T: FloatArray, j: int) -> FloatArray:
        return np.asarray(truth.implied_vol(x, k, T, np.full(k.shape, j)))

    rng = np.random.default_rng(7)
    snap = make_chain(iv_fn, days=DAYS, n_strikes=15, half_spread_iv=0.005, noise_iv=0.004, rng=rng)
    cfg = CalibConfig(cold_start="learned")
    _CountingBates.coarse_calls = 0
    coarse = Calibrator(_CountingBates(), cfg).fit(snap)
    one_phase = Calibrator(_OnePhaseBates(), cfg).fit(snap)
    assert coarse.success and one_phase.success
    assert _CountingBates.coarse_calls >= 5
    data = prepare(snap, CalibConfig().filters, 3).data
    lo, hi = truth.bounds(data.n_slices)
    problem = CalibConfig().problem(
        surface_evaluator(truth, data), data, np.zeros(1, dtype=np.int64), lo[None], hi[None]
    )

    def cost(r: object) -> float:
        return float(solve(problem, r.x[0][None, :], max_iter=0).data_cost[0])  # type: ignore[attr-defined]

    assert cost(coarse) <= 1.001 * cost(one_phase)
