"""Constant-maturity tenors and the 30-day vol index (``streamer.client.tenors``).

Checked against what does not come from the code under test: closed forms (a flat surface:
ATM = the vol, RR = BF = 0, the vol index = the vol; SVI: ATM total variance at ``k = 0``),
delta strikes solved here by plain bisection on the SVI formula written out, and the
variance-swap integral against ``scipy.integrate.quad`` of Black prices written with
``scipy.stats.norm``. Then the payload and its schema, the pipeline's message (right after
its surface, with its seq and status, re-stamped stale), the topic over a real mosquitto,
and the ``streamer subscribe`` view.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from typing import Any

import aiomqtt
import jsonschema
import numpy as np
import numpy.typing as npt
import orjson
import pytest
from scipy.integrate import quad
from scipy.stats import norm

from streamer.client.render import render
from streamer.client.surface import Surface
from streamer.client.tenors import (
    DEFAULT_TENORS_DAYS,
    delta_log_moneyness,
    smile_tenor,
    variance_swap_variance,
    vol_index,
)
from streamer.config import TriggerConfig, config_from_table
from streamer.daemon.pipeline import Message, Pipeline
from streamer.errors import ConfigError, InputError
from streamer.events import FeedStatus
from streamer.publish.base import decode
from streamer.publish.mqtt import MqttPublisher
from streamer.publish.payloads import load_schema, tenors_payload, topic_tenors
from streamer.publish.urls import from_url
from tests.conftest import UNIT
from tests.mosquitto import Mosquitto
from tests.synth import deribit_chain, make_chain, svi_surface, ticker_frame

FloatArray = npt.NDArray[np.float64]


# -- independent references -------------------------------------------------------------


def svi_w(p: dict[str, float], k: Any) -> Any:
    """Raw SVI total variance, written out (Gatheral 2004)."""
    d = np.asarray(k, dtype=float) - p["m"]
    return p["a"] + p["b"] * (p["rho"] * d + np.sqrt(d * d + p["sigma"] ** 2))


def bisect(f: Callable[[float], float], lo: float, hi: float) -> float:
    """Plain bisection of a sign change of ``f`` on [lo, hi], to the last bit."""
    flo = f(lo)
    assert flo * f(hi) < 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        fm = f(mid)
        if fm * flo > 0.0:
            lo, flo = mid, fm
        else:
            hi = mid
    return 0.5 * (lo + hi)


def delta_k(w: Callable[[float], float], call_delta: float) -> float:
    """k where N(d1) of total variance ``w(k)`` equals ``call_delta``, by bisection."""

    def f(k: float) -> float:
        sw = math.sqrt(w(k))
        return float(norm.cdf(-k / sw + 0.5 * sw)) - call_delta

    return bisect(f, -6.0, 6.0)


def rr_bf(w: Callable[[float], float], T: float, delta: float) -> tuple[float, float]:
    """Risk reversal and butterfly of total variance ``w`` at ``T`` (independent)."""

    def iv(k: float) -> float:
        return math.sqrt(w(k) / T)

    call, put = iv(delta_k(w, delta)), iv(delta_k(w, 1.0 - delta))
    return call - put, 0.5 * (call + put) - iv(0.0)


def quad_variance_swap(w: Callable[[float], float]) -> float:
    """2 * int OTM(K)/K^2 dK (F = 1, undiscounted) by adaptive quadrature, Black written out
    with scipy.stats.norm (log-cdf where a factor e^-k would overflow)."""

    def otm_over_k(k: float) -> float:
        sw = math.sqrt(w(k))
        d1 = -k / sw + 0.5 * sw
        d2 = d1 - sw
        if k >= 0.0:  # call / K
            return math.exp(float(norm.logcdf(d1)) - k) - float(norm.cdf(d2))
        return float(norm.cdf(-d2)) - math.exp(float(norm.logcdf(-d1)) - k)  # put / K

    opts = {"limit": 500, "epsabs": 1e-15, "epsrel": 1e-12}
    puts = quad(otm_over_k, -40.0, 0.0, **opts)[0]
    calls = quad(otm_over_k, 0.0, 40.0, **opts)[0]
    return 2.0 * float(puts + calls)


def payload(slices: list[tuple[float, float, dict[str, float]]]) -> dict[str, Any]:
    """A streamer.surface/1 payload of raw SVI slices ``(T, forward, params)``."""
    return {
        "schema": "streamer.surface/1",
        "venue": "deribit",
        "underlying": "BTC",
        "model": "svi",
        "ts_ms": 1_700_000_000_000,
        "seq": 5,
        "status": "ok",
        "params": {},
        "expiries": [
            {"expiry": f"{j + 1}JAN30", "expiry_ms": j + 1, "T": T, "forward": F, "params": p}
            for j, (T, F, p) in enumerate(slices)
        ],
    }


FLAT = {"a": 0.0, "b": 0.0, "rho": 0.0, "m": 0.0, "sigma": 0.1}
S7 = {"a": 0.0012, "b": 0.018, "rho": -0.35, "m": 0.005, "sigma": 0.04}  # 7 days
S20 = {"a": 0.004, "b": 0.04, "rho": -0.4, "m": 0.02, "sigma": 0.08}  # 20 days
S45 = {"a": 0.02, "b": 0.09, "rho": -0.3, "m": 0.03, "sigma": 0.15}  # 45 days, steeper
S400 = {"a": 0.12, "b": 0.25, "rho": -0.2, "m": 0.05, "sigma": 0.4}  # 400 days
SVI_SLICES = [(7 / 365, 37_000.0, S7), (20 / 365, 37_100.0, S20), (45 / 365, 37_400.0, S45)]
SVI_SLICES += [(400 / 365, 39_000.0, S400)]


# -- closed forms --------------------------------------------------------------------------


def test_flat_surface_atm_is_the_vol_rr_bf_vanish_and_the_vol_index_is_the_vol() -> None:
    vol = 0.55
    Ts = [2 / 365, 20 / 365, 45 / 365, 400 / 365]
    Fs = [100.0, 100.4, 101.0, 108.0]
    surf = Surface.from_payload(
        payload([(T, F, dict(FLAT, a=vol**2 * T)) for T, F in zip(Ts, Fs, strict=True)])
    )
    tenors = surf.tenors()
    assert [t.days for t in tenors] == list(DEFAULT_TENORS_DAYS)
    assert tenors[0].days == 1 and tenors[0].atm_iv is None  # 1 day: before the first expiry
    assert all(v is None for v in (tenors[0].forward, tenors[0].rr25, tenors[0].bf10))
    for t in tenors[1:]:
        assert t.days / 365 == t.T
        assert t.atm_iv == pytest.approx(vol, rel=1e-12)
        for value in (t.rr25, t.bf25, t.rr10, t.bf10):
            assert value == pytest.approx(0.0, abs=1e-12)
        # forward log-linear in T between the neighbouring expiries (closed form)
        j = int(np.searchsorted(Ts, t.T)) - 1
        u = (t.T - Ts[j]) / (Ts[j + 1] - Ts[j])
        assert t.forward == pytest.approx(Fs[j] * (Fs[j + 1] / Fs[j]) ** u, rel=1e-12)
    assert surf.vol_index() == pytest.approx(vol, rel=1e-8)
    assert surf.tenor(500).atm_iv is None  # after the last expiry
    with pytest.raises(InputError, match="days"):
        surf.tenor(0)


def test_flat_smiles_with_a_term_structure() -> None:
    """Flat smiles of different vols: the ATM at a tenor is the linear total variance, the
    vol index (variance swap of a flat smile = its vol) the same line at 30 days."""
    T1, T2, v1, v2 = 20 / 365, 45 / 365, 0.5, 0.7
    surf = Surface.from_payload(
        payload([(T1, 100.0, dict(FLAT, a=v1**2 * T1)), (T2, 100.0, dict(FLAT, a=v2**2 * T2))])
    )
    T = 30 / 365
    expected = math.sqrt((v1**2 * T1 + (T - T1) / (T2 - T1) * (v2**2 * T2 - v1**2 * T1)) / T)
    t = surf.tenor(30)
    assert t.atm_iv == pytest.approx(expected, rel=1e-12)
    assert t.rr25 == pytest.approx(0.0, abs=1e-12) and t.bf10 == pytest.approx(0.0, abs=1e-12)
    assert surf.vol_index() == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("j", range(len(SVI_SLICES)))
def test_svi_at_a_fitted_expiry(j: int) -> None:
    """At a fitted expiry: ATM = sqrt(w(0)/T); RR and BF from deltas solved by bisection."""
    T, _, p = SVI_SLICES[j]
    surf = Surface.from_payload(payload(SVI_SLICES))
    t = smile_tenor(surf.smile_at(T), 0, T, 1.0)  # days only labels the entry

    def w(k: float) -> float:
        return float(svi_w(p, k))

    assert t.atm_iv == pytest.approx(math.sqrt(w(0.0) / T), rel=1e-12)
    for delta, rr, bf in ((0.25, t.rr25, t.bf25), (0.10, t.rr10, t.bf10)):
        want_rr, want_bf = rr_bf(w, T, delta)
        assert rr == pytest.approx(want_rr, abs=1e-9)
        assert bf == pytest.approx(want_bf, abs=1e-9)
    assert t.rr25 is not None and t.rr25 < 0.0  # rho < 0: puts over calls
    assert t.bf10 is not None and t.bf25 is not None and t.bf10 > t.bf25 > 0.0


@pytest.mark.parametrize("days", [7, 14, 30, 60, 90, 180, 365])
def test_svi_between_fitted_expiries(days: int) -> None:
    """Between expiries the smile is total variance linear in T at fixed k (checked here
    against the formula: the butterfly-free branch): ATM total variance in closed form, RR
    and BF by bisection on the same formula written out."""
    surf = Surface.from_payload(payload(SVI_SLICES))
    T = days / 365
    Ts = [s[0] for s in SVI_SLICES]
    j = min(int(np.searchsorted(Ts, T, side="right")) - 1, len(Ts) - 2)
    (T1, F1, p1), (T2, F2, p2) = SVI_SLICES[j], SVI_SLICES[j + 1]
    u = (T - T1) / (T2 - T1)

    def w(k: float) -> float:
        return float((1.0 - u) * svi_w(p1, k) + u * svi_w(p2, k))

    k = np.linspace(-0.8, 0.8, 17)
    np.testing.assert_allclose(
        surf.smile_at(T)(k), np.sqrt([w(x) / T for x in k]), rtol=1e-12
    )  # the linear branch (the price mixture would differ)
    t = surf.tenor(days)
    assert t.T == T and t.forward == pytest.approx(F1 * (F2 / F1) ** u, rel=1e-12)
    assert t.atm_iv == pytest.approx(math.sqrt(w(0.0) / T), rel=1e-12)
    for delta, rr, bf in ((0.25, t.rr25, t.bf25), (0.10, t.rr10, t.bf10)):
        want_rr, want_bf = rr_bf(w, T, delta)
        assert rr == pytest.approx(want_rr, abs=1e-9)
        assert bf == pytest.approx(want_bf, abs=1e-9)


def test_delta_strikes_are_where_the_delta_is() -> None:
    """The solved strikes give back the deltas through an independent Black delta."""
    T = 20 / 365
    surf = Surface.from_payload(payload(SVI_SLICES))
    targets = [0.25, 0.75, 0.10, 0.90, 0.5, 0.01, 0.99]
    k = delta_log_moneyness(surf.smile_at(T), T, targets)
    sw = np.sqrt(svi_w(S20, k))
    np.testing.assert_allclose(norm.cdf(-k / sw + 0.5 * sw), targets, rtol=0, atol=1e-12)


def test_delta_solver_without_a_root_or_a_smile_gives_nan() -> None:
    def nan_smile(k: FloatArray) -> FloatArray:
        return np.full(np.shape(k), math.nan)

    assert np.isnan(delta_log_moneyness(nan_smile, 0.1, [0.25, 0.75])).all()

    def holey(k: FloatArray) -> FloatArray:  # NaN beyond k = 0.05: no 25-delta call
        return np.where(np.asarray(k) > 0.05, math.nan, 0.6)

    k = delta_log_moneyness(holey, 0.1, [0.25, 0.75])
    assert math.isnan(k[0])
    sw = 0.6 * math.sqrt(0.1)
    assert norm.cdf(-k[1] / sw + 0.5 * sw) == pytest.approx(0.75, abs=1e-12)
    t = smile_tenor(holey, 36, 0.1, 100.0)
    assert t.rr25 is None and t.bf25 is None and t.atm_iv == pytest.approx(0.6)
    assert np.isnan(delta_log_moneyness(lambda k: np.full(np.shape(k), 0.6), 0.0, [0.25])).all()


# -- the variance swap -----------------------------------------------------------------------


@pytest.mark.parametrize("j", range(len(SVI_SLICES)))
def test_variance_swap_of_svi_smiles_against_quadrature(j: int) -> None:
    T, _, p = SVI_SLICES[j]
    surf = Surface.from_payload(payload(SVI_SLICES))
    want = quad_variance_swap(lambda k: float(svi_w(p, k)))
    rel = 1e-8 if T < 1.0 else 3e-8  # the documented accuracy (module docstring)
    assert variance_swap_variance(surf.smile_at(T), T) == pytest.approx(want, rel=rel)


def test_variance_swap_of_a_flat_smile_is_its_variance() -> None:
    for vol, T, rel in ((0.3, 1 / 365, 1e-8), (0.8, 30 / 365, 1e-8), (1.5, 2.0, 1e-6)):

        def flat(k: FloatArray, v: float = vol) -> FloatArray:
            return np.full(np.shape(k), v)

        w = variance_swap_variance(flat, T)
        assert w == pytest.approx(vol * vol * T, rel=rel)  # 2 years at 150%: a coarse main panel


def test_variance_swap_where_the_smile_stops_answering() -> None:
    """NaN far out (beyond 3 ATM standard deviations): the integral stops there; NaN nearer
    the money: no value."""
    T = 30 / 365  # one standard deviation: 0.6 sqrt(T) = 0.17

    def far(k: FloatArray) -> FloatArray:
        return np.where(np.abs(k) > 1.2, math.nan, 0.6)  # beyond 7 sd

    def near(k: FloatArray) -> FloatArray:
        return np.where(np.abs(k) > 0.3, math.nan, 0.6)  # beyond 1.7 sd

    assert variance_swap_variance(far, T) == pytest.approx(0.36 * T, rel=1e-8)
    assert math.isnan(variance_swap_variance(near, T))


def test_variance_swap_of_heston_is_its_expected_variance() -> None:
    """Heston has no jumps, so the log contract's fair variance is the expected average
    variance, in closed form: theta + (v0 - theta) (1 - e^-kappa T) / (kappa T). The
    integral over its smiles (COS prices; the IVs stop, NaN, deep out of the money) gives
    it; and the vol index is the two slices' values interpolated in total variance."""
    v0, kappa, theta = 0.36, 2.0, 0.3
    heston = {
        **payload([(5 / 365, 100.0, {}), (200 / 365, 101.0, {})]),
        "model": "heston",
        "params": {"v0": v0, "kappa": kappa, "theta": theta, "xi": 0.8, "rho": -0.3},
    }
    surf = Surface.from_payload(heston)

    def expected(T: float) -> float:
        return theta + (v0 - theta) * (1.0 - math.exp(-kappa * T)) / (kappa * T)

    for T in (5 / 365, 30 / 365, 200 / 365, 1.0):
        assert variance_swap_variance(surf.smile_at(T), T) / T == pytest.approx(
            expected(T), rel=1e-7
        )
    T1, T2, T = 5 / 365, 200 / 365, 30 / 365
    w = expected(T1) * T1 + (T - T1) / (T2 - T1) * (expected(T2) * T2 - expected(T1) * T1)
    assert surf.vol_index() == pytest.approx(math.sqrt(w / T), rel=1e-7)


