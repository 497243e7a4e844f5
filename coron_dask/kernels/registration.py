"""Least-squares sub-pixel registration of reference PSFs to a science frame.

jwst's model (``imageregistration.align_fourier_lsq``): for a science frame ``sci``, a
reference ``psf`` and weights ``mask``, minimise ‖(psf − β·S(sci; dx, dy))·mask‖² over
(dx, dy, β), with S the Fourier shift. The reference is then shifted by −(dx, dy).

jwst solves it with MINPACK's finite-difference ``leastsq`` from (0, 0, 1), up to 800
evaluations of one complex FFT pair each. Here the same optimum is found by a damped
Newton method on analytic derivatives (the derivative of a Fourier shift is the shift of
the derivative), from the best integer shift of the weighted cross-correlation, reusing
the science frame's spectrum for every reference and fitting a batch of references at once.
"""

import numpy as np
from scipy import fft  # numpy's FFTs hold the GIL for part of their time, scipy's do not

#: A Newton step that moves the shift by less than this (pixels), and β relatively by
#: less, is the last: with quadratic convergence what remains is of order XTOL².
XTOL = 1e-4
#: Stop also when an accepted step lowers the cost relatively by less than this.
FTOL = 1e-15
MAX_ITER = 100
#: The fit starts from the best integer shift within this many pixels of no shift: JWST's
#: pointing puts references well within it, and a wider search can latch onto another
#: feature of a frame (jwst's fit, from no shift, stays in the PSF core's basin too).
START_RADIUS = 2
#: Pixels of reference frames fitted at once (a batch): about 40 bytes each are in flight
#: (float64 frames, spectra, overlaps), so ~10 MB, cache-friendly, whatever the frame size.
BATCH_PIXELS = 2**18


