"""The contrast curve: injection-recovery through the science reduction's own graph,
checked against the truth of a companion injected at the measured limit, a zero-flux
injection, and pyKLIP's meas_contrast on the same image."""

import json

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from coron_dask import run_coron3
from coron_dask.io import Extension, Product, write_products
from coron_dask.pipeline.build import reduce_observation
from coron_dask.pipeline.contrast import contrast_curve
from coron_dask.science.geometry import star_position
from coron_dask.science.injection import Companion, injected_psfsubs, read_offaxis_psf
from coron_dask.science.photometry import peak_position, snr_map
from coron_dask.science.simulate import simulate
from tests.conftest import BLANK
from tests.test_cli import run_main

SYNCHRONOUS = {"scheduler": "synchronous", "progress": False}
TRUNCATE = 8


@pytest.fixture(scope="module")
def curve(blank, tmp_path_factory):
    """The contrast curve of ``blank`` and the paths written."""
    out = tmp_path_factory.mktemp("curve")
    paths = contrast_curve(
        blank,
        out,
        offaxis_psf=blank.parent / "offaxis_psf.fits",
        psfmask=blank.parent / "psfmask.fits",
        truncate=TRUNCATE,
        execution=SYNCHRONOUS,
    )
    table = Table.read(next(p for p in paths if p.suffix == ".ecsv"))
    return table, paths, out


def test_a_contrast_run_writes_its_outputs_only(curve):
    table, paths, out = curve
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in paths)
    assert [p.suffix for p in paths] == [".fits", ".ecsv", ".png"]
    assert {"separation", "contrast", "throughput", "threshold", "kl"} <= set(table.colnames)
    assert table["separation"].unit == "arcsec"
    assert len(table.meta["injections"]) == 30  # 3 position angles × 10 separations
    # the curve falls with separation, and RDI keeps most of a companion's light
    assert table["contrast"][0] > 5 * table["contrast"][-1]
    assert np.all((table["throughput"] > 0.5) & (table["throughput"] < 1.05))
    png = paths[-1].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_companion_at_the_5_sigma_limit_is_recovered_at_5_sigma(curve, tmp_path):
    """Simulate the same observation with a companion of the curve's 5σ contrast at 1.2
    arcsec: the detection map of the science reduction gives it 5 ± 1 σ."""
    table, _, _ = curve
    separation = 1.2  # arcsec: 9 λ/D, inside the injected range
    limit = float(np.interp(separation, table["separation"], table["contrast"]))
    pixels = separation / table.meta["pixel_scale_arcsec"]
    angle = np.radians(33.0)
    offset = (pixels * np.cos(angle), pixels * np.sin(angle))
    asn = simulate(tmp_path / "sim", contrast=limit, companion=offset, **BLANK)
    truth = json.loads((asn.parent / "truth.json").read_text())
    paths = run_coron3(
        asn,
        tmp_path / "out",
        psfmask=asn.parent / "psfmask.fits",
        truncate=TRUNCATE,
        **SYNCHRONOUS,
    )
    i2d = next(p for p in paths if "_i2d" in p.name)
    with fits.open(i2d) as hdul:
        image = hdul["SCI"].data.astype(np.float64)
        grid = WCS(hdul["SCI"].header, naxis=2)
    star = grid.world_to_pixel_values(*truth["star_sky"])
    place = grid.world_to_pixel_values(*truth["companion_sky"])
    _, significance = snr_map(image, star, table.meta["resolution_pixels"])
    yy, xx = np.indices(image.shape)
    near = np.hypot(xx - place[0], yy - place[1]) <= 1.5
    found = np.nanmax(significance[near])
    assert 4.0 <= found <= 6.0, found


def test_zero_flux_injection_leaves_the_psfsub_identical(blank, tmp_path):
    """Companions of zero flux through the injection graph give the science psfsub bit
    for bit: the injections run on the science's own fill, basis and blocks."""
    reduction = reduce_observation(
        blank,
        tmp_path,
        psfmask=blank.parent / "psfmask.fits",
        truncate=(3, TRUNCATE),
        save_psfalign=False,
        integrations=3,
    )
    psf = read_offaxis_psf(blank.parent / "offaxis_psf.fits")
    members = [Companion(0, s, 45.0 * i, 0.0) for i, s in enumerate((0.5, 1.0, 1.5))]
    subs, _ = injected_psfsubs(
        reduction, psf, members, star_position(reduction.science[0].attrs, blank)
    )
    zero = [
        Product(tmp_path / f"zero{i}.fits", {}, [Extension("SCI", sub["sci"].data)])
        for i, sub in enumerate(subs)
    ]
    paths = write_products([*reduction.products, *zero], None)
    science = sorted(p for p in paths if "_psfsub" in p.name)
    assert len(science) == 2
    for i, path in enumerate(science):
        expected = fits.getdata(path, "SCI")
        np.testing.assert_array_equal(fits.getdata(tmp_path / f"zero{i}.fits", "SCI"), expected)
        assert expected.shape[0] == 2  # the KL-mode cube