def test_vol_index_interpolates_the_variance_swaps_in_total_variance() -> None:
    surf = Surface.from_payload(payload(SVI_SLICES))
    T, (T1, _, p1), (T2, _, p2) = 30 / 365, SVI_SLICES[1], SVI_SLICES[2]
    w1 = quad_variance_swap(lambda k: float(svi_w(p1, k)))
    w2 = quad_variance_swap(lambda k: float(svi_w(p2, k)))
    want = math.sqrt((w1 + (T - T1) / (T2 - T1) * (w2 - w1)) / T)
    got = surf.vol_index()
    assert got == pytest.approx(want, rel=1e-8)
    atm = surf.tenor(30).atm_iv
    assert atm is not None and got is not None
    assert got > atm  # a smile with wings: the variance swap lies above ATM
    # at exactly a fitted expiry: that slice alone
    on = Surface.from_payload(payload([(30 / 365, 37_000.0, S20), (45 / 365, 37_400.0, S45)]))
    assert on.vol_index() == pytest.approx(
        math.sqrt(quad_variance_swap(lambda k: float(svi_w(S20, k))) / (30 / 365)), rel=1e-8
    )
    # 30 days outside the fitted expiries: null
    assert Surface.from_payload(payload(SVI_SLICES[2:])).vol_index() is None
    assert Surface.from_payload(payload(SVI_SLICES[:2])).vol_index() is None
    assert vol_index([]) is None


