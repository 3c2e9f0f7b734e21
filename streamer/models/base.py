"""The model plug point: one small base class, one registry dict.

A model maps a parameter vector ``x`` to Black implied vols at points ``(k, T)`` where
``k = ln(K/F)`` is log-moneyness against the expiry's forward and ``T`` is in years.
*Per-expiry* models (SVI, SABR) are fitted slice by slice: ``x`` is one slice's parameters and
``n_slices == 1``. *Surface* models (SSVI, eSSVI, Heston, Bates) have one vector for all
slices; parameters that belong to a slice (SSVI's ATM total variance ``theta_t``) are looked up
through ``slice_idx``.

The calibrator (``streamer.calib``) only talks to this interface: it builds a ``FitData`` from
a book snapshot, asks the model for cold-start guesses and bounds, minimises weighted IV
residuals (plus the parameter-change penalty, scaled by ``scale``), and rejects any fit whose
``arbitrage`` report is not empty.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from streamer.pricing import black_price, full_shape

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# per-expiry models with a compiled scalar kernel (``streamer.calib.kernel`` dispatches on it)
KERNEL_NONE, KERNEL_SVI, KERNEL_SABR, KERNEL_ESSVI = -1, 0, 1, 2
KERNEL_SPLINE = 3


@dataclass(frozen=True)
class FitData:
    """What a model is fitted to: quotes of one underlying, grouped into expiry slices.

    Per quote: ``k`` (ln(K/F)), ``T`` (years), ``slice_idx`` (index into the slice arrays),
    ``iv`` (target: mid IV, a fraction), ``iv_bid``/``iv_ask`` (NaN where a side is empty),
    ``weight`` (1 / max(half-spread in IV, floor)), ``is_call``.
    Per slice: ``slice_T``, ``slice_forward``, ``slice_expiry`` (venue code, e.g. "27DEC24").
    """

    k: FloatArray
    T: FloatArray
    slice_idx: IntArray
    iv: FloatArray
    iv_bid: FloatArray
    iv_ask: FloatArray
    weight: FloatArray
    is_call: npt.NDArray[np.bool_]
    slice_T: FloatArray
    slice_forward: FloatArray
    slice_expiry: tuple[str, ...] = ()

    @property
    def n_slices(self) -> int:
        return int(self.slice_T.shape[0])

    @property
    def n_quotes(self) -> int:
        return int(self.k.shape[0])

    def slice(self, j: int) -> FitData:
        """The quotes of slice ``j`` alone, re-indexed as a one-slice ``FitData``."""
        m = self.slice_idx == j
        return FitData(
            k=self.k[m],
            T=self.T[m],
            slice_idx=np.zeros(int(m.sum()), dtype=np.int64),
            iv=self.iv[m],
            iv_bid=self.iv_bid[m],
            iv_ask=self.iv_ask[m],
            weight=self.weight[m],
            is_call=self.is_call[m],
            slice_T=self.slice_T[j : j + 1],
            slice_forward=self.slice_forward[j : j + 1],
            slice_expiry=self.slice_expiry[j : j + 1] if self.slice_expiry else (),
        )


@dataclass(frozen=True)
class Violation:
    """One static-arbitrage finding: which check, where (slice or -1), how bad."""

    check: str  # "butterfly", "calendar", "lee_wing", "ssvi_bound", "feller", ...
    slice: int
    amount: float
    detail: str = ""


@dataclass(frozen=True)
class ParamView:
    """Named parameters: surface-wide ones and one dict per slice."""

    surface: dict[str, float] = field(default_factory=dict)
    slices: list[dict[str, float]] = field(default_factory=list)


class Model(ABC):
    """A volatility model. Subclasses set ``name`` and ``per_expiry`` and implement the rest."""

    name: ClassVar[str]
    per_expiry: ClassVar[bool]
    # per-expiry models: which compiled row kernel fits them (KERNEL_NONE: the numpy path)
    kernel_kind: ClassVar[int] = KERNEL_NONE
    # per-expiry models with an exact two-slice calendar test for every k
    # (``calendar_shortfall``, ``calendar_grid``); otherwise the quoted range is checked
    exact_calendar: ClassVar[bool] = False
    # the parameters describe every maturity (Heston, Bates): ``implied_vol`` may be asked
    # at any T; otherwise a maturity between fitted expiries is interpolated between them
    any_maturity: ClassVar[bool] = False
    # how this model is best fitted when the config does not say: ``CalibConfig`` field
    # overrides (e.g. ``{"objective": "band", "penalty": 2.0}``) and, under ``"filters"``, a
    # dict of ``FilterConfig`` field overrides (e.g. ``{"min_T_days": 0.0833}``)
    calib_defaults: ClassVar[dict[str, object]] = {}

    @property
    def kernel_arg(self) -> float:
        """A fixed model constant the compiled kernel needs (SABR's ``beta``)."""
        return 0.0

    @classmethod
    def from_params(cls, surface_params: dict[str, float]) -> Model:
        """The model instance a published payload describes (e.g. SABR's fixed ``beta``)."""
        return cls()

    def bind_slices(self, slice_T: FloatArray) -> Model:
        """The model for evaluating a published surface's slices one at a time (their
        maturities ``slice_T``, increasing): piecewise models need their piece ends then
        (``heston-td``). Others are their own."""
        return self

    @abstractmethod
    def param_names(self, n_slices: int) -> tuple[str, ...]:
        """Names of the entries of ``x`` (slice parameters suffixed ``[j]``)."""

    @abstractmethod
    def bounds(self, n_slices: int) -> tuple[FloatArray, FloatArray]:
        """Lower and upper bounds of ``x`` (may be +-inf)."""

    @abstractmethod
    def implied_vol(
        self, x: FloatArray, k: FloatArray, T: FloatArray, slice_idx: IntArray
    ) -> FloatArray:
        """Model Black implied vols (fractions) at each ``(k, T)``."""

    def jacobian(
        self, x: FloatArray, k: FloatArray, T: FloatArray, slice_idx: IntArray
    ) -> FloatArray | None:
        """``d iv / d x`` of shape ``(n_points, len(x))``, or None (calibrator differences it)."""
        return None

    @abstractmethod
    def initial_guesses(self, data: FitData) -> list[FloatArray]:
        """Cold-start candidates (quasi-explicit or multi-start), best first."""

    @abstractmethod
    def arbitrage(self, x: FloatArray, slice_T: FloatArray) -> list[Violation]:
        """Static-arbitrage violations of ``x``; empty when the parameters are arbitrage-free."""

    def implied_vol_slices(self, X: FloatArray, slice_T: FloatArray) -> FloatArray:
        """Per-expiry models: the ATM (k = 0) vol of every slice row of ``X``."""
        zero = np.zeros(X.shape[0])
        X = np.asarray(X, dtype=np.float64)
        iv_rows = getattr(self, "iv_rows", None)
        if iv_rows is not None:
            return np.asarray(iv_rows(X, zero, np.asarray(slice_T, dtype=np.float64)))
        block = getattr(self, "block_jacobian", None)
        if block is not None:
            return np.asarray(block(X, zero, slice_T)[0])
        one = np.zeros(1, dtype=np.int64)
        return np.array(
            [
                float(self.implied_vol(X[j], zero[:1], slice_T[j : j + 1], one)[0])
                for j in range(len(X))
            ]
        )

    def arbitrage_slices(self, X: FloatArray, slice_T: FloatArray) -> list[list[Violation]]:
        """Per-expiry models: ``arbitrage`` of every slice row of ``X`` (override to batch)."""
        return [list(self.arbitrage(X[j], slice_T[j : j + 1])) for j in range(X.shape[0])]

    def calendar_shortfall(self, prev: FloatArray, cur: FloatArray) -> FloatArray:
        """``exact_calendar`` models: for parameter rows of the shorter (``prev``) and longer
        (``cur``) expiry, how far each pair is from being free of calendar arbitrage at
        *every* ``k`` (0 when it is)."""
        raise NotImplementedError(f"{self.name} has no exact calendar test")

    def calendar_grid(self, x_prev: FloatArray, n: int) -> FloatArray:
        """``exact_calendar`` models: ``n`` log-moneyness points on which the next slice's
        calendar hinge rows (against the slice ``x_prev``) cover every ``k``."""
        raise NotImplementedError(f"{self.name} has no whole-line calendar grid")

    def calendar_repair(self, x_prev: FloatArray, x: FloatArray) -> FloatArray:
        """``exact_calendar`` models: parameters near ``x`` that pass the exact test against
        ``x_prev`` (the gate's last resort before leaving the slice out)."""
        raise NotImplementedError(f"{self.name} has no calendar repair")

    def safe_bounds(
        self, x: FloatArray, lower: FloatArray, upper: FloatArray
    ) -> tuple[FloatArray, FloatArray] | None:
        """Bounds of a sub-region free of static arbitrage by construction, near ``x``.

        The calibrator re-fits inside it when a fit fails ``arbitrage``. None: no such region
        (the model is arbitrage-free everywhere inside ``bounds``, or there is none to offer).
        """
        return None

    @abstractmethod
    def scale(self, n_slices: int, slice_T: FloatArray | None = None) -> FloatArray:
        """Typical size of each parameter's move: the ``s`` of the change penalty.

        ``slice_T`` (years to each slice's expiry) lets a model scale by maturity.
        """

    # per-expiry models whose ``view`` overrides only the surface-wide entries: its slices are
    # the base class's (``dict(zip(param_names(1), x))``)
    plain_slice_view: ClassVar[bool] = False

    def slice_scales(self, slice_T: FloatArray) -> FloatArray:
        """Per-expiry models: ``(S, p)``, row ``j`` ``scale(1, slice_T[j : j + 1])`` (models
        whose scale is a plain function of T override it with one array expression)."""
        rows = [self.scale(1, slice_T[j : j + 1]) for j in range(len(slice_T))]
        return np.array(rows, dtype=np.float64).reshape(len(slice_T), -1)

    def view(self, x: FloatArray, n_slices: int) -> ParamView:
        """Named parameters for publishing.

        Convention (``from_view`` inverts it): a name ``p[j]`` in ``param_names`` is slice
        ``j``'s parameter ``p`` and goes to ``slices[j]["p"]``; other names are surface-wide.
        For per-expiry models ``x`` is one slice's vector and everything goes to ``slices[0]``.
        """
        names = self.param_names(n_slices)
        if self.per_expiry:
            values = np.asarray(x, dtype=np.float64).tolist()
            return ParamView(surface={}, slices=[dict(zip(names, values, strict=True))])
        surface: dict[str, float] = {}
        slices: list[dict[str, float]] = [{} for _ in range(n_slices)]
        for name, value in zip(names, np.asarray(x, dtype=np.float64).tolist(), strict=True):
            base, j = _split_name(name)
            if j is None:
                surface[name] = value
            else:
                slices[j][base] = value
        return ParamView(surface=surface, slices=slices)

    def from_view(self, view: ParamView, n_slices: int) -> FloatArray:
        """Inverse of ``view``: the parameter vector from named parameters."""
        out = []
        for name in self.param_names(n_slices):
            base, j = _split_name(name)
            if self.per_expiry:
                out.append(view.slices[0][name])
            elif j is None:
                out.append(view.surface[name])
            else:
                out.append(view.slices[j][base])
        return np.asarray(out, dtype=np.float64)

    def price(
        self,
        x: FloatArray,
        k: FloatArray,
        T: FloatArray,
        slice_idx: IntArray,
        is_call: npt.NDArray[np.bool_],
    ) -> FloatArray:
        """Undiscounted price per unit of forward (``F = 1``, ``K = e^k``) from the model IV.

        Models that price directly (Heston, Bates) override this.
        """
        iv = self.implied_vol(x, k, T, slice_idx)
        return np.asarray(black_price(1.0, np.exp(k), T, iv, is_call))


class RowModel(Model):
    """A per-expiry model evaluated with one parameter row per point (vectorised over slices).

    Subclasses give ``iv_rows``; ``implied_vol``, ``jacobian`` and ``block_jacobian`` (what
    the calibrator's block LM and no-arbitrage hinges call) follow, the Jacobian by central
    differences with steps kept inside the bounds. Models with an analytic Jacobian override
    ``block_jacobian``.
    """

    per_expiry = True
    fd_floor: ClassVar[float] = 1e-3  # the step is 1e-6 * max(|x|, fd_floor)

    @abstractmethod
    def iv_rows(self, rows: FloatArray, k: FloatArray, T: FloatArray) -> FloatArray:
        """Implied vols with parameter row ``rows[i]`` at point ``(k[i], T[i])``."""

    def implied_vol(
        self, x: FloatArray, k: FloatArray, T: FloatArray, slice_idx: IntArray
    ) -> FloatArray:
        k = np.asarray(k, dtype=np.float64)
        # the rows as one contiguous array and T at k's shape: what every iv_rows wants, and
        # cheaper to make than broadcast views (~5 us each: the tenors call this ~50 times a
        # surface on a few dozen points)
        rows = np.empty((k.shape[0], len(x)))
        rows[...] = np.asarray(x, dtype=np.float64)
        return self.iv_rows(rows, k, full_shape(T, k.shape, np.float64))

    def jacobian(
        self, x: FloatArray, k: FloatArray, T: FloatArray, slice_idx: IntArray
    ) -> FloatArray:
        k = np.asarray(k, dtype=np.float64)
        rows = np.tile(np.asarray(x, dtype=np.float64), (len(k), 1))
        return self.block_jacobian(rows, k, np.broadcast_to(T, k.shape))[1]

    def block_jacobian(
        self, rows: FloatArray, k: FloatArray, T: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """IVs and ``d iv / d x`` (central differences) with one parameter row per point."""
        lo, hi = self.bounds(1)
        iv = self.iv_rows(rows, k, T)
        jac = np.empty(rows.shape)
        for i in range(rows.shape[1]):
            h = 1e-6 * np.maximum(np.abs(rows[:, i]), self.fd_floor)
            up, dn = rows.copy(), rows.copy()
            up[:, i] = np.minimum(up[:, i] + h, hi[i])
            dn[:, i] = np.maximum(dn[:, i] - h, lo[i])
            jac[:, i] = (self.iv_rows(up, k, T) - self.iv_rows(dn, k, T)) / (up[:, i] - dn[:, i])
        return iv, jac


def _split_name(name: str) -> tuple[str, int | None]:
    """``"theta[3]"`` -> ``("theta", 3)``; ``"rho"`` -> ``("rho", None)``."""
    if name.endswith("]") and "[" in name:
        base, _, idx = name[:-1].partition("[")
        if idx.isdigit():
            return base, int(idx)
    return name, None


REGISTRY: dict[str, type[Model]] = {}


def register(cls: type[Model]) -> type[Model]:
    """Class decorator: add a model to ``REGISTRY`` under its ``name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"model {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls
