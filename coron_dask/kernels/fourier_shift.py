"""Sub-pixel circular image shifts in Fourier space, on real FFTs.

Real FFTs halve the work of jwst's ``fourier_imshift`` (complex FFT, real part kept) and,
with the Nyquist terms treated as that real part implies, give the same images.
"""

import numpy as np


def frequencies(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Spatial frequencies (cycles/pixel) of the rows and columns of an rfft2 of ``shape``."""
    ny, nx = shape
    return np.fft.fftfreq(ny)[:, None], np.fft.rfftfreq(nx)[None, :]


class Ramps:
    """The phase ramp exp(-2πi(kx·dx + ky·dy)) of an rfft2 grid and its derivatives, kept
    as separable factors: ``term(i, j)`` is ∂ⁱ/∂dxⁱ ∂ʲ/∂dyʲ of the ramp, ``cols[i]`` (n, 1, nxr)
    times ``rows[j]`` (n, ny, 1) everywhere but at the Nyquist corner, where it is
    ``corner[i + j]``. Sums against a ramp can then run over one axis at a time.

    On the Nyquist row of an even number of rows, the complex transform that jwst takes the
    real part of pairs each bin with its own row, which turns the ramp there into
    cos(π·dy), and cos(π·(dx+dy)) at the Nyquist corner; the real transform needs that said.
    """

    def __init__(self, shape: tuple[int, int], dx: np.ndarray, dy: np.ndarray, order: int) -> None:
        ny, nx = self.shape = shape
        ky, kx = frequencies(shape)
        dx = np.asarray(dx, dtype=np.float64)[..., None, None]
        dy = np.asarray(dy, dtype=np.float64)[..., None, None]
        self.cols = [np.exp(-2j * np.pi * kx * dx)]
        self.rows = [np.exp(-2j * np.pi * ky * dy)]
        for _ in range(order):
            self.cols.append(-2j * np.pi * kx * self.cols[-1])
            self.rows.append(-2j * np.pi * ky * self.rows[-1])
        self.nyquist_row = ny // 2 if ny % 2 == 0 else None
        self.corner = None
        if self.nyquist_row is not None:
            angle = np.pi * dy[..., 0, :]
            values = [np.cos(angle), -np.pi * np.sin(angle), -(np.pi**2) * np.cos(angle)]
            for k in range(order + 1):
                self.rows[k] = np.broadcast_to(self.rows[k], (*dy.shape[:-2], ny, 1)).copy()
                self.rows[k][..., self.nyquist_row, :] = values[k]
            if nx % 2 == 0:
                angle = np.pi * (dx[..., 0, 0] + dy[..., 0, 0])
                self.corner = [np.cos(angle), -np.pi * np.sin(angle), -(np.pi**2) * np.cos(angle)]

    def term(self, i: int, j: int) -> np.ndarray:
        """∂ⁱ/∂dxⁱ ∂ʲ/∂dyʲ of the ramp, full size."""
        ramp = self.cols[i] * self.rows[j]
        if self.corner is not None:
            ramp[..., self.nyquist_row, -1] = self.corner[i + j]
        return ramp

    def apply(
        self, spectrum: np.ndarray, i: int, j: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """``spectrum`` times ``term(i, j)``, without building the full ramp first (into
        ``out`` if given)."""
        out = np.multiply(spectrum, self.rows[j], out=out)
        out *= self.cols[i]
        if self.corner is not None:
            out[..., self.nyquist_row, -1] = (
                spectrum[..., self.nyquist_row, -1] * self.corner[i + j]
            )
        return out

    def inner(self, spectrum: np.ndarray, i: int, j: int) -> np.ndarray:
        """Σ over the grid of ``spectrum`` (n, ny, nxr) times ``term(i, j)``: (n,) complex."""
        total = np.einsum("byx,bx,by->b", spectrum, self.cols[i][:, 0], self.rows[j][..., 0])
        if self.corner is not None:
            edge = spectrum[..., self.nyquist_row, -1]
            separable = self.cols[i][:, 0, -1] * self.rows[j][:, self.nyquist_row, 0]
            total += edge * (self.corner[i + j] - separable)
        return total


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
    ramps = Ramps(shape, shift[..., 0], shift[..., 1], order=0)
    moved = ramps.apply(spectra, 0, 0, out=work)
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
