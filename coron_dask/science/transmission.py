"""The coronagraph's transmission that dims a companion at its place on the detector: where
it comes from (``--transmission``), read and checked before anything is computed.

A companion seen through an occulter keeps only the occulter's transmission of its light,
near nothing at the star, all of it far away. Injected companions are dimmed so in each
roll (each science exposure places the same sky position on another detector pixel), or
the contrast curve is optimistic near the mask. The map is in the science frames' detector
pixels (the coronagraph is fixed on the detector), sampled at each place
(``kernels.inject.transmission_at``). It comes from:

- the PSFMASK, where it is the occulter's transmission: NIRCam's PSFMASK reference files
  are (values 0 to 1 around the round or bar occulter); MIRI's mark the 4QPM/Lyot
  geometry (0 or 1) and are not a transmission. Which is decided from the PSFMASK's
  INSTRUME (the science's, where the file has none), and logged;
- a FITS map the user gives (SCI extension, else the primary image), of the frames' shape;
- none: every companion keeps all its light (MIRI's default, said in the log and the
  curve's header).
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from astropy.io import fits

from coron_dask.core import config
from coron_dask.core.errors import CoronInputError
from coron_dask.kernels.inject import transmission_at

log = logging.getLogger(__name__)

#: ``--transmission``'s words; anything else names a FITS file.
WORDS = ("psfmask", "none")
#: The instruments whose PSFMASK reference files are the occulter's transmission.
TRANSMISSION_PSFMASKS = ("NIRCAM",)


@dataclass(frozen=True)
class Transmission:
    """A transmission map (ny, nx) in the science frames' pixels (None: 1 everywhere) and
    what the curve's header says of its source."""

    map: np.ndarray | None
    source: str

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The transmission (n,) at detector ``positions`` (n, 2) = (x, y), 0-based."""
        if self.map is None:
            return np.ones(len(positions))
        return transmission_at(self.map, positions)


def read_transmission_map(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A transmission map (float64) from a FITS file (SCI, else the primary image) of the
    frames' ``shape``, finite, from 0 to the setting ``contrast.transmission-max``; else
    CoronInputError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CoronInputError(path, "no such transmission map")
    try:
        with fits.open(path) as hdul:
            hdu = hdul["SCI"] if "SCI" in hdul else hdul[0]
            image = None if hdu.data is None else np.asarray(hdu.data, dtype=np.float64)
    except (OSError, ValueError, TypeError) as error:
        raise CoronInputError(path, f"is not a FITS transmission map ({error})") from None
    if image is None or image.ndim != 2:
        raise CoronInputError(path, "the transmission map must be a 2-D image (SCI or primary)")
    if image.shape != tuple(shape):
        raise CoronInputError(
            path,
            f"the transmission map is {image.shape[0]}x{image.shape[1]} pixels, the science "
            f"frames {shape[0]}x{shape[1]}: it must be in the frames' detector pixels",
        )
    bad = int((~np.isfinite(image)).sum())
    if bad:
        raise CoronInputError(path, f"the transmission map has {bad} pixel(s) not finite")
    highest = float(config.get("contrast.transmission-max"))
    if image.min() < 0 or image.max() > highest:
        raise CoronInputError(
            path,
            f"the transmission map holds values from {image.min():.3g} to {image.max():.3g}: "
            f"a transmission is between 0 and {highest:g} (contrast.transmission-max)",
        )
    return image


def _instrument(psfmask: Path, science: xr.Dataset) -> str:
    """The PSFMASK's INSTRUME, or the science's where the file says none."""
    said = fits.getheader(psfmask, 0).get("INSTRUME")
    return str(said or science.attrs.get("INSTRUME", "")).upper()


def _geometry(instrument: str) -> str:
    """Why ``instrument``'s PSFMASK is no transmission."""
    return f"{instrument or 'this'} PSFMASK marks the coronagraph's geometry, not its transmission"


def _no_transmission(path: Path, instrument: str) -> CoronInputError:
    return CoronInputError(
        path,
        f"{_geometry(instrument)}: give a transmission map (--transmission FILE) or none",
    )


def coronagraph_transmission(
    choice: str | Path | None, psfmask: str | Path | None, science: xr.Dataset
) -> Transmission:
    """The transmission the injections are dimmed by, for ``choice`` ("psfmask", "none", a
    file; None: the PSFMASK where it is a transmission, NIRCam's, else none), given the run's
    ``psfmask`` (a file, or "none"/None) and a science exposure (its frame and INSTRUME).
    Logged; CoronInputError in one line for a map that cannot be one."""
    shape = (science.sizes["y"], science.sizes["x"])
    word = None if choice is None else str(choice)
    if word is not None and word.lower() == "none":
        log.info(
            "contrast: no coronagraph transmission (--transmission none): the curve is "
            "optimistic near the mask"
        )
        return Transmission(None, "none")
    if word is not None and word.lower() not in WORDS:
        found = read_transmission_map(word, shape)
        if str(fits.getheader(word, 0).get("REFTYPE", "")).upper() == "PSFMASK":
            instrument = _instrument(Path(word), science)  # a PSFMASK given as the map
            if instrument not in TRANSMISSION_PSFMASKS:
                raise _no_transmission(Path(word), instrument)
        log.info("contrast: injections dimmed by the transmission map %s", Path(word).name)
        return Transmission(found, f"map {Path(word).name}")
    asked = word is not None  # "psfmask", or None: as the instrument's PSFMASK allows
    if psfmask is None or str(psfmask).lower() == "none":
        if asked:
            raise CoronInputError(
                "transmission", "'psfmask' needs a PSFMASK (--psfmask FILE, or crds)"
            )
        log.info(
            "contrast: no PSFMASK, no coronagraph transmission: the injections keep all "
            "their light (the curve is optimistic near the mask)"
        )
        return Transmission(None, "none (no PSFMASK)")
    psfmask = Path(psfmask)
    instrument = _instrument(psfmask, science)
    if instrument not in TRANSMISSION_PSFMASKS:
        if asked:
            raise _no_transmission(psfmask, instrument)
        log.info(
            "contrast: no coronagraph transmission: the %s; injections keep all their "
            "light (--transmission FILE gives a map)",
            _geometry(instrument),
        )
        return Transmission(None, f"none ({instrument or 'its'} PSFMASK is no transmission)")
    found = read_transmission_map(psfmask, shape)
    log.info(
        "contrast: injections dimmed by the PSFMASK %s (%s's PSFMASK is the occulter's "
        "transmission)",
        psfmask.name,
        instrument,
    )
    return Transmission(found, f"PSFMASK {psfmask.name}")
