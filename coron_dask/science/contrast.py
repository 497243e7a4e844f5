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

The 5σ contrast is then threshold / (throughput × star peak), the throughput averaged over
position angles and interpolated in separation between the injected ones (not beyond).
The science products are never touched: a contrast run writes only its own outputs.
"""

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from dask.base import tokenize

from coron_dask.core.errors import CoronInputError
from coron_dask.io import Extension, Product
from coron_dask.kernels.fourier_shift import fourier_shift
from coron_dask.kernels.inject import inject_block
from coron_dask.science.photometry import find_candidates, noise_profile, snr_map
from coron_dask.steps import median_replace_img
from coron_dask.steps.klip import kl_cutoffs, subtract
from coron_dask.steps.resample import pixel_scale, resample, sky_wcs

log = logging.getLogger(__name__)

#: Pivot wavelengths (µm) of the filters JWST's coronagraphs are used with (JDox).
PIVOT_UM = {
    "F182M": 1.839,
    "F187N": 1.874,
    "F200W": 1.990,
    "F210M": 2.093,
    "F212N": 2.120,
    "F250M": 2.503,
    "F277W": 2.786,
    "F300M": 2.996,
    "F322W2": 3.247,
    "F335M": 3.362,
    "F356W": 3.563,
    "F360M": 3.624,
    "F410M": 4.082,
    "F430M": 4.281,
    "F444W": 4.421,
    "F460M": 4.630,
    "F480M": 4.818,
    "F1065C": 10.575,
    "F1140C": 11.303,
    "F1550C": 15.514,
    "F2300C": 22.75,
}
#: JWST's diameter for λ/D (m).
DIAMETER_M = 6.5
#: Significance of the detection limit.
SIGMA = 5.0


def lambda_over_d(filter_name: str, pixel_scale_deg: float) -> float:
    """λ/D in pixels of ``pixel_scale_deg`` at the pivot wavelength of ``filter_name``."""
    pivot = PIVOT_UM.get(str(filter_name).upper())
    if pivot is None:
        raise CoronInputError(
            "FILTER",
            f"{filter_name!r} has no pivot wavelength in coron-dask's table: give the "
            "resolution element in pixels (--resolution)",
        )
    return math.degrees(pivot * 1e-6 / DIAMETER_M) / pixel_scale_deg


def read_offaxis_psf(path: str | Path, star_flux: float | None = None) -> np.ndarray:
    """The star's off-axis (unocculted) PSF from a FITS file (its SCI extension, or its
    primary image) as an odd box (float64) centred on its centroid; its sum is the star's
    flux in the calints' units, or rescaled to ``star_flux``."""
    path = Path(path)
    try:
        with fits.open(path) as hdul:
            hdu = hdul["SCI"] if "SCI" in hdul else hdul[0]
            image = None if hdu.data is None else np.asarray(hdu.data, dtype=np.float64)
    except (OSError, ValueError) as error:
        raise CoronInputError(path, f"cannot read the off-axis PSF ({error})") from None
    if image is None or image.ndim != 2:
        raise CoronInputError(path, "the off-axis PSF must be a 2-D image (SCI or primary)")
    image = np.nan_to_num(image)
    if image.sum() <= 0:
        raise CoronInputError(path, "the off-axis PSF has no positive flux")
    weights = np.clip(image, 0, None)
    yy, xx = np.indices(image.shape)
    centre = np.array([(xx * weights).sum(), (yy * weights).sum()]) / weights.sum()
    nearest = np.floor(centre + 0.5).astype(int)
    moved = fourier_shift(image, nearest - centre)  # the centroid onto a pixel centre
    half_x = min(nearest[0], image.shape[1] - 1 - nearest[0])
    half_y = min(nearest[1], image.shape[0] - 1 - nearest[1])
    if min(half_x, half_y) < 2:
        raise CoronInputError(path, "the off-axis PSF's centroid is at its edge")
    box = moved[nearest[1] - half_y : nearest[1] + half_y + 1, nearest[0] - half_x :][
        :, : 2 * half_x + 1
    ]
    if star_flux is not None:
        box = box * (star_flux / box.sum())
    return box


@dataclass(frozen=True)
class Companion:
    """A synthetic companion: its set (one reduction each), separation (arcsec), position
    angle (degrees east of north) and contrast to the star."""

    set: int
    separation: float
    position_angle: float
    contrast: float


