"""What a companion's fit gives (``science.companion_fit``): each parameter's posterior
median and 68 % interval, the parameters' correlations, the chain's convergence, the noise
models, and the best model in each roll, for a product's row and its quicklook."""

from dataclasses import dataclass, field

import numpy as np
from astropy.coordinates import SkyCoord

from coron_dask.science.companion_model import CompanionModel, offsets, sky_place
from coron_dask.science.companion_noise import NoiseModel


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
            f"{self.model.method}, {self.cutoff} KL modes, off-axis PSF {box[0]}x{box[1]} "
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


def fit_result(model, samples, name, best, tau, sampler, burn, thin, converged, cutoff):
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
