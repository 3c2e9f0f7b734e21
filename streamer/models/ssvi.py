r"""SSVI and SSVI with rho(theta) (``ssvi-rho``): whole-surface SVI (Gatheral & Jacquier
2014; Hendriks & Martini 2019).

Total implied variance at log-moneyness ``k`` on the slice with ATM total variance
``theta_t``::

    w(k, theta) = theta/2 * (1 + rho phi k + sqrt((phi k + rho)^2 + 1 - rho^2)),
    phi(theta) = eta / (theta^gamma (1 + theta)^(1 - gamma))          (power law)

``ssvi``: one ``rho``; ``ssvi-rho``: ``rho`` depends on ``theta`` through two parameters,
``rho(theta) = rho0 + (rho1 - rho0) (1 - exp(-theta / THETA_RHO))``: short maturities see
``rho0``, long ones ``rho1`` (the per-slice eSSVI of Hendriks & Martini 2019 / Mingone 2022,
with a free ``rho`` and ``psi`` per expiry, is ``streamer.models.essvi``).

No static arbitrage, kept by construction through the parametrisation:

* butterfly: Gatheral & Jacquier (2014), Remark 4.4 / Corollary 4.1: the power law with
  ``0 <= gamma <= 1/2`` and ``eta (1 + |rho|) <= 2`` satisfies ``theta phi (1+|rho|) < 4``
  and ``theta phi^2 (1+|rho|) <= 4`` for every theta. We fit ``z`` in [0, 1] and set
  ``eta = 2 z / (1 + rho_max)`` with ``rho_max`` = max |rho| (ssvi-rho: max(|rho0|, |rho1|),
  which bounds |rho(theta)| since rho(theta) lies between them);
* calendar: ``theta_t`` non-decreasing in t (we fit the increments ``dtheta_j >= 0``), and for
  the power law with gamma <= 1/2, ``d(theta phi)/dtheta >= 0`` (GJ 2014, Theorem 4.1). For
  ssvi-rho a varying rho can still cross slices (Hendriks & Martini 2019, Prop. 3.1 give the
  exact condition); ``arbitrage`` checks calendar monotonicity of ``w`` on a grid, and when
  it fails the calibrator re-fits with ``rho0 = rho1`` pinned (``safe_bounds``): plain SSVI.

Published parameters: surface ``rho`` (ssvi-rho ``rho0``, ``rho1``), ``eta``, ``gamma``; per slice
``theta``. The analytic Jacobian differentiates ``w`` through ``phi(theta)`` and ``rho(theta)``.
"""

from __future__ import annotations

import numpy as np

from streamer.models.base import (
    FitData,
    FloatArray,
    IntArray,
    Model,
    ParamView,
    Violation,
    register,
)

THETA_RHO = 0.1  # ssvi-rho: theta scale over which rho moves from rho0 to rho1
THETA_MIN = 1e-6
GRID_K = np.linspace(-2.0, 2.0, 161)


