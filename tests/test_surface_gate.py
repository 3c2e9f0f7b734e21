"""The surface gate's calendar check: each pair of slices on its own common range."""

from __future__ import annotations

import numpy as np

from streamer.calib.calibrator import CalibConfig, Calibrator
from streamer.calib.gate import surface_calendar
from streamer.models.base import FitData, FloatArray, Violation
from streamer.models.bates import Bates
from streamer.tools.chains import load_chains
from tests.conftest import shared_file
from tests.test_surface import _FlatSmile

# iv_j(k) = a_j + B k: the two dailies' total variances cross at k = 0.39 (closed form below)
B = -0.3
A = (0.8, 0.6, 0.7)
T = (0.01, 0.02, 0.5)
X = np.array([B, *A])


def _data(ranges: list[tuple[float, float]]) -> FitData:
    k = np.concatenate([np.linspace(lo, hi, 7) for lo, hi in ranges])
    idx = np.repeat(np.arange(len(ranges), dtype=np.int64), 7)
    slice_T = np.array(T[: len(ranges)])
    iv = np.full(k.shape, 0.6)
    return FitData(
        k=k,
        T=slice_T[idx],
        slice_idx=idx,
        iv=iv,
        iv_bid=iv - 0.01,
        iv_ask=iv + 0.01,
        weight=np.ones(k.shape),
        is_call=k >= 0.0,
        slice_T=slice_T,
        slice_forward=np.ones(len(ranges)),
    )


def _fall(j: int, lo: float, hi: float) -> float:
    """The largest fall of total variance from slice ``j-1`` to ``j`` over ``[lo, hi]``,
    from the closed form, densely sampled."""
    k = np.linspace(lo, hi, 20001)
    w = [(A[i] + B * k) ** 2 * T[i] for i in (j - 1, j)]
    return float(np.max(w[0] - w[1]))


def _check(data: FitData, listed: FloatArray | None = None) -> list[Violation]:
    found: list[Violation] = []
    surface_calendar(_FlatSmile(), CalibConfig(), X, data, found, listed)
    return found


def test_a_fall_beyond_both_slices_strikes_is_not_a_violation() -> None:
    # the long slice is quoted out to k = 1.5, the dailies only within +-0.3: their total
    # variances cross at 0.39, where neither lists a strike
    assert _fall(1, -0.32, 0.32) < 0.0 < _fall(1, 0.32, 1.6)
    assert _check(_data([(-0.3, 0.3), (-0.3, 0.3), (-1.0, 1.5)])) == []


def test_a_fall_inside_the_pairs_common_range_is_found() -> None:
    found = _check(_data([(-0.3, 0.6), (-0.3, 0.7), (-1.0, 1.5)]))
    assert [v.slice for v in found] == [1]
    # the pair's range: the common quoted one (-0.3 .. 0.6) and pair_ranges' 0.02 margin
    assert abs(found[0].amount - _fall(1, -0.32, 0.62)) < 1e-6 * _fall(1, -0.32, 0.62)


def test_listed_strikes_widen_the_checked_range() -> None:
    data = _data([(-0.3, 0.3), (-0.3, 0.3), (-1.0, 1.5)])
    listed = np.array([[-0.5, 0.8], [-0.5, 0.9], [-1.2, 1.6]])
    found = _check(data, listed)
    assert [v.slice for v in found] == [1]
    assert abs(found[0].amount - _fall(1, -0.52, 0.82)) < 1e-6 * _fall(1, -0.52, 0.82)


def test_bates_fit_of_a_real_eth_chain_is_not_refused_for_far_wing_digits() -> None:
    """A shared ETH chain whose Bates fit the old whole-chain grid refused: a fall between
    two dailies at k = 1.64, a call worth ~1e-14 of the forward, far beyond their strikes."""
    path = shared_file("snapshots/deribit_options_snapshot_20260105T153329Z.csv")
    snap = load_chains(path, "ETH")[0]
    model = Bates()
    r = Calibrator(model, CalibConfig.for_model(model)).fit(snap)
    assert r.success, r
    assert not any(v.check == "calendar" for v in r.violations)
