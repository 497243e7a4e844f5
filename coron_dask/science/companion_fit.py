"""A companion's separation, position angle and contrast with their posteriors: a
maximum-likelihood start, then emcee, on the exact RDI forward model
(``science.companion_model``).

1. **Start.** From a given place (a candidate's, or the user's), the contrast from the
   aperture flux (the stamp's sum over the model's of contrast 1), then Nelder-Mead on the
   three parameters (scipy.optimize), restarted once from where it stopped.
2. **Walkers** in a ball about that point, ``walker_spread`` times the Laplace
   approximation's standard deviations (the inverse Hessian of −ln L, central differences).
3. **Chain.** emcee's stretch move, vectorised over the walkers, in runs of
   ``check_steps``; after each, the integrated autocorrelation time τ of each parameter
   (emcee's estimate). It stops when the chain is ``tau_factor`` τ long and τ changed by
   less than ``tau_change`` since the last estimate (converged), or at ``max_steps`` (not).
   The first ``burn_factor`` τ are dropped, the rest thinned by τ/2.
4. **Result** (``CompanionFit``): medians and 68 % intervals (16th–84th percentiles) of
   separation, position angle, contrast, the flux in the data's units (contrast × the
   off-axis PSF's sum) and the RA/Dec offsets; the parameters' correlation matrix; τ, the
   acceptance fraction and the chain's length (its convergence); the noise models; the
   best model in each roll (``best_models``).
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import emcee
import numpy as np
from astropy.coordinates import SkyCoord
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from coron_dask.core import config
from coron_dask.core.errors import CoronInputError, raise_if_stopped
from coron_dask.science.companion_adi import AdiCompanionModel
from coron_dask.science.companion_model import CompanionModel, Roll
from coron_dask.science.companion_noise import KERNELS
from coron_dask.science.companion_result import CompanionFit, fit_result
from coron_dask.science.geometry import pixel_scale_arcsec
from coron_dask.science.transmission import Transmission

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitSettings:
    """The fit's settings (``coron_dask.companions.*`` in dask's configuration; lengths in
    λ/D): see ``core.parameters``."""

    psf_half_width: float | None
    window_margin: float
    align_slack: float
    stamp_radius: float
    annulus_width: float
    noise_mask: float
    correlation_lag: float
    kernel: str
    walkers: int
    check_steps: int
    max_steps: int
    tau_factor: float
    tau_change: float
    burn_factor: float
    walker_spread: float
    spread_walkers: bool
    seed: int

    @classmethod
    def configured(cls, **given: object) -> "FitSettings":
        """The configured settings, those ``given`` instead; CoronInputError names a bad one."""
        keys = {f.name: f"companions.{f.name.replace('_', '-')}" for f in fields(cls)}
        unknown = set(given) - set(keys)
        if unknown:
            raise TypeError(f"unexpected settings {sorted(unknown)}")
        values = {name: given.get(name, config.get(key)) for name, key in keys.items()}
        settings = cls(**values)
        for name, key in keys.items():
            value = values[name]
            if name == "kernel":
                if value not in KERNELS:
                    raise CoronInputError(
                        key, f"must be one of {', '.join(KERNELS)}, got {value!r}"
                    )
            elif name == "spread_walkers":
                if not isinstance(value, bool):
                    raise CoronInputError(key, f"must be true or false, got {value!r}")
            elif name == "seed" or (name == "psf_half_width" and value is None):
                continue
            elif not isinstance(value, int | float) or not value > 0:
                raise CoronInputError(key, f"must be a number > 0, got {value!r}")
        if settings.walkers < 6 or settings.walkers % 2:
            raise CoronInputError(
                keys["walkers"],
                f"must be even and at least 6 (twice the parameters), got {settings.walkers}",
            )
        return settings

    def in_pixels(self, resolution: float) -> dict:
        """The model's lengths in pixels, for λ/D of ``resolution`` pixels."""
        half = (
            None if self.psf_half_width is None else int(np.ceil(self.psf_half_width * resolution))
        )
        return dict(
            half=half,
            margin=self.window_margin * resolution,
            stamp=self.stamp_radius * resolution,
            noise=dict(
                width=self.annulus_width * resolution,
                masked=self.noise_mask * resolution,
                max_lag=self.correlation_lag * resolution,
                kernel=self.kernel,
            ),
        )


def _aperture_contrast(model: CompanionModel) -> float:
    """The start's contrast: the stamps' data summed over the model's of contrast 1."""
    unit = model.stamp_models(np.array([[*model.start, 1.0]]))
    measured = sum(float(d.sum()) for d in model.data)
    expected = sum(float(u.sum()) for u in unit)
    contrast = measured / expected if expected > 0 else 0.0
    noise = min(n.sigma for n in model.noise) / max(float(u.max()) for u in unit)
    return max(contrast, noise)  # a positive start, at least the noise's level


#: −ln L where θ is outside the prior, for the optimiser (a number, where −∞ would stop it).
OUTSIDE = 1e300
#: The least standard deviation of the walkers' ball, in the start's units (pixels along
#: and across, the start's contrast): the ball of a likelihood too sharp or too flat to
#: measure is still a ball.
LEAST_SPREAD = 1e-3


def _hessian(function, point: np.ndarray, steps: np.ndarray) -> np.ndarray | None:
    """The Hessian of ``function`` at ``point`` by central differences of ``steps``; None
    where a step leaves the prior."""
    n = len(point)
    out = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            total = 0.0
            for si, sj, sign in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)):
                moved = point.copy()
                moved[i] += si * steps[i]
                moved[j] += sj * steps[j]
                value = function(moved)
                if value >= OUTSIDE:
                    return None
                total += sign * value
            out[i, j] = out[j, i] = total / (4 * steps[i] * steps[j])
    return out


