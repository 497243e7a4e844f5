"""KL basis and KLIP subtraction against jwst's karhunen_loeve_transform and klip."""

import numpy as np
import pytest
from jwst.coron import klip as jwst_klip
from stdatamodels.jwst.datamodels import CubeModel

from coron_dask.kernels import KLBasis, kl_basis, klip_error, klip_subtract


def jwst_test_refs():
    """The three 3×5 references of jwst's own klip tests."""
    refs = np.zeros((3, 3, 5))
    refs[:] = np.arange(15).reshape(3, 5)
    for (k, y, x), delta in {
        (0, 1, 1): 0.3,
        (0, 2, 1): 0.7,
        (0, 0, 3): -0.5,
        (0, 1, 2): -1.3,
        (1, 0, 1): 0.7,
        (1, 2, 1): 0.2,
        (1, 2, 3): 0.8,
        (1, 2, 2): -1.8,
        (2, 1, 1): 0.9,
        (2, 2, 2): -0.5,
        (2, 1, 0): 0.8,
        (2, 1, 2): 0.8,
    }.items():
        refs[k, y, x] += delta
    return refs


def test_basis_matches_jwst_truth_eigenvalues():
    refs = jwst_test_refs().reshape(3, -1)
    centred = refs - refs.mean(axis=1, keepdims=True)
    klvect, eigval, _ = jwst_klip.karhunen_loeve_transform(centred, normalize=True)
    np.testing.assert_allclose(eigval, [59.0927, 0.22691, 0.16325], atol=1e-4)
    basis = kl_basis(refs, 50)
    # eigenvectors are defined up to sign
    signs = np.sign(np.sum(basis * klvect, axis=1))
    np.testing.assert_allclose(basis * signs[:, None], klvect, atol=1e-12)


@pytest.mark.parametrize("truncate", [1, 2, 50])
def test_klip_matches_jwst(truncate):
    rng = np.random.default_rng(truncate)
    refs = rng.normal(size=(12, 20, 24)) + 5 * np.exp(-(np.linspace(-2, 2, 24) ** 2))
    targets = refs[:3].mean(axis=0) + rng.normal(0, 0.3, size=(4, 20, 24))
    model = CubeModel(data=targets.astype(np.float32))
    expected = jwst_klip.klip(model, CubeModel(data=refs.astype(np.float32)), truncate, False)
    flat_refs = refs.astype(np.float32).astype(np.float64).reshape(12, -1)
    basis = kl_basis(flat_refs, truncate)
    ours = klip_subtract(targets.astype(np.float32).reshape(4, -1), basis)
    np.testing.assert_allclose(ours.reshape(4, 20, 24), expected.data, atol=2e-5, rtol=1e-5)
    errors = klip_error(flat_refs, truncate).reshape(20, 24)
    for plane in expected.err:
        np.testing.assert_allclose(errors, plane, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("tile", [1, 333, 20000])
def test_tiles_and_float32_give_the_same_basis(tile, monkeypatch):
    """The passes over tiles of pixels, in float32 as dask hands the references over, give
    the basis and ERR of the whole float64 array (one tile)."""
    from coron_dask.kernels import klip

    rng = np.random.default_rng(8)
    refs = (rng.normal(size=(9, 20000)) + 3).astype(np.float32)
    monkeypatch.setattr(klip, "TILE", 20000)
    whole = KLBasis(refs.astype(np.float64), 5)
    monkeypatch.setattr(klip, "TILE", tile)
    tiled = KLBasis(refs, 5)
    signs = np.sign(np.sum(whole.images * tiled.images, axis=1))
    np.testing.assert_allclose(tiled.images * signs[:, None], whole.images, atol=1e-12)
    np.testing.assert_allclose(tiled.error(), whole.error(), rtol=1e-10)


def test_subtracts_what_the_references_span():
    """A target that is a combination of references is removed to rounding."""
    rng = np.random.default_rng(2)
    refs = rng.normal(size=(6, 300))
    target = 2 * refs[0] - refs[3] + 0.5 * refs[5]
    residual = klip_subtract(target[None], kl_basis(refs, 6))
    assert np.abs(residual).max() < 1e-10
    assert kl_basis(refs, 4).shape == (4, 300)
    assert kl_basis(refs, 0).shape == (0, 300)


def test_error_is_zero_once_every_mode_is_kept():
    """With as many KL modes as references, the references are their own projection: ERR
    is 0 (jwst's is rounding noise); with one mode fewer it is the spread of the residuals
    of a least-squares projection on that many KL images."""
    rng = np.random.default_rng(5)
    refs = rng.normal(size=(8, 400)) + np.linspace(0, 3, 400)
    refs[7] = refs[6]  # a mode of zero norm: the span has 7 dimensions, not 8
    assert np.all(klip_error(refs, 8) == 0)
    assert np.all(klip_error(refs, 50) == 0)
    centred = refs - refs.mean(axis=1, keepdims=True)
    for truncate in (3, 6):
        basis = kl_basis(refs, truncate)
        fitted = np.linalg.lstsq(basis.T, centred.T, rcond=None)[0]
        expected = (centred - fitted.T @ basis).std(axis=0)
        np.testing.assert_allclose(klip_error(refs, truncate), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("truncate", [2, 4, 50])
def test_a_reference_of_zeros_is_left_out_of_the_basis(truncate):
    """A flagged reference (a row of zeros once centred: its Gram row and column are 0)
    adds nothing: the projection and the ERR are jwst's on the other references, where
    the eigenvector of the zero block, normalised, would add a unit image of rounding."""
    from coron_dask.kernels.klip import kl_weights, reference_mixes, residual_stds

    rng = np.random.default_rng(truncate)
    refs = rng.normal(size=(6, 20, 24)) + 5 * np.exp(-(np.linspace(-2, 2, 24) ** 2))
    target = refs[:3].mean(axis=0) + rng.normal(0, 0.3, size=(20, 24))
    # jwst's models hold float32: both take the same values
    refs, target = (a.astype(np.float32).astype(np.float64) for a in (refs, target))
    used = np.array([True, True, False, True, True, True])
    model = CubeModel(data=target[None])
    expected = jwst_klip.klip(model, CubeModel(data=refs[used]), truncate, False)
    centred = refs.reshape(6, -1) - refs.reshape(6, -1).mean(axis=1, keepdims=True)
    centred[~used] = 0.0  # as steps.blocks hands a flagged reference over
    count = min(truncate, 6)
    weights = kl_weights(centred @ centred.T, centred.shape[1], count)
    assert not weights[:, ~used].any()
    flat = target.reshape(-1) - target.mean()
    mix = reference_mixes(weights[0], centred @ flat, (count,))[0]
    subtracted = (flat - mix @ centred).reshape(20, 24)
    np.testing.assert_allclose(subtracted, expected.data[0], atol=2e-5, rtol=1e-5)
    images = weights[0].T @ centred
    errors = residual_stds(centred.copy(), images, weights[1], (count,), used)[0]
    np.testing.assert_allclose(errors.reshape(20, 24), expected.err[0], atol=2e-5, rtol=1e-5)
