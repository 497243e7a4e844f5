"""klip: PSF subtraction by Karhunen-Loève projection on the aligned references (``_psfsub``).

For each science integration the references aligned to it give a KL basis; the psfsub
image is the integration minus its mean minus its projection on the first ``truncate``
KL images. ERR is jwst's: the per-pixel standard deviation of the references' own KLIP
residuals. DQ is the science DQ. With a 3-D psfalign (``align_to="first"``) the basis
is the same for every integration and is computed once per exposure. Several cutoffs
(a KL-mode cube) come from one basis: each projects on its first k KL images.

No task needs every pixel of every reference at once: one task per target block sums the
references' Gram matrix over tiles of frame rows holding all references (``tile_rows``);
the KL weights follow from it. The subtraction then takes two more passes over the
tiles, one for the targets' overlaps with the references (with a basis per integration,
the Gram matrix's pass makes the science's), one for their projections, which are mixes
of the references (the KL images themselves are made only where the ERR needs them, for
cutoffs below the number of references). In the pipeline the aligned references are on
disk and these tasks read one tile at a time; nothing but the Gram matrices, the KL
weights, the overlaps and the ERR waits between them. The tiles follow from the frame
and the number of references alone, never from the blocks the references arrive in, and
every sum over them is taken in order, target by target, so the products do not depend
on the blocks.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from coron_dask.core.parameters import cutoffs as read_cutoffs
from coron_dask.io.products import OnDisk
from coron_dask.planning.block_plan import tile_rows
from coron_dask.steps.blocks import (
    errors_block,
    gram_block,
    means_block,
    overlaps_block,
    project_block,
    weights_block,
)

log = logging.getLogger(__name__)


def kl_cutoffs(truncate: int | Sequence[int]) -> tuple[int, ...]:
    """The KL cutoffs of ``truncate`` (one, or several: a KL-mode cube), ascending, checked
    as the parameter is (``core.parameters.cutoffs``: each at least 1)."""
    found = read_cutoffs(truncate)
    return (found,) if isinstance(found, int) else found


def used_cutoffs(truncate: int | Sequence[int], npsf: int) -> int | tuple[int, ...]:
    """``truncate`` as klip uses it with ``npsf`` references: a cutoff above ``npsf`` keeps
    all ``npsf`` KL modes, so it is ``npsf`` (logged, as are cutoffs that become one);
    several cutoffs stay a KL-mode cube, of the distinct ones. jwst's klip slices the KL
    vectors (``klvect[:truncate]``): the same modes, silently."""
    cube = not isinstance(truncate, int | np.integer)
    asked = kl_cutoffs(truncate)
    kept = tuple(sorted({min(k, npsf) for k in asked}))
    if kept != asked:
        shown = ",".join(map(str, asked))
        log.warning(
            "klip: truncate %s is more than the %d references: %s KL modes kept%s",
            shown,
            npsf,
            ",".join(map(str, kept)),
            f" ({len(asked) - len(kept)} cutoff(s) the same as another, dropped)"
            if len(kept) < len(asked)
            else "",
        )
    return kept if cube else kept[0]


@dataclass(frozen=True)
class KLBasis:
    """The KL basis of one science exposure (lazy), per target block of integrations: the
    references aligned to each target (``references``: blockwise arguments, the blocks
    themselves or the targets' indices into psfalign on disk, which ``reading`` names), their
    means (m, p) and KL weights W and C (m, 2, p, K), the same for every target with a 3-D
    psfalign (``align_to="first"``); and KLIP's ERR (kl, integration, y, x) for each cutoff.
    The KL images themselves are never made: a target's projection on them is (W·c)ᵀ·(R − μ)
    with c = Wᵀ·(R − μ)·t, two passes over the references (``subtract``). With a basis per
    integration the pass that sums its Gram matrix also sums the overlaps (R − μ)·t of the
    ``science`` it was made for (``overlaps``), and subtracting that science takes one pass.
    """

    references: tuple
    reading: tuple
    means: da.Array
    weights: da.Array
    rows: int
    err: da.Array
    cutoffs: tuple[int, ...]
    cube: bool  # a KL-mode cube (truncate given as cutoffs), or jwst's layout (one int)
    science: da.Array  # the science SCI the basis was made for
    overlaps: da.Array | None  # its overlaps with the references, made with a basis each


def _references(
    aligned: da.Array, on_disk: OnDisk | None, after: str
) -> tuple[tuple, da.Array, tuple]:
    """Blockwise arguments for tasks over the target blocks of ``aligned`` (m, p, y, x):
    the references (the blocks, or with ``on_disk`` the targets' indices: the tasks read
    them), their means (m, p), and what the tasks read from (``after``: the index of the
    writes they wait for)."""
    if on_disk is None:  # the aligned blocks of a target block, handed to its tasks
        means = da.map_blocks(
            means_block,
            aligned,
            drop_axis=(2, 3),
            dtype=np.float64,
            name=f"klip-means-{tokenize(aligned)}",
        )
        return (aligned, "mpyx"), means, ()
    written = on_disk.written if on_disk.written.ndim == 2 else on_disk.written[None]
    written = written.rechunk({0: aligned.chunks[0]})
    indices = (da.arange(aligned.shape[0], chunks=aligned.chunks[:1]), "m")
    return indices, written.rechunk({1: -1}), (on_disk.source, None, written, after)


def kl_basis(
    science: xr.Dataset,
    psfalign: xr.Dataset,
    truncate: int | Sequence[int] = 50,
    *,
    rows: int | None = None,
    on_disk: OnDisk | None = None,
) -> KLBasis:
    """The KL basis of the references ``psfalign`` aligned to ``science`` (the filled cube
    from align_refs), in the science exposure's blocks of integrations (see ``klip``): one
    per integration with a 4-D psfalign, one for the exposure with a 3-D one."""
    target = science["sci"].data
    aligned = psfalign["sci"].data
    npsf = psfalign.sizes["psf"]
    cutoffs = kl_cutoffs(used_cutoffs(truncate, npsf))
    rows = rows or tile_rows(npsf, (target.shape[1], target.shape[2]), 2**23)
    shared = aligned.ndim == 3  # one basis for the whole exposure
    bases = aligned[None] if shared else aligned.rechunk({0: target.chunks[0]})
    # a basis per integration: its Gram pass makes the integration's overlaps too
    own = (None, None) if shared else (target, "myx")
    name = tokenize(bases, cutoffs, rows, on_disk, own[0])
    npix = target.shape[1] * target.shape[2]
    count = cutoffs[-1]
    references, means, reading = _references(bases, on_disk, "mr")
    gram = da.blockwise(
        gram_block,
        "mab",
        *references,
        means,
        "mp",
        *own,
        rows,
        None,
        *reading,
        new_axes={"a": npsf, "b": npsf + (not shared)},
        concatenate=False,
        dtype=np.float64,
        name=f"klip-gram-{name}",
    )
    overlaps = None if shared else gram[:, :, npsf]
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
    err_shape = (bases.shape[0], len(cutoffs), *target.shape[1:])
    if all(k >= npsf for k in cutoffs):  # the references lie in their KL images' span
        err = da.zeros(err_shape, chunks=(bases.chunks[0], -1, -1, -1), dtype=np.float64)
    else:
        frame = {} if on_disk is None else {"y": target.shape[1], "x": target.shape[2]}
        err = da.blockwise(
            errors_block,
            "mcyx",
            *references,
            means,
            "mp",
            weights,
            "mwak",
            rows,
            None,
            cutoffs,
            None,
            *reading,
            new_axes={"c": len(cutoffs), **frame},
            concatenate=False,
            dtype=np.float64,
            name=f"klip-err-{name}",
        )
    if shared:  # every target block sees the one basis (broadcast: no copies)
        m, chunks = target.shape[0], target.chunks[0]
        weights = da.broadcast_to(
            weights, (m, *weights.shape[1:]), chunks=(chunks, *weights.chunks[1:])
        )
        means = da.broadcast_to(means, (m, npsf), chunks=(chunks, means.chunks[1]))
        if on_disk is None:
            references = (
                da.broadcast_to(bases, (m, *aligned.shape), chunks=(chunks, *aligned.chunks)),
                "mpyx",
            )
        else:  # the 3-D psfalign is read whatever the targets; every write is waited for
            references = (da.arange(m, chunks=chunks), "m")
            reading = (*reading[:3], "nr")
        err = da.broadcast_to(
            err[0][:, None], (len(cutoffs), *target.shape), chunks=(-1, *target.chunks)
        )
    else:
        err = err.transpose(1, 0, 2, 3)
    cube = not isinstance(truncate, int | np.integer)
    err = err.astype(np.float32)
    return KLBasis(references, reading, means, weights, rows, err, cutoffs, cube, target, overlaps)


def subtract(science: xr.Dataset, basis: KLBasis) -> xr.Dataset:
    """psfsub of ``science`` (a filled cube, in the blocks ``basis`` was made in) on
    ``basis``: ``sci``, ``err`` (the basis's), ``dq`` (see ``klip``). KLIP is linear in the
    science frames: any cube subtracted on one basis (the science, or the science with
    companions injected) is reduced exactly as the science is.

    Two passes over the references, a tile at a time: the targets' overlaps with them
    (summed over the tiles), then each target minus its projection, for each cutoff. The
    first is the Gram matrix's pass when ``science`` is the one the basis was made for
    and there is a basis per integration (``KLBasis.overlaps``)."""
    target = science["sci"].data
    cutoffs = basis.cutoffs
    npsf = basis.weights.shape[2]
    name = tokenize(target, basis.weights, cutoffs)
    overlaps = basis.overlaps
    if overlaps is None or target.name != basis.science.name:  # a pass of their own
        overlaps = da.blockwise(
            overlaps_block,
            "mq",
            target,
            "myx",
            *basis.references,
            basis.means,
            "mp",
            basis.rows,
            None,
            *basis.reading,
            new_axes={"q": npsf},
            concatenate=False,
            dtype=np.float64,
            name=f"klip-overlaps-{name}",
        )
    sci = da.blockwise(
        project_block,
        "cmyx",
        target,
        "myx",
        *basis.references,
        basis.means,
        "mp",
        basis.weights,
        "mwak",
        overlaps,
        "mq",
        basis.rows,
        None,
        cutoffs,
        None,
        *basis.reading,
        new_axes={"c": len(cutoffs)},
        concatenate=False,
        dtype=np.float32,
        name=f"klip-subtract-{name}",
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
    basis, which each cutoff projects on its first k images. A cutoff above the number of
    references is that number (``used_cutoffs``, logged): the ``kl`` coordinate says the
    cutoffs used.
    ``rows`` of frame per KLIP tile (the block plan's; default: ``chunking.tile_rows`` of
    8 MiB, the default of the setting coron_dask.chunks.klip-tile). ``on_disk``: psfalign's
    SCI as written to disk (``io.staging.write_blocks``), which the KLIP tasks then read a
    tile at a time: no worker holds a target's aligned references between tasks.
    """
    basis = kl_basis(science, psfalign, truncate, rows=rows, on_disk=on_disk)
    return subtract(science, basis)
