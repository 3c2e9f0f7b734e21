"""``streamer simulate``: reproducible Deribit frames from a known surface, checked against
independent references (closed-form Black-76 in plain ``math`` here, the SSVI model class,
hand-written Deribit calendars) and through the live parser."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamer.errors import InputError
from streamer.events import InstrumentExpired, InstrumentListed, Quote, RpcResponse
from streamer.feeds.deribit.parser import DeribitParser
from streamer.instruments import MS_PER_YEAR, expiry_code_of, expiry_ms_of, parse_option
from streamer.models.ssvi import SSVI
from streamer.pricing import implied_vol
from streamer.tools.simulate import (
    BAD_KINDS,
    EXPECTED_DROP,
    UNDERLYINGS,
    Simulation,
    load_truth,
    simulate,
    truth_path_for,
    write,
)
from streamer.tools.simulate.listing import listed_expiries, settlement_period
from streamer.tools.simulate.scenarios import default_start_ms
from streamer.tools.simulate.simulation import QUIET_S

REPO = Path(__file__).resolve().parent.parent
Frames = list[tuple[int, str]]


# -- independent references -------------------------------------------------------------------


def ncdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def black_usd(F: float, K: float, T: float, sigma: float, is_call: bool) -> float:
    sd = sigma * math.sqrt(T)
    d1 = math.log(F / K) / sd + 0.5 * sd
    d2 = d1 - sd
    if is_call:
        return F * ncdf(d1) - K * ncdf(d2)
    return K * ncdf(-d2) - F * ncdf(-d1)


def black_vega_usd(F: float, K: float, T: float, sigma: float) -> float:
    """USD per 1.00 of vol."""
    sd = sigma * math.sqrt(T)
    d1 = math.log(F / K) / sd + 0.5 * sd
    return F * math.exp(-0.5 * d1 * d1) / math.sqrt(2.0 * math.pi) * math.sqrt(T)


def on_tick(price: float) -> bool:
    """Deribit BTC option tick: 0.0001 below 0.005, 0.0005 from there."""
    units = price * 10_000
    if abs(units - round(units)) > 1e-6:
        return False
    return price <= 0.005 + 1e-12 or round(units) % 5 == 0


def tickers(frames: Frames) -> Iterator[tuple[int, dict[str, Any]]]:
    for ts, text in frames:
        if text.startswith('{"jsonrpc":"2.0","method":"subscription","params":{"channel":"ticker'):
            yield ts, json.loads(text)["params"]["data"]


def channel_frames(frames: Frames, prefix: str) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for ts, text in frames:
        msg = json.loads(text)
        if msg.get("method") == "subscription" and msg["params"]["channel"].startswith(prefix):
            out.append((ts, msg["params"]["data"]))
    return out


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calm() -> tuple[Simulation, Frames]:
    sim = simulate("calm", 3.0, seed=11)
    return sim, list(sim)


# -- listing ----------------------------------------------------------------------------------


def test_expiries_and_strikes_look_like_deribit(calm: tuple[Simulation, Frames]) -> None:
    # Monday 2 March 2026, 09:00 UTC: five dailies, three Friday weeklies, the last Fridays of
    # March, April, May and of the quarters June, September, December (written out by hand)
    start = default_start_ms("calm")
    codes = [expiry_code_of(ms) for ms in listed_expiries(start)]
    assert codes == [
        "3MAR26", "4MAR26", "5MAR26", "6MAR26", "7MAR26", "13MAR26", "20MAR26", "27MAR26",
        "24APR26", "29MAY26", "26JUN26", "25SEP26", "25DEC26",
    ]  # fmt: skip
    assert settlement_period(listed_expiries(start)[0]) == "day"
    _, frames = calm
    first = json.loads(frames[0][1])
    assert first["id"] == 1
    listed = first["result"]
    assert 600 <= len(listed) <= 800
    for item in listed:
        opt = parse_option(item["instrument_name"])
        assert opt is not None
        assert item["expiration_timestamp"] == opt.expiry_ms  # 08:00 UTC
        assert item["strike"] == opt.strike and item["strike"] % 500 == 0
        assert item["option_type"] == ("call" if opt.is_call else "put")
    by_expiry: dict[str, list[float]] = defaultdict(list)
    for item in listed:
        if item["option_type"] == "call":
            by_expiry[item["instrument_name"].split("-")[1]].append(item["strike"])
    spot = UNDERLYINGS["BTC"].spot
    for strikes in by_expiry.values():
        strikes.sort()
        assert strikes[0] < spot < strikes[-1]
        gaps = np.diff(strikes)
        assert gaps.min() >= 500 and gaps.max() <= 20_000
        # steps grow away from the money (as on Deribit, 5000-multiples also sit in a
        # 2000-step band, so a few smaller gaps appear where the bands overlap)
        atm = int(np.argmin(np.abs(np.asarray(strikes) - spot)))
        assert gaps[atm - 1] <= np.median(gaps) < max(gaps[0], gaps[-1])


# -- reproducibility ----------------------------------------------------------------------------


def test_same_seed_same_frames_other_seed_other_frames(calm: tuple[Simulation, Frames]) -> None:
    _, frames = calm
    again = list(simulate("calm", 3.0, seed=11))
    assert again == frames
    other = list(simulate("calm", 3.0, seed=12))
    assert other[0][0] == frames[0][0]  # same start time, other draws
    assert other[5:50] != frames[5:50]


def test_written_files_are_byte_identical(tmp_path: Path) -> None:
    paths = []
    for name in ("a", "b"):
        out = tmp_path / name / "run.jsonl.zst"
        res = write(simulate("regime-shift", 0.5, seed=3), out, zstd_level=3)
        assert res.truth_path == out.with_name("run.truth.json")
        paths.append(res)
    assert paths[0].path.read_bytes() == paths[1].path.read_bytes()
    assert paths[0].truth_path.read_bytes() == paths[1].truth_path.read_bytes()
    gz = [
        write(simulate("calm", 0.2, seed=3), tmp_path / n / "x.jsonl.gz", zstd_level=3)
        for n in ("c", "d")
    ]
    assert gz[0].path.read_bytes() == gz[1].path.read_bytes()
    from streamer.feeds.recordings.reader import read_frames

    back = [(ts, frame) for ts, _venue, frame in read_frames(str(paths[0].path))]
    assert back == list(simulate("regime-shift", 0.5, seed=3))


# -- the frames through the live parser --------------------------------------------------------


def test_calm_parses_with_zero_drops(calm: tuple[Simulation, Frames]) -> None:
    sim, frames = calm
    parser = DeribitParser()
    kinds: Counter[str] = Counter()
    for ts, text in frames:
        for ev in parser.parse(text, ts):
            kinds[type(ev).__name__] += 1
    assert parser.drops == Counter()
    assert parser.skipped == Counter()
    assert kinds["RpcResponse"] == 1
    assert kinds["InstrumentListed"] == len(sim.chain.names)
    assert kinds["Quote"] == sim.counts["ticker"] > 25 * 180
    assert kinds["IndexPrice"] == 180  # one a second
    # every option quoted within the first two seconds (the subscription burst)
    t0 = frames[0][0]
    early = {d["instrument_name"] for ts, d in tickers(frames) if ts < t0 + 2_000_000_000}
    assert early == set(sim.chain.names)
    # near the money more often than the wings, and nothing quiet for a minute (stale)
    last: dict[str, int] = {}
    count: Counter[str] = Counter()
    longest = 0
    for ts, d in tickers(frames):
        name = d["instrument_name"]
        longest = max(longest, ts - last.get(name, ts))
        last[name] = ts
        count[name] += 1
    assert longest <= QUIET_S[1] * 10**9
    spot = UNDERLYINGS["BTC"].spot
    t0_ms = frames[0][0] // 10**6
    zs = {}
    for n in count:
        opt = parse_option(n)
        assert opt is not None
        T = (opt.expiry_ms - t0_ms) / MS_PER_YEAR
        zs[n] = math.log(opt.strike / spot) / (0.45 * math.sqrt(T))
    near = [count[n] for n, z in zs.items() if abs(z) < 0.25]
    wing = [count[n] for n, z in zs.items() if abs(z) > 2.5]
    assert len(near) > 20 and len(wing) > 20
    assert np.mean(near) > 2 * np.mean(wing)
    # receive times never go back
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(frames))


def test_prices_on_tick_and_ivs_consistent(calm: tuple[Simulation, Frames]) -> None:
    _, frames = calm
    n_checked = n_iv = 0
    for _, d in tickers(frames):
        opt = parse_option(d["instrument_name"])
        assert opt is not None
        F, K = d["underlying_price"], opt.strike
        T = (opt.expiry_ms - d["timestamp"]) / MS_PER_YEAR
        bid, ask, mark = d["best_bid_price"], d["best_ask_price"], d["mark_price"]
        assert on_tick(bid) and on_tick(ask) and ask > 0
        assert bid == 0 or bid < ask
        assert (bid == 0) == (d["best_bid_amount"] == 0)
        intrinsic = max(F - K if opt.is_call else K - F, 0.0) / F
        assert (d["bid_iv"] == 0) == (bid == 0 or bid <= intrinsic)  # no IV below intrinsic
        assert bid == 0 or (bid + ask) / 2 >= intrinsic - 1e-12
        miv = d["mark_iv"] / 100
        assert d["mark_iv"] == round(d["mark_iv"], 2)  # percent with 2 decimals
        # mark price = coin Black-76 price at mark_iv, to its 8 decimals (independent Black)
        assert abs(mark - black_usd(F, K, T, miv, opt.is_call) / F) <= 5.1e-9
        vega_pt = black_vega_usd(F, K, T, miv) / 100
        # the bid/ask IVs are those of the rounded prices, to 2 decimals of a percent
        for price, iv in ((bid, d["bid_iv"]), (ask, d["ask_iv"])):
            if price > 0 and iv > 0:
                tol = 0.0055 * black_vega_usd(F, K, T, iv / 100) / 100 / F + 1e-12
                assert black_usd(F, K, T, iv / 100, opt.is_call) / F == pytest.approx(
                    price, abs=tol
                )
        if d["bid_iv"] > 0:
            assert d["bid_iv"] <= d["mark_iv"] <= d["ask_iv"]
        # our implied_vol of the mark price in USD reproduces mark_iv within rounding
        if vega_pt > 0.05:
            iv = implied_vol(mark * F, F, K, T, opt.is_call)
            assert isinstance(iv, float)
            assert abs(iv * 100 - d["mark_iv"]) <= 0.0051 + 0.5e-8 * F / vega_pt
            n_iv += 1
        # Greeks in Deribit's units (closed forms here)
        sd = miv * math.sqrt(T)
        d1 = math.log(F / K) / sd + 0.5 * sd
        delta = ncdf(d1) - (0.0 if opt.is_call else 1.0)
        assert d["greeks"]["delta"] == pytest.approx(delta, abs=6e-6)
        assert d["greeks"]["vega"] == pytest.approx(vega_pt, abs=6e-6)
        assert d["index_price"] > 0 and d["state"] == "open"
        n_checked += 1
    assert n_checked > 4000 and n_iv > 0.8 * n_checked


def test_truth_surface_reproduces_the_mark_ivs(calm: tuple[Simulation, Frames]) -> None:
    sim, frames = calm
    path = sim.truth["path"]
    step_ns = sim.config.step_ms * 1_000_000
    samples = {row["ts_ms"] * 1_000_000: row for row in path}
    ssvi = SSVI()
    n_same_step = n_atm = 0
    sample_times = sorted(samples)
    for ts, d in tickers(frames):
        opt = parse_option(d["instrument_name"])
        assert opt is not None
        i = int(np.searchsorted(sample_times, ts, side="right")) - 1
        row = samples[sample_times[i]]
        (e,) = [x for x in row["expiries"] if x["expiry"] == opt.expiry]
        k = math.log(opt.strike / d["underlying_price"])
        T = (opt.expiry_ms - d["timestamp"]) / MS_PER_YEAR
        if ts < sample_times[i] + step_ns:
            # same model state as the sample: the SSVI class with the truth parameters
            z = e["eta"] * (1 + abs(e["rho"])) / 2
            x = np.array([e["rho"], z, e["gamma"], e["atm_iv"] ** 2 * T])
            iv = ssvi.implied_vol(x, np.array([k]), np.array([T]), np.array([0]))[0]
            assert abs(iv * 100 - d["mark_iv"]) < 0.006 + 0.02 * abs(k)
            n_same_step += 1
        if abs(k) < 0.003:  # near the money: the truth's ATM IV within the smile's slope
            assert abs(e["atm_iv"] * 100 - d["mark_iv"]) < 0.4
            n_atm += 1
        assert e["forward"] == pytest.approx(d["underlying_price"], rel=2e-3)  # <= 10 s apart
    assert n_same_step > 200 and n_atm > 50
    assert len(path) == 3 * 6 + 1  # every 10 s of 3 minutes, plus the end
    first = path[0]
    assert {"ts_ms", "spot", "expiries"} <= set(first)
    assert {"expiry", "expiry_ms", "T", "forward", "atm_iv", "rho", "eta", "gamma", "theta"} <= set(
        first["expiries"][0]
    )
    # calendar: ATM total variance increases with T in every sample
    for row in path:
        thetas = [x["theta"] for x in row["expiries"]]
        assert all(a < b for a, b in itertools.pairwise(thetas))


# -- scenarios ----------------------------------------------------------------------------------


def _atm_iv(frames: Frames, expiry: str, t_from: int, t_to: int) -> float:
    ivs = [
        d["mark_iv"]
        for ts, d in tickers(frames)
        if t_from <= ts < t_to
        and d["instrument_name"].split("-")[1] == expiry
        and abs(math.log(float(d["instrument_name"].split("-")[2]) / d["underlying_price"])) < 0.01
    ]
    assert len(ivs) >= 3, (expiry, t_from, t_to)
    return float(np.median(ivs))


def test_regime_shift_crashes_spot_and_lifts_vol() -> None:
    sim = simulate("regime-shift", 8.0, seed=5, shift_minutes=2.0)
    frames = list(sim)
    s0, s1 = (ms * 1_000_000 for ms in sim.truth["shift"])
    assert (s1 - s0) == 120 * 10**9
    index = channel_frames(frames, "deribit_price_index.btc_usd")
    before = np.median([d["price"] for ts, d in index if s0 - 60e9 <= ts < s0])
    after = np.median([d["price"] for ts, d in index if s1 <= ts < s1 + 40e9])
    assert after / before == pytest.approx(0.85, abs=0.02)
    for expiry in ("6MAR26", "13MAR26", "27MAR26"):
        ratio = _atm_iv(frames, expiry, s1, s1 + 60 * 10**9) / _atm_iv(
            frames, expiry, s0 - 60 * 10**9, s0
        )
        assert ratio == pytest.approx(1.40, abs=0.06), expiry
    path = sim.truth["path"]
    pre = [r for r in path if r["ts_ms"] * 10**6 <= s0][-1]
    post = next(r for r in path if r["ts_ms"] * 10**6 >= s1)
    assert post["rho"] < pre["rho"] - 0.2  # steeper (more negative) skew
    assert post["eta"] > pre["eta"]
    # strikes listed around the new forward (instrument.state), and quoted
    states = channel_frames(frames, "instrument.state.option.BTC")
    created = {d["instrument_name"] for _, d in states if d["state"] == "created"}
    assert created and {d["state"] for _, d in states} == {"created", "started"}
    quoted = {d["instrument_name"] for ts, d in tickers(frames) if ts > s1}
    assert created & quoted
    started_at = {d["instrument_name"]: ts for ts, d in states if d["state"] == "started"}
    assert all(ts > started_at.get(d["instrument_name"], 0) for ts, d in tickers(frames))
    # then the parameters revert: ATM vol lower at the end than right after the shift
    assert path[-1]["u"] < post["u"]
    parser = DeribitParser()
    for ts, text in frames:
        parser.parse(text, ts)
    assert parser.drops == Counter()


def test_expiry_roll_settles_and_lists() -> None:
    sim = simulate("expiry-roll", 4.0, seed=2, start="2026-03-02T07:58:00Z")
    frames = list(sim)
    listed0 = {i["instrument_name"] for i in json.loads(frames[0][1])["result"]}
    old = {n for n in listed0 if "-2MAR26-" in n}
    assert old
    settle_ms = expiry_ms_of("2MAR26")
    states = channel_frames(frames, "instrument.state.option.BTC")
    settled = {d["instrument_name"] for _, d in states if d["state"] == "settled"}
    created = [d["instrument_name"] for _, d in states if d["state"] == "created"]
    started = [d["instrument_name"] for _, d in states if d["state"] == "started"]
    assert settled == old
    assert created and sorted(created) == sorted(started)
    assert {n.split("-")[1] for n in created} == {"7MAR26"}
    assert not any("-7MAR26-" in n for n in listed0)
    ticks = list(tickers(frames))
    assert all(d["timestamp"] < settle_ms for _, d in ticks if "-2MAR26-" in d["instrument_name"])
    assert any(
        d["timestamp"] > settle_ms - 60_000 for _, d in ticks if "-2MAR26-" in d["instrument_name"]
    )
    started_at = {d["instrument_name"]: ts for ts, d in states if d["state"] == "started"}
    assert all(ts > started_at.get(d["instrument_name"], 0) for ts, d in ticks)
    new_quoted = {d["instrument_name"] for _, d in ticks if "-7MAR26-" in d["instrument_name"]}
    assert new_quoted == set(created)
    parser = DeribitParser()
    kinds: Counter[str] = Counter()
    for ts, text in frames:
        for ev in parser.parse(text, ts):
            kinds[type(ev).__name__] += 1
    assert parser.drops == Counter()
    assert kinds[InstrumentExpired.__name__] == len(old)
    assert kinds[InstrumentListed.__name__] == len(listed0) + 2 * len(created)
    assert sim.truth["settlements"] == [{"expiry": "2MAR26", "ts_ms": settle_ms + 2_000}]


def test_disconnect_leaves_a_gap_then_resubscribes() -> None:
    sim = simulate("disconnect", 6.0, seed=4)
    frames = list(sim)
    times = np.array([ts for ts, _ in frames])
    gaps = np.diff(times)
    j = int(np.argmax(gaps))
    assert gaps[j] >= 118 * 10**9 and np.sort(gaps)[-2] < 5 * 10**9
    g0, g1 = (ms * 1_000_000 for ms in sim.truth["gap"])
    assert times[j] < g0 and times[j + 1] >= g1
    parser = DeribitParser()
    replies = [
        ev for ts, text in frames for ev in parser.parse(text, ts) if isinstance(ev, RpcResponse)
    ]
    assert [r.id for r in replies] == [1, 2]
    after = {d["instrument_name"] for ts, d in tickers(frames) if g1 <= ts < g1 + 2 * 10**9}
    assert after == set(sim.chain.names)
    assert parser.drops == Counter()


def test_bad_data_is_counted_by_the_parser() -> None:
    sim = simulate("bad-data", 4.0, seed=9, bad_rate=0.05)
    frames = list(sim)
    parser = DeribitParser(log_first=0)
    quotes = 0
    for ts, text in frames:
        quotes += sum(isinstance(ev, Quote) for ev in parser.parse(text, ts))
    injected = sim.injected
    n_bad = sum(injected.values())
    n_ticker = sim.counts["ticker"]
    # the known rate: binomial(n_ticker, 0.05) within 5 sd, every kind present
    assert abs(n_bad - 0.05 * n_ticker) < 5 * math.sqrt(0.05 * n_ticker)
    assert set(injected) == set(BAD_KINDS)
    expected: Counter[str] = Counter()
    for kind, n in injected.items():
        if EXPECTED_DROP[kind]:
            expected[EXPECTED_DROP[kind]] += n
    assert parser.drops == expected
    assert sum(parser.drops.values()) + quotes == n_ticker

    # independent counts from the text: invalid JSON (NaN is not JSON), crossed, missing fields
    def not_json(text: str) -> bool:
        try:
            json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except ValueError:
            return True
        return False

    assert sum(not_json(t) for _, t in frames) == parser.drops["bad_json"]
    good = [d for _, d in tickers([(ts, t) for ts, t in frames if not not_json(t)])]
    crossed = [d for d in good if d["best_bid_price"] > d["best_ask_price"] > 0]
    assert len(crossed) == injected["crossed"]
    assert sum("mark_iv" not in d for d in good) == injected["missing_optional"]
    assert sum("timestamp" not in d for d in good) == injected["missing_timestamp"]


# -- files and CLI --------------------------------------------------------------------------------


def test_cli_writes_recording_and_truth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers()
    from streamer.cli import simulate as simulate_cmd

    simulate_cmd.add_parser(sub)
    out = tmp_path / "sim.jsonl.zst"
    args = ap.parse_args(
        ["simulate", "--scenario", "calm", "--minutes", "0.25", "--seed", "1", "--out", str(out)]
    )
    assert args.func(args) == 0
    assert "frames" in capsys.readouterr().err
    truth = load_truth(tmp_path / "sim.truth.json")
    assert truth["config"]["seed"] == 1 and truth["config"]["scenario"] == "calm"
    assert len(truth["path"]) == 3
    bad = ap.parse_args(["simulate", "--out", str(tmp_path / "x.csv"), "--minutes", "0.1"])
    assert bad.func(bad) == 2
    assert truth_path_for("a/b.jsonl") == Path("a/b.truth.json")
    assert truth_path_for("b.jsonl.gz") == Path("b.truth.json")
    with pytest.raises(InputError):
        simulate("nope", 1.0, 0)
    with pytest.raises(InputError):
        simulate("calm", 1.0, 0, not_a_param=1.0)


@pytest.mark.parametrize("name", ["calm", "regime-shift"])
def test_bundled_recordings(name: str) -> None:
    rec = REPO / "replay_data" / f"{name}.jsonl.zst"
    truth_file = REPO / "replay_data" / f"{name}.truth.json"
    if not rec.exists() or not truth_file.exists():
        pytest.skip(f"bundled recording not generated: {rec}")
    assert rec.stat().st_size < 6_000_000
    truth = load_truth(truth_file)
    assert truth["config"]["scenario"] == name
    assert truth["end_ms"] - truth["start_ms"] == 3_600_000
    assert len(truth["path"]) == 361
    from streamer.feeds.recordings.reader import read_frames

    parser = DeribitParser()
    for n, (ts, _venue, frame) in enumerate(read_frames(str(rec))):
        parser.parse(frame, ts)
        if n >= 2_000:
            break
    assert parser.drops == Counter() and parser.frames == 2_001
    spots = [row["spot"] for row in truth["path"]]
    if name == "regime-shift":
        assert min(spots) / max(spots) < 0.88
    else:
        assert min(spots) / max(spots) > 0.95
