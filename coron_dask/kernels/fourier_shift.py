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

    def apply(self, spectrum: np.ndarray, i: int, j: int) -> np.ndarray:
        """``spectrum`` times ``term(i, j)``, without building the full ramp first."""
        out = spectrum * self.rows[j]
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


def shift_phase(shape: tuple[int, int], dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Phase ramp exp(-2πi(kx·dx + ky·dy)) on an rfft2 grid: it moves an image by (+dx, +dy).

    ``dx`` and ``dy`` may be arrays of shape ``(n,)``: the ramps are then ``(n, ny, nx//2+1)``.
    """
    return Ramps(shape, dx, dy, order=0).term(0, 0)


def fourier_shift(image: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Shift ``image`` (..., ny, nx) circularly by ``shift`` (..., 2) = (dx, dy) pixels.

    A positive shift moves content towards higher index, as jwst's ``fourier_imshift``,
    whose values it reproduces. Computed in float64 whatever the input type. ``shift`` may
    have more leading axes than ``image`` (several shifts of the same images): the images'
    spectra are then computed once.
    """
    image = np.asarray(image, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    lead = shift.ndim - 1 - (image.ndim - 2)
    if shift.shape[-1] < 2 or lead < 0 or shift.shape[lead:-1] != image.shape[:-2]:
        raise ValueError(
            f"shift of shape {shift.shape} does not match images of shape {image.shape}"
        )
    shape = image.shape[-2:]
    spectrum = np.fft.rfft2(image)
    out = np.empty(shift.shape[:-1] + shape)
    for index in np.ndindex(shift.shape[:lead]):
        moved = spectrum * shift_phase(shape, shift[index][..., 0], shift[index][..., 1])
        out[index] = np.fft.irfft2(moved, s=shape)
    return out
