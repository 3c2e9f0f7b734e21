"""Surface rebuilt from a payload: views round-trip, IVs and Greeks equal direct pricing."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.client.surface import Surface
from streamer.models import REGISTRY, Model
from streamer.models.base import FitData, FloatArray, IntArray, ParamView, Violation
from streamer.pricing import black_greeks, black_price, deribit_greeks


class _FlatSmile(Model):
    """Test model: iv = a_j + b k per slice (a per slice, b surface-wide)."""

    name = "test-flat-smile"
    per_expiry = False

    def param_names(self, n_slices: int) -> tuple[str, ...]:
        return ("b", *(f"a[{j}]" for j in range(n_slices)))

    def bounds(self, n_slices: int) -> tuple[FloatArray, FloatArray]:
        return np.full(n_slices + 1, -np.inf), np.full(n_slices + 1, np.inf)

    def implied_vol(
        self, x: FloatArray, k: FloatArray, T: FloatArray, slice_idx: IntArray
    ) -> FloatArray:
        return np.asarray(x[1 + slice_idx] + x[0] * k)

    def initial_guesses(self, data: FitData) -> list[FloatArray]:
        return [np.zeros(data.n_slices + 1)]

    def arbitrage(self, x: FloatArray, slice_T: FloatArray) -> list[Violation]:
        return []

    def scale(self, n_slices: int, slice_T: FloatArray | None = None) -> FloatArray:
        return np.ones(n_slices + 1)


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the test model only while these tests run (other tests iterate REGISTRY)."""
    monkeypatch.setitem(REGISTRY, _FlatSmile.name, _FlatSmile)


PAYLOAD = {
    "schema": "streamer.surface/1",
    "venue": "deribit",
    "underlying": "BTC",
    "model": "test-flat-smile",
    "ts_ms": 1_700_000_000_000,
    "seq": 7,
    "status": "ok",
    "params": {"b": -0.1},
    "expiries": [
        {
            "expiry": "1DEC23",
            "expiry_ms": 1_701_417_600_000,
            "T": 0.045,
            "forward": 37_000.0,
            "params": {"a": 0.55},
        },
        {
            "expiry": "29MAR24",
            "expiry_ms": 1_711_699_200_000,
            "T": 0.37,
            "forward": 38_500.0,
            "params": {"a": 0.62},
        },
    ],
}


def test_view_round_trip() -> None:
    model = REGISTRY["test-flat-smile"]()
    x = np.array([-0.1, 0.55, 0.62])
    view = model.view(x, 2)
    assert view == ParamView(surface={"b": -0.1}, slices=[{"a": 0.55}, {"a": 0.62}])
    np.testing.assert_array_equal(model.from_view(view, 2), x)


def test_iv_price_greeks_match_pricing() -> None:
    s = Surface.from_payload(PAYLOAD)
    assert s.expiries == ("1DEC23", "29MAR24") and s.seq == 7
    K = np.array([30_000.0, 38_500.0, 50_000.0])
    iv = s.iv(K, "29MAR24")
    np.testing.assert_allclose(iv, 0.62 - 0.1 * np.log(K / 38_500.0), rtol=1e-15)
    assert s.atm_iv("29MAR24") == pytest.approx(0.62)
    g = s.greeks(K, "29MAR24", [False, True, True])
    ref = deribit_greeks(38_500.0, K, 0.37, iv, [False, True, True])
    raw = black_greeks(38_500.0, K, 0.37, iv, [False, True, True])
    np.testing.assert_allclose(g["price_coin"], np.asarray(ref.price_coin), rtol=1e-14)
    np.testing.assert_allclose(
        g["price_usd"],
        np.asarray(black_price(38_500.0, K, 0.37, iv, [False, True, True])),
        rtol=1e-12,
    )
    np.testing.assert_allclose(g["vega"], np.asarray(raw.vega) / 100, rtol=1e-14)
    np.testing.assert_allclose(g["vanna"], np.asarray(raw.vanna) / 100, rtol=1e-14)
    np.testing.assert_allclose(g["volga"], np.asarray(raw.volga) / 1e4, rtol=1e-14)
    assert g["delta"][0] < 0 < g["delta"][1]
    np.testing.assert_allclose(g["delta_premium_adj"], g["delta"] - g["price_coin"], rtol=1e-14)


