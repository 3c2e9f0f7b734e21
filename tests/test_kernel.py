"""The compiled per-expiry calibration path: row kernels, the compiled block LM against the
numpy one, and the vectorised gate checks against their slice-by-slice versions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from streamer.calib import kernel
from streamer.calib.calibrator import CalibConfig, Calibrator
from streamer.calib.constraints import pair_ranges
from streamer.calib.data import FilterConfig
from streamer.calib.gate import calendar_gaps
from streamer.models import REGISTRY, Model
from streamer.models.base import KERNEL_NONE, FitData
from streamer.models.essvi import ESSVI
from streamer.models.sabr import SABR
from streamer.models.svi import SVI
from streamer.tools.bench.calib import requote
from streamer.tools.chains import load_chains
from tests.conftest import SHARED_DATA
from tests.synth import make_chain, svi_surface

REAL = "snapshots/deribit_options_snapshot_20260105T041127Z.csv"


def _random_params(model: Model, rng: np.random.Generator, n: int) -> np.ndarray:
    if isinstance(model, SVI):  # keep w > 0 (a = level above the vertex's reach)
        X = np.column_stack(
            [
                rng.uniform(0.0, 0.05, n),
                rng.uniform(0.01, 0.5, n),
                rng.uniform(-0.9, 0.9, n),
                rng.uniform(-0.2, 0.2, n),
                rng.uniform(0.02, 0.5, n),
            ]
        )
        return X
    if isinstance(model, SABR):
        return np.column_stack(
            [rng.uniform(0.2, 1.5, n), rng.uniform(-0.9, 0.9, n), rng.uniform(0.05, 6.0, n)]
        )
    return np.column_stack(
        [rng.uniform(1e-3, 0.6, n), rng.uniform(-0.9, 0.9, n), rng.uniform(0.0, 1.0, n)]
    )


MODELS = [SVI(), SABR(1.0), SABR(0.5), SABR(0.0), ESSVI()]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: f"{m.name}-{m.kernel_arg:g}")
def test_row_kernels_match_the_numpy_models_and_their_differences(model: Model) -> None:
    """Each compiled row gives the numpy model's IV (to rounding) and a gradient equal to
    central differences of the numpy IVs."""
    rng = np.random.default_rng(7)
    X = _random_params(model, rng, 40)
    n = 25
    k = np.concatenate([rng.uniform(-1.5, 1.5, n - 3), [0.0, 0.01, -0.01]])
    T = rng.uniform(0.003, 1.5, n)
    lo, hi = model.bounds(1)
    p = X.shape[1]
    jac = np.empty(p)
    for x in X:
        rows = np.tile(x, (n, 1))
        ref = model.iv_rows(rows, k, T)  # type: ignore[attr-defined]
        got = kernel.rows_iv(
            model.kernel_kind, model.kernel_arg, x[None, :], np.zeros(n, np.int64), k, T
        )
        np.testing.assert_allclose(got, ref, rtol=1e-12)
        for i in range(n):
            v = kernel.row(model.kernel_kind, model.kernel_arg, x, k[i], T[i], jac)
            assert v == pytest.approx(ref[i], rel=1e-12)
            for q in range(p):
                h = 1e-4 * max(abs(x[q]), 0.1)  # large enough to beat rounding in x(z)
                up, dn = x.copy(), x.copy()
                up[q], dn[q] = min(x[q] + h, hi[q]), max(x[q] - h, lo[q])
                fd = (
                    (
                        model.iv_rows(up[None, :], k[i : i + 1], T[i : i + 1])[0]  # type: ignore[attr-defined]
                        - model.iv_rows(dn[None, :], k[i : i + 1], T[i : i + 1])[0]  # type: ignore[attr-defined]
                    )
                    / (up[q] - dn[q])
                )
                assert jac[q] == pytest.approx(fd, rel=1e-5, abs=1e-6), (x, k[i], q)


def test_sabr_series_branch_is_continuous() -> None:
    """Near ``z = 0`` SABR's ratio ``z/x(z)`` switches to its series: on both sides of the
    switch the IV equals a cancellation-free evaluation (``log1p``), and the gradient does
    not jump."""
    alpha, rho, nu, T = 0.7, -0.4, 3.0, 0.3
    x = np.array([alpha, rho, nu])
    jac_a, jac_b = np.empty(3), np.empty(3)
    for zz in (0.99e-5, 1.01e-5):
        k = -zz * alpha / nu  # beta = 1: z = -nu k / alpha
        d = np.sqrt(1.0 - 2.0 * rho * zz + zz * zz)
        xz = np.log1p((zz * zz - 2.0 * rho * zz) / (d + 1.0) / (1.0 - rho) + zz / (1.0 - rho))
        corr = 1.0 + (0.25 * rho * nu * alpha + (2.0 - 3.0 * rho * rho) / 24.0 * nu * nu) * T
        ref = alpha * zz / xz * corr
        got = kernel.row(1, 1.0, x, k, T, jac_a if zz < 1e-5 else jac_b)
        assert got == pytest.approx(ref, rel=1e-13)
    np.testing.assert_allclose(jac_a, jac_b, rtol=1e-6, atol=1e-8)


def _numpy_twin(model: Model) -> Model:
    twin = type(model).from_params({"beta": model.kernel_arg})
    twin.kernel_kind = KERNEL_NONE  # type: ignore[misc]
    return twin


def _chains() -> list:  # type: ignore[type-arg]
    _, fn = svi_surface(0.6, -0.3)
    out = [make_chain(fn, noise_iv=0.004, rng=np.random.default_rng(3))]
    path = SHARED_DATA / REAL
    if path.exists():  # the real chain too, where ../shared is present
        out.append(load_chains(path, "BTC")[0])
    return out


@pytest.mark.parametrize("name", ["svi", "sabr", "essvi"])
@pytest.mark.parametrize(
    "config",
    [CalibConfig(), CalibConfig(objective="band", loss="huber")],
    ids=["mid-soft_l1", "band-huber"],
)
def test_compiled_and_numpy_lm_find_the_same_fits(name: str, config: CalibConfig) -> None:
    """The compiled block LM and the numpy ``lm.solve`` (same objective, hinge rows and
    penalty) land on the same fits: cold, then warm on a re-quote."""
    for snap in _chains():
        fast = Calibrator(REGISTRY[name](), config)
        slow = Calibrator(_numpy_twin(REGISTRY[name]()), config)
        rng = np.random.default_rng(11)
        for s in (snap, requote(snap, rng, 0.05), requote(snap, rng, 0.05)):
            a, b = fast.fit(s), slow.fit(s)
            assert a.success and b.success
            assert a.expiries == b.expiries
            assert a.warm == b.warm
            # within a tenth of each quote's half-spread (in IV): the numpy path differences
            # SABR's and eSSVI's Jacobians, and the band objective is flat inside the band,
            # so the two stop at slightly different points
            assert a.prepared is not None
            gap = np.abs(a.fitted_iv - b.fitted_iv) * a.prepared.data.weight
            assert gap.max() <= 0.1
            assert abs(a.in_band - b.in_band) <= 1.0 / a.n_quotes + 1e-12  # one quote


def test_inactive_slices_keep_their_start() -> None:
    _, fn = svi_surface(0.6, -0.3)
    snap = make_chain(fn, noise_iv=0.004)
    cal = Calibrator(SVI())
    first = cal.fit(snap)
    assert first.prepared is not None
    data = first.prepared.data
    S = data.n_slices
    starts = np.searchsorted(data.slice_idx, np.arange(S)).astype(np.int64)
    lo, hi = SVI().bounds(1)
    X0 = np.array(first.x) * 1.01
    active = np.zeros(S, dtype=np.bool_)
    active[2] = True
    inner = np.tile(np.linspace(-0.5, 0.5, 9), (S, 1))
    X, iv, cost, _pen, conv, _nfev, _it = kernel.fit_slices(
        SVI.kernel_kind, 0.0, X0, active, data.k, data.T, data.iv, data.weight, np.zeros(0),
        0.2, 1, 1.0, starts, np.tile(lo, (S, 1)), np.tile(hi, (S, 1)), np.zeros((S, 5)),
        np.zeros((S, 5)), True, inner, inner, inner, data.slice_T, 30, 1e-5, 1e-9,
    )  # fmt: skip
    np.testing.assert_array_equal(X[~active], X0[~active])
    assert not np.allclose(X[2], X0[2])
    assert np.all(np.isfinite(cost)) and conv.all()
    # IVs are those of the returned parameters
    ref = SVI().iv_rows(X[data.slice_idx], data.k, data.T)
    np.testing.assert_allclose(iv, ref, rtol=1e-12)


def test_sabr_batched_arbitrage_equals_slice_by_slice() -> None:
    model = SABR(0.7)
    rng = np.random.default_rng(5)
    X = np.column_stack(
        [rng.uniform(0.2, 1.5, 60), rng.uniform(-0.99, 0.99, 60), rng.uniform(0.05, 25.0, 60)]
    )
    T = rng.uniform(0.01, 3.0, 60)
    batched = model.arbitrage_slices(X, T)
    single = [model.arbitrage(X[j], T[j : j + 1]) for j in range(60)]
    assert batched == single
    assert any(single) and not all(single)  # the sample has both kinds


@pytest.mark.parametrize("kernel_on", [True, False])
def test_calendar_gaps_equal_direct_evaluation(kernel_on: bool) -> None:
    model = SVI() if kernel_on else _numpy_twin(SVI())
    rng = np.random.default_rng(2)
    X = _random_params(model, rng, 6)
    T = np.sort(rng.uniform(0.01, 1.0, 6))
    k_cal = np.sort(rng.uniform(-0.5, 0.5, (6, 31)), axis=1)
    gaps = calendar_gaps(model, X, T, k_cal)
    assert gaps is not None and gaps[0] == -np.inf
    z = np.zeros(31, dtype=np.int64)
    for j in range(1, 6):
        w0 = model.implied_vol(X[j - 1], k_cal[j], np.full(31, T[j - 1]), z) ** 2 * T[j - 1]
        w1 = model.implied_vol(X[j], k_cal[j], np.full(31, T[j]), z) ** 2 * T[j]
        assert gaps[j] == pytest.approx(np.max(w0 - w1), rel=1e-10, abs=1e-15)


def test_pair_ranges_intersect_neighbouring_slices() -> None:
    k = np.array([-0.3, -0.1, 0.2, -0.5, 0.0, 0.1, 0.4, 0.5, 0.6])
    idx = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    n = len(k)
    one = np.ones(n)
    data = FitData(
        k, one, idx, one, one, one, one, np.ones(n, bool), np.array([0.1, 0.2, 0.3]), np.ones(3)
    )
    lo, hi = pair_ranges(data, margin=0.02)
    assert lo[1] == pytest.approx(-0.32) and hi[1] == pytest.approx(0.12)
    # slices 1 and 2 do not overlap: the check runs at the money
    assert lo[2] == pytest.approx(-0.02) and hi[2] == pytest.approx(0.02)


def test_gate_catches_a_calendar_crossing_without_hinges() -> None:
    """A longer expiry quoted below the shorter one: the gate finds the crossing, and the
    published surface is calendar-free where both slices quote (with or without hinge rows
    in the fit)."""
    _, base_fn = svi_surface(0.6, -0.3)

    def fn(k: np.ndarray, T: np.ndarray, j: int) -> np.ndarray:
        iv = base_fn(k, T, j)
        return iv * (0.6 if j == 3 else 1.0)  # the 30-day slice sinks below the 14-day one

    snap = make_chain(fn, half_spread_iv=0.003)
    filters = FilterConfig(min_abs_delta=0.0, max_abs_delta=1.0)
    for in_fit in (False, True):
        r = Calibrator(SVI(), CalibConfig(filters=filters, constraints_in_fit=in_fit)).fit(snap)
        assert r.success and r.prepared is not None
        if not in_fit:  # (with hinge rows this strong an inversion may still reach the gate)
            assert any(v.check == "calendar" for v in r.violations)
        data = r.prepared.data
        lo, hi = pair_ranges(data)
        xs = dict(zip(r.expiries, r.x, strict=True))
        for j in range(1, data.n_slices):
            e0, e1 = data.slice_expiry[j - 1], data.slice_expiry[j]
            if e0 not in xs or e1 not in xs:
                continue
            kk = np.linspace(lo[j], hi[j], 401)
            z = np.zeros(401, dtype=np.int64)
            T0, T1 = data.slice_T[j - 1], data.slice_T[j]
            w0 = SVI().implied_vol(xs[e0], kk, np.full(401, T0), z) ** 2 * T0
            w1 = SVI().implied_vol(xs[e1], kk, np.full(401, T1), z) ** 2 * T1
            assert np.max(w0 - w1) <= 1e-5, (e0, e1)


# ------------------------------------------------------------ eSSVI: calendar for every k
def _essvi_w(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    from streamer.models.essvi import psi_of, total_variance

    theta, rho, z = x
    return total_variance(theta, rho, psi_of(np.array(theta), np.array(rho), np.array(z)), k)


def _wing_slopes(x: np.ndarray) -> tuple[float, float]:
    from streamer.models.essvi import psi_of

    psi = float(psi_of(np.array(x[0]), np.array(x[1]), np.array(x[2])))
    return 0.5 * psi * (1.0 - x[1]), 0.5 * psi * (1.0 + x[1])


def test_essvi_exact_calendar_test_agrees_with_brute_force() -> None:
    """``calendar_margin >= 0`` iff the longer slice never dips below the shorter one: no
    crossing on a dense grid out to |k| = 200 when the margin says none; when it says one,
    the crossing is found (on the grid, or as a falling wing slope beyond it)."""
    from streamer.models.essvi import calendar_margin

    rng = np.random.default_rng(4)
    k = np.concatenate([np.linspace(-200.0, 200.0, 40001), np.linspace(-2.0, 2.0, 8001)])
    n_free = n_cross = 0
    for _ in range(3000):
        x1 = np.array([rng.uniform(1e-3, 0.3), rng.uniform(-0.95, 0.95), rng.uniform(0.05, 1.0)])
        x2 = np.array(
            [x1[0] * rng.uniform(0.95, 1.6), rng.uniform(-0.95, 0.95), rng.uniform(0.05, 1.0)]
        )
        margin = float(calendar_margin(x1, x2))
        dip = float(np.min(_essvi_w(x2, k) - _essvi_w(x1, k)))
        if margin >= 0.0:
            n_free += 1
            assert dip >= -1e-12 * x1[0], (x1, x2, margin, dip)
        else:
            n_cross += 1
            left1, right1 = _wing_slopes(x1)
            left2, right2 = _wing_slopes(x2)
            assert dip < 0.0 or left2 < left1 or right2 < right1, (x1, x2, margin)
    assert n_free > 300 and n_cross > 300  # both sides of the test were exercised


def test_essvi_calendar_grid_maps_t_to_k_and_repair_lands_on_the_boundary() -> None:
    from streamer.models.essvi import ESSVI, K_CAL_MAX, calendar_margin, psi_of

    model = ESSVI()
    x1 = np.array([0.02, -0.4, 0.7])
    grid = model.calendar_grid(x1, 49)
    assert np.all(np.diff(grid) > 0) and np.all(np.abs(grid) <= K_CAL_MAX)
    # interior points satisfy t = k / w(k) on a uniform t grid
    psi = float(psi_of(np.array(0.02), np.array(-0.4), np.array(0.7)))
    a = -0.4 * psi
    t_lo, t_hi = -2.0 / (psi - a), 2.0 / (psi + a)
    t = grid / _essvi_w(x1, grid)
    inside = np.abs(grid) < K_CAL_MAX
    expected = t_lo + (t_hi - t_lo) * np.arange(1, 50) / 50.0
    np.testing.assert_allclose(t[inside], expected[inside], rtol=1e-9)
    # a longer slice with a flatter left wing crosses far out; the repair fixes it minimally
    x2 = np.array([0.03, 0.3, 0.5])
    assert calendar_margin(x1, x2) < 0.0
    fixed = model.calendar_repair(x1, x2)
    assert calendar_margin(x1, fixed) >= 0.0
    assert not model.arbitrage(fixed, np.array([0.1]))
    nudged = fixed + 0.01 * (x2 - fixed)  # a step back towards the fit crosses again
    assert calendar_margin(x1, nudged) < 0.0
    ok = np.array([0.03, -0.4, 0.8])
    np.testing.assert_array_equal(model.calendar_repair(x1, ok), ok)


def test_essvi_fits_of_real_chains_never_cross() -> None:
    """Hourly Tardis cuts (ETH, 2024-05), eSSVI warm in time order: the gate meets crossings
    (beyond the quotes, too) and every published surface is crossing-free for every k
    (dense grid to |k| = 50 and the wing slopes, independent of the exact test)."""
    path = SHARED_DATA / "smiles/tardis-hourly-2024-05.csv"
    if not path.exists():
        pytest.skip(f"real Deribit data not available: {path}")
    cal = Calibrator(ESSVI())
    k = np.linspace(-50.0, 50.0, 20001)
    findings = 0
    for snap in load_chains(path, "ETH"):
        r = cal.fit(snap)
        assert r.success
        findings += sum(v.check == "calendar" for v in r.violations)
        assert r.prepared is not None and len(r.slices) == r.prepared.data.n_slices
        for x1, x2 in zip(r.x[:-1], r.x[1:], strict=True):
            assert np.min(_essvi_w(x2, k) - _essvi_w(x1, k)) >= -1e-9
            (l1, r1), (l2, r2) = _wing_slopes(x1), _wing_slopes(x2)
            assert l2 >= l1 - 1e-12 and r2 >= r1 - 1e-12
    assert findings > 0


def test_warm_up_fits_every_model_on_the_synthetic_chain() -> None:
    """The daemon's pre-READY warm-up: every registered model fits the synthetic chain (so
    every kernel it needs has been compiled or loaded), and the chain's quotes reproduce the
    smile they were priced from."""
    from streamer.calib.warmup import synthetic_snapshot, warm_up
    from streamer.pricing import implied_vol

    snap = synthetic_snapshot()
    k = np.log(snap.strike / snap.forward)
    smile = 0.6 - 0.15 * k + 0.3 * k * k
    for price, shift in ((snap.bid, -0.01), (snap.ask, 0.01)):
        usd = price * snap.forward
        iv = np.asarray(implied_vol(usd, snap.forward, snap.strike, snap.T, snap.is_call))
        np.testing.assert_allclose(iv, smile + shift, atol=1e-8)
    for name, cls in REGISTRY.items():
        r = Calibrator(cls()).fit(snap)
        assert r.success and len(r.slices) == 3, name
    assert warm_up([cls() for cls in REGISTRY.values()]) > 0.0


def test_numba_cache_is_keyed_by_source_and_falls_back_to_a_private_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel cache directory: under ``$NUMBA_CACHE_DIR``, one per hash of the kernel
    sources (a child process computes the same one); when neither it nor the home cache can
    be created, a private (0700, ours) directory in the temp dir, and none when that one is
    not private (another user could plant machine code there)."""
    import os
    import stat

    from streamer.pricing import cache

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
    keyed = cache.cache_dir()
    assert keyed is not None and keyed.parent == tmp_path / "cache" and keyed.is_dir()
    assert keyed.name == cache.source_key() and len(keyed.name) == cache.KEY_CHARS
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(keyed))  # a child handed the keyed dir keeps it
    assert cache.cache_dir() == keyed
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "xdg"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    fallback = cache.cache_dir()
    assert fallback is not None and fallback.parent.parent == tmp_path / "tmp"
    assert fallback.name == keyed.name
    assert stat.S_IMODE(fallback.parent.stat().st_mode) == 0o700
    fallback.parent.chmod(0o755)  # opened up (by someone else, say): refused
    assert cache.cache_dir() is None
    fallback.parent.chmod(0o700)
    assert cache.cache_dir() == fallback
    assert os.environ["NUMBA_CACHE_DIR"] == str(blocker / "cache")  # the environment untouched


