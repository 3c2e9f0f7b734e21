"""``streamer report`` and ``streamer plot``: metrics, files, and bad inputs.

A synthetic recording (Deribit ticker frames of ``tests.synth`` chains around a known SVI
surface, the venue's mark IV being that surface and its delta the closed-form Black delta)
goes through the report end to end; the metric helpers are checked on hand-made inputs; real
Deribit data (skipped where absent) checks our delta against the venue's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from streamer.book.snapshot import ChainSnapshot
from streamer.calib.calibrator import Calibrator
from streamer.cli import plot as plot_cmd
from streamer.cli import report as report_cmd
from streamer.daemon.pipeline import FitRecord, make_model
from streamer.instruments import expiry_code_of
from streamer.models import REGISTRY
from streamer.tools.chains import load_chains
from streamer.tools.report import collect, plots, tables
from tests.conftest import shared_file
from tests.synth import make_chain, svi_surface

DAYS = (7, 30, 91)
CHAINS = 3
SPACING_S = 30
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = """
[trigger]
min_changed_quotes = 1000000
max_interval_s = 20.0
min_interval_s = 1.0
[book]
stale_after_s = 600.0
"""


def _ncdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def black_delta(F: float, K: float, T: float, vol: float, is_call: bool) -> float:
    """Closed form N(d1) (puts N(d1) - 1): the venue's delta (DESIGN section 2)."""
    d1 = (math.log(F / K) + 0.5 * vol * vol * T) / (vol * math.sqrt(T))
    return _ncdf(d1) - (0.0 if is_call else 1.0)


def ticker_frames(snap: ChainSnapshot, underlying: str = "BTC") -> list[tuple[int, str]]:
    """The chain as Deribit ``ticker`` notifications (IVs in percent, prices in coin)."""
    out = []
    for i in range(snap.n_quotes):
        j = int(snap.expiry_idx[i])
        code = expiry_code_of(int(snap.expiry_ms[j]))
        K, F, T = float(snap.strike[i]), float(snap.forward[i]), float(snap.T[i])
        call = bool(snap.is_call[i])
        name = f"{underlying}-{code}-{int(K)}-{'C' if call else 'P'}"
        mark = float(snap.mark_iv[i])
        data = {
            "timestamp": snap.ts_ms,
            "instrument_name": name,
            "state": "open",
            "best_bid_price": round(float(snap.bid[i]), 8),
            "best_bid_amount": 1.0,
            "best_ask_price": round(float(snap.ask[i]), 8),
            "best_ask_amount": 1.0,
            "bid_iv": round(float(snap.bid_iv[i]) * 100, 4),
            "ask_iv": round(float(snap.ask_iv[i]) * 100, 4),
            "mark_iv": round(mark * 100, 4),
            "mark_price": round(float(snap.mark_price[i]), 8),
            "underlying_price": F,
            "underlying_index": f"SYN.{underlying}-{code}",
            "index_price": F,
            "interest_rate": 0.0,
            "greeks": {"delta": round(black_delta(F, K, T, mark, call), 5)},
        }
        msg = {
            "jsonrpc": "2.0",
            "method": "subscription",
            "params": {"channel": f"ticker.{name}.100ms", "data": data},
        }
        out.append((snap.ts_ms, json.dumps(msg)))
    return out


def write_recording(path: Path, snaps: Sequence[ChainSnapshot]) -> Path:
    lines = []
    n = 0
    for snap in snaps:
        for ts_ms, frame in ticker_frames(snap):
            rec = {"ts_ns": ts_ms * 1_000_000 + n, "venue": "deribit", "frame": frame}
            lines.append(json.dumps(rec))
            n += 1
    path.write_text("\n".join(lines) + "\n")
    return path


