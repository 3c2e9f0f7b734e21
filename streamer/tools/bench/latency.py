"""``streamer bench latency``: tick-to-publish latency through a real mosquitto on loopback.

The daemon as it runs by default: the default models (``spline``, ``svi``), BTC and ETH
together, one service. A full real BTC + ETH chain (``../shared/data/deribit/snapshots/...``,
turned into Deribit ticker frames by ``../shared/tools/csv_to_replay.py``) is replayed
``--rounds`` times, each round a re-quote in which every option's bid and ask move by a tick
(so every round is a real change: unchanged tickers trigger no refit), by default at Deribit's
peak rate for the chain (every ``ticker.{instrument}.100ms`` channel at its maximum, ten
notifications a second) and with the config's own trigger (``min_interval_s`` 0.2: at most
five fits a second per underlying), through the real service (``Service``: fused parse,
book, trigger, one fit job per model and underlying in worker threads, greeks and tenors,
MQTT publisher) into a mosquitto started on a free loopback port, paced at ``--rate`` frames
per second (``--pacing burst``: the frames due within a millisecond released together, as a
websocket hands them over, ``BurstFeed``; ``frame``: ``ReplayFeed``'s timer per frame). An
aiomqtt subscriber in its own process (as a bot would be) timestamps every surface it
receives. Latency per surface = subscriber receive time - wall-clock time at which the newest
frame of the fitted snapshot entered the parser (one clock: ``time.time_ns`` in both
processes). p50, p99 and max per model (all fits, and warm fits only), then where the warm
fits' latency went (``Service.publish_log``: the snapshot's age when its fit started, the
fit's wall and CPU time in its thread, the loop taking the result back, the publisher to the
subscriber), the process's and the event loop's CPU, and the load.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from streamer.daemon.service import PublishRecord
from streamer.tools.bench.calib import shared_data

DEFAULT_SNAPSHOT = "snapshots/deribit_options_snapshot_20260105T041127Z.csv"
TICK = 0.0001  # Deribit's option tick (coin) for prices below 0.005
TICK_ABOVE, TICK_ABOVE_FROM = 0.0005, 0.005  # and from 0.005 up


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


class BurstFeed:
    """The recording paced at ``rate`` frames per second the way a websocket delivers them:
    the loop sleeps only when the next frame is at least ``tick_s`` ahead, then releases every
    frame due by then. Each frame is stamped with the time it is due (``stamp="due"``, the
    default: when it would have reached the machine's socket, so a frame the service did not
    read at once, behind a busy loop or while the feed waits for the fits, counts the wait in
    its latency), or when it entered the parser (``"parse"``, as ``ReplayFeed`` does and the
    earlier benches did). ``ReplayFeed(rate=...)`` instead sleeps before every frame that is
    ahead of its pace: at 13,460 frames/s that is a timer and a loop turn per frame, CPU a live
    feed (``websockets`` hands over every frame already received without one) does not
    spend."""

    def __init__(
        self, path: str, *, parser: Any, rate: float, tick_s: float = 0.001, stamp: str = "due"
    ) -> None:
        if stamp not in STAMPS:
            raise ValueError(f"stamp must be one of {STAMPS}, got {stamp!r}")
        self.path, self.parser, self.rate, self.tick_s = path, parser, rate, tick_s
        self.stamp = stamp
        self.frames = 0

    async def events(self) -> AsyncIterator[Any]:
        from streamer.events import FeedStatus
        from streamer.feeds.recordings.reader import read_frames

        yield FeedStatus("deribit", "connected", time.time_ns(), detail="replay")
        start, wall0 = time.monotonic_ns(), time.time_ns()
        tick_ns = self.tick_s * 1e9
        due = self.stamp == "due"
        for _ts, _venue, frame in read_frames(self.path):
            offset = self.frames / self.rate * 1e9
            delay = start + offset - time.monotonic_ns()
            if delay >= tick_ns:
                await asyncio.sleep(delay / 1e9)
            elif self.frames % 64 == 0:  # behind the pace: others get a turn
                await asyncio.sleep(0)
            self.frames += 1
            now = time.time_ns()
            for ev in self.parser.parse(frame, min(now, wall0 + int(offset)) if due else now):
                yield ev
        yield FeedStatus("deribit", "disconnected", time.time_ns(), detail="end of replay")

    async def aclose(self) -> None:
        return None


def _phase(rec: dict[str, Any]) -> float:
    """Where in a 100 ms round an instrument's ticker comes: each ``ticker.{instrument}.100ms``
    channel runs on its own timer, so the instruments of both underlyings interleave through
    the round (a fixed phase per instrument, from its name); anything else comes first."""
    frame = rec["frame"]
    at = frame.find("ticker.")
    if at < 0:
        return -1.0
    name = frame[at : frame.find('"', at)]
    return zlib.crc32(name.encode()) / 2**32


REQUOTES = ("walk", "tick")
STAMPS = ("due", "parse")
WALK_STEP = 1e-4  # the underlying's step per round (1 bp) in the walk re-quote


def requote_walk(data: dict[str, Any], move: float) -> None:
    """One option ticker's data as the market quotes it after the underlying moved by
    ``move`` (a fraction of its price) since the recorded chain, implied vols held: each
    side moved by its coin price's sensitivity, ``(delta - price) * move`` (an inverse
    option's price is its USD value over the forward; Deribit's own delta), rounded to
    Deribit's tick (0.0001 below 0.005, 0.0005 from there); a side that would cross the
    other keeps its spread; the forward and index moved alike. Deep wings (delta ~0) stay
    where they are, as on Deribit; quotes near the money cross a tick every few rounds."""
    greeks = data.get("greeks") or {}
    delta = greeks.get("delta")
    for key in ("underlying_price", "index_price"):
        if isinstance(data.get(key), int | float):
            data[key] = round(data[key] * (1.0 + move), 2)
    if not isinstance(delta, int | float):
        return
    bid, ask = data.get("best_bid_price"), data.get("best_ask_price")
    moved = {}
    for side, price in (("best_bid_price", bid), ("best_ask_price", ask)):
        if isinstance(price, int | float) and price > 0.0:
            target = price + (delta - price) * move
            tick = TICK_ABOVE if target >= TICK_ABOVE_FROM else TICK
            moved[side] = max(round(round(target / tick) * tick, 6), TICK)
    bid2, ask2 = moved.get("best_bid_price"), moved.get("best_ask_price")
    if bid2 is not None and ask2 is not None and ask2 <= bid2:
        return  # would cross: the quote stays
    data.update(moved)


def requote_tick(data: dict[str, Any], r: int) -> None:
    """Round ``r``'s re-quote of the earlier sessions' bench: every bid and ask one tick up
    (odd rounds) or down (even rounds) from the recorded chain. Its floor quotes (0.0001 to
    0.0003) swing by up to 3x their price every round, which no market does; with the
    trigger's 200 ms (two rounds) a fit sees the same chain again or the other swing, by the
    trigger's phase, and the swings flag regime shifts in the wing slices."""
    step = TICK * (1 if r % 2 else -1)
    for side in ("best_bid_price", "best_ask_price"):
        if data.get(side):
            data[side] = round(max(data[side] + step, TICK), 6)


