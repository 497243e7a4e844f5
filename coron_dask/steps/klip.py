"""klip: PSF subtraction by Karhunen-Loève projection on the aligned references (``_psfsub``).

For each science integration the references aligned to it give a KL basis; the psfsub
image is the integration minus its mean minus its projection on the first ``truncate``
KL images. ERR is jwst's: the per-pixel standard deviation of the references' own KLIP
residuals. DQ is the science DQ. With a 3-D psfalign (``align_to="first"``) the basis
is the same for every integration and is computed once per exposure.

No task needs every pixel of every reference: the aligned references are cut into tiles
of frame rows holding all references (``tile_rows``), the references' Gram matrix is
summed over the tiles (a tree reduction), and the KL images and ERR are made tile by tile.
Only the KL images (at most ``truncate`` frames per basis) come together as whole frames,
for the subtraction. The tiles follow from the frame and the number of references alone,
never from the blocks the references arrive in, so the products do not depend on those.
"""

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from coron_dask.chunking import tile_rows
from coron_dask.errors import CoronInputError
from coron_dask.kernels.blocks import (
    gram_block,
    images_block,
    means_block,
    subtract_block,
    weights_block,
)
from coron_dask.steps.reductions import tree_sum


def _basis(aligned: da.Array, truncate: int, rows: int) -> tuple[da.Array, da.Array]:
    """KL images (m, K, y, x) float64 and KLIP's ERR (m, y, x) float64 of references
    ``aligned`` (m, p, y, x), one basis per leading index."""
    name = tokenize(aligned, truncate, rows)
    npix = aligned.shape[-2] * aligned.shape[-1]
    count = min(truncate, aligned.shape[1])
    means = da.map_blocks(
        means_block, aligned, drop_axis=(2, 3), dtype=np.float64, name=f"klip-means-{name}"
    )
    # tiles of rows as views of the aligned blocks (a split, no copy); a tile task takes
    # the pieces of every reference block
    pieces = aligned.rechunk({2: rows, 3: -1}, method="tasks")
    npsf = aligned.shape[1]
    partial = da.blockwise(
        gram_block,
        "mtab",
        pieces,
        "mptx",
        means,
        "mp",
        new_axes={"a": npsf, "b": npsf},
        adjust_chunks={"t": 1},
        concatenate=False,
        dtype=np.float64,
        name=f"klip-gram-{name}",
    )
    gram = tree_sum(partial, 1, f"klip-gram-sum-{name}")
    weights = da.map_blocks(
        weights_block,
        gram,
        npix,
        truncate,
        new_axis=1,
        chunks=(gram.chunks[0], (2,), gram.chunks[1], (count,)),
        dtype=np.float64,
        name=f"klip-weights-{name}",
    )
    packed = da.blockwise(
        images_block,
        "mjyx",
        pieces,
        "mpyx",
        means,
        "mp",
        weights,
        "mwak",
        new_axes={"j": count + 1},
        concatenate=False,
        dtype=np.float64,
        name=f"klip-images-{name}",
    )
    images = packed[:, :count].rechunk({2: -1})
    error = packed[:, count].rechunk({1: -1})
    return images, error


def klip(
    science: xr.Dataset, psfalign: xr.Dataset, truncate: int = 50, *, rows: int | None = None
) -> xr.Dataset:
    """psfsub of ``science`` (the filled cube from align_refs): ``sci``, ``err``, ``dq``.

    ``rows`` of frame per KLIP tile (the block plan's; default: ``chunking.tile_rows`` of
    8 MiB, the default of the setting coron_dask.chunks.klip-tile).
    """
    if truncate < 0:
        raise CoronInputError("truncate", f"must be >= 0, got {truncate}")
    target = science["sci"].data
    aligned = psfalign["sci"].data
    npsf = psfalign.sizes["psf"]
    rows = rows or tile_rows(npsf, (target.shape[1], target.shape[2]), 2**23)
    if aligned.ndim == 4:
        images, error = _basis(aligned.rechunk({0: target.chunks[0]}), truncate, rows)
        images_index = "mkyx"
        err = error
    else:  # one basis for the whole exposure
        images, error = _basis(aligned[None], truncate, rows)
        images = images[0]
        images_index = "kyx"
        err = da.broadcast_to(error[0], target.shape, chunks=target.chunks)
    sci = da.blockwise(
        subtract_block,
        "myx",
        target,
        "myx",
        images,
        images_index,
        concatenate=True,
        dtype=np.float32,
        name="klip-subtract-" + tokenize(target, images),
    )
    dims = ("integration", "y", "x")
    return xr.Dataset(
        {
            "sci": (dims, sci, science["sci"].attrs),
            "err": (dims, err.astype(np.float32)),
            "dq": science["dq"],
        },
        coords={"integration": science["integration"]},
        attrs=dict(science.attrs),
    )
