"""``streamer train``: the learned initial guess's networks, trained offline from a seed.

``data`` draws and prices the training chains, ``real`` the recorded chains' optima (the
constant-parameter models are fine-tuned on them beside the simulated chains where the shared
data exists), ``mlp`` fits the network; ``run`` does this per model and writes
``<out>/<model>.npz`` (``streamer.calib.learned`` loads them from the
package's ``streamer/calib/nets``). Same seed and settings: the same weights (one
``numpy.random.Generator`` per step, no threads).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamer.calib.learned import NETS, Network, learned_guess_from, output_names
from streamer.models import REGISTRY
from streamer.tools.train.data import make_set
from streamer.tools.train.mlp import TrainReport, TrainSettings, train
from streamer.tools.train.real import real_paths, real_set
from streamer.tools.train_defaults import (
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    MODELS,
    REAL_MODELS,
    REAL_REPEAT,
)

SOURCES = (
    "calib/learned.py",
    "tools/train/__init__.py",
    "tools/train/data.py",
    "tools/train/mlp.py",
    "tools/train/real.py",
    "tools/train_defaults.py",
    "models/heston.py",  # the hand-made starts of the real chains' optima
    "models/bates.py",  # ... and the rival jump regimes
)


def source_digest() -> str:
    """SHA-256 (first 16 hex digits) of the code that draws, prices and trains: stored with
    the weights, so a file names the script that made it."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for rel in SOURCES:
        h.update(rel.encode())
        h.update((root / rel).read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Trained:
    model: str
    samples: int
    n_weights: int
    file_bytes: int
    data_s: float
    train_s: float
    report: TrainReport
    guess_error: dict[str, float]  # median |guess - truth| per surface parameter (held out)


def guess_errors(model_name: str, net: Network, n: int, seed: int) -> dict[str, float]:
    """Median absolute error of the network's guess on fresh chains (another seed)."""
    model = REGISTRY[model_name]()
    X, _, truth = make_set(model_name, n, seed)
    names = model.param_names(1)
    errs: dict[str, list[float]] = {}
    for f, (x, slice_T) in zip(X, truth, strict=True):
        g = learned_guess_from(model, f, slice_T, net)
        if g is None:
            continue
        for name, gv, tv in zip(model.param_names(slice_T.shape[0]), g, x, strict=True):
            base = name.split("[", 1)[0]
            if name in names or name.endswith("]"):
                errs.setdefault(base, []).append(abs(float(gv) - float(tv)))
    return {k: float(np.median(v)) for k, v in errs.items()}


def run(
    models: tuple[str, ...] = MODELS,
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
    settings: TrainSettings | None = None,
    out: Path = NETS,
) -> list[Trained]:
    """Train and save one network per model; what was done, per model."""
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for i, name in enumerate(models):
        s = settings or TrainSettings(seed=seed + i)
        t0 = time.perf_counter()
        X, Y, _ = make_set(name, samples, seed + 100 * i)
        t1 = time.perf_counter()
        outputs = output_names(REGISTRY[name]())
        net, report = train(X, Y, outputs, s)
        paths = real_paths() if name in REAL_MODELS else []
        n_real = 0
        if paths:
            # the simulated-only network's guesses start the search for each real optimum
            real = real_set(name, net, paths)
            n_real = len(real.tags)
            X = np.concatenate([X, np.repeat(real.X, REAL_REPEAT, axis=0)])
            Y = np.concatenate([Y, np.repeat(real.Y, REAL_REPEAT, axis=0)])
            net, report = train(X, Y, outputs, s)
        t2 = time.perf_counter()
        path = out / f"{name}.npz"
        net.save(
            path,
            seed=seed,
            samples=samples,
            epochs=s.epochs,
            hidden=np.array(s.hidden),
            script="streamer train (streamer.tools.train.run)",
            data_seed=seed + 100 * i,
            train_seed=s.seed,
            source_sha256=source_digest(),
            real_chains=n_real,
            real_sources=np.array([p.name for p in paths] or [""]),
            real_repeat=REAL_REPEAT if n_real else 0,
        )
        errors = guess_errors(name, net, max(200, samples // 20), seed + 100 * i + 50)
        done.append(
            Trained(
                name, samples, net.n_weights, path.stat().st_size, t1 - t0, t2 - t1, report, errors
            )
        )
    return done
