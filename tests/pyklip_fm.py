"""pyKLIP's Bayesian KLIP-FM astrometry (``fm.klip_dataset`` with ``FMPlanetPSF``, then
``fitpsf.FMAstrometry``) as the independent reference for a companion's fit: run in RDI on
the frames coron-dask's reduction gave KLIP (the science integrations as align_refs filled
them, the references as it aligned them), one science exposure (one roll).

pyKLIP's frame is the detector's (parallactic angle 0, no WCS, not flipped: it takes +y as
north and −x as east), so its RA/Dec offsets are pixel offsets on the detector; they are
seen on the sky through the exposure's WCS here. Its flux: ``FMPlanetPSF`` forward-models
``dflux × input_psfs`` (``flux_conversion`` and the spectrum 1 for one wavelength), and
``FMAstrometry``'s ``raw_flux`` is the factor that scales that forward model to the data;
with ``input_psfs`` the off-axis PSF summing to the star's flux, the contrast is
``raw_flux × dflux``.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS
from pyklip import fitpsf
from pyklip import fm as pyklip_fm
from pyklip.fmlib.fmpsf import FMPlanetPSF

from coron_dask.core.dqflags import bit_value
from coron_dask.io import write_products
from coron_dask.kernels.blocks import fill_block
from coron_dask.pipeline.build import reduce_observation
from coron_dask.pipeline.companions import Guess, measure_companions
from coron_dask.science.companion_model import detector_place
from coron_dask.science.geometry import sky_wcs
from coron_dask.science.injection import read_offaxis_psf
from coron_dask.science.simulate import simulate, truth_places
from tests.pyklip_reference import pyklip_inputs


@dataclass(frozen=True)
class PyklipFit:
    """pyKLIP's medians and 68 % half widths: separation (arcsec), position angle (deg E of
    N), contrast; the times of its KLIP-FM and of its MCMC (s)."""

    separation: tuple[float, float]
    position_angle: tuple[float, float]
    contrast: tuple[float, float]
    fm_seconds: float
    mcmc_seconds: float


def filled_integrations(crfints: Path, parameters: dict) -> np.ndarray:
    """A science exposure's integrations as KLIP took them (align_refs' median fill of the
    bad pixels), float64."""
    with fits.open(crfints) as hdul:
        sci, dq = hdul["SCI"].data, hdul["DQ"].data
    bits = bit_value(parameters["bad_bits"])
    filled = fill_block(sci, sci, dq, parameters["median_box_length"], bits, None)
    return filled.astype(np.float64)


def klip_inputs(psfalign: Path, parameters: dict) -> tuple[np.ndarray, np.ndarray]:
    """A science exposure's integrations as KLIP took them (its ``_crfints`` beside its
    ``psfalign`` product, ``filled_integrations``) and its references as aligned (a 3-D
    psfalign: ``align_to="first"``), float64."""
    crfints = psfalign.with_name(psfalign.name.replace("_psfalign", "_crfints"))
    refs = fits.getdata(psfalign, "SCI")
    assert refs.ndim == 3, "a 3-D psfalign (align_to='first') is what pyKLIP's library takes"
    return filled_integrations(crfints, parameters), refs.astype(np.float64)


def _half_width(samples: np.ndarray) -> float:
    low, high = np.percentile(samples, [16, 84])
    return float(high - low) / 2


def pyklip_companion(
    frames: np.ndarray,
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
    """pyKLIP's KLIP-FM and FMAstrometry of the companion near ``start`` (x, y detector
    pixels) in ``frames`` with the RDI library ``refs``; ``zoning``: annuli, subsections,
    iwa, owa (pixels); ``mcmc``: nwalkers, nburn, nsteps, fitboxsize, dr,
    exclusion_radius, correlation length guess ``length`` (pixels)."""
    centre = np.asarray(wcs.world_to_pixel_values(star.ra.deg, star.dec.deg), dtype=np.float64)
    dataset, library = pyklip_inputs(frames, refs, centre, zoning)
    return klip_fm_astrometry(
        dataset, library, "RDI", folder, wcs, star, centre, start, psf, contrast, cutoff,
        zoning, mcmc, seed,
    )  # fmt: skip


def klip_fm_astrometry(
    dataset,
    library,
    mode: str,
    folder: Path,
    wcs: WCS,
    star: SkyCoord,
    centre: np.ndarray,
    start: tuple[float, float],
    psf: np.ndarray,
    contrast: float,
    cutoff: int,
    zoning: dict,
    mcmc: dict,
    seed: int,
) -> PyklipFit:
    """pyKLIP's ``fm.klip_dataset`` (``FMPlanetPSF`` at ``start``, x, y pixels of the frame
    whose star is ``centre``) in ``mode`` on ``dataset`` with the ``library``, then
    ``fm_astrometry``; ``zoning``'s ``movement``, when given, is pyKLIP's ADI's."""
    dx, dy = start[0] - centre[0], start[1] - centre[1]
    separation, angle = float(np.hypot(dx, dy)), float(np.degrees(np.arctan2(-dx, dy)))
    fm_class = FMPlanetPSF(
        dataset.input.shape, np.array([cutoff]), separation, angle, contrast, psf[None], [1.0]
    )
    movement = {"movement": zoning["movement"]} if "movement" in zoning else {}
    began = time.perf_counter()
    pyklip_fm.klip_dataset(
        dataset,
        fm_class,
        mode=mode,
        outputdir=str(folder),
        fileprefix="pyklipfm",
        annuli=zoning["annuli"],
        subsections=zoning["subsections"],
        OWA=zoning["owa"],
        numbasis=[cutoff],
        maxnumbasis=cutoff,
        psf_library=library,
        corr_smooth=0,
        numthreads=1,
        mute_progression=True,
        **movement,
    )
    fm_seconds = time.perf_counter() - began
    return fm_astrometry(
        folder, wcs, star, centre, (separation, angle), contrast, mcmc, seed, fm_seconds
    )