# -- payload, schema, view -----------------------------------------------------------------


def _payload_of(surf: Surface) -> dict[str, Any]:
    return dict(
        tenors_payload(
            ts_ms=surf.ts_ms,
            seq=surf.seq,
            status="ok",
            vol_index_30d=surf.vol_index(),
            tenors=[t.as_dict() for t in surf.tenors()],
        )
    )


def test_payload_validates_and_bad_values_are_refused() -> None:
    schema = load_schema("tenors")
    jsonschema.Draft202012Validator.check_schema(schema)
    p = _payload_of(Surface.from_payload(payload(SVI_SLICES)))
    jsonschema.validate(p, schema)
    assert p["schema"] == "streamer.tenors/1" and p["seq"] == 5
    assert [t["days"] for t in p["tenors"]] == list(DEFAULT_TENORS_DAYS)
    assert p["tenors"][0]["atm_iv"] is None  # 1 day, before the 7-day expiry
    assert set(p["tenors"][0]) == {"days", "T", "forward", "atm_iv", "rr25", "bf25", "rr10", "bf10"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(p, extra=1), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(p, vol_index_30d=55.0), schema)  # percent, not a fraction
    entry = dict(p["tenors"][3])
    good = {"ts_ms": 1, "seq": 1, "status": "ok", "vol_index_30d": None}
    nan = tenors_payload(**good, tenors=[dict(entry, rr25=math.nan)])  # type: ignore[arg-type]
    assert nan["tenors"][0]["rr25"] is None
    for bad in ({"days": 0}, {"days": 1.5}, {"T": -1.0}, {"atm_iv": 62.0}, {"forward": -5.0}):
        with pytest.raises(InputError):
            tenors_payload(**good, tenors=[dict(entry, **bad)])  # type: ignore[arg-type]
    with pytest.raises(InputError, match="status"):
        tenors_payload(**dict(good, status="fine"), tenors=[])  # type: ignore[arg-type]
    with pytest.raises(InputError, match="tenors"):
        tenors_payload(**good, tenors=[{"days": 1}])  # type: ignore[arg-type]
    assert topic_tenors("streamer", "deribit", "BTC", "svi") == "streamer/deribit/BTC/svi/tenors"


