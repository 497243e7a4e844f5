"""Sub-pixel circular image shifts in Fourier space, on real FFTs.

Real FFTs halve the work of jwst's ``fourier_imshift`` (complex FFT, real part kept) and,
with the Nyquist terms treated as that real part implies, give the same images.
"""

import numpy as np


def frequencies(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Spatial frequencies (cycles/pixel) of the rows and columns of an rfft2 of ``shape``."""
    ny, nx = shape
    return np.fft.fftfreq(ny)[:, None], np.fft.rfftfreq(nx)[None, :]


def shift_phase(
    shape: tuple[int, int], dx: np.ndarray, dy: np.ndarray, *, order: int = 0
) -> np.ndarray | list[np.ndarray]:
    """Phase ramps exp(-2πi(kx·dx + ky·dy)) on an rfft2 grid: they move an image by (+dx, +dy).

    ``dx`` and ``dy`` may be arrays of shape ``(n,)``: the ramps are then ``(n, ny, nx//2+1)``.
    ``order=0`` gives the ramp; ``order=1`` the list [ramp, ∂x, ∂y]; ``order=2`` adds
    [∂xx, ∂xy, ∂yy], derivatives with respect to dx and dy.

    On the Nyquist row of an even number of rows, the complex transform that jwst takes the
    real part of pairs each bin with its own row, which turns the ramp there into
    cos(π·dy) (cos(π·(dx+dy)) at the Nyquist corner); the real transform needs that said.
    """
    ky, kx = frequencies(shape)
    dx = np.asarray(dx, dtype=np.float64)[..., None, None]
    dy = np.asarray(dy, dtype=np.float64)[..., None, None]
    # The ramp is a product col(kx, dx)·row(ky, dy): derivatives are products of factors.
    col = [np.exp(-2j * np.pi * kx * dx)]
    row = [np.exp(-2j * np.pi * ky * dy)]
    for _ in range(order):
        col.append(-2j * np.pi * kx * col[-1])
        row.append(-2j * np.pi * ky * row[-1])
    ny, nx = shape
    nyquist_row = ny // 2 if ny % 2 == 0 else None
    if nyquist_row is not None:
        angle = np.pi * dy[..., 0, :]
        factors = [np.cos(angle), -np.pi * np.sin(angle), -(np.pi**2) * np.cos(angle)]
        for k in range(order + 1):
            row[k] = np.broadcast_to(row[k], (*dy.shape[:-2], ny, 1)).copy()
            row[k][..., nyquist_row, :] = factors[k]
    terms = [(0, 0)] if order == 0 else [(0, 0), (1, 0), (0, 1)]
    if order == 2:
        terms += [(2, 0), (1, 1), (0, 2)]
    ramps = [col[i] * row[j] for i, j in terms]
    if nyquist_row is not None and nx % 2 == 0:
        angle = np.pi * (dx[..., 0, 0] + dy[..., 0, 0])
        corner = [np.cos(angle), -np.pi * np.sin(angle), -(np.pi**2) * np.cos(angle)]
        for ramp, (i, j) in zip(ramps, terms, strict=True):
            ramp[..., nyquist_row, -1] = corner[i + j]
    return ramps[0] if order == 0 else ramps


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
    spectrum = np.fft.rfft2(image)
    spectrum *= shift_phase(image.shape[-2:], shift[..., 0], shift[..., 1])
    return np.fft.irfft2(spectrum, s=image.shape[-2:])
