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

from coron_dask.kernels.spectra import (
    SplitAxis,
    fold,
    phase_ramps,
    real_product,
    split_spectrum,
    stacked,
)

#: A Newton step that moves the shift by less than this (pixels), and β relatively by
#: less, is the last: with quadratic convergence what remains is of order XTOL² (1e-6 px;
#: fits run on to 1e-14 px differ from these by at most 1e-6 px); 1e-4 would cost one
#: more evaluation per reference, a sixth of the fit's time.
XTOL = 1e-3
#: Stop also when an accepted step lowers the cost relatively by less than this.
FTOL = 1e-15
MAX_ITER = 100
#: A fit whose Levenberg damping grows past this without a step that lowers the cost has
#: failed: it did not converge.
MAX_DAMPING = 1e12
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
) -> tuple[np.ndarray, np.ndarray]:
    """Fit (dx, dy, β) of each reference in ``psfs`` (n, ny, nx) to each science frame of
    ``science`` ((m,) ny, nx): ((m,) n, 3) float64, and whether each fit converged ((m,) n)
    bool.

    The parameters are those of jwst's ``align_fourier_lsq``: shifting the science frame
    by (dx, dy) and scaling it by β best matches the reference. What depends only on the
    mask, or only on a reference, is computed once for all the science frames.

    A fit converged when the Newton iteration stopped on its own tolerances (``XTOL``,
    ``FTOL``; not on ``MAX_ITER`` or a damping that grew past ``MAX_DAMPING``) at finite
    parameters. A pair that cannot be fitted (a frame with a non-finite pixel, or no
    weighted signal: all zero where the mask weighs) is not fitted: (NaN, NaN, NaN), not
    converged. jwst's fit reports neither, and ends such a pair at its start, (0, 0, 1).
    """
    science = np.asarray(science, dtype=np.float64)
    psfs = np.asarray(psfs)
    if psfs.ndim == 2:
        fitted, converged = fit_shifts(science, psfs[None], mask, batch=batch)
        return fitted[..., 0, :], converged[..., 0]
    if science.ndim == 2:
        fitted, converged = fit_shifts(science[None], psfs, mask, batch=batch)
        return fitted[0], converged[0]
    shape = science.shape[1:]
    weights = _Weights(np.ones(shape) if mask is None else np.asarray(mask, dtype=np.float64))
    if batch is None:
        batch = fit_batch(weights.weight.size)
    references, energies = weights.references(psfs, batch)
    out = np.empty((len(science), len(psfs), 3))
    converged = np.zeros((len(science), len(psfs)), dtype=bool)
    for frame, fitted, done in zip(science, out, converged, strict=True):
        problem = _Problem(weights, frame)
        for start in range(0, len(psfs), batch):
            part = slice(start, start + batch)
            fitted[part], done[part] = problem.solve(references[part], energies[part])
        del problem  # before the next frame's is made
    return out, converged