def _start_walkers(count, best, covariance, spread, in_range, rng) -> np.ndarray:
    """``count`` walkers about ``best`` (in the start's units), ``spread`` times draws of
    ``covariance`` (its variances at least LEAST_SPREAD²), the ball shrunk until enough of
    them lie inside the prior (``in_range``)."""
    values, vectors = np.linalg.eigh(0.5 * (covariance + covariance.T))
    root = vectors * np.sqrt(np.clip(values, LEAST_SPREAD**2, None))
    walkers = np.empty((0, len(best)))
    for _ in range(60):
        draws = best + spread * rng.standard_normal((count, len(best))) @ root.T
        walkers = np.concatenate([walkers, draws[in_range(draws)]])[:count]
        if len(walkers) == count:
            return walkers
        spread *= 0.7
    raise RuntimeError("no room for the walkers about the maximum likelihood")


def fit_companion(
    rolls: list[Roll],
    psf: np.ndarray,
    star: SkyCoord,
    start: tuple[float, float],
    *,
    resolution: float,
    cutoff: int,
    transmission: Transmission | None = None,
    settings: FitSettings | None = None,
    name: str = "companion",
    spread: Callable | None = None,
) -> CompanionFit:
    """Fit a companion near ``start`` (separation arcsec, position angle degrees E of N)
    in ``rolls`` (one per science exposure; RDI, or ADI with ``Roll.adi``) with the
    off-axis ``psf`` (the star's flux), at KL ``cutoff``; λ/D is ``resolution`` pixels.
    See the module's docstring."""
    settings = settings or FitSettings.configured()
    # many small matrix products: BLAS's threads cost more than they bring
    with threadpool_limits(1, user_api="blas"):
        return _fit(
            rolls, psf, star, start, resolution, cutoff, transmission, settings, name, spread
        )


def _fit(rolls, psf, star, start, resolution, cutoff, transmission, settings, name, spread):
    """``fit_companion``'s work, on one BLAS thread."""
    began = time.perf_counter()
    kind = CompanionModel if rolls[0].adi is None else AdiCompanionModel
    model = kind(
        rolls,
        psf,
        star,
        start,
        cutoff=cutoff,
        transmission=transmission,
        **settings.in_pixels(resolution),
    )
    scale = pixel_scale_arcsec(rolls[0].wcs)
    separation_px = start[0] / scale
    contrast0 = _aperture_contrast(model)
    units = np.array([scale, np.degrees(1 / max(separation_px, 1.0)), contrast0])
    origin = np.array([*start, 0.0])

    def negative(u: np.ndarray) -> float:
        value = model.log_probability(origin + u * units)[0]
        return -value if np.isfinite(value) else OUTSIDE

    guess = np.array([0.0, 0.0, 1.0])
    for _ in range(2):  # Nelder-Mead, restarted once from where it stopped
        found = minimize(
            negative, guess, method="Nelder-Mead", options=dict(xatol=1e-5, fatol=1e-5)
        )
        guess = found.x
    best = origin + guess * units
    steps = np.array([0.02, 0.02, 0.02 * max(abs(guess[2]), 0.05)])
    hessian = _hessian(negative, guess, steps)
    if hessian is not None and np.all(np.linalg.eigvalsh(hessian) > 0):
        covariance = np.linalg.inv(hessian)
    else:
        log.warning(
            "companions: %s: the likelihood's maximum is not a peak inside the window (%s): "
            "the walkers start in a small ball; a start nearer the companion, or a wider "
            "coron_dask.companions.window-margin, may be needed",
            name,
            "at its edge" if hessian is None else "flat or a saddle",
        )
        covariance = np.diag(steps**2)
    rng = np.random.default_rng(settings.seed)
    inside = lambda u: model.in_range(origin + u * units)  # noqa: E731
    walkers = origin + units * _start_walkers(
        settings.walkers, guess, covariance, settings.walker_spread, inside, rng
    )
    probability = model.log_probability if spread is None else spread(model)
    sampler = emcee.EnsembleSampler(settings.walkers, 3, probability, vectorize=True)
    state = emcee.State(walkers, random_state=np.random.RandomState(settings.seed).get_state())
    previous, converged, tau = np.full(3, np.inf), False, np.full(3, np.nan)
    while sampler.iteration < settings.max_steps:
        count = min(settings.check_steps, settings.max_steps - sampler.iteration)
        state = sampler.run_mcmc(state, count, progress=False)
        raise_if_stopped()  # a signal ends the fit here, as it ends a run between tasks
        tau = sampler.get_autocorr_time(tol=0)
        steady = np.all(np.abs(previous - tau) < settings.tau_change * tau)
        if steady and sampler.iteration >= settings.tau_factor * tau.max():
            converged = True
            break
        previous = tau
    burn = min(int(np.ceil(settings.burn_factor * tau.max())), sampler.iteration // 2)
    thin = max(1, int(0.5 * tau.min()))
    samples = sampler.get_chain(discard=burn, thin=thin, flat=True)
    fit = fit_result(model, samples, name, best, tau, sampler, burn, thin, converged, cutoff)
    fit.at_edge = hessian is None
    fit.seconds = time.perf_counter() - began
    log.info("companions: %s", fit.describe())
    log.info(
        "companions: %s: noise per roll: %s; sky-to-detector map linearised about the start, "
        "%.2g px from the WCS's at the sampler's range",
        name,
        "; ".join(n.describe() for n in model.noise),
        fit.linearisation_error,
    )
    if not converged:
        log.warning(
            "companions: %s: the chain did not converge in %d steps (τ %s): raise "
            "coron_dask.companions.max-steps",
            name,
            sampler.iteration,
            ", ".join(f"{t:.0f}" for t in tau),
        )
    return fit