def test_unknown_model_and_expiry() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        Surface.from_payload({**PAYLOAD, "model": "nope"})
    s = Surface.from_payload(PAYLOAD)
    with pytest.raises(ValueError, match="not in"):
        s.iv(40_000.0, "5JAN24")


# -- any maturity (Gatheral-Jacquier price interpolation) ----------------------------------


def _svi_payload(
    slices: list[tuple[str, int, float, float, dict[str, float]]],
) -> dict[str, object]:
    return {
        "schema": "streamer.surface/1",
        "venue": "deribit",
        "underlying": "BTC",
        "model": "svi",
        "ts_ms": 1_700_000_000_000,
        "seq": 1,
        "status": "ok",
        "params": {},
        "expiries": [
            {"expiry": e, "expiry_ms": ms, "T": T, "forward": F, "params": p}
            for e, ms, T, F, p in slices
        ],
    }


def _w(p: dict[str, float], k: np.ndarray) -> np.ndarray:
    """Raw SVI total variance, written out (Gatheral 2004)."""
    return p["a"] + p["b"] * (
        p["rho"] * (k - p["m"]) + np.sqrt((k - p["m"]) ** 2 + p["sigma"] ** 2)
    )


FLAT = {"a": 0.0, "b": 0.0, "rho": 0.0, "m": 0.0, "sigma": 0.1}
S1 = {"a": 0.004, "b": 0.04, "rho": -0.4, "m": 0.02, "sigma": 0.08}  # ~ 0.6 vol at 1 month
S2 = {"a": 0.02, "b": 0.09, "rho": -0.3, "m": 0.03, "sigma": 0.15}  # 3 months, steeper


def test_flat_surface_answers_one_vol_at_every_maturity() -> None:
    """A surface of one implied vol (SVI with b = 0: w = a, so iv = sqrt(a/T); two slices
    with the same iv) gives that vol at any T, inside and outside the fitted range."""
    T1, T2, vol = 0.1, 0.4, 0.55
    p1, p2 = dict(FLAT, a=vol**2 * T1), dict(FLAT, a=vol**2 * T2)
    surf = Surface.from_payload(_svi_payload([("A", 1, T1, 100.0, p1), ("B", 2, T2, 100.0, p2)]))
    K = np.array([60.0, 90.0, 100.0, 120.0, 180.0])
    for T in (0.01, T1, 0.2, 0.33, T2, 1.0):
        np.testing.assert_allclose(surf.iv_at(K, T, 100.0), vol, rtol=1e-9)


def test_interpolation_reproduces_slices_and_is_arbitrage_free() -> None:
    T1, T2 = 1 / 12, 0.25
    surf = Surface.from_payload(
        _svi_payload([("A", 1, T1, 95_000.0, S1), ("B", 2, T2, 96_000.0, S2)])
    )
    k = np.linspace(-1.2, 1.0, 221)
    F = 95_500.0
    K = F * np.exp(k)
    # at the slices: the slices' own closed form
    np.testing.assert_allclose(surf.iv_at(K, T1, F), np.sqrt(_w(S1, k) / T1), rtol=1e-10)
    np.testing.assert_allclose(surf.iv_at(K, T2, F), np.sqrt(_w(S2, k) / T2), rtol=1e-10)
    prev_w = _w(S1, k)
    for T in np.linspace(T1, T2, 9)[1:-1]:
        iv = surf.iv_at(K, T, F)
        w = iv * iv * T
        # ATM total variance linear in T between the slices (how the mixture is chosen)
        theta = _w(S1, np.zeros(1))[0] + (T - T1) / (T2 - T1) * (
            _w(S2, np.zeros(1))[0] - _w(S1, np.zeros(1))[0]
        )
        np.testing.assert_allclose(surf.iv_at(F, T, F) ** 2 * T, theta, rtol=1e-8)
        # calendar: total variance rises with T at every k
        assert np.all(w >= prev_w - 1e-12)
        prev_w = w
        # butterfly: call prices (Black, independent formula) decrease and are convex in K
        import math

        d1 = (-k + 0.5 * w) / np.sqrt(w)
        N = np.vectorize(lambda x: 0.5 * math.erfc(-x / math.sqrt(2.0)))
        C = N(d1) - np.exp(k) * N(d1 - np.sqrt(w))
        dC = np.diff(C) / np.diff(np.exp(k))
        assert np.all(dC <= 1e-12) and np.all(np.diff(dC) >= -1e-9)
    assert np.all(_w(S2, k) >= prev_w - 1e-12)