def fit_batch(pixels: int) -> int:
    """References of ``pixels`` pixels each that the fit takes at once (1 to 16)."""
    return int(np.clip(BATCH_PIXELS // pixels, 1, 16))


def shift_batch(pixels: int) -> int:
    """Frames of ``pixels`` pixels each that a Fourier shift block transforms at once."""
    return max(1, BATCH_PIXELS // pixels)


def fit_shifts(
    science: np.ndarray,
    psfs: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    batch: int | None = None,
) -> np.ndarray:
    """Fit (dx, dy, β) of each reference in ``psfs`` (n, ny, nx) to ``science`` (ny, nx).

    Returns an (n, 3) float64 array with the parameters of jwst's ``align_fourier_lsq``:
    shifting the science frame by (dx, dy) and scaling it by β best matches the reference.
    """
    science = np.asarray(science, dtype=np.float64)
    psfs = np.asarray(psfs)
    if psfs.ndim == 2:
        return fit_shifts(science, psfs[None], mask, batch=batch)[0]
    weight = np.ones(science.shape) if mask is None else np.asarray(mask, dtype=np.float64)
    if batch is None:
        batch = fit_batch(science.size)
    problem = _Problem(science, weight)
    out = np.empty((psfs.shape[0], 3))
    for start in range(0, psfs.shape[0], batch):
        # float64 a batch at a time: the block's references stay in their own type
        out[start : start + batch] = problem.solve(
            np.asarray(psfs[start : start + batch], dtype=np.float64)
        )
    return out


class _Problem:
    """The fit of many references to one science frame: spectra computed once, reused.

    The cost ‖w·(psf − β·s)‖², with s the science frame shifted by d = (dx, dy), is
    P − 2β·X(d) + β²·E(d): P = Σ w²psf², X(d) = Σ w²·psf·s and E(d) = Σ w²·s². Both X and
    E are sums of phase ramps exp(−2πi q·d) over frequencies, so that they and their
    derivatives in d cost no FFT per evaluation, only products with ramps that separate
    along y and x (matrix products):

    - s = ifft of Ã·ramp over the frequencies −N//2…N//2 of each axis, Ã the science
      frame's spectrum with the bins that jwst's real part of a complex shift splits
      (Nyquist rows and columns, N even) shared half-and-half between ±N/2;
    - E(d) = Σ_q H(q)·ramp(q) over −2·(N//2)…2·(N//2), H = (Ã∗Ã)(q)·FFT(w²)(−q) / N²
      (a linear autoconvolution, once per science frame);
    - X(d) = Σ_k M(k)·ramp(k), M = Ã(k)·FFT(w²psf)(−k) / N (once per reference).
    """

    def __init__(self, science: np.ndarray, weight: np.ndarray) -> None:
        self.shape = ny, nx = science.shape
        self.weight = weight
        self.weight2 = weight * weight
        self.spectrum = fft.rfft2(science)
        self.axes = [_SplitAxis(n) for n in self.shape]
        y, x = self.axes
        self.tilde = _split_spectrum(self.spectrum, y, x)
        # linear autoconvolution of Ã by FFTs long enough not to wrap around
        square = fft.fft2(self.tilde, s=(2 * y.size, 2 * x.size))
        square *= square
        conv = fft.ifft2(square)[: 2 * y.size - 1, : 2 * x.size - 1]
        del square
        reflected = fft.fft2(self.weight2)[np.ix_(-y.double % ny, -x.double % nx)]
        terms = conv * reflected / float(ny * nx) ** 2
        # a term at −q is the conjugate of that at q: the columns q_x ≥ 0 suffice, twice
        self.energy_terms = terms[:, x.double >= 0] * _fold(x.double)
        # Σ w²(x) sci²(x − d) for every integer d: the model's energy at an integer shift.
        energy = fft.irfft2(
            fft.rfft2(self.weight2) * np.conj(fft.rfft2(science * science)), s=self.shape
        )
        # the start looks at integer shifts within START_RADIUS pixels of none (circularly)
        # and their neighbours: their positions (index order), and the sums that give the
        # cross-correlation there from an rfft2 product (an inverse rfft2 at those points)
        near = [_near(n) for n in self.shape]
        self.near = [positions for positions, _ in near]
        self.near_index = [index for _, index in near]
        self.near_energy = energy[np.ix_(*self.near)]
        within = [np.isin(np.arange(len(p)), index[0]) for p, index in near]
        self.near_window = within[0][:, None] & within[1][None, :]
        ky, kx = np.fft.fftfreq(ny, 1 / ny), np.arange(nx // 2 + 1)
        self.near_rows = np.exp(2j * np.pi * np.outer(self.near[0], ky) / ny) / (ny * nx)
        twice = np.where((kx == 0) | (2 * kx == nx), 1.0, 2.0)  # the columns rfft2 leaves out
        self.near_columns = twice[:, None] * np.exp(2j * np.pi * np.outer(kx, self.near[1]) / nx)

    def start(self, psfs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dx, dy, β) at the best integer shift, refined by a parabola through its neighbours.

        At an integer shift d the best β is cc(d)/E(d), with cc the weighted cross-correlation
        and E the model's weighted energy, and the cost falls by cc(d)²/E(d): its peak, not
        that of cc alone (which a masked core biases), marks the start. cc is summed from
        the spectra at the few shifts the start looks at (``self.near``), not transformed
        back whole; it is returned with the references' weighted spectra (X's too).
        """
        ny, nx = self.shape
        weighted = fft.rfft2(psfs * self.weight2)
        # cc at the shifts near none, a matrix product per reference (the same for any batch)
        product = weighted * np.conj(self.spectrum)
        xcorr = np.matmul(np.matmul(self.near_rows[None], product), self.near_columns[None]).real
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where((xcorr > 0) & (self.near_energy > 0), xcorr**2 / self.near_energy, 0.0)
        gain *= self.near_window  # 0 beyond START_RADIUS, for the parabola too
        (ys, y_minus, y_plus), (xs, x_minus, x_plus) = self.near_index
        inside = gain[:, ys][:, :, xs]  # the shifts within START_RADIUS, in index order
        flat = np.argmax(inside.reshape(len(psfs), -1), axis=1)
        jy, jx = ys[flat // len(xs)], xs[flat % len(xs)]  # positions in the near shifts
        rows = np.arange(len(psfs))
        peak = gain[rows, jy, jx]

        def vertex(minus: np.ndarray, plus: np.ndarray) -> np.ndarray:
            curvature = minus - 2 * peak + plus
            with np.errstate(divide="ignore", invalid="ignore"):
                offset = 0.5 * (minus - plus) / curvature
            return np.where((curvature < 0) & (np.abs(offset) < 1), offset, 0.0)

        fy = vertex(gain[rows, y_minus[jy], jx], gain[rows, y_plus[jy], jx])
        fx = vertex(gain[rows, jy, x_minus[jx]], gain[rows, jy, x_plus[jx]])
        energy = self.near_energy[jy, jx]
        beta = np.divide(xcorr[rows, jy, jx], energy, out=np.ones(len(psfs)), where=energy > 0)
        iy, ix = self.near[0][jy], self.near[1][jx]
        dy = np.where(iy > ny // 2, iy - ny, iy) + fy
        dx = np.where(ix > nx // 2, ix - nx, ix) + fx
        return np.stack([dx, dy, beta], axis=1), weighted

    def evaluate(
        self, params: np.ndarray, overlaps: np.ndarray, energies: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cost ‖r‖², its gradient Jᵀr and its exact Hessian JᵀJ + Σ r·∇²r (half the
        cost's: the Newton step is the same) at ``params`` (b, 3), for references given by
        their ``overlaps`` M (b, ky, kx) and ``energies`` P = Σ w²psf² (b,). The exact
        Hessian buys the quadratic convergence that noisy frames deny Gauss-Newton."""
        dx, dy, beta = params.T
        energy = self._ramp_sums(self.energy_terms, dx, dy, double=True)
        overlap = self._ramp_sums(overlaps, dx, dy, double=False)

        def mixed(i: int, j: int) -> np.ndarray:  # ½ ∂ⁱ_y ∂ʲ_x of the cost, for i + j > 0
            return -beta * overlap[i, j] + 0.5 * beta**2 * energy[i, j]

        cost = energies - 2 * beta * overlap[0, 0] + beta**2 * energy[0, 0]
        by_beta = [-overlap[0, 1] + beta * energy[0, 1], -overlap[1, 0] + beta * energy[1, 0]]
        gradient = np.stack([mixed(0, 1), mixed(1, 0), -overlap[0, 0] + beta * energy[0, 0]], 1)
        hessian = np.empty((len(params), 3, 3))
        hessian[:, 0, 0], hessian[:, 1, 1] = mixed(0, 2), mixed(2, 0)
        hessian[:, 0, 1] = hessian[:, 1, 0] = mixed(1, 1)
        hessian[:, 0, 2] = hessian[:, 2, 0] = by_beta[0]
        hessian[:, 1, 2] = hessian[:, 2, 1] = by_beta[1]
        hessian[:, 2, 2] = energy[0, 0]
        return cost, gradient, hessian

    def _ramp_sums(self, terms: np.ndarray, dx: np.ndarray, dy: np.ndarray, double: bool) -> dict:
        """Σ_q terms(q)·∂ⁱ_y ∂ʲ_x exp(−2πi(q_y·dy/ny + q_x·dx/nx)) for i + j ≤ 2, real,
        keyed (i, j): of E (``terms`` H, one for all, on the doubled frequencies) or of X
        (``terms`` M, one per reference). The matrix products are one per reference, of
        the same shape whatever the batch (one product of all the references' columns is
        not bit for bit the same for every batch): the fit does not depend on the blocks."""
        ny, nx = self.shape
        y, x = self.axes
        qy, qx = (y.double, x.double) if double else (y.k, x.k)
        qx = qx[qx >= 0]  # the terms are folded onto q_x ≥ 0 (real sums)
        cy, cx = -2j * np.pi * qy / ny, -2j * np.pi * qx / nx
        rows = np.exp(np.outer(dy, cy))  # (b, qy)
        columns = np.exp(np.outer(dx, cx))
        columns = np.stack([columns, columns * cx, columns * cx * cx], axis=-1)  # (b, qx, 3)
        inner = np.matmul(terms[None] if double else terms, columns)  # (b, qy, 3)
        sums = {}
        for i, j in ((0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (1, 1)):
            factor = rows * cy**i if i else rows
            sums[i, j] = np.einsum("by,by->b", factor, inner[:, :, j]).real
        return sums

    def overlaps(self, spectra: np.ndarray) -> np.ndarray:
        """M (b, ky, kx ≥ 0), folded as E's terms, from the rfft2s of references times w²."""
        ny, nx = self.shape
        y, x = self.axes
        half = x.k >= 0
        reflected = spectra[..., (y.k % ny)[:, None], x.k[half][None, :]]  # FFT at k
        return self.tilde[:, half] * np.conj(reflected) * (_fold(x.k) / (ny * nx))

    def solve(self, psfs: np.ndarray) -> np.ndarray:
        """Damped Newton from the cross-correlation start; each reference stops on its own.

        A Newton step shorter than ``XTOL`` is taken without evaluating where it lands:
        convergence is quadratic there, so it leaves an error of order XTOL² (1e-8 pixel).
        """
        params, weighted = self.start(psfs)
        overlaps = self.overlaps(weighted)
        del weighted
        weighted_psfs = (psfs * self.weight).reshape(len(psfs), -1)
        energies = np.einsum("bp,bp->b", weighted_psfs, weighted_psfs)
        del weighted_psfs
        cost, gradient, hessian = self.evaluate(params, overlaps, energies)
        damping = np.full(len(psfs), 1e-6)
        active = np.ones(len(psfs), dtype=bool)
        for _ in range(MAX_ITER):
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            scale = np.abs(np.einsum("bii->bi", hessian[idx])) + 1e-300
            lhs = hessian[idx] + damping[idx, None, None] * (scale[:, :, None] * np.eye(3))
            definite = np.linalg.eigvalsh(lhs)[:, 0] > 0
            damping[idx[~definite]] *= 10.0
            idx, lhs = idx[definite], lhs[definite]
            if idx.size == 0:
                continue
            step = -np.linalg.solve(lhs, gradient[idx][..., None])[..., 0]
            small = (np.abs(step[:, :2]).max(axis=1) < XTOL) & (
                np.abs(step[:, 2]) <= XTOL * np.abs(params[idx, 2])
            )
            params[idx[small]] += step[small]
            active[idx[small]] = False
            idx, step = idx[~small], step[~small]
            if idx.size == 0:
                continue
            trial = params[idx] + step
            t_cost, t_gradient, t_hessian = self.evaluate(trial, overlaps[idx], energies[idx])
            better = t_cost <= cost[idx]
            good = idx[better]
            small_gain = (cost[idx] - t_cost) <= FTOL * cost[idx]
            params[good], cost[good] = trial[better], t_cost[better]
            gradient[good], hessian[good] = t_gradient[better], t_hessian[better]
            damping[idx] = np.where(better, damping[idx] * 0.1, damping[idx] * 10.0)
            done = (better & small_gain) | (damping[idx] > 1e12)
            active[idx[done]] = False
        return params


class _SplitAxis:
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


def _split_spectrum(half: np.ndarray, y: _SplitAxis, x: _SplitAxis) -> np.ndarray:
    """The full spectrum (ky, kx) of a real image from its rfft2 ``half``, weighed as the
    real part of a shifted complex FFT weighs it: a bin in the FFT's grid and in its
    mirror counts once, a bin in one of them (±n/2, n even) half."""
    negative = x.k < 0
    rows = np.where(negative[None, :], (-y.k[:, None]) % y.n, y.k[:, None] % y.n)
    columns = np.broadcast_to(np.abs(x.k)[None, :], rows.shape)
    full = half[rows, columns]
    full[:, negative] = np.conj(full[:, negative])
    own = y.own[:, None] & x.own[None, :]
    mirror = y.mirror[:, None] & x.mirror[None, :]
    return full * (0.5 * own + 0.5 * mirror)


def _fold(q: np.ndarray) -> np.ndarray:
    """Weights that fold a sum over q_x (symmetric, conjugate terms at ±q_x) onto q_x ≥ 0."""
    kept = q[q >= 0]
    return np.where(kept == 0, 1.0, 2.0)


def _near(n: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The positions (0…n−1, ascending) of the integer shifts within START_RADIUS of none
    along an axis of n pixels, circularly, with their neighbours; and, as indices into
    them, the shifts within the radius and each position's neighbours below and above."""
    wrapped = np.where(np.arange(n) > n // 2, np.arange(n) - n, np.arange(n))
    inside = np.flatnonzero(np.abs(wrapped) <= START_RADIUS)
    positions = np.unique(np.concatenate([inside, (inside - 1) % n, (inside + 1) % n]))
    index = {p: i for i, p in enumerate(positions)}
    ys = np.array([index[p] for p in inside])
    minus = np.array([index.get((p - 1) % n, 0) for p in positions])
    plus = np.array([index.get((p + 1) % n, 0) for p in positions])
    return positions, (ys, minus, plus)
