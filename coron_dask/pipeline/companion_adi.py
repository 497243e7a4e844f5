"""The ADI part of the companions' windows product (``pipeline.companions``): what negative
injection needs (``steps.negative_injection.adi_windows``) for each science exposure k
and companion j, written as extensions ``ADI<k>_<j>_<PART>`` and read back as
``science.companion_adi.AdiWindows``.

The pixels U of a companion in exposure k: its window there (the one the RDI model uses)
and, for each other roll k', a window about where the companion sits in k''s
integrations once aligned to k: the star of k plus the companion's offset from the star
in k' (the stars' offsets are what align_refs fits), widened by
``coron_dask.companions.align-slack``. The fit checks that every ADI reference's
companion, as align_refs actually moved it, lies within them.
"""

from pathlib import Path

import dask.array as da
import numpy as np
from astropy.io import fits
from scipy.ndimage import binary_dilation

from coron_dask.core.errors import CoronInputError
from coron_dask.io import Extension
from coron_dask.science.companion_adi import AdiWindows
from coron_dask.science.companion_fit import FitSettings
from coron_dask.science.companion_model import detector_place, window_for
from coron_dask.science.geometry import pixel_positions, sky_wcs
from coron_dask.steps.forward_model import zone_sizes
from coron_dask.steps.negative_injection import adi_windows, reference_moves, window_pixels

PARTS = ("PIXELS", "LABELS", "SIZES", "CENTRED", "TARGET", "GRAM", "OVERLAPS", "USED")


def check_adi(parameters: dict) -> None:
    """A reference choice that depends on the data cannot be kept fixed under negative
    injection: refused, in one line."""
    if parameters["mode"] != "RDI" and parameters.get("maxnumbasis"):
        raise CoronInputError(
            "maxnumbasis",
            f"companions are fitted with {parameters['mode']} on every reference a zone "
            "may use: the references most correlated with the science change with the "
            "companion taken out",
        )


def adi_extensions(
    reduction, k: int, guesses: list, star, half: int, margin: int, slack: int, header: dict
) -> list[Extension]:
    """Exposure ``k``'s ADI extensions for each companion of ``guesses`` (windows of PSF
    ``half`` side, ``margin`` and, for the other rolls', ``slack`` more pixels)."""
    exposure, basis = reduction.science[k], reduction.bases[k]
    psfalign = reduction.psfaligns[k]
    frame = (exposure.sizes["y"], exposure.sizes["x"])
    kinds = psfalign["psf_kind"].values
    adi = np.flatnonzero(kinds == "ADI")
    names = [Path(e.encoding.get("source", "science")).name for e in reduction.science]
    sources = np.array([names.index(str(n)) for n in psfalign["psf_exposure"].values[adi]])
    wcses = [sky_wcs(e) for e in reduction.science]
    stars = [pixel_positions(w, star)[0] for w in wcses]
    labels = None if basis.zones is None else basis.zones.labels
    sizes = zone_sizes(basis.zones, frame)
    out = []
    for j, guess in enumerate(guesses):
        place = detector_place(wcses[k], star, guess.separation, guess.position_angle)[0]
        corner, shape = window_for(place, half, margin)
        corners, shapes = [tuple(corner)], [shape]
        for source in np.unique(sources):
            there = detector_place(wcses[source], star, guess.separation, guess.position_angle)
            moved = stars[k] + there[0] - stars[source]
            corner, shape = window_for(moved, half, margin + slack)
            corners.append(tuple(corner))
            shapes.append(shape)
        pixels = window_pixels(corners, shapes, frame, labels)
        arrays = adi_windows(basis, psfalign, pixels)
        zones = np.unique(pixels.labels[pixels.labels >= 0])
        local = np.where(pixels.labels >= 0, np.searchsorted(zones, pixels.labels), -1)
        keywords = {**header, "FRAMEX": frame[1], "NRECT": len(pixels.rectangles)}
        for r, rectangle in enumerate(pixels.rectangles):
            for key, value in zip(("Y0", "Y1", "X0", "X1"), rectangle, strict=True):
                keywords[f"R{r}{key}"] = value
        parts = {
            "PIXELS": pixels.flat.astype(np.int64),
            "LABELS": local.astype(np.int32),
            "SIZES": np.asarray(sizes)[zones].astype(np.int64),
            "CENTRED": arrays["centred"],
            "TARGET": arrays["target"],
            "GRAM": arrays["gram"],
            "OVERLAPS": arrays["overlaps"],
            "USED": arrays["used"],
        }
        out += [Extension(f"ADI{k}_{j}_{key}", value, keywords) for key, value in parts.items()]
    out += [
        Extension(f"ADI{k}_ROWS", adi.astype(np.int64), header),
        Extension(f"ADI{k}_SOURCES", sources.astype(np.int64), header),
        Extension(f"ADI{k}_MOVES", reference_moves(psfalign)[:, adi], header),
    ]
    return out


