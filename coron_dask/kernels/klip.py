"""Karhunen-Loève image projection (KLIP; Soummer, Pueyo & Larkin 2012) on flattened frames.

Same mathematics as jwst's ``klip``: references mean-subtracted per frame, eigenvectors of
their covariance (largest eigenvalue first) give unit-norm KL images, of which the first
``truncate`` are kept. The basis depends on the references only, so callers build it once
per set of references and project any number of science frames onto it.

The work is split into passes over tiles of pixels, so that no step needs every pixel of
every reference at once (dask runs each pass as tasks over the tiles):

1. ``frame_means``: the spatial mean of each reference;
2. ``gram``: the Gram matrix of the mean-subtracted references on one tile of pixels;
   summed over the tiles it is the (nrefs × nrefs) covariance up to npix − 1;
3. ``kl_weights``: from the summed Gram matrix, the weights W (nrefs × K) that make the KL
   images out of the references, Z = Wᵀ·(R − μ), and the references' own coefficients on
   them, C = G·W, which KLIP's ERR needs;
4. ``kl_images`` and ``residual_stds``: per tile, the KL images and, from them, the ERR;
5. ``klip_subtract``: science frames minus their projection on the KL images.

The pipeline's tasks never make the KL images Z = Wᵀ·(R − μ) but where the ERR needs
them: a target t's coefficients on them are Wᵀ·a with a = (R − μ)·t (summed over tiles,
like the Gram matrix), and its projection on the first k of them is
(W_k·c_k)ᵀ·(R − μ), tile by tile (``reference_mixes``): 4·p flops a pixel per target
instead of 2·K·p per pixel for the images on top.
"""

from collections.abc import Iterator

import numpy as np

#: Pixels per tile when ``KLBasis`` runs the passes on arrays in memory.
TILE = 8192


def frame_means(refs: np.ndarray) -> np.ndarray:
    """Spatial mean (float64) of each frame of ``refs`` (..., npix) or (..., ny, nx)."""
    axes = (-1,) if refs.ndim < 3 else (-2, -1)
    return refs.mean(axis=axes, dtype=np.float64)


def _centred(tile: np.ndarray, means: np.ndarray) -> np.ndarray:
    centred = tile.astype(np.float64)
    centred -= means[:, None]
    return centred


