"""The coronagraph's transmission in the injections and the contrast curve: a companion
simulated behind a round occulter at the curve's 5σ limit is found at 5σ where the occulter
transmits half its light and far from it (and not without the transmission); each injected
place is dimmed by the map at its detector pixel in each roll, computed here through each
exposure's WCS; a map that cannot be a transmission is one line, exit 2, nothing written."""

import json

import dask.config
import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from coron_dask import run_coron3
from coron_dask.core.errors import CoronInputError
from coron_dask.kernels.inject import transmission_at
from coron_dask.pipeline.contrast import contrast_curve
from coron_dask.pipeline.observation import open_association
from coron_dask.science.geometry import star_position
from coron_dask.science.injection import Companion, roll_transmissions
from coron_dask.science.photometry import snr_map
from coron_dask.science.simulate import simulate
from coron_dask.science.transmission import coronagraph_transmission
from tests.conftest import BLANK, run_main

SYNCHRONOUS = {"scheduler": "synchronous", "progress": False}
TRUNCATE = 8
#: The occulter's inner working angle (λ/D): half its light at 6.3 × 2 px = 0.79".
IWA = 6.3
SEPARATIONS = [0.5, 0.8, 1.2, 1.8, 2.5]  # arcsec: few, dense where the occulter falls
NEAR, FAR = 0.79, 1.8  # arcsec: transmission ~0.5 and ~1


@pytest.fixture(scope="module")
def occulted(tmp_path_factory):
    """A blank observation behind a round occulter (its PSFMASK the transmission map) and
    its contrast curves with the transmission (the PSFMASK, NIRCam's default) and without."""
    folder = tmp_path_factory.mktemp("occulted")
    asn = simulate(folder / "blank", contrast=0.0, occulter=IWA, **BLANK)
    curves = {}
    for transmission in (None, "none"):
        paths = contrast_curve(
            asn,
            folder / f"curve-{transmission}",
            offaxis_psf=asn.parent / "offaxis_psf.fits",
            psfmask=asn.parent / "psfmask.fits",
            truncate=TRUNCATE,
            separations=SEPARATIONS,
            transmission=transmission,
            execution=SYNCHRONOUS,
        )
        curves[transmission] = Table.read(next(p for p in paths if p.suffix == ".ecsv"))
    return asn, curves


def _found_at(table: Table, separation: float, folder) -> tuple[float, float]:
    """Simulate the occulted observation with a companion of ``table``'s 5σ contrast at
    ``separation``, reduce it, and return its significance on the i2d's detection map (the
    σ of the curve: Student-t over resolution elements) and the occulter's transmission
    where it fell (the simulator's truth)."""
    limit = float(np.interp(separation, table["separation"], table["contrast"]))
    pixels = separation / table.meta["pixel_scale_arcsec"]
    angle = np.radians(33.0)
    offset = (pixels * np.cos(angle), pixels * np.sin(angle))
    asn = simulate(folder / "sim", contrast=limit, companion=offset, occulter=IWA, **BLANK)
    truth = json.loads((asn.parent / "truth.json").read_text())
    paths = run_coron3(
        asn, folder / "out", psfmask=asn.parent / "psfmask.fits", truncate=TRUNCATE, **SYNCHRONOUS
    )
    with fits.open(next(p for p in paths if "_i2d" in p.name)) as hdul:
        image = hdul["SCI"].data.astype(np.float64)
        grid = WCS(hdul["SCI"].header, naxis=2)
    star = grid.world_to_pixel_values(*truth["star_sky"])
    place = grid.world_to_pixel_values(*truth["companion_sky"])
    _, significance = snr_map(image, star, table.meta["resolution_pixels"])
    yy, xx = np.indices(image.shape)
    near = np.hypot(xx - place[0], yy - place[1]) <= 1.5
    dimmed = np.mean([np.mean(t) for t in truth["transmission"].values()])
    return float(np.nanmax(significance[near])), float(dimmed)


def test_companion_at_the_limit_is_found_at_5_sigma_behind_the_occulter(occulted, tmp_path):
    """Near the occulter (transmission ~½) and far from it (~1), a companion at the curve's
    5σ limit comes out at 5 ± 1.5σ. The curve without the transmission is optimistic near
    the occulter by its transmission: a companion at that limit comes out clearly fainter."""
    _, curves = occulted
    dimmed, optimistic = curves[None], curves["none"]
    assert dimmed.meta["transmission"] == "PSFMASK psfmask.fits"
    assert optimistic.meta["transmission"] == "none"
    found = {}
    for name, separation in (("near", NEAR), ("far", FAR)):
        found[name], where = _found_at(dimmed, separation, tmp_path / name)
        assert (0.35 < where < 0.65) if name == "near" else where > 0.99, where
        column = float(np.interp(separation, dimmed["separation"], dimmed["transmission"]))
        assert abs(column - where) < 0.05, (column, where)  # the curve states it
    found["near, no transmission"], _ = _found_at(optimistic, NEAR, tmp_path / "optimistic")
    assert 3.5 <= found["near"] <= 6.5, found
    assert 3.5 <= found["far"] <= 6.5, found
    assert found["near, no transmission"] < 3.5, found  # what the transmission corrects