def test_subscribe_view_of_tenors() -> None:
    p = _payload_of(Surface.from_payload(payload(SVI_SLICES)))
    text = render("streamer/deribit/BTC/svi/tenors", p)
    lines = text.splitlines()
    assert "seq 5" in lines[0] and f"vol index 30d {100 * p['vol_index_30d']:.2f}%" in lines[0]
    assert lines[1].split() == ["tenor", "T", "forward", "atm_iv", "rr25", "bf25", "rr10", "bf10"]
    row30 = next(line for line in lines if line.strip().startswith("30d"))
    t30 = p["tenors"][3]
    assert f"{100 * t30['atm_iv']:.2f}%" in row30 and f"{100 * t30['rr25']:+.2f}" in row30
    assert lines[2].split()[2:] == ["-"] * 6  # 1 day: outside the fitted range


# -- the pipeline and config ----------------------------------------------------------------

NOW_MS = 1_893_484_800_000 + 13 * 3_600_000
TRIGGER = TriggerConfig(min_changed_quotes=1, max_interval_s=1.0, min_interval_s=0.0, warmup_s=0.0)


def _frames(days: tuple[int, ...] = (2, 7, 14, 30, 60, 91, 182, 365)) -> list[str]:
    _, fn = svi_surface(atm_vol=0.6, days=days)
    snap = make_chain(fn, days=days, ts_ms=NOW_MS, rng=np.random.default_rng(3))
    return [ticker_frame(t) for t in deribit_chain(snap)[1]]


