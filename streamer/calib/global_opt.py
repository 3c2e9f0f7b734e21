r"""Global stochastic search for cold and regime fits, then Levenberg-Marquardt polish.

The local fit (``streamer.calib.lm``) ends in the basin it starts in; the valleys of Heston-type
models are flat and ill-conditioned and, with jumps, several (on the 2026-01-05 BTC chain the
hand-made Bates starts end at a cost 16% above the crash-jump optimum that this search finds).
This module searches the whole box and hands the best point to the LM.

Objective: the LM's penalty-free data cost (the same function: ``lm._shape`` and ``lm._rho``)

    C(x) = 1/2 f^2 sum_i rho((w_i s(iv_i(x) - target_i) / f)^2),

for a whole population at once: the model's ``population_iv`` prices every member in one
compiled call (``streamer.models.heston.population_ivs``,
``streamer.models.td_kernels.td_population_ivs``; a loop over ``implied_vol`` otherwise). A
non-finite cost (a vol with no digits at a quoted point, a series that does not converge) is
``BAD_COST``: the search steps around it, where a local fit from there cannot start.

Search space: the unit cube, mapped to each parameter's box on a log scale where ``lo > 0``
and ``hi / lo >= 10`` (variances, ``kappa``, ``xi``, ``sigma_j``) and linearly otherwise.
Piecewise models (``heston-td``, ``bates-td``, ``bates-tdl``) are searched with their pieces
tied (``theta[j] = theta`` for every ``j``, likewise ``xi``, ``rho``, ``lam``): the
constant-parameter model in 5-8 dimensions instead of ``2 + 3 S + 3``, whose optimum the LM
then polishes in the full space (the pieces split along the term structure there).

Methods:

- ``de``: differential evolution (Storn and Price 1997), scipy's ``differential_evolution``
  with ``vectorized=True`` and deferred updating (one population per call), a Latin-hypercube
  start whose first members are the seeds (the warm result, the learned or hand-made
  guesses), scipy's own polish off;
- ``cmaes``: CMA-ES (Hansen 2016) from the ``cma`` package (the optional extra ``global``),
  ask/tell in the unit cube, its mean started at the best seed.

References:
    R. Storn, K. Price, "Differential evolution - a simple and efficient heuristic for global
    optimization over continuous spaces", J. Global Optimization 11 (1997) 341-359.
    N. Hansen, "The CMA evolution strategy: a tutorial", arXiv:1604.00772 (2016).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from streamer.calib.lm import LMProblem, _rho, _shape
from streamer.models.base import FitData, FloatArray, IntArray, Model

GlobalMethod = Literal["de", "cmaes"]
BAD_COST = 1e12  # cost of a member with a non-finite vol at a quoted point
LOG_RATIO = 10.0  # parameters whose box spans this factor or more are searched in log
CMA_SIGMA0 = 0.3  # CMA-ES initial step, in the unit cube


@dataclass(frozen=True)
class SearchSpace:
    """The unit cube of a global search and its map to a model's parameter vector.

    ``group[i]``: the search coordinate of parameter ``i`` (the pieces of a piecewise model
    share one); ``lo, hi, log``: per search coordinate.
    """

    group: IntArray
    lo: FloatArray
    hi: FloatArray
    log: npt.NDArray[np.bool_]

    @property
    def dim(self) -> int:
        return int(self.lo.shape[0])

    def to_params(self, U: FloatArray) -> FloatArray:
        """Unit-cube points ``(n, dim)`` -> parameter vectors ``(n, P)``."""
        u = np.clip(U, 0.0, 1.0)
        lin = self.lo + u * (self.hi - self.lo)
        with np.errstate(divide="ignore"):
            logv = self.lo * np.power(np.where(self.log, self.hi / self.lo, 1.0), u)
        z = np.where(self.log, logv, lin)
        return np.ascontiguousarray(z[:, self.group])

    def to_unit(self, x: FloatArray) -> FloatArray:
        """A parameter vector -> its unit-cube point (tied pieces averaged, log-averaged
        where searched in log)."""
        xx = np.clip(np.asarray(x, dtype=np.float64), self.lo[self.group], self.hi[self.group])
        logged = self.log[self.group]
        vals = np.where(logged, np.log(np.maximum(xx, 1e-300)), xx)
        count = np.bincount(self.group, minlength=self.dim)
        mean = np.bincount(self.group, weights=vals, minlength=self.dim) / np.maximum(count, 1)
        lo_t = np.where(self.log, np.log(np.maximum(self.lo, 1e-300)), self.lo)
        hi_t = np.where(self.log, np.log(np.maximum(self.hi, 1e-300)), self.hi)
        u = (mean - lo_t) / np.where(hi_t > lo_t, hi_t - lo_t, 1.0)
        return np.asarray(np.clip(u, 0.0, 1.0))


def search_space(model: Model, n_slices: int) -> SearchSpace:
    """The model's box as a search space; ``name[j]`` parameters tied across ``j``."""
    names = model.param_names(n_slices)
    lo, hi = model.bounds(n_slices)
    bases: dict[str, int] = {}
    group = np.empty(len(names), dtype=np.int64)
    first: list[int] = []
    for i, name in enumerate(names):
        base = name.split("[", 1)[0]
        if base not in bases:
            bases[base] = len(bases)
            first.append(i)
        group[i] = bases[base]
    glo = np.asarray(lo[first], dtype=np.float64)
    ghi = np.asarray(hi[first], dtype=np.float64)
    log = (glo > 0.0) & (ghi >= LOG_RATIO * np.where(glo > 0.0, glo, 1.0))
    return SearchSpace(group=group, lo=glo, hi=ghi, log=log)