def test_outside_the_fitted_range_the_smile_is_flat_in_vol() -> None:
    T1, T2 = 1 / 12, 0.25
    surf = Surface.from_payload(
        _svi_payload([("A", 1, T1, 95_000.0, S1), ("B", 2, T2, 96_000.0, S2)])
    )
    k = np.linspace(-0.5, 0.5, 11)
    F = 95_000.0
    np.testing.assert_allclose(
        surf.iv_at(F * np.exp(k), 0.5 * T1, F), np.sqrt(_w(S1, k) / T1), rtol=1e-10
    )
    np.testing.assert_allclose(
        surf.iv_at(F * np.exp(k), 2 * T2, F), np.sqrt(_w(S2, k) / T2), rtol=1e-10
    )


def test_forward_is_log_linear_in_time() -> None:
    surf = Surface.from_payload(_svi_payload([("A", 1, 0.1, 100.0, S1), ("B", 2, 0.3, 110.0, S2)]))
    rate = np.log(1.1) / 0.2
    for T in (0.05, 0.1, 0.2, 0.3, 0.5):
        assert surf.forward_at(T) == pytest.approx(100.0 * np.exp(rate * (T - 0.1)), rel=1e-12)


def test_greeks_at_a_listed_maturity_equal_greeks_and_linear_options_have_no_coin_price() -> None:
    surf = Surface.from_payload(_svi_payload([("A", 1, 0.1, 100.0, S1), ("B", 2, 0.3, 110.0, S2)]))
    K, calls = np.array([90.0, 100.0, 115.0]), np.array([False, True, True])
    a = surf.greeks(K, "A", calls)
    b = surf.greeks_at(K, 0.1, calls, 100.0)
    for col in a:
        np.testing.assert_allclose(b[col], a[col], rtol=1e-12)
    lin = surf.greeks_at(K, 0.2, calls, inverse=False)
    assert np.isnan(lin["price_coin"]).all() and np.isnan(lin["delta_premium_adj"]).all()
    assert np.isfinite(lin["price_usd"]).all() and np.isfinite(lin["delta"]).all()


def test_price_mixture_fallback_is_arbitrage_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the linear total variance fails the butterfly check, the Gatheral-Jacquier price
    mixture is used: forced here, it still reproduces the ATM total variance line and its
    calls are decreasing and convex in strike, and rise with T."""
    import math

    import streamer.client.surface as surface_mod

    monkeypatch.setattr(surface_mod, "_butterfly_free", lambda k, w: False)
    T1, T2 = 1 / 12, 0.25
    surf = Surface.from_payload(
        _svi_payload([("A", 1, T1, 95_000.0, S1), ("B", 2, T2, 96_000.0, S2)])
    )
    k = np.linspace(-1.0, 0.8, 181)
    F = 95_500.0
    N = np.vectorize(lambda x: 0.5 * math.erfc(-x / math.sqrt(2.0)))
    prev_C = None
    for T in np.linspace(T1, T2, 7)[1:-1]:
        w = surf.iv_at(F * np.exp(k), T, F) ** 2 * T
        theta = _w(S1, np.zeros(1))[0] + (T - T1) / (T2 - T1) * (
            _w(S2, np.zeros(1))[0] - _w(S1, np.zeros(1))[0]
        )
        assert surf.iv_at(F, T, F)[0] ** 2 * T == pytest.approx(theta, rel=1e-8)
        d1 = (-k + 0.5 * w) / np.sqrt(w)
        C = N(d1) - np.exp(k) * N(d1 - np.sqrt(w))
        dC = np.diff(C) / np.diff(np.exp(k))
        assert np.all(dC <= 1e-12) and np.all(np.diff(dC) >= -1e-9)
        if prev_C is not None:
            assert np.all(prev_C - 1e-12 <= C)
        prev_C = C
