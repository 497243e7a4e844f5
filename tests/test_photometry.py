"""Detection statistics (coron_dask.science.photometry) against independent references: pyKLIP's
contrast curve, a direct per-pixel S/N map, the exact t distribution of white noise, and
astropy's sky geometry."""

import warnings

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS
from scipy import ndimage, stats

from coron_dask.science.photometry import (
    find_candidates,
    gaussian_significance,
    noise_profile,
    snr_map,
)

FPF5 = stats.norm.sf(5)


def radii(shape, star):
    yy, xx = np.indices(shape)
    return np.hypot(xx - star[0], yy - star[1])


def gaussian(shape, x0, y0, peak, fwhm):
    yy, xx = np.indices(shape)
    s = fwhm / (2 * np.sqrt(2 * np.log(2)))
    return peak * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s))


def speckle_image(seed, size=201, resolution=2.0, star=(100.0, 100.0)):
    """White noise plus resolution-sized correlated noise and a halo, both fading outwards."""
    rng = np.random.default_rng(seed)
    r = radii((size, size), star)
    speckles = ndimage.gaussian_filter(rng.normal(size=(size, size)), resolution / 2.355)
    speckles /= speckles.std()
    return (
        rng.normal(size=(size, size)) + speckles * (1 + 20 * np.exp(-r / 15)) + 3 * np.exp(-r / 10)
    )


# -- 1. the contrast curve against pyKLIP ------------------------------------------------------


def pyklip_contrast(image, resolution, star):
    import pyklip.klip as klip  # the test extra installs it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its empty annuli (nanmean of nothing)
        return klip.meas_contrast(image, 1, 95, resolution, center=star, low_pass_filter=False)


def t_factor(n):
    """t.ppf(1 − FPF, n − 1) · sqrt(1 + 1/n): the threshold in units of σ above μ."""
    n = np.asarray(n, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n >= 2, stats.t.ppf(1 - FPF5, n - 1) * np.sqrt(1 + 1 / n), np.nan)


@pytest.mark.parametrize("case", ["clean", "nans"])
def test_noise_profile_against_pyklip(case):
    """Same annuli, mean and std as pyKLIP; thresholds within 10 % except where the two counts
    of resolution elements (Mawet's 2πs/w, pyKLIP's good pixels / (π w²/4)) make the t factor
    differ by more, and there the difference is the one the two counts predict."""
    resolution = 2.0
    star = (100.0, 100.0) if case == "clean" else (99.6, 100.3)
    image = speckle_image(0)
    if case == "nans":
        image[radii(image.shape, star) < 5] = np.nan  # a coronagraph mask
        image[np.random.default_rng(5).random(image.shape) < 0.1] = np.nan  # bad pixels
    seps, theirs = pyklip_contrast(image, resolution, star)
    ours = noise_profile(image, star, resolution, seps)
    np.testing.assert_array_equal(ours.separation, seps)

    # pyKLIP's own count, from the good pixels of the annulus (the same pixels as ours)
    n_pyklip = np.floor(ours.npix / (np.pi * (resolution / 2) ** 2))
    np.testing.assert_array_equal(ours.n, np.floor(2 * np.pi * seps / resolution))
    # both undefined at the same separations (empty annuli or too few elements)
    defined = np.isfinite(ours.threshold) & (n_pyklip >= 2)
    np.testing.assert_array_equal(np.isfinite(theirs), defined)
    assert defined.sum() >= 90

    # pyKLIP is our μ and σ with its own n: annulus, mean and std agree (FPF is rounded there)
    predicted = ours.mean + t_factor(n_pyklip) * ours.std
    np.testing.assert_allclose(theirs[defined], predicted[defined], rtol=1e-4)
    np.testing.assert_allclose(
        ours.threshold[defined], (ours.mean + t_factor(ours.n) * ours.std)[defined], rtol=1e-9
    )

    relative = ours.threshold[defined] / theirs[defined] - 1
    differ = np.abs(t_factor(ours.n) / t_factor(n_pyklip) - 1)[defined] > 0.10
    s = seps[defined]
    # the n definitions matter only close in: a few separations within 5 λ/D
    assert differ.sum() <= 3 and (s[differ] < 5 * resolution).all(), s[differ]
    assert np.abs(relative[~differ]).max() < 0.10, np.abs(relative[~differ]).max()
    # far out, where both counts are large, they converge
    assert np.abs(relative[s > 50]).max() < 0.02
    # where they differ, they differ by what the counts predict
    expected = (ours.mean + t_factor(ours.n) * ours.std) / predicted - 1
    np.testing.assert_allclose(relative[differ], expected[defined][differ], atol=1e-4)
    assert (np.abs(relative[differ]) > 0.10).all()