def _run(pipe: Pipeline, frames: list[str]) -> list[Message]:
    for f in frames:
        pipe.on_frame(f, NOW_MS * 1_000_000)
    out: list[Message] = []
    for book in pipe.pending():
        out += pipe.fit_book(book, NOW_MS / 1000.0)
    return out


def test_pipeline_publishes_tenors_right_after_each_surface() -> None:
    pipe = Pipeline(models=["svi", "ssvi"], trigger=TRIGGER)
    msgs = _run(pipe, _frames())
    schema = load_schema("tenors")
    surfaces = [i for i, m in enumerate(msgs) if m.topic.endswith("/surface")]
    assert len(surfaces) == 2
    for i in surfaces:
        surface, tenors = msgs[i].payload, msgs[i + 1]
        model = surface["model"]
        assert tenors.topic == f"streamer/deribit/BTC/{model}/tenors"
        jsonschema.validate(tenors.payload, schema)
        assert tenors.payload["seq"] == surface["seq"] and tenors.payload["status"] == "ok"
        assert tenors.payload["ts_ms"] == surface["ts_ms"]
        # the numbers of the surface it came with, as a bot rebuilding it would get them
        again = Surface.from_payload(surface)
        assert tenors.payload["tenors"] == [t.as_dict() for t in again.tenors()]
        assert tenors.payload["vol_index_30d"] == again.vol_index()
        # the synthetic chain: ATM total variance 0.36 d / 365 at the expiry of nominal d
        # days, which lies 13 h short of d days (now 21:00, expiries 08:00 UTC); linear in
        # T, so the truth at a tenor of D days is sqrt(0.36 (D + 13/24) / D)
        # (SVI fits it exactly; SSVI cannot, so its tenors are checked against its slices:
        # ATM total variance linear in T puts the ATM IV between the neighbours')
        Ts = [e["T"] for e in surface["expiries"]]
        atms = [e["atm_iv"] for e in surface["expiries"]]
        for t in tenors.payload["tenors"]:
            if t["atm_iv"] is None:
                assert not Ts[0] <= t["T"] <= Ts[-1]
                continue
            if model == "svi":
                truth = math.sqrt(0.36 * (t["days"] + 13 / 24) / t["days"])
                assert t["atm_iv"] == pytest.approx(truth, abs=0.002), t["days"]
            j = int(np.searchsorted(Ts, t["T"]))
            lo, hi = sorted((atms[j - 1], atms[j]))
            assert lo - 1e-9 <= t["atm_iv"] <= hi + 1e-9, (model, t["days"])
        assert tenors.payload["tenors"][0]["atm_iv"] is None  # 1 day: before the 2-day
    # the feed goes away: tenors re-stamped stale with their surface, one seq
    pipe.on_event(FeedStatus("deribit", "disconnected", 0))
    stale = pipe.stale_messages()
    assert sum(m.topic.endswith("/tenors") for m in stale) == 2
    for i, m in enumerate(stale):
        if m.topic.endswith("/surface"):
            assert stale[i + 1].topic.endswith("/tenors")
            assert stale[i + 1].payload["status"] == "stale"
            assert stale[i + 1].payload["seq"] == m.payload["seq"]
    assert pipe.tenors_failed == {}