def make_recording(
    workdir: Path, rounds: int, requote: str = "walk", seed: int = 7
) -> tuple[Path, int]:
    """A real BTC + ETH chain, then ``rounds - 1`` re-quotes of it (``requote``: ``walk``,
    the underlying on a random walk of 1 bp steps, seeded, every option re-quoted at its
    implied vol, ``requote_walk``; ``tick``, ``requote_tick``); in each round the
    instruments in their channels' phase order (``_phase``: the file lists all of BTC, then
    all of ETH, which made each underlying's newest frame up to half a round old when the
    other's were being sent)."""
    import orjson

    if requote not in REQUOTES:
        raise ValueError(f"requote must be one of {REQUOTES}, got {requote!r}")
    tool = shared_data().parent.parent / "tools" / "csv_to_replay.py"
    src = shared_data() / DEFAULT_SNAPSHOT
    if not tool.exists() or not src.exists():
        raise SystemExit(f"bench latency: needs {tool} and {src} (../shared)")
    one = workdir / "chain.jsonl"
    subprocess.run(
        [sys.executable, str(tool), str(src), "-o", str(one)], check=True, capture_output=True
    )
    records = sorted((orjson.loads(line) for line in one.read_text().splitlines()), key=_phase)
    n_options = sum(1 for rec in records if "ticker." in rec["frame"])
    steps = np.random.default_rng(seed).choice([-WALK_STEP, WALK_STEP], size=max(rounds, 1))
    steps[0] = 0.0
    level = np.cumprod(1.0 + steps)  # per round: the underlying over the recorded one
    out = workdir / "rounds.jsonl"
    with out.open("wb") as fh:
        for r in range(rounds):
            for rec in records:
                frame = orjson.loads(rec["frame"])
                data = frame.get("params", {}).get("data")
                if r and isinstance(data, dict) and "best_bid_price" in data:
                    if requote == "walk":
                        requote_walk(data, float(level[r] - 1.0))
                    else:
                        requote_tick(data, r)
                fh.write(orjson.dumps(dict(rec, frame=orjson.dumps(frame).decode())) + b"\n")
    return out, n_options


