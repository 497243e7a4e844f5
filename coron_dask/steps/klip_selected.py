"""KLIP's bases with references chosen first, for libraries of thousands of references.

``steps.klip.kl_basis`` with a choice makes every zone's full Gram matrix (8p² bytes a zone
and target, p² flops a pixel) and then chooses. Here the choice comes first, from what it
needs alone: one pass over the references (``klip-norms``) sums, per target and zone, each
reference's squared norm and its overlap with the target (2p numbers, 4p flops a pixel);
the K most correlated eligible references are chosen (``steps.reference_choice.ranked``:
pyKLIP's maxnumbasis); a second pass (``klip-gram``) sums the Gram matrices of those K only
(8K² bytes, K² flops a pixel); their KL weights are spread over the p references (0 for the
others). The overlaps of the first pass are the subtraction's, so the whole KLIP reads the
references three times (norms, Gram of the chosen, projection; and the ERR's for cutoffs
below K), as the full one does with ``kl_basis``. The tiles are those of ``kl_basis`` and
every sum over them is taken in order: the products do not depend on the blocks.
"""

from collections.abc import Sequence

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from coron_dask.io.products import OnDisk
from coron_dask.kernels.zones import Zones
from coron_dask.planning.block_plan import tile_rows
from coron_dask.steps.klip import KLBasis
from coron_dask.steps.klip_graph import block_arguments, kl_errors, per_target
from coron_dask.steps.klip_parameters import kl_cutoffs, used_cutoffs
from coron_dask.steps.reference_choice import correlations, ranked, target_norms
from coron_dask.steps.selection_blocks import (
    chosen_gram_block,
    chosen_mask_block,
    chosen_weights_block,
    norms_block,
)


def _ranked_block(sums: np.ndarray, norms: np.ndarray, eligible, maxnumbasis: int) -> np.ndarray:
    """Indices and correlations (2, m, Z, K) of the references chosen, from the norms
    pass's (m, Z, p, 2) and the targets' ‖t̄_z‖² (m, Z)."""
    corr = correlations(sums[..., 0], sums[..., 1], norms)
    return np.stack(ranked(corr, eligible, maxnumbasis))


def selected_basis(
    science: xr.Dataset,
    psfalign: xr.Dataset,
    truncate: int | Sequence[int],
    maxnumbasis: int,
    *,
    rows: int | None = None,
    on_disk: OnDisk | None = None,
    zones: Zones | None = None,
    eligible: da.Array | None = None,
) -> tuple[KLBasis, da.Array, da.Array]:
    """The KL bases of ``science`` (as ``kl_basis``) from the ``maxnumbasis`` eligible
    references most correlated with each integration in each zone, chosen before any Gram
    matrix is made; with the choice: indices (m, Z, K) into the psf axis, most correlated
    first (−1: no more eligible), and their correlations (m, Z, K)."""
    target = science["sci"].data
    aligned = psfalign["sci"].data
    npsf = psfalign.sizes["psf"]
    cutoffs = kl_cutoffs(used_cutoffs(truncate, npsf))
    rows = rows or tile_rows(npsf, (target.shape[1], target.shape[2]), 2**23)
    shared = aligned.ndim == 3
    bases = aligned[None] if shared else aligned.rechunk({0: target.chunks[0]})
    m, chunks = target.shape[0], target.chunks[0]
    references, means, reading = block_arguments(bases, on_disk, "mr", zones)
    if shared:  # every target sees the one set of references
        means = per_target(means, m, chunks)
        if on_disk is None:
            references = (per_target(bases, m, chunks), "mpyx")
        else:
            references = (da.arange(m, chunks=chunks), "m")
            reading = (*reading[:3], "nrs")
    count = 1 if zones is None else zones.count
    npix = target.shape[1] * target.shape[2] if zones is None else zones.pixels
    name = tokenize(bases, cutoffs, rows, on_disk, target, zones, maxnumbasis, eligible)
    sums = da.blockwise(
        norms_block,
        "mzaw",
        *references,
        means,
        "mpz",
        target,
        "myx",
        rows,
        None,
        zones,
        None,
        *reading,
        new_axes={"a": npsf, "w": 2},
        concatenate=False,
        dtype=np.float64,
        name=f"klip-norms-{name}",
    )
    kept = min(maxnumbasis, npsf)
    norms = target_norms(target, zones)
    extra = (None, None) if eligible is None else (da.asarray(eligible).astype(bool), "mzp")
    choice = da.blockwise(
        _ranked_block,
        "vmzk",
        sums,
        "mzpw",
        norms,
        "mz",
        *extra,
        maxnumbasis,
        None,
        new_axes={"v": 2, "k": kept},
        concatenate=True,
        dtype=np.float64,
        name=f"klip-choice-{name}",
    )
    indices, correlations_ = choice[0].astype(np.int64), choice[1]
    ascending = indices.map_blocks(_ascending, dtype=np.int64)  # the Gram's order: psf's
    gram = da.blockwise(
        chosen_gram_block,
        "mzab",
        *references,
        means,
        "mpz",
        ascending,
        "mzk",
        rows,
        None,
        zones,
        None,
        *reading,
        new_axes={"a": kept, "b": kept},
        concatenate=False,
        dtype=np.float64,
        name=f"klip-gram-{name}",
    )
    weights = da.blockwise(
        chosen_weights_block,
        "mzwpk",
        gram,
        "mzab",
        ascending,
        "mzc",
        npsf,
        None,
        npix,
        None,
        cutoffs[-1],
        None,
        new_axes={"w": 2, "p": npsf, "k": min(cutoffs[-1], npsf)},
        concatenate=True,
        dtype=np.float64,
        name=f"klip-weights-{name}",
    )
    chosen = ascending.map_blocks(
        chosen_mask_block, npsf, chunks=(chunks, (count,), (npsf,)), dtype=bool
    )
    err = kl_errors(
        references,
        means,
        reading,
        weights,
        rows,
        cutoffs,
        zones,
        chosen,
        (m, npsf, *target.shape[1:]),
        chunks,
    ).transpose(1, 0, 2, 3)
    cube = not isinstance(truncate, int | np.integer)
    basis = KLBasis(
        references,
        reading,
        means,
        weights,
        rows,
        err.astype(np.float32),
        cutoffs,
        cube,
        target,
        sums[..., 1],
        gram,
        zones,
        chosen,
    )
    return basis, indices.astype(np.int32), correlations_


def _ascending(indices: np.ndarray) -> np.ndarray:
    """Each (target, zone)'s chosen indices in the psf axis's order, −1s last."""
    none = np.iinfo(np.int64).max
    keyed = np.where(indices < 0, none, indices)
    keyed.sort(axis=-1)
    return np.where(keyed == none, -1, keyed)
