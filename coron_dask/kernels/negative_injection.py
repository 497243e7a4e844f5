"""Negative injection through ADI KLIP, exactly, on the few pixels a companion touches.

With ADI the references of a science exposure include the other rolls' integrations, which
hold the companion too (at another place), so the KL basis depends on the companion and
KLIP is no longer linear in it. A companion is measured by taking it out of every frame
that enters the reduction (the science, and the ADI references as they were aligned) and
reducing again, the bases rebuilt (VIP's NEGFC does the same with its PCA); the residual
at the companion's place should then be noise.

Rebuilding a basis does not need the frames again. In one zone of n_z pixels, with R the
references minus their zone means (p, pixels) and t the target minus its own, taking a
companion Q (p, pixels: zero but for the ADI rows, on a few pixels U) out of the
references and P out of the target changes

    G' = G − R·Qᵀ − Q·Rᵀ + Q·Qᵀ − n_z q̄ q̄ᵀ        (q̄ = each row's sum / n_z)
    a' = a − R·P − Q·t + Q·P − n_z q̄ p̄

(every product over U: the centred rows sum to 0 over the zone). G the references' Gram
matrix and a = R·t their overlaps with the target come from the reduction; the new
basis is G''s eigenvectors (``kernels.klip.kl_weights``'s, unit KL images vᵀR'/√λ), and
the residual on a pixel s is t'_s − Σ_k (v_kᵀ a')(v_kᵀ R'_s)/λ_k. Exact, and a few
(p × p) eigendecompositions per step of a sampler, whatever the frame's size.
"""

import numpy as np
from scipy.linalg import eigh


def adi_residuals(
    centred: np.ndarray,
    target: np.ndarray,
    gram: np.ndarray,
    overlaps: np.ndarray,
    used: np.ndarray,
    sizes: np.ndarray,
    labels: np.ndarray,
    adi: np.ndarray,
    science: np.ndarray,
    references: np.ndarray,
    stamp: np.ndarray,
    cutoff: int,
) -> np.ndarray:
    """The psfsub (n, b, s) on the ``stamp`` pixels of b targets once n companions are
    taken out of them and of their ADI references, the bases rebuilt (see the module's
    docstring).

    On a set of pixels U (u of them): ``centred`` the references aligned to each target
    minus their zone means (b, p, u), 0 for a flagged reference; ``target`` each target
    minus its zone means (b, u); ``labels`` (u,) each pixel's zone, an index into the
    zone axes below (−1: none). Per target and zone: ``gram`` (b, Z, p, p) over the zone's
    pixels, ``overlaps`` (b, Z, p) with the target, ``used`` (b, Z, p) the references the
    zone may use; ``sizes`` (Z,) the zones' pixel counts. ``adi`` (A,) the rows of the
    references that hold the companion; ``science`` (n, u) the companion in the target
    frame, ``references`` (n, b, A, u) in each ADI reference as aligned to each target;
    ``stamp`` (s,) indices into U, each in a zone; ``cutoff`` the KL images kept."""
    n, b, s = len(science), len(target), len(stamp)
    out = np.full((n, b, s), np.nan)
    stamp_zone = labels[stamp]
    for zone in np.unique(stamp_zone):
        inside = np.flatnonzero(labels == zone)
        rows = np.flatnonzero(stamp_zone == zone)
        at = np.searchsorted(inside, stamp[rows])  # the stamp's pixels among the zone's
        for i in range(b):
            keep = np.flatnonzero(used[i, zone] & (np.diag(gram[i, zone]) > 0))
            if not len(keep):
                continue  # no reference: KLIP leaves the zone NaN
            out[:, i, rows] = _zone_residuals(
                centred[i][np.ix_(keep, inside)],
                target[i, inside],
                gram[i, zone][np.ix_(keep, keep)],
                overlaps[i, zone, keep],
                float(sizes[zone]),
                *_adi_rows(keep, adi),
                science[:, inside],
                references[:, i][..., inside],
                at,
                cutoff,
            )
    return out


#: Below this fraction of the references kept, only the largest eigenpairs are computed
#: (LAPACK's evr, a matrix at a time): about half the time of all of them, batched, for
#: 10 of 270.
SUBSET_BELOW = 0.25


def largest_eigenpairs(matrices: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` largest eigenvalues (n, count), descending, and their eigenvectors
    (n, p, count) of symmetric ``matrices`` (n, p, p)."""
    p = matrices.shape[-1]
    if count < SUBSET_BELOW * p:
        pairs = [
            eigh(m, subset_by_index=[p - count, p - 1], driver="evr", check_finite=False)
            for m in matrices
        ]
        values = np.stack([v for v, _ in pairs])
        vectors = np.stack([w for _, w in pairs])
    else:
        values, vectors = np.linalg.eigh(matrices)  # ascending: the largest last
        values, vectors = values[:, -count:], vectors[:, :, -count:]
    return values[:, ::-1], vectors[:, :, ::-1]


def _adi_rows(keep: np.ndarray, adi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the ADI references are among the ``keep`` rows, and which of ``adi`` each is."""
    where = np.flatnonzero(np.isin(keep, adi))
    return where, np.searchsorted(adi, keep[where])


def _zone_residuals(
    refs: np.ndarray,
    target: np.ndarray,
    gram: np.ndarray,
    overlaps: np.ndarray,
    size: float,
    rows: np.ndarray,
    which: np.ndarray,
    science: np.ndarray,
    references: np.ndarray,
    at: np.ndarray,
    cutoff: int,
) -> np.ndarray:
    """One zone, one target: (n, len(at)) residuals (the module's formulas); ``refs``
    (r, u) the used references on the zone's pixels of U, ``rows`` the ADI ones among
    them and ``which`` their index into ``references`` (n, A, u)."""
    companion = references[:, which]  # (n, a, u): the ADI rows' companions
    q_mean = companion.sum(axis=-1) / size  # (n, a)
    p_mean = science.sum(axis=-1) / size  # (n,)
    cross = companion @ refs.T  # Q·Rᵀ (n, a, r): the ADI rows
    grams = np.broadcast_to(gram, (len(science), *gram.shape)).copy()
    grams[:, rows, :] -= cross
    grams[:, :, rows] -= cross.transpose(0, 2, 1)
    own = companion @ companion.transpose(0, 2, 1)
    own -= size * q_mean[:, :, None] * q_mean[:, None, :]
    grams[:, rows[:, None], rows[None, :]] += own
    moved = overlaps[None] - science @ refs.T  # a − R·P
    moved[:, rows] += (
        -(companion @ target)
        + (companion @ science[:, :, None])[..., 0]
        - size * q_mean * p_mean[:, None]
    )
    values, vectors = largest_eigenpairs(grams, min(cutoff, len(refs)))
    scale = np.divide(1.0, values, out=np.zeros_like(values), where=values > 0)
    coefficients = (moved[:, None, :] @ vectors)[:, 0] * scale  # (n, k)
    mix = (vectors @ coefficients[:, :, None])[..., 0]  # (n, r): the references' mix
    on_stamp = refs[:, at]  # R'_s = R_s − (Q_s − q̄) on the ADI rows
    projection = mix @ on_stamp - (
        mix[:, None, rows] @ (companion[..., at] - q_mean[..., None])
    )[:, 0]
    return target[at][None] - science[:, at] + p_mean[:, None] - projection
