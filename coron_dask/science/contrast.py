"""Contrast curve: the 5σ detection limit against separation, calibrated by injecting and
recovering synthetic companions through the science reduction's own graph.

The limit is Mawet et al. (2014)'s: the noise of the final image (the i2d, each KL
cutoff) in annuli one resolution element (λ/D) wide, with Student's t over the independent
elements at each separation (``photometry.noise_profile``): the peak a companion needs to
be as improbable under the noise as a 5σ Gaussian event. Converting that peak to a contrast
needs two numbers the same image cannot give, measured by injection:

- the throughput of the reduction: KLIP (and alignment residuals, and the drizzle onto the
  sky) takes part of a companion away. Off-axis PSFs of known contrast are added to the
  science integrations (``kernels.inject``) at several separations and position angles on
  the sky, and reduced exactly as the science: the same fill, the same KL basis of the
  same aligned references (each cutoff), the same resample and weights. KLIP is linear in
  the science frames, so what survives is the injected i2d minus the science i2d, to the
  rounding of float32; the companions are injected in sets, each set's companions far
  enough apart not to touch, and every set is one more subtraction on bases built once.
- the star's peak in the i2d: the same companions drizzled without KLIP (their model).
- the coronagraph's transmission at each companion's place: the injected companions are
  dimmed by it in each roll (``science.transmission``), their models are not; the
  throughput is the recovered flux over the model's divided by the transmission (the mean
  over the rolls, weighted by their integrations, as the i2d weighs them).

The 5σ contrast is then threshold / (throughput × transmission × star peak), throughput
and transmission averaged over position angles and interpolated in separation between the
injected ones (not beyond).
The injections are ``science.injection``'s; ``pipeline.contrast.contrast_curve`` runs
them with the science reduction and writes the curve. The science products are never
touched: a contrast run writes only its own outputs.
"""

import logging

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import Table
from astropy.wcs import WCS

from coron_dask.core.errors import CoronInputError
from coron_dask.science.geometry import pixel_positions, pixel_scale_arcsec, sky_positions
from coron_dask.science.injection import Companion
from coron_dask.science.photometry import find_candidates, noise_profile, snr_map

log = logging.getLogger(__name__)

#: Significance of the detection limit.
SIGMA = 5.0


def _aperture(image: np.ndarray, x: float, y: float, radius: float) -> np.ndarray:
    """Mask of the pixels whose centres lie within ``radius`` of (x, y)."""
    yy, xx = np.indices(image.shape)
    return np.hypot(xx - x, yy - y) <= radius


