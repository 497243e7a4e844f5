"""Synthetic companions: an off-axis PSF placed at sub-pixel positions in frames.

The PSF is an odd box with its centre at the middle pixel; each companion is the box moved
by the fraction of a pixel that separates its position from a pixel centre (a Fourier
shift, as align_refs moves references), scaled, and added where it overlaps the frame.
A companion's flux is first scaled by the coronagraph's transmission at its place on the
detector (``transmission_at``), as the occulter dims it.
"""

import numpy as np
from scipy.ndimage import map_coordinates

from coron_dask.kernels.fourier_shift import fourier_shift


def companion_image(
    shape: tuple[int, int], positions: np.ndarray, fluxes: np.ndarray, psf: np.ndarray
) -> np.ndarray:
    """An image (ny, nx) float64 of companions at ``positions`` (n, 2) = (x, y) pixels
    (0-based) with total fluxes ``fluxes`` (n,) times ``psf`` (an odd box whose middle
    pixel is the star's place, normalised as the caller wants)."""
    half_y, half_x = psf.shape[0] // 2, psf.shape[1] // 2
    out = np.zeros(shape)
    for (x, y), flux in zip(np.asarray(positions, float), np.asarray(fluxes, float), strict=True):
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        moved = fourier_shift(psf.astype(np.float64), np.array([x - ix, y - iy])) * flux
        y0, x0 = iy - half_y, ix - half_x
        ys = slice(max(y0, 0), min(y0 + psf.shape[0], shape[0]))
        xs = slice(max(x0, 0), min(x0 + psf.shape[1], shape[1]))
        if ys.start < ys.stop and xs.start < xs.stop:
            out[ys, xs] += moved[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return out


def inject_block(
    sci: np.ndarray, positions: np.ndarray, fluxes: np.ndarray, psf: np.ndarray, alone: bool
) -> np.ndarray:
    """Integrations (m, y, x) with the companions added to every frame (NaN stays NaN:
    a pixel without data has none with a companion either), or with ``alone`` the
    companions alone (float32, as the calints)."""
    image = companion_image(sci.shape[1:], positions, fluxes, psf).astype(np.float32)
    if alone:
        return np.broadcast_to(image, sci.shape).copy()
    return sci + image


def transmission_at(transmission: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The values (n,) of a transmission map (ny, nx) at ``positions`` (n, 2) = (x, y)
    pixels (0-based): bilinear between pixel centres, the edge's value beyond the map."""
    places = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    return map_coordinates(
        np.asarray(transmission, dtype=np.float64), places[:, ::-1].T, order=1, mode="nearest"
    )
