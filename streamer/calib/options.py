"""How a model is fitted (``CalibConfig``) and what a calibrator remembers between fits.

``History`` is the state one ``Calibrator`` carries from fit to fit: the last accepted fit
(the warm start and the prior of the change penalty), and the reference errors the regime
tests compare the next warm fit with. ``CalibConfig.problem`` builds the least-squares problem
of ``streamer.calib.lm`` with the configured objective, loss and penalty.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from streamer.calib.data import FilterConfig
from streamer.calib.global_opt import GlobalMethod, GlobalSettings
from streamer.calib.lm import Evaluate, LMProblem, Loss
from streamer.models.base import FitData, FloatArray, IntArray, Model
from streamer.settings import build

Geometry6 = tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]

if TYPE_CHECKING:
    from streamer.calib.result import FitResult

DEFAULT_PENALTY = 10.0
EXACT_CALENDAR_TOL = 1e-9  # relative: the exact tests' margin is (w_j - w_{j-1}) / w_{j-1}
# lambda per model, tuned on noisy re-quotes of one surface (tests/test_calib.py): the warm fit's
# parameter jitter falls well below 1/5 of the cold fit's while in_band stays within 2 points
DEFAULT_PENALTIES = {
    "svi": 1.0,
    "ssvi": 5.0,
    "ssvi-rho": 5.0,
    "essvi": 20.0,
    "sabr": 10.0,
    "heston": 20.0,
    "bates": 5.0,
    # piecewise models: cold fits of re-quotes jitter so much (ill-identified short pieces) that
    # any lambda >= 2 keeps the warm jitter below 1/50 of it; 5 leaves room to follow the market
    "heston-td": 5.0,
    "bates-td": 5.0,
    "bates-tdl": 5.0,
}
BAND_REF_DECAY = 0.01  # per fit
# the cold step's starts: the models' hand-made guesses, the learned guess (a shipped network;
# hand-made guesses for a model without one), or the global search (``streamer.calib.global_opt``)
ColdStart = Literal["guesses", "learned", "global"]


@dataclass(frozen=True)
class CalibConfig:
    """How one model is fitted (per model in the config's ``[models]`` table)."""

    objective: Literal["band", "mid"] = "mid"  # band: a dead zone inside the bid-ask band
    band_fraction: float = 0.9  # dead zone half-width, as a share of the half-spread
    kappa: float = 0.2  # pull to the mid inside the band
    loss: Loss = "soft_l1"
    f_scale: float = 1.0  # residuals are in half-spreads: beyond ~1 the loss turns robust
    penalty: float | None = None  # lambda of the change penalty (0 = off; None = per model)
    max_iter_warm: int = 15
    # the warm refit's stall rule (compiled per-expiry LM, ``streamer.calib.kernel``): a slice
    # stops when ``warm_stall_iters`` iterations bought less than ``warm_stall_rtol`` of its
    # cost. On a re-quote the last fit is already within a few hundredths of a half-spread of
    # the new optimum, and the band objective's kinks (quotes at the dead zone's edge) make
    # the Gauss-Newton model overshoot: the LM otherwise spends its 15 iterations on rejected
    # steps worth < 0.5 % of the cost. The cold fits keep the LM's own rule (10, 1e-4).
    warm_stall_iters: int = 3
    warm_stall_rtol: float = 1e-3
    max_iter_cold: int = 100
    regime_error_factor: float = 2.5
    regime_error_floor: float = 1.0  # weighted RMS (in half-spreads) below which all is fine
    regime_band_drop: float = 0.1  # or the warm fit's in-band share fell this much
    regime_forward_move: float = 0.03
    # the penalty assumes parameters drift like a random walk: over a gap of dt seconds since
    # the last accepted fit its weight is lambda * min(1, horizon / dt); gaps beyond
    # stale_gap_s (e.g. a reconnect after hours) also run a cold fit, as a regime shift
    penalty_horizon_s: float = 60.0
    stale_gap_s: float = 600.0
    cold_margin: float = 0.9
    # surface models: where penalty-free (cold, regime) fits start. "learned" falls back to the
    # global search when no start reaches a finite, converged fit or the best one's weighted
    # RMS error (in half-spreads) exceeds global_fallback_wrms. The default stays the
    # hand-made guesses until the learned path passes the whole suite (a learned Bates regime
    # fit of tests/test_calib's re-quotes ended on a calendar finding of the numerical gate)
    cold_start: ColdStart = "guesses"
    global_fallback_wrms: float = math.inf
    global_method: GlobalMethod = "de"
    global_popsize: int = 6  # members per search coordinate
    global_maxiter: int = 40  # generations
    global_tol: float = 1e-3
    global_seed: int = 0
    global_polish_iter: int = 200  # LM iterations from the search's best point
    calendar_tol: float = 1e-6  # total variance may fall by at most this (rounding)
    # a slice whose constrained re-fit (the gate's scipy repair, ~50-100 ms) failed is not
    # re-fitted again for this long: it is left out (or keeps its last accepted parameters),
    # as it was, instead of costing every warm refit the same failing repair
    repair_retry_s: float = 5.0
    constraints_in_fit: bool = True  # no-arbitrage hinge rows inside the LM (per-expiry)
    filters: FilterConfig = field(default_factory=FilterConfig)

    @classmethod
    def for_model(
        cls,
        model: Model | type[Model],
        overrides: Mapping[str, Any] | None = None,
        where: str = "models.calib",
    ) -> CalibConfig:
        """The config of ``model``: the user's ``overrides`` (CalibConfig fields, and under
        ``"filters"`` FilterConfig fields: what the config file sets for it), else the model's
        ``calib_defaults``, else the defaults here, field by field. A bad field name or value
        is a ``ConfigError`` under ``{where}.{model name}.{field}``."""
        table = _merged(model.calib_defaults, overrides or {})
        return build(cls, table, f"{where}.{model.name}")

    @property
    def warm_stall(self) -> tuple[int, float]:
        """``(warm_stall_iters, warm_stall_rtol)``."""
        return self.warm_stall_iters, self.warm_stall_rtol

    @property
    def global_settings(self) -> GlobalSettings:
        return GlobalSettings(
            self.global_method,
            self.global_popsize,
            self.global_maxiter,
            self.global_tol,
            self.global_seed,
        )

    def band(self, data: FitData) -> FloatArray | None:
        """The dead zone's half-width per quote (``objective = "band"``), else None."""
        if self.objective != "band":
            return None
        return self.band_fraction * 0.5 * (data.iv_ask - data.iv_bid)

    def problem(
        self,
        evaluate: Evaluate,
        data: FitData,
        starts: IntArray,
        lower: FloatArray,
        upper: FloatArray,
        prior: FloatArray | None = None,
        pen_w: FloatArray | None = None,
        extra: Callable[[FloatArray], tuple[FloatArray, FloatArray]] | None = None,
    ) -> LMProblem:
        """The least-squares problem of ``data`` under this objective."""
        return LMProblem(
            evaluate,
            data.iv,
            data.weight,
            starts,
            lower,
            upper,
            prior=prior,
            penalty_weight=pen_w,
            loss=self.loss,
            f_scale=self.f_scale,
            band=self.band(data),
            kappa=self.kappa,
            extra=extra,
        )


def _merged(defaults: Mapping[str, Any], user: Mapping[str, Any]) -> dict[str, Any]:
    """``user`` over ``defaults``, the ``filters`` sub-table merged field by field too."""
    out = {**defaults, **user}
    filters = {**dict(defaults.get("filters") or {}), **dict(user.get("filters") or {})}
    if filters:
        out["filters"] = filters
    else:
        out.pop("filters", None)
    return out


@dataclass
class History:
    """What a calibrator remembers between fits.

    ``prev_wrms``: the weighted RMS error of the last accepted fit per slice (per-expiry
    models) or under ``""`` (surface models); ``prev_band``: the in-band reference under ``""``.
    """

    penalty: float
    config: CalibConfig
    last_good: FitResult | None = None
    prev_wrms: dict[str, float] = field(default_factory=dict)
    prev_band: dict[str, float] = field(default_factory=dict)
    # the compiled LM's per-slice hinge geometry (the spline: ``kernel.geometry_cache``),
    # reused while a slice's knot map stays the same
    geometry: Geometry6 | None = None
    # per expiry: venue ms of the fit whose gate repair of that slice failed (``SliceGate``;
    # an expiry no longer fitted is forgotten)
    repair_failed: dict[str, int] = field(default_factory=dict)

    def penalty_now(self, ts_ms: int) -> float:
        """Lambda for a fit at ``ts_ms``: full within the horizon, fading beyond it."""
        last = self.last_good
        if last is None:
            return self.penalty
        dt = max((ts_ms - last.ts_ms) / 1000.0, 0.0)
        horizon = self.config.penalty_horizon_s
        return self.penalty * (1.0 if dt <= horizon else horizon / dt)

    def gap_shift(self, ts_ms: int) -> bool:
        """Is the last accepted fit so old that this one counts as a regime shift?"""
        last = self.last_good
        return last is not None and (ts_ms - last.ts_ms) / 1000.0 > self.config.stale_gap_s

    def slipped(self, band: float) -> bool:
        """Has the in-band share fallen below the reference by ``regime_band_drop``?"""
        return band < self.prev_band.get("", -1.0) - self.config.regime_band_drop

    def jumped(self, key: str, wrms: float) -> bool:
        """Has the weighted RMS error of ``key`` jumped beyond the regime threshold?"""
        cfg = self.config
        return wrms > cfg.regime_error_floor and wrms > cfg.regime_error_factor * (
            self.prev_wrms.get(key, math.inf)
        )

    def update_band(self, band: float) -> None:
        """The in-band reference a warm fit is compared with: a running peak that decays by
        ``BAND_REF_DECAY`` per fit, so a slow slide (a fit lagging a trending market) is
        caught as surely as a sudden drop."""
        ref = self.prev_band.get("")
        self.prev_band[""] = band if ref is None else max(band, ref - BAND_REF_DECAY)
