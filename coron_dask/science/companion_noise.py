"""The noise a companion's fit weighs its residuals by: measured on the annulus it sits in.

After KLIP the noise near a companion is speckle residuals (spatially correlated over about
λ/D) on top of photon and read noise (uncorrelated). Its level and correlation are taken
from the image the companion is fitted in (a roll's integration-mean psfsub), on the
annulus about the star at the companion's separation, the companion itself left out:

- σ: the standard deviation of the annulus pixels;
- the correlation between pixels a distance d apart: a share s of a smooth kernel k(d/ℓ)
  (Matérn ν = 3/2, pyKLIP's ``matern32``, or a squared exponential) and 1 − s of white
  noise, ρ(d) = s·k(d/ℓ) + (1 − s)·[d = 0]. s and ℓ are fitted (least squares) to the
  annulus' own empirical autocorrelation at lags 0 < d ≤ ``max_lag``, computed by FFTs
  of the masked annulus and of its mask (the mean product of the pixel pairs a lag apart).

So the stamp's covariance is C = σ²[s·k(D/ℓ) + (1 − s)·I], D the distances between its
pixels. What it assumes: the noise is stationary and isotropic along the annulus (speckles
are elongated radially; the noise changes with separation across the stamp), Gaussian,
and independent between rolls.
"""

from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_factor
from scipy.optimize import least_squares

KERNELS = ("matern32", "sqexp", "diagonal")
#: Least number of pixel pairs a lag of the empirical autocorrelation is averaged over.
LEAST_PAIRS = 20


def kernel_values(kind: str, distance: np.ndarray, length: float) -> np.ndarray:
    """The correlation kernel k(d/ℓ) (1 at d = 0) of ``kind`` (``KERNELS``)."""
    d = np.asarray(distance, dtype=np.float64) / length
    if kind == "matern32":
        return (1 + np.sqrt(3) * d) * np.exp(-np.sqrt(3) * d)
    if kind == "sqexp":
        return np.exp(-0.5 * d * d)
    if kind == "diagonal":
        return (d == 0).astype(np.float64)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kind!r}")


@dataclass(frozen=True)
class NoiseModel:
    """The annulus noise (see the module's docstring): ``sigma`` (the image's units),
    correlation ``length`` ℓ (pixels) and ``share`` s of the ``kernel``, from ``pixels``
    annulus pixels between ``radii`` (pixels from the star)."""

    sigma: float
    length: float
    share: float
    kernel: str
    pixels: int
    radii: tuple[float, float]

    def covariance(self, places: np.ndarray) -> np.ndarray:
        """The covariance (n, n) of pixels at ``places`` (n, 2)."""
        distance = np.hypot(*(places[:, None, :] - places[None, :, :]).transpose(2, 0, 1))
        kernel = kernel_values(self.kernel, distance, self.length)
        correlation = self.share * kernel + (1 - self.share) * np.eye(len(places))
        return self.sigma**2 * correlation

    def factor(self, places: np.ndarray) -> tuple:
        """The Cholesky factor of ``covariance(places)`` (scipy's ``cho_factor``, lower)."""
        covariance = self.covariance(places)
        covariance[np.diag_indices_from(covariance)] *= 1 + 1e-9  # rounding's room
        return cho_factor(covariance, lower=True)

    def describe(self) -> str:
        return (
            f"σ {self.sigma:.3g} from {self.pixels} pixels at {self.radii[0]:.1f}–"
            f"{self.radii[1]:.1f} px; {self.kernel} ℓ {self.length:.2f} px, correlated share "
            f"{self.share:.2f}"
        )


def annulus_mask(
    shape: tuple[int, int],
    star: tuple[float, float],
    place: tuple[float, float],
    width: float,
    masked: float,
) -> np.ndarray:
    """The pixels (bool, ``shape``) of the annulus of ``width`` about the ``star`` (x, y)
    through ``place`` (x, y), farther than ``masked`` from ``place``."""
    yy, xx = np.indices(shape, dtype=np.float64)
    radius = np.hypot(xx - star[0], yy - star[1])
    separation = np.hypot(place[0] - star[0], place[1] - star[1])
    inside = np.abs(radius - separation) <= width / 2
    return inside & (np.hypot(xx - place[0], yy - place[1]) > masked)


def empirical_correlation(
    image: np.ndarray, mask: np.ndarray, max_lag: float
) -> tuple[np.ndarray, np.ndarray]:
    """The correlation of ``image``'s pixels in ``mask`` (mean removed) at each lag
    0 < |lag| ≤ ``max_lag`` averaged over at least LEAST_PAIRS pairs: (distances, ρ)."""
    values = np.where(mask, image - image[mask].mean(), 0.0)
    ny, nx = image.shape
    shape = (2 * ny, 2 * nx)  # no wrap-around
    products = np.fft.irfft2(np.abs(np.fft.rfft2(values, shape)) ** 2, shape)
    pairs = np.fft.irfft2(np.abs(np.fft.rfft2(mask.astype(np.float64), shape)) ** 2, shape)
    reach = int(np.ceil(max_lag))
    lags = np.arange(-reach, reach + 1)
    dy, dx = np.meshgrid(lags, lags, indexing="ij")
    distance = np.hypot(dx, dy)
    counts = np.rint(pairs[dy % shape[0], dx % shape[1]])
    keep = (distance > 0) & (distance <= max_lag) & (counts >= LEAST_PAIRS)
    covariance = products[dy % shape[0], dx % shape[1]][keep] / counts[keep]
    variance = products[0, 0] / np.rint(pairs[0, 0])
    return distance[keep], covariance / variance


def annulus_noise(
    image: np.ndarray,
    star: tuple[float, float],
    place: tuple[float, float],
    *,
    width: float,
    masked: float,
    max_lag: float,
    kernel: str = "matern32",
) -> NoiseModel:
    """The noise model of ``image`` on the annulus of ``width`` (pixels) about the ``star``
    (x, y) through the companion's ``place`` (x, y), without the pixels within ``masked``
    of it (see the module's docstring); ValueError where the annulus has too few pixels."""
    mask = annulus_mask(image.shape, star, place, width, masked) & np.isfinite(image)
    count = int(mask.sum())
    if count < 2 * LEAST_PAIRS:
        raise ValueError(f"the annulus holds {count} finite pixels: too few to measure noise")
    sigma = float(np.std(image[mask], ddof=1))
    separation = float(np.hypot(place[0] - star[0], place[1] - star[1]))
    radii = (max(separation - width / 2, 0.0), separation + width / 2)
    if kernel == "diagonal":
        return NoiseModel(sigma, 1.0, 0.0, kernel, count, radii)
    distance, rho = empirical_correlation(image, mask, max_lag)

    def misfit(parameters: np.ndarray) -> np.ndarray:
        share, length = parameters
        return share * kernel_values(kernel, distance, length) - rho

    fitted = least_squares(misfit, x0=[0.8, 1.0], bounds=([0.0, 0.05], [1.0, 4 * max_lag]))
    share, length = (float(v) for v in fitted.x)
    return NoiseModel(sigma, length, share, kernel, count, radii)
