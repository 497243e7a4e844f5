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
from dataclasses import dataclass, field, fields

import emcee
import numpy as np
from astropy.coordinates import SkyCoord
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from coron_dask.core import config
from coron_dask.core.errors import CoronInputError
from coron_dask.science.companion_model import CompanionModel, Roll, offsets, sky_place
from coron_dask.science.companion_noise import KERNELS, NoiseModel
from coron_dask.science.geometry import pixel_scale_arcsec
from coron_dask.science.transmission import Transmission

log = logging.getLogger(__name__)

NAMES = ("separation", "position_angle", "contrast")


@dataclass(frozen=True)
class FitSettings:
    """The fit's settings (``coron_dask.companions.*`` in dask's configuration; lengths in
    λ/D): see ``core.parameters``."""

    psf_half_width: float | None
    window_margin: float
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


@dataclass(frozen=True)
class Estimate:
    """A parameter's posterior median and the distances to its 16th and 84th percentiles."""

    median: float
    minus: float
    plus: float

    @property
    def sigma(self) -> float:
        """Half the 68 % interval."""
        return 0.5 * (self.minus + self.plus)

    @classmethod
    def of(cls, samples: np.ndarray) -> "Estimate":
        low, mid, high = np.percentile(samples, [16, 50, 84])
        return cls(float(mid), float(mid - low), float(high - mid))


