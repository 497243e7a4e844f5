"""KLIP's zones against pyKLIP's own definition of its annuli and subsections (its
``define_annuli_bounds`` and ``make_polar_coordinates``, and the section test of
``parallelized._klip_section_multifile``), and the zone map's properties for any frame,
star and parameters (hypothesis)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyklip import klip as pyklip

from coron_dask.core.errors import CoronInputError
from coron_dask.kernels.zones import SPACINGS, zone_map, zone_means
from coron_dask.steps.klip_parameters import klip_zones

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def pyklip_sections(shape, star, annuli, subsections, spacing, iwa, owa) -> np.ndarray:
    """The label of each pixel as pyKLIP's klip_parallelized cuts the frame: its annuli's
    bounds (the last reaching the frame's height without an OWA), its subsections' angles,
    and the pixels of each section, a section of one pixel skipped."""
    x, y = np.meshgrid(np.arange(shape[1] * 1.0), np.arange(shape[0] * 1.0))
    full = owa is None
    if full:  # pyKLIP's OWA without one: the farthest pixel (frames without NaN)
        owa = np.sqrt(np.max((x - star[0]) ** 2 + (y - star[1]) ** 2))
    bounds = pyklip.define_annuli_bounds(annuli, iwa, owa, spacing)
    if full:
        bounds[annuli - 1] = (bounds[annuli - 1][0], shape[0])
    step = 2 * np.pi / subsections
    angles = [[step * j - np.pi, step * (j + 1) - np.pi] for j in range(subsections)]
    angles[-1][1] = np.pi
    r, phi = pyklip.make_polar_coordinates(x.ravel(), y.ravel(), star)
    labels = np.full(r.size, -1)
    for a, (r0, r1) in enumerate(bounds):
        for s, (p0, p1) in enumerate(angles):
            section = np.where((r >= r0) & (r < r1) & (phi >= p0) & (phi < p1))[0]
            if section.size > 1:
                assert (labels[section] == -1).all()  # pyKLIP's sections do not overlap
                labels[section] = a * subsections + s
    return labels.reshape(shape)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize(
    "star", [(31.5, 33.2), (32.0, 32.0), (10.3, 50.7), (-3.2, 20.0)], ids=lambda s: f"{s}"
)
@pytest.mark.parametrize(
    ("annuli", "subsections", "iwa", "owa"),
    [(3, 4, 0.0, None), (3, 4, 4.5, 28.0), (5, 3, 2.0, None), (2, 6, 3.0, 40.0), (4, 1, 6, 30)],
)
def test_zones_are_pyklips_sections(spacing, star, annuli, subsections, iwa, owa):
    """Pixel for pixel, an edge's pixels on the same side (a star on a pixel puts pixels on
    the subsections' edges; one off the frame cuts some zones away)."""
    zones = zone_map((64, 70), star, annuli, subsections, spacing, iwa, owa)
    expected = pyklip_sections((64, 70), star, annuli, subsections, spacing, iwa, owa)
    np.testing.assert_array_equal(zones.labels, expected)
    bounds = pyklip.define_annuli_bounds(annuli, iwa, owa or 1.0, spacing) if owa else None
    if bounds is not None:  # the edges logged and used are pyKLIP's bounds
        np.testing.assert_array_equal(zones.edges[:-1], [b[0] for b in bounds])
        np.testing.assert_array_equal(zones.edges[1:], [b[1] for b in bounds])


@st.composite
def geometries(draw) -> dict:
    """Frames of 8 to 48 pixels, the star anywhere within 5 pixels of the frame, one to
    four annuli of one to seven subsections, with or without working angles."""
    ny, nx = draw(st.integers(8, 48)), draw(st.integers(8, 48))
    star = (draw(st.floats(-5, nx + 5)), draw(st.floats(-5, ny + 5)))
    iwa = draw(st.sampled_from([0.0, 1.5, 3.0]))
    owa = draw(st.one_of(st.none(), st.floats(iwa + 8, iwa + 40)))
    return dict(
        shape=(ny, nx),
        star=star,
        annuli=draw(st.integers(1, 4)),
        subsections=draw(st.integers(1, 7)),
        spacing=draw(st.sampled_from(SPACINGS)),
        iwa=iwa,
        owa=owa,
    )


@PROPERTY
@given(geometries())
def test_zone_map_properties(geometry):
    """Each pixel in at most one zone; a zone's pixels lie between its annulus's edges
    (which increase) and within its subsection's angles; none inside the IWA or beyond
    the OWA; the counts are the pixels labelled; no zone of one pixel."""
    try:
        zones = zone_map(**geometry)
    except ValueError:  # annuli narrower than a pixel: pyKLIP refuses them too
        return
    shape, star, owa = geometry["shape"], geometry["star"], geometry["owa"]
    labels = zones.labels
    assert labels.shape == shape and labels.min() >= -1 and labels.max() < zones.count
    assert np.all(np.diff(zones.edges[:-1]) > 0)  # the last: the frame's height, if no OWA
    y, x = np.indices(shape)
    r = np.hypot(x - star[0], y - star[1])
    theta = np.mod(np.arctan2(y - star[1], x - star[0]), 2 * np.pi)
    inside = labels >= 0
    annulus, sector = labels // zones.subsections, labels % zones.subsections
    tolerance = 1e-9  # hypot against pyKLIP's sqrt of squares
    assert np.all(r[inside] >= zones.edges[annulus[inside]] - tolerance)
    assert np.all(r[inside] < zones.edges[annulus[inside] + 1] + tolerance)
    step = 2 * np.pi / zones.subsections
    assert np.all(theta[inside] >= step * sector[inside] - tolerance)
    assert np.all(theta[inside] < step * (sector[inside] + 1) + tolerance)
    assert not np.any(inside & (r < geometry["iwa"] - tolerance))
    if owa is not None:
        assert not np.any(inside & (r > owa + tolerance))
    assert zones.pixels.sum() == inside.sum()
    np.testing.assert_array_equal(zones.pixels, np.bincount(labels[inside], minlength=zones.count))
    assert not np.any(zones.pixels == 1)
    # the tiles' runs: each pixel in zones once, sorted by zone
    flat = labels.ravel()
    for start in range(0, flat.size, 7 * shape[1]):
        pixels = slice(start, min(start + 7 * shape[1], flat.size))
        found, runs = zones.segments(pixels)
        expected = np.flatnonzero(flat[pixels] >= 0) + start
        np.testing.assert_array_equal(np.sort(found), expected)
        for z, run in runs:
            assert np.all(flat[found[run]] == z)


def test_zone_means_are_the_means_over_each_zone():
    rng = np.random.default_rng(3)
    zones = zone_map((40, 44), (20.3, 18.9), 3, 4, "log", 2.0, None)
    frames = rng.normal(5, 2, (2, 3, 40, 44)).astype(np.float32)
    frames[1, 2] = np.nan  # a flagged frame: NaN in every zone
    means = zone_means(frames, zones)
    assert means.shape == (2, 3, 12)
    for z in range(12):
        expected = frames[..., zones.labels == z].astype(np.float64).mean(axis=-1)
        np.testing.assert_allclose(means[..., z], expected, rtol=1e-13, equal_nan=True)
    assert np.isnan(means[1, 2]).all() and np.isfinite(means[:, :2]).all()


def test_whole_frame_is_no_zone_map_and_bad_zones_name_their_parameter():
    """The default (one zone, no IWA or OWA) is jwst's KLIP: no zone map; zones that cannot
    be made are one error naming the parameter to change."""
    assert klip_zones((64, 64), (31.5, 31.5)) is None
    assert klip_zones((64, 64), (31.5, 31.5), annuli=2) is not None
    cases = [
        ({"annuli": 50}, "annuli", "50 annuli from 0 to 44.5 px are narrower than a pixel"),
        ({"iwa": 50.0}, "iwa", "50 px leaves no pixel of science: its farthest is 44.5 px"),
        ({"iwa": 8.0, "owa": 5.0}, "owa", "must be above the iwa (8 px), got 5"),
    ]
    for given_, name, problem in cases:
        with pytest.raises(CoronInputError) as error:
            klip_zones((64, 64), (31.5, 31.5), **given_)
        assert error.value.source == name
        assert problem in error.value.problem