class _SSVIBase(Model):
    per_expiry = False
    varying_rho: bool = False

    # -------------------------------------------------------------- layout
    @property
    def n_head(self) -> int:
        return 4 if self.varying_rho else 3  # [rho(0,1)..., z, gamma]

    def param_names(self, n_slices: int) -> tuple[str, ...]:
        head = ("rho0", "rho1", "z", "gamma") if self.varying_rho else ("rho", "z", "gamma")
        return head + tuple(f"dtheta[{j}]" for j in range(n_slices))

    def bounds(self, n_slices: int) -> tuple[FloatArray, FloatArray]:
        nr = 2 if self.varying_rho else 1
        lo = np.concatenate([np.full(nr, -0.999), [0.0, 0.0], np.zeros(n_slices)])
        hi = np.concatenate([np.full(nr, 0.999), [1.0, 0.5], np.full(n_slices, 4.0)])
        lo[self.n_head] = THETA_MIN
        return lo, hi

    def _unpack(self, x: FloatArray) -> tuple[float, float, float, float, FloatArray]:
        """rho0, rho1, eta, gamma, theta per slice."""
        if self.varying_rho:
            r0, r1, z, g = (float(v) for v in x[:4])
        else:
            r0 = r1 = float(x[0])
            z, g = float(x[1]), float(x[2])
        eta = 2.0 * z / (1.0 + max(abs(r0), abs(r1)))
        theta = np.cumsum(x[self.n_head :])
        return r0, r1, eta, g, theta

    def _rho_of(self, r0: float, r1: float, theta: FloatArray) -> tuple[FloatArray, FloatArray]:
        """rho(theta) and d rho / d theta."""
        if not self.varying_rho:
            return np.full(theta.shape, r0), np.zeros(theta.shape)
        e = np.exp(-theta / THETA_RHO)
        return r0 + (r1 - r0) * (1.0 - e), (r1 - r0) * e / THETA_RHO

    # -------------------------------------------------------------- values
    def total_variance(self, x: FloatArray, k: FloatArray, slice_idx: IntArray) -> FloatArray:
        r0, r1, eta, g, theta = self._unpack(np.asarray(x, dtype=np.float64))
        th = theta[slice_idx]
        rho, _ = self._rho_of(r0, r1, th)
        phi = eta / (th**g * (1.0 + th) ** (1.0 - g))
        q = phi * k + rho
        return np.asarray(0.5 * th * (1.0 + rho * phi * k + np.sqrt(q * q + 1.0 - rho * rho)))

    def implied_vol(
        self, x: FloatArray, k: FloatArray, T: FloatArray, slice_idx: IntArray
    ) -> FloatArray:
        w = self.total_variance(x, np.asarray(k, dtype=np.float64), slice_idx)
        return np.asarray(np.sqrt(np.maximum(w, 1e-14) / T))

    def jacobian(
        self, x: FloatArray, k: FloatArray, T: FloatArray, slice_idx: IntArray
    ) -> FloatArray:
        x = np.asarray(x, dtype=np.float64)
        r0, r1, eta, g, theta = self._unpack(x)
        th = theta[slice_idx]
        rho, drho_dth = self._rho_of(r0, r1, th)
        lt, l1t = np.log(th), np.log1p(th)
        base = np.exp(-g * lt + (g - 1.0) * l1t)  # phi / eta
        phi = eta * base
        q = phi * k + rho
        R = np.sqrt(q * q + 1.0 - rho * rho)
        w = 0.5 * th * (1.0 + rho * phi * k + R)
        iv = np.sqrt(np.maximum(w, 1e-14) / T)
        dw_dphi = 0.5 * th * (rho * k + q * k / R)
        dw_drho = 0.5 * th * (phi * k) * (1.0 + 1.0 / R)
        dphi_dth = phi * (-g / th + (g - 1.0) / (1.0 + th))
        dw_dth = w / th + dw_dphi * dphi_dth + dw_drho * drho_dth
        dw_deta = dw_dphi * base
        n, nh = len(k), self.n_head
        jac = np.zeros((n, len(x)))
        rmax = max(abs(r0), abs(r1))
        z = float(x[nh - 2])
        deta_dz = 2.0 / (1.0 + rmax)
        deta_drmax = -2.0 * z / (1.0 + rmax) ** 2
        if self.varying_rho:
            e = np.exp(-th / THETA_RHO)
            jac[:, 0] = dw_drho * e
            jac[:, 1] = dw_drho * (1.0 - e)
            i_max = 0 if abs(r0) >= abs(r1) else 1
        else:
            jac[:, 0] = dw_drho
            i_max = 0
        jac[:, i_max] += dw_deta * deta_drmax * np.sign(x[i_max])
        jac[:, nh - 2] = dw_deta * deta_dz
        jac[:, nh - 1] = dw_dphi * phi * (l1t - lt)
        # theta_j = sum_{i <= j} dtheta_i: d/d dtheta_i is dw/dtheta for points of slices j >= i
        S = len(theta)
        cols = nh + np.arange(S)
        mask = slice_idx[:, None] >= np.arange(S)[None, :]
        jac[:, cols] = np.where(mask, dw_dth[:, None], 0.0)
        jac *= (0.5 / (T * iv))[:, None]
        return jac

    # ------------------------------------------------------------ starting
    def initial_guesses(self, data: FitData) -> list[FloatArray]:
        S = data.n_slices
        theta = np.empty(S)
        for j in range(S):
            m = data.slice_idx == j
            k, iv = data.k[m], data.iv[m]
            near = np.argsort(np.abs(k))[:2]
            atm = float(np.mean(iv[near])) if len(near) else 0.6
            theta[j] = atm * atm * data.slice_T[j]
        theta = np.maximum.accumulate(np.maximum(theta, THETA_MIN))
        dtheta = np.diff(np.concatenate([[0.0], theta]))
        dtheta[0] = max(dtheta[0], THETA_MIN)
        # skew sign from the 25-delta-ish wings of the middle slice
        out = []
        for rho in (-0.3, 0.0, 0.3, -0.7):
            head = [rho, rho, 0.5, 0.4] if self.varying_rho else [rho, 0.5, 0.4]
            out.append(np.concatenate([head, dtheta]))
        return out

    # -------------------------------------------------------------- checks
    def arbitrage(self, x: FloatArray, slice_T: FloatArray) -> list[Violation]:
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            return [Violation("nonfinite", -1, float("inf"), "non-finite parameters")]
        out: list[Violation] = []
        r0, r1, eta, g, theta = self._unpack(x)
        rmax = max(abs(r0), abs(r1))
        if rmax >= 1.0:
            out.append(Violation("ssvi_bound", -1, rmax - 1.0, "|rho| >= 1"))
        if eta * (1.0 + rmax) > 2.0 + 1e-12:
            out.append(Violation("ssvi_bound", -1, eta * (1 + rmax) - 2, "eta(1+|rho|) > 2"))
        if not 0.0 <= g <= 0.5:
            out.append(Violation("ssvi_bound", -1, abs(g - 0.25), "gamma outside [0, 1/2]"))
        if np.any(np.diff(theta) < -1e-15) or theta[0] <= 0:
            out.append(
                Violation(
                    "calendar",
                    -1,
                    float(-np.min(np.diff(theta), initial=0.0)),
                    "theta must be positive and non-decreasing",
                )
            )
        # GJ (2014) Theorem 4.2 per slice, with the slice's own rho
        rho, _ = self._rho_of(r0, r1, theta)
        phi = eta / (theta**g * (1.0 + theta) ** (1.0 - g))
        a = theta * phi * (1.0 + np.abs(rho))
        b = theta * phi * phi * (1.0 + np.abs(rho))
        for jj in np.flatnonzero((a >= 4.0) | (b > 4.0 + 1e-12)).tolist():
            j = int(jj)
            out.append(
                Violation(
                    "butterfly",
                    int(j),
                    float(max(a[j] - 4, b[j] - 4)),
                    "theta phi (1+|rho|) >= 4 or theta phi^2 (1+|rho|) > 4",
                )
            )
        if self.varying_rho and len(theta) > 1:
            w = [
                self.total_variance(x, GRID_K, np.full(GRID_K.shape, j)) for j in range(len(theta))
            ]
            for j in range(1, len(theta)):
                gap = float(np.max(w[j - 1] - w[j]))
                if gap > 1e-12:
                    out.append(Violation("calendar", j, gap, "w(k) falls between slices"))
        return out

    def scale(self, n_slices: int, slice_T: FloatArray | None = None) -> FloatArray:
        T = np.asarray(slice_T if slice_T is not None else np.linspace(0.05, 1, n_slices))
        dT = np.diff(np.concatenate([[0.0], T]))
        head = [0.03, 0.03, 0.03, 0.03] if self.varying_rho else [0.03, 0.03, 0.03]
        return np.concatenate([head, 0.006 * np.maximum(dT, 1.0 / 365.0)])

    def safe_bounds(
        self, x: FloatArray, lower: FloatArray, upper: FloatArray
    ) -> tuple[FloatArray, FloatArray] | None:
        """ssvi-rho: pin rho0 = rho1 (their mean): plain SSVI, calendar-free by GJ (2014)."""
        if not self.varying_rho:
            return None
        lo, hi = lower.copy(), upper.copy()
        mid = float(np.clip(0.5 * (x[0] + x[1]), lower[0], upper[0]))
        lo[0] = hi[0] = lo[1] = hi[1] = mid
        return lo, hi

    # ----------------------------------------------------------- publishing
    def view(self, x: FloatArray, n_slices: int) -> ParamView:
        r0, r1, eta, g, theta = self._unpack(np.asarray(x, dtype=np.float64))
        head = (
            {"rho0": r0, "rho1": r1, "eta": eta, "gamma": g}
            if self.varying_rho
            else {"rho": r0, "eta": eta, "gamma": g}
        )
        return ParamView(surface=head, slices=[{"theta": float(t)} for t in theta])

    def from_view(self, view: ParamView, n_slices: int) -> FloatArray:
        s = view.surface
        if self.varying_rho:
            r0, r1 = float(s["rho0"]), float(s["rho1"])
            head = [r0, r1]
        else:
            r0 = r1 = float(s["rho"])
            head = [r0]
        z = float(s["eta"]) * (1.0 + max(abs(r0), abs(r1))) / 2.0
        theta = np.array([float(v["theta"]) for v in view.slices[:n_slices]])
        theta = np.maximum.accumulate(np.maximum(theta, THETA_MIN))
        dtheta = np.diff(np.concatenate([[0.0], theta]))
        return np.concatenate([head, [z, float(s["gamma"])], dtheta])


@register
class SSVI(_SSVIBase):
    """SSVI with a power-law phi: ``x = [rho, z, gamma, dtheta_0..]`` (eta = 2z/(1+|rho|))."""

    name = "ssvi"
    varying_rho = False


@register
class SSVIRho(_SSVIBase):
    """SSVI with a two-parameter ``rho(theta)`` from ``rho0`` to ``rho1`` (one surface vector;
    the per-slice eSSVI is ``streamer.models.essvi``)."""

    name = "ssvi-rho"
    varying_rho = True
