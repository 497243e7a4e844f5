"""Karhunen-Loève image projection (KLIP; Soummer, Pueyo & Larkin 2012) on flattened frames.

Same mathematics as jwst's ``klip``: references mean-subtracted per frame, eigenvectors of
their covariance (largest eigenvalue first) give unit-norm KL images, of which the first
``truncate`` are kept. The basis depends on the references only, so callers build it once
per set of references and project any number of science frames onto it.

References may come as several pieces along the reference axis (the blocks a dask array
holds them in) and in float32: they are widened to float64 a tile of pixels at a time,
so memory stays near that of the references themselves however many there are.
"""

from collections.abc import Sequence

import numpy as np

TILE = 8192  # pixels per tile of the float64 passes


def _pieces(refs: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    return [refs] if isinstance(refs, np.ndarray) else list(refs)


class KLBasis:
    """The KL basis of a set of references, with what KLIP's ERR needs of them."""

    def __init__(self, refs: np.ndarray | Sequence[np.ndarray], truncate: int) -> None:
        pieces = _pieces(refs)
        self.npix = pieces[0].shape[1]
        self.means = np.concatenate([p.mean(axis=1, dtype=np.float64) for p in pieces])
        gram = np.zeros((len(self.means), len(self.means)))
        for tile in self._tiles():
            centred = self._centred(pieces, tile)
            gram += centred @ centred.T
        eigval, eigvect = np.linalg.eigh(gram / (self.npix - 1))
        order = np.argsort(eigval)[::-1][:truncate]
        vectors = eigvect[:, order]
        self.images = np.empty((len(order), self.npix))
        for tile in self._tiles():
            self.images[:, tile] = vectors.T @ self._centred(pieces, tile)
        norms = np.linalg.norm(self.images, axis=1)
        self.images /= norms[:, None]
        # the references' coefficients on the basis, R·Zᵀ = (R·Rᵀ)·V / norms, from the Gram
        self.ref_coefficients = gram @ vectors / norms

    def _tiles(self) -> list[slice]:
        return [slice(a, min(a + TILE, self.npix)) for a in range(0, self.npix, TILE)]

    def _centred(self, pieces: list[np.ndarray], tile: slice) -> np.ndarray:
        block = np.concatenate([p[:, tile] for p in pieces]).astype(np.float64)
        block -= self.means[:, None]
        return block

    def error(self, refs: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Per-pixel standard deviation (npix,) of the references' own KLIP residuals (jwst's
        ERR); ``refs`` are the references the basis was built from."""
        pieces = _pieces(refs)
        out = np.empty(self.npix)
        for tile in self._tiles():
            residual = self._centred(pieces, tile) - self.ref_coefficients @ self.images[:, tile]
            out[tile] = residual.std(axis=0)
        return out


def kl_basis(refs: np.ndarray | Sequence[np.ndarray], truncate: int) -> np.ndarray:
    """Unit-norm KL images (K, npix) of reference frames ``refs`` (nrefs, npix), K ≤ truncate."""
    return KLBasis(refs, truncate).images


def klip_subtract(targets: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Science frames (m, npix) minus their mean and their projection on ``basis`` (K, npix)."""
    centred = np.asarray(targets, dtype=np.float64)
    centred = centred - centred.mean(axis=1, keepdims=True)
    return centred - (centred @ basis.T) @ basis


def klip_error(refs: np.ndarray | Sequence[np.ndarray], truncate: int) -> np.ndarray:
    """Per-pixel standard deviation (npix,) of the references' own KLIP residuals, as jwst's ERR."""
    return KLBasis(refs, truncate).error(refs)
