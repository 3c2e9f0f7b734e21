"""Soak: a full day of BTC + ETH feed through the daemon into a real mosquitto, at 100x.

``python benchmarks/soak.py [--hours 24] [--speed 100] [--out docs/soak-rss.png]``

What runs:

* a recording, made once by the simulator (``streamer.tools.simulate``, calm scenario, seeded:
  the same bytes every time) of one hour of BTC and one hour of ETH options feed (Deribit
  frames, merged by time) in a temporary directory;
* ``LoopFeed``: that recording played again and again, each loop's timestamps (the receive
  time and every ``"timestamp"`` inside the frames) shifted by one recording length, so the
  feed time runs on for ``--hours`` (24 by default: the day's 08:00 settlement of the nearest
  daily included), paced at ``--speed`` times real time (100: about 15 minutes). Frames are
  read from the file as they are released (the feed holds no copy of the day);
* the daemon: ``streamer.daemon.service.Service`` with the default config's models (spline
  and SVI, each fitting in worker processes), BTC and ETH, greeks on, publishing to a
  mosquitto this script starts on a free loopback port (persistence off), and a subscriber
  in its own process counting what arrives;
* every ``--sample-s`` (10 s) the process's resident set size (``/proc/self/status`` VmRSS)
  and the summed proportional set size of its worker processes (the fork server and what it
  forked: ``smaps_rollup`` Pss), printed each minute.

Reported: the RSS curve (min, max, after warm-up (``--warmup-min``, 2 minutes) the spread
``(max - min) / min``; goals: flat within 10 % and <= 300 MB), frames sent and seen by the
daemon, parser drops, book refusals by reason (after the daily settles, the loop keeps quoting
it: those quotes are refused as ``expired``, counted apart: they are not valid any more), fits,
messages acknowledged by the broker and received by the subscriber, and the load average.
The curve goes to ``--out`` as a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from streamer.config import load_config
from streamer.daemon.service import Service
from streamer.events import Event, FeedStatus
from streamer.feeds.base import Feed, FrameParser
from streamer.feeds.deribit.parser import DeribitParser
from streamer.feeds.recordings.reader import read_frames
from streamer.feeds.recordings.recorder import Recorder
from streamer.tools.simulate import simulate

REPO = Path(__file__).resolve().parent.parent
TS_FIELD = re.compile(r'"timestamp":(\d+)')
RSS_GOAL_MB = 300.0
FLAT_GOAL = 0.10

SUBSCRIBER = r"""
import asyncio, sys
import aiomqtt

N = 0

async def main(port):
    global N
    last = 0.0
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe("soak/#", qos=1)
        print("subscribed", flush=True)
        loop = asyncio.get_running_loop()
        async for _ in client.messages:
            N += 1
            now = loop.time()
            if now - last > 1.0:
                print(N, flush=True)
                last = now

try:
    asyncio.run(main(int(sys.argv[1])))
except KeyboardInterrupt:
    print(N, flush=True)
"""


async def stop_subscriber(sub: asyncio.subprocess.Process) -> int:
    """End the subscriber process; the last count it printed (it prints every second)."""
    sub.terminate()
    try:
        out, _ = await asyncio.wait_for(sub.communicate(), 10)
    except TimeoutError:
        sub.kill()
        out, _ = await sub.communicate()
    counts = [int(w) for w in out.decode().split() if w.isdigit()]
    return counts[-1] if counts else 0


def rss_mb() -> float:
    """This process's resident set size now (MB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def workers_pss_mb() -> float:
    """The daemon's worker processes (the fork server and the fit and derived workers it
    forked, ``[models] workers = "process"``): their proportional set size summed (MB; the
    pages they share with each other counted once in all)."""
    total = 0
    for pid in _descendants(os.getpid()):
        try:
            if b"multiprocessing.forkserver" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024.0


