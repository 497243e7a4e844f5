"""Companions placed by the injection kernel: where asked, with the flux asked."""

import numpy as np

from coron_dask.kernels.inject import companion_image, inject_block


def gaussian_box(half: int, sigma: float = 1.5) -> np.ndarray:
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    return np.exp(-0.5 * (x**2 + y**2) / sigma**2)


def centroid(image: np.ndarray) -> tuple[float, float]:
    yy, xx = np.indices(image.shape)
    return float((xx * image).sum() / image.sum()), float((yy * image).sum() / image.sum())


def test_companions_land_where_asked_with_the_flux_asked():
    psf = gaussian_box(12)
    positions = np.array([[20.3, 31.7], [45.5, 12.49], [33.0, 40.0]])
    fluxes = np.array([2.0, 0.5, 1.0])
    for (x, y), flux in zip(positions, fluxes, strict=True):
        image = companion_image((60, 70), np.array([[x, y]]), np.array([flux]), psf)
        assert abs(image.sum() - flux * psf.sum()) < 1e-9 * psf.sum()
        cx, cy = centroid(image)
        assert abs(cx - x) < 1e-3 and abs(cy - y) < 1e-3, (cx, cy, x, y)
    together = companion_image((60, 70), positions, fluxes, psf)
    assert np.isclose(together.sum(), (fluxes * psf.sum()).sum())


def test_a_companion_over_the_edge_keeps_what_falls_inside():
    psf = gaussian_box(12)
    image = companion_image((30, 30), np.array([[1.0, 15.0]]), np.array([1.0]), psf)
    # the pixels' edges start 1.5 px (one σ) left of its centre: 84 % is inside
    assert 0.82 * psf.sum() < image.sum() < 0.86 * psf.sum()


def test_injected_frames_keep_their_missing_pixels():
    sci = np.ones((3, 20, 20), np.float32)
    sci[1, 10, 10] = np.nan
    psf = gaussian_box(4)
    out = inject_block(sci, np.array([[10.0, 10.0]]), np.array([1.0]), psf, alone=False)
    assert np.isnan(out[1, 10, 10]) and np.isfinite(out[0]).all()
    assert np.isclose((out[0] - 1).sum(), psf.sum(), rtol=1e-6)
    alone = inject_block(sci, np.array([[10.0, 10.0]]), np.array([1.0]), psf, alone=True)
    assert alone.dtype == np.float32 and np.isfinite(alone).all()
    np.testing.assert_allclose(alone[1], out[0] - 1, atol=1e-6)
