"""klip: PSF subtraction by Karhunen-Loève projection on the aligned references (``_psfsub``).

For each science integration the references aligned to it give a KL basis; the psfsub
image is the integration minus its mean minus its projection on the first ``truncate``
KL images. ERR is jwst's: the per-pixel standard deviation of the references' own KLIP
residuals. DQ is the science DQ. With a 3-D psfalign (``align_to="first"``) the basis
is the same for every integration and is computed once per exposure.

No task needs every pixel of every reference at once: one task per target block sums the
references' Gram matrix over tiles of frame rows holding all references (``tile_rows``),
another makes the KL images and ERR tile by tile. In the pipeline the aligned references
are on disk and these tasks read one tile at a time; nothing but the Gram matrices, the
KL weights and the KL images waits between them. The tiles follow from the frame and the
number of references alone, never from the blocks the references arrive in, and the Gram
matrix is summed over them in order, so the products do not depend on the blocks.
"""

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from coron_dask.chunking import tile_rows
from coron_dask.errors import CoronInputError
from coron_dask.io.products import OnDisk
from coron_dask.kernels.blocks import (
    gram_block,
    images_block,
    means_block,
    subtract_block,
    weights_block,
)


def _basis(
    aligned: da.Array, truncate: int, rows: int, on_disk: OnDisk | None = None
) -> tuple[da.Array, da.Array]:
    """KL images (m, K, y, x) float64 and KLIP's ERR (m, y, x) float64 of references
    ``aligned`` (m, p, y, x), one basis per leading index; with ``on_disk``, the same
    references written to disk, which each task reads a tile at a time."""
    name = tokenize(aligned, truncate, rows, on_disk)
    npix = aligned.shape[-2] * aligned.shape[-1]
    count = min(truncate, aligned.shape[1])
    npsf = aligned.shape[1]
    if on_disk is None:  # the aligned blocks of a target block, handed to its tasks
        means = da.map_blocks(
            means_block, aligned, drop_axis=(2, 3), dtype=np.float64, name=f"klip-means-{name}"
        )
        references = (aligned, "mpyx")
        reading: tuple = ()
    else:  # the targets' indices: the tasks read their references from disk
        written = on_disk.written if on_disk.written.ndim == 2 else on_disk.written[None]
        written = written.rechunk({0: aligned.chunks[0]})
        means = written.rechunk({1: -1})
        references = (da.arange(aligned.shape[0], chunks=aligned.chunks[:1]), "m")
        reading = (on_disk.source, None, written, "mq")
    gram = da.blockwise(
        gram_block,
        "mab",
        *references,
        means,
        "mp",
        rows,
        None,
        *reading,
        new_axes={"a": npsf, "b": npsf},
        concatenate=False,
        dtype=np.float64,
        name=f"klip-gram-{name}",
    )
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
    frame = {} if on_disk is None else {"y": aligned.shape[2], "x": aligned.shape[3]}
    packed = da.blockwise(
        images_block,
        "mjyx",
        *references,
        means,
        "mp",
        weights,
        "mwak",
        rows,
        None,
        *reading,
        new_axes={"j": count + 1, **frame},
        concatenate=False,
        dtype=np.float64,
        name=f"klip-images-{name}",
    )
    return packed[:, :count], packed[:, count]


def klip(
    science: xr.Dataset,
    psfalign: xr.Dataset,
    truncate: int = 50,
    *,
    rows: int | None = None,
    on_disk: OnDisk | None = None,
) -> xr.Dataset:
    """psfsub of ``science`` (the filled cube from align_refs): ``sci``, ``err``, ``dq``.

    ``rows`` of frame per KLIP tile (the block plan's; default: ``chunking.tile_rows`` of
    8 MiB, the default of the setting coron_dask.chunks.klip-tile). ``on_disk``: psfalign's
    SCI as written to disk (``io.products.write_blocks``), which the KLIP tasks then read a
    tile at a time: no worker holds a target's aligned references between tasks.
    """
    if truncate < 0:
        raise CoronInputError("truncate", f"must be >= 0, got {truncate}")
    target = science["sci"].data
    aligned = psfalign["sci"].data
    npsf = psfalign.sizes["psf"]
    rows = rows or tile_rows(npsf, (target.shape[1], target.shape[2]), 2**23)
    if aligned.ndim == 4:
        images, error = _basis(aligned.rechunk({0: target.chunks[0]}), truncate, rows, on_disk)
        images_index = "mkyx"
        err = error
    else:  # one basis for the whole exposure
        images, error = _basis(aligned[None], truncate, rows, on_disk)
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
