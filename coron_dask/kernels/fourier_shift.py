"""Sub-pixel circular image shifts in Fourier space, on real FFTs.

Real FFTs halve the work of jwst's ``fourier_imshift`` (complex FFT, real part kept) and,
with the Nyquist terms treated as that real part implies, give the same images.
"""

import numpy as np


def frequencies(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Spatial frequencies (cycles/pixel) of the rows and columns of an rfft2 of ``shape``."""
    ny, nx = shape
    return np.fft.fftfreq(ny)[:, None], np.fft.rfftfreq(nx)[None, :]


def _apply_ramp(
    spectra: np.ndarray,
    shape: tuple[int, int],
    dx: np.ndarray,
    dy: np.ndarray,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``spectra`` (rfft2s) times the phase ramp exp(-2πi(kx·dx + ky·dy)), as a row factor
    then a column factor, without building the full ramp (into ``out`` if given).

    On the Nyquist row of an even number of rows, the complex transform that jwst takes the
    real part of pairs each bin with its own row, which turns the ramp there into cos(π·dy),
    and cos(π·(dx+dy)) at the Nyquist corner; the real transform needs that said.
    """
    ny, nx = shape
    ky, kx = frequencies(shape)
    dx = np.asarray(dx, dtype=np.float64)[..., None, None]
    dy = np.asarray(dy, dtype=np.float64)[..., None, None]
    rows = np.exp(-2j * np.pi * ky * dy)
    if ny % 2 == 0:
        rows = np.broadcast_to(rows, (*dy.shape[:-2], ny, 1)).copy()
        rows[..., ny // 2, :] = np.cos(np.pi * dy[..., 0, :])
    out = np.multiply(spectra, rows, out=out)
    out *= np.exp(-2j * np.pi * kx * dx)
    if ny % 2 == 0 and nx % 2 == 0:
        corner = np.cos(np.pi * (dx + dy))[..., 0, 0]
        out[..., ny // 2, -1] = spectra[..., ny // 2, -1] * corner
    return out


def shift_spectra(
    spectra: np.ndarray,
    shape: tuple[int, int],
    shift: np.ndarray,
    *,
    work: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Images (..., ny, nx) from rfft2 ``spectra`` (..., ny, nx//2+1) moved by ``shift``
    (..., 2) = (dx, dy), which broadcasts against the spectra's leading axes. ``work`` (like
    ``spectra``) and ``out`` (float64) are buffers to reuse: with them nothing frame-sized
    is allocated (irfft2 would make two spectra), so a loop over batches does not grow the
    heap with fragments."""
    moved = _apply_ramp(spectra, shape, shift[..., 0], shift[..., 1], out=work)
    np.fft.ifft(moved, axis=-2, out=moved)  # irfft2 as its two passes, the first in place
    return np.fft.irfft(moved, n=shape[1], axis=-1, out=out)


def fourier_shift(image: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Shift ``image`` (..., ny, nx) circularly by ``shift`` (..., 2) = (dx, dy) pixels.

    A positive shift moves content towards higher index, as jwst's ``fourier_imshift``,
    whose values it reproduces. Computed in float64 whatever the input type.
    """
    image = np.asarray(image, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    if shift.shape[-1] < 2 or shift.shape[:-1] != image.shape[:-2]:
        raise ValueError(
            f"shift of shape {shift.shape} does not match images of shape {image.shape}"
        )
    return shift_spectra(np.fft.rfft2(image), image.shape[-2:], shift)
