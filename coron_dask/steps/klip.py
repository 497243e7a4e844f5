"""klip: PSF subtraction by Karhunen-Loève projection on the aligned references (``_psfsub``).

For each science integration the references aligned to it give a KL basis; the psfsub
image is the integration minus its mean minus its projection on the first ``truncate``
KL images. ERR is jwst's: the per-pixel standard deviation of the references' own KLIP
residuals. DQ is the science DQ. With a 3-D psfalign (``align_to="first"``) the basis
is the same for every integration and is computed once per exposure.

References reach the kernels as the blocks dask holds them in, never concatenated, so a
KLIP task needs little more memory than its references.
"""

import dask.array as da
import numpy as np
import xarray as xr
from dask import delayed

from coron_dask.errors import CoronInputError
from coron_dask.kernels.blocks import basis_block, error_block, klip_block, subtract_block


def klip(science: xr.Dataset, psfalign: xr.Dataset, truncate: int = 50) -> xr.Dataset:
    """psfsub of ``science`` (the filled cube from align_refs): ``sci``, ``err``, ``dq``."""
    if truncate < 0:
        raise CoronInputError("truncate", f"must be >= 0, got {truncate}")
    target = science["sci"].data
    if psfalign["sci"].ndim == 4:
        refs = psfalign["sci"].data.rechunk({0: target.chunks[0]})
        both = da.blockwise(
            klip_block,
            "mcyx",
            target,
            "myx",
            refs,
            "mpyx",
            new_axes={"c": 2},
            concatenate=False,
            dtype=np.float32,
            truncate=truncate,
        )
        sci, err = both[:, 0], both[:, 1]
    else:
        blocks = psfalign["sci"].data.to_delayed().ravel().tolist()
        basis = delayed(basis_block, pure=True)(blocks, truncate)
        sci = target.map_blocks(subtract_block, basis, dtype=np.float32)
        error = da.from_delayed(
            delayed(error_block, pure=True)(basis, blocks),
            shape=(target.shape[1] * target.shape[2],),
            dtype=np.float64,
        ).reshape(target.shape[1:])
        err = da.broadcast_to(error.astype(np.float32), target.shape, chunks=target.chunks)
    dims = ("integration", "y", "x")
    return xr.Dataset(
        {"sci": (dims, sci, science["sci"].attrs), "err": (dims, err), "dq": science["dq"]},
        coords={"integration": science["integration"]},
        attrs=dict(science.attrs),
    )