def make_recording(workdir: Path, minutes: float, seed: int) -> tuple[Path, int, int]:
    """One recording of BTC and ETH (simulated, merged by time): its path, frames, and
    span in ns."""
    sims = [
        iter(simulate("calm", minutes=minutes, seed=seed + i, underlying=u))
        for i, u in enumerate(("BTC", "ETH"))
    ]
    heads = [next(s, None) for s in sims]
    n, first, last = 0, None, 0
    with Recorder(workdir, venue="deribit", compression="none") as rec:
        while any(h is not None for h in heads):
            i = min((j for j, h in enumerate(heads) if h is not None), key=lambda j: heads[j][0])  # type: ignore[index]
            ts_ns, frame = heads[i]  # type: ignore[misc]
            rec.write(frame, ts_ns)
            n += 1
            first = ts_ns if first is None else first
            last = ts_ns
            heads[i] = next(sims[i], None)
    return rec.paths[0], n, last - (first or 0)


def _shifter(shift_ms: int) -> Callable[[re.Match[str]], str]:
    def bump(m: re.Match[str]) -> str:
        return f'"timestamp":{int(m.group(1)) + shift_ms}'

    return bump


class LoopFeed(Feed):
    """A recording looped with shifted timestamps, paced at ``speed`` times real time."""

    def __init__(
        self,
        path: Path,
        *,
        parser: FrameParser,
        on_frame: Callable[[str, int], None] | None,
        span_ns: int,
        hours: float,
        speed: float,
    ) -> None:
        self.path = path
        self.parser = parser
        self.on_frame = on_frame
        self.period_ns = span_ns + 1_000_000_000  # one loop: the recording and one second
        self.total_ns = int(hours * 3600e9)
        self.speed = speed
        self.frames = 0
        self.loops = 0
        self.behind_s = 0.0  # the worst lag behind the pace (the daemon could not keep up)
        self.feed_ns = 0  # feed time played so far

    async def events(self) -> AsyncIterator[Event]:
        yield FeedStatus("deribit", "connected", time.time_ns(), detail="soak")
        start = time.monotonic_ns()
        t0: int | None = None
        while True:
            shift = self.loops * self.period_ns
            shift_ms = shift // 1_000_000
            bump = _shifter(shift_ms)
            for ts_ns, _venue, recorded in read_frames(self.path):
                if t0 is None:
                    t0 = ts_ns
                feed_ns = ts_ns + shift - t0
                if feed_ns >= self.total_ns:
                    yield FeedStatus("deribit", "disconnected", time.time_ns(), detail="soak end")
                    return
                self.feed_ns = feed_ns
                delay = start + feed_ns / self.speed - time.monotonic_ns()
                if delay > 0:
                    await asyncio.sleep(delay / 1e9)
                else:
                    self.behind_s = max(self.behind_s, -delay / 1e9)
                    if self.frames % 64 == 0:
                        await asyncio.sleep(0)
                frame = TS_FIELD.sub(bump, recorded) if shift_ms else recorded
                now = ts_ns + shift  # the feed's clock (listings are checked against it)
                self.frames += 1
                if self.on_frame is not None:
                    self.on_frame(frame, now)
                for ev in self.parser.parse(frame, now):
                    yield ev
            self.loops += 1


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    binary = binary or shutil.which("mosquitto")
    if binary is None:
        raise SystemExit("soak: mosquitto is not installed (scripts/install adds it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "set_tcp_nodelay true\nlog_dest stderr\nlog_type error\n"
        + (f"user {os.environ.get('USER', 'root')}\n" if os.getuid() == 0 else "")
    )
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(500):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.01)
    proc.kill()
    raise SystemExit("soak: mosquitto did not start")


class Sampler(threading.Thread):
    """RSS every ``every`` seconds of wall time (a thread: the event loop may be busy)."""

    def __init__(self, every: float, feed: LoopFeed) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.feed = feed
        # (wall s, feed h, the daemon's RSS MB, its workers' PSS MB)
        self.samples: list[tuple[float, float, float, float]] = []
        self.t0 = time.monotonic()
        self.stop = threading.Event()

    def run(self) -> None:
        next_print = 60.0
        while not self.stop.is_set():
            t = time.monotonic() - self.t0
            sample = (t, self.feed.feed_ns / 3600e9, rss_mb(), workers_pss_mb())
            self.samples.append(sample)
            if t >= next_print:
                next_print += 60.0
                load = os.getloadavg()[0]
                print(
                    f"  {t / 60:5.1f} min  feed {sample[1]:5.2f} h  RSS {sample[2]:6.1f} MB  "
                    f"workers PSS {sample[3]:6.1f} MB  "
                    f"frames {self.feed.frames:,}  load {load:.2f}",
                    flush=True,
                )
            self.stop.wait(self.every)