def synth_chains() -> list[ChainSnapshot]:
    _, iv_fn = svi_surface(days=DAYS)
    base = make_chain(iv_fn, days=DAYS, n_strikes=15, noise_iv=0.002)
    return [
        make_chain(
            iv_fn,
            days=DAYS,
            n_strikes=15,
            noise_iv=0.002,
            rng=np.random.default_rng(i),
            ts_ms=base.ts_ms + i * SPACING_S * 1000,
        )
        for i in range(CHAINS)
    ]


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="streamer")
    sub = ap.add_subparsers(dest="command", required=True)
    report_cmd.add_parser(sub)
    plot_cmd.add_parser(sub)
    args = ap.parse_args(argv)
    code: int = args.func(args)
    return code


def is_png(path: Path, min_bytes: int = 5_000) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) >= min_bytes


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("rec")
    cfg = d / "report.toml"
    cfg.write_text(CONFIG)
    return write_recording(d / "synth.jsonl", synth_chains()), cfg


@pytest.fixture(scope="module")
def report_run(
    recording: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    rec, cfg = recording
    out = tmp_path_factory.mktemp("report")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = run(["report", str(rec), "--out-dir", str(out), "--config", str(cfg)])
    assert code == 0
    return out, buf.getvalue()


def table_rows(text: str, section: str) -> dict[str, list[str]]:
    """Model -> cells of the first table after heading ``section``."""
    part = text.split(f"## {section}\n", 1)[1]
    rows = {}
    for line in part.splitlines():
        if line.startswith("| ") and not line.startswith("| model"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif rows and not line.startswith("|"):
            break
    return rows


def header_index(text: str) -> dict[str, int]:
    head = next(line for line in text.splitlines() if line.startswith("| model"))
    cells = [c.strip() for c in head.strip("|").split("|")]
    return {c: i - 1 for i, c in enumerate(cells)}


# ------------------------------------------------------------------ metrics
def test_atm_jitter_on_constructed_sequences() -> None:
    same = {"7JAN26": 0.55, "27FEB26": 0.60}
    assert tables.atm_jitter([same, dict(same)]) == 0.0
    seq = [{"A": 0.50}, {"A": 0.52, "B": 0.60}, {"A": 0.51, "B": 0.60, "C": 0.7}]
    # matched by expiry: A +0.02, A -0.01, B 0.00 (C and the first B have no predecessor)
    assert tables.atm_jitter(seq) == pytest.approx(math.sqrt((0.02**2 + 0.01**2) / 3), abs=1e-15)
    assert math.isnan(tables.atm_jitter([same]))
    assert math.isnan(tables.atm_jitter([{"A": 0.5}, {"B": 0.5}]))  # nothing matched


def test_jitter_zero_for_identical_fits_and_errors_vs_known_surface() -> None:
    snap = synth_chains()[0]
    cal = Calibrator(make_model("svi"))
    rec = FitRecord("test", "BTC", "svi", cal.fit(snap), snap)
    assert rec.result.success
    stats = tables.ModelStats()
    stats.add(rec)
    stats.add(rec)
    row = tables.summarize([stats])
    assert row.jitter == 0.0
    assert row.fits == 2
    # the synthetic mark IV is the true surface; the fit sees it through +-1 vol of spread
    mark, _ = tables.fit_errors(rec)
    assert mark.size == rec.result.n_quotes
    assert np.median(np.abs(mark)) < 0.005


def test_fit_errors_delta_matches_deribit_on_real_snapshot() -> None:
    """At the venue's own mark IV our Black delta must reproduce Deribit's delta."""
    path = shared_file("snapshots/deribit_options_snapshot_20260105T041127Z.csv")
    snap = load_chains(path, "BTC")[0]
    rec = FitRecord("deribit", "BTC", "ssvi", Calibrator(make_model("ssvi")).fit(snap), snap)
    assert rec.result.success and rec.result.prepared is not None
    q = rec.result.prepared.quote_index
    at_mark = dataclasses.replace(rec.result, fitted_iv=snap.mark_iv[q].copy())
    mark, delta = tables.fit_errors(dataclasses.replace(rec, result=at_mark))
    assert np.all(mark == 0.0)
    assert delta.size > 100
    assert np.median(np.abs(delta)) < 2e-4  # Deribit rounds its deltas to 4 decimals
    # and with the fitted IV the deltas stay close, the IVs within a couple of vol points
    mark, delta = tables.fit_errors(rec)
    assert np.median(np.abs(mark)) < 0.02
    assert np.median(np.abs(delta)) < 0.01


# ------------------------------------------------------------------- report
def test_report_writes_a_row_per_model_with_sane_numbers(report_run: tuple[Path, str]) -> None:
    out, stdout = report_run
    text = (out / "report.md").read_text()
    models = [m for m in collect.DEFAULT_MODELS if m in REGISTRY]
    col = header_index(text)
    for section in ("Overall", "synth-BTC"):
        rows = table_rows(text, section)
        assert sorted(rows) == sorted(models)
        for m, cells in rows.items():
            values = {name: cells[i] for name, i in col.items() if i >= 0}
            assert int(values["fits"]) >= 2, m
            nums = {k: float(v) for k, v in values.items()}
            assert all(math.isfinite(v) for v in nums.values()), (m, values)
            assert 0.0 <= nums["in_band"] <= 1.0
            # one OTM quote per strike at most: 15 strikes x 3 expiries
            assert 30 <= nums["quotes/fit"] <= 15 * len(DAYS)
            # every model lands near the true smile (SSVI-type shapes cannot nest raw SVI)
            assert 0.0 <= nums["mark med (vp)"] <= nums["mark p95 (vp)"] < 15.0, m
            assert nums["mark med (vp)"] <= nums["mark rmse (vp)"] * 1.5
            assert 0.0 <= nums["delta med"] < 0.03, m
            assert 0.0 <= nums["ATM jitter (vp)"] < 3.0, m
            assert 0.0 < nums["ms p50"] <= nums["ms p95"] < 10_000.0
        # SVI nests the synthetic surface: the venue's marks (the truth) within the spread
        svi = {name: float(rows["svi"][i]) for name, i in col.items() if i >= 0}
        assert svi["in_band"] > 0.9
        assert svi["mark p95 (vp)"] < 1.0
        assert svi["delta med"] < 0.002
        assert svi["ATM jitter (vp)"] < 0.5  # re-quotes of one surface, 0.2 vp noise
    printed = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert len(printed) == 1 + len(models)  # header + one row per model (rule has no space)


def test_report_pngs(report_run: tuple[Path, str]) -> None:
    out, _ = report_run
    smiles = sorted(out.glob("smile-synth-BTC-*.png"))
    assert len(smiles) == len(DAYS)  # fewer expiries than the report's pick of 4
    for p in [*smiles, out / "params-synth-BTC.png", out / "inband-synth-BTC.png"]:
        assert p.is_file() and is_png(p), p
    text = (out / "report.md").read_text()
    for p in smiles:
        assert f"({p.name})" in text


def test_plot_one_png_per_expiry(recording: tuple[Path, Path], tmp_path: Path) -> None:
    rec, cfg = recording
    code = run(["plot", str(rec), "--out-dir", str(tmp_path), "--config", str(cfg)])
    assert code == 0
    codes = [expiry_code_of(int(e)) for e in synth_chains()[-1].expiry_ms]
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == sorted(f"smile-synth-BTC-{c}.png" for c in codes)
    assert all(is_png(tmp_path / n) for n in names)
    one = tmp_path / "one"
    code = run(["plot", str(rec), "--out-dir", str(one), "--model", "svi", "--expiry", codes[1]])
    assert code == 0
    assert [p.name for p in one.glob("*.png")] == [f"smile-synth-BTC-{codes[1]}.png"]


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("command", ["report", "plot"])
def test_bad_inputs_exit_2(
    command: str,
    recording: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rec, _ = recording
    missing = tmp_path / "nope.jsonl"
    assert run([command, str(missing), "--out-dir", str(tmp_path)]) == 2
    assert f"no such file: {missing}" in capsys.readouterr().err
    assert run([command, str(rec), "--model", "blackscholes", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'blackscholes'" in err and "svi" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"ts_ns": 1, "venue": "deribit", "frame": "{}"}\n')
    assert run([command, str(empty), "--model", "svi", "--out-dir", str(tmp_path)]) == 2
    assert re.search(r"no option chain in it", capsys.readouterr().err)
    assert not list(tmp_path.glob("*.png"))


def test_plot_unknown_expiry_exit_2(
    recording: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec, _ = recording
    code = run(
        ["plot", str(rec), "--model", "svi", "--expiry", "1JAN99", "--out-dir", str(tmp_path)]
    )
    assert code == 2
    assert "1JAN99" in capsys.readouterr().err


def test_report_on_a_real_chain_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The direct chain-CSV path on a real Deribit chain: marks and deltas near the venue's."""
    path = shared_file("snapshots/deribit_options_snapshot_20260105T041127Z.csv")
    code = run(
        ["report", str(path), "--model", "svi", "--model", "sabr", "--out-dir", str(tmp_path)]
    )
    assert code == 0
    text = (tmp_path / "report.md").read_text()
    col = header_index(text)
    for und in ("BTC", "ETH"):
        rows = table_rows(text, f"deribit_options_snapshot_20260105T041127Z-{und}")
        assert sorted(rows) == ["sabr", "svi"]
        for m, cells in rows.items():
            v = {name: cells[i] for name, i in col.items() if i >= 0}
            assert v["fits"] == "1" and v["ATM jitter (vp)"] == "-"  # one chain: no pair
            assert float(v["quotes/fit"]) > 100
            assert float(v["mark med (vp)"]) < 1.0, (und, m)
            assert float(v["delta med"]) < 0.005, (und, m)
    assert len(list(tmp_path.glob("smile-*.png"))) == 2 * plots.SMILES_PER_INPUT
    assert "| svi |" in capsys.readouterr().out


def test_fit_on_gap_fits_once_per_chain_cut(recording: tuple[Path, Path], tmp_path: Path) -> None:
    """Chains 30 s apart, gaps of 10 s: one fit per chain, none on a partial chain."""
    rec, _ = recording
    with contextlib.redirect_stdout(io.StringIO()):
        code = run(
            ["report", str(rec), "--model", "svi", "--fit-on-gap", "10", "--out-dir", str(tmp_path)]
        )
    assert code == 0
    text = (tmp_path / "report.md").read_text()
    col = header_index(text)
    cells = table_rows(text, "synth-BTC")["svi"]
    assert cells[col["fits"]] == str(CHAINS)
    assert cells[col["failed"]] == "0"
    assert float(cells[col["quotes/fit"]]) >= 40  # whole chains (45 OTM quotes at most)
    with pytest.raises(SystemExit) as exc:
        run(["report", str(rec), "--fit-on-gap", "-1"])
    assert exc.value.code == 2


def test_fit_on_gap_sees_only_the_last_cut(tmp_path: Path) -> None:
    """An expiry missing from the last cut is not carried over from the previous one."""
    _, iv_fn = svi_surface(days=DAYS)
    first = synth_chains()[0]
    later = make_chain(iv_fn, days=DAYS[:2], n_strikes=15, ts_ms=first.ts_ms + 3_600_000)
    rec = write_recording(tmp_path / "cuts.jsonl", [first, later])
    out = tmp_path / "png"
    with contextlib.redirect_stdout(io.StringIO()):
        code = run(
            ["plot", str(rec), "--model", "svi", "--fit-on-gap", "60", "--out-dir", str(out)]
        )
    assert code == 0
    codes = [expiry_code_of(int(e)) for e in later.expiry_ms]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        f"smile-cuts-BTC-{c}.png" for c in codes
    )