def test_noise_profile_undefined_where_too_few():
    image = np.random.default_rng(0).normal(size=(41, 41))
    prof = noise_profile(image, (20, 20), 2.0, [0.1, 0.5, 1.0, 5.0, 40.0])
    # n = floor(2πs/w): 0, 1, 3, 15, 125; at 40 px the annulus is off the image
    np.testing.assert_array_equal(prof.n, [0, 1, 3, 15, 125])
    np.testing.assert_array_equal(np.isfinite(prof.threshold), [False, False, True, True, False])
    assert prof.npix[-1] == 0
    # a higher significance, a higher threshold
    assert noise_profile(image, (20, 20), 2.0, [5.0], 6.0).threshold[0] > prof.threshold[3]


# -- 2. calibration on noise, and a source at the threshold ------------------------------------


def test_snr_map_calibrated_on_white_noise():
    """On Gaussian white noise each pixel's (v − μ)/σ is exactly Student-t over its annulus
    pixels, so how many exceed 3σ in significance is known; none should reach 5σ."""
    resolution, star, size = 2.0, (150.0, 150.0), 301
    r = radii((size, size), star)
    sorted_r = np.sort(r.ravel())
    half = resolution / 2
    ring = (
        np.searchsorted(sorted_r, r + half, side="left")
        - np.searchsorted(sorted_r, r - half, side="right")
        - 5  # the pixel and its own element's neighbours on the ring, ~5 for w = 2
    )
    n2 = np.floor(2 * np.pi * r / resolution) - 1
    use = r >= 10
    with np.errstate(divide="ignore", invalid="ignore"):
        # significance > 3 ⟺ S/N > t.isf(norm.sf(3), n2 − 1); S/N·sqrt(1+1/n2)·... ~ t(ring − 1)
        critical = stats.t.isf(stats.norm.sf(3), n2 - 1) * np.sqrt((1 + 1 / n2) / (1 + 1 / ring))
        chance = stats.t.sf(critical, ring - 1)
    observed = expected = 0.0
    for seed in range(3):
        image = np.random.default_rng(seed).normal(size=(size, size))
        _, significance = snr_map(image, star, resolution)
        assert np.isfinite(significance[use]).all()
        observed += (significance[use] > 3).sum()
        expected += chance[use].sum()
        assert np.nanmax(significance) < 5
        # and on speckle-like noise, correlated over a resolution element
        _, significance = snr_map(ndimage.gaussian_filter(image, resolution / 2.355), star, 2.0)
        assert np.nanmax(significance) < 5
    assert abs(observed - expected) < 4 * np.sqrt(expected), (observed, expected)
    # Mawet's t is conservative for white noise: below the Gaussian 3σ rate
    assert expected < stats.norm.sf(3) * 3 * use.sum()


@pytest.mark.parametrize(
    "separation, offsets",
    [
        (25, [(25, 0), (0, 25), (-7, 24), (15, -20), (-20, -15), (24, 7)]),
        (5, [(5, 0), (0, -5), (3, 4), (-4, 3), (-3, -4), (4, -3)]),
    ],
)
def test_source_at_threshold_has_significance_five(separation, offsets):
    """A point source of FWHM w whose peak sits at noise_profile's 5σ threshold is a 5σ
    detection in snr_map: exactly when its peak pixel is at the threshold, on average when its
    amplitude is the threshold above the mean (the noise then moves it by ~1)."""
    resolution, star, size = 2.0, (150, 150), 301
    exact, average = [], []
    for seed, (dx, dy) in enumerate(offsets):
        image = np.random.default_rng(100 + seed).normal(size=(size, size))
        prof = noise_profile(image, star, resolution, [separation])
        x0, y0 = star[0] + dx, star[1] + dy
        tau, mu = prof.threshold[0], prof.mean[0]
        for peak, out in ((tau - image[y0, x0], exact), (tau - mu, average)):
            source = gaussian(image.shape, x0, y0, peak, resolution)
            out.append(snr_map(image + source, star, resolution)[1][y0, x0])
    assert np.all(np.abs(np.array(exact) - 5) < 0.5), exact
    assert abs(np.mean(average) - 5) < 1, average
    assert np.all(np.abs(np.array(average) - 5) < 2.5), average


# -- 3. the fast map against a direct one -------------------------------------------------------


def reference_significance(t, dof):
    """norm.isf(t.sf(t)); for t < 0 the same through the lower tail, where sf rounds to 1."""
    if t >= 0:
        return stats.norm.isf(stats.t.sf(t, dof))
    return stats.norm.ppf(stats.t.cdf(t, dof))