def test_importing_streamer_and_the_client_has_no_side_effects(tmp_path: Path) -> None:
    """``import streamer`` / ``import streamer.client`` load no kernels (no numba), create no
    directory and leave the environment as it was: a bot that only subscribes pays nothing."""
    import subprocess
    import sys

    code = (
        "import os, sys; before = dict(os.environ); import streamer, streamer.client; "
        "from streamer.client import subscribe; "
        "assert 'numba' not in sys.modules, 'numba imported'; "
        "assert dict(os.environ) == before, 'environment changed'; "
        "assert not os.listdir(os.environ['XDG_CACHE_HOME']), 'a cache dir was created'"
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
        "TMPDIR": str(tmp_path),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    (tmp_path / "xdg").mkdir()
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", ["svi", "sabr", "essvi"])
def test_compiled_fits_survive_garbage_quotes(name: str) -> None:
    """Re-quotes with NaNs, zeros, crossed and absurd prices, zero and negative sizes: every
    fit returns (accepted or degraded with the last good one), nothing raises, and what is
    published stays finite."""
    from dataclasses import replace

    _, fn = svi_surface(0.6, -0.3)
    base = make_chain(fn, noise_iv=0.003)
    cal = Calibrator(REGISTRY[name]())
    assert cal.fit(base).success
    rng = np.random.default_rng(9)
    n = base.n_quotes
    for round_ in range(12):
        bid, ask = base.bid.copy(), base.ask.copy()
        hit = rng.random(n) < 0.3
        garbage = rng.choice([np.nan, 0.0, -1.0, 1e6, 1e-12, np.inf], size=n)
        bid = np.where(hit, garbage, bid)
        ask = np.where(rng.random(n) < 0.1, bid * rng.uniform(0.5, 1.5, n), ask)
        snap = replace(base, bid=bid, ask=ask, ts_ms=base.ts_ms + 1000 * (round_ + 1))
        r = cal.fit(snap)
        assert r.status in ("ok", "degraded")
        if r.success:
            assert all(np.all(np.isfinite(x)) for x in r.x)
            assert np.all(np.isfinite(r.fitted_iv)) and np.isfinite(r.rmse_iv)