def companion_sets(
    separations: list[float], position_angles: list[float], contrast: float
) -> list[list[Companion]]:
    """One set per position angle θ, each with a companion at every separation: the odd
    ones at θ + 180°, so that neighbours in a set lie two steps apart."""
    return [
        [
            Companion(i, float(s), (theta + 180.0 * (j % 2)) % 360.0, contrast)
            for j, s in enumerate(separations)
        ]
        for i, theta in enumerate(position_angles)
    ]


def star_position(keywords: Mapping, source: object) -> SkyCoord:
    """The star's place on the sky: TARG_RA, TARG_DEC of the primary ``keywords`` of
    ``source`` (a science exposure, a product)."""
    try:
        return SkyCoord(float(keywords["TARG_RA"]), float(keywords["TARG_DEC"]), unit="deg")
    except KeyError:
        raise CoronInputError(
            source, "no TARG_RA/TARG_DEC in the primary header: the star's place is needed"
        ) from None


def sky_positions(star: SkyCoord, companions: list[Companion]) -> SkyCoord:
    """The companions' places on the sky."""
    angles = np.array([c.position_angle for c in companions]) * u.deg
    separations = np.array([c.separation for c in companions]) * u.arcsec
    return star.directional_offset_by(angles, separations)


def pixel_positions(wcs: WCS, places: SkyCoord) -> np.ndarray:
    """(n, 2) = (x, y) 0-based pixels of ``places`` on ``wcs``."""
    ra, dec = np.atleast_1d(places.ra.deg), np.atleast_1d(places.dec.deg)
    return np.column_stack(wcs.world_to_pixel_values(ra, dec))


def _injected(
    exposure: xr.Dataset, positions: np.ndarray, fluxes: np.ndarray, psf: np.ndarray, alone: bool
) -> xr.Dataset:
    """``exposure`` with companions added to SCI (lazy), or the companions alone (made
    from nothing: no science read for them)."""
    sci = exposure["sci"].data
    if alone:
        sci = da.zeros(sci.shape, chunks=sci.chunks, dtype=np.float32)
    data = da.map_blocks(
        inject_block,
        sci,
        positions,
        fluxes,
        psf,
        alone,
        dtype=np.float32,
        name=f"inject-{'model' if alone else 'sci'}-" + tokenize(sci, positions, fluxes, psf),
    )
    return exposure.assign(sci=exposure["sci"].copy(data=data))


def injected_psfsubs(
    reduction, psf: np.ndarray, members: list[Companion], star: SkyCoord
) -> tuple[list[xr.Dataset], list[xr.Dataset]]:
    """Per science exposure of ``reduction``: the psfsub of its flagged cube with the
    companions ``members`` of the off-axis ``psf`` added (filled and subtracted on the
    science's own KL basis, as the science is), and the companions alone (lazy)."""
    p = reduction.parameters
    places = sky_positions(star, members)
    fluxes = np.array([c.contrast for c in members])  # the PSF's sum is the star's flux
    subs, models = [], []
    for exposure, basis in zip(reduction.science, reduction.bases, strict=True):
        positions = pixel_positions(sky_wcs(exposure), places)
        injected = _injected(exposure, positions, fluxes, psf, alone=False)
        filled = median_replace_img(injected, p["median_box_length"], p["bad_bits"])
        subs.append(subtract(filled, basis))
        models.append(_injected(exposure, positions, fluxes, psf, alone=True))
    return subs, models


@dataclass
class Injections:
    """The injection reduction, lazy: the science i2d, the i2d of each set injected and of
    each set's companions alone, with the i2d's WCS, the star's place and the companions."""

    product: Product
    grid: WCS
    star: SkyCoord
    companions: list[list[Companion]]