def test_tenors_days_from_config_and_off() -> None:
    config = config_from_table({"models": {"names": ["svi"]}, "publish": {"tenors_days": [30, 90]}})
    assert config.publish.tenors_days == (30, 90)
    pipe = Pipeline.from_config(config)
    pipe.trigger_config = TRIGGER
    msgs = _run(pipe, _frames())
    tenors = [m.payload for m in msgs if m.topic.endswith("/tenors")]
    assert [t["days"] for t in tenors[0]["tenors"]] == [30, 90]
    off = Pipeline(models=["svi"], trigger=TRIGGER, tenors_days=())
    assert not [m for m in _run(off, _frames()) if m.topic.endswith("/tenors")]
    assert config_from_table({}).publish.tenors_days == DEFAULT_TENORS_DAYS
    for bad in ([0, 7], [30, 7], [7, 7], [4000]):
        with pytest.raises(ConfigError, match="tenors_days"):
            config_from_table({"publish": {"tenors_days": bad}})


def test_a_failing_tenors_computation_is_counted_not_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: Surface, days: int = 30) -> float:
        raise ValueError("boom")

    monkeypatch.setattr(Surface, "vol_index", broken)
    pipe = Pipeline(models=["svi"], trigger=TRIGGER)
    msgs = _run(pipe, _frames())
    assert any(m.topic.endswith("/surface") for m in msgs)
    assert not any(m.topic.endswith("/tenors") for m in msgs)
    assert pipe.tenors_failed == {"svi": 1}


