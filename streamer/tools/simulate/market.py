r"""The simulated market: Bates spot under an SSVI surface whose parameters follow OU paths.

* Spot: Bates (1996) dynamics, Heston variance with lognormal jumps, stepped every ``step_ms``
  (full-truncation Euler, Lord, Koekkoek & van Dijk 2010)::

      dS/S = -lam m dt + e^u sqrt(v) dW + (e^J - 1) dN,   dv = kappa (vbar - v) dt + xi sqrt(v) dZ,

  ``d<W, Z> = rho_sv dt``, ``J ~ N(mu_j, sigma_j^2)``, ``m = E[e^J - 1]``. ``u`` is a
  regime factor (an OU process around 0) that scales the diffusive vol and the whole ATM level:
  the ``regime-shift`` scenario moves it.
* Forwards: ``F(T) = S exp(basis T)`` per expiry (``basis`` an OU path, per year).
* Implied vols: SSVI (Gatheral & Jacquier 2014, "Arbitrage-free SVI volatility surfaces",
  Quantitative Finance 14(1))::

      w(k, theta) = theta/2 (1 + rho phi k + sqrt((phi k + rho)^2 + 1 - rho^2)),
      phi(theta) = eta / (theta^gamma (1 + theta)^(1 - gamma)),   k = ln(K / F),

  with ATM total variance ``theta(T) = atm(T)^2 T`` and the ATM term structure
  ``atm(T) = e^u (s_inf + (sqrt(v) - s_inf) (1 - e^(-T/tau)) / (T/tau))`` (Nelson-Siegel
  shape): the short end is the Bates instantaneous vol, the long end ``s_inf``. ``rho``,
  ``eta``, ``gamma``, ``s_inf``, ``basis`` and ``u`` follow OU paths (exact discretisation).
  Bounds kept every step: ``|rho| <= 0.9``, ``0.05 <= gamma <= 0.5``, ``eta (1+|rho|) <= 1.98``
  (GJ 2014 Corollary 4.1: no butterfly arbitrage), ``sqrt(v)`` within ``[0.2, 5] s_inf`` (then
  ``theta(T)`` is increasing: no calendar arbitrage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

SECONDS_PER_YEAR = 365.0 * 86_400.0


@dataclass(frozen=True, slots=True)
class MarketParams:
    """Model parameters (annualised unless said otherwise); the scenario presets change some.

    OU processes take a half-life in minutes of feed time and a stationary standard deviation.
    """

    spot: float = 90_000.0
    v0: float = 0.45**2  # Bates variance: instantaneous vol 45%
    kappa: float = 4.0
    vbar: float = 0.45**2
    xi: float = 0.6
    rho_sv: float = -0.4
    lam: float = 20.0  # jumps per year
    mu_j: float = -0.01
    sigma_j: float = 0.02
    s_inf: float = 0.52  # long-end ATM vol
    s_inf_sd: float = 0.01
    tau: float = 0.25  # years: where the term structure bends
    u_sd: float = 0.02  # ATM level factor (log)
    rho: float = -0.15
    rho_sd: float = 0.02
    eta: float = 1.0
    eta_sd: float = 0.04
    gamma: float = 0.40
    gamma_sd: float = 0.015
    basis: float = 0.04  # forward basis per year
    basis_sd: float = 0.005
    half_life_min: float = 30.0
    spread_iv: float = 0.004  # ATM half spread in vol, widened for wings and short expiries
    # regime shift (scenario "regime-shift"): at shift_at (fraction of the run)
    shift_at: float = 0.5
    shift_minutes: float = 4.0
    crash: float = 0.15  # spot falls by this fraction
    vol_jump: float = 0.40  # ATM vol rises by this fraction
    rho_jump: float = -0.25
    eta_jump: float = 0.30  # relative
    basis_jump: float = -0.03
    revert_half_life_min: float = 20.0
    # disconnect: a gap of gap_minutes starting at gap_at (fraction of the run)
    gap_at: float = 0.5
    gap_minutes: float = 2.0
    # bad-data: the fraction of ticker frames spoiled
    bad_rate: float = 0.02


class Market:
    """The state stepped forward: spot, Bates variance, regime factor, SSVI and basis paths."""

    def __init__(self, p: MarketParams, rng: np.random.Generator) -> None:
        self.p = p
        self.rng = rng
        self.log_s = math.log(p.spot)
        self.v = p.v0
        self.u = 0.0
        self.s_inf = p.s_inf
        self.rho = p.rho
        self.eta = p.eta
        self.gamma = p.gamma
        self.basis = p.basis
        # OU means (the regime shift moves the state, not these: the state reverts to them)
        self.half_life_min = p.half_life_min
        self.jumps = 0

    @property
    def spot(self) -> float:
        return math.exp(self.log_s)

    def step(self, dt_s: float, shock: float = 0.0, reverting: bool = True) -> None:
        """Advance by ``dt_s`` seconds; ``shock`` in [0, 1] is the fraction of the regime shift
        applied during this step (the crash and the parameter jumps), ``reverting`` False
        freezes the parameters' mean reversion (during the shift)."""
        z = self.rng.standard_normal(8)
        self._step_spot(dt_s / SECONDS_PER_YEAR, z[0], z[1])
        self._step_parameters(dt_s, z, reverting)
        if shock > 0.0:
            self._shock(shock)
        self.rho = min(max(self.rho, -0.9), 0.9)
        self.gamma = min(max(self.gamma, 0.05), 0.5)
        self.eta = min(max(self.eta, 0.05), 1.98 / (1.0 + abs(self.rho)))

    def _step_spot(self, dt: float, z_s: float, z_v: float) -> None:
        """Bates: log spot (diffusion + compensated jumps), then the truncated variance."""
        p, rng = self.p, self.rng
        vp = max(self.v, 0.0)
        vol = math.sqrt(vp) * math.exp(self.u)
        m = math.exp(p.mu_j + 0.5 * p.sigma_j**2) - 1.0
        n_jumps = int(rng.poisson(p.lam * dt))
        jump = 0.0
        if n_jumps:
            jump = float(np.sum(rng.normal(p.mu_j, p.sigma_j, n_jumps)))
            self.jumps += n_jumps
        self.log_s += (-p.lam * m - 0.5 * vol * vol) * dt + vol * math.sqrt(dt) * z_s + jump
        zv = p.rho_sv * z_s + math.sqrt(1.0 - p.rho_sv**2) * z_v
        self.v += p.kappa * (p.vbar - vp) * dt + p.xi * math.sqrt(vp * dt) * zv
        lo, hi = (0.2 * self.s_inf) ** 2, (5.0 * self.s_inf) ** 2
        self.v = min(max(self.v, lo), hi)

    def _step_parameters(self, dt_s: float, z: FloatArray, reverting: bool) -> None:
        """The OU paths of ``u``, ``s_inf``, ``rho``, ``eta``, ``gamma``, ``basis`` (normals
        ``z[2:8]``); frozen while not ``reverting``."""
        p = self.p
        hl = self.half_life_min if reverting else math.inf
        self.u = _ou(self.u, 0.0, p.u_sd, hl, dt_s, z[2])
        self.s_inf = _ou(self.s_inf, p.s_inf, p.s_inf_sd, hl, dt_s, z[3])
        self.rho = _ou(self.rho, p.rho, p.rho_sd, hl, dt_s, z[4])
        self.eta = _ou(self.eta, p.eta, p.eta_sd, hl, dt_s, z[5])
        self.gamma = _ou(self.gamma, p.gamma, p.gamma_sd, hl, dt_s, z[6])
        self.basis = _ou(self.basis, p.basis, p.basis_sd, hl, dt_s, z[7])

    def _shock(self, shock: float) -> None:
        """The fraction ``shock`` of the regime shift: crash, vol jump, skew and basis moves."""
        p = self.p
        self.log_s += math.log(1.0 - p.crash) * shock
        self.u += math.log(1.0 + p.vol_jump) * shock
        self.rho += p.rho_jump * shock
        self.eta += p.eta * p.eta_jump * shock
        self.basis += p.basis_jump * shock

    def atm_vol(self, T: FloatArray) -> FloatArray:
        """ATM implied vol per maturity (years): ``e^u NS(T; sqrt(v), s_inf, tau)``."""
        x = np.maximum(np.asarray(T, dtype=np.float64), 1e-12) / self.p.tau
        shape = -np.expm1(-x) / x
        s0 = math.sqrt(max(self.v, 0.0))
        return np.asarray(math.exp(self.u) * (self.s_inf + (s0 - self.s_inf) * shape))

    def forward(self, T: FloatArray) -> FloatArray:
        return np.asarray(self.spot * np.exp(self.basis * np.asarray(T, dtype=np.float64)))

    def at(self, T: float) -> tuple[float, float]:
        """(forward, ATM vol) of one maturity ``T`` (years)."""
        Ta = np.array([T])
        return float(self.forward(Ta)[0]), float(self.atm_vol(Ta)[0])

    def total_variance(self, k: FloatArray, theta: FloatArray) -> FloatArray:
        """SSVI ``w(k, theta)`` with the current ``rho``, ``eta``, ``gamma``."""
        return ssvi_total_variance(k, theta, self.rho, self.eta, self.gamma)


def ssvi_total_variance(
    k: FloatArray, theta: FloatArray, rho: float, eta: float, gamma: float
) -> FloatArray:
    """Gatheral & Jacquier (2014) SSVI with the power-law ``phi`` (module docstring)."""
    phi = eta / (theta**gamma * (1.0 + theta) ** (1.0 - gamma))
    q = phi * k + rho
    return np.asarray(0.5 * theta * (1.0 + rho * phi * k + np.sqrt(q * q + 1.0 - rho * rho)))


def _ou(x: float, mean: float, sd: float, half_life_min: float, dt_s: float, z: float) -> float:
    """One exact step of an OU process with stationary sd ``sd`` and the given half-life."""
    if not math.isfinite(half_life_min):
        return x  # frozen (during a regime shift)
    a = math.exp(-math.log(2.0) * dt_s / (60.0 * half_life_min))
    return mean + (x - mean) * a + sd * math.sqrt(1.0 - a * a) * z
