"""The gate's compiled calendar pass (``kernel.calendar_gaps``, issue 13 warm refit speed):
the per-pair largest fall of total variance equals the model's own IVs evaluated slice by
slice, for every per-expiry model with a row kernel, and a non-finite parameter row makes
its pairs' gaps NaN (so the fast path is never taken on it), as ``np.max`` did."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from streamer.calib.calibrator import CalibConfig, Calibrator
from streamer.calib.gate import calendar_gaps
from streamer.models import REGISTRY
from tests.synth import make_chain, svi_surface


@pytest.mark.parametrize("name", ["spline", "svi", "sabr"])
def test_compiled_calendar_gaps_equal_slice_by_slice(name: str) -> None:
    model = REGISTRY[name]()
    snap = make_chain(svi_surface()[1], n_strikes=15)
    fit = Calibrator(model, CalibConfig.for_model(model)).fit(snap)
    assert fit.success
    X = np.array(fit.x)
    T = np.array([s.T for s in fit.slices])
    S = len(T)
    rng = np.random.default_rng(4)
    k_cal = np.sort(rng.uniform(-0.8, 0.8, (S, 41)), axis=1)
    gaps = calendar_gaps(model, X, T, k_cal)
    assert gaps is not None and gaps.shape == (S,) and gaps[0] == -np.inf
    z = np.zeros(41, dtype=np.int64)
    for j in range(1, S):
        w0 = model.implied_vol(X[j - 1], k_cal[j], np.full(41, T[j - 1]), z) ** 2 * T[j - 1]
        w1 = model.implied_vol(X[j], k_cal[j], np.full(41, T[j]), z) ** 2 * T[j]
        assert gaps[j] == pytest.approx(float(np.max(w0 - w1)), rel=1e-12, abs=1e-15)
    bad = X.copy()
    bad[1, 0] = np.nan
    g = calendar_gaps(model, bad, T, k_cal)
    assert g is not None and np.isnan(g[1]) and np.isnan(g[2])
    assert np.array_equal(g[3:], gaps[3:])


def test_spline_fit_ignores_the_butterfly_grids(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spline's runner skips the generic butterfly grids (``hinge_grids(butterfly=
    False)``): the same fits, cold and warm, as with the grids built."""
    from streamer.calib import constraints, per_expiry

    model = REGISTRY["spline"]()
    cfg = CalibConfig.for_model(model)
    base = make_chain(svi_surface()[1], n_strikes=15, noise_iv=0.002, rng=np.random.default_rng(1))
    rng = np.random.default_rng(6)
    snaps = [base] + [
        dataclasses.replace(base, bid=base.bid * f, ask=base.ask * f)
        for f in rng.uniform(0.995, 1.005, 3)
    ]

    def fits() -> list[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
        cal = Calibrator(model, cfg)
        return [(r.fitted_iv, r.x) for r in (cal.fit(s) for s in snaps)]

    fast = fits()
    full = constraints.hinge_grids

    def with_grids(*a: object, butterfly: bool = True) -> object:
        grids = full(*a)  # type: ignore[arg-type]
        assert grids[0].shape[1] > 0 and grids[1].shape[1] > 0
        return grids

    monkeypatch.setattr(per_expiry, "hinge_grids", with_grids)
    slow = fits()
    for (iv_a, x_a), (iv_b, x_b) in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(iv_a, iv_b)
        assert len(x_a) == len(x_b) and all(
            np.array_equal(a, b) for a, b in zip(x_a, x_b, strict=True)
        )
    none = full(
        Calibrator(model, cfg).fit(base).prepared.data,  # type: ignore[union-attr]
        butterfly=False,
    )
    assert none[0].shape[1] == 0 and none[1].shape[1] == 0 and none[2].shape[1] > 0
