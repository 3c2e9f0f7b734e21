"""The independent arbitrage check of published IVs (``streamer.tools.bench.arbcheck``):
clean surfaces give no finding, surfaces built with a known arbitrage give that one."""

from __future__ import annotations

import numpy as np

from streamer.tools.bench.arbcheck import Smile, butterfly, calendar, check, smiles_of_greeks

F = 100_000.0
K = np.linspace(40_000.0, 200_000.0, 33)


def _flat(T: float, vol: float, expiry: str = "E") -> Smile:
    return Smile(expiry, T, F, K.copy(), np.full(len(K), vol))


def _ssvi(T: float, expiry: str) -> Smile:
    """Gatheral & Jacquier (2014) SSVI, power-law phi with eta (1 + |rho|) <= 2 and
    gamma = 1/2: free of butterfly and calendar arbitrage (their Theorem 4.2, Remark 4.4)."""
    rho, eta, gamma = -0.3, 1.0, 0.5
    theta = 0.36 * T  # ATM total variance, increasing in T
    phi = eta / (theta**gamma * (1.0 + theta) ** (1.0 - gamma))
    k = np.log(K / F)
    w = 0.5 * theta * (1 + rho * phi * k + np.sqrt((phi * k + rho) ** 2 + 1 - rho * rho))
    return Smile(expiry, T, F, K.copy(), np.sqrt(w / T))


def test_clean_surfaces_have_no_findings() -> None:
    assert check([_flat(0.02, 0.6, "A"), _flat(0.1, 0.6, "B"), _flat(0.5, 0.55, "C")]) == []
    assert check([_ssvi(T, f"S{T}") for T in (0.01, 0.05, 0.25, 1.0)]) == []


def test_a_bumped_strike_is_a_butterfly() -> None:
    s = _flat(0.1, 0.6)
    s.iv[20] += 0.03  # 3 vol points above its neighbours: the butterfly there is negative
    found = butterfly(s)
    assert found and "convexity" in {f.check for f in found}
    assert float(K[20]) in {f.strike for f in found}


def test_call_prices_rising_in_strike_are_found() -> None:
    s = _flat(0.1, 0.5)
    s.iv[30] = 3.0  # the 190k call dearer than the 185k one
    found = butterfly(s)
    assert any(f.check == "monotone" and f.strike == float(K[30]) for f in found)


def test_total_variance_falling_in_maturity_is_a_calendar_finding() -> None:
    short, long = _flat(0.1, 0.8, "A"), _flat(0.2, 0.5, "B")  # w 0.064 -> 0.05
    found = calendar(short, long)
    assert len(found) == len(K) and all(f.check == "calendar" for f in found)
    assert calendar(long, _flat(0.3, 0.5, "C")) == []


def test_a_wing_only_calendar_is_found_at_its_strikes() -> None:
    """Issue 13's case: equal smiles but for the shorter expiry's deep-put wing."""
    short, long = _flat(17 / 365, 0.6, "17D"), _flat(45 / 365, 0.6, "45D")
    wing = np.log(K / F) < -1.0
    short.iv[wing] = np.sqrt(0.33 / short.T)  # total variance 0.33 where the longer has 0.044
    found = check([long, short])  # any order: sorted by T
    cal = [f for f in found if f.check == "calendar"]
    assert {f.strike for f in cal} >= set(K[wing].tolist())
    assert all(f.expiry == "45D" for f in cal)


def test_missing_ivs_are_skipped_and_greeks_payloads_read() -> None:
    rows = [
        {"instrument": "a", "strike": 90_000.0, "iv": 0.6},
        {"instrument": "b", "strike": 100_000.0, "iv": None},
        {"instrument": "c", "strike": 110_000.0, "iv": 0.6},
        {"instrument": "d", "strike": 110_000.0, "iv": 0.6},  # call and put of one strike
    ]
    smiles = smiles_of_greeks([{"expiry": "X", "T": 0.1, "forward": F, "instruments": rows}])
    assert len(smiles) == 1
    strikes, iv = smiles[0].clean()
    assert strikes.tolist() == [90_000.0, 110_000.0] and iv.tolist() == [0.6, 0.6]
    assert check(smiles) == []


def _parabola(T: float, strikes: np.ndarray, shift: float, expiry: str) -> Smile:
    """Total variance ``0.05 + 0.1 k^2 + shift`` (convex in k, butterfly-free on -1 <= k <= 0.5)."""
    k = np.log(strikes / F)
    return Smile(expiry, T, F, strikes.copy(), np.sqrt((0.05 + 0.1 * k * k + shift) / T))


def test_a_convex_wing_between_sparse_strikes_is_not_a_calendar_finding() -> None:
    """The longer expiry lies above the shorter one everywhere (by 0.0005 in total variance),
    but below the chord of the shorter one's total variance between its sparse wing strikes
    (0.006 above its curve halfway): the listed prices admit an arbitrage-free reading, so no
    finding (a linear interpolation of w in k would flag every dense strike in between)."""
    sparse = F * np.exp(np.array([-1.0, -0.5, 0.0, 0.5]))
    dense = F * np.exp(np.linspace(-1.0, 0.5, 31))
    short = _parabola(0.1, sparse, 0.0, "A")
    long = _parabola(0.2, dense, 0.0005, "B")
    k = np.log(dense / F)
    w_chord = np.interp(k, np.log(sparse / F), 0.05 + 0.1 * np.log(sparse / F) ** 2)
    assert np.any(w_chord > 0.05 + 0.1 * k * k + 0.0005 + 1e-3)  # the old reading's finding
    assert calendar(short, long) == []


def test_a_calendar_between_strikes_that_no_interpolation_avoids_is_found() -> None:
    """The longer expiry below the shorter one in total variance: long strikes strictly
    between the shorter one's strikes are found too, not only shared ones. With a chain's
    strike spacing (0.1 in k) a deficit of 0.01 is certain at every strike; with strikes 0.5
    apart, one of 0.05 is."""
    dense = F * np.exp(np.linspace(-0.95, 0.45, 29))
    for step, deficit in ((0.1, -0.01), (0.5, -0.05)):
        short_k = np.arange(-1.0, 0.5 + 1e-9, step)
        found = calendar(
            _parabola(0.1, F * np.exp(short_k), 0.0, "A"), _parabola(0.2, dense, deficit, "B")
        )
        assert {f.strike for f in found} >= set(dense.tolist())
        assert all(f.check == "calendar" and f.expiry == "B" for f in found)