def measure(
    science: np.ndarray,
    injected: np.ndarray,
    model: np.ndarray,
    grid: WCS,
    star: SkyCoord,
    companions: list[list[Companion]],
    resolution: float,
    cutoffs: tuple[int, ...],
    transmissions: list[np.ndarray] | None = None,
    integrations: np.ndarray | None = None,
) -> tuple[Table, Table]:
    """The contrast curve (one row per separation and KL cutoff) and the measurements of
    every injected companion, from the science i2d (kl, y, x), the injected i2ds
    (set, kl, y, x), the companions' model i2ds (set, y, x) and the transmission that
    dimmed each companion (per set: science exposure × member; None: 1) in exposures of
    ``integrations`` (their weights)."""
    scale = pixel_scale_arcsec(grid)
    centre = pixel_positions(grid, star)[0]
    if transmissions is None:
        transmissions = [np.ones((1, len(members))) for members in companions]
    weights = np.ones(len(transmissions[0])) if integrations is None else integrations
    rows = []
    for members, planes, alone, dimmed in zip(
        companions, injected, model, transmissions, strict=True
    ):
        for companion, (x, y), rolls in zip(
            members, pixel_positions(grid, sky_positions(star, members)), dimmed.T, strict=True
        ):
            inside = _aperture(alone, x, y, resolution / 2) & np.isfinite(alone)
            near = _aperture(alone, x, y, resolution) & np.isfinite(alone)
            if not inside.any():
                continue
            transmission = float(np.average(rolls, weights=weights))
            injected_flux = float(alone[inside].sum()) * transmission
            recovered = [
                float(np.nansum((planes[k] - science[k])[inside])) / injected_flux
                if injected_flux > 0
                else np.nan
                for k in range(len(cutoffs))
            ]
            rows.append(
                {
                    "set": companion.set,
                    "separation": companion.separation,
                    "position_angle": companion.position_angle,
                    "x": float(x),
                    "y": float(y),
                    "contrast": companion.contrast,
                    "star_peak": float(alone[near].max()) / companion.contrast,
                    "throughput": recovered,
                    "transmission": transmission,
                    "transmission_rolls": [float(t) for t in rolls],
                }
            )
    if not rows:
        raise CoronInputError("separations", "no injected companion landed in the i2d")
    measured = Table(rows=rows)
    measured["separation"].unit = "arcsec"
    measured["position_angle"].unit = "deg"
    star_peak = float(np.median(measured["star_peak"]))
    injected_at = np.unique(measured["separation"])
    at = [measured["separation"] == s for s in injected_at]
    hidden = int(np.sum(np.asarray(measured["transmission"]) <= 0))
    if hidden:
        log.info("contrast: %d companion(s) where the transmission is 0: no throughput", hidden)
    with np.errstate(invalid="ignore"):  # a separation all behind the mask: NaN
        mean_throughput = np.array(
            [
                np.nansum(measured["throughput"][here], axis=0)
                / np.isfinite(measured["throughput"][here]).sum(axis=0)
                for here in at
            ]
        )  # (separations, kl): the mean of those with a throughput
    mean_transmission = np.array([np.mean(measured["transmission"][here]) for here in at])
    step = resolution / 2 * scale
    separations = np.arange(injected_at[0], injected_at[-1] + step / 2, step)
    curve = []
    masked = {}
    for k, cutoff in enumerate(cutoffs):
        image, masked[cutoff] = without_candidates(science[k], tuple(centre), resolution)
        noise = noise_profile(image, tuple(centre), resolution, separations / scale, SIGMA)
        throughput = np.interp(separations, injected_at, mean_throughput[:, k])
        transmission = np.interp(separations, injected_at, mean_transmission)
        limit = noise.threshold / (
            np.where(throughput > 0, throughput, np.nan) * transmission * star_peak
        )
        for i, separation in enumerate(separations):
            curve.append(
                {
                    "kl": cutoff,
                    "separation": separation,
                    "separation_lambda_d": separation / scale / resolution,
                    "noise": noise.std[i],
                    "threshold": noise.threshold[i],
                    "n_elements": noise.n[i],
                    "throughput": throughput[i],
                    "transmission": transmission[i],
                    "contrast": limit[i],
                }
            )
    table = Table(rows=curve)
    table["separation"].unit = "arcsec"
    table.meta.update(
        {
            "significance": SIGMA,
            "resolution_pixels": resolution,
            "pixel_scale_arcsec": scale,
            "star_peak": star_peak,
            "star_pixel": [float(v) for v in centre],
            "masked_candidates": masked,
        }
    )
    return table, measured


#: Radius (resolution elements) around a detected source left out of the noise.
CANDIDATE_MASK = 2.0


def without_candidates(
    image: np.ndarray, star: tuple[float, float], resolution: float
) -> tuple[np.ndarray, list[list[float]]]:
    """``image`` with the sources the detection map finds above 5σ (real companions)
    masked (NaN within CANDIDATE_MASK resolution elements), as their light is not noise;
    and their places (x, y)."""
    snr, significance = snr_map(image, star, resolution)
    found = find_candidates(significance, snr, SIGMA, resolution=resolution, star=star)
    out = image.copy()
    for x, y in zip(found["x"], found["y"], strict=True):
        out[_aperture(out, x, y, CANDIDATE_MASK * resolution)] = np.nan
    if len(found):
        log.info("contrast: %d source(s) above %gσ left out of the noise", len(found), SIGMA)
    return out, [[float(x), float(y)] for x, y in zip(found["x"], found["y"], strict=True)]


def summary(table: Table, count: int = 8) -> list[str]:
    """The curve in a few lines: the 5σ contrast at ``count`` separations per KL cutoff."""
    lines = []
    for cutoff in np.unique(table["kl"]):
        rows = table[table["kl"] == cutoff]
        rows = rows[np.linspace(0, len(rows) - 1, min(count, len(rows))).astype(int)]
        pairs = ", ".join(
            f'{s:.2f}" {c:.2e}' for s, c in zip(rows["separation"], rows["contrast"], strict=True)
        )
        lines.append(f"KL {cutoff}: {pairs}")
    return lines
