"""`streamer replay`: inputs (recordings, Tardis CSV), --model none, argument errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import shared_file
from tests.synth import deribit_chain, make_chain, svi_surface, ticker_frame

FUTURE_MS = 1_893_484_800_000


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer", "replay", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def recording(tmp_path: Path) -> Path:
    _, fn = svi_surface()
    snap = make_chain(fn, noise_iv=0.002, rng=np.random.default_rng(2), ts_ms=FUTURE_MS)
    rec = tmp_path / "rec.jsonl"
    with rec.open("w") as fh:
        for t in deribit_chain(snap)[1]:
            line = {"ts_ns": FUTURE_MS * 1_000_000, "venue": "deribit", "frame": ticker_frame(t)}
            fh.write(json.dumps(line) + "\n")
    return rec


def test_model_none_parses_and_books_only(tmp_path: Path) -> None:
    rec = recording(tmp_path)
    out = tmp_path / "out.jsonl"
    done = run(str(rec), "--model", "none", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "replayed 336 frames" in done.stderr and "published 0 messages" in done.stderr
    assert out.read_text() == ""


def test_hourly_tardis_csv_replays_with_a_config(tmp_path: Path) -> None:
    """IV-only quotes an hour apart: a config with a long stale limit fits every hour."""
    csv = shared_file("smiles/tardis-hourly-2024-05.csv")
    cfg = tmp_path / "hourly.toml"
    cfg.write_text(
        "[book]\nstale_after_s = 3600.0\n[trigger]\nmin_changed_quotes = 400\n"
        'max_interval_s = 600.0\nmin_interval_s = 60.0\n[log]\nlevel = "error"\n'
    )
    out = tmp_path / "out.jsonl"
    done = run(str(csv), "--model", "svi", "--config", str(cfg), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "events" in done.stderr
    surfaces = [
        json.loads(line)["payload"]
        for line in out.read_text().splitlines()
        if json.loads(line)["topic"].endswith("/svi/surface")
    ]
    assert len(surfaces) >= 20  # about one per hour and underlying
    assert {s["underlying"] for s in surfaces} == {"BTC", "ETH"}
    assert np.median([s["fit"]["in_band"] for s in surfaces]) > 0.85


def test_argument_errors_exit_2(tmp_path: Path) -> None:
    rec = recording(tmp_path)
    missing = run(str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    unknown = run(str(rec), "--model", "smile9000")
    assert unknown.returncode == 2 and "unknown model" in unknown.stderr and "svi" in unknown.stderr
    speed = run(str(rec), "--speed", "0")
    assert speed.returncode == 2 and "--speed" in speed.stderr
    bad_url = run(str(rec), "--publish", "ftp://x")
    assert bad_url.returncode == 2 and "publish.url" in bad_url.stderr
