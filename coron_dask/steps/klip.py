"""klip: PSF subtraction by Karhunen-Loève projection on the aligned references (``_psfsub``).

Each science integration minus its mean and its projection on the first ``truncate`` KL
images of the references aligned to it; ERR jwst's (the references' own residuals'
deviation), DQ the science's. A 3-D psfalign (``align_to="first"``): one basis per
exposure. Several cutoffs (a KL-mode cube) come from one basis.

In zones (``klip_parameters.klip_zones``: pyKLIP's ``annuli`` × ``subsections`` about the
star, within an inner and outer working angle) each (integration, zone) has a KL basis of
its own from the zone's pixels minus each frame's mean over the zone (pyKLIP's
``klip_math``); pixels in no zone are NaN. One zone over the frame (default): jwst's KLIP.

No task needs every pixel of every reference at once: one task per target block sums the
Gram matrices (every zone's) over tiles of frame rows holding all references
(``tile_rows``); the KL weights follow. The subtraction takes two more passes over the
tiles: the targets' overlaps (with a basis per integration, the Gram pass makes them), then
their projections, mixes of the references (KL images only where the ERR needs them). The
tiles follow from the frame and the number of references alone and every sum over them is
taken in order, target by target: the products do not depend on the blocks.

The interface that subtraction strategies and reference choices build on:

- ``kl_basis(..., zones=, chosen=)``: ``chosen`` (m, Z, p) bool chunked as the targets (or
  a function of the bordered Gram matrices giving one): the references each (integration,
  zone) may use; one not chosen gets zero KL weight there and is left out of that zone's
  ERR, as a flagged reference is; a zone with none chosen is NaN. Default: all. Given
  (1, Z, p), one choice for every integration (ADI's movement: it depends on the zone
  alone), a 3-D psfalign keeps one basis per zone for the exposure.
- ``KLBasis.gram``: each zone's Gram matrix of the mean-subtracted references bordered by
  the integration's overlaps (m, Z, p, p + 1); with a 3-D psfalign (1, Z, p, p), and a
  function ``chosen`` is given it broadcast, bordered by the overlaps of a pass of their
  own. The correlations follow from it (``steps.reference_choice``).
- ``KLBasis.overlaps`` (m, Z, p), ``weights`` (m, Z, 2, p, K), ``means`` (m, p, Z).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from coron_dask.io.products import OnDisk
from coron_dask.kernels.zones import Zones
from coron_dask.planning.block_plan import tile_rows
from coron_dask.steps.klip_blocks import (
    gram_block,
    overlaps_block,
    project_block,
    weights_block,
)
from coron_dask.steps.klip_graph import block_arguments, kl_errors, per_target
from coron_dask.steps.klip_parameters import kl_cutoffs, used_cutoffs
from coron_dask.steps.references import unreferenced


@dataclass(frozen=True)
class KLBasis:
    """The KL bases of one science exposure (lazy), per target block of integrations: the
    references aligned to each target (``references``: blockwise arguments, the blocks
    themselves or the targets' indices into psfalign on disk, which ``reading`` names), their
    means (m, p, Z: over each zone, or the frame, Z = 1), the Gram matrices of each zone
    ``gram`` (m, Z, p, p + 1: bordered by the target's overlaps with a basis per integration;
    (1, Z, p, p) for a 3-D psfalign), the KL weights W and C (m, Z, 2, p, K), the same for
    every target with a 3-D psfalign (``align_to="first"``) unless references are
    ``chosen`` per target, and KLIP's ERR (kl, integration, y, x) for each cutoff.
    The KL images themselves are never made: a target's projection on them is (W·c)ᵀ·(R − μ)
    with c = Wᵀ·(R − μ)·t, two passes over the references (``subtract``). With a basis per
    integration the pass that sums its Gram matrix also sums the overlaps (R − μ)·t of the
    ``science`` it was made for (``overlaps``, m, Z, p), and subtracting that science takes
    one pass.
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
    gram: da.Array
    zones: Zones | None = None
    chosen: da.Array | None = None


def kl_basis(
    science: xr.Dataset,
    psfalign: xr.Dataset,
    truncate: int | Sequence[int] = 50,
    *,
    rows: int | None = None,
    on_disk: OnDisk | None = None,
    zones: Zones | None = None,
    chosen: da.Array | Callable[[da.Array], da.Array] | None = None,
) -> KLBasis:
    """The KL bases of the references ``psfalign`` aligned to ``science`` (the filled cube
    from align_refs), in the science exposure's blocks of integrations (see ``klip``): one
    per (integration, zone) with a 4-D psfalign, one per zone for the exposure with a 3-D
    one (one per integration and zone there too when references are ``chosen``)."""
    target = science["sci"].data
    aligned = psfalign["sci"].data
    npsf = psfalign.sizes["psf"]
    cutoffs = kl_cutoffs(used_cutoffs(truncate, npsf))
    rows = rows or tile_rows(npsf, (target.shape[1], target.shape[2]), 2**23)
    if zones is not None and zones.labels.shape != target.shape[1:]:
        raise ValueError(f"zones of {zones.labels.shape} for frames of {target.shape[1:]}")
    shared = aligned.ndim == 3  # one basis for the whole exposure
    bases = aligned[None] if shared else aligned.rechunk({0: target.chunks[0]})
    # a basis per integration: its Gram pass makes the integration's overlaps too
    own = (None, None) if shared else (target, "myx")
    name = tokenize(bases, cutoffs, rows, on_disk, own[0], zones)
    npix = target.shape[1] * target.shape[2] if zones is None else zones.pixels
    count, m, chunks = cutoffs[-1], target.shape[0], target.chunks[0]
    references, means, reading = block_arguments(bases, on_disk, "mr", zones)
    gram = da.blockwise(
        gram_block,
        "mzab",
        *references,
        means,
        "mpz",
        *own,
        rows,
        None,
        zones,
        None,
        *reading,
        new_axes={"a": npsf, "b": npsf + (not shared)},
        concatenate=False,
        dtype=np.float64,
        name=f"klip-gram-{name}",
    )
    overlaps = None if shared else gram[:, :, :, npsf]
    basis = references, means, reading  # of the one basis, with a 3-D psfalign
    if shared:  # every target block sees the one basis (broadcast: no copies)
        means = per_target(means, m, chunks)
        if on_disk is None:
            references = (per_target(bases, m, chunks), "mpyx")
        else:  # the 3-D psfalign is read whatever the targets; every write is waited for
            references = (da.arange(m, chunks=chunks), "m")
            reading = (*reading[:3], "nrs")
    if callable(chosen) and shared:  # bordered by the overlaps of a pass (subtract's, then)
        overlaps = _overlaps(target, references, means, rows, zones, reading, npsf)
        chosen = chosen(da.concatenate([per_target(gram, m, chunks), overlaps[..., None]], 3))
    elif callable(chosen):  # the Gram matrices bordered by the overlaps
        chosen = chosen(gram)
    # one choice for every target (1, Z, p): with a 3-D psfalign still one basis
    alike = chosen is not None and not callable(chosen) and da.asarray(chosen).shape[0] == 1
    if chosen is not None:
        chosen = da.asarray(chosen).astype(bool)
        if chosen.shape[0] == 1:
            chosen = da.broadcast_to(chosen, (m, *chosen.shape[1:]))
        chosen = chosen.rechunk((chunks, -1, -1))
        if chosen.shape != (m, gram.shape[1], npsf):
            raise ValueError(f"chosen is {chosen.shape}, not (m, Z, p) = {(m, *gram.shape[1:3])}")
    # with a 3-D psfalign, one set of weights and ERR for all, unless chosen per target
    each = not shared or (chosen is not None and not alike)
    one = None if chosen is None else (chosen if each else chosen[:1].rechunk((1, -1, -1)))
    weights = da.blockwise(
        weights_block,
        "mzwak",
        per_target(gram, m, chunks) if shared and each else gram,
        "mzab",
        npix,
        None,
        count,
        None,
        *((None, None) if one is None else (one, "mza")),
        new_axes={"w": 2, "k": count},
        concatenate=True,
        dtype=np.float64,
        name=f"klip-weights-{name}-{tokenize(chosen)}",
    )
    err = kl_errors(
        *((references, means, reading) if each else basis),
        weights,
        rows,
        cutoffs,
        zones,
        one,
        (target.shape[0] if each else 1, npsf, *target.shape[1:]),
        chunks if each else (1,),
    )
    if each:
        err = err.transpose(1, 0, 2, 3)
    else:
        weights = per_target(weights, m, chunks)
        err = da.broadcast_to(
            err[0][:, None], (len(cutoffs), *target.shape), chunks=(-1, *target.chunks)
        )
    cube = not isinstance(truncate, int | np.integer)
    err = err.astype(np.float32)
    return KLBasis(
        references,
        reading,
        means,
        weights,
        rows,
        err,
        cutoffs,
        cube,
        target,
        overlaps,
        gram,
        zones,
        chosen,
    )


def _overlaps(
    target: da.Array,
    references: tuple,
    means: da.Array,
    rows: int,
    zones: Zones | None,
    reading: tuple,
    npsf: int,
) -> da.Array:
    """The targets' overlaps (m, Z, p) with their references: a pass (``overlaps_block``)."""
    return da.blockwise(
        overlaps_block,
        "mzq",
        target,
        "myx",
        *references,
        means,
        "mpz",
        rows,
        None,
        zones,
        None,
        *reading,
        new_axes={"q": npsf},
        concatenate=False,
        dtype=np.float64,
        name=f"klip-overlaps-{tokenize(target, means, rows, zones, reading)}",
    )


def target_overlaps(basis: KLBasis) -> da.Array:
    """The overlaps (m, Z, p) of ``basis``'s science with its references, (R − μ)·(t − t̄)
    per zone: those its Gram pass made (a basis per integration), or a pass of their own."""
    if basis.overlaps is not None:
        return basis.overlaps
    npsf = basis.weights.shape[3]
    return _overlaps(
        basis.science, basis.references, basis.means, basis.rows, basis.zones, basis.reading, npsf
    )


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
    npsf = basis.weights.shape[3]
    name = tokenize(target, basis.weights, cutoffs, basis.zones)
    overlaps = basis.overlaps
    if overlaps is None or target.name != basis.science.name:  # a pass of their own
        overlaps = _overlaps(
            target, basis.references, basis.means, basis.rows, basis.zones, basis.reading, npsf
        )
    sci = da.blockwise(
        project_block,
        "cmyx",
        target,
        "myx",
        *basis.references,
        basis.means,
        "mpz",
        basis.weights,
        "mzwak",
        overlaps,
        "mzq",
        basis.rows,
        None,
        cutoffs,
        None,
        basis.zones,
        None,
        *basis.reading,
        new_axes={"c": len(cutoffs)},
        concatenate=False,
        dtype=np.float32,
        name=f"klip-subtract-{name}",
    )
    err = basis.err
    if basis.chosen is not None:  # a zone left with no reference: NaN, as pyKLIP leaves it
        empty = unreferenced(basis.chosen, basis.zones, target.shape[1:])[None]
        sci, err = (da.where(empty, np.float32(np.nan), image) for image in (sci, err))
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
    zones: Zones | None = None,
    chosen: da.Array | Callable[[da.Array], da.Array] | None = None,
) -> xr.Dataset:
    """psfsub of ``science`` (the filled cube from align_refs): ``sci``, ``err``, ``dq``.

    ``truncate``: the KL modes kept, or several cutoffs (a KL-mode cube): then ``sci`` and
    ``err`` have a leading ``kl`` dimension, one image per cutoff (ascending) from one
    basis, which each cutoff projects on its first k images. A cutoff above the number of
    references is that number (``klip_parameters.used_cutoffs``, logged): the ``kl``
    coordinate says the cutoffs used.
    ``rows`` of frame per KLIP tile (the block plan's; default: ``chunking.tile_rows`` of
    8 MiB, the default of the setting coron_dask.chunks.klip-tile). ``on_disk``: psfalign's
    SCI as written to disk (``io.staging.write_blocks``), which the KLIP tasks then read a
    tile at a time: no worker holds a target's aligned references between tasks.
    ``zones``: KLIP in zones (``klip_parameters.klip_zones``; None: the whole frame);
    ``chosen``: the references each (integration, zone) may use (see the module's
    docstring).
    """
    basis = kl_basis(
        science, psfalign, truncate, rows=rows, on_disk=on_disk, zones=zones, chosen=chosen
    )
    return subtract(science, basis)