def build_injections(
    reduction, psf: np.ndarray, companions: list[list[Companion]], output_dir: Path, name: str
) -> Injections:
    """The injection reduction of ``reduction`` (``pipeline.reduce_observation``) for
    ``companions`` (``companion_sets``) of the off-axis ``psf`` (odd box, the star's flux):
    a product ``<name>_injections.fits``: SCI the science i2d, INJECTED and MODEL one
    plane per set (the set injected and reduced; its companions alone, drizzled)."""
    p = reduction.parameters
    science = reduction.science
    star = star_position(science[0].attrs, science[0].encoding.get("source", "science"))
    injected_i2d, model_i2d = [], []
    for members in companions:
        subs, models = injected_psfsubs(reduction, psf, members, star)
        injected_i2d.append(resample(subs, science, orientation=p["orientation"])[0]["sci"].data)
        model_i2d.append(resample(models, science, orientation=p["orientation"])[0]["sci"].data)
    i2d, grid = resample(reduction.psfsubs, science, orientation=p["orientation"])
    header = dict(grid.to_header())
    dims = i2d["sci"].dims
    extensions = [
        Extension("SCI", i2d["sci"].data, header, dims),
        Extension("INJECTED", da.stack(injected_i2d), header, ("set", *dims)),
        Extension("MODEL", da.stack(model_i2d), header, ("set", "y", "x")),
    ]
    primary = {
        **science[0].attrs,
        "DATAMODL": "ImageModel",
        "INJCON": (companions[0][0].contrast, "contrast of each injected companion"),
        "NINJSETS": (len(companions), "sets of injected companions (INJECTED planes)"),
    }
    product = Product(output_dir / f"{name}_injections.fits", primary, extensions)
    return Injections(product, grid, star, companions)


def default_separations(exposure: xr.Dataset, star: SkyCoord, resolution: float, count: int = 10):
    """``count`` separations (arcsec) from 3 λ/D to 2 λ/D inside the nearest edge of the
    science field (NON_SCIENCE columns excluded) seen from the star."""
    wcs = sky_wcs(exposure)
    x, y = pixel_positions(wcs, star)[0]
    ny, nx = exposure.sizes["y"], exposure.sizes["x"]
    edge = min(x, y, nx - 1 - x, ny - 1 - y)
    outer = edge - 2 * resolution
    if outer <= 3 * resolution:
        raise CoronInputError(
            exposure.encoding.get("source", "science"),
            f"the star is {edge:.1f} px from the frame's edge: no room to inject companions",
        )
    scale = pixel_scale_arcsec(wcs)
    return list(np.linspace(3 * resolution, outer, count) * scale)


def pixel_scale_arcsec(wcs: WCS) -> float:
    """The pixel side of a celestial WCS, arcsec."""
    return pixel_scale(wcs.celestial) * 3600


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
) -> tuple[Table, Table]:
    """The contrast curve (one row per separation and KL cutoff) and the measurements of
    every injected companion, from the science i2d (kl, y, x), the injected i2ds
    (set, kl, y, x) and the companions' model i2ds (set, y, x)."""
    scale = pixel_scale_arcsec(grid)
    centre = pixel_positions(grid, star)[0]
    rows = []
    for members, planes, alone in zip(companions, injected, model, strict=True):
        for companion, (x, y) in zip(
            members, pixel_positions(grid, sky_positions(star, members)), strict=True
        ):
            inside = _aperture(alone, x, y, resolution / 2) & np.isfinite(alone)
            near = _aperture(alone, x, y, resolution) & np.isfinite(alone)
            if not inside.any():
                continue
            injected_flux = float(alone[inside].sum())
            recovered = [
                float(np.nansum((planes[k] - science[k])[inside])) / injected_flux
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
                }
            )
    if not rows:
        raise CoronInputError("separations", "no injected companion landed in the i2d")
    measured = Table(rows=rows)
    measured["separation"].unit = "arcsec"
    measured["position_angle"].unit = "deg"
    star_peak = float(np.median(measured["star_peak"]))
    injected_at = np.unique(measured["separation"])
    mean_throughput = np.array(
        [np.mean(measured["throughput"][measured["separation"] == s], axis=0) for s in injected_at]
    )  # (separations, kl)
    step = resolution / 2 * scale
    separations = np.arange(injected_at[0], injected_at[-1] + step / 2, step)
    curve = []
    masked = {}
    for k, cutoff in enumerate(cutoffs):
        image, masked[cutoff] = without_candidates(science[k], tuple(centre), resolution)
        noise = noise_profile(image, tuple(centre), resolution, separations / scale, SIGMA)
        throughput = np.interp(separations, injected_at, mean_throughput[:, k])
        limit = noise.threshold / (np.where(throughput > 0, throughput, np.nan) * star_peak)
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


