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

from coron_dask.kernels.fourier_shift import shift_phase

#: Stop when a step moves the shift by less than this (pixels) and β relatively by less,
XTOL = 1e-10
#: ... or when an accepted step lowers the cost relatively by less than this.
FTOL = 1e-15
MAX_ITER = 100


def fit_shifts(
    science: np.ndarray,
    psfs: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    batch: int = 16,
) -> np.ndarray:
    """Fit (dx, dy, β) of each reference in ``psfs`` (n, ny, nx) to ``science`` (ny, nx).

    Returns an (n, 3) float64 array with the parameters of jwst's ``align_fourier_lsq``:
    shifting the science frame by (dx, dy) and scaling it by β best matches the reference.
    """
    science = np.asarray(science, dtype=np.float64)
    psfs = np.asarray(psfs, dtype=np.float64)
    if psfs.ndim == 2:
        return fit_shifts(science, psfs[None], mask, batch=batch)[0]
    weight = np.ones(science.shape) if mask is None else np.asarray(mask, dtype=np.float64)
    problem = _Problem(science, weight)
    out = np.empty((psfs.shape[0], 3))
    for start in range(0, psfs.shape[0], batch):
        out[start : start + batch] = problem.solve(psfs[start : start + batch])
    return out


class _Problem:
    """The fit of many references to one science frame: spectra computed once, reused."""

    def __init__(self, science: np.ndarray, weight: np.ndarray) -> None:
        self.shape = science.shape
        self.weight = weight
        self.weight2 = weight * weight
        self.spectrum = np.fft.rfft2(science)
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
        self, params: np.ndarray, psfs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cost ‖r‖², its gradient Jᵀr and its exact Hessian at ``params`` (b, 3), halved.

        With r = w·(psf − β·s), the Hessian is JᵀJ + Σ r·∇²r; the second term needs the
        second derivatives of the shifted model, three more inverse FFTs, and buys the
        quadratic convergence that noisy frames (large residuals) deny Gauss-Newton.
        """
        ramps = shift_phase(self.shape, params[:, 0], params[:, 1], order=2)
        s, sx, sy, sxx, sxy, syy = (
            np.fft.irfft2(self.spectrum * ramp, s=self.shape).reshape(len(params), -1)
            for ramp in ramps
        )
        beta = params[:, 2, None]
        w = self.weight.reshape(1, -1)
        residual = w * (psfs.reshape(len(params), -1) - beta * s)
        jac = np.stack([-beta * w * sx, -beta * w * sy, -w * s], axis=1)
        cost = np.einsum("bp,bp->b", residual, residual)
        gradient = np.einsum("bip,bp->bi", jac, residual)
        hessian = np.einsum("bip,bjp->bij", jac, jac)
        rw = residual * w
        second = np.einsum("bkp,bp->bk", np.stack([sxx, sxy, syy, sx, sy], axis=1), rw)
        hessian[:, 0, 0] -= beta[:, 0] * second[:, 0]
        hessian[:, 0, 1] -= beta[:, 0] * second[:, 1]
        hessian[:, 1, 1] -= beta[:, 0] * second[:, 2]
        hessian[:, 0, 2] -= second[:, 3]
        hessian[:, 1, 2] -= second[:, 4]
        hessian[:, 1, 0] = hessian[:, 0, 1]
        hessian[:, 2, 0] = hessian[:, 0, 2]
        hessian[:, 2, 1] = hessian[:, 1, 2]
        return cost, gradient, hessian

    def solve(self, psfs: np.ndarray) -> np.ndarray:
        """Damped Newton from the cross-correlation start; each reference stops on its own."""
        params = self.start(psfs)
        cost, gradient, hessian = self.evaluate(params, psfs)
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
            trial = params[idx] + step
            t_cost, t_gradient, t_hessian = self.evaluate(trial, psfs[idx])
            better = t_cost <= cost[idx]
            good = idx[better]
            small_step = (np.abs(step[:, :2]).max(axis=1) < XTOL) & (
                np.abs(step[:, 2]) <= XTOL * np.abs(trial[:, 2])
            )
            small_gain = (cost[idx] - t_cost) <= FTOL * cost[idx]
            params[good], cost[good] = trial[better], t_cost[better]
            gradient[good], hessian[good] = t_gradient[better], t_hessian[better]
            damping[idx] = np.where(better, damping[idx] * 0.1, damping[idx] * 10.0)
            done = small_step | (better & small_gain) | (damping[idx] > 1e12)
            active[idx[done]] = False
        return params