def _independent_transmission(science_file, star, companion, transmission) -> float:
    """The map's value at the detector pixel of ``companion``'s sky place, through the
    exposure's own WCS (astropy, from its SCI header), interpolated bilinearly by hand."""
    wcs = WCS(fits.getheader(science_file, "SCI"), naxis=2)
    place = star.directional_offset_by(
        companion.position_angle * u.deg, companion.separation * u.arcsec
    )
    x, y = (float(v) for v in wcs.world_to_pixel(place))
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    fx, fy = x - x0, y - y0
    m = transmission
    return float(
        m[y0, x0] * (1 - fx) * (1 - fy)
        + m[y0, x0 + 1] * fx * (1 - fy)
        + m[y0 + 1, x0] * (1 - fx) * fy
        + m[y0 + 1, x0 + 1] * fx * fy
    )


def test_each_injected_place_is_dimmed_by_the_map_at_its_pixel_in_each_roll(blank, tmp_path):
    """A map that changes across the detector (a ramp with a bump): the two rolls put each
    companion on different pixels, and each exposure's transmission is the map's there."""
    observation = open_association(blank)
    science = observation.science
    ny, nx = science[0].sizes["y"], science[0].sizes["x"]
    yy, xx = np.indices((ny, nx))
    ramp = 0.2 + 0.8 * xx / (nx - 1) * np.exp(-((yy - 40.0) ** 2) / 800)
    path = tmp_path / "map.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(ramp, name="SCI")]).writeto(path)
    transmission = coronagraph_transmission(path, blank.parent / "psfmask.fits", science[0])
    assert transmission.source == "map map.fits"
    star = star_position(science[0].attrs, blank)
    members = [Companion(0, s, pa, 1e-4) for s, pa in ((0.5, 10.0), (1.1, 130.0), (2.2, 250.0))]
    ours = roll_transmissions(science, members, star, transmission)
    files = [e.encoding["source"] for e in science]
    sky = SkyCoord(fits.getval(files[0], "TARG_RA"), fits.getval(files[0], "TARG_DEC"), unit="deg")
    expected = np.array(
        [[_independent_transmission(f, sky, c, ramp) for c in members] for f in files]
    )
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)
    assert np.abs(ours[0] - ours[1]).max() > 0.02  # the rolls see different pixels


def test_the_curve_records_the_transmission_of_each_roll_of_each_companion(occulted):
    """The contrast run's record of every companion's transmission in each roll is the
    PSFMASK's value at its detector pixel there (WCS of each exposure, by hand); the
    curve's column is their mean at the injected separations."""
    asn, curves = occulted
    table = curves[None]
    psfmask = fits.getdata(asn.parent / "psfmask.fits", "SCI").astype(np.float64)
    observation = open_association(asn)
    files = [e.encoding["source"] for e in observation.science]
    star = SkyCoord(fits.getval(files[0], "TARG_RA"), fits.getval(files[0], "TARG_DEC"), unit="deg")
    for row in table.meta["injections"]:
        companion = Companion(row["set"], row["separation"], row["position_angle"], 1e-4)
        expected = [_independent_transmission(f, star, companion, psfmask) for f in files]
        np.testing.assert_allclose(row["transmission_rolls"], expected, rtol=1e-6)
        assert np.isclose(row["transmission"], np.mean(expected))  # equal integrations
    measured = Table(rows=table.meta["injections"])
    means = [np.mean(measured["transmission"][measured["separation"] == s]) for s in SEPARATIONS]
    rows = table[table["kl"] == TRUNCATE]
    np.testing.assert_allclose(
        rows["transmission"], np.interp(rows["separation"], SEPARATIONS, means), rtol=1e-12
    )


def _with_instrument(source, target, instrument: str):
    with fits.open(source) as hdul:
        hdul[0].header["INSTRUME"] = instrument
        hdul.writeto(target)
    return target


def test_miri_psfmask_is_no_transmission(blank, tmp_path):
    """By default a MIRI PSFMASK (the 4QPM/Lyot geometry) dims nothing, and says so; a
    NIRCam one is the transmission; asking a MIRI one as transmission is refused."""
    science = open_association(blank).science[0]
    miri = _with_instrument(blank.parent / "psfmask.fits", tmp_path / "miri.fits", "MIRI")
    default = coronagraph_transmission(None, miri, science)
    assert default.map is None and "MIRI" in default.source
    assert np.array_equal(default.at(np.zeros((3, 2))), np.ones(3))
    nircam = coronagraph_transmission(None, blank.parent / "psfmask.fits", science)
    assert nircam.map is not None and nircam.source == "PSFMASK psfmask.fits"
    with pytest.raises(CoronInputError) as error:
        coronagraph_transmission("psfmask", miri, science)
    assert error.value.source == str(miri) and "not its transmission" in error.value.problem
    assert coronagraph_transmission(None, "none", science).source == "none (no PSFMASK)"