def plot(samples: list[tuple[float, float, float, float]], warmup_min: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] / 60 for s in samples]
    rss = [s[2] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    ax.plot(t, rss, lw=1.5, label="daemon RSS")
    if any(smp[3] for smp in samples):
        ax.plot(t, [smp[3] for smp in samples], lw=1.5, label="its worker processes, PSS")
    ax.axvline(warmup_min, color="grey", ls=":", label="end of warm-up")
    ax.axhline(RSS_GOAL_MB, color="red", ls="--", lw=1, label=f"goal {RSS_GOAL_MB:.0f} MB (daemon)")
    ax.set_xlabel("wall minutes (feed time runs 100x: 24 h in ~15 min)")
    ax.set_ylabel("memory (MB)")
    ax.set_ylim(0, max(RSS_GOAL_MB * 1.1, max(rss) * 1.1, max(smp[3] for smp in samples) * 1.1))
    top = ax.secondary_xaxis("top", functions=(lambda m: m, lambda m: m))
    top.set_xlabel("")
    ax.set_title("streamer soak: BTC + ETH, the default models, greeks, into mosquitto")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


async def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t_gen = time.perf_counter()
    path, n_rec, span = make_recording(work, args.minutes, args.seed)
    print(
        f"recording: {n_rec:,} frames, {span / 60e9:.1f} min of BTC + ETH feed "
        f"(simulated in {time.perf_counter() - t_gen:.0f} s): {path.name}",
        flush=True,
    )
    broker, port = start_mosquitto(work)
    sub = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SUBSCRIBER, str(port), stdout=asyncio.subprocess.PIPE
    )
    received = 0
    try:
        assert sub.stdout is not None
        await asyncio.wait_for(sub.stdout.readline(), 30)
        cfg = load_config(None)
        cfg = dataclasses.replace(
            cfg,
            instance="soak",
            feed=dataclasses.replace(cfg.feed, currencies=("BTC", "ETH")),
            publish=dataclasses.replace(cfg.publish, urls=(f"mqtt://127.0.0.1:{port}/soak",)),
        )
        feeds: list[LoopFeed] = []

        def factory(config: Any, parser: FrameParser, on_frame: Any) -> LoopFeed:
            feed = LoopFeed(
                path, parser=parser, on_frame=on_frame, span_ns=span, hours=args.hours,
                speed=args.speed,
            )  # fmt: skip
            feeds.append(feed)
            sampler.feed = feed
            return feed

        placeholder = LoopFeed(
            path, parser=DeribitParser(), on_frame=None, span_ns=span, hours=0, speed=1
        )  # until the service makes its feed
        sampler = Sampler(args.sample_s, placeholder)
        service = Service(cfg, feed_factory=factory)
        sampler.start()
        t0 = time.monotonic()
        code = await service.run(signals=False)
        wall = time.monotonic() - t0
        sampler.stop.set()
        sampler.join()

        received = await stop_subscriber(sub)
    finally:
        if sub.returncode is None:
            sub.kill()
            await sub.wait()
        broker.terminate()
        broker.wait(5)
    feed = feeds[0]
    p = service.pipeline
    rejected: dict[str, int] = {}
    for book in p.books:
        for reason, k in book.rejected.items():
            rejected[reason] = rejected.get(reason, 0) + k
    stats = [pub.stats() for pub in service.publishers if hasattr(pub, "stats")]
    return {
        "exit_code": code,
        "wall_s": wall,
        "hours": feed.feed_ns / 3600e9,
        "speed": feed.feed_ns / 1e9 / max(wall, 1e-9),
        "loops": feed.loops,
        "frames_sent": feed.frames,
        "frames_seen": service._frames_seen,
        "parser_frames": p.parser.frames,
        "parse_drops": dict(p.parser.drops),
        "book_rejected": rejected,
        "fits": dict(p.fits),
        "failed": dict(p.failed),
        "acked": sum(s.published for s in stats),
        "dropped": sum(s.dropped for s in stats),
        "superseded": sum(s.superseded for s in stats),
        "received": received,
        "behind_s": feed.behind_s,
        "samples": sampler.samples,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "load": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hours", type=float, default=24.0, help="feed time to play")
    ap.add_argument("--speed", type=float, default=100.0, help="times real time")
    ap.add_argument("--minutes", type=float, default=60.0, help="recording length (looped)")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--warmup-min", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "soak-rss.png")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    print(
        f"soak: {args.hours:g} h of BTC + ETH feed at {args.speed:g}x "
        f"(~{args.hours * 60 / args.speed:.0f} min); load average now "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="streamer-soak-") as tmp:
        r = asyncio.run(soak(args, Path(tmp)))
    samples = r["samples"]
    after = [s[2] for s in samples if s[0] >= args.warmup_min * 60]
    lo, hi = (min(after), max(after)) if after else (float("nan"), float("nan"))
    spread = (hi - lo) / lo if after else float("nan")
    expired = r["book_rejected"].get("expired", 0)
    other_rejects = {k: v for k, v in r["book_rejected"].items() if k != "expired"}
    valid_dropped = sum(r["parse_drops"].values()) + sum(other_rejects.values())
    valid_dropped += r["frames_sent"] - r["frames_seen"]
    print()
    print(f"played {r['hours']:.2f} h of feed in {r['wall_s'] / 60:.1f} min "
          f"({r['speed']:.0f}x; worst lag behind the pace {r['behind_s']:.1f} s), "
          f"{r['loops']} loops, exit code {r['exit_code']}")  # fmt: skip
    print(f"frames: sent {r['frames_sent']:,}, seen by the daemon {r['frames_seen']:,}, "
          f"parsed {r['parser_frames']:,}; parser drops {r['parse_drops'] or 0}; book refusals "
          f"{r['book_rejected'] or 0} (expired: quotes of the settled daily the loop keeps "
          f"sending: {expired:,})")  # fmt: skip
    print(f"valid frames dropped: {valid_dropped}")
    print(f"fits {r['fits']} (not accepted {r['failed']}); MQTT acknowledged {r['acked']:,}, "
          f"superseded {r['superseded']:,}, dropped {r['dropped']}, received by the "
          f"subscriber >= {r['received']:,}")  # fmt: skip
    print(f"RSS: start {samples[0][2]:.1f} MB, after warm-up ({args.warmup_min:g} min) "
          f"{lo:.1f}..{hi:.1f} MB (spread {spread * 100:.1f} %, goal <= {FLAT_GOAL * 100:.0f} %), "
          f"end {samples[-1][2]:.1f} MB, peak (ru_maxrss) {r['maxrss_mb']:.1f} MB "
          f"(goal <= {RSS_GOAL_MB:.0f} MB)")  # fmt: skip
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in r['load'])}")
    pss = [s[3] for s in samples if s[0] >= args.warmup_min * 60]
    if pss and max(pss) > 0:
        w_lo, w_hi = min(pss), max(pss)
        print(f"workers' PSS after warm-up {w_lo:.1f}..{w_hi:.1f} MB (spread "
              f"{(w_hi - w_lo) / w_lo * 100:.1f} %), end {samples[-1][3]:.1f} MB")  # fmt: skip
    print("per minute:", " ".join(f"{s[2]:.0f}" for s in samples if int(s[0]) % 60 < args.sample_s))
    print("workers' PSS per minute:",
          " ".join(f"{s[3]:.0f}" for s in samples if int(s[0]) % 60 < args.sample_s))  # fmt: skip
    plot(samples, args.warmup_min, args.out)
    print(f"curve: {args.out}")
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in r.items()}, default=str, indent=1))
    ok = spread <= FLAT_GOAL and hi <= RSS_GOAL_MB and valid_dropped == 0 and r["exit_code"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