async def run_service(
    models: list[str],
    recording: Path,
    port: int,
    rate: float,
    min_changed: int | None,
    min_interval: float | None,
    pacing: str = "burst",
    greeks: bool = True,
    workers: str | None = None,
    stamp: str = "due",
) -> tuple[dict[str, list[Sample]], dict[str, float]]:
    """Per model: every surface the subscriber received, with where its latency went."""
    from streamer.config import load_config
    from streamer.daemon.service import Service
    from streamer.feeds.recordings.replay_feed import ReplayFeed

    cfg = load_config(None)
    n_frames = sum(1 for _ in recording.open())
    cfg = dataclasses.replace(
        cfg,
        instance="bench-latency",
        models=dataclasses.replace(
            cfg.models,
            names=tuple(models or cfg.models.names),
            workers="thread"
            if workers == "thread"
            else cfg.models.workers
            if workers is None
            else "process",
        ),
        feed=dataclasses.replace(cfg.feed, currencies=("BTC", "ETH")),
        publish=dataclasses.replace(
            cfg.publish,
            urls=(f"mqtt://127.0.0.1:{port}/bench",),
            greeks=greeks,
            tenors_days=cfg.publish.tenors_days if greeks else (),
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
        if pacing == "frame":
            return ReplayFeed([str(recording)], parser=parser, rate=rate)
        return BurstFeed(str(recording), parser=parser, rate=rate, stamp=stamp)

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
        ready = asyncio.create_task(service.ready.wait())  # kernels loaded (or compiled)
        await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            raise SystemExit(f"bench latency: the service ended before it was ready: {task}")
        cpu0, loop0, wall0 = os.times(), time.thread_time(), time.monotonic()
        await asyncio.sleep(n_frames / rate + 3.0)
        stop.set()
        await task
        cpu1, loop1, wall1 = os.times(), time.thread_time(), time.monotonic()
        wall = wall1 - wall0
        usage = {
            "process CPU (cores)": (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall,
            "event-loop thread CPU (cores)": (loop1 - loop0) / wall,
            "resnapshots": float(service.resnapshots),
            "feed holds": float(service.feed_holds),
        }
        await asyncio.sleep(0.5)
    finally:
        sub.terminate()
        out, _ = await sub.communicate()
    received: dict[tuple[str, int], tuple[int, bool]] = {}
    for line in out.decode().splitlines():
        topic, seq_text, t_ns, warm = line.split()
        key = "/".join(topic.split("/")[-4:])  # venue/underlying/model/surface: no prefix
        received[(key, int(seq_text))] = (int(t_ns), warm == "1")
    per: dict[str, list[Sample]] = {}
    for rec in service.publish_log:
        got = received.get(("/".join(rec.topic.split("/")[-4:]), rec.seq))
        if got is not None:
            model = rec.topic.split("/")[-2]
            per.setdefault(model, []).append(Sample(rec, got[0], got[1]))
    return per, usage


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """One surface: the service's record of it, the subscriber's receive time, warm or not."""

    rec: PublishRecord
    recv_ns: int
    warm: bool

    @property
    def latency_ms(self) -> float:
        return (self.recv_ns - self.rec.newest_ns) / 1e6

    def stages_ms(self) -> dict[str, float]:
        """Where the latency went (ms): the snapshot's age when its fit started (of it, the
        wait between snapshot and fit start), the fit in its thread (wall, CPU), the loop
        taking the result back, the hand-over to the publisher, publisher to subscriber."""
        r = self.rec
        return {
            "age at fit start": (r.start_ns - r.newest_ns) / 1e6,
            "  of it: snapshot to fit start": (r.start_ns - r.snap_ns) / 1e6,
            "fit (wall)": (r.done_ns - r.start_ns) / 1e6,
            "fit (thread CPU)": r.fit_cpu_ns / 1e6,
            "fit end to loop": (r.resumed_ns - r.done_ns) / 1e6,
            "loop to publisher": (r.published_ns - r.resumed_ns) / 1e6,
            "publisher to subscriber": (self.recv_ns - r.published_ns) / 1e6,
            "total": self.latency_ms,
        }


def breakdown(per: dict[str, list[Sample]]) -> list[str]:
    """A markdown table: p50 / p99 of every stage, per model, warm fits."""
    models = sorted(per)
    lines = [
        "| stage (warm fits), ms | " + " | ".join(f"{m} p50 | {m} p99" for m in models) + " |",
        "|---|" + "---:|---:|" * len(models),
    ]
    stages: dict[str, dict[str, np.ndarray]] = {}
    for m in models:
        rows = [s.stages_ms() for s in per[m] if s.warm]
        for name in rows[0] if rows else ():
            stages.setdefault(name, {})[m] = np.array([r[name] for r in rows])
    for name, by in stages.items():
        cells = []
        for m in models:
            a = by.get(m)
            cells += (
                [f"{np.percentile(a, 50):.2f}", f"{np.percentile(a, 99):.2f}"]
                if a is not None and a.size
                else ["-", "-"]
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="streamer bench latency", description=__doc__)
    ap.add_argument("--model", action="append", help="models (default: the config's)")
    ap.add_argument("--rounds", type=int, default=60, help="the chain and its re-quotes")
    ap.add_argument(
        "--rate", type=float, help="frames per second (default: Deribit's peak, 10 per option)"
    )
    ap.add_argument("--min-changed", type=int, help="trigger: changed quotes (default: config)")
    ap.add_argument("--min-interval", type=float, help="trigger: seconds (default: config)")
    ap.add_argument(
        "--pacing",
        choices=("burst", "frame"),
        default="burst",
        help="burst: frames due within 1 ms released together, as a websocket hands them over "
        "(default); frame: ReplayFeed's sleep before every frame ahead of the pace",
    )
    ap.add_argument(
        "--no-derived",
        action="store_true",
        help="no greeks and no tenors topics (a diagnosis: the default config has both)",
    )
    ap.add_argument(
        "--workers",
        choices=("process", "thread"),
        help="where the fits run (default: the config's, [models] workers)",
    )
    ap.add_argument(
        "--requote",
        choices=REQUOTES,
        default="walk",
        help="the re-quotes: walk (the underlying on a 1 bp random walk, every option at its "
        "implied vol: the default), tick (every bid and ask a tick up, then down)",
    )
    ap.add_argument(
        "--stamp",
        choices=STAMPS,
        default="due",
        help="a frame's receive time: due (when it reaches the socket at the paced rate: the "
        "default) or parse (when it enters the parser, the earlier benches')",
    )
    ap.add_argument("--dump", type=Path, help="write every surface's stage times (JSON lines)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rec, n_options = make_recording(work, args.rounds, args.requote)
        rate = args.rate or 10.0 * n_options
        proc, port = start_mosquitto(work)
        try:
            print(
                f"replaying {sum(1 for _ in rec.open()):,} frames (a real BTC + ETH chain and "
                f"{args.rounds - 1} re-quotes ({args.requote}) of {n_options:,} options; "
                f"receive times: {args.stamp}) at "
                f"{rate:,.0f} frames/s "
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
            per, usage = asyncio.run(
                run_service(
                    args.model or [],
                    rec,
                    port,
                    rate,
                    args.min_changed,
                    args.min_interval,
                    args.pacing,
                    not args.no_derived,
                    args.workers,
                    args.stamp,
                )
            )
            if args.dump is not None:
                with args.dump.open("w") as fh:
                    for got in per.values():
                        for smp in got:
                            row = dict(dataclasses.asdict(smp.rec), recv_ns=smp.recv_ns)
                            fh.write(json.dumps(dict(row, warm=smp.warm)) + "\n")
            seconds = sum(1 for _ in rec.open()) / rate  # the replay's length
            for m, got in per.items():
                for label, sel in (("all", got), ("warm", [g for g in got if g.warm])):
                    a = np.array([g.latency_ms for g in sel])
                    if not a.size:
                        print(f"| {m} | {label} | 0 | - | - | - | - | 10 |")
                        continue
                    print(
                        f"| {m} | {label} | {len(a)} | {len(a) / seconds:.1f} | "
                        f"{np.percentile(a, 50):.2f} | {np.percentile(a, 99):.2f} | "
                        f"{a.max():.2f} | 10 |"
                    )
            print()
            print("\n".join(breakdown(per)))
            print()
            print(
                f"pacing {args.pacing}; "
                + "; ".join(f"{k} {v:.2f}" if v % 1 else f"{k} {v:.0f}" for k, v in usage.items())
            )
            print(
                f"cores available: {len(os.sched_getaffinity(0))}; load average "
                f"{os.getloadavg()[0]:.1f}"
            )
        finally:
            proc.terminate()
            proc.wait(5)
    return 0