def gram(tile: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Gram matrix (nrefs, nrefs) of the references on a tile of pixels (nrefs, npix_tile),
    each minus its mean over the whole frame (``means``)."""
    centred = _centred(tile, means)
    return centred @ centred.T


def kl_weights(
    gram_matrix: np.ndarray, npix: int, truncate: int, used: np.ndarray | None = None
) -> np.ndarray:
    """W and C (2, nrefs, K) of the KL basis from the references' Gram matrix over all
    ``npix`` pixels: the KL images are Wᵀ·(R − μ) (unit norm), C = G·W the references'
    coefficients on them. K = min(truncate, nrefs); modes of zero norm get zero weight.

    References not ``used`` (nrefs,) bool (default: all; a reference choice) and those of
    zero norm (rows of zeros: flagged, or constant frames) are left out: the basis is that
    of the others, their weights 0 (an eigenvector of the zero block, normalised, would be
    a unit image made of rounding errors)."""
    norm = np.diag(gram_matrix) > 0
    used = norm if used is None else norm & used
    if not used.all():
        count = min(truncate, len(gram_matrix))
        out = np.zeros((2, len(gram_matrix), count))
        if used.any():
            kept = kl_weights(gram_matrix[np.ix_(used, used)], npix, truncate)
            out[:, used, : kept.shape[-1]] = kept
        return out
    eigval, eigvect = np.linalg.eigh(gram_matrix / (npix - 1))
    order = np.argsort(eigval)[::-1][:truncate]
    vectors = eigvect[:, order]
    # ‖vᵀ(R − μ)‖² = vᵀ·G·v: the norm of each KL image without forming it
    norms = np.sqrt(np.maximum(np.einsum("pk,pq,qk->k", vectors, gram_matrix, vectors), 0.0))
    weights = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    return np.stack([weights, gram_matrix @ weights])


def kl_images(tile: np.ndarray, means: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The KL images (K, npix_tile) on a tile of references (nrefs, npix_tile)."""
    return weights[0].T @ _centred(tile, means)


#: Pixels of a tile whose projection on the KL basis is subtracted at once: bounds the
#: ERR's temporary to nrefs × PROJECTION_COLUMNS.
PROJECTION_COLUMNS = 1024


def residual_stds(
    centred: np.ndarray,
    images: np.ndarray,
    coefficients: np.ndarray,
    cutoffs: tuple[int, ...],
    used: np.ndarray | None = None,
) -> np.ndarray:
    """KLIP's ERR (len(cutoffs), npix_tile) on a tile of references already centred and in
    float64, from their KL images on the tile (K, npix_tile) and their ``coefficients`` on
    them (C, nrefs × K): per pixel, the standard deviation over the references of their own
    residuals after projection on the first k KL images (jwst's ERR), for each k of
    ``cutoffs`` (ascending, each at most K); each cutoff's projection takes away the modes
    the previous one left. The tile is overwritten.

    A cutoff that keeps every reference's mode (k ≥ nrefs) has ERR 0: the references lie
    in the span of their KL images (the modes of zero norm hold none of them), so their
    residuals are 0 but for rounding, which is what jwst's ERR is then made of. ``used``
    (nrefs,) bool: the references the deviation is taken over (default: all); the others
    were left out of the basis (``kl_weights``)."""
    out = np.zeros((len(cutoffs), centred.shape[1]))
    if used is not None and not used.any():  # no reference left: no deviation
        return out + np.nan
    projected = [k for k in cutoffs if k < len(centred)]
    for start in range(0, centred.shape[1], PROJECTION_COLUMNS):
        columns = slice(start, start + PROJECTION_COLUMNS)
        part, done = centred[:, columns], 0
        for c, k in enumerate(projected):
            part -= coefficients[:, done:k] @ images[done:k, columns]
            out[c, columns] = (part if used is None else part[used]).std(axis=0)
            done = k
    return out


def klip_subtract(
    targets: np.ndarray, basis: np.ndarray, cutoffs: tuple[int, ...] | None = None
) -> np.ndarray:
    """Science frames (m, npix) minus their mean and their projection on ``basis`` (K, npix):
    (m, npix), or with ``cutoffs`` (ascending, each at most K) one such subtraction per
    cutoff k on the first k KL images, (len(cutoffs), m, npix), from one projection."""
    centred = np.asarray(targets, dtype=np.float64)
    centred = centred - centred.mean(axis=1, keepdims=True)
    coefficients = centred @ basis.T
    if cutoffs is None:
        return centred - coefficients @ basis
    out = np.empty((len(cutoffs), *centred.shape))
    done = 0
    for c, k in enumerate(cutoffs):
        centred -= coefficients[:, done:k] @ basis[done:k]
        out[c] = centred
        done = k
    return out


def reference_mixes(weights: np.ndarray, overlaps: np.ndarray, cutoffs: tuple[int, ...]):
    """(len(cutoffs), p): the mix of the centred references that is a target's projection
    on its first k KL images, for each cutoff k, from the KL weights W (p, K) and the
    target's ``overlaps`` a = (R − μ)·t (p,): W_k·(W_kᵀ·a)."""
    coefficients = weights.T @ overlaps
    return np.stack([weights[:, :k] @ coefficients[:k] for k in cutoffs])


class KLBasis:
    """The passes above run on references (nrefs, npix) held in memory, tile by tile."""

    def __init__(self, refs: np.ndarray, truncate: int) -> None:
        self.refs = refs
        self.npix = refs.shape[1]
        self.means = frame_means(refs)
        total = sum(gram(refs[:, tile], self.means) for tile in self.tiles())
        self.weights = kl_weights(total, self.npix, truncate)
        self.images = np.concatenate(
            [kl_images(refs[:, tile], self.means, self.weights) for tile in self.tiles()], axis=1
        )

    def tiles(self) -> Iterator[slice]:
        return (slice(a, min(a + TILE, self.npix)) for a in range(0, self.npix, TILE))

    def error(self) -> np.ndarray:
        """KLIP's ERR (npix,) of the references the basis was built from."""
        count = (self.weights.shape[-1],)
        return np.concatenate(
            [
                residual_stds(
                    _centred(self.refs[:, tile], self.means),
                    self.images[:, tile],
                    self.weights[1],
                    count,
                )[0]
                for tile in self.tiles()
            ]
        )


def kl_basis(refs: np.ndarray, truncate: int) -> np.ndarray:
    """Unit-norm KL images (K, npix) of reference frames ``refs`` (nrefs, npix), K ≤ truncate."""
    return KLBasis(refs, truncate).images


def klip_error(refs: np.ndarray, truncate: int) -> np.ndarray:
    """Per-pixel standard deviation (npix,) of the references' own KLIP residuals, as jwst's ERR."""
    return KLBasis(refs, truncate).error()