def filled_in_references(
    reduction, k: int, star, bad: list, corners: np.ndarray, shape: tuple, on_window
) -> da.Array:
    """(n, wy, wx) bool: the pixels of exposure ``k``'s windows where an ADI reference (an
    integration of another roll, aligned) holds a pixel align_refs filled: each other
    exposure's ``bad`` map (y, x), moved by the stars' offset to the nearest pixel and
    widened by one pixel for the alignment's fraction (the fill is left out of the model:
    the fit leaves these pixels out, as it leaves the science's own)."""
    wcses = [sky_wcs(e) for e in reduction.science]
    stars = [pixel_positions(w, star)[0] for w in wcses]
    out = None
    for other, filled in enumerate(bad):
        if other == k:
            continue
        dx, dy = np.round(stars[other] - stars[k]).astype(int)
        moved = on_window(filled, corners + np.array([dy, dx]), shape, True)
        out = moved if out is None else out | moved
    if out is None:
        return None
    return da.map_blocks(_widened, out.rechunk(-1), dtype=bool)


def _widened(windows: np.ndarray) -> np.ndarray:
    """Each window's True pixels and their eight neighbours."""
    return binary_dilation(windows, structure=np.ones((1, 3, 3), bool))


def window_shape(psf: np.ndarray, settings: FitSettings, resolution: float) -> tuple[int, int]:
    """The PSF box's half side and the window margin, pixels, that the windows are made for."""
    pixels = settings.in_pixels(resolution)
    half = (
        min(psf.shape) // 2 if pixels["half"] is None else min(pixels["half"], min(psf.shape) // 2)
    )
    return half, int(np.ceil(pixels["margin"]))


def planned_windows(
    count: int, rolls: int, psf: np.ndarray, settings: FitSettings, resolution: float
) -> tuple:
    """What the block plan makes room for: ``count`` companions' windows and their shape,
    and with ADI the pixels of each one's negative injection in an exposure (its window,
    and one per other of the ``rolls`` widened by the align slack)."""
    half, margin = window_shape(psf, settings, resolution)
    slack = int(np.ceil(settings.align_slack * resolution))
    shape = window_for((0.0, 0.0), half, margin)[1]
    wide = window_for((0.0, 0.0), half, margin + slack)[1]
    return count, shape, shape[0] * shape[1] + (rolls - 1) * wide[0] * wide[1]


def read_adi_windows(hdul: fits.HDUList, k: int, j: int) -> AdiWindows:
    """Exposure ``k``'s negative-injection arrays for companion ``j`` (``adi_extensions``)."""
    part = {key: hdul[f"ADI{k}_{j}_{key}"].data for key in PARTS}
    header = hdul[f"ADI{k}_{j}_PIXELS"].header
    rectangles = tuple(
        tuple(int(header[f"R{r}{key}"]) for key in ("Y0", "Y1", "X0", "X1"))
        for r in range(int(header["NRECT"]))
    )
    return AdiWindows(
        flat=np.asarray(part["PIXELS"], dtype=np.int64),
        labels=np.asarray(part["LABELS"], dtype=np.int64),
        rectangles=rectangles,
        frame_x=int(header["FRAMEX"]),
        centred=np.asarray(part["CENTRED"], dtype=np.float64),
        target=np.asarray(part["TARGET"], dtype=np.float64),
        gram=np.asarray(part["GRAM"], dtype=np.float64),
        overlaps=np.asarray(part["OVERLAPS"], dtype=np.float64),
        used=np.asarray(part["USED"]).astype(bool),
        sizes=np.asarray(part["SIZES"], dtype=np.float64),
        adi=np.asarray(hdul[f"ADI{k}_ROWS"].data, dtype=np.int64),
        sources=np.asarray(hdul[f"ADI{k}_SOURCES"].data, dtype=np.int64),
        moves=np.asarray(hdul[f"ADI{k}_MOVES"].data, dtype=np.float64),
    )
