"""The detection map and candidates a run ends with: the simulated companion found at its
place on the sky, nothing above 5σ without one."""

import json

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table

from coron_dask import run_coron3
from coron_dask.science.simulate import simulate
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
    star = SkyCoord(*truth["star_sky"], unit="deg")
    companion = SkyCoord(*truth["companion_sky"], unit="deg")
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