def fm_astrometry(
    folder: Path,
    wcs: WCS,
    star: SkyCoord,
    centre: np.ndarray,
    start: tuple[float, float],
    contrast: float,
    mcmc: dict,
    seed: int,
    fm_seconds: float,
) -> PyklipFit:
    """pyKLIP's ``FMAstrometry`` on the KLIP-FM products ``klip_dataset`` wrote into
    ``folder`` (its frame: ``wcs``'s detector, the star at ``centre``; ``start``: pyKLIP's
    separation in pixels and PA), seen on the sky through ``wcs``."""
    separation, angle = start
    model = fits.getdata(folder / "pyklipfm-fmpsf-KLmodes-all.fits")[0]
    data = fits.getdata(folder / "pyklipfm-klipped-KLmodes-all.fits")[0]
    np.random.seed(seed)  # noqa: NPY002 (pyKLIP starts its walkers from the global one)
    fit = fitpsf.FMAstrometry(separation, angle, mcmc["fitboxsize"])
    fit.generate_fm_stamp(model, centre, padding=5)
    fit.generate_data_stamp(data, centre, dr=mcmc["dr"], exclusion_radius=mcmc["exclusion_radius"])
    fit.set_kernel("matern32", [mcmc["length"]], [r"$l$"])
    fit.set_bounds(2.0, 2.0, 1.0, [1.0])
    began = time.perf_counter()
    fit.fit_astrometry(
        nwalkers=mcmc["nwalkers"],
        nburn=mcmc["nburn"],
        nsteps=mcmc["nsteps"],
        save_chain=False,
        numthreads=1,
    )
    mcmc_seconds = time.perf_counter() - began
    chain = fit.mcmc_chain.reshape(-1, fit.mcmc_chain.shape[-1])
    x, y = centre[0] - chain[:, 0], centre[1] + chain[:, 1]  # its RA/Dec offsets, pixels
    places = SkyCoord(*wcs.pixel_to_world_values(x, y), unit="deg")
    separations = star.separation(places).arcsec
    angles = star.position_angle(places).deg
    middle = np.degrees(np.angle(np.mean(np.exp(1j * np.radians(angles)))))
    angles = (angles - middle + 180) % 360 - 180 + middle
    contrasts = chain[:, 2] * contrast
    return PyklipFit(
        (float(np.median(separations)), _half_width(separations)),
        (float(np.median(angles) % 360), _half_width(angles)),
        (float(np.median(contrasts)), _half_width(contrasts)),
        fm_seconds,
        mcmc_seconds,
    )


