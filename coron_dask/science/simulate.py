"""A simulated NIRCam or MIRI coronagraphic observation, written as the JWST pipeline writes it.

The optics are computed by Fourier optics: a circular, centrally obscured pupil with a
static aberration that drifts slowly in time, a focal-plane mask (NIRCam: a Gaussian
occulting spot, sampled at λ/D = 2 pixels; MIRI: a four-quadrant phase mask, λ/D = 3.3
pixels at F1140C, on the 224 × 288 MASK1140 subarray whose columns beyond the coronagraph's
field are NON_SCIENCE), a Lyot stop. The star sits a little off the spot (target
acquisition error and jitter, sub-pixel); the brighter reference star is observed on a
small-grid dither. A companion sits at a known place. Photon and read noise are added,
and DQ-flagged bad pixels are NaN, as in ``_calints`` files.

By default the companion keeps all its light and the PSFMASK is a weight mask (a hole of 6
pixels, zero borders). With ``occulter`` (NIRCam) the round occulter dims the companion as
the detector sees it, by its intensity transmission at the companion's place in each
integration (the PSF's shape kept), and the PSFMASK written is that transmission map, as
NIRCam's PSFMASK reference files are.
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits

from coron_dask.core.dqflags import PIXEL
from coron_dask.science.optics import (
    MIRI,
    OCCULTER_SIGMA,
    PIXEL_SCALE,
    Optics,
    nircam,
    occulter_sigma,
)

#: Science-target photo-electrons per integration (a bright star), reference 1.6× brighter.
STAR_ELECTRONS = 5e9
REFERENCE_BRIGHTNESS = 1.6
READ_NOISE = 12.0  # electrons
BACKGROUND = 20.0  # electrons per pixel
MJYSR_PER_ELECTRON = 2e-6
#: Small-grid dither: 9 points 20 mas (~0.3 pixel) apart, as NIRCam's 9-POINT-CIRCLE.
SGD_STEP = 0.3
TARGET = (80.1234, -29.5678)  # RA, Dec of the science star (deg)
REFERENCE = (81.0021, -30.1100)
#: Half the side of the off-axis PSF image written beside the data (pixels).
OFFAXIS_HALF = 32
#: V3 position angles: science exposures alternate between two rolls 10 degrees apart.
ROLLS = (110.0, 120.0)
REFERENCE_ROLL = 113.0
#: rms (nm) of the reference star's own wavefront error (``optics.Optics.make``'s screen)
REFERENCE_DRIFT_NM = 6.0


def pc_matrix(roll: float) -> np.ndarray:
    """Detector-to-sky rotation for a roll (degrees), east to the left at roll 0.

    Its own inverse: it maps detector offsets to (east, north) offsets and back.
    """
    angle = np.radians(roll)
    return np.array([[-np.cos(angle), np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def wcs_keywords(
    star_pixel: np.ndarray, sky: tuple[float, float], roll: float, scale: float = PIXEL_SCALE
) -> dict:
    """The FITS WCS keywords of the SCI header, as the JWST pipeline writes them (TAN)."""
    pc = pc_matrix(roll)
    return {
        "WCSAXES": 2,
        "CTYPE1": "RA---TAN",
        "CTYPE2": "DEC--TAN",
        "CUNIT1": "deg",
        "CUNIT2": "deg",
        "CRPIX1": float(star_pixel[0] + 1),
        "CRPIX2": float(star_pixel[1] + 1),
        "CRVAL1": sky[0],
        "CRVAL2": sky[1],
        "CDELT1": scale,
        "CDELT2": scale,
        "PC1_1": pc[0, 0],
        "PC1_2": pc[0, 1],
        "PC2_1": pc[1, 0],
        "PC2_2": pc[1, 1],
        "RA_REF": sky[0],
        "DEC_REF": sky[1],
        "ROLL_REF": roll,
        "V3I_YANG": 0.0,
        "VPARITY": -1,
    }


def _write_calints(path: Path, sci, err, dq, primary: dict, sci_keywords: dict) -> None:
    header = fits.Header()
    for key, value in primary.items():
        header[key] = value
    sci_hdu = fits.ImageHDU(sci.astype(np.float32), name="SCI")
    for key, value in sci_keywords.items():
        sci_hdu.header[key] = value
    var = (err.astype(np.float32) ** 2) / 2
    hdus = [
        fits.PrimaryHDU(header=header),
        sci_hdu,
        fits.ImageHDU(err.astype(np.float32), name="ERR"),
        fits.ImageHDU(dq.astype(np.uint32), name="DQ"),
        fits.ImageHDU(var, name="VAR_POISSON"),
        fits.ImageHDU(var, name="VAR_RNOISE"),
        fits.ImageHDU(np.ones(sci.shape[1:], np.float32), name="AREA"),
    ]
    fits.HDUList(hdus).writeto(path, overwrite=True)


def simulate(
    outdir: str | Path,
    *,
    size: int = 128,
    sci_exps: int = 2,
    sci_ints: int = 8,
    psf_exps: int = 9,
    psf_ints: int = 5,
    seed: int = 1,
    contrast: float = 4e-6,
    companion: tuple[float, float] = (14.0, 9.0),
    instrument: str = "nircam",
    occulter: float | None = None,
    reference_drift: float = REFERENCE_DRIFT_NM,
) -> Path:
    """Write calints files, an ASN, a PSFMASK, the star's off-axis PSF (``offaxis_psf.fits``:
    the star unocculted, in the calints' units, centred in its odd box) and ``truth.json``
    into ``outdir``; return the ASN.

    ``instrument`` "nircam" gives ``size`` × ``size`` frames of a round occulting spot;
    "miri" the 224 × 288 frames of MIRI's 4QPM subarray MASK1140 (``size`` is not used).

    ``companion`` is the companion's offset (dx, dy) in pixels from the star at the first
    roll, ``contrast`` its flux relative to the science star. The companion is fixed on the
    sky: science exposures alternate between two rolls 10 degrees apart and it turns with
    them on the detector.

    ``occulter`` (NIRCam): the inner working angle (λ/D) of a round occulter whose intensity
    transmission (1 − exp(−r²/2σ²))² reaches ½ there (MASK335R: about 6.3); it occults the
    star, dims the companion at its detector place, and is written as the PSFMASK. None:
    the companion is not dimmed (today's observation, bit for bit).

    ``reference_drift``: the rms (nm) of the wavefront error the reference star has and the
    science star has not (a different star, observed at another time): larger, the
    reference star's speckles match the science's less, and RDI subtracts them less well
    than ADI (the default is today's observation, bit for bit).
    """
    for name, value in (
        ("size", size),
        ("sci_exps", sci_exps),
        ("sci_ints", sci_ints),
        ("psf_exps", psf_exps),
        ("psf_ints", psf_ints),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if instrument not in ("nircam", "miri"):
        raise ValueError(f"instrument must be 'nircam' or 'miri', got {instrument!r}")
    if occulter is not None and (instrument != "nircam" or not occulter > 0):
        raise ValueError(f"occulter must be > 0 λ/D, for nircam, got {occulter} for {instrument}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    kind = MIRI if instrument == "miri" else nircam(size)
    sigma = OCCULTER_SIGMA if occulter is None else occulter_sigma(occulter)
    optics = Optics.make(kind, rng, sigma)
    if reference_drift != REFERENCE_DRIFT_NM:
        if not reference_drift >= 0:
            raise ValueError(f"reference_drift must be >= 0 nm, got {reference_drift}")
        scaled = optics.reference_drift * (reference_drift / REFERENCE_DRIFT_NM)
        optics = replace(optics, reference_drift=scaled)
    shape = kind.shape
    # the coronagraph's place on the detector, 0-based (x, y)
    centre = tuple(map(float, kind.centre)) if instrument == "miri" else (size / 2, size / 2)
    bad = rng.random(shape) < 0.003
    bad_dq = np.where(bad, PIXEL["DO_NOT_USE"] | PIXEL["HOT"], 0).astype(np.uint32)
    if kind.field is not None:  # beyond the coronagraph's field: not science
        y0, y1, x0, x1 = kind.field
        outside = np.ones(shape, dtype=bool)
        outside[y0:y1, x0:x1] = False
        bad_dq[outside] |= PIXEL["DO_NOT_USE"] | PIXEL["NON_SCIENCE"]
    program, asn_id = "01386", "c1000"
    if instrument == "miri":
        product = f"jw{program}-{asn_id}_t001_miri_f1140c-mask1140"
    else:
        product = f"jw{program}-{asn_id}_t001_nircam_f410m-maskrnd-sub{size}"
    base = {
        "TELESCOP": "JWST",
        **kind.keywords,
        "NGROUPS": 10,
        "PROGRAM": program,
        "DATE-OBS": "2023-06-01",  # what CRDS picks reference files by, with the optics
        "TIME-OBS": "12:00:00.000",
        "DATAMODL": "CubeModel",
    }
    sci_keywords = {"BUNIT": "MJy/sr", "PHOTMJSR": MJYSR_PER_ELECTRON}
    science_offset = rng.normal(0, 0.12, 2)  # target acquisition error, pixels
    reference_offset = rng.normal(0, 0.12, 2)
    truth: dict = {"companion": {}, "frames": {}, "contrast": contrast}
    if occulter is not None:
        truth["transmission"] = {}  # the companion's, per science exposure and integration
    # east and north offsets of the companion, in pixels
    companion_sky = pc_matrix(ROLLS[0]) @ np.array(companion, dtype=float)
    members = []
    time = 0
    plans = [("science", i, sci_ints) for i in range(sci_exps)]
    plans += [("psf", i, psf_ints) for i in range(psf_exps)]
    for exptype, number, nints in plans:
        is_psf = exptype == "psf"
        observation = 2 if is_psf else 1
        detector = kind.keywords["DETECTOR"].lower()
        name = f"jw{program}{observation:03d}001_03106_{number + 1:05d}_{detector}_calints.fits"
        if is_psf:
            angle = 2 * np.pi * number / max(psf_exps - 1, 1)
            dither = (
                (0.0, 0.0) if number == 0 else (np.cos(angle) * SGD_STEP, np.sin(angle) * SGD_STEP)
            )
            pointing = reference_offset + np.array(dither)
            flux = STAR_ELECTRONS * REFERENCE_BRIGHTNESS
            roll, sky = REFERENCE_ROLL, REFERENCE
        else:
            pointing = science_offset + rng.normal(0, 0.02, 2)
            flux = STAR_ELECTRONS
            roll, sky = ROLLS[number % 2], TARGET
        companion_offset = pc_matrix(roll) @ companion_sky
        sci = np.empty((nints, *shape))
        err = np.empty_like(sci)
        offsets = []
        for k in range(nints):
            jitter = pointing + rng.normal(0, 0.01, 2)
            aberration = optics.static + optics.drift * (time / 50)
            if is_psf:
                aberration = aberration + optics.reference_drift
            electrons = flux * optics.image(tuple(jitter), aberration)
            if not is_psf:
                place = jitter + companion_offset
                companion_flux = flux * contrast
                if occulter is not None:  # the occulter's transmission where it falls
                    dimmed = float(optics.transmission(*place))
                    truth["transmission"].setdefault(name, []).append(dimmed)
                    companion_flux *= dimmed
                electrons += companion_flux * optics.image(tuple(place), aberration, False)
            electrons += BACKGROUND
            noisy = rng.poisson(np.clip(electrons, 0, None)) + rng.normal(
                0, READ_NOISE, electrons.shape
            )
            sci[k] = (noisy - BACKGROUND) * MJYSR_PER_ELECTRON
            err[k] = np.sqrt(np.clip(electrons, 0, None) + READ_NOISE**2) * MJYSR_PER_ELECTRON
            offsets.append([float(v) for v in jitter])
            time += 1
        dq = np.broadcast_to(bad_dq, sci.shape).copy()
        sci[dq > 0] = np.nan
        err[dq > 0] = np.nan
        primary = {
            **base,
            "FILENAME": name,
            "NINTS": nints,
            "IS_PSF": is_psf,
            "TARGNAME": "HD 2000 REF" if is_psf else "HD 1000",
            "OBSERVTN": f"{observation:03d}",
            "EXPOSURE": f"{number + 1}",
            "EFFEXPTM": 100.0 * nints,
            "PA_V3": roll,
            "TARG_RA": sky[0],
            "TARG_DEC": sky[1],
        }
        keywords = {
            **sci_keywords,
            **wcs_keywords(np.array(centre) + pointing, sky, roll, kind.pixel_scale),
        }
        _write_calints(outdir / name, sci, err, dq, primary, keywords)
        members.append({"expname": name, "exptype": exptype, "exposerr": "null"})
        truth["frames"][name] = {"star_offset": offsets}
        if not is_psf:
            truth["companion"][name] = [
                [centre[0] + o[0] + companion_offset[0], centre[1] + o[1] + companion_offset[1]]
                for o in offsets
            ]
    mask = np.ones(shape, np.float32)
    y, x = np.mgrid[: shape[0], : shape[1]]
    mask[np.hypot(x - centre[0], y - centre[1]) < 6] = 0
    mask[:4], mask[-4:], mask[:, :4], mask[:, -4:] = 0, 0, 0, 0
    mask[(bad_dq & PIXEL["NON_SCIENCE"]) > 0] = 0
    if occulter is not None:  # the occulter's transmission, as NIRCam's PSFMASK files hold
        mask = optics.transmission(x - kind.centre[0], y - kind.centre[1]).astype(np.float32)
        truth["occulter"] = {"iwa_lambda_d": occulter, "sigma_lambda_d": sigma}
    psfmask = outdir / "psfmask.fits"
    fits.HDUList(
        [
            fits.PrimaryHDU(
                header=fits.Header({**base, "REFTYPE": "PSFMASK", "DATAMODL": "PsfMaskModel"})
            ),
            fits.ImageHDU(mask, name="SCI"),
        ]
    ).writeto(psfmask, overwrite=True)
    asn = {
        "asn_type": "coron3",
        "asn_rule": "candidate_Asn_Lv3Coron",
        "asn_id": asn_id,
        "program": program,
        "target": "1",
        "asn_pool": "jw01386_simulated_pool",
        "products": [{"name": product, "members": members}],
    }
    asn_path = outdir / f"jw{program}-{asn_id}_coron3_asn.json"
    asn_path.write_text(json.dumps(asn, indent=2))
    truth["psfmask"] = psfmask.name
    # the star unocculted (static aberration), as a contrast curve's injections need it
    offaxis = outdir / "offaxis_psf.fits"
    cx, cy = kind.centre
    half = min(OFFAXIS_HALF, cx, cy, shape[1] - 1 - cx, shape[0] - 1 - cy)
    star = STAR_ELECTRONS * MJYSR_PER_ELECTRON * optics.image((0.0, 0.0), optics.static, False)
    box = star[cy - half : cy + half + 1, cx - half : cx + half + 1].astype(np.float32)
    fits.HDUList(
        [
            fits.PrimaryHDU(header=fits.Header({**base, "DATAMODL": "ImageModel"})),
            fits.ImageHDU(box, header=fits.Header({"BUNIT": "MJy/sr"}), name="SCI"),
        ]
    ).writeto(offaxis, overwrite=True)
    truth["offaxis_psf"] = offaxis.name
    truth["companion_offset"] = list(companion)
    # the companion's sky position: star position plus its offset along east and north
    east, north = companion_sky * kind.pixel_scale
    dec = TARGET[1] + north
    truth["companion_sky"] = [TARGET[0] + east / np.cos(np.radians(TARGET[1])), dec]
    truth["star_sky"] = list(TARGET)
    (outdir / "truth.json").write_text(json.dumps(truth, indent=2))
    return asn_path


def truth_places(truth: dict) -> tuple[SkyCoord, SkyCoord]:
    """The star's and the companion's sky places as a simulation's ``truth.json`` records
    them (``star_sky``, ``companion_sky``: degrees)."""
    return SkyCoord(*truth["star_sky"], unit="deg"), SkyCoord(*truth["companion_sky"], unit="deg")
