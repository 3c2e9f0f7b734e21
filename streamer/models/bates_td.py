"""Bates with piecewise-constant parameters between expiries (``bates-td``, ``bates-tdl``).

``heston-td`` (``streamer.models.heston_td``: dynamics, chained characteristic function,
gradient, COS pricing, boundaries) plus lognormal price jumps as in Bates (1996),
``streamer.models.bates``::

    dF/F = sqrt(v) dW + (e^J - 1) dN - lam m dt,   J ~ N(mu_j, sigma_j^2),
    m = exp(mu_j + sigma_j^2 / 2) - 1,

with one jump intensity ``lam`` and jump law for the whole time line (independent of the
diffusion, so the characteristic function gains the factor
``exp(lam T [exp(i u mu_j - u^2 sigma_j^2 / 2) - 1 - i u m])`` whatever the pieces).
Parameters::

    x = [v0, kappa, theta[0], xi[0], rho[0], ..., theta[S-1], xi[S-1], rho[S-1],
         lam, mu_j, sigma_j]

``bates-tdl`` makes the intensity piecewise constant as well (``lam[j]`` per piece, after
``rho[j]``; ``mu_j, sigma_j`` shared): the jumps stay independent of the diffusion, so only
``L(T) = int_0^T lam dt = sum_i lam_i tau_i`` changes, ``lam T`` -> ``L(T)`` in the factor
above, with ``d/d lam_i = tau_i``. Crypto's short end (a daily's steep wings against a
quarterly's) wants more jump intensity than its long end.

For short expiries the density is a narrow diffusion peak plus a small, wide jump part: the
characteristic function is then split by the number of jumps, none (``e^{-L}`` of the mass,
on the narrow range) or some (on the wide range, where it decays fast), so that neither
series needs the other's resolution (``streamer.models.td_kernels.td_coefficients``).

Bounds: ``heston-td``'s and Bates's ``lam in [0, 5]``, ``mu_j in [-1, 1]``,
``sigma_j in [0.01, 1.5]`` (``lam[j]`` likewise); ``lam = 0`` is exactly ``heston-td``. No
static arbitrage by construction (prices of a martingale). QuantLib's ``BatesModel`` uses the
same jump parametrisation (``nu = mu_j``, ``delta = sigma_j``).

References:
    D. Bates, "Jumps and stochastic volatility: exchange rate processes implicit in Deutsche
    mark options", Review of Financial Studies 9 (1996) 69-107.
    A. Elices, arXiv:0708.2020 (2008) (the time-dependent characteristic function).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from streamer.models.base import FloatArray, register
from streamer.models.bates import BATES_LOWER, BATES_NAMES, BATES_SCALE, BATES_UPPER, JUMP_GUESSES
from streamer.models.heston_td import (
    PIECE_LOWER,
    PIECE_NAMES,
    PIECE_SCALE,
    PIECE_UPPER,
    _PiecewiseModel,
)


@register
class BatesTD(_PiecewiseModel):
    """``heston-td`` with compensated lognormal jumps (``lam, mu_j, sigma_j``)."""

    name: ClassVar[str] = "bates-td"
    jump_names: ClassVar[tuple[str, ...]] = BATES_NAMES[5:]
    jump_lower: ClassVar[FloatArray] = BATES_LOWER[5:]
    jump_upper: ClassVar[FloatArray] = BATES_UPPER[5:]
    jump_scale: ClassVar[FloatArray] = BATES_SCALE[5:]

    def _jump_guess(self) -> FloatArray:
        return np.asarray(JUMP_GUESSES[0], dtype=np.float64)


@register
class BatesTDL(_PiecewiseModel):
    """``bates-td`` with the jump intensity piecewise constant too (``lam[j]``)."""

    name: ClassVar[str] = "bates-tdl"
    piece_names: ClassVar[tuple[str, ...]] = (*PIECE_NAMES, "lam")
    piece_lower: ClassVar[FloatArray] = np.concatenate([PIECE_LOWER, BATES_LOWER[5:6]])
    piece_upper: ClassVar[FloatArray] = np.concatenate([PIECE_UPPER, BATES_UPPER[5:6]])
    piece_scale: ClassVar[FloatArray] = np.concatenate([PIECE_SCALE, BATES_SCALE[5:6]])
    jump_names: ClassVar[tuple[str, ...]] = BATES_NAMES[6:]
    jump_lower: ClassVar[FloatArray] = BATES_LOWER[6:]
    jump_upper: ClassVar[FloatArray] = BATES_UPPER[6:]
    jump_scale: ClassVar[FloatArray] = BATES_SCALE[6:]

    def _piece_extra(self, n_slices: int) -> FloatArray:
        return np.full((n_slices, 1), JUMP_GUESSES[0][0])

    def _jump_guess(self) -> FloatArray:
        return np.asarray(JUMP_GUESSES[0][1:], dtype=np.float64)
