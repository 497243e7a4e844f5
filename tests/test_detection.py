"""The detection map and candidates a run makes with its other products: the simulated
companion found at its place on the sky, nothing above 5σ without one, and bit for bit
the science functions on the i2d read back."""

import json

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.wcs import WCS

from coron_dask import run_coron3
from coron_dask.science.geometry import (
    lambda_over_d,
    pixel_positions,
    pixel_scale_arcsec,
    star_position,
)
from coron_dask.science.photometry import find_candidates, snr_map
from coron_dask.science.simulate import simulate, truth_places
from tests.conftest import BLANK

SYNCHRONOUS = {"scheduler": "synchronous", "progress": False}


def _run(asn, folder, **parameters):
    paths = run_coron3(
        asn, folder, psfmask=asn.parent / "psfmask.fits", **SYNCHRONOUS, **parameters
    )
    candidates = next(p for p in paths if p.name.endswith("_candidates.ecsv"))
    snr = next(p for p in paths if p.name.endswith("_snr.fits"))
    return Table.read(candidates), snr


def test_the_companion_is_the_one_candidate_at_its_place(tmp_path):
    asn = simulate(tmp_path / "sim", contrast=4e-6, **BLANK)
    truth = json.loads((asn.parent / "truth.json").read_text())
    found, snr = _run(asn, tmp_path / "out", truncate=(4, 8))
    assert sorted(found["kl"]) == [4, 8]  # one per KL cutoff
    star, companion = truth_places(truth)
    scale = 0.063  # arcsec per pixel
    for row in found:
        place = SkyCoord(row["ra"], row["dec"], unit="deg")
        assert place.separation(companion).arcsec < 0.5 * scale
        assert abs(row["separation_arcsec"] - star.separation(companion).arcsec) < 0.5 * scale
        assert abs(row["pa"] - star.position_angle(companion).deg) < 2.0
        assert row["significance"] > 8
    with fits.open(snr) as hdul:
        assert hdul["SNR"].data.shape[0] == 2 and hdul["SIGNIF"].header["KLMODE1"] == 8
        assert np.nanmax(hdul["SIGNIF"].data) == np.float32(found["significance"].max())


def test_nothing_above_5_sigma_without_a_companion(blank, tmp_path):
    found, snr = _run(blank, tmp_path / "out", truncate=8)
    assert len(found) == 0
    significance = fits.getdata(snr, "SIGNIF")
    assert 2.5 < np.nanmax(significance) < 5.0  # noise, not nothing


def test_detection_is_the_science_functions_on_the_i2d_read_back(asn, tmp_path):
    """The detection map and candidates, made in the run's own computation from the i2d's
    lazy image, are bit for bit photometry's snr_map and find_candidates run on the i2d
    read back from its file (what the run did before, once the i2d was placed)."""
    out = tmp_path / "out"
    paths = run_coron3(
        asn, out, psfmask=asn.parent / "psfmask.fits", truncate=(2, 4), **SYNCHRONOUS
    )
    i2d = next(p for p in paths if p.name.endswith("_i2d.fits"))
    with fits.open(i2d) as hdul:
        primary, header = hdul[0].header, hdul["SCI"].header
        planes = hdul["SCI"].data.astype(np.float64)
    grid = WCS(header, naxis=2)
    star = tuple(float(v) for v in pixel_positions(grid, star_position(primary, i2d))[0])
    resolution = lambda_over_d(primary["FILTER"], pixel_scale_arcsec(grid) / 3600)
    maps = [snr_map(plane, star, resolution) for plane in planes]
    snr = next(p for p in paths if p.name.endswith("_snr.fits"))
    with fits.open(snr) as hdul:
        for name, index in (("SNR", 0), ("SIGNIF", 1)):
            expected = np.stack([m[index] for m in maps]).astype(np.float32)
            np.testing.assert_array_equal(hdul[name].data, expected)
        assert [hdul["SNR"].header[f"KLMODE{i}"] for i in range(2)] == [2, 4]
        assert hdul[0].header["TARG_RA"] == primary["TARG_RA"]
    found = Table.read(next(p for p in paths if p.name.endswith("_candidates.ecsv")))
    expected = []
    for cutoff, (plane_snr, significance) in zip((2, 4), maps, strict=True):
        table = find_candidates(
            significance, plane_snr, 5.0, resolution=resolution, star=star, wcs=grid
        )
        table["kl"] = np.full(len(table), cutoff)
        expected.append(table)
    expected = vstack(expected)
    assert len(found) == len(expected) > 0
    for name in expected.colnames:
        np.testing.assert_array_equal(found[name], expected[name])
    assert found.meta["star_pixel"] == list(star) and found.meta["i2d"] == i2d.name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)
