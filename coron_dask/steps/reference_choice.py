"""References chosen per science integration and zone (pyKLIP's ``PSFLibrary`` and
``maxnumbasis``): for each (integration, zone) the K eligible references most correlated
with the integration on the zone's pixels, from the zone's Gram matrix bordered by the
integration's overlaps (``steps.klip.KLBasis.gram``, (m, Z, p, p + 1)).

The correlation of integration t with reference r in zone z is Pearson's over the zone's
pixels, each frame minus its mean over the zone:

    corr = a_r / sqrt(G_rr · ‖t̄_z‖²),  a_r = G[t, z, r, p] (the overlap), G_rr the diagonal,

the numbers the Gram pass has already made (``‖t̄_z‖²`` is the integration's own, made from
the science frames, ``target_norms``). Eligible: a reference whose Gram diagonal is not 0
(a flagged fit is a row of zeros) and that the ``eligible`` mask (m, Z, p) allows (default:
all; ADI's movement, ``steps.references.eligible_references``, gives one). Ordered by
correlation, largest first (signed, as pyKLIP), ties by the lower index in psfalign's psf
axis; when no more than K are eligible, all of them are used (pyKLIP: only ``if
maxbasis_possible > maxnumbasis``).
"""

import logging

import dask.array as da
import numpy as np

from coron_dask.core.errors import CoronInputError
from coron_dask.io.products import Extension
from coron_dask.kernels.zones import Zones, zone_means

log = logging.getLogger(__name__)


def check_maxnumbasis(
    maxnumbasis: int | None, truncate: int | tuple[int, ...], npsf: int | None = None
) -> None:
    """Refuse a ``maxnumbasis`` that would keep fewer references than the largest KL cutoff
    asks modes of, that cutoff being at most the ``npsf`` references there are (pyKLIP
    keeps min(numbasis, K) modes silently: the KL-mode cube's planes above K repeat the
    K-th; here the run stops before anything is written)."""
    if maxnumbasis is None:
        return
    if maxnumbasis < 1:
        raise CoronInputError("maxnumbasis", f"must be at least 1, got {maxnumbasis}")
    largest = truncate if isinstance(truncate, int | np.integer) else max(truncate)
    largest = largest if npsf is None else min(largest, npsf)
    if maxnumbasis < largest:
        raise CoronInputError(
            "maxnumbasis",
            f"{maxnumbasis} references cannot give the {largest} KL modes truncate asks for: "
            f"give at least {largest}, or a smaller truncate",
        )


def target_norms_block(targets: np.ndarray, zones: Zones | None) -> np.ndarray:
    """‖t̄_z‖² (m, Z) of science frames (m, y, x): each frame in float64 minus its mean over
    the frame (Z = 1) or over each zone, summed in squares over the zone's pixels."""
    flat = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
    if zones is None:
        centred = flat - flat.mean(axis=1, keepdims=True)
        return np.einsum("ij,ij->i", centred, centred)[:, None]
    labels = zones.labels.ravel()
    inside = labels >= 0
    out = np.zeros((len(flat), zones.count))
    for i, means in enumerate(zone_means(targets, zones)):
        centred = flat[i, inside] - means[labels[inside]]
        np.add.at(out[i], labels[inside], centred * centred)
    return out


def target_norms(science: da.Array, zones: Zones | None) -> da.Array:
    """``target_norms_block`` of the science SCI (m, y, x), lazily, in its integration blocks."""
    count = 1 if zones is None else zones.count
    return da.map_blocks(
        target_norms_block,
        science.rechunk({1: -1, 2: -1}),
        zones,
        drop_axis=2,
        chunks=(science.chunks[0], (count,)),
        dtype=np.float64,
    )