def test_the_largest_transmission_is_a_setting(blank, tmp_path):
    science = open_association(blank).science[0]
    path = tmp_path / "map.fits"
    fits.PrimaryHDU(np.full((science.sizes["y"], science.sizes["x"]), 1.2)).writeto(path)
    assert coronagraph_transmission(path, None, science).at(np.array([[3.0, 4.0]]))[0] == 1.2
    with (
        dask.config.set({"coron_dask.contrast.transmission-max": 1.1}),
        pytest.raises(CoronInputError, match=r"between 0 and 1\.1"),
    ):
        coronagraph_transmission(path, None, science)


def _bad_maps(folder, shape):
    """Files that are no transmission map, and the words their one line must hold."""
    text = folder / "map.txt"
    text.write_text("0.5 0.5\n")
    small = folder / "small.fits"
    fits.PrimaryHDU(np.ones((shape[0] // 2, shape[1]))).writeto(small)
    negative = folder / "negative.fits"
    fits.PrimaryHDU(np.full(shape, -0.1)).writeto(negative)
    bright = folder / "bright.fits"
    fits.PrimaryHDU(np.full(shape, 2.0)).writeto(bright)
    return [
        (text, "is not a FITS transmission map"),
        (small, "the transmission map is 64x128 pixels, the science frames 128x128"),
        (negative, "values from -0.1"),
        (bright, "to 2: a transmission is between 0 and 1.5"),
    ]


def test_bad_transmission_is_one_line_and_nothing_written(blank, tmp_path, capsys):
    shape = (BLANK["size"], BLANK["size"])
    miri = _with_instrument(blank.parent / "psfmask.fits", tmp_path / "miri.fits", "MIRI")
    ours = blank.parent / "psfmask.fits"
    cases = [(bad, ours, bad, words) for bad, words in _bad_maps(tmp_path, shape)]
    cases.append(("psfmask", miri, miri, "MIRI PSFMASK marks the coronagraph's geometry"))
    cases.append((miri, ours, miri, "MIRI PSFMASK marks the coronagraph's geometry"))
    cases.append(("psfmask", "none", "transmission", "'psfmask' needs a PSFMASK"))
    for given, psfmask, named, words in cases:
        out = tmp_path / "out"
        code, _, err = run_main(
            [
                "contrast",
                blank,
                "-o",
                out,
                "--offaxis-psf",
                blank.parent / "offaxis_psf.fits",
                "--psfmask",
                psfmask,
                "--transmission",
                given,
                "--scheduler",
                "synchronous",
            ],
            capsys,
        )
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1, err
        assert str(named) in err and words in err, err
        assert not out.exists() or not any(out.iterdir())


def test_simulated_occulter_is_the_psfmask_and_dims_the_companion(tmp_path, capsys):
    """``simulate --occulter IWA``: the PSFMASK is the round occulter's transmission, ½ at
    IWA λ/D from the coronagraph's centre; the companion was dimmed by it where it fell
    in each integration (the truth), which the map gives there to its sampling."""
    code, out, _ = run_main(
        ["simulate", tmp_path, "--size", 64, "--sci-ints", 2, "--psf-exps", 2, "--occulter", 5],
        capsys,
    )
    assert code == 0, out
    truth = json.loads((tmp_path / "truth.json").read_text())
    psfmask = fits.getdata(tmp_path / "psfmask.fits", "SCI").astype(np.float64)
    yy, xx = np.indices(psfmask.shape)
    r = np.hypot(xx - 32, yy - 32) / 2.0  # λ/D: 2 pixels
    sigma = truth["occulter"]["sigma_lambda_d"]
    np.testing.assert_allclose(psfmask, (1 - np.exp(-(r**2) / (2 * sigma**2))) ** 2, atol=1e-7)
    half = (1 - np.exp(-(5.0**2) / (2 * sigma**2))) ** 2
    assert abs(half - 0.5) < 1e-12
    for name, places in truth["companion"].items():
        sampled = [transmission_at(psfmask, np.array([p]))[0] for p in places]
        np.testing.assert_allclose(truth["transmission"][name], sampled, atol=0.01)
    code, _, err = run_main(
        ["simulate", tmp_path / "m", "--instrument", "miri", "--occulter", 5], capsys
    )
    assert code == 2 and "occulter" in err