def direct_snr_map(image, star, resolution):
    """Pixel by pixel, straight from the definition."""
    r = radii(image.shape, star)
    yy, xx = np.indices(image.shape)
    good = np.isfinite(image)
    snr = np.full(image.shape, np.nan)
    significance = np.full(image.shape, np.nan)
    for y, x in zip(*np.nonzero(good), strict=True):
        n2 = np.floor(2 * np.pi * r[y, x] / resolution) - 1
        ring = (
            good
            & (r > r[y, x] - resolution / 2)
            & (r < r[y, x] + resolution / 2)
            & (np.hypot(xx - x, yy - y) >= resolution)
        )
        if n2 < 2 or ring.sum() < 2:
            continue
        values = image[ring]
        t = (image[y, x] - values.mean()) / (values.std(ddof=1) * np.sqrt(1 + 1 / n2))
        snr[y, x] = t
        significance[y, x] = reference_significance(t, n2 - 1)
    return snr, significance


@pytest.mark.parametrize(
    "star, resolution",
    [((12.3, 10.7), 2.5), ((13.0, 11.0), 2.0), ((3.2, 20.9), 3.7), ((30.0, -4.0), 1.5)],
)
def test_snr_map_equals_direct(star, resolution):
    """Integer star and w make pixels sit exactly on annulus edges; an off-centre and an
    off-image star give lopsided annuli."""
    rng = np.random.default_rng(1)
    image = rng.normal(size=(23, 27)) + 4
    image[rng.random(image.shape) < 0.1] = np.nan
    image[5, 5] = 300.0  # a bright pixel in some annuli
    fast = snr_map(image, star, resolution)
    slow = direct_snr_map(image, star, resolution)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        assert np.isfinite(a).sum() > 300
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_snr_map_large_image_spot_checks():
    """1000 × 1000 with a masked, bright centre: fast, and right where checked directly."""
    rng = np.random.default_rng(2)
    star = (500.2, 499.7)
    r = radii((1000, 1000), star)
    image = rng.normal(size=(1000, 1000)) + 1e4 * np.exp(-r / 8)
    image[r < 3] = np.nan
    snr, significance = snr_map(image, star, 2.0)
    yy, xx = np.indices(image.shape)
    for y, x in [(500, 520), (505, 498), (10, 990), (700, 123), (499, 940)]:
        ring = (np.abs(r - r[y, x]) < 1) & (np.hypot(xx - x, yy - y) >= 2) & np.isfinite(image)
        values = image[ring]
        n2 = np.floor(np.pi * r[y, x]) - 1
        t = (image[y, x] - values.mean()) / (values.std(ddof=1) * np.sqrt(1 + 1 / n2))
        assert snr[y, x] == pytest.approx(t, rel=1e-8, abs=1e-8), (y, x)
        expected = reference_significance(t, n2 - 1)
        assert significance[y, x] == pytest.approx(expected, rel=1e-7, abs=1e-7)


def test_significance_of_huge_snr_stays_finite_and_increasing():
    tstat = np.array([-1e6, -50.0, 0.0, 5.0, 50.0, 200.0, 1e3, 1e6])
    for dof in (3, 50, 1000):
        sig = gaussian_significance(tstat, dof)
        assert np.isfinite(sig).all() and (np.diff(sig) > 0).all(), sig
        assert sig[3] == pytest.approx(stats.norm.isf(stats.t.sf(5.0, dof)), rel=1e-10)
        assert sig[0] == -sig[-1]


# -- 4. candidates ------------------------------------------------------------------------------


SCALE = 0.063  # arcsec per pixel


