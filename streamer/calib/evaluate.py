"""Model evaluations for the numpy LM: ``X -> (iv, d iv / d own block)`` for every quote.

Per-expiry models evaluate all slices at once, one parameter row per quote (``block_jacobian``
of ``RowModel``) or slice by slice; surface models are one block. Where a model gives no
Jacobian it is differenced forward, the step scaled to each parameter.
"""

from __future__ import annotations

import numpy as np

from streamer.calib.lm import Evaluate
from streamer.models.base import FitData, FloatArray, IntArray, Model


def slice_evaluator(model: Model, data: FitData) -> Evaluate:
    """``X (S, p) -> (iv, local jacobian)`` for a per-expiry model, all slices at once."""
    k, T, idx = data.k, data.T, data.slice_idx
    block = getattr(model, "block_jacobian", None)

    def evaluate(X: FloatArray) -> tuple[FloatArray, FloatArray]:
        if block is not None:
            iv, jac = block(X[idx], k, T)
            return np.asarray(iv), np.asarray(jac)
        iv = np.empty(len(k))
        jac = np.empty((len(k), X.shape[1]))
        for j in range(X.shape[0]):
            m = idx == j
            z = np.zeros(int(m.sum()), dtype=np.int64)
            iv[m] = model.implied_vol(X[j], k[m], T[m], z)
            jj = model.jacobian(X[j], k[m], T[m], z)
            jac[m] = jj if jj is not None else fd_jacobian(model, X[j], k[m], T[m], z, iv[m])
        return iv, jac

    return evaluate


def surface_evaluator(model: Model, data: FitData) -> Evaluate:
    """``X (1, P) -> (iv, jacobian)`` for a surface model (one block): the model's
    ``fit_iv_and_jacobian`` where it has one (one pass, at its fit tolerance), else
    ``implied_vol`` and ``jacobian`` (forward differences without one)."""
    k, T, idx = data.k, data.T, data.slice_idx
    one_pass = getattr(model, "fit_iv_and_jacobian", None)

    def evaluate(X: FloatArray) -> tuple[FloatArray, FloatArray]:
        x = X[0]
        if one_pass is not None:  # vols and Jacobian in one sweep, at the fit's tolerance
            iv, jac = one_pass(x, k, T)
            return np.asarray(iv, dtype=np.float64), np.asarray(jac, dtype=np.float64)
        iv = np.asarray(model.implied_vol(x, k, T, idx), dtype=np.float64)
        jac = model.jacobian(x, k, T, idx)
        if jac is None:
            jac = fd_jacobian(model, x, k, T, idx, iv)
        return iv, np.asarray(jac, dtype=np.float64)

    return evaluate


def coarse_evaluator(model: Model, data: FitData, flag: str = "coarse_cold") -> Evaluate | None:
    """``X (1, P) -> (iv, jacobian)`` at the model's coarse tolerance
    (``coarse_iv_and_jacobian``) for a model that asks for it by ``flag`` (``coarse_cold``:
    the first phase of each cold run; ``coarse_race``: a cold race run on coarse prices),
    else None."""
    coarse = getattr(model, "coarse_iv_and_jacobian", None)
    if coarse is None or not getattr(model, flag, False):
        return None
    k, T = data.k, data.T

    def evaluate(X: FloatArray) -> tuple[FloatArray, FloatArray]:
        iv, jac = coarse(X[0], k, T)
        return np.asarray(iv, dtype=np.float64), np.asarray(jac, dtype=np.float64)

    return evaluate


def fd_jacobian(
    model: Model, x: FloatArray, k: FloatArray, T: FloatArray, idx: IntArray, iv: FloatArray
) -> FloatArray:
    """Forward differences, step scaled to each parameter."""
    _, hi = model.bounds(int(idx.max()) + 1 if idx.size else 1)
    jac = np.empty((len(k), len(x)))
    for i in range(len(x)):
        h = 1e-6 * max(abs(float(x[i])), 1e-3)
        xp = x.copy()
        if xp[i] + h > hi[i]:
            h = -h
        xp[i] += h
        jac[:, i] = (model.implied_vol(xp, k, T, idx) - iv) / h
    return jac


def fitted_iv(model: Model, x: FloatArray, data: FitData) -> FloatArray:
    """Model IVs of every quote: ``x`` one row per slice (per-expiry) or ``(1, P)``."""
    if model.per_expiry:
        return np.asarray(slice_evaluator(model, data)(x)[0], dtype=np.float64)
    return np.asarray(model.implied_vol(x[0], data.k, data.T, data.slice_idx), dtype=np.float64)
