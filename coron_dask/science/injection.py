"""Synthetic companions injected into the science and reduced as the science is: what
the contrast curve's throughput and star peak are measured on (see ``science.contrast``).

Off-axis PSFs of known contrast are added to the science integrations
(``kernels.inject``) at several separations and position angles on the sky, and reduced
exactly as the science: the same fill, the same KL basis of the same aligned references
(each cutoff), the same resample and weights. KLIP is linear in the science frames, so
what survives is the injected i2d minus the science i2d, to the rounding of float32; the
companions are injected in sets, each set's companions far enough apart not to touch, and
every set is one more subtraction on bases built once. The star's peak in the i2d is that
of the same companions drizzled without KLIP (their model).

Each companion is dimmed by the coronagraph's transmission at its place on the detector in
each science exposure (``science.transmission``): the same sky place falls on another pixel
in each roll. Its model is not dimmed: it is the star's PSF as the curve's contrast is
measured against, so that the recovered flux over the model's is the throughput of the
reduction times the transmission.
"""

from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS
from dask.base import tokenize

from coron_dask.core.errors import CoronInputError
from coron_dask.core.parameters import BY_NAME
from coron_dask.io import Extension, Product
from coron_dask.kernels.fourier_shift import fourier_shift
from coron_dask.kernels.inject import inject_block
from coron_dask.science.geometry import (
    pixel_positions,
    pixel_scale_arcsec,
    sky_positions,
    sky_wcs,
    star_position,
)
from coron_dask.science.transmission import Transmission
from coron_dask.steps.align_refs import median_replace_img
from coron_dask.steps.blocks import shift_block
from coron_dask.steps.klip import KLBasis, kl_basis, subtract
from coron_dask.steps.negative_injection import aligned_on_disk
from coron_dask.steps.resample import resample


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


#: The injections' primary keyword that says which transmission dimmed them (the spec's).
TRANSMISSION_KEYWORD = BY_NAME["transmission"].keyword


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


def detector_places(
    science: list[xr.Dataset], members: list[Companion], star: SkyCoord
) -> list[np.ndarray]:
    """Per science exposure: the detector pixels (n, 2) = (x, y), 0-based, of the sky places
    of ``members`` around ``star``, through the exposure's WCS (its roll)."""
    places = sky_positions(star, members)
    return [pixel_positions(sky_wcs(exposure), places) for exposure in science]


def roll_transmissions(
    science: list[xr.Dataset], members: list[Companion], star: SkyCoord, transmission: Transmission
) -> np.ndarray:
    """The transmission (exposure, member) at each companion's detector place in each
    science exposure."""
    return np.array([transmission.at(p) for p in detector_places(science, members, star)])


def injected_psfsubs(
    reduction,
    psf: np.ndarray,
    members: list[Companion],
    star: SkyCoord,
    transmission: Transmission | None = None,
) -> tuple[list[xr.Dataset], list[xr.Dataset]]:
    """Per science exposure of ``reduction``: the psfsub of its flagged cube with the
    companions ``members`` of the off-axis ``psf`` added, each dimmed by ``transmission``
    at its detector place (None: not dimmed), filled and subtracted on the science's own
    KL basis as the science is; and the companions alone, not dimmed (lazy).

    With ADI (``--mode`` ADI, ADI+RDI) the other rolls' integrations, the references, carry
    the companions too: each set gets its own KL bases (``adi_injected_basis``)."""
    p = reduction.parameters
    fluxes = np.array([c.contrast for c in members])  # the PSF's sum is the star's flux
    subs, models = [], []
    science = reduction.science
    places = detector_places(science, members, star)
    dimmed = [
        fluxes if transmission is None else fluxes * transmission.at(positions)
        for positions in places
    ]
    fill = (p["median_box_length"], p["bad_bits"])
    filled = [
        median_replace_img(_injected(exposure, positions, flux, psf, alone=False), *fill)
        for exposure, positions, flux in zip(science, places, dimmed, strict=True)
    ]
    # what each integration gains, filled as the science is (the fill is not linear at
    # bad pixels): the ADI references' companions, in their own frames
    gained = [
        injected["sci"].data - median_replace_img(exposure, *fill)["sci"].data
        for injected, exposure in zip(filled, science, strict=True)
    ]
    for k, (exposure, positions) in enumerate(zip(science, places, strict=True)):
        basis = reduction.bases[k]
        if p["mode"] != "RDI":
            psfalign = reduction.psfaligns[k]
            basis = adi_injected_basis(filled[k], psfalign, basis, science, gained, p["truncate"])
        subs.append(subtract(filled[k], basis))
        models.append(_injected(exposure, positions, fluxes, psf, alone=True))
    return subs, models


