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

from coron_dask.kernels.fourier_shift import Ramps

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
#: Pixels of reference frames fitted at once (a batch): about 100 bytes each are in flight
#: (spectra, model images, residuals), so ~25 MB, cache-friendly, whatever the frame size.
BATCH_PIXELS = 2**18
BYTES_PER_BATCH_PIXEL = 100


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
    """The fit of many references to one science frame: spectra computed once, reused."""

    def __init__(self, science: np.ndarray, weight: np.ndarray) -> None:
        self.shape = science.shape
        self.weight = weight
        self.weight2 = weight * weight
        self.spectrum = np.fft.rfft2(science)
        # Σ_x a·b = Re Σ_k parseval·conj(A)·B for real a, b and their rfft2s A, B
        ny, nx = self.shape
        columns = np.full(nx // 2 + 1, 2.0)
        columns[0] = 1.0
        if nx % 2 == 0:
            columns[-1] = 1.0
        self.parseval_spectrum = self.spectrum * (columns / (ny * nx))
        # integer shifts the start may take: within START_RADIUS pixels of none (circularly)
        rows = np.abs(np.fft.fftfreq(ny, 1 / ny))[:, None] <= START_RADIUS
        cols = np.abs(np.fft.fftfreq(nx, 1 / nx))[None, :] <= START_RADIUS
        self.window = rows & cols
        # Σ w²(x) sci²(x − d) for every integer d: the model's energy at an integer shift.
        self.energy = np.fft.irfft2(
            np.fft.rfft2(self.weight2) * np.conj(np.fft.rfft2(science * science)), s=self.shape
        )

    def start(self, psfs: np.ndarray) -> np.ndarray:
        """(dx, dy, β) at the best integer shift, refined by a parabola through its neighbours.

        At an integer shift d the best β is cc(d)/E(d), with cc the weighted cross-correlation
        and E the model's weighted energy, and the cost falls by cc(d)²/E(d): its peak, not
        that of cc alone (which a masked core biases), marks the start.
        """
        ny, nx = self.shape
        xcorr = np.fft.irfft2(
            np.fft.rfft2(psfs * self.weight2) * np.conj(self.spectrum), s=self.shape
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where((xcorr > 0) & (self.energy > 0), xcorr**2 / self.energy, 0.0)
        gain *= self.window
        iy, ix = np.unravel_index(np.argmax(gain.reshape(len(psfs), -1), axis=1), self.shape)
        rows = np.arange(len(psfs))
        peak = gain[rows, iy, ix]

        def vertex(minus: np.ndarray, plus: np.ndarray) -> np.ndarray:
            curvature = minus - 2 * peak + plus
            with np.errstate(divide="ignore", invalid="ignore"):
                offset = 0.5 * (minus - plus) / curvature
            return np.where((curvature < 0) & (np.abs(offset) < 1), offset, 0.0)

        fy = vertex(gain[rows, (iy - 1) % ny, ix], gain[rows, (iy + 1) % ny, ix])
        fx = vertex(gain[rows, iy, (ix - 1) % nx], gain[rows, iy, (ix + 1) % nx])
        energy = self.energy[iy, ix]
        beta = np.divide(xcorr[rows, iy, ix], energy, out=np.ones(len(psfs)), where=energy > 0)
        dy = np.where(iy > ny // 2, iy - ny, iy) + fy
        dx = np.where(ix > nx // 2, ix - nx, ix) + fx
        return np.stack([dx, dy, beta], axis=1)

    def evaluate(
        self, params: np.ndarray, weighted_psfs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cost ‖r‖², its gradient Jᵀr and its exact Hessian at ``params`` (b, 3), for
        references already multiplied by the weights and flattened (b, npix).

        With r = w·(psf − β·s), the Hessian is JᵀJ + Σ r·∇²r; the second term needs the
        second derivatives of the shifted model, three more inverse FFTs, and buys the
        quadratic convergence that noisy frames (large residuals) deny Gauss-Newton.
        The Jacobian's three images come from one batched inverse FFT, the sums of the
        residual against all six (s and its derivatives) from one forward FFT.
        """
        count = len(params)
        ramps = Ramps(self.shape, params[:, 0], params[:, 1], order=2)
        spectra = np.empty((count, 3, *self.spectrum.shape), dtype=np.complex128)
        for k, (i, j) in enumerate(((0, 0), (1, 0), (0, 1))):
            spectra[:, k] = ramps.apply(self.spectrum, i, j)
        # s, ∂x s, ∂y s in real space, times the weights: they make the Jacobian
        model = np.fft.irfft2(spectra, s=self.shape).reshape(count, 3, -1)
        model *= self.weight.reshape(1, 1, -1)
        beta = params[:, 2]
        residual = weighted_psfs - beta[:, None] * model[:, 0]
        cost = np.einsum("bp,bp->b", residual, residual)
        # Σ w·r·(each of s and its 5 derivatives), by Parseval: one forward FFT of w·r
        # replaces the inverse FFTs of the second derivatives
        overlap = np.fft.rfft2((residual * self.weight.reshape(1, -1)).reshape(count, *self.shape))
        np.conjugate(overlap, out=overlap)
        overlap *= self.parseval_spectrum
        terms = ((0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2))
        sums = np.stack([ramps.inner(overlap, i, j).real for i, j in terms], axis=1)
        gram = np.matmul(model[:, :3], model[:, :3].transpose(0, 2, 1))  # over s, ∂x s, ∂y s
        # J = [−β·w∂x s, −β·w∂y s, −w·s]: reorder the Gram matrix to (x, y, β)
        order = [1, 2, 0]
        scale = np.stack([beta, beta, np.ones_like(beta)], axis=1)
        hessian = gram[:, order][:, :, order] * scale[:, :, None] * scale[:, None, :]
        gradient = -scale * sums[:, order]
        hessian[:, 0, 0] -= beta * sums[:, 3]
        hessian[:, 0, 1] -= beta * sums[:, 4]
        hessian[:, 1, 1] -= beta * sums[:, 5]
        hessian[:, 0, 2] -= sums[:, 1]
        hessian[:, 1, 2] -= sums[:, 2]
        hessian[:, 1, 0] = hessian[:, 0, 1]
        hessian[:, 2, 0] = hessian[:, 0, 2]
        hessian[:, 2, 1] = hessian[:, 1, 2]
        return cost, gradient, hessian

    def solve(self, psfs: np.ndarray) -> np.ndarray:
        """Damped Newton from the cross-correlation start; each reference stops on its own.

        A Newton step shorter than ``XTOL`` is taken without evaluating where it lands:
        convergence is quadratic there, so it leaves an error of order XTOL² (1e-8 pixel).
        """
        params = self.start(psfs)
        weighted_psfs = psfs.reshape(len(psfs), -1) * self.weight.reshape(1, -1)
        cost, gradient, hessian = self.evaluate(params, weighted_psfs)
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
            t_cost, t_gradient, t_hessian = self.evaluate(trial, weighted_psfs[idx])
            better = t_cost <= cost[idx]
            good = idx[better]
            small_gain = (cost[idx] - t_cost) <= FTOL * cost[idx]
            params[good], cost[good] = trial[better], t_cost[better]
            gradient[good], hessian[good] = t_gradient[better], t_hessian[better]
            damping[idx] = np.where(better, damping[idx] * 0.1, damping[idx] * 10.0)
            done = (better & small_gain) | (damping[idx] > 1e12)
            active[idx[done]] = False
        return params
