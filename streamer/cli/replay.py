"""``streamer replay FILE...``: recorded feeds through the live code path (DESIGN section 4).

Inputs: recordings (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``), cryptofeed captures, and
Tardis ``options_chain`` CSV(.gz) files; the work is ``streamer.daemon.replay.replay``: frames
go parse -> book -> trigger -> calibrate -> publish, fitting inline whenever the trigger says
so (the clock is the recording's receive time, so every run makes the same fits), as fast as
possible or paced with ``--speed X``. ``--model none`` runs parse + book only.

Messages go to every ``--publish URL`` (``mqtt://``, ``mqtts://``, ``jsonl:PATH``,
``jsonl:-``) and to ``--out FILE`` (short for ``--publish jsonl:FILE``); with neither, to the
config's ``publish.urls`` (the default config: stdout). A progress bar (on a terminal) and the
summary table go to stderr.

``--jobs N`` replays each FILE on its own (fresh books and fits, exactly what ``streamer
replay FILE`` alone does), N files at a time in worker processes, and writes their messages
file after file in the order given (``streamer.daemon.replay.replay_jobs``): the output of
the one-by-one replays, concatenated. Without it, all FILEs are one replay in a row (a
recorder's rotated files continue each other), whose tenors and greeks are built by
``--derived-jobs N`` worker processes while it fits on (``streamer.daemon.derived_pool``: the
same messages, in the same order; default one per core once the replay has made
``START_AFTER`` surfaces).

Passwords never go on the command line (``ps`` shows it to every user): a ``--publish`` URL
with one is refused. Give it as ``STREAMER_MQTT_PASSWORD``, in a file named by
``STREAMER_MQTT_PASSWORD_FILE``, as the systemd credential ``mqtt_password``, or in a URL in
the ``--config`` file. Exit codes: 0 done, every message delivered; 1 a broker refused us
(credentials, ACL, TLS) or messages were not delivered; 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from streamer.config import load_config
from streamer.errors import PublishError, StreamerError

EXIT_FAILURE = 1
EXIT_USAGE = 2


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``replay`` on an argparse subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "replay",
        help="replay recorded feeds through parse, book, calibration and publishing",
        description=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="recordings or Tardis CSV files")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="M",
        help="model to fit (repeatable; 'none' = parse + book only; default: the config's)",
    )
    p.add_argument(
        "--publish",
        action="append",
        default=[],
        metavar="URL",
        help="mqtt://[user@]host:port[/prefix], mqtts://..., jsonl:PATH, jsonl:- (stdout); "
        "passwords: STREAMER_MQTT_PASSWORD(_FILE), the systemd credential mqtt_password, or "
        "a URL in --config, never here",
    )
    p.add_argument("--out", metavar="OUT.jsonl", help="short for --publish jsonl:OUT.jsonl")
    p.add_argument(
        "--speed", type=float, default=None, metavar="X", help="pace at X times real time"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="replay each FILE on its own (fresh books and fits, as if given alone), N files "
        "at a time in worker processes; messages come out file after file in the order "
        "given, each file's in its own order (default: one replay of all FILEs in a row)",
    )
    p.add_argument(
        "--derived-jobs",
        type=int,
        default=None,
        metavar="N",
        help="worker processes building the tenors and greeks of a replay with models while "
        "it fits on (the same messages in the same order; default: one per core once the "
        "replay is long enough, none on one core; 0: inline)",
    )
    p.add_argument("--config", metavar="C", help="TOML config (default: built-in defaults)")
    p.add_argument("--no-greeks", action="store_true", help="publish surfaces only")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Run the command: 0 on success, 1 on a delivery failure, 2 on bad arguments or config."""
    from streamer.daemon import logs
    from streamer.daemon.replay import ReplayJobError, replay, replay_jobs
    from streamer.publish.urls import argv_password_error

    for url in args.publish:
        refusal = argv_password_error("--publish", url)
        if refusal is not None:
            print(f"streamer replay: {refusal}", file=sys.stderr)
            return EXIT_USAGE
    try:
        config = load_config(args.config)
    except StreamerError as exc:
        print(f"streamer replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(config.log.level, config.log.format)
    for f in args.files:
        if not Path(f).is_file():
            print(f"streamer replay: no such file: {f}", file=sys.stderr)
            return EXIT_USAGE
    if args.speed is not None and not args.speed > 0:
        print("streamer replay: --speed must be positive", file=sys.stderr)
        return EXIT_USAGE
    if args.jobs is not None and (args.jobs < 1 or args.speed is not None):
        print("streamer replay: --jobs needs N >= 1 and no --speed", file=sys.stderr)
        return EXIT_USAGE
    if args.derived_jobs is not None and args.derived_jobs < 0:
        print("streamer replay: --derived-jobs needs N >= 0", file=sys.stderr)
        return EXIT_USAGE
    models = list(config.models.names) if args.model is None else list(args.model)
    if "none" in models:
        models = []
    urls = list(args.publish) + ([f"jsonl:{args.out}"] if args.out else [])
    if not urls:
        urls = list(config.publish.urls)
    try:
        work = (
            replay(
                args.files,
                config,
                models=models,
                urls=urls,
                greeks=not args.no_greeks,
                speed=args.speed,
                progress=not args.quiet and sys.stderr.isatty(),
                derived_workers=args.derived_jobs,
            )
            if args.jobs is None
            else replay_jobs(
                args.files,
                config,
                jobs=args.jobs,
                models=models,
                urls=urls,
                greeks=not args.no_greeks,
            )
        )
        summary = asyncio.run(work)
    except ReplayJobError as exc:
        print(f"streamer replay: {exc}", file=sys.stderr)
        return exc.exit_code
    except PublishError as exc:
        print(f"streamer replay: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except StreamerError as exc:
        print(f"streamer replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.quiet:
        print(summary, file=sys.stderr)
    return 0
