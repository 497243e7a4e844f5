"""The shift fit against jwst's align_fourier_lsq fed float64, and against injected truth."""

import numpy as np
import pytest
from jwst.coron.imageregistration import align_fourier_lsq, shift_subtract

from coron_dask.kernels import fit_shifts, fourier_shift


def cost(params, science, psf, mask):
    residual = shift_subtract(params, science, psf, mask)
    return float(residual @ residual)


def gaussian(shape, x0, y0, amplitude=1.0, sigma=3.0):
    y, x = np.indices(shape)
    core = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))
    halo = 0.2 * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * (4 * sigma) ** 2))
    return amplitude * (core + halo)


def test_jwst_truth_values():
    """jwst's test: a 3×5 ramp with perturbations, two pixels masked."""
    psf = np.arange(15, dtype=np.float64).reshape(3, 5)
    science = psf + 0.1
    science[1, 0] -= 0.2
    science[2, 0] += 2.3
    mask = np.ones_like(psf)
    mask[1, 1] = mask[1, 2] = 0
    truth = [-0.0899215, -0.01831958, 0.96733475]
    np.testing.assert_allclose(fit_shifts(science, psf, mask)[0], truth, atol=1e-6)
    np.testing.assert_allclose(align_fourier_lsq(science, psf, mask), truth, atol=1e-6)


