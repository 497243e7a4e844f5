"""Fourier shifts against jwst's fourier_imshift and its own test's truth values."""

import numpy as np
import pytest
from jwst.coron.imageregistration import fourier_imshift

from coron_dask.kernels import fourier_shift


@pytest.mark.parametrize("shape", [(5, 5), (6, 8), (7, 6), (6, 7), (64, 64), (33, 48)])
@pytest.mark.parametrize("shift", [(1.2, 0.6), (-0.3, 2.7), (0.5, -0.5), (3.0, -1.0)])
def test_matches_jwst(shape, shift):
    image = np.random.default_rng(sum(shape)).normal(size=shape)
    expected = fourier_imshift(image, np.array(shift))
    np.testing.assert_allclose(fourier_shift(image, np.array(shift)), expected, atol=1e-12)


def test_jwst_truth_values():
    image = np.zeros((5, 5))
    image[1:4, 1:4] += 1.0
    image[2, 2] += 2.0
    truth = [
        [-0.11534368, 0.09685412, -0.31489129, 0.07308346, -0.203199],
        [0.17121927, -0.14163561, 0.5043889, 0.06434016, 0.39715385],
        [0.11266705, -0.06854077, 0.75829127, 2.03638809, 1.36342888],
        [0.04314152, -0.00521786, 0.65394254, 2.4800922, 1.46183018],
        [0.22979281, -0.18803098, 0.7125186, 0.25274376, 0.62498253],
    ]
    np.testing.assert_allclose(fourier_shift(image, np.array([1.2, 0.6])), truth, atol=1e-6)


def test_integer_shift_moves_a_delta():
    image = np.zeros((8, 10))
    image[2, 3] = 1.0
    moved = fourier_shift(image, np.array([-3.0, -2.0]))
    assert moved[0, 0] == pytest.approx(1.0)
    assert np.abs(moved).sum() == pytest.approx(1.0)


def test_batched_shifts_match_one_by_one():
    rng = np.random.default_rng(3)
    images = rng.normal(size=(4, 16, 18))
    shifts = rng.uniform(-2, 2, size=(4, 2))
    batched = fourier_shift(images, shifts)
    for image, shift, result in zip(images, shifts, batched, strict=True):
        np.testing.assert_allclose(result, fourier_imshift(image, shift), atol=1e-12)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="does not match"):
        fourier_shift(np.zeros((3, 4, 4)), np.zeros((2, 2)))
