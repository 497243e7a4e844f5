"""klip: PSF subtraction by Karhunen-Loève projection on the aligned references (``_psfsub``).

For each science integration the references aligned to it give a KL basis; the psfsub
image is the integration minus its mean minus its projection on the first ``truncate``
KL images. ERR is jwst's: the per-pixel standard deviation of the references' own KLIP
residuals. DQ is the science DQ. With a 3-D psfalign (``align_to="first"``) the basis
is the same for every integration and is computed once per exposure. Several cutoffs
(a KL-mode cube) come from one basis: each projects on its first k KL images.

No task needs every pixel of every reference at once: one task per target block sums the
references' Gram matrix over tiles of frame rows holding all references (``tile_rows``),
another makes the KL images and ERR tile by tile. In the pipeline the aligned references
are on disk and these tasks read one tile at a time; nothing but the Gram matrices, the
KL weights and the KL images waits between them. The tiles follow from the frame and the
number of references alone, never from the blocks the references arrive in, and the Gram
matrix is summed over them in order, so the products do not depend on the blocks.
"""

from collections.abc import Sequence
from dataclasses import dataclass

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


def kl_cutoffs(truncate: int | Sequence[int]) -> tuple[int, ...]:
    """The KL cutoffs of ``truncate`` (one, or several: a KL-mode cube), ascending, checked."""
    values = (truncate,) if isinstance(truncate, int | np.integer) else tuple(truncate)
    if not values or any(int(k) < 0 for k in values):
        raise CoronInputError("truncate", f"must be one or more values >= 0, got {truncate}")
    return tuple(sorted({int(k) for k in values}))


def _basis(
    aligned: da.Array, cutoffs: tuple[int, ...], rows: int, on_disk: OnDisk | None = None
) -> tuple[da.Array, da.Array]:
    """KL images (m, K, y, x) float64 and KLIP's ERR (m, c, y, x) float64 for each of the
    ``cutoffs`` c of references ``aligned`` (m, p, y, x), one basis per leading index, K
    the largest cutoff (at most p); with ``on_disk``, the same references written to disk,
    which each task reads a tile at a time."""
    name = tokenize(aligned, cutoffs, rows, on_disk)
    npix = aligned.shape[-2] * aligned.shape[-1]
    npsf = aligned.shape[1]
    count = min(cutoffs[-1], npsf)
    kept = tuple(min(k, npsf) for k in cutoffs)
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
        count,
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
        kept,
        None,
        *reading,
        new_axes={"j": count + len(kept), **frame},
        concatenate=False,
        dtype=np.float64,
        name=f"klip-images-{name}",
    )
    return packed[:, :count], packed[:, count:]


@dataclass(frozen=True)
class KLBasis:
    """The KL basis of one science exposure (lazy): ``images`` (m, K, y, x) per target
    block of integrations, or (K, y, x) shared by all (``align_to="first"``), and KLIP's
    ERR (kl, integration, y, x) for each cutoff."""

    images: da.Array
    err: da.Array
    cutoffs: tuple[int, ...]
    cube: bool  # a KL-mode cube (truncate given as cutoffs), or jwst's layout (one int)


def kl_basis(
    science: xr.Dataset,
    psfalign: xr.Dataset,
    truncate: int | Sequence[int] = 50,
    *,
    rows: int | None = None,
    on_disk: OnDisk | None = None,
) -> KLBasis:
    """The KL basis of the references ``psfalign`` aligned to ``science`` (the filled cube
    from align_refs), in the science exposure's blocks of integrations (see ``klip``)."""
    cutoffs = kl_cutoffs(truncate)
    target = science["sci"].data
    aligned = psfalign["sci"].data
    npsf = psfalign.sizes["psf"]
    rows = rows or tile_rows(npsf, (target.shape[1], target.shape[2]), 2**23)
    if aligned.ndim == 4:
        images, err = _basis(aligned.rechunk({0: target.chunks[0]}), cutoffs, rows, on_disk)
        err = err.transpose(1, 0, 2, 3)
    else:  # one basis for the whole exposure
        images, error = _basis(aligned[None], cutoffs, rows, on_disk)
        images = images[0]
        err = da.broadcast_to(
            error[0][:, None], (len(cutoffs), *target.shape), chunks=(-1, *target.chunks)
        )
    cube = not isinstance(truncate, int | np.integer)
    return KLBasis(images, err.astype(np.float32), cutoffs, cube)


def subtract(science: xr.Dataset, basis: KLBasis) -> xr.Dataset:
    """psfsub of ``science`` (a filled cube, in the blocks ``basis`` was made in) on
    ``basis``: ``sci``, ``err`` (the basis's), ``dq`` (see ``klip``). KLIP is linear in the
    science frames: any cube subtracted on one basis (the science, or the science with
    companions injected) is reduced exactly as the science is."""
    target = science["sci"].data
    cutoffs = basis.cutoffs
    kept = tuple(min(k, basis.images.shape[-3]) for k in cutoffs)
    images_index = "mkyx" if basis.images.ndim == 4 else "kyx"
    sci = da.blockwise(
        subtract_block,
        "cmyx",
        target,
        "myx",
        basis.images,
        images_index,
        kept,
        None,
        new_axes={"c": len(cutoffs)},
        concatenate=True,
        dtype=np.float32,
        name="klip-subtract-" + tokenize(target, basis.images, kept),
    )
    err = basis.err
    dims = ("kl", "integration", "y", "x")
    coords = {"integration": science["integration"], "kl": list(cutoffs)}
    if not basis.cube:  # jwst's layout: no kl dimension
        sci, err, dims = sci[0], err[0], dims[1:]
        del coords["kl"]
    return xr.Dataset(
        {"sci": (dims, sci, science["sci"].attrs), "err": (dims, err), "dq": science["dq"]},
        coords=coords,
        attrs=dict(science.attrs),
    )


def klip(
    science: xr.Dataset,
    psfalign: xr.Dataset,
    truncate: int | Sequence[int] = 50,
    *,
    rows: int | None = None,
    on_disk: OnDisk | None = None,
) -> xr.Dataset:
    """psfsub of ``science`` (the filled cube from align_refs): ``sci``, ``err``, ``dq``.

    ``truncate``: the KL modes kept, or several cutoffs (a KL-mode cube): then ``sci`` and
    ``err`` have a leading ``kl`` dimension, one image per cutoff (ascending) from one
    basis, which each cutoff projects on its first k images (k at most the number of
    references; the ``kl`` coordinate keeps the cutoffs asked for).
    ``rows`` of frame per KLIP tile (the block plan's; default: ``chunking.tile_rows`` of
    8 MiB, the default of the setting coron_dask.chunks.klip-tile). ``on_disk``: psfalign's
    SCI as written to disk (``io.products.write_blocks``), which the KLIP tasks then read a
    tile at a time: no worker holds a target's aligned references between tasks.
    """
    basis = kl_basis(science, psfalign, truncate, rows=rows, on_disk=on_disk)
    return subtract(science, basis)
