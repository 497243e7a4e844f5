"""The functions dask runs on each block of a KLIP with references chosen first
(``steps.klip_selected``): a cheap pass over the references for what the choice needs (each
reference's norm and overlap with the target, per zone: 2p numbers a target), then the
Gram matrices of the K chosen only (K² a zone, not p²), and their KL weights spread back
over the p references (0 for those not chosen), so that the ERR and the subtraction are
those of ``steps.klip_blocks``. The tiles are read as ``klip_blocks`` reads them.
"""

import numpy as np

from coron_dask.kernels import klip
from coron_dask.kernels.zones import Zones
from coron_dask.steps.klip_blocks import centre_targets, centred_tiles, joined


def norms_block(
    aligned: list | np.ndarray,
    means: list,
    targets: list | np.ndarray,
    rows: int,
    zones: Zones | None = None,
    source: object | None = None,
    after: object = None,
) -> np.ndarray:
    """(m, Z, p, 2): for each of m targets, zone and reference, the reference's squared
    norm (minus its zone mean: the Gram matrix's diagonal) and its overlap with the target
    (minus its own), summed over tiles of ``rows`` rows in order."""
    centred_targets = centre_targets(joined(targets), zones)
    count = 1 if zones is None else zones.count
    out = None
    for tile in centred_tiles(aligned, means, rows, source, zones):
        if out is None:
            out = np.zeros((len(centred_targets), count, tile.npsf, 2))
        for i, target in enumerate(centred_targets):
            centred, values = tile(i), tile.target(target)
            for z, run in tile.runs:
                part = centred[:, run]
                out[i, z, :, 0] += np.einsum("ij,ij->i", part, part)
                out[i, z, :, 1] += part @ values[run]
            centred = part = None  # let go of before the next target's is made
    return out


def chosen_gram_block(
    aligned: list | np.ndarray,
    means: list,
    indices: list | np.ndarray,
    rows: int,
    zones: Zones | None = None,
    source: object | None = None,
    after: object = None,
) -> np.ndarray:
    """Gram matrices (m, Z, K, K) of the references chosen for each target and zone
    (``indices`` (m, Z, K) ascending, −1 for none: a row of zeros, which ``kl_weights``
    leaves out), summed over tiles in order: the tile is read whole, only the chosen rows
    multiplied."""
    indices = joined(indices)
    m, count, kept = indices.shape
    out = np.zeros((m, count, kept, kept))
    for tile in centred_tiles(aligned, means, rows, source, zones):
        for i in range(m):
            centred = tile(i)
            for z, run in tile.runs:
                taken = np.maximum(indices[i, z], 0)
                part = centred[taken][:, run]
                part[indices[i, z] < 0] = 0.0
                out[i, z] += part @ part.T
                del part
            centred = None
    return out


def chosen_weights_block(
    grams: np.ndarray, indices: np.ndarray, npsf: int, npix: int | np.ndarray, truncate: int
) -> np.ndarray:
    """KL weights W and C (m, Z, 2, p, count) of the chosen references' Gram matrices
    (m, Z, K, K), spread over the ``npsf`` references by ``indices`` (m, Z, K): 0 for
    those not chosen, as ``kl_weights`` gives a reference left out."""
    m, count, _ = indices.shape
    pixels = np.broadcast_to(npix, (count,))
    modes = min(truncate, npsf)
    out = np.zeros((m, count, 2, npsf, modes))
    for i in range(m):
        for z in range(count):
            used = indices[i, z] >= 0
            weights = klip.kl_weights(np.ascontiguousarray(grams[i, z]), int(pixels[z]), modes)
            out[i, z][:, indices[i, z][used], : weights.shape[-1]] = weights[:, used]
    return out


def chosen_mask_block(indices: np.ndarray, npsf: int) -> np.ndarray:
    """The choice (m, Z, p) bool of ``indices`` (m, Z, K; −1: none)."""
    out = np.zeros((*indices.shape[:2], npsf), dtype=bool)
    m, z, k = np.nonzero(indices >= 0)
    out[m, z, indices[m, z, k]] = True
    return out
