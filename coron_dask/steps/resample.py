"""resample: every psfsub integration of every science exposure onto one sky grid (``_i2d``).

Each exposure's celestial WCS (the FITS keywords the JWST pipeline writes in the SCI header)
maps its pixels onto an output grid with the first exposure's pixel scale, in the detector
orientation of the first exposure (as jwst) or north up. drizzle (jwst's resampling
library, square kernel, pixfrac 1) does the pixel mapping; integrations are weighted by
inverse variance, bad pixels left out. Blocks of integrations drizzle separately and their
weighted sums add up, so memory holds a few output-sized images whatever the number of
integrations. ERR is 1/sqrt(WHT).
"""

import dask.array as da
import numpy as np
import xarray as xr
from astropy.wcs import WCS
from dask.base import tokenize

from coron_dask.dqflags import PIXEL
from coron_dask.errors import CoronInputError
from coron_dask.kernels.blocks import drizzle_block
from coron_dask.steps.reductions import tree_sum


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


def output_grid(wcs_list: list[WCS], shapes: list[tuple[int, int]], orientation: str):
    """A TAN grid with the first WCS's pixel scale and orientation (or north up) covering every
    input frame: its WCS and shape (ny, nx)."""
    first = wcs_list[0]
    scale = float(np.sqrt(abs(np.linalg.det(first.pixel_scale_matrix))))
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
    low = np.floor(corners.min(axis=0) + 0.5)
    high = np.ceil(corners.max(axis=0) - 0.5)
    grid.wcs.crpix = 1 - low  # 1-based: pixel `low` becomes pixel 0
    shape = (int(high[1] - low[1]) + 1, int(high[0] - low[0]) + 1)
    return grid, shape


def resample(
    psfsubs: list[xr.Dataset],
    errors: list[xr.DataArray],
    orientation: str = "detector",
    bad_bits: int = PIXEL["DO_NOT_USE"],
) -> tuple[xr.Dataset, WCS]:
    """The i2d image (``sci``, ``err``, ``wht`` on dims y, x) of ``psfsubs`` and its WCS;
    of a KL-mode cube, ``sci`` has their ``kl`` dimension (the same weights for each).

    ``errors`` are the science exposures' own ERR (photon and read noise), which give the
    inverse-variance weights; the psfsub ERR (KLIP's scatter of the references) does not.
    """
    wcs_list = [sky_wcs(psfsub) for psfsub in psfsubs]
    shapes = [(p.sizes["y"], p.sizes["x"]) for p in psfsubs]
    grid, shape = output_grid(wcs_list, shapes, orientation)
    partials = []
    for psfsub, error, wcs, (ny, nx) in zip(psfsubs, errors, wcs_list, shapes, strict=True):
        y, x = np.indices((ny, nx), dtype=np.float64)
        pixmap = np.dstack(grid.world_to_pixel_values(*wcs.pixel_to_world_values(x, y)))
        pixmap = da.from_array(pixmap, chunks=-1)  # one key in the graph, shared by its tasks
        sci = psfsub["sci"].data
        if "kl" not in psfsub["sci"].dims:
            sci = sci[None]
        planes = sci.shape[0]
        partials.append(
            da.blockwise(
                drizzle_block,
                "mjYX",
                sci,
                "cmyx",
                error.data.rechunk(sci.chunks[1:]),
                "myx",
                psfsub["dq"].data.rechunk(sci.chunks[1:]),
                "myx",
                pixmap,
                "yxk",
                new_axes={"j": planes + 1, "Y": shape[0], "X": shape[1]},
                adjust_chunks={"m": 1},
                concatenate=True,
                dtype=np.float64,
                out_shape=shape,
                bad_bits=bad_bits,
                name="resample-drizzle-"
                + tokenize(sci, error.data, psfsub["dq"].data, pixmap, shape, bad_bits),
            )
        )
    total = tree_sum(da.concatenate(partials), 0, "resample-sum-" + tokenize(partials))
    weighted, weight = total[:-1], total[-1]
    covered = da.where(weight > 0, weight, np.nan)  # NaN where no input pixel landed
    sci = (weighted / covered).astype(np.float32)
    err = (1 / da.sqrt(covered)).astype(np.float32)
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