def test_curve_agrees_with_pyklip_meas_contrast(curve):
    """pyKLIP's meas_contrast on the same i2d (candidates masked as ours), in units of the
    star's peak, divided by our throughput and transmission: within 10 % from 5 λ/D out.
    Inside, pyKLIP counts more resolution elements in an annulus (its finite pixels over
    π(λ/2D)², about 27 % more than Mawet's 2πr/(λ/D)), so its Student-t factor is smaller
    and its limit deeper: there ours is the higher of the two, by less than a third."""
    klip = pytest.importorskip("pyklip.klip")
    table, paths, _ = curve
    with fits.open(paths[0]) as hdul:
        image = hdul["SCI"].data.astype(np.float64)
    w = table.meta["resolution_pixels"]
    scale = table.meta["pixel_scale_arcsec"]
    star = table.meta["star_pixel"]
    yy, xx = np.indices(image.shape)
    for x, y in table.meta["masked_candidates"][TRUNCATE]:
        image[np.hypot(xx - x, yy - y) <= 2 * w] = np.nan
    first = table["separation"][0] / scale
    seps, theirs = klip.meas_contrast(
        image / table.meta["star_peak"],
        first - w / 2,
        table["separation"][-1] / scale + w,
        w,
        center=star,
        low_pass_filter=False,
    )
    ours = np.interp(seps, table["separation"] / scale, table["contrast"])
    dimmed = table["throughput"] * table["transmission"]  # ours: the occulter's too
    theirs = theirs / np.interp(seps, table["separation"] / scale, dimmed)
    inside = seps <= table["separation"][-1] / scale
    ratio = (ours / theirs)[inside]
    outer = seps[inside] >= 5 * w
    assert outer.sum() > 20
    assert np.all(np.abs(ratio[outer] - 1) < 0.10), ratio[outer]
    assert np.all((ratio[~outer] > 0.97) & (ratio[~outer] < 1.33)), ratio[~outer]


def test_bad_offaxis_psf_is_one_line_and_nothing_written(blank, tmp_path, capsys):
    bad = tmp_path / "psf.fits"
    fits.PrimaryHDU(np.zeros((3, 4, 4))).writeto(bad)
    out = tmp_path / "out"
    code, _, err = run_main(
        ["contrast", blank, "-o", out, "--offaxis-psf", bad, "--scheduler", "synchronous"],
        capsys,
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and str(bad) in err and "2-D" in err
    assert not out.exists() or not any(out.iterdir())


def test_injected_companions_are_where_asked_on_the_sky(curve):
    """Each companion of the injection i2ds (INJECTED − SCI), found by its peak (centroid of
    the brightest 3×3 pixels: a companion dimmed unequally in the two rolls, as at the
    PSFMASK's edge, blends two KLIP residuals) and taken to the sky through the i2d's WCS,
    lies at the separation and position angle asked (from the star at TARG_RA, TARG_DEC)."""
    table, paths, _ = curve
    with fits.open(paths[0]) as hdul:
        science = hdul["SCI"].data.astype(np.float64)
        injected = hdul["INJECTED"].data.astype(np.float64)
        grid = WCS(hdul["SCI"].header, naxis=2)
        star = SkyCoord(hdul[0].header["TARG_RA"], hdul[0].header["TARG_DEC"], unit="deg")
    scale = table.meta["pixel_scale_arcsec"]
    for companion in table.meta["injections"]:
        difference = injected[companion["set"]] - science
        found = grid.pixel_to_world(*peak_position(difference, (companion["x"], companion["y"])))
        assert abs(star.separation(found).arcsec - companion["separation"]) <= 0.75 * scale
        angle = (star.position_angle(found).deg - companion["position_angle"] + 180) % 360 - 180
        assert abs(angle) < np.degrees(0.75 * scale / companion["separation"]) + 1.0
