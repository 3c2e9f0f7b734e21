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
