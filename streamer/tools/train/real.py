"""Real chains for the learned guess: the features of recorded Deribit chains and the
parameters of their best fit, to train beside the simulated chains.

A network trained on the model's own surfaces maps a real chain's smiles to a poor start: the
model is misspecified (crypto's short-dated smiles are steeper and more curved than Heston's
or Bates'), and on the shared BTC/ETH chains the simulated-only Heston network's guess started
at 10-45 times the optimum's cost, ``v0`` and ``theta`` about half the optimum's, ``xi``
at its bound. Here each recorded chain (``REAL_SOURCES``: Tardis hourly chains of three
days in 2024-2025, held out by date from the 2026 snapshots the success rates are measured
on) is prepared as the calibrator prepares it (``CalibConfig.for_model``), and its target is
the lowest-cost converged penalty-free LM run (the calibrator's LM, ``max_iter_cold``) from
the simulated-only network's guess, the model's rival jump regimes, its hand-made starts and
``RANDOM_STARTS`` points of the box (on several ETH snapshot chains only a random start found
Bates' best basin, rare crashes with ``kappa`` at its bound): the optimum the cold path must
reach. Deterministic: the same files, the same targets.

This is the fine-tuning on real-chain optima of the deep-calibration literature's practice
(Horvath, Muguruza and Tomas 2021 train on model surfaces only; Liu, Oosterlee and Bohte,
"A neural network-based framework for financial model calibration", J. Math. Industry 9
(2019) 9, calibrate on market data through the learned map).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamer.calib.data import prepare
from streamer.calib.evaluate import surface_evaluator
from streamer.calib.learned import Network, encode, features, learned_guess_from, output_names
from streamer.calib.lm import solve
from streamer.calib.options import CalibConfig
from streamer.models import REGISTRY
from streamer.models.base import FitData, FloatArray, Model
from streamer.paths import deribit_data
from streamer.tools.chains import load_chains

REAL_SOURCES = (
    "smiles/tardis-hourly-2024-05.csv",
    "smiles/tardis-hourly-2025-01.csv",
    "smiles/tardis-hourly-2025-09.csv",
)
UNDERLYINGS = ("BTC", "ETH")
# points of the box beside the model's own starts (basins none of them reach: Bates' rare
# crashes on ETH); none for Heston, whose guess reached the best of nine starts on every shared
# chain and whose random starts take up to 100 iterations each
RANDOM_STARTS = {"heston": 0, "bates": 8}
REAL_SEED = 16


@dataclass(frozen=True)
class RealSet:
    X: FloatArray
    Y: FloatArray
    tags: tuple[str, ...]  # "<file stem> <underlying> <ts_ms>" per row


def real_paths(root: Path | None = None) -> list[Path]:
    """The recorded chain files that exist (none without the shared data)."""
    base = root or deribit_data()
    return [base / rel for rel in REAL_SOURCES if (base / rel).exists()]


def box_points(lo: FloatArray, hi: FloatArray, n: int, rng: np.random.Generator) -> FloatArray:
    """``n`` points of the box: log-uniform where the lower bound is positive, else uniform."""
    pos = lo > 0.0
    llo = np.log(np.where(pos, lo, 1.0))
    lhi = np.log(np.where(pos, hi, 1.0))
    u = rng.uniform(size=(n, lo.shape[0]))
    out: FloatArray = np.where(pos, np.exp(llo + u * (lhi - llo)), lo + u * (hi - lo))
    return out


def chain_target(
    model: Model, data: FitData, net: Network, cfg: CalibConfig, rng: np.random.Generator
) -> tuple[FloatArray, FloatArray, FloatArray] | None:
    """A prepared chain's features, its target on the learned scales and the optimum's
    parameters: the lowest-cost converged LM run (``cfg``'s cold fit, penalty-free) from the
    network's guess, the model's rivals of it, its hand-made starts and ``RANDOM_STARTS``
    (per model) points of the box (None: fewer than 2 slices, no features, or no converged run)."""
    if data.n_slices < 2:
        return None
    try:
        f = features(data)
    except (ValueError, np.linalg.LinAlgError):
        return None
    if not np.all(np.isfinite(f)):
        return None
    g = learned_guess_from(model, f, data.slice_T, net)
    if g is None:
        return None
    lo, hi = model.bounds(data.n_slices)
    problem = cfg.problem(
        surface_evaluator(model, data), data, np.zeros(1, dtype=np.int64), lo[None, :], hi[None, :]
    )
    rivals = getattr(model, "learned_rivals", None)
    starts = [
        g,
        *([] if rivals is None else rivals(g)),
        *model.initial_guesses(data),
        *box_points(lo, hi, RANDOM_STARTS.get(model.name, 0), rng),
    ]
    secant = bool(getattr(model, "secant_lm", False))
    best_x, best_c = None, np.inf
    for x0 in starts:
        # a point of the box may price nothing (an infinite cost: inf - inf in the LM's tests)
        with np.errstate(invalid="ignore"):
            r = solve(
                problem, np.clip(x0, lo, hi)[None, :], max_iter=cfg.max_iter_cold, secant=secant
            )
        c = float(r.data_cost[0])
        if bool(r.converged[0]) and np.isfinite(c) and c < best_c:
            best_x, best_c = r.x[0].copy(), c
    if best_x is None:
        return None
    names = model.param_names(1)
    y = np.array([float(encode(n, np.array(v))) for n, v in zip(names, best_x, strict=True)])
    return f, y, best_x


def real_set(model_name: str, net: Network, paths: list[Path]) -> RealSet:
    """Features and best-fit targets (on the network's learned scales) of every chain of
    ``paths`` that ``model_name`` can fit (surface models without piecewise parameters)."""
    model = REGISTRY[model_name]()
    if output_names(model) != model.param_names(1):
        raise ValueError(f"{model_name}: real-chain targets only for constant-parameter models")
    cfg = CalibConfig.for_model(model)
    rng = np.random.default_rng(REAL_SEED)
    X, Y, tags = [], [], []
    for path in paths:
        for u in UNDERLYINGS:
            for snap in load_chains(path, u):
                data = prepare(snap, cfg.filters, 3).data
                found = chain_target(model, data, net, cfg, rng)
                if found is not None:
                    X.append(found[0])
                    Y.append(found[1])
                    tags.append(f"{path.stem} {u} {snap.ts_ms}")
    return RealSet(np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64), tuple(tags))
