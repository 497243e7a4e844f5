"""outlier_detection in jwst's coronagraphic mode (``_crfints``), per exposure.

The good pixels of every integration give a median image; a pixel further from it than
``snr`` times its ERR is flagged DO_NOT_USE | OUTLIER and set to NaN; then SCI, ERR and DQ
agree on which pixels are unusable. The median runs over the integration axis block by
block, frame rows split across blocks, so exposures of hundreds of integrations never need
to be in memory at once.
"""

import dask.array as da
import numpy as np
import xarray as xr

from coron_dask.dqflags import PIXEL, bit_value
from coron_dask.errors import CoronInputError
from coron_dask.kernels.blocks import median_block

#: Bytes of one block of the median (all integrations of some rows, float32).
MEDIAN_BLOCK_BYTES = 64 * 2**20


def outlier_detection(
    exposure: xr.Dataset,
    snr: float = 5.0,
    maskpt: float = 0.7,
    good_bits: str | int = "~DO_NOT_USE",
) -> xr.Dataset:
    """``exposure`` with outliers flagged in DQ and NaN in SCI and ERR (lazily).

    ``good_bits`` are the DQ bits that do not make a pixel bad (jwst's default: every bit
    but DO_NOT_USE). With 0/1 weights jwst's threshold, maskpt times the mean weight of the
    good pixels, leaves out exactly the bad pixels when 0 < maskpt <= 1.
    """
    if snr <= 0:
        raise CoronInputError("snr", f"must be > 0, got {snr}")
    bad_bits = ~bit_value(good_bits, "good_bits") & 0xFFFFFFFF
    sci, err, dq = (exposure[name].data for name in ("sci", "err", "dq"))
    weight = ((dq & bad_bits) == 0).astype(np.float32)
    masked = da.where(weight < maskpt, np.nan, sci)
    nints, ny, nx = sci.shape
    rows = int(max(1, min(ny, MEDIAN_BLOCK_BYTES // max(1, nints * nx * 4))))
    median = masked.rechunk({0: -1, 1: rows, 2: -1}).map_blocks(
        median_block, drop_axis=0, dtype=np.float32
    )
    outlier = da.fabs(sci - median[None]) > snr * da.nan_to_num(err)
    flagged = dq | (outlier.astype(np.uint32) * np.uint32(PIXEL["DO_NOT_USE"] | PIXEL["OUTLIER"]))
    invalid = da.isnan(sci) | da.isnan(err) | ((flagged & PIXEL["DO_NOT_USE"]) > 0)
    return exposure.assign(
        sci=exposure["sci"].copy(data=da.where(invalid, np.float32(np.nan), sci)),
        err=exposure["err"].copy(data=da.where(invalid, np.float32(np.nan), err)),
        dq=exposure["dq"].copy(
            data=da.where(invalid, flagged | np.uint32(PIXEL["DO_NOT_USE"]), flagged)
        ),
    )