def contrast_curve(
    asn: str | Path,
    output_dir: str | Path = ".",
    *,
    offaxis_psf: str | Path,
    star_flux: float | None = None,
    separations: list[float] | None = None,
    position_angles: tuple[float, ...] = (0.0, 120.0, 240.0),
    inject_contrast: float = 1e-4,
    resolution: float | None = None,
    psfmask: str | Path | None = None,
    execution: dict | None = None,
    **parameters: object,
) -> list[Path]:
    """Measure the 5σ contrast curve of an association (see the module's docstring) and
    write ``<product>_contrast.ecsv`` (one row per separation and KL cutoff; the injected
    companions' measurements in its metadata), ``<product>_contrast.png`` and
    ``<product>_injections.fits`` (the science i2d, each injected set's i2d, the
    companions' model i2ds); return their paths.

    ``offaxis_psf``: the star unocculted (FITS image, the calints' units; ``star_flux``
    rescales it to that total). ``separations`` (arcsec; default: 10 from 3 λ/D to the
    field's edge) × ``position_angles`` (degrees east of north, one set each) companions of
    ``inject_contrast``. ``resolution``: λ/D in pixels (default: from FILTER's pivot
    wavelength). ``parameters``: those of ``build_products`` (the science reduction's);
    ``execution``: those of ``pipeline.execute_on_cluster``.
    """
    from coron_dask.pipeline.build import find_psfmask, reduce_observation
    from coron_dask.pipeline.run import check_inputs, execute_on_cluster, observation_bytes
    from coron_dask.quicklook.plots import contrast_figure

    psfmask = find_psfmask(asn, psfmask)
    parameters, observation = check_inputs(asn, output_dir, psfmask=psfmask, **parameters)
    if "resample" in parameters["skip"]:
        raise CoronInputError("skip", "the contrast curve is measured on the i2d: keep resample")
    if not inject_contrast > 0:
        raise CoronInputError("inject_contrast", f"must be > 0, got {inject_contrast}")
    parameters["save_psfalign"] = False  # the aligned references go to a scratch file
    psf = read_offaxis_psf(offaxis_psf, star_flux)
    first = observation.science[0]
    star = star_position(first.attrs, first.encoding.get("source", "science"))
    scale = pixel_scale_arcsec(sky_wcs(first))
    if resolution is None:
        resolution = lambda_over_d(first.attrs.get("FILTER", "?"), scale / 3600)
        log.info("contrast: λ/D %.2f px (%s)", resolution, first.attrs.get("FILTER"))
    if separations is None:
        separations = default_separations(first, star, resolution)
    if min(separations) <= 0:
        raise CoronInputError("separations", f"must be > 0 arcsec, got {separations}")
    companions = companion_sets(sorted(separations), list(position_angles), inject_contrast)
    log.info(
        "contrast: %d set(s) of %d companions of contrast %g, %.3g to %.3g arcsec",
        len(companions),
        len(separations),
        inject_contrast,
        min(separations),
        max(separations),
    )
    name = observation.association.product_name
    output_dir = Path(output_dir)
    built: dict = {}

    def build(workers) -> list[Product]:
        reduction = reduce_observation(
            asn,
            output_dir,
            psfmask=psfmask,
            workers=workers,
            injections=len(companions),
            opened=observation,
            **parameters,
        )
        built["injections"] = build_injections(reduction, psf, companions, output_dir, name)
        scratch = [product for product in reduction.products if product.scratch]
        return [*scratch, built["injections"].product]

    data = observation_bytes(observation, parameters["align_to"])
    paths = execute_on_cluster(build, data_bytes=data, **(execution or {}))
    injections = built["injections"]
    with fits.open(injections.product.path) as hdul:
        science, injected, model = (
            hdul[n].data.astype(np.float64) for n in ("SCI", "INJECTED", "MODEL")
        )
    cutoffs = kl_cutoffs(parameters["truncate"])
    if len(cutoffs) == 1:  # jwst's layout: no kl axis
        science, injected = science[None], injected[:, None]
    table, measured = measure(
        science, injected, model, injections.grid, star, companions, resolution, cutoffs
    )
    table.meta["filter"] = str(first.attrs.get("FILTER", ""))
    table.meta["injected_contrast"] = inject_contrast
    table.meta["injections"] = [
        dict(zip(measured.colnames, row, strict=True)) for row in measured.iterrows()
    ]
    ecsv = output_dir / f"{name}_contrast.ecsv"
    partial = ecsv.with_name(ecsv.name + ".partial")
    table.write(partial, format="ascii.ecsv", overwrite=True)
    partial.replace(ecsv)
    png = contrast_figure(table, output_dir / f"{name}_contrast.png")
    for line in summary(table):
        log.info("contrast: %s", line)
    return [*paths, ecsv, png]


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