def test_recovers_injected_shift_and_scale():
    shape = (64, 64)
    science = gaussian(shape, 32.0, 32.0)
    psf = 0.8 * fourier_shift(science, np.array([1.5, -0.75]))
    np.testing.assert_allclose(fit_shifts(science, psf)[0], [1.5, -0.75, 0.8], atol=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_reaches_jwst_optimum_on_noisy_masked_frames(seed):
    """Same minimum as jwst fed float64: cost no higher, shifts within its convergence."""
    rng = np.random.default_rng(seed)
    shape = (48, 56)
    science = gaussian(shape, 28.0, 24.0) + rng.normal(0, 0.01, shape)
    mask = np.ones(shape)
    mask[18:30, 22:34] = 0  # the occulter
    mask[:3], mask[:, :3] = 0, 0
    true = rng.uniform(-2, 2, 2)
    psfs = np.stack(
        [
            1.6 * gaussian(shape, 28.0 + true[0] + d, 24.0 + true[1] - d)
            + rng.normal(0, 0.01, shape)
            for d in (0.0, 0.3, -0.4)
        ]
    )
    ours, converged = fit_shifts(science, psfs, mask)
    assert converged.all()
    for psf, fitted in zip(psfs, ours, strict=True):
        theirs = align_fourier_lsq(science, psf, mask)
        assert cost(fitted, science, psf, mask) <= cost(theirs, science, psf, mask) * (1 + 1e-9)
        np.testing.assert_allclose(fitted, theirs, atol=2e-4)


def test_float32_input_is_fitted_in_float64():
    """jwst 3.0.0 under numpy 2 stalls on float32 input; the kernel must not."""
    shape = (64, 64)
    science = gaussian(shape, 32.0, 32.0).astype(np.float32)
    psf = fourier_shift(science, np.array([1.0, 0.5])).astype(np.float32)
    np.testing.assert_allclose(fit_shifts(science, psf)[0][:2], [1.0, 0.5], atol=1e-5)


def test_batches_do_not_change_results():
    rng = np.random.default_rng(9)
    shape = (32, 32)
    science = gaussian(shape, 16.0, 16.0) + rng.normal(0, 0.01, shape)
    psfs = np.stack(
        [gaussian(shape, 16 + rng.uniform(-1, 1), 16 + rng.uniform(-1, 1)) for _ in range(7)]
    )
    # bit for bit: products must not depend on how references are blocked
    np.testing.assert_array_equal(
        fit_shifts(science, psfs, batch=2)[0], fit_shifts(science, psfs, batch=16)[0]
    )
    np.testing.assert_array_equal(
        fit_shifts(science, psfs, batch=3)[0][4:], fit_shifts(science, psfs[4:])[0]
    )
    # nor on which science frames are fitted together (the references' terms are shared)
    other = gaussian(shape, 15.0, 17.0) + rng.normal(0, 0.01, shape)
    np.testing.assert_array_equal(
        fit_shifts(np.stack([other, science]), psfs, batch=3)[0][1], fit_shifts(science, psfs)[0]
    )


@pytest.mark.parametrize("shape", [(48, 56), (47, 56), (48, 45), (3, 5)])
def test_cost_and_derivatives_match_jwst_shifted_residual(shape):
    """The Fourier-domain cost of a Newton step (no FFT per evaluation) is jwst's residual
    ‖shift_subtract‖², with its gradient and Hessian those of finite differences, for even
    sizes (the Nyquist bins jwst's real part splits) and odd ones."""
    from coron_dask.kernels.registration import _Problem, _Weights

    rng = np.random.default_rng(sum(shape))
    science = gaussian(shape, shape[1] / 2 + 0.3, shape[0] / 2 - 0.2) + rng.normal(0, 0.05, shape)
    psf = 1.3 * gaussian(shape, shape[1] / 2 + 0.9, shape[0] / 2 + 0.4) + rng.normal(0, 0.05, shape)
    mask = rng.uniform(0.2, 1.0, shape)
    weights = _Weights(mask)
    problem = _Problem(weights, science)
    references, energies = weights.references(psf[None], batch=1)
    overlaps = problem.overlaps(references)

    def evaluate(params):
        return problem.evaluate(np.array([params]), overlaps, energies)

    params = np.array([0.37, -1.21, 0.9])
    cost_ours, gradient, hessian = evaluate(params)
    assert cost_ours[0] == pytest.approx(cost(params, science, psf, mask), rel=1e-10)
    step = 1e-5
    for i in range(3):
        delta = np.eye(3)[i] * step
        slope = cost(params + delta, science, psf, mask) - cost(params - delta, science, psf, mask)
        assert gradient[0, i] == pytest.approx(slope / (4 * step), rel=1e-5, abs=1e-9)
        curvature = (evaluate(params + delta)[1] - evaluate(params - delta)[1])[0] / (2 * step)
        np.testing.assert_allclose(hessian[0, i], curvature, rtol=1e-5, atol=1e-8)


def test_frames_that_cannot_be_fitted_are_flagged_not_aligned_by_nothing():
    """A reference of zeros, one with a NaN pixel, one whose signal lies only where the
    mask weighs 0, and any reference against a science frame with a NaN: not fitted,
    (NaN, NaN, NaN) and not converged, where jwst's fit ends at its start (0, 0, 1) or at
    β = 0, unflagged. The references beside them are fitted as they are alone."""
    shape = (64, 64)
    science = gaussian(shape, 32.0, 32.0)
    mask = np.ones(shape)
    mask[:, 40:] = 0
    good = 0.8 * fourier_shift(science, np.array([1.5, -0.75]))
    holed = good.copy()
    holed[3, 7] = np.nan
    hidden = np.zeros(shape)
    hidden[:, 50:] = 1.0  # all its signal where the mask weighs 0
    psfs = np.stack([good, np.zeros(shape), holed, hidden, good])
    fitted, converged = fit_shifts(science, psfs, mask)
    np.testing.assert_array_equal(converged, [True, False, False, False, True])
    assert np.isnan(fitted[1:4]).all()
    np.testing.assert_array_equal(fitted[[0, 4]], [fit_shifts(science, good, mask)[0]] * 2)
    np.testing.assert_allclose(fitted[0], [1.5, -0.75, 0.8], atol=1e-6)
    # jwst's: a NaN pixel ends at the start, (0, 0, 1); zeros at β = 0, both unflagged
    np.testing.assert_array_equal(align_fourier_lsq(science, holed, mask), [0, 0, 1])
    np.testing.assert_allclose(align_fourier_lsq(science, np.zeros(shape), mask), 0, atol=1e-9)
    noisy = science.copy()
    noisy[10, 10] = np.inf
    fitted, converged = fit_shifts(noisy, psfs, mask)
    assert not converged.any() and np.isnan(fitted).all()


def test_a_fit_stopped_by_its_limits_has_not_converged(monkeypatch):
    """The iteration's limits are the module's settings: a fit cut off by them (here one
    Newton step from a noisy start; a damping that grew past its bound) has not converged,
    and says so, whatever its parameters."""
    from coron_dask.kernels import registration

    rng = np.random.default_rng(3)
    shape = (48, 48)
    science = gaussian(shape, 24.0, 24.0) + rng.normal(0, 0.02, shape)
    psf = 1.3 * gaussian(shape, 24.6, 23.7) + rng.normal(0, 0.02, shape)
    fitted, converged = fit_shifts(science, psf)
    assert converged
    monkeypatch.setattr(registration, "MAX_ITER", 1)
    cut, converged = fit_shifts(science, psf)
    assert not converged and np.isfinite(cut).all() and not np.array_equal(cut, fitted)
    monkeypatch.setattr(registration, "MAX_ITER", 100)
    monkeypatch.setattr(registration, "MAX_DAMPING", 0.0)
    assert not fit_shifts(science, psf)[1]
