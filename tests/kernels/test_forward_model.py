"""The exact RDI forward model on numpy alone: what pyKLIP's klip_math makes of a companion
(the target with it minus the target without, on the same references) in each zone, the
integration-mean operator against the model made pixel by pixel, and the
companion images against the injection kernel's."""

import numpy as np
import pytest

from coron_dask.kernels.forward_model import forward_model, mean_operator, placed_psfs
from coron_dask.kernels.inject import companion_image
from coron_dask.kernels.klip import frame_means, gram, kl_weights
from coron_dask.kernels.zones import zone_map
from tests.pyklip_reference import pyklip_zone

FRAME = (40, 44)
STAR = (21.3, 19.6)


def gaussian_box(half: int, sigma: float = 1.6) -> np.ndarray:
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    return np.exp(-0.5 * (x**2 + y**2) / sigma**2)


def speckles(rng, count: int) -> np.ndarray:
    """``count`` frames of a shared pattern plus their own: references and a target."""
    y, x = np.indices(FRAME, dtype=np.float64)
    radius = np.hypot(x - STAR[0], y - STAR[1])
    pattern = 100 * np.exp(-radius / 6) * (1 + 0.3 * np.cos(3 * np.arctan2(y, x)))
    return np.stack(
        [pattern * rng.uniform(0.8, 1.2) + rng.normal(0, 1, FRAME) for _ in range(count)]
    )


def kl_images_of(
    refs: np.ndarray, labels: np.ndarray, truncate: int
) -> tuple[np.ndarray, np.ndarray]:
    """Our KL images (K, y, x) of ``refs`` (p, y, x), zone by zone (each reference minus its
    zone mean: ``kernels.klip`` on the zone's pixels), NaN in no zone; the zones' sizes."""
    count = int(labels.max()) + 1
    images = np.full((truncate, *FRAME), np.nan)
    sizes = np.bincount(labels[labels >= 0], minlength=count)
    for z in range(count):
        inside = labels == z
        zone = refs[:, inside]
        means = frame_means(zone)
        weights = kl_weights(gram(zone, means), inside.sum(), truncate)
        images[:, inside] = weights[0].T @ (zone - means[:, None])
    return images, sizes


@pytest.mark.parametrize("zoning", [(1, 1, 0.0), (3, 4, 3.0)], ids=["frame", "annuli"])
@pytest.mark.parametrize("cutoffs", [(1, 3), (2, 7)])
def test_forward_model_is_pyklips_klip_of_the_companion(zoning, cutoffs):
    """klip_math(target + c) − klip_math(target) is F(c) in every zone a companion falls
    across (it sits on an annulus' edge), to rounding; every pixel of the window."""
    rng = np.random.default_rng(len(cutoffs) + zoning[0])
    frames = speckles(rng, 10)
    refs, target = frames[:9], frames[9]
    annuli, subsections, iwa = zoning
    labels = zone_map(FRAME, STAR, annuli, subsections, iwa=iwa, owa=19.0).labels.astype(int)
    if annuli == 1:
        labels = np.zeros(FRAME, int)
    images, sizes = kl_images_of(refs, labels, cutoffs[-1])
    companion = companion_image(
        FRAME, np.array([[STAR[0] + 7.4, STAR[1] + 2.2]]), [50.0], gaussian_box(5)
    )
    corner, shape = (10, 22), (22, 18)  # holds the companion's whole box
    window = (slice(corner[0], corner[0] + shape[0]), slice(corner[1], corner[1] + shape[1]))
    assert np.isclose(companion[window].sum(), companion.sum())
    zones_hit = np.unique(labels[window][companion[window] > 1e-3])
    assert len(zones_hit) >= 2 or annuli == 1
    for k in cutoffs:
        ours = forward_model(
            companion[window], images[None, :, window[0], window[1]], labels[window], sizes, k
        )[0]
        for z in np.unique(labels[window][labels[window] >= 0]):
            inside = labels == z
            theirs = (
                pyklip_zone(target + companion, refs, labels, z, [k])[0][0]
                - pyklip_zone(target, refs, labels, z, [k])[0][0]
            )
            expected = np.full(FRAME, np.nan)
            expected[inside] = theirs
            here = labels[window] == z
            np.testing.assert_allclose(ours[here], expected[window][here], rtol=0, atol=1e-9 * 50)
        assert np.isnan(ours[labels[window] < 0]).all()


def test_mean_operator_is_the_model_pixel_by_pixel():
    rng = np.random.default_rng(3)
    m, count, shape = 4, 6, (15, 17)
    images = rng.normal(size=(m, count, *shape))
    labels = np.zeros(shape, int)
    labels[:, 9:] = 1
    labels[0, 0] = -1
    sizes = np.array([400, 300])
    stamp = np.flatnonzero((labels.ravel() >= 0) & (rng.random(labels.size) < 0.3))
    companions = rng.normal(size=(5, *shape))
    operator = mean_operator(images, labels, sizes, stamp, 4)
    expected = forward_model(companions, images, labels, sizes, 4).mean(axis=1)
    np.testing.assert_allclose(
        companions.reshape(5, -1) @ operator.T, expected.reshape(5, -1)[:, stamp], atol=1e-12
    )


def test_placed_psfs_are_the_injection_kernels_companions():
    psf = gaussian_box(6) * (1 + 0.1 * np.arange(13)[None, :])  # asymmetric
    places = np.array([[10.3, 11.6], [9.5, 12.49], [2.2, 3.7], [19.8, 1.1]])  # the last two cut
    ours = placed_psfs(np.fft.rfft2(psf), psf.shape, (24, 22), places)
    for image, place in zip(ours, places, strict=True):
        expected = companion_image((24, 22), place[None], [1.0], psf)
        np.testing.assert_allclose(image, expected, atol=1e-14)
