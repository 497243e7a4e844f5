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
from coron_dask.kernels import KLBasis, klip_subtract


def _flat(block: np.ndarray) -> np.ndarray:
    return block.reshape(block.shape[0], -1)


def _klip_each_block(targets: np.ndarray, ref_blocks: list, truncate: int) -> np.ndarray:
    """psfsub SCI and ERR (m, 2, y, x) of targets (m, y, x), each with its references,
    given as blocks (m, p_j, y, x) along the reference axis."""
    m, ny, nx = targets.shape
    out = np.empty((m, 2, ny, nx), dtype=np.float32)
    for i in range(m):
        pieces = [_flat(block[i]) for block in ref_blocks]
        basis = KLBasis(pieces, truncate)
        out[i, 0] = klip_subtract(targets[i].reshape(1, -1), basis.images).reshape(ny, nx)
        out[i, 1] = basis.error(pieces).reshape(ny, nx)
    return out


def _basis(ref_blocks: list, truncate: int) -> KLBasis:
    return KLBasis([_flat(block) for block in ref_blocks], truncate)


def _error(basis: KLBasis, ref_blocks: list) -> np.ndarray:
    return basis.error([_flat(block) for block in ref_blocks])


def _subtract_block(targets: np.ndarray, basis: KLBasis) -> np.ndarray:
    flat = targets.reshape(targets.shape[0], -1)
    return klip_subtract(flat, basis.images).reshape(targets.shape).astype(np.float32)


def klip(science: xr.Dataset, psfalign: xr.Dataset, truncate: int = 50) -> xr.Dataset:
    """psfsub of ``science`` (the filled cube from align_refs): ``sci``, ``err``, ``dq``."""
    if truncate < 0:
        raise CoronInputError("truncate", f"must be >= 0, got {truncate}")
    target = science["sci"].data
    if psfalign["sci"].ndim == 4:
        refs = psfalign["sci"].data.rechunk({0: target.chunks[0]})
        both = da.blockwise(
            _klip_each_block,
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
        basis = delayed(_basis, pure=True)(blocks, truncate)
        sci = target.map_blocks(_subtract_block, basis, dtype=np.float32)
        error = da.from_delayed(
            delayed(_error, pure=True)(basis, blocks),
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
