"""pyKLIP's Bayesian KLIP-FM astrometry in ADI+RDI as the independent reference for a
companion fitted over two rolls: ``fm.klip_dataset`` (``FMPlanetPSF``, mode "ADI+RDI") on
every science integration of both rolls, each in its own detector frame, and a PSFLibrary
of the reference star's frames as coron-dask aligned them to the first roll's first
integration (``align_to="first"``); then ``fitpsf.FMAstrometry`` (``tests.pyklip_fm``).

pyKLIP takes one frame for its output: the first roll's detector (parallactic angle 0, not
flipped). The other roll's parallactic angle is the angle that turns its detector onto the
first's, measured through the two exposures' WCSs at the companion's start, so pyKLIP's
derotation and its forward model place the companion where the first roll sees it; its own
ADI takes the other roll's integrations zone by zone by ``movement`` (its default, 3 px,
coron-dask's too). Each integration's star is its exposure's (the WCS's), and pyKLIP
shifts the second roll's frames onto the first's star itself.
"""

import json
import time
from pathlib import Path

import dask
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS
from pyklip import rdi
from pyklip.instruments.Instrument import GenericData

from coron_dask.io import write_products
from coron_dask.pipeline.build import reduce_observation
from coron_dask.science.companion_model import detector_place
from coron_dask.science.geometry import sky_wcs
from coron_dask.science.injection import read_offaxis_psf
from tests.pyklip_fm import PyklipFit, filled_integrations, klip_fm_astrometry


def reference_planes(psfalign: Path) -> np.ndarray:
    """The reference star's frames of a 3-D psfalign (KIND RDI), float64."""
    with fits.open(psfalign) as hdul:
        planes, kinds = hdul["SCI"].data, hdul["ALIGN"].data["KIND"]
    assert planes.ndim == 3, "a 3-D psfalign (align_to='first') is what pyKLIP's library takes"
    return planes[kinds == "RDI"].astype(np.float64)


def pyklip_companion_adi(
    rolls: list[tuple[np.ndarray, np.ndarray, float]],
    refs: np.ndarray,
    wcs: WCS,
    star: SkyCoord,
    psf: np.ndarray,
    start: tuple[float, float],
    contrast: float,
    cutoff: int,
    zoning: dict,
    folder: Path,
    mcmc: dict,
    seed: int = 0,
) -> PyklipFit:
    """pyKLIP's KLIP-FM (ADI+RDI) and FMAstrometry of the companion near ``start`` (x, y
    pixels of the first roll's detector, whose WCS is ``wcs``); ``rolls``: per exposure its
    integrations, its star (x, y) and its parallactic angle (the first 0); ``refs``: the
    reference star's frames aligned to the first roll's star; ``zoning``: annuli,
    subsections, iwa, owa, movement (pixels); ``mcmc`` as ``tests.pyklip_fm`` takes it."""
    frames = np.concatenate([frames for frames, _, _ in rolls])
    centres = np.concatenate([np.tile(centre, (len(f), 1)) for f, centre, _ in rolls])
    parangs = np.concatenate([np.full(len(f), angle) for f, _, angle in rolls])
    centre = np.asarray(rolls[0][1], dtype=np.float64)
    m, n = len(frames), len(refs)
    names = [f"sci{i}" for i in range(m)]
    dataset = GenericData(frames, centres, parangs=parangs, IWA=zoning["iwa"], filenames=names)
    dataset.OWA = zoning["owa"]
    library = rdi.PSFLibrary(
        np.concatenate([frames, refs]),
        centre,
        names + [f"ref{j}" for j in range(n)],
        compute_correlation=False,
        correlation_matrix=np.eye(m + n),  # unused: every reference is used
    )
    library.prepare_library(dataset)
    return klip_fm_astrometry(
        dataset, library, "ADI+RDI", folder, wcs, star, centre, start, psf, contrast, cutoff,
        zoning, mcmc, seed,
    )  # fmt: skip


def turn_onto_first(wcss: list[WCS], star: SkyCoord, start: tuple[float, float]) -> list[float]:
    """Per exposure the angle (degrees, counter-clockwise on the detector) that turns its
    view of the sky onto the first exposure's: pyKLIP's parallactic angle for it."""
    angles = []
    for wcs in wcss:
        centre = np.asarray(wcs.world_to_pixel_values(star.ra.deg, star.dec.deg))
        dx, dy = detector_place(wcs, star, *start)[0] - centre
        angles.append(np.degrees(np.arctan2(dy, dx)))
    return [float((angles[0] - a + 180) % 360 - 180) for a in angles]


def their_fit_adi(
    folder: Path,
    asn: Path,
    star: SkyCoord,
    start: tuple,
    contrast: float,
    seed: int,
    mcmc: dict,
    reduction_options: dict,
) -> tuple[PyklipFit, float]:
    """pyKLIP's ADI+RDI fit of the companion near ``start`` on the frames coron-dask's
    ADI+RDI reduction (``reduction_options``) gives KLIP, reduced again here with the
    psfalign saved: the PyklipFit and the seconds of that reduction."""
    began = time.perf_counter()
    reduction = reduce_observation(
        asn,
        folder / "reduced",
        psfmask=folder / "sim" / "psfmask.fits",
        save_psfalign=True,
        **reduction_options,
    )
    with dask.config.set(scheduler="synchronous"):
        write_products(reduction.products, None)
    reduce_seconds = time.perf_counter() - began
    p = reduction.parameters
    wcss = [sky_wcs(exposure) for exposure in reduction.science]
    sources = [Path(e.encoding["source"]).name for e in reduction.science]
    psfaligns = [
        next((folder / "reduced").glob(f"{name.rsplit('_', 1)[0]}_*psfalign.fits"))
        for name in sources
    ]
    angles = turn_onto_first(wcss, star, start)
    rolls = []
    for psfalign, wcs, angle in zip(psfaligns, wcss, angles, strict=True):
        crfints = psfalign.with_name(psfalign.name.replace("_psfalign", "_crfints"))
        centre = np.asarray(wcs.world_to_pixel_values(star.ra.deg, star.dec.deg), dtype=float)
        rolls.append((filled_integrations(crfints, p), centre, angle))
    refs = reference_planes(psfaligns[0])
    roots = [path.name for path in psfaligns]
    zoning = {key: p[key] for key in ("annuli", "subsections", "iwa", "owa", "movement")}
    (folder / "pyklip").mkdir()
    (folder / "pyklip" / "rolls.json").write_text(
        json.dumps({"roots": roots, "parangs": angles, "references": len(refs)})
    )
    theirs = pyklip_companion_adi(
        rolls,
        refs,
        wcss[0],
        star,
        read_offaxis_psf(folder / "sim" / "offaxis_psf.fits"),
        detector_place(wcss[0], star, *start)[0],
        contrast,
        int(reduction_options["truncate"]),
        zoning,
        folder / "pyklip",
        mcmc,
        seed,
    )
    return theirs, reduce_seconds
