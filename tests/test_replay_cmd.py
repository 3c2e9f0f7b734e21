"""`streamer replay`: inputs (recordings, Tardis CSV), --model none, argument errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import UNIT, shared_file
from tests.mosquitto import Mosquitto
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


# -- --jobs: several files in parallel processes ----------------------------------------------


def timed_recording(path: Path, seed: int, minutes: int = 4) -> Path:
    """A chain re-quoted (new noise) every minute: a fit or more per minute."""
    _, fn = svi_surface()
    rng = np.random.default_rng(seed)
    with path.open("w") as fh:
        for m in range(minutes):
            ts_ms = FUTURE_MS + m * 60_000
            snap = make_chain(fn, noise_iv=0.002, rng=rng, ts_ms=FUTURE_MS)
            for i, data in enumerate(deribit_chain(snap)[1]):
                t = {**data, "timestamp": ts_ms + i}
                line = {
                    "ts_ns": (ts_ms + i) * 1_000_000,
                    "venue": "deribit",
                    "frame": ticker_frame(t),
                }
                fh.write(json.dumps(line) + "\n")
    return path


def normalised(text: str) -> list[str]:
    """The lines with ``fit.elapsed_ms`` (wall clock) removed, as scripts/replay-digest does;
    everything else byte for byte."""
    out = []
    for line in text.splitlines():
        msg = json.loads(line)
        fit = (msg.get("payload") or {}).get("fit")
        if isinstance(fit, dict):
            fit.pop("elapsed_ms", None)
        out.append(json.dumps(msg, sort_keys=False, separators=(",", ":")))
    return out


def test_jobs_output_is_the_one_by_one_output(tmp_path: Path) -> None:
    files = [timed_recording(tmp_path / f"d{i}.jsonl", seed=i) for i in range(3)]
    alone = []
    for f in files:
        out = tmp_path / f"{f.stem}.out.jsonl"
        done = run(str(f), "--model", "svi", "--out", str(out), "--quiet")
        assert done.returncode == 0, done.stderr
        alone.append(out.read_text())
    assert all(len(a.splitlines()) > 10 for a in alone)  # several fits per file
    want = normalised("".join(alone))
    for jobs in ("2", "1"):
        out = tmp_path / f"jobs{jobs}.jsonl"
        args = [str(f) for f in files]
        done = run(*args, "--model", "svi", "--jobs", jobs, "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert normalised(out.read_text()) == want, jobs
        assert f"with --jobs {jobs}" in done.stderr
        assert all(f"== {f}" in done.stderr for f in args)
    # the files really are replayed apart: in a row, the second starts from warm fits
    together = tmp_path / "together.jsonl"
    done = run(*[str(f) for f in files], "--model", "svi", "--out", str(together), "--quiet")
    assert done.returncode == 0, done.stderr
    assert normalised(together.read_text()) != want


def test_jobs_worker_error_exits_non_zero_with_the_message(tmp_path: Path) -> None:
    good = timed_recording(tmp_path / "good.jsonl", seed=1, minutes=2)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")  # no timestamp column: the Tardis reader refuses it
    out = tmp_path / "out.jsonl"
    done = run(str(good), str(bad), "--model", "svi", "--jobs", "2", "--out", str(out))
    assert done.returncode == 2
    assert f"{bad}: " in done.stderr and "timestamp" in done.stderr
    alone = tmp_path / "alone.jsonl"
    assert run(str(good), "--model", "svi", "--out", str(alone)).returncode == 0
    assert normalised(out.read_text()) == normalised(alone.read_text())  # files before it


def test_jobs_argument_errors(tmp_path: Path) -> None:
    rec = recording(tmp_path)
    for args in (["--jobs", "0"], ["--jobs", "2", "--speed", "10"]):
        done = run(str(rec), str(rec), *args)
        assert done.returncode == 2 and "--jobs" in done.stderr, args
    unknown = run(str(rec), str(rec), "--jobs", "2", "--model", "smile9000")
    assert unknown.returncode == 2 and "unknown model" in unknown.stderr


async def test_paced_replay_delivers_every_surface_to_the_broker(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """``--speed X`` waits on the event loop: the MQTT publisher sends while the replay
    waits, so no surface is superseded in its queue (before, ``time.sleep`` blocked the loop
    and most surfaces of a paced replay never reached the broker: about 1 in 12 at 3x)."""
    import asyncio
    import contextlib

    import aiomqtt

    from streamer.config import load_config
    from streamer.daemon.replay import replay

    rec = tmp_path / "paced.jsonl"
    _, fn = svi_surface(days=(7, 30))
    with rec.open("w") as fh:
        for r in range(6):  # six re-quotes 0.5 s apart (recorded time)
            ts = FUTURE_MS + 500 * r
            snap = make_chain(
                fn, days=(7, 30), noise_iv=0.003, rng=np.random.default_rng(r), ts_ms=ts
            )
            for t in deribit_chain(snap)[1]:
                line = {"ts_ns": ts * 1_000_000, "venue": "deribit", "frame": ticker_frame(t)}
                fh.write(json.dumps(line) + "\n")
    got: list[int] = []

    async def listen(ready: asyncio.Event) -> None:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            await client.subscribe("streamer/deribit/BTC/svi/surface", qos=1)
            ready.set()
            async for msg in client.messages:
                assert isinstance(msg.payload, bytes | bytearray)
                got.append(json.loads(msg.payload)["seq"])

    config = load_config(None)
    ready = asyncio.Event()
    listener = asyncio.create_task(listen(ready))
    await asyncio.wait_for(ready.wait(), 10 * UNIT)
    result = await replay(
        [str(rec)], config, models=["svi"], urls=[mosquitto.url + "/streamer"], speed=2.0
    )
    await asyncio.sleep(0.5 * UNIT)
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    # the surfaces arrive in order, the last one included; a loaded machine may let the
    # publisher's latest-wins queue fold one into the next (the replay's last two fits follow
    # each other at once), but most arrive (with the old blocking sleep: about 1 in 12)
    assert got == sorted(got) and got[-1] >= 4, (got, result)
    assert len(got) >= 0.6 * got[-1], (got, result)
