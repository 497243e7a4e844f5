"""A companion's likelihood: its forward model in every roll, against the data, weighed by
the annulus noise.

A companion has a separation (arcsec), a position angle (degrees east of north) and a
contrast to the star. In each science exposure (a roll) it falls on a detector place
through the exposure's WCS, dimmed by the coronagraph's transmission there
(``science.transmission``); its image is the off-axis PSF (whose sum is the star's flux)
times the contrast, moved to that place (``kernels.forward_model.placed_psfs``), and
reduced by KLIP exactly (``kernels.forward_model``): its integration-mean psfsub on a stamp
of pixels about the start is A·c, A made once per roll from the KL images on the window.
The one step of the reduction that is not linear, align_refs' median fill of bad pixels,
is left out of the model: a filled pixel's value is the median of its neighbours', which
the speckles choose; the pixels filled in any integration are left out of the stamp,
and through KLIP's projection the fill moves the rest by at most ~1e-3 of the
companion's peak (``tests/test_companions.py``).

The data are each roll's integration-mean psfsub at the cutoff fitted (the i2d's
combination of an exposure's integrations, whose weights do not change from one
integration to the next), the noise that of its annulus (``science.companion_noise``),
rolls independent. The sky-to-detector map is linearised about the start (every step of
the sampler then costs no WCS call); ``linearisation_error`` says how far that is from
the WCS over the sampler's range.
"""

from dataclasses import dataclass

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS
from scipy.linalg import cho_solve, solve_triangular

from coron_dask.kernels.forward_model import forward_model, mean_operator, placed_psfs
from coron_dask.science.companion_noise import annulus_noise
from coron_dask.science.geometry import pixel_positions
from coron_dask.science.transmission import Transmission


@dataclass
class Roll:
    """What a fit takes of one science exposure: its ``name``; ``image``, the
    integration-mean psfsub at the cutoff fitted (ny, nx); the KL images on the window
    (m, K, wy, wx; the first ``cutoff`` are used), the window's zone ``labels`` (wy, wx)
    and the zones' pixel counts ``sizes``; the window's first pixel ``corner`` (y0, x0);
    the pixels filled by align_refs in any integration, ``bad`` (wy, wx); the exposure's
    celestial ``wcs``; with ADI, ``adi`` what the negative injection needs
    (``science.companion_adi.AdiWindows``) in place of the KL images."""

    name: str
    image: np.ndarray
    images: np.ndarray | None
    labels: np.ndarray
    sizes: np.ndarray
    corner: tuple[int, int]
    bad: np.ndarray
    wcs: WCS
    adi: object | None = None


def window_for(place: tuple[float, float], half: int, margin: int) -> tuple[np.ndarray, tuple]:
    """The window (corner (y0, x0), shape) that holds a PSF box of ``half`` pixels either
    side of its centre anywhere within ``margin`` pixels of ``place`` (x, y)."""
    ix, iy = (int(np.floor(v + 0.5)) for v in place)
    reach = half + margin + 1
    return np.array([iy - reach, ix - reach]), (2 * reach + 1, 2 * reach + 1)


def sky_place(star: SkyCoord, separation, position_angle) -> SkyCoord:
    """The sky place ``separation`` arcsec from the star at ``position_angle`` degrees E of N."""
    return star.directional_offset_by(
        np.asarray(position_angle) * u.deg, np.asarray(separation) * u.arcsec
    )


def detector_place(wcs: WCS, star: SkyCoord, separation, position_angle) -> np.ndarray:
    """(n, 2) = (x, y) detector pixels of companions at (separation, position angle)."""
    return pixel_positions(wcs, sky_place(star, separation, position_angle))


def offsets(separation, position_angle) -> tuple[np.ndarray, np.ndarray]:
    """East and north offsets (arcsec) of (separation, position angle)."""
    angle = np.radians(position_angle)
    return separation * np.sin(angle), separation * np.cos(angle)


