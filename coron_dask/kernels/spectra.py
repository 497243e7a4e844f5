"""Fourier-plane algebra of the registration fit (``kernels.registration``): phase ramps
of sub-pixel shifts made from short tables of exponentials, complex products done as
real matrix products, and the frequencies of an axis as a shift sees them (the FFT's
grid and its mirror, which differ at the Nyquist frequency of an even size)."""

import numpy as np


def phase_ramps(shifts: np.ndarray, q: np.ndarray, n: int) -> np.ndarray:
    """exp(−2πi·q·d/n) (b, len(q)) for shifts d (b,) and consecutive integer frequencies
    q, as products of two short tables of exponentials (q = L·m + l: a coarse one over m,
    a fine one over l): the complex exponential is the costliest part of making a ramp,
    and this takes about 2·√len(q) of them rather than len(q), for a rounding error of a
    few ulp. The product broadcasts, one loop over l for each shift and m: each shift's
    ramp is made alike whatever the others (a loop over all of them would round those in
    its vectorised part and its tail differently)."""
    step = int(np.ceil(np.sqrt(len(q))))
    first, last = q[0] // step, q[-1] // step
    unit = -2j * np.pi / n
    coarse = np.exp(np.outer(shifts, unit * step * np.arange(first, last + 1)))
    fine = np.exp(np.outer(shifts, unit * np.arange(step)))
    ramps = (coarse[:, :, None] * fine[:, None, :]).reshape(len(shifts), -1)
    return ramps[:, q[0] - step * first :][:, : len(q)]


def stacked(terms: np.ndarray) -> np.ndarray:
    """Complex ``terms`` (..., n) as real numbers: [Re | Im] (..., 2n)."""
    return np.concatenate([terms.real, terms.imag], axis=-1)


def real_product(rows: np.ndarray, terms: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Re(rows · T · columns) for complex ``rows`` (..., a, q), T (..., q, n) held as
    ``stacked`` ``terms`` (..., q, 2n) and ``columns`` (..., n, c), by real matrix
    products: T·columns is [Re T | Im T] times the columns' parts stacked as
    [[Re, Im], [−Im, Re]], which takes half the time of a complex product of few columns."""
    n, c = columns.shape[-2:]
    mixed = np.empty((*columns.shape[:-2], 2 * n, 2 * c))
    mixed[..., :n, :c] = columns.real
    mixed[..., n:, :c] = -columns.imag
    mixed[..., :n, c:] = columns.imag
    mixed[..., n:, c:] = columns.real
    inner = np.matmul(terms, mixed)  # (..., q, 2c): Re and Im of T·columns
    return np.matmul(rows.real, inner[..., :c]) - np.matmul(rows.imag, inner[..., c:])


class SplitAxis:
    """The frequencies of one axis of n pixels as a shift sees them: k = −n//2…n//2, and
    which of them the FFT's own (−n//2…(n−1)//2) and its mirror ((1−n)//2…n//2) hold
    (they differ at the Nyquist frequency of an even n); the sums of two: ``double``."""

    def __init__(self, n: int) -> None:
        half = n // 2
        self.n = n
        self.k = np.arange(-half, half + 1)
        self.size = len(self.k)
        self.double = np.arange(-2 * half, 2 * half + 1)
        self.own = self.k <= (n - 1) // 2
        self.mirror = self.k >= -((n - 1) // 2)


def split_spectrum(half: np.ndarray, y: SplitAxis, x: SplitAxis) -> np.ndarray:
    """The spectrum (ky, kx ≥ 0) of a real image from its rfft2 ``half``, weighed as the
    real part of a shifted complex FFT weighs it: a bin in the FFT's grid and in its
    mirror counts once, a bin in one of them (±n/2, n even) half."""
    kx = x.k >= 0
    own = y.own[:, None] & x.own[None, kx]
    mirror = y.mirror[:, None] & x.mirror[None, kx]
    return half[np.ix_(y.k % y.n, x.k[kx])] * (0.5 * own + 0.5 * mirror)


def fold(q: np.ndarray) -> np.ndarray:
    """Weights that fold a sum over q_x (symmetric, conjugate terms at ±q_x) onto q_x ≥ 0."""
    kept = q[q >= 0]
    return np.where(kept == 0, 1.0, 2.0)