@dataclass
class Injections:
    """The injection reduction, lazy: the science i2d, the i2d of each set injected and of
    each set's companions alone, with the i2d's WCS, the star's place, the companions, the
    transmission that dimmed them (per set: exposure × member) and the integrations of each
    science exposure (what each weighs in the i2d)."""

    product: Product
    grid: WCS
    star: SkyCoord
    companions: list[list[Companion]]
    transmissions: list[np.ndarray]
    integrations: np.ndarray


def build_injections(
    reduction,
    psf: np.ndarray,
    companions: list[list[Companion]],
    output_dir: Path,
    name: str,
    transmission: Transmission | None = None,
) -> Injections:
    """The injection reduction of ``reduction`` (``pipeline.reduce_observation``) for
    ``companions`` (``companion_sets``) of the off-axis ``psf`` (odd box, the star's flux),
    dimmed by the coronagraph's ``transmission`` (None: none): a product
    ``<name>_injections.fits``: SCI the science i2d, INJECTED and MODEL one plane per set
    (the set injected and reduced; its companions alone, not dimmed, drizzled)."""
    p = reduction.parameters
    science = reduction.science
    transmission = transmission or Transmission(None, "none")
    star = star_position(science[0].attrs, science[0].encoding.get("source", "science"))
    injected_i2d, model_i2d = [], []
    for members in companions:
        subs, models = injected_psfsubs(reduction, psf, members, star, transmission)
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
        TRANSMISSION_KEYWORD[0]: _card(transmission.source, TRANSMISSION_KEYWORD[1]),
    }
    product = Product(output_dir / f"{name}_injections.fits", primary, extensions)
    dimmed = [roll_transmissions(science, members, star, transmission) for members in companions]
    integrations = np.array([exposure.sizes["integration"] for exposure in science])
    return Injections(product, grid, star, companions, dimmed, integrations)


def _card(value: str, comment: str) -> str | tuple[str, str]:
    """A keyword's text value with its comment where both fit in one 80-character card."""
    return (value, comment) if len(value) + len(comment) <= 64 else value[:68]


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


def adi_injected_basis(
    filled: xr.Dataset,
    psfalign: xr.Dataset,
    basis: KLBasis,
    science: list[xr.Dataset],
    gained: list[da.Array],
    truncate: int | tuple[int, ...],
) -> KLBasis:
    """The KL bases of one science exposure whose ADI references carry the injected
    companions: psfalign's ADI planes plus what their integrations gained (``gained``:
    per ``science`` exposure, the companions alone in its frame) moved by the same fitted
    shifts (shifting is linear: the fits are reused, never made again); the reference
    star's planes as they are. The zones and the reference choice are the science's."""
    kinds = psfalign["psf_kind"].values
    adi = np.flatnonzero(kinds == "ADI")
    first = len(kinds) - len(adi)
    if not (adi == np.arange(first, len(kinds))).all():  # ``steps.references``' order
        raise ValueError("psfalign's ADI planes must follow the reference star's")
    names = [Path(e.encoding.get("source", "science")).name for e in science]
    frames = []
    for name, number in zip(
        psfalign["psf_exposure"].values[adi], psfalign["psf_integration"].values[adi], strict=True
    ):
        k = names.index(str(name))
        frames.append(gained[k][int(np.flatnonzero(science[k]["integration"].values == number)[0])])
    fits = psfalign["fit"].data[..., first:, :]
    each = fits.ndim == 3
    companions = da.stack(frames).rechunk((fits.chunks[-2], -1, -1))
    moved = da.blockwise(
        shift_block,
        "mpyx" if each else "pyx",
        companions,
        "pyx",
        fits,
        "mpk" if each else "pk",
        concatenate=True,
        dtype=np.float32,
        name="inject-aligned-" + tokenize(companions, fits),
    )
    aligned = aligned_on_disk(basis, psfalign)
    injected = da.concatenate(
        [aligned[..., :first, :, :], aligned[..., first:, :, :] + moved], axis=-3
    )
    references = psfalign[["sci"]].assign(sci=(psfalign["sci"].dims, injected))
    return kl_basis(
        filled, references, truncate, rows=basis.rows, zones=basis.zones, chosen=basis.chosen
    )