def population_cost(problem: LMProblem, iv: FloatArray) -> FloatArray:
    """The LM's data cost of each row of model vols ``iv`` ``(n_pop, n)`` (one block);
    ``BAD_COST`` where it is not finite."""
    f2 = problem.f_scale * problem.f_scale
    r = problem.weight * _shape(iv - problem.target, problem)[0]
    with np.errstate(invalid="ignore", over="ignore"):
        rho, _ = _rho(r * r / f2, problem.loss)
        cost = 0.5 * f2 * np.sum(rho, axis=1)
    return np.where(np.isfinite(cost), cost, BAD_COST)


def population_evaluator(model: Model, data: FitData) -> Callable[[FloatArray], FloatArray]:
    """``X (n_pop, P) -> iv (n_pop, n)`` at the quotes of ``data``: the model's compiled
    ``population_iv`` where it has one, else ``implied_vol`` row by row."""
    k, T, idx = data.k, data.T, data.slice_idx
    batch = getattr(model, "population_iv", None)

    def evaluate(X: FloatArray) -> FloatArray:
        if batch is not None:
            return np.asarray(batch(X, k, T, idx), dtype=np.float64)
        return np.stack([np.asarray(model.implied_vol(x, k, T, idx)) for x in X])

    return evaluate


@dataclass(frozen=True)
class GlobalResult:
    """The best point of a global search (before the LM polish)."""

    x: FloatArray
    cost: float
    nfev: int  # members evaluated
    generations: int
    method: str


@dataclass(frozen=True)
class GlobalSettings:
    """Budget of one search: ``popsize`` members per search coordinate (scipy's meaning; at
    least 8 members), ``maxiter`` generations, relative ``tol`` on the population's spread of
    cost, ``seed`` of the random generator (a fit is reproducible)."""

    method: GlobalMethod = "de"
    popsize: int = 6
    maxiter: int = 40
    tol: float = 1e-3
    seed: int = 0


def global_search(
    model: Model,
    data: FitData,
    problem: LMProblem,
    settings: GlobalSettings,
    seeds: Sequence[FloatArray] = (),
) -> GlobalResult:
    """The best point the search finds for ``problem`` (penalty-free) over the model's box;
    ``seeds`` (parameter vectors) join the first population."""
    space = search_space(model, data.n_slices)
    evaluate = population_evaluator(model, data)
    counter = [0, 0]

    def cost(U: FloatArray) -> FloatArray:
        counter[0] += U.shape[0]
        counter[1] += 1
        return population_cost(problem, evaluate(space.to_params(U)))

    units = [space.to_unit(s) for s in seeds if np.all(np.isfinite(s))]
    if settings.method == "cmaes":
        u_best, c_best = _cmaes(cost, space.dim, units, settings)
    else:
        u_best, c_best = _de(cost, space.dim, units, settings)
    x = space.to_params(u_best[None, :])[0]
    return GlobalResult(x, c_best, counter[0], counter[1], settings.method)


def _de(
    cost: Callable[[FloatArray], FloatArray],
    dim: int,
    seeds: list[FloatArray],
    s: GlobalSettings,
) -> tuple[FloatArray, float]:
    from scipy.optimize import differential_evolution
    from scipy.stats import qmc

    n_pop = max(8, s.popsize * dim)
    init = qmc.LatinHypercube(d=dim, seed=s.seed).random(n_pop)
    for i, u in enumerate(seeds[:n_pop]):
        init[i] = u
    res = differential_evolution(
        lambda U: cost(np.ascontiguousarray(np.atleast_2d(U.T))),
        [(0.0, 1.0)] * dim,
        vectorized=True,
        updating="deferred",
        init=init,
        maxiter=s.maxiter,
        tol=s.tol,
        polish=False,
        seed=s.seed,
    )
    return np.asarray(res.x, dtype=np.float64), float(res.fun)


def _cmaes(
    cost: Callable[[FloatArray], FloatArray],
    dim: int,
    seeds: list[FloatArray],
    s: GlobalSettings,
) -> tuple[FloatArray, float]:
    try:
        import cma
    except ImportError as exc:  # an optional extra
        raise ValueError("global_method 'cmaes' needs the cma package (extra 'global')") from exc
    if seeds:
        first = cost(np.asarray(seeds))
        u0 = seeds[int(np.argmin(first))]
    else:
        u0 = np.full(dim, 0.5)
    n_pop = max(8, s.popsize * dim // 2)
    es = cma.CMAEvolutionStrategy(
        np.clip(u0, 0.01, 0.99).tolist(),
        CMA_SIGMA0,
        {
            "bounds": [0.0, 1.0],
            "popsize": n_pop,
            "seed": s.seed + 1,  # cma: 0 means a random seed
            "maxiter": s.maxiter,
            "tolfun": s.tol,
            "verbose": -9,
        },
    )
    best_u, best_c = u0, math.inf
    while not es.stop():
        U = np.asarray(es.ask(), dtype=np.float64)
        c = cost(U)
        i = int(np.argmin(c))
        if c[i] < best_c:
            best_u, best_c = U[i].copy(), float(c[i])
        es.tell(list(U), c.tolist())
    return np.asarray(best_u, dtype=np.float64), best_c