def tan_wcs(star, north_angle):
    """A TAN WCS centred on the star, east to the left of north, north ``north_angle`` degrees
    from +y towards −x (0: north up, east left)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = [star[0] + 1, star[1] + 1]
    w.wcs.crval = [83.8, -5.4]
    w.wcs.cunit = ["deg", "deg"]
    a = np.radians(north_angle)
    rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    w.wcs.cd = SCALE / 3600 * rotation @ np.diag([-1.0, 1.0])
    return w


@pytest.mark.parametrize("north_angle", [0.0, 37.0])
def test_find_candidates_recovers_injected_source(north_angle):
    resolution, star, size = 2.0, (100.3, 99.8), 201
    wcs = tan_wcs(star, north_angle)
    true_pa, true_sep = 123.0, 30.0 * SCALE  # deg east of north, arcsec
    origin = wcs.pixel_to_world(*star)
    companion = origin.directional_offset_by(true_pa * u.deg, true_sep * u.arcsec)
    x0, y0 = (float(v) for v in wcs.world_to_pixel(companion))
    image = np.random.default_rng(3).normal(size=(size, size))
    image += gaussian(image.shape, x0, y0, 12.0, resolution)
    snr, significance = snr_map(image, star, resolution)
    table = find_candidates(significance, snr, resolution=resolution, star=star, wcs=wcs)
    assert len(table) >= 1
    best = table[0]
    assert np.hypot(best["x"] - x0, best["y"] - y0) < 0.5
    assert best["significance"] > 5 and best["significance"] == table["significance"].max()
    assert best["separation"] == pytest.approx(30.0, abs=0.5)
    assert best["separation_arcsec"] == pytest.approx(true_sep, abs=0.5 * SCALE)
    tolerance = np.degrees(np.arctan(0.5 / 30.0))
    assert abs((best["pa"] - true_pa + 180) % 360 - 180) < tolerance
    # the detector angle is the PA plus the turn of north
    assert abs((best["pa_detector"] - north_angle - true_pa + 180) % 360 - 180) < tolerance
    found = SkyCoord(best["ra"], best["dec"], unit="deg")
    assert found.separation(companion).arcsec < 0.5 * SCALE
    assert table["x"].unit == u.pix and table["pa"].unit == u.deg
    assert table["separation_arcsec"].unit == u.arcsec
    assert list(table["significance"]) == sorted(table["significance"], reverse=True)


def test_find_candidates_without_wcs_and_on_noise():
    resolution, star = 2.0, (100.0, 100.0)
    image = np.random.default_rng(4).normal(size=(201, 201))
    snr, significance = snr_map(image, star, resolution)
    empty = find_candidates(significance, snr, resolution=resolution, star=star)
    assert len(empty) == 0 and "pa" in empty.colnames and "significance" in empty.colnames
    # a source due south-west in the detector: x − 14, y − 14 → 135° from +y towards −x
    image += gaussian(image.shape, 86.0, 86.0, 15.0, resolution)
    snr, significance = snr_map(image, star, resolution)
    table = find_candidates(significance, snr, resolution=resolution, star=star)
    assert len(table) == 1
    assert table["pa_detector"][0] == pytest.approx(135.0, abs=1.5)
    assert np.isnan(table["pa"][0]) and np.isnan(table["ra"][0])
    assert table["separation"][0] == pytest.approx(14 * np.sqrt(2), abs=0.5)
    # a lower threshold finds more, a higher one nothing
    assert len(find_candidates(significance, snr, 3.5, resolution=resolution, star=star)) > 1
    assert len(find_candidates(significance, snr, 1e3, resolution=resolution, star=star)) == 0


def test_find_candidates_places_to_sub_pixel():
    """The parabola on the S/N peak does better than the peak pixel (up to 0.7 px off)."""
    star, errors, pixel_errors = (100.0, 100.0), [], []
    for k in range(12):
        rng = np.random.default_rng(k)
        x0 = star[0] + 30 * np.cos(k) + rng.uniform(-0.5, 0.5)
        y0 = star[1] + 30 * np.sin(k) + rng.uniform(-0.5, 0.5)
        image = rng.normal(size=(201, 201)) + gaussian((201, 201), x0, y0, 12.0, 2.0)
        snr, significance = snr_map(image, star, 2.0)
        best = find_candidates(significance, snr, resolution=2.0, star=star)[0]
        errors.append(np.hypot(best["x"] - x0, best["y"] - y0))
        pixel_errors.append(np.hypot(np.round(best["x"]) - x0, np.round(best["y"]) - y0))
    assert max(errors) < 0.35 and np.median(errors) < 0.2, errors
    assert np.mean(errors) < 0.5 * np.mean(pixel_errors)


@pytest.mark.parametrize("resolution", [1.0, 2.06, 3.5, 6.2])
def test_candidates_are_the_peaks_a_pixel_by_pixel_search_finds(resolution):
    """The candidates are the pixels above the threshold that are the highest within w
    and whose every pixel within w has data (away from edges and holes): those a plain
    loop over pixels and their neighbours finds, on an image with holes and different
    sides."""
    rng = np.random.default_rng(int(resolution * 10))
    image = rng.normal(size=(37, 52))
    image[rng.random(image.shape) < 0.005] = np.nan
    image[:3] = np.nan
    ny, nx = image.shape
    reach = int(np.floor(resolution))
    expected = set()
    for y in range(ny):
        for x in range(nx):
            if not image[y, x] > 1.0:
                continue
            near = [
                (y + dy, x + dx)
                for dy in range(-reach, reach + 1)
                for dx in range(-reach, reach + 1)
                if dx * dx + dy * dy <= resolution * resolution
            ]
            inside = all(0 <= v < ny and 0 <= u < nx and np.isfinite(image[v, u]) for v, u in near)
            if inside and all(image[v, u] <= image[y, x] for v, u in near):
                expected.add((x, y))
    flat = np.zeros_like(image)  # no sub-pixel refinement: the peak pixels themselves
    found = find_candidates(image, flat, 1.0, resolution=resolution, star=(26.0, 18.0))
    assert {(int(x), int(y)) for x, y in zip(found["x"], found["y"], strict=True)} == expected
    assert 0 < len(expected)