class _Weights:
    """What the fit needs of the weights w (the PSFMASK) alone: the same for every science
    frame and reference. See ``_Problem`` for the sums; ``references`` gives each
    reference's part of them."""

    def __init__(self, weight: np.ndarray) -> None:
        self.shape = ny, nx = weight.shape
        self.weight = weight
        self.weight2 = weight * weight
        self.axes = y, x = [SplitAxis(n) for n in self.shape]
        # FFT(w²)(−q) on the doubled frequencies with q_x ≥ 0, folded and scaled as E's terms
        qy, qx = y.double, x.double[x.double >= 0]
        # the grid on which a science frame's s² is sampled to give Ã∗Ã (``_Problem``), whose
        # rfft2 the terms are scaled for
        self.grid = [fft.next_fast_len(len(axis.double), real=True) for axis in (y, x)]
        self.reflected = fft.fft2(self.weight2)[np.ix_(-qy % ny, -qx % nx)]
        self.reflected *= fold(x.double) * (self.grid[0] * self.grid[1] / float(ny * nx) ** 2)
        # the start looks at integer shifts within START_RADIUS pixels of none (circularly)
        # and at their neighbours: their positions (index order), and the ramps that sum X
        # and E there (a shift by n pixels is none: the positions serve as shifts)
        near = [_near(n) for n in self.shape]
        self.near = [positions for positions, _ in near]
        self.near_index = [index for _, index in near]
        within = [np.isin(np.arange(len(p)), index[0]) for p, index in near]
        self.near_window = within[0][:, None] & within[1][None, :]

        def ramps(q: np.ndarray, n: int, positions: np.ndarray) -> np.ndarray:
            return np.exp(-2j * np.pi * np.outer(positions, q) / n)

        self.near_rows = [ramps(q, ny, self.near[0]) for q in (y.k, y.double)]
        self.near_columns = [ramps(q[q >= 0], nx, self.near[1]).T for q in (x.k, x.double)]

    def references(self, psfs: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Each reference's part of the overlap M (conj FFT(w²psf)(k) on the split
        frequencies with k_x ≥ 0, folded and scaled) and its weighted energy Σ w²psf²;
        computed ``batch`` references at a time (float64 a batch at a time: the block's
        references stay in their own type)."""
        ny, nx = self.shape
        y, x = self.axes
        rows, columns = np.ix_(y.k % ny, x.k[x.k >= 0])
        scale = fold(x.k) / (ny * nx)
        terms = np.empty((len(psfs), y.size, len(scale)), dtype=np.complex128)
        energies = np.empty(len(psfs))
        for start in range(0, len(psfs), batch):
            part = slice(start, start + batch)
            frames = np.asarray(psfs[part], dtype=np.float64)
            weighted = frames * self.weight
            energies[part] = np.einsum("bp,bp->b", *[weighted.reshape(len(frames), -1)] * 2)
            weighted *= self.weight
            del frames
            spectra = fft.rfft2(weighted, overwrite_x=True)
            del weighted
            np.conjugate(spectra[:, rows, columns], out=terms[part])
            terms[part] *= scale
        return terms, energies


class _Problem:
    """The fit of many references to one science frame: its terms computed once, reused.

    The cost ‖w·(psf − β·s)‖², with s the science frame shifted by d = (dx, dy), is
    P − 2β·X(d) + β²·E(d): P = Σ w²psf², X(d) = Σ w²·psf·s and E(d) = Σ w²·s². Both X and
    E are sums of phase ramps exp(−2πi q·d) over frequencies, so that they and their
    derivatives in d cost no FFT per evaluation, only products with ramps that separate
    along y and x (matrix products):

    - s = ifft of Ã·ramp over the frequencies −N//2…N//2 of each axis, Ã the science
      frame's spectrum with the bins that jwst's real part of a complex shift splits
      (Nyquist rows and columns, N even) shared half-and-half between ±N/2;
    - E(d) = Σ_q H(q)·ramp(q) over −2·(N//2)…2·(N//2), H = (Ã∗Ã)(q)·FFT(w²)(−q) / N²
      (Ã∗Ã, a linear autoconvolution, is the spectrum of s², once per science frame);
    - X(d) = Σ_k M(k)·ramp(k), M = Ã(k)·FFT(w²psf)(−k) / N (one per pair).

    Terms at −q are the conjugates of those at q: only q_x ≥ 0 is kept, counted twice.
    """

    def __init__(self, weights: _Weights, science: np.ndarray) -> None:
        self.weights = weights
        self.shape = weights.shape
        # a frame with a non-finite pixel, or none of its signal where the mask weighs,
        # cannot be fitted (``fit_shifts``)
        self.fittable = bool(np.isfinite(science).all()) and bool(
            np.einsum("yx,yx->", weights.weight2, science * science) > 0
        )
        if not self.fittable:  # no terms: ``solve`` fits nothing to it
            return
        y, x = weights.axes
        self.tilde = split_spectrum(fft.rfft2(science), y, x)  # (ky, kx ≥ 0)
        # Ã∗Ã as the spectrum of s², s sampled on a grid fine enough that s² does not alias
        grid = weights.grid
        padded = np.zeros((grid[0], grid[1] // 2 + 1), dtype=np.complex128)
        padded[y.k % grid[0], : self.tilde.shape[1]] = self.tilde
        square = fft.irfft2(padded, s=grid, overwrite_x=True)
        del padded
        square *= square
        terms = fft.rfft2(square)[y.double % grid[0], : weights.reflected.shape[1]]
        del square
        terms *= weights.reflected
        self.energy_terms = stacked(terms)
        del terms
        # E at the start's shifts
        rows, columns = weights.near_rows[1], weights.near_columns[1]
        self.near_energy = real_product(rows, self.energy_terms, columns)

    def start(self, overlaps: np.ndarray) -> np.ndarray:
        """(dx, dy, β) at the best integer shift, refined to the peak of a quadratic in the
        logarithm of the gain through it and its eight neighbours.

        At an integer shift d the best β is X(d)/E(d), X the weighted cross-correlation
        and E the model's weighted energy, and the cost falls by X(d)²/E(d): its peak, not
        that of X alone (which a masked core biases), marks the start. X and E are summed
        at the few shifts the start looks at (``_Weights.near``), X a matrix product per
        reference (the same for any batch).
        """
        ny, nx = self.shape
        w = self.weights
        rows, columns = w.near_rows[0], w.near_columns[0]
        xcorr = real_product(rows[None], overlaps, columns[None])
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where((xcorr > 0) & (self.near_energy > 0), xcorr**2 / self.near_energy, 0.0)
        gain *= w.near_window  # 0 beyond START_RADIUS, for the parabola too
        (ys, y_minus, y_plus), (xs, x_minus, x_plus) = w.near_index
        n = len(overlaps)
        inside = gain[:, ys][:, :, xs]  # the shifts within START_RADIUS, in index order
        flat = np.argmax(inside.reshape(n, -1), axis=1)
        jy, jx = ys[flat // len(xs)], xs[flat % len(xs)]  # positions in the near shifts
        rows = np.arange(n)
        # log(gain) at the peak and its 8 neighbours: a quadratic through them (a Gaussian
        # through the gain) puts the peak within a few hundredths of a pixel
        ym, yp, xm, xp = y_minus[jy], y_plus[jy], x_minus[jx], x_plus[jx]
        around = np.stack(
            [gain[rows, a, b] for a in (ym, jy, yp) for b in (xm, jx, xp)], axis=1
        ).reshape(n, 3, 3)
        with np.errstate(divide="ignore", invalid="ignore"):  # where a gain is 0: not good
            logs = np.log(around)
            gy = 0.5 * (logs[:, 2, 1] - logs[:, 0, 1])
            gx = 0.5 * (logs[:, 1, 2] - logs[:, 1, 0])
            hyy = logs[:, 2, 1] - 2 * logs[:, 1, 1] + logs[:, 0, 1]
            hxx = logs[:, 1, 2] - 2 * logs[:, 1, 1] + logs[:, 1, 0]
            hxy = 0.25 * (logs[:, 2, 2] - logs[:, 2, 0] - logs[:, 0, 2] + logs[:, 0, 0])
            det = hxx * hyy - hxy**2
            fy = -(hxx * gy - hxy * gx) / det
            fx = -(hyy * gx - hxy * gy) / det
        good = np.all(around > 0, axis=(1, 2)) & (hxx < 0) & (det > 0)
        good &= (np.abs(fx) < 1) & (np.abs(fy) < 1)

        def vertex(minus: np.ndarray, centre: np.ndarray, plus: np.ndarray) -> np.ndarray:
            """Elsewhere (a gain of 0 around: the window's edge, a noisy frame), a parabola
            through the gain itself along each axis."""
            curvature = minus - 2 * centre + plus
            with np.errstate(divide="ignore", invalid="ignore"):
                offset = 0.5 * (minus - plus) / curvature
            return np.where((curvature < 0) & (np.abs(offset) < 1), offset, 0.0)

        fy = np.where(good, fy, vertex(*around[:, :, 1].T))
        fx = np.where(good, fx, vertex(*around[:, 1, :].T))
        energy = self.near_energy[jy, jx]
        beta = np.divide(xcorr[rows, jy, jx], energy, out=np.ones(n), where=energy > 0)
        iy, ix = w.near[0][jy], w.near[1][jx]
        dy = np.where(iy > ny // 2, iy - ny, iy) + fy
        dx = np.where(ix > nx // 2, ix - nx, ix) + fx
        return np.stack([dx, dy, beta], axis=1)

    def evaluate(
        self, params: np.ndarray, overlaps: np.ndarray, energies: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cost ‖r‖², its gradient Jᵀr and its exact Hessian JᵀJ + Σ r·∇²r (half the
        cost's: the Newton step is the same) at ``params`` (b, 3), for references given by
        their ``overlaps`` M (b, ky, 2·kx: ``stacked``) and ``energies`` P = Σ w²psf²
        (b,). The exact Hessian buys the quadratic convergence that noisy frames deny
        Gauss-Newton."""
        dx, dy, beta = params.T
        rows, columns = self._ramps(dx, dy)
        energy = self._ramp_sums(self.energy_terms[None], rows, columns)
        single = self.tilde.shape  # X's frequencies: the middle rows, the first columns
        middle = slice((rows.shape[-1] - single[0]) // 2, (rows.shape[-1] + single[0]) // 2)
        overlap = self._ramp_sums(overlaps, rows[..., middle], columns[:, : single[1]])

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

    def _ramps(self, dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The phase ramps exp(−2πi(q_y·dy/ny + q_x·dx/nx)) of shifts (dx, dy) (b,) and their
        first and second derivatives, separated: rows (b, 3, q_y) and columns (b, q_x, 3)
        over the doubled frequencies (q_x ≥ 0: the terms are folded onto them). X's are
        among them (the middle rows, the first columns): the same numbers, made once."""
        ny, nx = self.shape
        y, x = self.weights.axes
        qx = x.double[x.double >= 0]
        cy, cx = -2j * np.pi * y.double / ny, -2j * np.pi * qx / nx
        rows = phase_ramps(dy, y.double, ny)  # (b, qy)
        rows = np.stack([rows, rows * cy, rows * cy * cy], axis=1)  # (b, 3, qy)
        columns = phase_ramps(dx, qx, nx)
        columns = np.stack([columns, columns * cx, columns * cx * cx], axis=-1)  # (b, qx, 3)
        return rows, columns

    @staticmethod
    def _ramp_sums(terms: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> dict:
        """Σ_q terms(q)·∂ⁱ_y ∂ʲ_x ramp(q) for i + j ≤ 2, real, keyed (i, j): of E (``terms``
        H, one for all) or of X (``terms`` M, one per reference), both ``stacked``, with
        the ramps of ``_ramps`` on their frequencies. The matrix products are one per
        reference, of the same shape whatever the batch (one product of all the references'
        columns is not bit for bit the same for every batch): the fit does not depend on
        the blocks."""
        sums = real_product(rows, terms, columns)  # (b, 3, 3)
        return {(i, j): sums[:, i, j] for i in range(3) for j in range(3) if i + j <= 2}

    def overlaps(self, references: np.ndarray) -> np.ndarray:
        """M (b, ky, 2·kx, ``stacked``) of references given by their part of it
        (``_Weights.references``), one reference's complex product at a time."""
        overlaps = np.empty((*references.shape[:2], 2 * self.tilde.shape[1]))
        for reference, row in zip(references, overlaps, strict=True):
            row[...] = stacked(self.tilde * reference)
        return overlaps

    def solve(self, references: np.ndarray, energies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Damped Newton from the cross-correlation start, for references given by their
        part of M and energies P (``_Weights.references``); each stops on its own. Returns
        (dx, dy, β) (b, 3) and whether each converged (b,) (see ``fit_shifts``).

        A Newton step shorter than ``XTOL`` is taken without evaluating where it lands:
        convergence is quadratic there, so it leaves an error of order XTOL² (1e-6 pixel).
        """
        fittable = np.isfinite(energies) & (energies > 0) & self.fittable
        params = np.full((len(energies), 3), np.nan)
        converged = np.zeros(len(energies), dtype=bool)
        if fittable.all():  # as is: no copy of the references' terms
            params[:], converged[:] = self._newton(references, energies)
        elif fittable.any():
            chosen = np.flatnonzero(fittable)
            params[chosen], converged[chosen] = self._newton(references[chosen], energies[chosen])
        return params, converged & np.isfinite(params).all(axis=1)

    def _newton(self, references: np.ndarray, energies: np.ndarray) -> tuple[np.ndarray, ...]:
        """``solve``'s iteration, for references that can be fitted."""
        overlaps = self.overlaps(references)
        params = self.start(overlaps)
        cost, gradient, hessian = self.evaluate(params, overlaps, energies)
        damping = np.full(len(params), 1e-6)
        active = np.ones(len(params), dtype=bool)
        converged = np.zeros(len(params), dtype=bool)
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
            converged[idx[small]] = True
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
            settled = better & small_gain
            converged[idx[settled]] = True
            active[idx[settled | (damping[idx] > MAX_DAMPING)]] = False
        return params, converged


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
