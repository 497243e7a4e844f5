"""resample: every psfsub integration of every science exposure onto one sky grid (``_i2d``).

Each exposure's celestial WCS (the FITS keywords the JWST pipeline writes in the SCI header)
maps its pixels onto an output grid with the first exposure's pixel scale, in the detector
orientation of the first exposure (as jwst) or north up. drizzle (jwst's resampling
library, square kernel, pixfrac 1) does the pixel mapping; integrations are weighted by
the inverse of their read-noise variance (VAR_RNOISE; ERR² where a file has none), as
jwst's, pixels flagged DO_NOT_USE or NON_SCIENCE left out. Blocks of integrations drizzle
separately and their weighted sums add up, so memory holds a few output-sized images
whatever the number of integrations. ERR propagates the exposures' ERR through the same
weights: sqrt(Σ w²·ERR²) / Σ w.
"""

import logging
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
from astropy.wcs import WCS
from dask.base import tokenize

from coron_dask.core.dqflags import PIXEL
from coron_dask.core.errors import CoronInputError
from coron_dask.kernels.drizzle import drizzle_block
from coron_dask.steps.reductions import tree_sum

log = logging.getLogger(__name__)


def sky_wcs(exposure: xr.Dataset) -> WCS:
    """The celestial WCS of an exposure, from the keywords of its SCI header."""
    keywords = {k: v for k, v in exposure["sci"].attrs.items() if k[:5] != "NAXIS"}
    try:
        wcs = WCS(keywords, naxis=2)
    except Exception as error:
        raise CoronInputError(
            exposure.encoding.get("source", "science"),
            f"unreadable WCS in the SCI header ({error})",
        ) from None
    if not wcs.has_celestial:
        raise CoronInputError(
            exposure.encoding.get("source", "science"), "no celestial WCS in the SCI header"
        )
    return wcs


def pixel_scale(wcs: WCS) -> float:
    """The side of a square pixel of a celestial ``wcs`` (degrees)."""
    return float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))))


def output_grid(wcs_list: list[WCS], shapes: list[tuple[int, int]], orientation: str):
    """A TAN grid with the first WCS's pixel scale and orientation (or north up) covering every
    input frame: its WCS and shape (ny, nx)."""
    first = wcs_list[0]
    scale = pixel_scale(first)
    grid = WCS(naxis=2)
    grid.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    grid.wcs.cunit = ["deg", "deg"]
    grid.wcs.crval = first.wcs.crval
    grid.wcs.cdelt = [scale, scale]
    if orientation == "north":
        grid.wcs.pc = [[-1.0, 0.0], [0.0, 1.0]]
    else:
        grid.wcs.pc = first.pixel_scale_matrix / scale
    grid.wcs.crpix = [0.0, 0.0]
    corners = []
    for wcs, (ny, nx) in zip(wcs_list, shapes, strict=True):
        x = np.array([-0.5, nx - 0.5, -0.5, nx - 0.5])
        y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
        corners.append(
            np.column_stack(grid.world_to_pixel_values(*wcs.pixel_to_world_values(x, y)))
        )
    corners = np.concatenate(corners)
    # the pixels whose centres the frames cover, rounding errors of the transforms aside
    low = np.floor(corners.min(axis=0) + 0.5 + 1e-6)
    high = np.ceil(corners.max(axis=0) - 0.5 - 1e-6)
    grid.wcs.crpix = grid.wcs.crpix - low  # pixel `low` becomes pixel 0
    shape = (int(high[1] - low[1]) + 1, int(high[0] - low[0]) + 1)
    return grid, shape


def resample(
    psfsubs: list[xr.Dataset],
    science: list[xr.Dataset],
    orientation: str = "detector",
    bad_bits: int = PIXEL["DO_NOT_USE"] | PIXEL["NON_SCIENCE"],
) -> tuple[xr.Dataset, WCS]:
    """The i2d image (``sci``, ``err``, ``wht`` on dims y, x) of ``psfsubs`` and its WCS;
    of a KL-mode cube, ``sci`` has their ``kl`` dimension (the same weights for each).

    ``science`` are the science exposures the psfsubs come from: their read-noise variance
    (``var_rnoise``) gives the inverse-variance weights, as jwst's resample (weight_type
    "ivm"), or where an exposure has none its ERR² (the psfsub ERR, KLIP's scatter of the
    references, does not); their ERR, propagated with the same weights, the i2d's ERR.
    Pixels flagged with ``bad_bits`` (jwst's default: DO_NOT_USE and NON_SCIENCE) are left
    out.
    """
    wcs_list = [sky_wcs(psfsub) for psfsub in psfsubs]
    shapes = [(p.sizes["y"], p.sizes["x"]) for p in psfsubs]
    grid, shape = output_grid(wcs_list, shapes, orientation)
    partials = []
    for psfsub, exposure, wcs, (ny, nx) in zip(psfsubs, science, wcs_list, shapes, strict=True):
        if "var_rnoise" in exposure:
            variance = exposure["var_rnoise"].data
        else:
            log.info(
                "resample: %s has no VAR_RNOISE: weights from ERR",
                Path(exposure.encoding.get("source", "science")).name,
            )
            variance = exposure["err"].data ** 2
        y, x = np.indices((ny, nx), dtype=np.float64)
        pixmap = np.dstack(grid.world_to_pixel_values(*wcs.pixel_to_world_values(x, y)))
        pixmap = da.from_array(pixmap, chunks=-1)  # one key in the graph, shared by its tasks
        sci = psfsub["sci"].data
        if "kl" not in psfsub["sci"].dims:
            sci = sci[None]
        planes = sci.shape[0]
        inputs = [exposure["err"].data, variance, psfsub["dq"].data]
        inputs = [data.rechunk(sci.chunks[1:]) for data in inputs]
        partials.append(
            da.blockwise(
                drizzle_block,
                "mjYX",
                sci,
                "cmyx",
                *(item for data in inputs for item in (data, "myx")),
                pixmap,
                "yxk",
                new_axes={"j": planes + 2, "Y": shape[0], "X": shape[1]},
                adjust_chunks={"m": 1},
                concatenate=True,
                dtype=np.float64,
                out_shape=shape,
                bad_bits=bad_bits,
                name="resample-drizzle-" + tokenize(sci, *inputs, pixmap, shape, bad_bits),
            )
        )
    total = tree_sum(da.concatenate(partials), 0, "resample-sum-" + tokenize(partials))
    weighted, variance, weight = total[:-2], total[-2], total[-1]
    covered = da.where(weight > 0, weight, np.nan)  # NaN where no input pixel landed
    sci = (weighted / covered).astype(np.float32)
    err = (da.sqrt(variance) / covered).astype(np.float32)
    dims = ("y", "x")
    sci_dims, coords = ("kl", *dims), {}
    if "kl" in psfsubs[0].dims:
        coords["kl"] = psfsubs[0]["kl"]
    else:
        sci, sci_dims = sci[0], dims
    i2d = xr.Dataset(
        {"sci": (sci_dims, sci), "err": (dims, err), "wht": (dims, weight.astype(np.float32))},
        coords=coords,
        attrs=dict(psfsubs[0].attrs),
    )
    return i2d, grid
