"""The functions dask runs on each block: numpy in, numpy out, one call per task.

They live apart from the steps that map them over dask arrays so that a worker unpickling
a task imports numpy and these kernels only, not dask.array, xarray or astropy.
"""

import warnings

import numpy as np

from coron_dask.kernels.fourier_shift import shift_spectra
from coron_dask.kernels.klip import KLBasis, klip_subtract
from coron_dask.kernels.median_fill import median_fill
from coron_dask.kernels.registration import fit_shifts


def fill_block(
    image: np.ndarray,
    sci: np.ndarray,
    dq: np.ndarray,
    box: int,
    bad_bitvalue: int,
    non_science_bit: int | None,
) -> np.ndarray:
    """``image`` with the bad pixels of the exposure (DQ & bad bits, or NaN in SCI) filled.

    With ``non_science_bit`` (jwst does this for MIRI) bad pixels flagged with it become 0
    and are not filled.
    """
    bad = ((dq & bad_bitvalue) > 0) | np.isnan(sci) | np.isnan(image)
    if non_science_bit is not None:
        non_science = bad & ((dq & non_science_bit) > 0)
        image = np.where(non_science, 0, image)
        bad &= ~non_science
    return median_fill(image, bad, box).astype(image.dtype)


def fit_block(science: np.ndarray, psfs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shifts (m, p, 3) of references ``psfs`` (p, y, x) to each science frame (m, y, x)."""
    return np.stack([fit_shifts(frame, psfs, mask) for frame in science])


def shift_block(frames: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """References' SCI and ERR (2, p, y, x) moved by −(dx, dy) of ``shifts`` ([m,] p, 3):
    (2, [m,] p, y, x) float32. Each frame is transformed once per block, whatever the number
    of the block's science integrations it is aligned to."""
    spectra = np.fft.rfft2(np.asarray(frames, dtype=np.float64))
    shape = frames.shape[-2:]
    if shifts.ndim == 2:
        return shift_spectra(spectra, shape, -shifts[:, :2]).astype(np.float32)
    out = np.empty((frames.shape[0], *shifts.shape[:-1], *shape), dtype=np.float32)
    for m, per_frame in enumerate(shifts):
        out[:, m] = shift_spectra(spectra, shape, -per_frame[:, :2])
    return out


def _flat(block: np.ndarray) -> np.ndarray:
    return block.reshape(block.shape[0], -1)


def klip_block(targets: np.ndarray, ref_blocks: list, truncate: int) -> np.ndarray:
    """psfsub SCI and ERR (m, 2, y, x) of targets (m, y, x), each with its own references,
    given as the blocks (m, p_j, y, x) they are held in along the reference axis."""
    m, ny, nx = targets.shape
    out = np.empty((m, 2, ny, nx), dtype=np.float32)
    for i in range(m):
        pieces = [_flat(block[i]) for block in ref_blocks]
        basis = KLBasis(pieces, truncate)
        out[i, 0] = klip_subtract(targets[i].reshape(1, -1), basis.images).reshape(ny, nx)
        out[i, 1] = basis.error(pieces).reshape(ny, nx)
    return out


def basis_block(ref_blocks: list, truncate: int) -> KLBasis:
    """The KL basis of references held in blocks (p_j, y, x)."""
    return KLBasis([_flat(block) for block in ref_blocks], truncate)


def error_block(basis: KLBasis, ref_blocks: list) -> np.ndarray:
    """KLIP's ERR (npix,) of the references ``basis`` was built from."""
    return basis.error([_flat(block) for block in ref_blocks])


def subtract_block(targets: np.ndarray, basis: KLBasis) -> np.ndarray:
    """psfsub SCI (m, y, x) float32 of targets (m, y, x) on a shared basis."""
    flat = targets.reshape(targets.shape[0], -1)
    return klip_subtract(flat, basis.images).reshape(targets.shape).astype(np.float32)


def median_block(cube: np.ndarray) -> np.ndarray:
    """Median over the first axis, ignoring NaN (NaN where a pixel has no value at all)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
        return np.nanmedian(cube, axis=0).astype(np.float32)


def drizzle_block(
    sci: np.ndarray,
    err: np.ndarray,
    dq: np.ndarray,
    pixmap: np.ndarray,
    out_shape: tuple[int, int],
    bad_bits: int,
) -> np.ndarray:
    """Drizzle integrations (m, y, x) onto the output grid through ``pixmap`` (y, x, 2),
    weighted by inverse variance (1/err²), bad pixels (DQ & bad_bits, NaN) left out.

    Returns (1, 2, Y, X): the weighted sum and the total weight, so that blocks add up.
    """
    from drizzle.resample import Drizzle

    driz = Drizzle(kernel="square", out_shape=out_shape, fillval="0", disable_ctx=True)
    for frame, sigma, flags in zip(sci, err, dq, strict=True):
        good = np.isfinite(frame) & np.isfinite(sigma) & (sigma > 0) & ((flags & bad_bits) == 0)
        weight = np.where(good, 1.0 / np.where(good, sigma, 1.0) ** 2, 0.0).astype(np.float32)
        data = np.where(good, frame, 0.0).astype(np.float32)
        driz.add_image(data, exptime=1.0, pixmap=pixmap, weight_map=weight, pixfrac=1.0)
    out = np.empty((1, 2, *out_shape))
    out[0, 1] = driz.out_wht
    out[0, 0] = driz.out_img * driz.out_wht
    return out
