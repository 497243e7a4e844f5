"""The graph pieces KLIP's two ways of building bases share (``klip``: every reference,
``klip_selected``: the chosen ones): the blockwise arguments that hand each target block its
references, or their place on disk; a basis seen by every target; and KLIP's ERR."""

import dask.array as da
import numpy as np
from dask.base import tokenize

from coron_dask.io.products import OnDisk
from coron_dask.kernels.zones import Zones
from coron_dask.steps.klip_blocks import errors_block, means_block


def block_arguments(
    aligned: da.Array, on_disk: OnDisk | None, after: str, zones: Zones | None
) -> tuple[tuple, da.Array, tuple]:
    """Blockwise arguments for tasks over the target blocks of ``aligned`` (m, p, y, x):
    the references (the blocks, or with ``on_disk`` the targets' indices: the tasks read
    them), their means (m, p, Z), and what the tasks read from (``after``: the index of the
    writes they wait for, the zones' axis added)."""
    if on_disk is None:  # the aligned blocks of a target block, handed to its tasks
        count = 1 if zones is None else zones.count
        means = da.map_blocks(
            means_block,
            aligned,
            zones,
            drop_axis=(2, 3),
            new_axis=2,
            chunks=(*aligned.chunks[:2], (count,)),
            dtype=np.float64,
            name=f"klip-means-{tokenize(aligned, zones)}",
        )
        return (aligned, "mpyx"), means, ()
    written = on_disk.written if zones is not None else on_disk.written[..., None]
    written = written if written.ndim == 3 else written[None]
    written = written.rechunk({0: aligned.chunks[0], 2: -1})
    indices = (da.arange(aligned.shape[0], chunks=aligned.chunks[:1]), "m")
    return indices, written.rechunk({1: -1}), (on_disk.source, None, written, f"{after}s")


def per_target(array: da.Array, m: int, chunks: tuple[int, ...]) -> da.Array:
    """``array`` (1, ...) seen by every one of ``m`` targets in blocks of ``chunks``: no copy."""
    return da.broadcast_to(array, (m, *array.shape[1:]), chunks=(chunks, *array.chunks[1:]))


def kl_errors(
    references: tuple,
    means: da.Array,
    reading: tuple,
    weights: da.Array,
    rows: int,
    cutoffs: tuple[int, ...],
    zones: Zones | None,
    chosen: da.Array | None,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
) -> da.Array:
    """KLIP's ERR (m, kl, y, x) of the references (``shape``: m, p, y, x) in blocks of
    ``chunks`` targets: 0 where every cutoff keeps every reference's mode (the references
    lie in their KL images' span), NaN in no zone."""
    m, npsf, ny, nx = shape
    if all(k >= npsf for k in cutoffs):
        empty = np.zeros((ny, nx)) if zones is None else np.where(zones.labels < 0, np.nan, 0.0)
        return da.broadcast_to(
            da.from_array(empty), (m, len(cutoffs), ny, nx), chunks=(chunks, -1, -1, -1)
        )
    frame = {} if not reading else {"y": ny, "x": nx}
    return da.blockwise(
        errors_block,
        "mcyx",
        *references,
        means,
        "mpz",
        weights,
        "mzwak",
        rows,
        None,
        cutoffs,
        None,
        zones,
        None,
        *((None, None) if chosen is None else (chosen, "mzp")),
        *reading,
        new_axes={"c": len(cutoffs), **frame},
        concatenate=False,
        dtype=np.float64,
        name=f"klip-err-{tokenize(references, means, weights, rows, cutoffs, zones, chosen)}",
    )