def correlations_block(gram: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Correlations (m, Z, p) of each integration with each reference in each zone from the
    bordered Gram matrices (m, Z, p, p + 1) and the integrations' ‖t̄_z‖² (m, Z): NaN for a
    reference of zero norm (flagged) or a target of zero norm."""
    p = gram.shape[2]
    return correlations(np.diagonal(gram[..., :p], axis1=2, axis2=3), gram[..., p], norms)


def correlations(diagonal: np.ndarray, overlaps: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Correlations (m, Z, p) from the references' squared norms G_rr (m, Z, p), their
    overlaps with the integration (m, Z, p) and its ‖t̄_z‖² (m, Z); NaN where a norm is 0."""
    scale = np.sqrt(diagonal * norms[..., None])
    return np.divide(overlaps, scale, out=np.full(scale.shape, np.nan), where=scale > 0)


def ranked(
    corr: np.ndarray, eligible: np.ndarray | None, maxnumbasis: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``maxnumbasis`` eligible references of largest correlation ``corr`` (m, Z, p),
    most correlated first, ties to the lower index: indices (m, Z, K) into the psf axis
    (−1 where fewer than K are eligible) and their correlations (NaN there)."""
    usable = np.isfinite(corr) if eligible is None else np.isfinite(corr) & eligible
    kept = min(maxnumbasis, corr.shape[-1])
    order = np.argsort(np.where(usable, -corr, np.inf), axis=-1, kind="stable")[..., :kept]
    found = np.take_along_axis(usable, order, axis=-1)
    indices = np.where(found, order, -1)
    values = np.where(found, np.take_along_axis(corr, order, axis=-1), np.nan)
    return indices, values


def ranked_block(
    gram: np.ndarray, norms: np.ndarray, eligible: np.ndarray | None, maxnumbasis: int
) -> tuple[np.ndarray, np.ndarray]:
    """``ranked`` of the correlations of the bordered Gram matrices (``correlations_block``)."""
    return ranked(correlations_block(gram, norms), eligible, maxnumbasis)


def chosen_block(
    gram: np.ndarray, norms: np.ndarray, eligible: np.ndarray | None, maxnumbasis: int
) -> np.ndarray:
    """The choice (m, Z, p) bool of ``ranked_block``: KLIP's mask ``chosen``."""
    indices, _ = ranked_block(gram, norms, eligible, maxnumbasis)
    out = np.zeros(gram.shape[:3], dtype=bool)
    m, count, _ = np.nonzero(indices >= 0)
    out[m, count, indices[indices >= 0]] = True
    return out


def _blocks(gram: da.Array, norms: da.Array, eligible: da.Array | None) -> tuple:
    """The arrays of the choice in the integration blocks of ``gram``, whole on other axes."""
    chunks = gram.chunks[0]
    gram = gram.rechunk((chunks, -1, -1, -1))
    norms = norms.rechunk((chunks, -1))
    if eligible is not None:
        eligible = da.asarray(eligible).astype(bool).rechunk((chunks, -1, -1))
    return gram, norms, eligible


def choose_references(
    gram: da.Array, norms: da.Array, maxnumbasis: int, eligible: da.Array | None = None
) -> da.Array:
    """KLIP's ``chosen`` (m, Z, p) bool, lazily: for each (integration, zone) the
    ``maxnumbasis`` eligible references most correlated with the integration (see the
    module's docstring), from the bordered Gram matrices (m, Z, p, p + 1) and ‖t̄_z‖² (m, Z)."""
    gram, norms, eligible = _blocks(gram, norms, eligible)
    extra = (None, None) if eligible is None else (eligible, "mzp")
    return da.blockwise(
        chosen_block,
        "mzp",
        gram,
        "mzpb",
        norms,
        "mz",
        *extra,
        maxnumbasis,
        None,
        dtype=bool,
        concatenate=True,
    )


def chosen_references(
    gram: da.Array, norms: da.Array, maxnumbasis: int, eligible: da.Array | None = None
) -> tuple[da.Array, da.Array]:
    """What ``choose_references`` chose, for the product: indices (m, Z, K) int32 into the
    psf axis, most correlated first (−1: no more were eligible), and their correlations
    (m, Z, K) float64 (NaN there)."""
    gram, norms, eligible = _blocks(gram, norms, eligible)
    kept = min(maxnumbasis, gram.shape[2])
    extra = (None, None) if eligible is None else (eligible, "mzp")
    pairs = da.blockwise(
        lambda *args: np.stack(ranked_block(*args)),
        "wmzk",
        gram,
        "mzpb",
        norms,
        "mz",
        *extra,
        maxnumbasis,
        None,
        new_axes={"w": 2, "k": kept},
        dtype=np.float64,
        concatenate=True,
    )
    return pairs[0].astype(np.int32), pairs[1]


class Selection:
    """A per-integration choice of ``maxnumbasis`` references (``kl_basis``'s ``chosen``,
    called with the bordered Gram matrices), which keeps what it chose for the product."""

    def __init__(self, norms: da.Array, maxnumbasis: int, eligible: da.Array | None = None):
        self.norms, self.maxnumbasis, self.eligible = norms, maxnumbasis, eligible
        self.gram: da.Array | None = None

    def __call__(self, gram: da.Array) -> da.Array:
        self.gram = gram
        return choose_references(gram, self.norms, self.maxnumbasis, self.eligible)

    def chosen(self) -> tuple[da.Array, da.Array]:
        """Indices (m, Z, K) and correlations (m, Z, K) of the references chosen."""
        if self.gram is None:
            raise RuntimeError("no Gram matrices yet: the selection was not given to kl_basis")
        return chosen_references(self.gram, self.norms, self.maxnumbasis, self.eligible)


def chooses(maxnumbasis: int | None, npsf: int) -> bool:
    """Whether ``maxnumbasis`` chooses among ``npsf`` references (logged): not without one,
    nor with one not below ``npsf`` (KLIP then as without it, bit for bit)."""
    if maxnumbasis is None:
        return False
    if maxnumbasis >= npsf:
        log.info(
            "klip: maxnumbasis %d is not below the %d references: every reference used",
            maxnumbasis,
            npsf,
        )
        return False
    log.info(
        "klip: the %d of the %d references most correlated with each integration in each "
        "zone used (maxnumbasis)",
        maxnumbasis,
        npsf,
    )
    return True


def selection(
    science: da.Array, zones: Zones | None, maxnumbasis: int | None, npsf: int
) -> Selection | None:
    """The choice of ``maxnumbasis`` of the ``npsf`` references for each integration and
    zone of ``science`` (SCI, m, y, x) from the Gram matrices, or None when every
    reference is used (``chooses``)."""
    if not chooses(maxnumbasis, npsf):
        return None
    return Selection(target_norms(science, zones), maxnumbasis)


def chosen_extensions(indices: da.Array, correlations: da.Array) -> list[Extension]:
    """psfsub's record of the references chosen: REFS, their indices into psfalign's psf
    axis (integration, zone, rank; −1: no more were eligible), and REFCORR, their
    correlations with the integration on the zone's pixels, most correlated first."""
    dims = ("integration", "zone", "rank")
    said = {"BUNIT": "", "MAXNBAS": (indices.shape[-1], "references kept per zone, at most")}
    return [
        Extension("REFS", indices, {**said, "EXTDESC": "psfalign psf index, -1: none"}, dims),
        Extension("REFCORR", correlations, {"EXTDESC": "correlation with the integration"}, dims),
    ]