# -- over a real broker ---------------------------------------------------------------------


async def test_tenors_topic_arrives_retained_qos1_with_the_surface_seq(
    mosquitto: Mosquitto,
) -> None:
    pipe = Pipeline(models=["svi"], trigger=TRIGGER)
    msgs = _run(pipe, _frames())
    pub = from_url(mosquitto.url, instance="tenors-test")
    assert isinstance(pub, MqttPublisher)
    async with pub:
        await pub.wait_connected(10 * UNIT)
        for m in msgs:
            await pub.deliver(m.topic, m.payload, clear=m.clear)
        await pub.flush(10 * UNIT)
    got: dict[str, tuple[bool, int, Any]] = {}
    want = {"streamer/deribit/BTC/svi/surface", "streamer/deribit/BTC/svi/tenors"}
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:  # a plain subscriber
        await client.subscribe("streamer/deribit/BTC/svi/+", qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10 * UNIT):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    got[str(message.topic)] = (
                        message.retain,
                        message.qos,
                        decode(message.payload),
                    )
                    if want <= set(got):
                        break
    assert want <= set(got)
    retain, qos, tenors = got["streamer/deribit/BTC/svi/tenors"]
    assert retain and qos == 1
    jsonschema.validate(tenors, load_schema("tenors"))
    surface = got["streamer/deribit/BTC/svi/surface"][2]
    assert tenors["seq"] == surface["seq"] and tenors["status"] == surface["status"]
    sent = next(m.payload for m in msgs if m.topic.endswith("/tenors"))
    assert tenors == decode(orjson.dumps(sent))
