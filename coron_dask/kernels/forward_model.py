"""The exact forward model of a companion through RDI KLIP, on a window of the frame.

With RDI the KL basis of each (integration, zone) is made of the references alone, and
KLIP is linear in the science frame, so what KLIP makes of a companion image c in
integration i, on the pixels of zone z, is

    F_i(c) = c − mean_z(c) − Σ_{k<K} ⟨c, Z_ik⟩_z Z_ik

with Z_ik the zone's unit KL images (``kernels.klip``: Z = Wᵀ·(R − μ), each reference minus
its mean over the zone, so every Z_ik sums to 0 over the zone and ⟨c − mean_z(c), Z⟩ =
⟨c, Z⟩). A companion touches a few hundred pixels: the KL images on a window around it,
and each zone's pixel count for the mean, give F exactly there. A companion whose image
crosses a zone's edge is split by zone, as KLIP splits it; pixels in no zone are NaN.

``forward_model`` is that formula per integration; ``mean_operator`` the linear map from
the companion's window to its integration-mean psfsub on a stamp (what the fit compares
with the data, made once per window: each model is then one matrix product); and
``placed_psfs`` makes the companion images on the window, the off-axis PSF moved to
sub-pixel places as ``kernels.inject.companion_image`` moves it.
"""

import numpy as np

from coron_dask.kernels.fourier_shift import shift_spectra


def _zones_in(labels: np.ndarray) -> list[int]:
    """The zones (labels ≥ 0) present on a window."""
    return [int(z) for z in np.unique(labels) if z >= 0]


def forward_model(
    companion: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    sizes: np.ndarray,
    cutoff: int | None = None,
) -> np.ndarray:
    """What KLIP makes of ``companion`` (..., wy, wx) on a window, in each integration:
    (..., m, wy, wx) float64, NaN in no zone. ``images``: the KL images of each
    integration on the window (m, K, wy, wx); ``labels`` (wy, wx) the zone of each window
    pixel (−1: none); ``sizes`` the pixels of each zone in the whole frame (its mean's
    divisor); ``cutoff``: the first k KL images (default all K). The companion must be 0
    outside the window (its whole image is on it)."""
    lead = companion.shape[:-2]
    m, count = images.shape[:2]
    k = count if cutoff is None else cutoff
    if not 0 < k <= count:
        raise ValueError(f"cutoff {cutoff} outside 1..{count} KL images")
    flat = companion.reshape(-1, labels.size).astype(np.float64)
    basis = images.reshape(m, count, labels.size)[:, :k]
    zone_of = labels.ravel()
    out = np.full((len(flat), m, labels.size), np.nan)
    for z in _zones_in(zone_of):
        pixels = np.flatnonzero(zone_of == z)
        c = flat[:, pixels]
        z_images = basis[:, :, pixels]
        coefficients = np.einsum("np,ikp->nik", c, z_images)
        mean = c.sum(axis=1) / sizes[z]
        projection = np.einsum("nik,ikp->nip", coefficients, z_images)
        out[:, :, pixels] = (c - mean[:, None])[:, None, :] - projection
    return out.reshape(*lead, m, *labels.shape)


def mean_operator(
    images: np.ndarray,
    labels: np.ndarray,
    sizes: np.ndarray,
    stamp: np.ndarray,
    cutoff: int | None = None,
) -> np.ndarray:
    """The matrix A (len(stamp), wy·wx) with A·c = the mean over the m integrations of
    ``forward_model(c)`` at the window's flat pixels ``stamp`` (each in a zone), for any
    companion c on the window (flattened): A[s, p] = δ_sp − [z_p = z_s] (1/n_z +
    (1/m) Σ_ik Z_iks Z_ikp)."""
    m, count = images.shape[:2]
    k = count if cutoff is None else cutoff
    basis = images.reshape(m, count, labels.size)[:, :k]
    zone_of = labels.ravel()
    if (zone_of[stamp] < 0).any():
        raise ValueError("every stamp pixel must be in a zone")
    out = np.zeros((len(stamp), labels.size))
    out[np.arange(len(stamp)), stamp] = 1.0
    for z in _zones_in(zone_of[stamp]):
        rows = np.flatnonzero(zone_of[stamp] == z)
        pixels = np.flatnonzero(zone_of == z)
        gram = np.einsum("iks,ikp->sp", basis[:, :, stamp[rows]], basis[:, :, pixels]) / m
        out[np.ix_(rows, pixels)] -= gram + 1.0 / sizes[z]
    return out


def placed_psfs(
    spectrum: np.ndarray, box: tuple[int, int], shape: tuple[int, int], places: np.ndarray
) -> np.ndarray:
    """Companion images (n, wy, wx) on a window of ``shape``: the PSF box (its rfft2
    ``spectrum``, of an odd ``box`` (by, bx) whose middle pixel is its centre) moved to each
    of ``places`` (n, 2) = (x, y) in window pixels, as ``kernels.inject.companion_image``
    moves it (the nearest pixel, then a Fourier shift of the fraction), cut at the
    window's edges."""
    places = np.asarray(places, dtype=np.float64).reshape(-1, 2)
    nearest = np.floor(places + 0.5).astype(int)
    moved = shift_spectra(spectrum, box, places - nearest)
    out = np.zeros((len(places), *shape))
    half_y, half_x = box[0] // 2, box[1] // 2
    y0, x0 = nearest[:, 1] - half_y, nearest[:, 0] - half_x
    if (
        (y0 >= 0).all()
        and (x0 >= 0).all()
        and (y0 + box[0] <= shape[0]).all()
        and (x0 + box[1] <= shape[1]).all()
    ):  # every box whole on the window: placed at once
        rows = y0[:, None, None] + np.arange(box[0])[None, :, None]
        columns = x0[:, None, None] + np.arange(box[1])[None, None, :]
        out[np.arange(len(places))[:, None, None], rows, columns] = moved
        return out
    for j, (ix, iy) in enumerate(nearest):
        y0, x0 = iy - half_y, ix - half_x
        ys = slice(max(y0, 0), min(y0 + box[0], shape[0]))
        xs = slice(max(x0, 0), min(x0 + box[1], shape[1]))
        if ys.start < ys.stop and xs.start < xs.stop:
            out[j, ys, xs] = moved[j, ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return out
