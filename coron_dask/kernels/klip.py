"""Karhunen-Loève image projection (KLIP; Soummer, Pueyo & Larkin 2012) on flattened frames.

Same mathematics as jwst's ``klip``: references mean-subtracted per frame, eigenvectors of
their covariance (largest eigenvalue first) give unit-norm KL images, of which the first
``truncate`` are kept. The basis is a function of the references only, so callers build it
once per set of references and project any number of science frames onto it.
"""

import numpy as np


def kl_basis(refs: np.ndarray, truncate: int) -> np.ndarray:
    """Unit-norm KL images (K, npix) of reference frames ``refs`` (nrefs, npix), K ≤ truncate."""
    refs = np.asarray(refs, dtype=np.float64)
    centred = refs - refs.mean(axis=1, keepdims=True)
    covariance = centred @ centred.T / (refs.shape[1] - 1)
    eigval, eigvect = np.linalg.eigh(covariance)
    order = np.argsort(eigval)[::-1][:truncate]
    basis = eigvect[:, order].T @ centred
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    return basis


def klip_subtract(targets: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Science frames (m, npix) minus their mean and their projection on ``basis`` (K, npix)."""
    centred = np.asarray(targets, dtype=np.float64)
    centred = centred - centred.mean(axis=1, keepdims=True)
    return centred - (centred @ basis.T) @ basis


def klip_error(refs: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Per-pixel standard deviation (npix,) of the references' own KLIP residuals, as jwst's ERR."""
    return klip_subtract(refs, basis).std(axis=0)
