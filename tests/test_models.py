"""SVI, SSVI/eSSVI and SABR: formulas, Jacobians, arbitrage checks, independent references."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.models import REGISTRY, Model, ParamView
from streamer.models.essvi import ESSVI
from streamer.models.essvi import total_variance as essvi_w
from streamer.models.sabr import SABR, butterfly_g_numeric
from streamer.models.ssvi import SSVI, SSVIRho
from streamer.models.svi import SVI, butterfly_g, total_variance

K_GRID = np.linspace(-1.5, 1.5, 61)
# Axel Vogt's raw SVI slice (Gatheral & Jacquier 2014, Example 3.1): butterfly arbitrage
VOGT = np.array([-0.0410, 0.1331, 0.3060, 0.3586, 0.4153])


def fd_jacobian(
    model: Model, x: np.ndarray, k: np.ndarray, T: np.ndarray, idx: np.ndarray
) -> np.ndarray:
    out = np.empty((len(k), len(x)))
    for i in range(len(x)):
        h = 1e-6 * max(abs(x[i]), 1e-2)
        up, dn = x.copy(), x.copy()
        up[i] += h
        dn[i] -= h
        out[:, i] = (model.implied_vol(up, k, T, idx) - model.implied_vol(dn, k, T, idx)) / (2 * h)
    return out


def test_registry_has_the_models() -> None:
    for name in ("svi", "ssvi", "ssvi-rho", "essvi", "sabr"):
        assert name in REGISTRY


def test_svi_formula_and_jacobian() -> None:
    x = np.array([0.02, 0.1, -0.4, 0.05, 0.2])
    T = np.full(K_GRID.shape, 0.25)
    idx = np.zeros(K_GRID.shape, dtype=np.int64)
    a, b, rho, m, s = x
    w = a + b * (rho * (K_GRID - m) + np.sqrt((K_GRID - m) ** 2 + s * s))
    assert np.allclose(SVI().implied_vol(x, K_GRID, T, idx), np.sqrt(w / 0.25), rtol=1e-14)
    jac = SVI().jacobian(x, K_GRID, T, idx)
    assert np.allclose(jac, fd_jacobian(SVI(), x, K_GRID, T, idx), rtol=1e-6, atol=1e-8)


def test_svi_butterfly_g_matches_finite_differences() -> None:
    x = np.array([0.02, 0.1, -0.4, 0.05, 0.2])
    k = np.linspace(-2, 2, 4001)
    g_fd = butterfly_g_numeric(k, total_variance(x, k))
    assert np.allclose(butterfly_g(x, k[1:-1]), g_fd, atol=1e-5)


def test_svi_arbitrage_catches_vogt_and_lee() -> None:
    found = SVI().arbitrage(VOGT, np.array([1.0]))
    assert [v.check for v in found] == ["butterfly"]
    lee = SVI().arbitrage(np.array([0.01, 1.5, 0.5, 0.0, 0.1]), np.array([1.0]))
    assert "lee_wing" in {v.check for v in lee}
    negative = SVI().arbitrage(np.array([-0.05, 0.1, 0.0, 0.0, 0.1]), np.array([1.0]))
    assert "negative_variance" in {v.check for v in negative}
    assert SVI().arbitrage(np.array([0.02, 0.1, -0.4, 0.05, 0.2]), np.array([1.0])) == []


def _ssvi_x(model: Model, theta: np.ndarray, head: list[float]) -> np.ndarray:
    return np.concatenate([head, np.diff(np.concatenate([[0.0], theta]))])


@pytest.mark.parametrize("cls", [SSVI, SSVIRho])
def test_ssvi_formula_jacobian_and_view(cls: type[SSVI]) -> None:
    model = cls()
    theta = np.array([0.01, 0.03, 0.08, 0.2])
    head = [-0.5, -0.2, 0.7, 0.4] if model.varying_rho else [-0.5, 0.7, 0.4]
    x = _ssvi_x(model, theta, head)
    idx = np.repeat(np.arange(4), 15)
    k = np.tile(np.linspace(-1, 1, 15), 4)
    T = ((idx + 1) * 0.1).astype(np.float64)
    # independent evaluation of GJ's formula
    view = model.view(x, 4)
    eta, g = view.surface["eta"], view.surface["gamma"]
    th = theta[idx]
    if model.varying_rho:
        r0, r1 = view.surface["rho0"], view.surface["rho1"]
        rho = r0 + (r1 - r0) * (1 - np.exp(-th / 0.1))
        assert eta == pytest.approx(2 * 0.7 / (1 + 0.5))
    else:
        rho = np.full(th.shape, view.surface["rho"])
        assert eta == pytest.approx(2 * 0.7 / 1.5)
    phi = eta / (th**g * (1 + th) ** (1 - g))
    w = th / 2 * (1 + rho * phi * k + np.sqrt((phi * k + rho) ** 2 + 1 - rho**2))
    assert np.allclose(model.implied_vol(x, k, T, idx), np.sqrt(w / T), rtol=1e-13)
    assert np.allclose(model.jacobian(x, k, T, idx), fd_jacobian(model, x, k, T, idx), atol=1e-6)
    assert [s["theta"] for s in view.slices] == pytest.approx(theta.tolist())
    assert np.allclose(model.from_view(view, 4), x)


@pytest.mark.parametrize("cls", [SSVI, SSVIRho])
def test_ssvi_parameter_region_is_butterfly_free(cls: type[SSVI]) -> None:
    """Every x inside the bounds passes a numerical butterfly check (GJ 2014, Cor. 4.1)."""
    model = cls()
    rng = np.random.default_rng(3)
    lo, hi = model.bounds(5)
    k = np.linspace(-3, 3, 3001)
    for _ in range(40):
        x = lo + (hi - lo) * rng.uniform(size=len(lo))
        x[model.n_head :] = rng.uniform(0.001, 0.1, size=5)
        found = model.arbitrage(x, np.linspace(0.1, 1, 5))
        # eSSVI's varying rho may cross slices (checked, see test below); butterfly never
        assert [v for v in found if v.check != "calendar" or not model.varying_rho] == []
        for j in range(5):
            w = model.total_variance(x, k, np.full(k.shape, j))
            assert butterfly_g_numeric(k, w).min() > -1e-6


def test_ssvi_arbitrage_catches_bad_parameters() -> None:
    model = SSVI()
    bad_eta = np.array([-0.5, 1.4, 0.4, 0.01, 0.02])  # z > 1 <=> eta (1+|rho|) > 2
    assert "ssvi_bound" in {v.check for v in model.arbitrage(bad_eta, np.array([0.1, 0.2]))}
    bad_theta = np.array([-0.5, 0.5, 0.4, 0.02, -0.01])  # theta falls with T
    assert "calendar" in {v.check for v in model.arbitrage(bad_theta, np.array([0.1, 0.2]))}
    bad_gamma = np.array([-0.5, 0.5, 0.8, 0.02, 0.01])
    assert "ssvi_bound" in {v.check for v in model.arbitrage(bad_gamma, np.array([0.1, 0.2]))}


def test_sabr_beta_one_matches_quantlib() -> None:
    """For beta = 1 Obłój's and Hagan's leading terms coincide: QuantLib is a reference."""
    ql = pytest.importorskip("QuantLib")
    model = SABR(beta=1.0)
    for alpha, rho, nu, T in [(0.6, -0.3, 1.5, 0.1), (0.8, 0.2, 3.0, 0.02), (0.5, -0.7, 0.8, 1.0)]:
        x = np.array([alpha, rho, nu])
        k = np.linspace(-0.8, 0.8, 33)
        ours = model.implied_vol(x, k, np.full(k.shape, T), np.zeros(k.shape, dtype=np.int64))
        ref = [ql.sabrVolatility(float(np.exp(kk)), 1.0, T, alpha, 1.0, nu, rho) for kk in k]
        assert np.allclose(ours, ref, rtol=1e-10)


def test_sabr_general_beta_close_to_hagan_near_the_money() -> None:
    ql = pytest.importorskip("QuantLib")
    model = SABR(beta=0.5)
    x = np.array([0.6, -0.3, 1.2])
    k = np.linspace(-0.1, 0.1, 9)
    ours = model.implied_vol(x, k, np.full(k.shape, 0.25), np.zeros(k.shape, dtype=np.int64))
    ref = np.array(
        [ql.sabrVolatility(float(np.exp(kk)), 1.0, 0.25, 0.6, 0.5, 1.2, -0.3) for kk in k]
    )
    assert np.max(np.abs(ours - ref)) < 2e-3  # the two expansions differ at higher order
    # ATM the leading terms agree exactly (both give alpha F^(beta-1) times the same bracket)
    assert ours[4] == pytest.approx(ref[4], rel=1e-12)


def test_sabr_jacobian_and_publishing() -> None:
    model = SABR(beta=0.7)
    x = np.array([0.6, -0.3, 1.2])
    k = np.linspace(-0.5, 0.5, 21)
    T = np.full(k.shape, 0.3)
    idx = np.zeros(k.shape, dtype=np.int64)
    assert np.allclose(model.jacobian(x, k, T, idx), fd_jacobian(model, x, k, T, idx), atol=1e-6)
    view = model.view(x, 1)
    assert view.surface == {"beta": 0.7}
    assert np.allclose(model.from_view(ParamView(view.surface, view.slices), 1), x)
    with pytest.raises(ValueError, match="beta"):
        SABR(beta=1.5)


def test_sabr_arbitrage_flags_a_wild_long_dated_smile() -> None:
    bad = SABR().arbitrage(np.array([0.3, -0.95, 5.0]), np.array([2.0]))
    assert bad and bad[0].check in {"butterfly", "negative_variance"}
    assert SABR().arbitrage(np.array([0.6, -0.2, 1.0]), np.array([0.1])) == []


def test_ssvi_rho_calendar_check_is_real_and_safe_bounds_remove_it() -> None:
    model = SSVIRho()
    theta = np.array([0.1654, 0.2202, 0.2808])
    x = _ssvi_x(model, theta, [0.6, -0.94, 0.86, 0.02])  # rho swings from 0.6 to -0.94
    k = np.linspace(-3, 3, 601)
    w = [model.total_variance(x, k, np.full(k.shape, j)) for j in range(3)]
    crosses = any(np.max(w[j - 1] - w[j]) > 1e-12 for j in range(1, 3))
    flagged = any(v.check == "calendar" for v in model.arbitrage(x, np.array([0.1, 0.2, 0.5])))
    assert crosses and flagged
    lo, hi = model.bounds(3)
    pinned = model.safe_bounds(x, lo, hi)
    assert pinned is not None
    y = np.clip(x, *pinned)
    assert y[0] == y[1]
    assert model.arbitrage(y, np.array([0.1, 0.2, 0.5])) == []
    assert SSVI().safe_bounds(x[1:], *SSVI().bounds(3)) is None


def test_essvi_slices_formula_butterfly_free_by_construction_and_view() -> None:
    """Per-slice eSSVI: the GJ formula with psi = theta phi; every x in the bounds passes a
    numerical butterfly check; view/from_view round-trip; Jacobian vs differences."""
    model = ESSVI()
    theta, rho, z, T = 0.02, -0.4, 0.7, 0.1
    x = np.array([theta, rho, z])
    k = np.linspace(-1, 1, 41)
    idx = np.zeros(k.shape, dtype=np.int64)
    TT = np.full(k.shape, T)
    psi = z * 0.999 * min(4 / (1 + abs(rho)), np.sqrt(4 * theta / (1 + abs(rho))))
    phi = psi / theta
    w = theta / 2 * (1 + rho * phi * k + np.sqrt((phi * k + rho) ** 2 + 1 - rho**2))
    assert np.allclose(model.implied_vol(x, k, TT, idx), np.sqrt(w / T), rtol=1e-13)
    assert np.allclose(model.jacobian(x, k, TT, idx), fd_jacobian(model, x, k, TT, idx), atol=1e-5)
    view = model.view(x, 1)
    assert view.slices[0]["psi"] == pytest.approx(psi)
    assert np.allclose(model.from_view(view, 1), x)
    rng = np.random.default_rng(4)
    lo, hi = model.bounds(1)
    kk = np.linspace(-3, 3, 3001)
    for _ in range(200):
        y = lo + (hi - lo) * rng.uniform(size=3)
        y[0] = rng.uniform(1e-4, 0.5)
        assert model.arbitrage(y, np.array([0.5])) == []
        psi_y = np.array(model.view(y, 1).slices[0]["psi"])
        wy = essvi_w(y[:1], y[1:2], psi_y, kk)
        assert butterfly_g_numeric(kk, wy).min() > -1e-6
