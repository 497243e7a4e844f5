"""klip: PSF subtraction by Karhunen-Loève projection on the aligned references (``_psfsub``).

For each science integration the references aligned to it give a KL basis; the psfsub
image is the integration minus its mean minus its projection on the first ``truncate``
KL images. ERR is jwst's: the per-pixel standard deviation of the references' own KLIP
residuals. DQ is the science DQ. With a 3-D psfalign (``align_to="first"``) the basis
is the same for every integration and is computed once per exposure.
"""

import dask.array as da
import numpy as np
import xarray as xr

from coron_dask.errors import CoronInputError
from coron_dask.kernels import kl_basis, klip_error, klip_subtract


def _klip_each_block(targets: np.ndarray, refs: np.ndarray, truncate: int) -> np.ndarray:
    """psfsub SCI and ERR (m, 2, y, x) of targets (m, y, x), each with its refs (m, p, y, x)."""
    m, p, ny, nx = refs.shape
    out = np.empty((m, 2, ny, nx), dtype=np.float32)
    for i in range(m):
        frames = refs[i].reshape(p, -1).astype(np.float64)
        basis = kl_basis(frames, truncate)
        out[i, 0] = klip_subtract(targets[i].reshape(1, -1), basis).reshape(ny, nx)
        out[i, 1] = klip_error(frames, basis).reshape(ny, nx)
    return out


def _basis_block(refs: np.ndarray, truncate: int) -> np.ndarray:
    return kl_basis(refs.reshape(refs.shape[0], -1), truncate)


def _subtract_block(targets: np.ndarray, basis: np.ndarray) -> np.ndarray:
    flat = targets.reshape(targets.shape[0], -1)
    return klip_subtract(flat, basis).reshape(targets.shape).astype(np.float32)


def _error_block(refs: np.ndarray, basis: np.ndarray) -> np.ndarray:
    return klip_error(refs.reshape(refs.shape[0], -1), basis).reshape(refs.shape[1:])


def klip(science: xr.Dataset, psfalign: xr.Dataset, truncate: int = 50) -> xr.Dataset:
    """psfsub of ``science`` (the filled cube from align_refs): ``sci``, ``err``, ``dq``."""
    if truncate < 0:
        raise CoronInputError("truncate", f"must be >= 0, got {truncate}")
    target = science["sci"].data
    if psfalign["sci"].ndim == 4:
        refs = psfalign["sci"].data.rechunk({0: target.chunks[0], 1: -1, 2: -1, 3: -1})
        both = da.blockwise(
            _klip_each_block,
            "mcyx",
            target,
            "myx",
            refs,
            "mpyx",
            new_axes={"c": 2},
            concatenate=True,
            dtype=np.float32,
            truncate=truncate,
        )
        sci, err = both[:, 0], both[:, 1]
    else:
        refs = psfalign["sci"].data.rechunk(-1)
        nbasis = min(truncate, refs.shape[0])
        npix = refs.shape[1] * refs.shape[2]
        basis = refs.map_blocks(
            _basis_block, truncate, chunks=((nbasis,), (npix,)), drop_axis=2, dtype=np.float64
        )
        sci = da.blockwise(
            _subtract_block, "myx", target, "myx", basis, "kq", dtype=np.float32, concatenate=True
        )
        error = da.blockwise(
            _error_block, "yx", refs, "pyx", basis, "kq", dtype=np.float64, concatenate=True
        )
        err = da.broadcast_to(error.astype(np.float32), target.shape, chunks=target.chunks)
    dims = ("integration", "y", "x")
    return xr.Dataset(
        {"sci": (dims, sci, science["sci"].attrs), "err": (dims, err), "dq": science["dq"]},
        coords={"integration": science["integration"]},
        attrs=dict(science.attrs),
    )
