"""outlier_detection in jwst's coronagraphic mode (``_crfints``), per exposure.

The good pixels of every integration give a median image; a pixel further from it than
``snr`` times its ERR is flagged DO_NOT_USE | OUTLIER and set to NaN; then SCI, ERR and DQ
agree on which pixels are unusable.

The median needs every integration of a pixel at once, so it runs on slabs of frame rows
(all integrations of a few rows per task), best read straight from the file (``slabs``),
so that an exposure of any length never has to be in memory, nor exchanged between
workers. The row slabs stay inside this step: the median image is one block, and the
flagged exposure keeps the blocks of its input.
"""

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from coron_dask.core.dqflags import PIXEL, bit_value
from coron_dask.core.errors import CoronInputError
from coron_dask.kernels.blocks import flag_block, median_block


def outlier_detection(
    exposure: xr.Dataset,
    snr: float = 5.0,
    maskpt: float = 0.7,
    good_bits: str | int = "~DO_NOT_USE",
    *,
    slabs: xr.Dataset | None = None,
    rows: int | None = None,
) -> xr.Dataset:
    """``exposure`` with outliers flagged in DQ and NaN in SCI and ERR (lazily).

    ``good_bits`` are the DQ bits that do not make a pixel bad (jwst's default: every bit
    but DO_NOT_USE). With 0/1 weights jwst's threshold, maskpt times the mean weight of the
    good pixels, leaves out exactly the bad pixels when 0 < maskpt <= 1. ``slabs`` is the
    same exposure in blocks of all integrations × some rows (``open_exposure(path,
    {"integration": -1, "y": rows})``); without it the exposure is rechunked into slabs of
    ``rows`` rows (default: whole frames).
    """
    if snr <= 0:
        raise CoronInputError("snr", f"must be > 0, got {snr}")
    bad_bits = ~bit_value(good_bits, "good_bits") & 0xFFFFFFFF
    if slabs is None:
        slabs = exposure.chunk({"integration": -1, "y": rows or -1, "x": -1})
    median = da.map_blocks(
        median_block,
        slabs["sci"].data,
        slabs["dq"].data,
        bad_bits,
        maskpt,
        drop_axis=0,
        dtype=np.float32,
        name="OutlierDetection-median-"
        + tokenize(slabs["sci"].data, slabs["dq"].data, bad_bits, maskpt),
    ).rechunk({0: -1, 1: -1})  # a frame: small, and the flagging keeps whole frames
    sci, err, dq = (exposure[name].data for name in ("sci", "err", "dq"))
    outlier_bits = PIXEL["DO_NOT_USE"] | PIXEL["OUTLIER"]

    def flagged(which: str) -> xr.DataArray:
        data = da.blockwise(
            flag_block,
            "myx",
            which,
            None,
            sci,
            "myx",
            err,
            "myx",
            dq,
            "myx",
            median,
            "yx",
            snr,
            None,
            outlier_bits,
            None,
            PIXEL["DO_NOT_USE"],
            None,
            dtype=exposure[which].dtype,
            name=f"OutlierDetection-flag-{which}-" + tokenize(sci, err, dq, median, snr),
        )
        return exposure[which].copy(data=data)

    return exposure.assign(sci=flagged("sci"), err=flagged("err"), dq=flagged("dq"))
