"""Tenors against Deribit's own mark IVs on the shared real chains.

For each chain (the first snapshot of each file under ../shared/data/deribit; skipped with
the reason where absent): a fitted SVI surface, as the daemon publishes it, gives ATM and
the 25-delta risk reversal at 30 days (``Surface.tenor``). Deribit's marks give the same two
numbers interpolated the same way, built here without the code under test: per listed
expiry a mark-IV smile (linear in log-moneyness between the marks of the out-of-the-money
options, flat beyond), total variance linear in T at fixed log-moneyness between the two
expiries around 30 days, and the 25-delta strikes solved by bisection on that smile.
Ours must lie within 0.5 vol points of the marks' ATM and 1 vol point of their RR25.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest

from streamer.book.snapshot import ChainSnapshot
from streamer.calib.calibrator import CalibConfig, Calibrator
from streamer.client.surface import Surface
from streamer.daemon.pipeline import Pipeline
from streamer.instruments import MS_PER_YEAR
from streamer.models.svi import SVI
from streamer.tools.chains import load_chains
from tests.conftest import SHARED_DATA, shared_file
from tests.test_tenors import delta_k

T30 = 30 / 365
ATM_TOL = 0.005  # 0.5 vol points
RR_TOL = 0.01  # 1 vol point

SNAPSHOTS = sorted(p.name for p in (SHARED_DATA / "snapshots").glob("*.csv"))
CHAINS = [(f"snapshots/{name}", "BTC") for name in SNAPSHOTS] or [
    ("snapshots/deribit_options_snapshot_20260105T041127Z.csv", "BTC")  # skips: not there
]
CHAINS += [
    (f"smiles/tardis-hourly-{m}.csv", u)
    for m in ("2024-05", "2025-01", "2025-09")
    for u in ("BTC", "ETH")
]
CHAINS += [
    ("chains/bottama-btc-2021-02-11.csv", "BTC"),
    ("chains/bottama-eth-2021-02-11.csv", "ETH"),
]


@lru_cache(maxsize=4)
def first_snapshot(path: str, underlying: str) -> ChainSnapshot:
    return load_chains(shared_file(path), underlying)[0]


def mark_smiles(snap: ChainSnapshot) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """Per listed expiry ``(T, k, mark_iv)`` of its out-of-the-money options, sorted by k."""
    out = []
    for j in range(snap.n_expiries):
        m = (snap.expiry_idx == j) & np.isfinite(snap.mark_iv) & (snap.mark_iv > 0)
        F = float(snap.forwards[j])
        K, call = snap.strike[m], snap.is_call[m]
        otm = (call & (K >= F)) | (~call & (K < F))
        k, iv = np.log(K[otm] / F), snap.mark_iv[m][otm]
        order = np.argsort(k)
        T = (int(snap.expiry_ms[j]) - snap.ts_ms) / MS_PER_YEAR
        if len(k) >= 5 and T > 0:
            out.append((T, k[order], iv[order]))
    return out


def marks_at_30_days(snap: ChainSnapshot) -> tuple[float, float] | None:
    """ATM and RR25 at 30 days from the marks (module docstring), None if not bracketed."""
    smiles = mark_smiles(snap)
    Ts = [s[0] for s in smiles]
    j = int(np.searchsorted(Ts, T30)) - 1
    if j < 0 or j + 1 >= len(smiles):
        return None
    (T1, k1, v1), (T2, k2, v2) = smiles[j], smiles[j + 1]
    u = (T30 - T1) / (T2 - T1)

    def w(k: float) -> float:  # total variance at 30 days, linear in T at fixed k
        return float((1 - u) * T1 * np.interp(k, k1, v1) ** 2 + u * T2 * np.interp(k, k2, v2) ** 2)

    def iv(k: float) -> float:
        return math.sqrt(w(k) / T30)

    return iv(0.0), iv(delta_k(w, 0.25)) - iv(delta_k(w, 0.75))


def ours_at_30_days(snap: ChainSnapshot) -> tuple[float | None, float | None, str]:
    result = Calibrator(SVI(), CalibConfig()).fit(snap)
    if not result.slices:
        return None, None, f"no SVI fit ({result.message})"
    payload = Pipeline(models=["svi"]).surface_message(snap, "svi", result, 1)
    surface = Surface.from_payload(payload)
    tenor = surface.tenor(30)
    span = f"fitted {surface.expiries[0]}..{surface.expiries[-1]}"
    return tenor.atm_iv, tenor.rr25, span


@pytest.mark.slow
@pytest.mark.parametrize(("path", "underlying"), CHAINS)
def test_30_day_atm_and_rr25_match_deribits_marks(path: str, underlying: str) -> None:
    snap = first_snapshot(path, underlying)
    atm, rr25, note = ours_at_30_days(snap)
    if atm is None or rr25 is None:
        pytest.skip(f"{path} {underlying}: 30 days outside the fitted expiries ({note})")
    marks = marks_at_30_days(snap)
    if marks is None:
        pytest.skip(f"{path} {underlying}: the marks do not bracket 30 days")
    mark_atm, mark_rr25 = marks
    assert abs(atm - mark_atm) <= ATM_TOL, (atm, mark_atm)
    assert abs(rr25 - mark_rr25) <= RR_TOL, (rr25, mark_rr25)