class CompanionModel:
    """The log-likelihood of a companion's parameters θ = (separation, position angle,
    contrast) given ``rolls`` (see the module's docstring), vectorised over rows of θ.

    ``psf``: the off-axis PSF box (its sum the star's flux), cut to ``half`` pixels about
    its centre; ``start`` (separation, position angle) where the windows were made and the
    stamps are centred; ``resolution`` λ/D in pixels; ``margin`` (pixels) how far a place
    may move from the start's in any roll; ``stamp`` the radius (pixels) of the pixels
    fitted; ``noise`` the annulus settings (``annulus_noise``'s width, masked, max_lag,
    kernel, in pixels)."""

    #: The model, in words (a product's row says it).
    method = "exact RDI forward model"

    def __init__(
        self,
        rolls: list[Roll],
        psf: np.ndarray,
        star: SkyCoord,
        start: tuple[float, float],
        *,
        cutoff: int,
        half: int | None,
        margin: float,
        stamp: float,
        noise: dict,
        transmission: Transmission | None = None,
    ) -> None:
        self.rolls, self.star, self.start, self.cutoff = rolls, star, start, cutoff
        self.star_flux = float(psf.sum())
        if half is not None and 2 * half + 1 < min(psf.shape):
            cy, cx = psf.shape[0] // 2, psf.shape[1] // 2
            psf = psf[cy - half : cy + half + 1, cx - half : cx + half + 1]
        self.psf = psf
        self.spectrum = np.fft.rfft2(psf)
        self.margin = margin
        self.transmission = transmission or Transmission(None, "none")
        self.xi0, self.eta0 = offsets(*start)
        self.origins, self.jacobians, self.stamps, self.data = [], [], [], []
        self.factors, self.operators, self.noise = [], [], []
        for roll in rolls:
            origin = detector_place(roll.wcs, star, *start)[0]
            self.origins.append(origin)
            self.jacobians.append(self._jacobian(roll.wcs))
            self._stamp(roll, origin, stamp, noise)

    def _jacobian(self, wcs: WCS) -> np.ndarray:
        """d(x, y)/d(east, north) (pixels per arcsec) at the start, by central differences
        over a tenth of a pixel."""
        step = 0.1 * np.sqrt(abs(np.linalg.det(wcs.celestial.pixel_scale_matrix))) * 3600
        columns = []
        for d_east, d_north in ((step, 0.0), (0.0, step)):
            places = []
            for sign in (1, -1):
                east, north = self.xi0 + sign * d_east, self.eta0 + sign * d_north
                separation = np.hypot(east, north)
                angle = np.degrees(np.arctan2(east, north))
                places.append(detector_place(wcs, self.star, separation, angle)[0])
            columns.append((places[0] - places[1]) / (2 * step))
        return np.column_stack(columns)

    def _stamp(self, roll: Roll, origin: np.ndarray, radius: float, noise: dict) -> None:
        """The roll's stamp (pixels fitted), its data, noise model, Cholesky factor and
        forward-model operator."""
        y0, x0 = roll.corner
        wy, wx = roll.labels.shape
        yy, xx = np.indices((wy, wx))
        local = origin - (x0, y0)
        frame = roll.image.shape
        gy, gx = yy + y0, xx + x0
        inside = (gy >= 0) & (gy < frame[0]) & (gx >= 0) & (gx < frame[1])
        values = np.full((wy, wx), np.nan)
        values[inside] = roll.image[gy[inside], gx[inside]]
        near = np.hypot(xx - local[0], yy - local[1]) <= radius
        kept = near & np.isfinite(values) & (roll.labels >= 0) & ~roll.bad
        stamp = np.flatnonzero(kept)
        if len(stamp) < 4:
            raise ValueError(f"{roll.name}: {len(stamp)} pixels to fit about the companion")
        star = pixel_positions(roll.wcs, self.star)[0]
        model = annulus_noise(roll.image, tuple(star), tuple(origin), **noise)
        places = np.column_stack([xx.ravel()[stamp], yy.ravel()[stamp]]).astype(np.float64)
        self.stamps.append(stamp)
        self.data.append(values.ravel()[stamp])
        self.noise.append(model)
        self.factors.append(model.factor(places))
        self.operators.append(self._operator(roll, stamp))

    def _operator(self, roll: Roll, stamp: np.ndarray) -> np.ndarray:
        """The matrix that makes a companion's integration-mean psfsub on the ``stamp``
        (flat window pixels) from its image on the window (``mean_operator``)."""
        images = roll.images[:, : self.cutoff]
        return mean_operator(images, roll.labels, roll.sizes, stamp, self.cutoff)

    def places(self, theta: np.ndarray) -> list[np.ndarray]:
        """Per roll, the detector places (n, 2) = (x, y) of θ (n, 3), linearised."""
        east, north = offsets(theta[:, 0], theta[:, 1])
        moved = np.column_stack([east - self.xi0, north - self.eta0])
        return [o + moved @ j.T for o, j in zip(self.origins, self.jacobians, strict=True)]

    def linearisation_error(self, radius: float | None = None) -> float:
        """The largest distance (pixels) between the linearised and the WCS's places at
        ``radius`` pixels (default: the margin) about the start, in any roll."""
        radius = self.margin if radius is None else radius
        angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        worst = 0.0
        for k, (roll, jacobian) in enumerate(zip(self.rolls, self.jacobians, strict=True)):
            moved = np.linalg.solve(jacobian, radius * np.stack([np.cos(angles), np.sin(angles)]))
            east, north = self.xi0 + moved[0], self.eta0 + moved[1]
            separation, angle = np.hypot(east, north), np.degrees(np.arctan2(east, north))
            exact = detector_place(roll.wcs, self.star, separation, angle)
            linear = self.places(np.column_stack([separation, angle, np.ones_like(angle)]))
            worst = max(worst, float(np.abs(exact - linear[k]).max()))
        return worst

    def transmissions(self, theta: np.ndarray) -> np.ndarray:
        """The coronagraph's transmission (rolls, n) at each roll's place of θ (n, 3)."""
        return np.array([self.transmission.at(p) for p in self.places(theta)])

    def stamp_models(self, theta: np.ndarray) -> list[np.ndarray]:
        """Per roll, the integration-mean psfsub of the companions θ (n, 3) on its stamp
        (n, pixels)."""
        out = []
        dimming = self.transmissions(theta)
        for k, (roll, places) in enumerate(zip(self.rolls, self.places(theta), strict=True)):
            local = places - roll.corner[::-1]
            images = placed_psfs(self.spectrum, self.psf.shape, roll.labels.shape, local)
            flux = theta[:, 2] * dimming[k]
            out.append(flux[:, None] * (images.reshape(len(theta), -1) @ self.operators[k].T))
        return out

    def log_likelihood(self, theta: np.ndarray) -> np.ndarray:
        """ln L (n,) of θ (n, 3), up to a constant: −½ Σ_rolls rᵀ C⁻¹ r."""
        total = np.zeros(len(theta))
        for data, model, factor in zip(
            self.data, self.stamp_models(theta), self.factors, strict=True
        ):
            whitened = solve_triangular(factor[0], (data - model).T, lower=True)
            total -= 0.5 * np.sum(whitened**2, axis=0)
        return total

    def in_range(self, theta: np.ndarray) -> np.ndarray:
        """θ (n, 3) within the prior: separation and contrast positive, every roll's place
        within the margin of the start's (the window holds its PSF)."""
        ok = (theta[:, 0] > 0) & (theta[:, 2] > 0)
        for origin, places in zip(self.origins, self.places(theta), strict=True):
            ok &= np.hypot(*(places - origin).T) <= self.margin
        return ok

    def log_probability(self, theta: np.ndarray) -> np.ndarray:
        """ln posterior (n,) of θ (n, 3): uniform priors (``in_range``), −∞ outside."""
        theta = np.atleast_2d(theta)
        out = np.full(len(theta), -np.inf)
        ok = self.in_range(theta)
        if ok.any():
            out[ok] = self.log_likelihood(theta[ok])
        return out

    def best_contrast(self, separation: float, position_angle: float) -> float:
        """The contrast that maximises the likelihood at a place (the model is linear in
        it): Σ uᵀC⁻¹d / Σ uᵀC⁻¹u over the rolls, u the model of contrast 1."""
        theta = np.array([[separation, position_angle, 1.0]])
        numerator = denominator = 0.0
        for data, unit, factor in zip(
            self.data, self.stamp_models(theta), self.factors, strict=True
        ):
            weighted = cho_solve(factor, unit[0])
            numerator += float(weighted @ data)
            denominator += float(weighted @ unit[0])
        return numerator / denominator

    def window_model(self, theta: np.ndarray, k: int) -> np.ndarray:
        """The integration-mean psfsub (wy, wx) of the companion θ (3,) on roll ``k``'s
        window, exactly (``forward_model``, every window pixel; NaN in no zone)."""
        theta = np.asarray(theta, dtype=np.float64).reshape(1, 3)
        roll = self.rolls[k]
        local = self.places(theta)[k] - roll.corner[::-1]
        image = placed_psfs(self.spectrum, self.psf.shape, roll.labels.shape, local)[0]
        image *= theta[0, 2] * self.transmissions(theta)[k, 0]
        reduced = forward_model(image, roll.images, roll.labels, roll.sizes, self.cutoff)
        return reduced.mean(axis=0)
