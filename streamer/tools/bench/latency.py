"""``streamer bench latency``: tick-to-publish latency through a real mosquitto on loopback.

The daemon as it runs by default: the default models (``svi``, ``ssvi``), BTC and ETH
together, one service. A full real BTC + ETH chain (``../shared/data/deribit/snapshots/...``,
turned into Deribit ticker frames by ``../shared/tools/csv_to_replay.py``) is replayed
``--rounds`` times, each round a re-quote in which every option's bid and ask move by a tick
(so every round is a real change: unchanged tickers trigger no refit), by default at Deribit's
peak rate for the chain (every ``ticker.{instrument}.100ms`` channel at its maximum, ten
notifications a second) and with the config's own trigger (``min_interval_s`` 0.2: at most
five fits a second per underlying), through the real
service (``Service`` with a ``ReplayFeed``: fused parse, book, trigger, one fit job per
model and underlying in worker threads, MQTT publisher) into a mosquitto started on a free
loopback port, paced at ``--rate`` frames per second. An aiomqtt subscriber in its own
process (as a bot would be) timestamps every surface it receives. Latency per surface =
subscriber receive time - wall-clock time at which the newest frame of the fitted snapshot
entered the parser. p50, p99 and max per model (all fits, and warm fits only).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from streamer.tools.bench.calib import shared_data

DEFAULT_SNAPSHOT = "snapshots/deribit_options_snapshot_20260105T041127Z.csv"
TICK = 0.0001  # Deribit's option tick (coin) for prices below 0.005


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    binary = binary or shutil.which("mosquitto")
    if binary is None:
        raise SystemExit("bench latency: mosquitto not installed (scripts/install adds it)")
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"user {pwd.getpwuid(os.getuid()).pw_name}\nset_tcp_nodelay true\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("bench latency: mosquitto did not start")


SUBSCRIBER = """
import asyncio, sys, time
import aiomqtt, orjson

async def main(port, topic):
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(topic, qos=1)
        print("subscribed", flush=True)
        async for msg in client.messages:
            t = time.time_ns()
            body = orjson.loads(msg.payload)
            print(msg.topic.value, body["seq"], t, int(bool(body["fit"]["warm"])), flush=True)

asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"""


def make_recording(workdir: Path, rounds: int) -> tuple[Path, int]:
    """A real BTC + ETH chain, then ``rounds - 1`` re-quotes of it, each moving every bid and
    ask by one tick (alternately up and down): real changes, as a live market makes them."""
    import orjson

    tool = shared_data().parent.parent / "tools" / "csv_to_replay.py"
    src = shared_data() / DEFAULT_SNAPSHOT
    if not tool.exists() or not src.exists():
        raise SystemExit(f"bench latency: needs {tool} and {src} (../shared)")
    one = workdir / "chain.jsonl"
    subprocess.run(
        [sys.executable, str(tool), str(src), "-o", str(one)], check=True, capture_output=True
    )
    records = [orjson.loads(line) for line in one.read_text().splitlines()]
    n_options = sum(1 for rec in records if "ticker." in rec["frame"])
    out = workdir / "rounds.jsonl"
    with out.open("wb") as fh:
        for r in range(rounds):
            for rec in records:
                frame = orjson.loads(rec["frame"])
                data = frame.get("params", {}).get("data")
                if r and isinstance(data, dict) and "best_bid_price" in data:
                    step = TICK * (1 if r % 2 else -1)
                    for side in ("best_bid_price", "best_ask_price"):
                        if data.get(side):
                            data[side] = round(max(data[side] + step, TICK), 6)
                fh.write(orjson.dumps(dict(rec, frame=orjson.dumps(frame).decode())) + b"\n")
    return out, n_options


async def run_service(
    models: list[str],
    recording: Path,
    port: int,
    rate: float,
    min_changed: int | None,
    min_interval: float | None,
) -> dict[str, list[tuple[float, bool]]]:
    """Per model: (latency ms, warm fit?) of every surface the subscriber received."""
    from streamer.config import load_config
    from streamer.daemon.service import Service
    from streamer.feeds.recordings.replay_feed import ReplayFeed

    cfg = load_config(None)
    n_frames = sum(1 for _ in recording.open())
    cfg = dataclasses.replace(
        cfg,
        instance="bench-latency",
        models=dataclasses.replace(cfg.models, names=tuple(models or cfg.models.names)),
        feed=dataclasses.replace(cfg.feed, currencies=("BTC", "ETH")),
        publish=dataclasses.replace(
            cfg.publish, urls=(f"mqtt://127.0.0.1:{port}/bench",), greeks=True
        ),
        trigger=dataclasses.replace(
            cfg.trigger,
            min_changed_quotes=cfg.trigger.min_changed_quotes
            if min_changed is None
            else min_changed,
            min_interval_s=cfg.trigger.min_interval_s if min_interval is None else min_interval,
        ),
    )

    def factory(config, parser, on_frame):  # type: ignore[no-untyped-def]
        return ReplayFeed([str(recording)], parser=parser, rate=rate)

    service = Service(cfg, feed_factory=factory)
    service.publish_log = []
    stop = asyncio.Event()
    # the subscriber is a bot: its own process (with its own GIL and event loop)
    sub = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SUBSCRIBER,
        str(port),
        "bench/deribit/+/+/surface",
        stdout=asyncio.subprocess.PIPE,
    )
    assert sub.stdout is not None
    try:
        await asyncio.wait_for(sub.stdout.readline(), 30.0)  # "subscribed"
        task = asyncio.create_task(service.run(stop, signals=False))
        await service.ready.wait()  # kernels loaded (compiled, on a cold cache)
        await asyncio.sleep(n_frames / rate + 3.0)
        stop.set()
        await task
        await asyncio.sleep(0.5)
    finally:
        sub.terminate()
        out, _ = await sub.communicate()
    received: dict[tuple[str, int], tuple[int, bool]] = {}
    for line in out.decode().splitlines():
        topic, seq_text, t_ns, warm = line.split()
        key = "/".join(topic.split("/")[-4:])  # venue/underlying/model/surface: no prefix
        received[(key, int(seq_text))] = (int(t_ns), warm == "1")
    per: dict[str, list[tuple[float, bool]]] = {}
    for topic, seq, trig in service.publish_log:
        got = received.get(("/".join(topic.split("/")[-4:]), seq))
        if got is not None:
            model = topic.split("/")[-2]
            per.setdefault(model, []).append(((got[0] - trig) / 1e6, got[1]))
    return per


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="streamer bench latency", description=__doc__)
    ap.add_argument("--model", action="append", help="models (default: the config's)")
    ap.add_argument("--rounds", type=int, default=60, help="the chain and its re-quotes")
    ap.add_argument(
        "--rate", type=float, help="frames per second (default: Deribit's peak, 10 per option)"
    )
    ap.add_argument("--min-changed", type=int, help="trigger: changed quotes (default: config)")
    ap.add_argument("--min-interval", type=float, help="trigger: seconds (default: config)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rec, n_options = make_recording(work, args.rounds)
        rate = args.rate or 10.0 * n_options
        proc, port = start_mosquitto(work)
        try:
            print(
                f"replaying {sum(1 for _ in rec.open()):,} frames (a real BTC + ETH chain and "
                f"{args.rounds - 1} re-quotes of {n_options:,} options) at {rate:,.0f} frames/s "
                f"into one service; trigger: min_changed_quotes "
                f"{args.min_changed or 'default'}, min_interval_s "
                f"{'default' if args.min_interval is None else args.min_interval}; mosquitto on "
                f"127.0.0.1:{port}"
            )
            print()
            print(
                "| model | fits | surfaces | surfaces/s | p50 ms | p99 ms | max ms | goal p99 ms |"
            )
            print("|---|---|---:|---:|---:|---:|---:|---:|")
            per = asyncio.run(
                run_service(args.model or [], rec, port, rate, args.min_changed, args.min_interval)
            )
            seconds = sum(1 for _ in rec.open()) / rate  # the replay's length
            for m, got in per.items():
                for label, sel in (("all", got), ("warm", [g for g in got if g[1]])):
                    a = np.array([g[0] for g in sel])
                    if not a.size:
                        print(f"| {m} | {label} | 0 | - | - | - | - | 10 |")
                        continue
                    print(
                        f"| {m} | {label} | {len(a)} | {len(a) / seconds:.1f} | "
                        f"{np.percentile(a, 50):.2f} | {np.percentile(a, 99):.2f} | "
                        f"{a.max():.2f} | 10 |"
                    )
            print()
            print(
                f"cores available: {len(os.sched_getaffinity(0))}; load average "
                f"{os.getloadavg()[0]:.1f}"
            )
        finally:
            proc.terminate()
            proc.wait(5)
    return 0
