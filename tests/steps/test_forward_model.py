"""The KL images on windows (``steps.forward_model.kl_windows``) from references handed over
as blocks (in pieces along the reference axis): the forward model made of them is what
``steps.klip.subtract`` makes of a companion (the science with it minus without), in
zones, a basis per integration or one for all, a flagged reference left out; windows
reaching past the frame's edge are NaN there."""

import dask
import numpy as np
import pytest

from coron_dask.kernels.forward_model import forward_model
from coron_dask.kernels.inject import companion_image
from coron_dask.steps.forward_model import kl_windows, window_labels, zone_sizes
from coron_dask.steps.klip import kl_basis, subtract
from coron_dask.steps.klip_parameters import klip_zones
from tests.steps.test_klip_zones import CUTOFFS, ROWS, SHAPE, STAR, datasets

PLACE = (STAR[0] + 6.3, STAR[1] - 4.6)


@pytest.fixture(scope="module")
def data():
    """Targets (3, y, x) and references aligned to each (3, 10, y, x), float32: a halo,
    speckles of their own, noise."""
    rng = np.random.default_rng(27)
    y, x = np.indices(SHAPE, dtype=np.float64)
    r, angle = np.hypot(x - STAR[0], y - STAR[1]), np.arctan2(y - STAR[1], x - STAR[0])

    def frames(count: int) -> np.ndarray:
        out = [
            100 * np.exp(-r / 4) * rng.uniform(0.9, 1.1)
            + sum(
                a * np.cos((i + 1) * angle + r / (i + 2)) for i, a in enumerate(rng.normal(0, 1, 6))
            )
            + rng.normal(0, 0.3, SHAPE)
            for _ in range(count)
        ]
        return np.array(out, np.float32)

    return frames(3), np.stack([frames(10) for _ in range(3)])


def gaussian_box(half: int, sigma: float = 1.5) -> np.ndarray:
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    return 20 * np.exp(-0.5 * (x**2 + y**2) / sigma**2)


@pytest.mark.parametrize("shared", [False, True], ids=["each", "first"])
def test_windows_of_blocks_make_klips_companion(shared, data):
    targets, refs = data
    refs = refs.copy()
    refs[1, 3] = np.nan  # a reference whose alignment failed, for integration 2
    zones = klip_zones(SHAPE, STAR, annuli=3, subsections=2, annuli_spacing="constant", iwa=2.0)
    companion = companion_image(SHAPE, np.array([PLACE]), [1.0], gaussian_box(5)).astype(np.float32)
    science, psfalign = datasets(targets, refs[0] if shared else refs)
    with_it, _ = datasets(targets + companion, refs[0] if shared else refs)
    corners, shape = np.array([[PLACE[1] - 8, PLACE[0] - 8], [-5, 30]]).astype(int), (17, 17)
    with dask.config.set(scheduler="synchronous"):
        basis = kl_basis(science, psfalign, CUTOFFS, rows=ROWS, zones=zones)
        images = kl_windows(basis, corners, shape).compute()
        difference = (
            subtract(with_it, basis)["sci"].values.astype(np.float64)
            - subtract(science, basis)["sci"].values
        )
    assert images.shape == (2, len(targets), CUTOFFS[-1], *shape)
    labels = window_labels(zones, SHAPE, corners, shape)
    y0, x0 = corners[0]
    window = (slice(y0, y0 + shape[0]), slice(x0, x0 + shape[1]))
    for c, k in enumerate(CUTOFFS):
        model = forward_model(companion[window], images[0], labels[0], zone_sizes(zones, SHAPE), k)
        expected = difference[c][:, window[0], window[1]]
        assert (np.isnan(model) == np.isnan(expected)).all()
        assert np.nanmax(np.abs(model - expected)) < 1e-6 * np.nanmax(np.abs(model))
    # the second window starts 5 rows above the frame: NaN there, its labels −1
    assert np.isnan(images[1][:, :, :5]).all() and (labels[1][:5] == -1).all()
    inside = labels[1] >= 0
    assert np.isfinite(images[1][:, :, inside]).all()