@dataclass
class CompanionFit:
    """One companion's fit (see the module's docstring). Angles in degrees east of north,
    separations and offsets (``east`` = ΔRA·cos δ, ``north`` = ΔDec) in arcsec, ``flux``
    in the calints' units summed over pixels; ``places`` (rolls, 2) the detector (x, y) of
    the median in each roll, ``transmissions`` the coronagraph's there."""

    name: str
    separation: Estimate
    position_angle: Estimate
    contrast: Estimate
    flux: Estimate
    east: Estimate
    north: Estimate
    snr: float
    correlation: np.ndarray
    maximum_likelihood: np.ndarray
    samples: np.ndarray
    tau: np.ndarray
    acceptance: float
    steps: int
    burn: int
    thin: int
    converged: bool
    at_edge: bool  # the likelihood's maximum at the window's edge: the prior cuts the interval
    noise: list[NoiseModel]
    places: np.ndarray
    transmissions: np.ndarray
    cutoff: int
    linearisation_error: float
    seconds: float
    model: CompanionModel = field(repr=False, compare=False)

    @property
    def sky_place(self) -> SkyCoord:
        """The companion's place on the sky at the posterior medians."""
        return sky_place(self.model.star, self.separation.median, self.position_angle.median)

    @property
    def method(self) -> str:
        """The model and noise used, in words (for a product's row)."""
        box = self.model.psf.shape
        kernels = ", ".join(
            f"{n.kernel} ℓ {n.length:.2f} px share {n.share:.2f}" for n in self.noise
        )
        return (
            f"exact RDI forward model, {self.cutoff} KL modes, off-axis PSF {box[0]}x{box[1]} "
            f"px, {len(self.noise)} roll(s) of {', '.join(str(len(s)) for s in self.model.stamps)} "
            f"px; annulus noise {kernels}; emcee {self.samples.shape[0]} samples"
        )

    @property
    def median(self) -> np.ndarray:
        """(separation, position angle, contrast) at their medians."""
        return np.array([e.median for e in (self.separation, self.position_angle, self.contrast)])

    def best_models(self) -> list[dict]:
        """Per roll, on its window: ``data`` (the integration-mean psfsub), ``model`` (the
        companion at the posterior median, exactly), ``residual`` and the window's
        ``corner`` (y0, x0)."""
        out = []
        for k, roll in enumerate(self.model.rolls):
            model = self.model.window_model(self.median, k)
            (y0, x0), (wy, wx) = roll.corner, model.shape
            data = np.full((wy, wx), np.nan)
            ys = slice(max(y0, 0), min(y0 + wy, roll.image.shape[0]))
            xs = slice(max(x0, 0), min(x0 + wx, roll.image.shape[1]))
            data[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = roll.image[ys, xs]
            out.append(dict(data=data, model=model, residual=data - model, corner=roll.corner))
        return out

    def residual_images(self) -> list[np.ndarray]:
        """Per roll, its integration-mean psfsub with the best model taken away on the window."""
        images = []
        for roll, best in zip(self.model.rolls, self.best_models(), strict=True):
            image = roll.image.astype(np.float64).copy()
            (y0, x0), (wy, wx) = best["corner"], best["model"].shape
            ys = slice(max(y0, 0), min(y0 + wy, image.shape[0]))
            xs = slice(max(x0, 0), min(x0 + wx, image.shape[1]))
            model = best["model"][ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
            image[ys, xs] -= np.nan_to_num(model)
            images.append(image)
        return images

    def describe(self) -> str:
        """The fit in a line, for the log."""
        s, p, c = self.separation, self.position_angle, self.contrast
        state = "converged" if self.converged else "NOT converged"
        return (
            f'{self.name}: separation {s.median:.4f} −{s.minus:.4f} +{s.plus:.4f}", PA '
            f"{p.median:.2f} −{p.minus:.2f} +{p.plus:.2f}°, contrast {c.median:.4g} "
            f"−{c.minus:.2g} +{c.plus:.2g} (S/N {self.snr:.1f}); {self.steps} steps, τ "
            f"{', '.join(f'{t:.0f}' for t in self.tau)}, acceptance {self.acceptance:.2f}, "
            f"{state}; {self.seconds:.1f} s"
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
) -> CompanionFit:
    """Fit a companion near ``start`` (separation arcsec, position angle degrees E of N)
    in ``rolls`` (one per science exposure, RDI) with the off-axis ``psf`` (the star's
    flux), at KL ``cutoff``; λ/D is ``resolution`` pixels.
    See the module's docstring."""
    settings = settings or FitSettings.configured()
    # many small matrix products: BLAS's threads cost more than they bring
    with threadpool_limits(1, user_api="blas"):
        return _fit(rolls, psf, star, start, resolution, cutoff, transmission, settings, name)


def _fit(rolls, psf, star, start, resolution, cutoff, transmission, settings, name):
    """``fit_companion``'s work, on one BLAS thread."""
    began = time.perf_counter()
    model = CompanionModel(
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
    sampler = emcee.EnsembleSampler(settings.walkers, 3, model.log_probability, vectorize=True)
    state = emcee.State(walkers, random_state=np.random.RandomState(settings.seed).get_state())
    previous, converged, tau = np.full(3, np.inf), False, np.full(3, np.nan)
    while sampler.iteration < settings.max_steps:
        count = min(settings.check_steps, settings.max_steps - sampler.iteration)
        state = sampler.run_mcmc(state, count, progress=False)
        tau = sampler.get_autocorr_time(tol=0)
        steady = np.all(np.abs(previous - tau) < settings.tau_change * tau)
        if steady and sampler.iteration >= settings.tau_factor * tau.max():
            converged = True
            break
        previous = tau
    burn = min(int(np.ceil(settings.burn_factor * tau.max())), sampler.iteration // 2)
    thin = max(1, int(0.5 * tau.min()))
    samples = sampler.get_chain(discard=burn, thin=thin, flat=True)
    fit = _result(model, samples, name, best, tau, sampler, burn, thin, converged, cutoff)
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


def _result(model, samples, name, best, tau, sampler, burn, thin, converged, cutoff):
    """The ``CompanionFit`` of the chain's ``samples`` (n, 3)."""
    separation, angle, contrast = samples.T
    east, north = offsets(separation, angle)
    flux = contrast * model.star_flux
    estimates = [Estimate.of(v) for v in (separation, angle, contrast, flux, east, north)]
    pa = estimates[1]
    estimates[1] = Estimate(pa.median % 360.0, pa.minus, pa.plus)
    median = np.array([[estimates[0].median, pa.median, estimates[2].median]])
    places = np.array([p[0] for p in model.places(median)])
    return CompanionFit(
        name,
        *estimates,
        snr=estimates[2].median / estimates[2].sigma if estimates[2].sigma > 0 else np.inf,
        correlation=np.corrcoef(samples.T),
        maximum_likelihood=best,
        samples=samples,
        tau=tau,
        acceptance=float(np.mean(sampler.acceptance_fraction)),
        steps=int(sampler.iteration),
        burn=burn,
        thin=thin,
        converged=converged,
        at_edge=False,
        noise=list(model.noise),
        places=places,
        transmissions=model.transmissions(median)[:, 0],
        cutoff=cutoff,
        linearisation_error=model.linearisation_error(),
        seconds=0.0,
        model=model,
    )
