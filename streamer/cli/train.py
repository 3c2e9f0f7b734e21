"""``streamer train``: train the learned initial guess's networks (``streamer.tools.train``).

Writes ``<out>/<model>.npz``; the package ships the result of the defaults
(``streamer train``, seed 16) in ``streamer/calib/nets``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``train`` on an argparse subparsers object."""
    from streamer.tools.train_defaults import DEFAULT_SAMPLES, DEFAULT_SEED, MODELS

    p: argparse.ArgumentParser = sub.add_parser(
        "train",
        help="train the networks of the learned cold-start guess (offline, CPU, minutes)",
        description=(
            "Draw parameter sets over each model's bounds, price Deribit-like chains with the "
            "numba pricer, reduce them to smile features and fit a small MLP per model; "
            "same seed and options: the same weights."
        ),
    )
    p.add_argument("--model", action="append", choices=MODELS, help="(default: all)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="chains per model")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--out", metavar="DIR", help="(default: the package's streamer/calib/nets)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from streamer.calib.learned import NETS
    from streamer.tools.train import run
    from streamer.tools.train.mlp import TrainSettings
    from streamer.tools.train_defaults import MODELS

    models = tuple(args.model or MODELS)
    out = Path(args.out) if args.out else NETS
    print("| model | chains | weights | file kB | data s | train s | valid mse | guess error |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for i, name in enumerate(models):
        settings = TrainSettings(epochs=args.epochs, seed=args.seed + i)
        (t,) = run((name,), args.samples, args.seed, settings, out)
        errors = ", ".join(f"{k} {v:.3g}" for k, v in t.guess_error.items())
        print(
            f"| {t.model} | {t.samples} | {t.n_weights} | {t.file_bytes / 1e3:.1f} | "
            f"{t.data_s:.0f} | {t.train_s:.0f} | {t.report.valid_mse:.3f} | {errors} |",
            flush=True,
        )
    return 0