#: the reduction both fit: RDI, KL cutoff 10, 5 annuli from 4 to 60 px, one reference set
#: for every integration (pyKLIP's PSFLibrary holds one)
REDUCTION = {"truncate": 10, "annuli": 5, "iwa": 4.0, "owa": 60.0, "align_to": "first"}
#: one science exposure (one roll) of 4 integrations, 5 × 3 reference frames, 128²
PARAMETERS = ("separation", "position_angle", "contrast")
OBSERVATION = {"size": 128, "sci_exps": 1, "sci_ints": 4, "psf_exps": 5, "psf_ints": 3}


def simulated(folder: Path, contrast: float, offset: tuple, seed: int) -> tuple:
    """One companion (``offset`` px from the star at ``contrast``) simulated into
    ``folder``/sim: the ASN, the star and the fits' start (separation, PA), 0.02" and 1°
    off the truth."""
    asn = simulate(folder / "sim", contrast=contrast, companion=offset, seed=seed, **OBSERVATION)
    truth = json.loads((folder / "sim" / "truth.json").read_text())
    star, place = truth_places(truth)
    return asn, star, (star.separation(place).arcsec + 0.02, star.position_angle(place).deg + 1.0)


def our_fit(folder: Path, asn: Path, start: tuple):
    """coron-dask's fit (``measure_companions``, the reduction included) of the companion
    near ``start``: the CompanionFit."""
    fits_found, _ = measure_companions(
        asn,
        folder / "ours",
        offaxis_psf=folder / "sim" / "offaxis_psf.fits",
        guesses=[Guess(*start)],
        psfmask=folder / "sim" / "psfmask.fits",
        transmission="none",
        execution={"scheduler": "synchronous", "progress": False},
        **REDUCTION,
    )
    return fits_found[0]


def their_fit(
    folder: Path, asn: Path, star: SkyCoord, start: tuple, contrast: float, seed: int, mcmc: dict
) -> tuple[PyklipFit, float]:
    """pyKLIP's fit (``pyklip_companion``) of the companion near ``start`` on the frames
    coron-dask's reduction gives KLIP (reduced again here with the psfalign saved): the
    PyklipFit and the seconds of that reduction."""
    began = time.perf_counter()
    psfmask = folder / "sim" / "psfmask.fits"
    reduction = reduce_observation(
        asn, folder / "reduced", psfmask=psfmask, save_psfalign=True, **REDUCTION
    )
    with dask.config.set(scheduler="synchronous"):
        write_products(reduction.products, None)
    reduce_seconds = time.perf_counter() - began
    p = reduction.parameters
    frames, refs = klip_inputs(next((folder / "reduced").glob("*_psfalign.fits")), p)
    wcs = sky_wcs(reduction.science[0])
    zoning = {key: p[key] for key in ("annuli", "subsections", "iwa", "owa")}
    (folder / "pyklip").mkdir()
    theirs = pyklip_companion(
        frames,
        refs,
        wcs,
        star,
        read_offaxis_psf(folder / "sim" / "offaxis_psf.fits"),
        detector_place(wcs, star, *start)[0],
        contrast,
        int(REDUCTION["truncate"]),
        zoning,
        folder / "pyklip",
        mcmc,
        seed,
    )
    return theirs, reduce_seconds


def estimates(fit) -> dict:
    """A CompanionFit's (median, σ) of separation, position angle and contrast."""
    return {name: (getattr(fit, name).median, getattr(fit, name).sigma) for name in PARAMETERS}


def agreement(ours: dict, theirs: PyklipFit) -> dict:
    """Per parameter: (ours, our σ, theirs, their σ, difference / combined σ); ``ours``
    as ``estimates`` gives it."""
    out = {}
    for name in PARAMETERS:
        mine, my_sigma = ours[name]
        value, sigma = getattr(theirs, name)
        difference = mine - value
        if name == "position_angle":
            difference = (difference + 180) % 360 - 180
        combined = float(np.hypot(my_sigma, sigma))
        out[name] = (mine, my_sigma, value, sigma, difference / combined)
    return out
