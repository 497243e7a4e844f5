"""What ADI+RDI does to the science, on a simulated observation whose reference star's
wavefront differs from the science star's (20 nm rms of its own) and whose two rolls are
10° apart: where the roll moves a companion by more than 2 λ/D its 5σ contrast is deeper
than RDI's (the other roll's integrations share the science star's speckles) and a
companion there is found at a higher S/N; where the roll moves it by less than
``movement`` the other roll is left out and a companion keeps its flux as in RDI."""

import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from coron_dask import run_coron3
from coron_dask.pipeline.contrast import contrast_curve
from coron_dask.science.photometry import snr_map
from coron_dask.science.simulate import simulate

SYNCHRONOUS = {"scheduler": "synchronous", "progress": False}
OBSERVATION = {"size": 96, "sci_exps": 2, "sci_ints": 3, "psf_exps": 3, "psf_ints": 3, "seed": 11}
DRIFT = 20.0  # nm rms: the reference star's own wavefront error (the simulator's default: 6)
REDUCTION = {"truncate": 8, "annuli": 4, "movement": 3.0}
ROLL = np.radians(10.0)


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    """The simulated observation without a companion and its RDI and ADI+RDI curves."""
    folder = tmp_path_factory.mktemp("adi-gain")
    asn = simulate(folder / "blank", contrast=0.0, reference_drift=DRIFT, **OBSERVATION)
    tables = {}
    for mode in ("RDI", "ADI+RDI"):
        paths = contrast_curve(
            asn,
            folder / mode,
            offaxis_psf=asn.parent / "offaxis_psf.fits",
            psfmask=asn.parent / "psfmask.fits",
            mode=mode,
            execution=SYNCHRONOUS,
            **REDUCTION,
        )
        tables[mode] = Table.read(next(p for p in paths if p.suffix == ".ecsv"))
    return tables


def _moved(table: Table) -> np.ndarray:
    """How far (pixels) the roll moves a companion at each row's separation."""
    pixels = np.asarray(table["separation"]) / table.meta["pixel_scale_arcsec"]
    return 2 * pixels * np.sin(ROLL / 2)


def test_adi_rdi_is_deeper_where_the_roll_moves_a_companion_by_2_lambda_over_d(curves):
    rdi, adi = curves["RDI"], curves["ADI+RDI"]
    assert np.allclose(rdi["separation"], adi["separation"])
    assert (rdi.meta["mode"], adi.meta["mode"], adi.meta["movement"]) == ("RDI", "ADI+RDI", 3.0)
    far = _moved(rdi) > 2 * rdi.meta["resolution_pixels"]
    assert far.sum() >= 5
    gain = np.asarray(rdi["contrast"]) / np.asarray(adi["contrast"])
    assert (gain[far] >= 1.3).all(), gain[far]


def test_a_companion_moved_less_than_movement_keeps_its_flux(curves):
    """Where the roll moves a companion by less than ``movement``, in its whole annulus,
    ADI+RDI uses the reference star's frames only: the throughput is RDI's (within 10 %)."""
    rdi, adi = curves["RDI"], curves["ADI+RDI"]
    near = _moved(rdi) < 0.5 * REDUCTION["movement"]  # inside the innermost annulus's middle
    assert near.sum() >= 3
    ratio = np.asarray(adi["throughput"])[near] / np.asarray(rdi["throughput"])[near]
    assert np.all(np.abs(ratio - 1) < 0.1), ratio
    assert (np.asarray(adi["throughput"])[near] > 0.8).all()


def test_a_companion_the_roll_moves_is_found_at_a_higher_snr(curves, tmp_path):
    """A companion at the RDI curve's 5σ limit where the roll moves it by 2.5 λ/D: RDI
    finds it (6.9σ measured) and ADI+RDI at a higher S/N (11.9σ)."""
    rdi = curves["RDI"]
    scale, resolution = rdi.meta["pixel_scale_arcsec"], rdi.meta["resolution_pixels"]
    pixels = 2.5 * resolution / (2 * np.sin(ROLL / 2))
    separation = pixels * scale
    limit = float(np.interp(separation, rdi["separation"], rdi["contrast"]))
    angle = np.radians(33.0)
    offset = (pixels * np.cos(angle), pixels * np.sin(angle))
    asn = simulate(
        tmp_path / "sim", contrast=limit, companion=offset, reference_drift=DRIFT, **OBSERVATION
    )
    truth = json.loads((asn.parent / "truth.json").read_text())
    found = {}
    for mode in ("RDI", "ADI+RDI"):
        paths = run_coron3(
            asn,
            tmp_path / mode,
            psfmask=asn.parent / "psfmask.fits",
            mode=mode,
            **REDUCTION,
            **SYNCHRONOUS,
        )
        with fits.open(next(p for p in paths if "_i2d" in p.name)) as hdul:
            image = hdul["SCI"].data.astype(np.float64)
            grid = WCS(hdul["SCI"].header, naxis=2)
        star = grid.world_to_pixel_values(*truth["star_sky"])
        place = grid.world_to_pixel_values(*truth["companion_sky"])
        _, significance = snr_map(image, star, resolution)
        yy, xx = np.indices(image.shape)
        found[mode] = float(np.nanmax(significance[np.hypot(xx - place[0], yy - place[1]) <= 1.5]))
    assert found["RDI"] >= 3.5, found
    assert found["ADI+RDI"] > 1.3 * found["RDI"], found
